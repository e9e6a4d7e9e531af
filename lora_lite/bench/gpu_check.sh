#!/usr/bin/env bash
# The benchmark's GPU checks (see lora_lite/bench/gpu_check.py) on a machine with one CUDA device and torch,
# transformers, peft, tokenizers, safetensors, jinja2 and tqdm, but maybe not lark or bitsandbytes.
#
# Prepare once, at the repository root on an x86-64 machine with pip (wheels for Python 3.12 there):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl bitsandbytes==0.50.2 lark==1.3.1
# (bitsandbytes 0.50.2's manylinux wheel holds the CUDA 13.0 library.) Then, at the repository root there
# (the device tool: carry [".whl"], timeout_s 480):
#   bash lora_lite/bench/gpu_check.sh "$OUT"            # all three parts, about 5 minutes on an H200
#   bash lora_lite/bench/gpu_check.sh "$OUT" speed      # or some of: speed gsm8k quantized
set -euo pipefail
OUT=${1:-gpu-results}
shift || true
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The package as the wheel lays it out (compiler/, generated/, grammar/, specs/ inside lora_lite), without a build.
PKG=$(mktemp -d)
cp -r lora_lite "$PKG/lora_lite"
for d in compiler generated grammar specs; do cp -r "$d" "$PKG/lora_lite/$d"; done
export PYTHONPATH=$PKG:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
cd "$PKG"  # so that `python3 -m` imports this copy, not the checkout's lora_lite/ (it lacks generated/)
python3 -m lora_lite.bench.gpu_check "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
