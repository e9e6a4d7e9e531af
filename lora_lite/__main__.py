"""`python -m lora_lite ...`: the same as the `lora-lite` command."""

import sys

from lora_lite.cli import main

sys.exit(main())
