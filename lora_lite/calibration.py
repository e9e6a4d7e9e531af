"""One pass over calibration batches, feeding streaming statistics of every target's input.

Statistics are accumulated in float64 and kept per target: memory is O(d_in^2)
per target however many tokens pass; no activation is kept.

Padding does not count: when a batch is a dict with a 2-D `attention_mask`
[batch, seq], a layer input of shape [batch, seq, d_in] contributes only the
positions where the mask is non-zero (inputs of any other shape contribute
every row).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from lora_lite._text import capped
from lora_lite.targets import Target


class SecondMoment:
    """cov(x): the uncentered second moment E[x x^T] of a layer's input vectors, [d_in, d_in]."""

    def __init__(self, d_in: int, device: torch.device) -> None:
        self.total = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, rows: Tensor) -> None:
        self.total.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def result(self) -> Tensor:
        return (self.total / self.count).float()


class Mean:
    """mean(x): the mean input vector, [d_in]."""

    def __init__(self, d_in: int, device: torch.device) -> None:
        self.total = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, rows: Tensor) -> None:
        self.total += rows.sum(0)
        self.count += rows.shape[0]

    def result(self) -> Tensor:
        return (self.total / self.count).float()


STATISTICS = {"cov": SecondMoment, "mean": Mean}


def _describe(batch: object) -> str:
    def one(v: object) -> str:
        return (
            f"tensor {list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
            if isinstance(v, Tensor)
            else type(v).__name__
        )

    if isinstance(batch, Mapping):
        return "dict of " + ", ".join(f"{k}: {one(v)}" for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        return "tuple of " + ", ".join(one(v) for v in batch)
    return one(batch)


def _rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """The input vectors of `x` [..., d_in] as float64 rows, padding positions (mask == 0) left out."""
    x = x.detach()
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        x = x[mask.to(x.device) != 0]
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


EXPECTED = (
    "calibration_data is an iterable of batches, each a dict of the model's keyword arguments "
    "({'input_ids': LongTensor [batch, seq], 'attention_mask': ...}), a tuple of its positional arguments, "
    "or one tensor (its first argument): e.g. calibration_data=[{'input_ids': ids}] or a DataLoader of such batches"
)


def check_data(batches: object, title: str) -> None:
    """Refuse calibration data that is not an iterable of batches (a single batch, text), before any forward."""
    single = {Tensor: "a single tensor", Mapping: "a single dict", str: "a string", bytes: "bytes"}
    for kind, what in single.items():
        if isinstance(batches, kind):
            raise ValueError(f"{title}: calibration_data is {what}, not an iterable of batches ([batch]). {EXPECTED}")
    if not isinstance(batches, Iterable):
        raise ValueError(f"{title}: calibration_data is a {type(batches).__name__}, not an iterable. {EXPECTED}")


def check_batch(batch: object, index: int, title: str) -> None:
    """Refuse a batch the model cannot take as-is (text, numbers, None), before its forward."""
    if isinstance(batch, Tensor):
        problem = "a 0-d tensor" if batch.dim() == 0 else None
    elif isinstance(batch, Mapping):
        values = list(batch.values())
        problem = _text_in(values)
        if not problem and (
            not all(isinstance(k, str) for k in batch) or not any(isinstance(v, Tensor) for v in values)
        ):
            problem = "a dict without string keys and tensor values"
    elif isinstance(batch, (tuple, list)):
        problem = _text_in(batch) or (None if any(isinstance(v, Tensor) for v in batch) else "a tuple without tensors")
    else:
        problem = f"a {type(batch).__name__}"
    if problem:
        raise ValueError(f"{title}: calibration batch {index} is {problem}. {EXPECTED}")


def _text_in(values: Iterable) -> str | None:
    for v in values:
        if isinstance(v, str) or (isinstance(v, (list, tuple)) and v and isinstance(v[0], str)):
            return "text: tokenize it first (the batches are what the model's forward takes)"
    return None


def calibrate(
    model: nn.Module, targets: list[Target], kinds: Mapping[str, str], batches: Iterable, title: str
) -> dict[str, dict[str, Tensor]]:
    """Run the model once over `batches` and return {target name: {stat name: value}}.

    A batch is a dict of model kwargs, a tuple/list of positional args, or a tensor. The data's form
    is checked before the first forward and each batch before its own; a forward that fails on a
    batch raises ValueError naming the batch and the expected form.
    """
    check_data(batches, title)
    accumulators = {
        t.name: {name: STATISTICS[kind](t.d_in, t.layer.weight.device) for name, kind in kinds.items()} for t in targets
    }
    current_mask: list[Tensor | None] = [None]  # the running batch's attention mask
    handles = []
    for t in targets:
        stats = list(accumulators[t.name].values())

        def feed(layer: nn.Module, args: tuple, stats: list = stats) -> None:
            rows = _rows(args[0], current_mask[0])
            for stat in stats:
                stat.update(rows)

        handles.append(t.layer.register_forward_pre_hook(feed))
    modes = {module: module.training for module in model.modules()}
    n_batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for index, batch in enumerate(batches):
                check_batch(batch, index, title)
                n_batches += 1
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                current_mask[0] = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
                try:
                    if isinstance(batch, Mapping):
                        model(**batch)
                    elif isinstance(batch, (tuple, list)):
                        model(*batch)
                    else:
                        model(batch)
                except (TypeError, ValueError, RuntimeError, IndexError) as exc:
                    raise ValueError(
                        f"{title}: the model's forward failed on calibration batch {index} ({_describe(batch)}): "
                        f"{type(exc).__name__}: {exc}. {EXPECTED}"
                    ) from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if n_batches == 0:
        raise ValueError(f"{title}: calibration_data is empty; pass an iterable of at least one batch")
    unreached = [t.name for t in targets if any(s.count == 0 for s in accumulators[t.name].values())]
    if unreached:
        shown = ", ".join(capped(unreached, 5))
        raise ValueError(
            f"{title}: the calibration batches never reached {shown}; check that the batches run through these layers"
        )
    return {name: {k: s.result() for k, s in stats.items()} for name, stats in accumulators.items()}
