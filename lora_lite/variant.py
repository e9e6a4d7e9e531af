"""The variant protocol: what the runtime needs from a variant, generated or hand-written.

A variant is a class with a config dataclass and five static functions:

    slots(cfg, d_in, d_out) -> [Slot]         adapter tensors: name, shape, trainable
    check(cfg, d_in, d_out) -> [str]          problems that stop attach, before any change
    init(cfg, d_in, d_out, W, stats, device) -> {}   initial values (float32); W only if
                                              init_reads_weight; stats: the calibration statistics
    residual(layer, cfg, W) -> Tensor         the weight the layer keeps (a variant that defines it has_residual)
    merged(layer, cfg) -> (W, b)              one plain linear layer equal to the adapted one (if merge_refusal is None)
    output(layer, cfg, x, y) / input(layer, cfg, x)   the hook's math
    shared_slots(cfg, max_d_in, max_d_out) -> [Slot]    tensors shared by every target (VeRA's A and B),
    shared_init(cfg, max_d_in, max_d_out, device) -> {}  sized by the largest target: one module `lora_shared`
                                              on the model holds them, and each target reads layer.lora_shared

Subclassing `Variant` registers the class, so `load` can find it by name. A name (or a class
name) that another variant has is refused, unless both are the same variant: the same
module imported again (a re-run notebook cell), or the same spec (same spec hash) imported
under another path. Configs made before such a re-import still attach.
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
    dtype: torch.dtype | None = None  # None: the config's dtype; torch.int64 for an index set (randperm)


@dataclass(kw_only=True)
class AdapterConfig:
    """Fields every variant's config has; generated configs add the spec's hypers.

    dtype: the adapter tensors' dtype. The hook computes in the wider of this and
        the layer input's dtype, and returns the layer's dtype.
    target_names: a regex that must match a layer's full name or a whole dotted
        tail of it (`q_proj` matches `model.layers.0.self_attn.q_proj`, not
        `qkv_proj`), or a list of such names, as PEFT's `target_modules`
        (["q_proj", "v_proj"]: each taken literally). None: any linear layer.
    target_roles: keep layers whose shapes give one of these roles against the
        model's hidden size: reader (d_in == hidden), writer (d_out == hidden),
        inner (neither). A hidden x hidden layer is both reader and writer. One
        role may be given as a string ("writer").
    target_layers: keep layers whose name holds one of these block indices (an int: one block).
    exclude_names: regex or list of names never targeted, matched as target_names
        (default: lm_head and embeddings).

    Raises TypeError for a field of the wrong type and ValueError for a bad value, naming the field.
    svd_method: "exact" (torch.linalg.svd) or "lowrank" (torch.svd_lowrank, 4 power
        iterations: much faster on large layers, close but not exact) for svd() in specs.
    modules_to_save: names of whole modules (e.g. a classifier head, "classifier" or
        "score") trained with the adapter, saved in its file and put back by detach;
        as PEFT's, an entry selects every module whose name is, or ends with, `.` + it.
    """

    dtype: torch.dtype = torch.float32
    target_names: str | list[str] | None = None
    target_roles: tuple[str, ...] | str | None = None
    target_layers: tuple[int, ...] | int | None = None
    exclude_names: str | list[str] | None = DEFAULT_EXCLUDE
    svd_method: str = "exact"
    modules_to_save: tuple[str, ...] | None = None

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
            setattr(self, name, self._names_regex(name, getattr(self, name)))
        if self.svd_method not in SVD_METHODS:
            raise ValueError(f"svd_method must be one of {SVD_METHODS}, not {self.svd_method!r}")
        if self.target_roles is not None:
            roles = (self.target_roles,) if isinstance(self.target_roles, str) else self.target_roles
            if not isinstance(roles, (list, tuple, set, frozenset)) or not all(isinstance(r, str) for r in roles):
                raise TypeError(
                    f"{type(self).__name__}.target_roles must be a role or a tuple of roles from {ROLES}, "
                    f"not {self.target_roles!r}"
                )
            self.target_roles = tuple(roles)
            unknown = set(self.target_roles) - set(ROLES)
            if unknown or not self.target_roles:
                raise ValueError(f"unknown target_roles {sorted(unknown) or '()'}; use one or more of {ROLES}")
        if self.target_layers is not None:
            layers = (self.target_layers,) if isinstance(self.target_layers, int) else self.target_layers
            if not isinstance(layers, (list, tuple, set, frozenset, range)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
            ):
                raise TypeError(
                    f"{type(self).__name__}.target_layers must be a block index or a tuple of them "
                    f"(ints >= 0, e.g. 0 or (0, 1)), not {self.target_layers!r}"
                )
            self.target_layers = tuple(sorted(set(layers)))
        if self.modules_to_save is not None:
            names = (self.modules_to_save,) if isinstance(self.modules_to_save, str) else tuple(self.modules_to_save)
            if not all(isinstance(n, str) and n for n in names):
                raise TypeError(f"modules_to_save must be module names (strings), not {self.modules_to_save!r}")
            self.modules_to_save = names

    def _names_regex(self, field: str, value: object) -> str | None:
        """A target_names/exclude_names value as one regex: a list of names becomes their escaped alternation."""
        if value is None:
            return None
        if isinstance(value, (list, tuple, set, frozenset)):
            if not value or not all(isinstance(n, str) and n for n in value):
                raise TypeError(
                    f"{type(self).__name__}.{field} as a list must hold module names (non-empty strings, "
                    f"e.g. ['q_proj', 'v_proj']), not {value!r}"
                )
            return "|".join(re.escape(n) for n in sorted(value))
        if not isinstance(value, str):
            raise TypeError(
                f"{type(self).__name__}.{field} must be a regex, a list of module names "
                f"(e.g. ['q_proj', 'v_proj']) or None, not {value!r}"
            )
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{type(self).__name__}.{field} is not a valid regex ({exc}): {value!r}") from None
        return value

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
        for name in ("target_roles", "target_layers", "modules_to_save"):
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
    identity_at_init: ClassVar[bool] = True  # the docstring's "Identity at init:" claim; lora_lite.verify checks it
    has_residual: ClassVar[bool] = False  # derived: whether the class defines residual
    stats: ClassVar[dict[str, str]] = {}  # calibration statistics init reads: name -> "cov" | "mean"
    merge_refusal: ClassVar[str | None] = "it defines no merged() function"  # None: `merged` folds it into W
    shared_formula: ClassVar[str] = "0"  # trainable numbers in the shared tensors, once per attach

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.site not in ("input", "output"):
            raise TypeError(f"{cls.__name__}.site must be 'input' or 'output', not {cls.site!r}")
        cls.has_residual = cls.residual is not Variant.residual
        _register(cls)

    @staticmethod
    def slots(cfg: AdapterConfig, d_in: int, d_out: int) -> list[Slot]:
        raise NotImplementedError

    @staticmethod
    def check(cfg: AdapterConfig, d_in: int, d_out: int) -> list[str]:
        return []

    @staticmethod
    def shared_slots(cfg: AdapterConfig, max_d_in: int, max_d_out: int) -> list[Slot]:
        """The tensors every target shares, sized by the largest d_in and d_out over the targets."""
        return []

    @staticmethod
    def shared_init(cfg: AdapterConfig, max_d_in: int, max_d_out: int, device: torch.device) -> dict[str, Tensor]:
        """The shared tensors' initial values (float32), once per attach."""
        return {}

    @staticmethod
    def init(
        cfg: AdapterConfig, d_in: int, d_out: int, W: Tensor | None, stats: dict[str, Tensor], device: torch.device
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    @staticmethod
    def residual(layer: nn.Module, cfg: AdapterConfig, W: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def merged(layer: nn.Module, cfg: AdapterConfig) -> tuple[Tensor, Tensor | float]:
        """The weight [d_out, d_in] and bias [d_out] (or 0.0) of one plain linear layer computing what the
        adapted layer computes, in float32; only when `merge_refusal` is None."""
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
        """The registered variant whose config `cfg` is; raises TypeError naming the module to import."""
        kind = type(cfg)
        for variant in cls.registry.values():
            if kind is variant.config_class:
                return variant
        owner = vars(kind).get(_OWNER)  # a config class from an earlier import of its variant's module
        if owner is not None:
            variant = cls.registry.get(owner.name)
            if variant is not None and _same(owner, _Owner.of(variant)):
                return variant
        raise TypeError(
            f"{kind.__name__} is not the config of any registered variant: import the module that defines its "
            f"variant ({kind.__module__}) first"
        )

    @classmethod
    def num_trainable(cls, cfg: AdapterConfig, d_in: int, d_out: int) -> int:
        """Trainable numbers on one layer, not counting the shared tensors (see num_trainable_shared)."""
        return sum(_numel(s.shape) for s in cls.slots(cfg, d_in, d_out) if s.trainable)

    @classmethod
    def num_trainable_shared(cls, cfg: AdapterConfig, max_d_in: int, max_d_out: int) -> int:
        """Trainable numbers in the shared tensors, counted once per attach."""
        return sum(_numel(s.shape) for s in cls.shared_slots(cfg, max_d_in, max_d_out) if s.trainable)


_OWNER = "_lora_lite_variant"  # set on each variant's config class: which variant it configures


class _Owner(NamedTuple):
    name: str
    module: str
    qualname: str
    spec_hash: str | None

    @classmethod
    def of(cls, variant: type[Variant]) -> _Owner:
        return cls(variant.name, variant.__module__, variant.__qualname__, variant.spec_hash)


def _same(a: _Owner, b: _Owner) -> bool:
    """One variant twice: the same module imported again, or the same spec compiled into two modules."""
    return (a.module, a.qualname) == (b.module, b.qualname) or (a.spec_hash is not None and a.spec_hash == b.spec_hash)


def _register(variant: type[Variant]) -> None:
    """Add `variant` to the registry, refusing a name or class name that a different variant has."""
    builtins = [] if variant.__module__.startswith("lora_lite.generated.") else _builtin_namesakes(variant)
    new = _Owner.of(variant)
    for old in [Variant.registry.get(variant.name), *builtins]:
        if old is not None and old.name == variant.name and not _same(_Owner.of(old), new):
            raise TypeError(
                f"{variant.__module__}.{variant.__qualname__}: the variant name {variant.name!r} is taken by "
                f"{old.__module__}.{old.__qualname__}, which computes something else (spec hash "
                f"{(old.spec_hash or 'none')[:12]}, this one {(variant.spec_hash or 'none')[:12]}): rename one "
                "(`adapter NEW_NAME ...` in its spec) and recompile it"
            )
    for other in [*Variant.registry.values(), *builtins]:
        if other.name != variant.name and other.__name__ == variant.__name__:
            raise TypeError(
                f"{variant.__module__}.{variant.__qualname__}: the class name {variant.__name__} is taken by "
                f"variant {other.name!r} ({other.__module__}): change the title in its spec and recompile it"
            )
    if _OWNER not in vars(variant.config_class):  # a config class shared with a subclass keeps its first owner
        setattr(variant.config_class, _OWNER, new)
    Variant.registry[variant.name] = variant


def _builtin_namesakes(variant: type[Variant]) -> list[type[Variant]]:
    """The package's variants that have this name or class name, imported, so that a clash is seen whatever
    the import order (the index is a plain dict: reading it imports no variant)."""
    import importlib

    from lora_lite.generated import VARIANTS

    return [
        getattr(importlib.import_module(f"lora_lite.generated.{module}"), cls)
        for cls, module in VARIANTS.items()
        if variant.name == module or variant.__name__ == cls
    ]


def _type_name(annotation: object) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
