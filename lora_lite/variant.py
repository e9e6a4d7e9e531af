"""The variant protocol: what the runtime needs from a variant, generated or hand-written.

A variant is a class with a config dataclass and five static functions:

    slots(cfg, d_in, d_out) -> [Slot]         adapter tensors: name, shape, trainable
    check(cfg, d_in, d_out) -> [str]          problems that stop attach, before any change
    init(cfg, d_in, d_out, W, stats, device) -> {}   initial values (float32); W only if
                                              init_reads_weight; stats: the calibration statistics
    residual(layer, cfg, W) -> Tensor         the weight the layer keeps (a variant that defines it has_residual)
    output(layer, cfg, x, y) / input(layer, cfg, x)   the hook's math

Subclassing `Variant` registers the class, so `load` can find it by name.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

ROLES = ("reader", "writer", "inner")
SVD_METHODS = ("exact", "lowrank")
DEFAULT_EXCLUDE = r"(^|\.)(lm_head|embed_tokens|embed_out|wte|wpe)$"


class Slot(NamedTuple):
    """One adapter tensor on a target layer, stored as `lora_<name>`."""

    name: str
    shape: tuple[int, ...]
    trainable: bool


@dataclass(kw_only=True)
class AdapterConfig:
    """Fields every variant's config has; generated configs add the spec's hypers.

    dtype: the adapter tensors' dtype. The hook computes in the wider of this and
        the layer input's dtype, and returns the layer's dtype.
    target_names: regex searched in each linear layer's full name (None: any).
    target_roles: keep layers whose shapes give one of these roles against the
        model's hidden size: reader (d_in == hidden), writer (d_out == hidden),
        inner (neither). A hidden x hidden layer is both reader and writer.
    target_layers: keep layers whose name holds one of these block indices.
    exclude_names: regex of names never targeted (default: lm_head and embeddings).
    svd_method: "exact" (torch.linalg.svd) or "lowrank" (torch.svd_lowrank, 4 power
        iterations: much faster on large layers, close but not exact) for svd() in specs.
    """

    dtype: torch.dtype = torch.float32
    target_names: str | None = None
    target_roles: tuple[str, ...] | None = None
    target_layers: tuple[int, ...] | None = None
    exclude_names: str | None = DEFAULT_EXCLUDE
    svd_method: str = "exact"

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__}.dtype must be a floating torch.dtype, not {self.dtype!r}")
        for field in self.hyper_fields():
            value, kind = getattr(self, field.name), _type_name(field.type)
            if kind.startswith("int") and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{type(self).__name__}.{field.name} must be an int, not {value!r}")
            if kind.startswith("float"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"{type(self).__name__}.{field.name} must be a float, not {value!r}")
                setattr(self, field.name, float(value))
        for name in ("target_names", "exclude_names"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(
                        f"{type(self).__name__}.{name} is not a valid regex ({exc}): {pattern!r}"
                    ) from None
        if self.svd_method not in SVD_METHODS:
            raise ValueError(f"svd_method must be one of {SVD_METHODS}, not {self.svd_method!r}")
        if self.target_roles is not None:
            self.target_roles = tuple(self.target_roles)
            unknown = set(self.target_roles) - set(ROLES)
            if unknown:
                raise ValueError(f"unknown target_roles {sorted(unknown)}; use {ROLES}")
        if self.target_layers is not None:
            self.target_layers = tuple(int(i) for i in self.target_layers)

    @classmethod
    def hyper_fields(cls) -> list[dataclasses.Field]:
        base = {f.name for f in dataclasses.fields(AdapterConfig)}
        return [f for f in dataclasses.fields(cls) if f.name not in base]

    def to_dict(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
        values = dict(data)
        if "dtype" in values:
            dtype = getattr(torch, str(values["dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {values['dtype']!r}")
            values["dtype"] = dtype
        for name in ("target_roles", "target_layers"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)


class Variant:
    """Base of every variant. Subclasses set the class attributes and the static functions."""

    registry: ClassVar[dict[str, type[Variant]]] = {}

    name: ClassVar[str]
    title: ClassVar[str]
    url: ClassVar[str | None] = None
    config_class: ClassVar[type[AdapterConfig]]
    site: ClassVar[str]  # "input" or "output"
    spec_hash: ClassVar[str | None] = None  # None for hand-written variants
    trainable_formula: ClassVar[str] = ""
    quantizable: ClassVar[bool] = False
    init_reads_weight: ClassVar[bool] = True
    has_residual: ClassVar[bool] = False  # derived: whether the class defines residual
    stats: ClassVar[dict[str, str]] = {}  # calibration statistics init reads: name -> "cov" | "mean"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.site not in ("input", "output"):
            raise TypeError(f"{cls.__name__}.site must be 'input' or 'output', not {cls.site!r}")
        cls.has_residual = cls.residual is not Variant.residual
        Variant.registry[cls.name] = cls

    @staticmethod
    def slots(cfg: AdapterConfig, d_in: int, d_out: int) -> list[Slot]:
        raise NotImplementedError

    @staticmethod
    def check(cfg: AdapterConfig, d_in: int, d_out: int) -> list[str]:
        return []

    @staticmethod
    def init(
        cfg: AdapterConfig, d_in: int, d_out: int, W: Tensor | None, stats: dict[str, Tensor], device: torch.device
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    @staticmethod
    def residual(layer: nn.Module, cfg: AdapterConfig, W: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def output(layer: nn.Module, cfg: AdapterConfig, x: Tensor, y: Tensor) -> Tensor:
        """The hook's math for site "output": the layer's new output from its input x [..., d_in] and
        output y [..., d_out]."""
        raise NotImplementedError

    @staticmethod
    def input(layer: nn.Module, cfg: AdapterConfig, x: Tensor) -> Tensor:
        """The hook's math for site "input": the layer's new input from x [..., d_in]."""
        raise NotImplementedError

    @classmethod
    def for_config(cls, cfg: AdapterConfig) -> type[Variant]:
        for variant in cls.registry.values():
            if type(cfg) is variant.config_class:
                return variant
        raise TypeError(f"{type(cfg).__name__} is not the config of any registered variant")

    @classmethod
    def num_trainable(cls, cfg: AdapterConfig, d_in: int, d_out: int) -> int:
        return sum(_numel(s.shape) for s in cls.slots(cfg, d_in, d_out) if s.trainable)


def _type_name(annotation: object) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
