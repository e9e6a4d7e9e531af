"""What each variant means to Hugging Face PEFT 0.21: one record per variant, read by export, import, the parity
tests and the benchmark.

A record (`PeftRecord`) says:

- `twin`: PEFT's model of the same method (`Twin`: its config class in peft, which of its fields are our
  hypers, its fixed fields, and what PEFT runs after wrapping, such as EVA's calibration). `peft_twin` wraps a
  model with it, for the parity tests and the benchmark's paired rows. A record without a twin says why in
  `refused`: a missing twin is a stated refusal, never a silence.
- `tensors`: how our tensors on one layer are PEFT's (`PeftTensor`: PEFT's key under the layer, the slot or
  hyper our spec stores the tensor as an offset from, PEFT's shape, whether PEFT holds one copy for all layers).
  Where PEFT's value is not a reshape of ours, the mapping is still data: `layout`, steps that each have an
  inverse (permute, unflatten, flatten: GraLoRA's transposed blocks); `part`, several of our slots stacked in
  one PEFT tensor (RoAd-4's angles); a key at the model's top (`shared`, or "{index}" for one per layer:
  TinyLoRA's tinylora_v.0); an offset that is a function of the layer's weight (DEFT's R). `copy_to_twin`
  copies values along it (the parity tests' random values, the benchmark's initial values), `twin_gradients`
  maps PEFT's gradients back, export_peft writes it, import_peft reads it back (`peft_tensors` and its inverse
  `our_tensors`).
- `redrawn`: our frozen slots PEFT's file does not hold because PEFT draws them again when it loads, with PEFT's
  draw (FourierFT's spectral entries from random_loc_seed): import sets them, export checks them.
- `peft_type` and `options`: the adapter_config.json export_peft writes (PEFT's LORA and IA3 formats only, the
  ones serving tools read); `convert` where the file is not `tensors` (PiSSA's conversion to LoRA).
- `refused`: why export_peft cannot write the variant, which is also the reason when there is no twin.

A new spec's record is a few lines: its twin's config class and hyper names, and its tensors' PEFT keys.
The package's variants are keyed by name in `RECORDS`; a test checks that every compiled variant has one.
Stating a record in the spec itself would need new grammar (a `peft ...` statement through every compiler
pass), so it lives here instead. A variant from outside the package gets a record by its math: `record_for`
probes its forward on a small float64 layer with random tensors, and a variant that computes
y + (alpha / r) B A x is PEFT LoRA, one that computes y + (alpha / sqrt(r)) B A x is PEFT LoRA with
`use_rslora` (rsLoRA, Kalajdzievski 2023, https://arxiv.org/abs/2312.03732). Anything else is refused with what
the probe found.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lora_lite import ops, runtime
from lora_lite.targets import is_linear_like
from lora_lite.variant import AdapterConfig, Variant

Tensors = dict[str, Tensor]  # one layer's adapter tensors, by slot name (A, B, m_shift, ...)
ADAPTER = "default"  # the adapter name PEFT's modules hold their tensors under, and leaves out of its files
TARGETS = object()  # a Twin's fixed field whose value is the target list (IA3-FF's feedforward_modules)
# PEFT's file keys are its module keys less the adapter name, except where PEFT renames (DoRA's magnitude, kept
# in files as it was before PEFT made it a module)
_FILE_KEYS = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}


@dataclass(frozen=True)
class Twin:
    """PEFT's model of the same method: `peft.<config_class>(target_modules=..., **fields)`."""

    config_class: str  # in peft, e.g. "LoraConfig"
    hypers: dict[str, str] = field(default_factory=dict)  # PEFT's field -> our hyper of the same meaning
    fixed: dict[str, object] = field(default_factory=dict)  # PEFT's field -> its value (TARGETS; a callable: called)
    init: Callable[[nn.Module, list], None] | None = None  # run on the wrapped model with calibration batches
    setup: Callable[[], None] | None = None  # run before wrapping (BOFT: no CUDA extension build on each layer)

    @property
    def peft_type(self) -> str:
        """PEFT's type name of the method, as adapter_config.json writes it: "LoraConfig" -> "LORA"."""
        return self.config_class.removesuffix("Config").upper()

    def options(self, cfg: AdapterConfig, modules: list[str]) -> dict[str, object]:
        """The method's entries of adapter_config.json for our `cfg` (PEFT fills the other fields with its
        defaults when it reads the file); needs no peft."""
        values: dict[str, object] = {"peft_type": self.peft_type}
        values |= {name: getattr(cfg, hyper) for name, hyper in self.hypers.items()}
        for name, value in self.fixed.items():
            values[name] = list(modules) if value is TARGETS else value
        return values

    def config(self, cfg: AdapterConfig, targets: Sequence[str]) -> object:
        """PEFT's config for our `cfg` on `targets` (module names as PEFT matches them); imports peft."""
        import peft

        values = {name: getattr(cfg, hyper) for name, hyper in self.hypers.items()}
        for name, value in self.fixed.items():
            values[name] = list(targets) if value is TARGETS else value() if callable(value) else value
        return getattr(peft, self.config_class)(target_modules=list(targets), **values)


# A step of a PeftTensor's layout, applied to our value (after its offset) on the way to PEFT's, each invertible:
# ("permute", axes), ("unflatten", dim, sizes) and ("flatten", start, end), as torch's tensor methods of those
# names; a size is an int (-1: the rest) or the name of a hyper ("group_size")
Step = tuple
Offset = str | float | Callable[[AdapterConfig, Tensors, Tensor], Tensor]


@dataclass(frozen=True)
class PeftTensor:
    """PEFT's tensor that holds one of our slots: PEFT's value is `layout`(ours + offset), stacked with the other
    slots of the same key when `part` is set, then reshaped to `shape`. Every step is undone on import."""

    key: str  # under the layer, without the adapter name: "lora_A.weight" is layer.lora_A["default"].weight
    # our slot, hyper or a number the spec stores the tensor as an offset from, or a function (cfg, slots, W) of
    # the layer's other slots and its weight W [d_out, d_in] (float32) for an offset that depends on W (DEFT's R)
    offset: Offset | None = None
    shape: tuple[int, ...] | None = None  # PEFT's shape of it, where it differs (IA3's ia3_l is [d_out, 1])
    # PEFT holds one tensor for all layers at the model's top (base_model.<key>: VeRA's A, B); ours is lora_shared's.
    # A key with "{index}" is also at the model's top, one per target: index is the target's position among the
    # targets in the model's module order (TinyLoRA's tinylora_v.{index}, one group per layer)
    shared: bool = False
    # a shared tensor PEFT's file also repeats under every layer (RandLoRA's randlora_A, randlora_B: each layer's
    # BufferDict holds the one tensor the model's top holds)
    repeated: bool = False
    layout: tuple[Step, ...] = ()  # from ours to PEFT's order of the entries (GraLoRA's blocks transposed)
    # (axis, i): PEFT's tensor stacks the slots of this key along `axis` (after their layouts), ours is the i-th
    # (RoAd-4's road_theta holds theta1 and theta2 of each group side by side)
    part: tuple[int, int] | None = None
    # steps applied to the stacked tensor of a `part` key (PVeRA's pvera_A: A_mu over A_logvar, [2, r, d] ->
    # [2r, d] by ("flatten", 0, 1)); undone on import like `layout`
    stacked_layout: tuple[Step, ...] = ()
    # an index set PEFT holds as [2, k] (row, column) pairs of the [d_out, d_in] matrix (SHiRA's shira_indices),
    # ours as k flat row-major positions
    pairs: bool = False

    @property
    def file_key(self) -> str:
        return file_key(self.key)

    @property
    def at_top(self) -> bool:
        """Held at the model's top (base_model.<key>) rather than under each layer."""
        return self.shared or "{index}" in self.key

    @property
    def param_key(self) -> str:
        """The key under the layer in PEFT's model: "lora_A.weight" -> "lora_A.default.weight"."""
        head, _, rest = self.key.partition(".")
        return ".".join(p for p in (head, ADAPTER, rest) if p)


def _need(d_in: int | None, slot: str) -> int:
    if d_in is None:
        raise ValueError(f"the PEFT tensor of {slot} holds (row, column) pairs: pass the layer's d_in")
    return d_in


def _size(cfg: AdapterConfig, size: int | str) -> int:
    return getattr(cfg, size) if isinstance(size, str) else size


_STEPS: dict[str, Callable[..., Tensor]] = {  # name -> (tensor, cfg, *args) -> tensor
    "permute": lambda t, cfg, axes: t.permute(*axes),
    "unflatten": lambda t, cfg, dim, sizes: t.unflatten(dim, tuple(_size(cfg, s) for s in sizes)),
    "flatten": lambda t, cfg, start, end: t.flatten(start, end),
}


def _lay_out(steps: tuple[Step, ...], cfg: AdapterConfig, value: Tensor) -> Tensor:
    for name, *args in steps:
        value = _STEPS[name](value, cfg, *args)
    return value


def _undo_layout(steps: tuple[Step, ...], cfg: AdapterConfig, value: Tensor, ours: tuple[int, ...]) -> Tensor:
    """The inverse of _lay_out for a value of our shape `ours`: a permute by its inverse, any other step by a
    reshape back to the shape it had before the step."""
    shapes, t = [], torch.empty(ours, device="meta")
    for step in steps:
        shapes.append(t.shape)
        t = _lay_out((step,), cfg, t)
    for (name, *args), shape in zip(reversed(steps), reversed(shapes), strict=True):
        if name == "permute":
            value = value.permute(*sorted(range(len(args[0])), key=args[0].__getitem__))
        else:
            value = value.reshape(shape)
    return value


@dataclass(frozen=True)
class PeftRecord:
    """What a variant is to PEFT; `refused` set means export_peft cannot write it (and says why)."""

    title: str
    twin: Twin | None = None
    tensors: dict[str, PeftTensor] = field(default_factory=dict)  # our slot -> PEFT's tensor
    peft_type: str | None = None  # the file's type ("LORA"); the twin's when unset; None when refused
    options: Callable[[AdapterConfig, list[str]], dict[str, object]] | None = None  # cfg, target_modules
    convert: Callable[[AdapterConfig, Tensors], Tensors] | None = None  # export's own file tensors (PiSSA)
    # PEFT keys its file holds as zeros for this form of the method (GLoRA's empty paths), by shape in d_in,
    # d_out and integers: export writes them, import checks they are zero
    zeros: dict[str, tuple[str | int, ...]] = field(default_factory=dict)
    refused: str | None = None
    # our frozen slots that PEFT's file does not hold because PEFT draws them again when it loads (FourierFT's
    # spectral entries, from random_loc_seed): slot -> PEFT's draw for our cfg on a (d_in, d_out) layer, whose
    # docstring says what it is. import_peft sets them; export_peft refuses an adapter whose slots differ
    redrawn: dict[str, Callable[[AdapterConfig, int, int], Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.twin is not None and self.refused is None and self.peft_type is None:  # the file is the twin's
            if callable(self.twin.init):
                raise ValueError(
                    f"the PEFT record of {self.title}: a twin with an init needs its own file format (peft_type, "
                    "options) or `refused`"
                )
            object.__setattr__(self, "peft_type", self.twin.peft_type)
            object.__setattr__(self, "options", self.twin.options)
        if self.twin is None and not self.refused:
            raise ValueError(f"the PEFT record of {self.title} has no twin: say why in `refused`")
        if self.twin is not None and not self.tensors:
            raise ValueError(f"the PEFT record of {self.title} has a twin but no `tensors` mapping onto it")
        if (self.refused is None) != (self.peft_type is not None and self.options is not None):
            raise ValueError(f"the PEFT record of {self.title} needs either peft_type and options or `refused`")

    @property
    def reads_weight(self) -> bool:
        """An offset is a function of the layer's weight: peft_tensors and our_tensors need W."""
        return any(callable(spec.offset) for spec in self.tensors.values())

    def peft_tensors(
        self,
        cfg: AdapterConfig,
        slot: Tensors,
        W: Tensor | None = None,
        index: int = 0,
        offsets: bool = True,
        shared: bool = False,
        d_in: int | None = None,
    ) -> Tensors:
        """One layer's PEFT tensors from its slots `slot`, by PEFT's key in its model ("lora_A.weight"; a key at
        the model's top formatted with the layer's `index`), in PEFT's shapes and our dtypes; with `shared`, the
        tensors every layer shares from our shared slots instead (shared_tensors). W: the layer's weight
        [d_out, d_in] where reads_weight; d_in, the layer's, where a tensor is `pairs`. offsets=False leaves the
        offsets out (the map of gradients)."""
        groups: dict[str, list[tuple[PeftTensor, Tensor]]] = {}
        for name, spec in self.tensors.items():
            if spec.shared != shared:
                continue
            value = slot[name]
            if offsets and spec.offset is not None:  # in float32: a bf16 sum of two bf16 numbers rounds once more
                value = (value.float() + _offset(cfg, slot, spec.offset, W)).to(value.dtype)
            if spec.pairs:  # flat row-major positions -> (row, column) pairs
                value = torch.stack([value // _need(d_in, name), value % _need(d_in, name)])
            groups.setdefault(spec.key.format(index=index), []).append((spec, _lay_out(spec.layout, cfg, value)))
        out = {}
        for key, parts in groups.items():
            spec, value = parts[0]
            if spec.part is not None:
                value = torch.stack([v for _, v in sorted(parts, key=lambda p: p[0].part[1])], dim=spec.part[0])
                value = _lay_out(spec.stacked_layout, cfg, value)
            out[key] = value.reshape(spec.shape) if spec.shape is not None else value
        return out

    def our_tensors(
        self,
        cfg: AdapterConfig,
        slot: Tensors,
        values: Tensors,
        W: Tensor | None = None,
        index: int = 0,
        offsets: bool = True,
        shared: bool = False,
        d_in: int | None = None,
    ) -> Tensors:
        """The inverse of peft_tensors: our slots from PEFT's tensors of one layer `values` (keyed as
        peft_tensors keys them), in the shapes and dtypes of the layer's current slots `slot` (whose frozen ones
        the offsets read); with `shared`, our shared slots (our_shared)."""
        out = {}
        for name, spec in self.tensors.items():
            if spec.shared != shared:
                continue
            ours = slot[name]
            laid = _lay_out(spec.layout, cfg, torch.empty(ours.shape, device="meta")).shape
            value = values[spec.key.format(index=index)]
            if spec.pairs:  # (row, column) pairs -> flat row-major positions
                value = value[0].long() * _need(d_in, name) + value[1].long()
            if spec.part is not None:
                axis, i = spec.part
                stacked = torch.stack([torch.empty(laid, device="meta")] * self._parts(spec.key), dim=axis).shape
                after = _lay_out(spec.stacked_layout, cfg, torch.empty(stacked, device="meta")).shape
                value = _undo_layout(spec.stacked_layout, cfg, value.reshape(after), tuple(stacked)).select(axis, i)
            value = _undo_layout(spec.layout, cfg, value.reshape(laid), tuple(ours.shape))
            if offsets and spec.offset is not None:
                value = value.float() - _offset(cfg, slot, spec.offset, W)
            out[name] = value.reshape(ours.shape).to(ours.dtype)
        return out

    def top_keys(self, index: int) -> set[str]:
        """The file keys at the model's top of the layer at `index` among the targets, the shared ones too."""
        return {spec.file_key.format(index=index) for spec in self.tensors.values() if spec.at_top}

    def _parts(self, key: str) -> int:
        return sum(spec.key == key for spec in self.tensors.values())

    def shared_tensors(self, cfg: AdapterConfig, shared: Tensors) -> Tensors:
        """PEFT's tensors at the model's top that every layer shares, by key, from our shared slots (PVeRA's
        A_mu and A_logvar stacked in one pvera_A)."""
        return self.peft_tensors(cfg, shared, shared=True)

    def our_shared(self, cfg: AdapterConfig, shared: Tensors, values: Tensors) -> Tensors:
        """The inverse of shared_tensors: our shared slots from PEFT's tensors at the model's top `values`."""
        return self.our_tensors(cfg, shared, values, shared=True)

    def export_tensors(
        self, cfg: AdapterConfig, slot: Tensors, d_in: int, d_out: int, W: Tensor | None = None, index: int = 0
    ) -> Tensors:
        """One layer's tensors as export_peft writes them, by PEFT's file key (under the layer, or at the model's
        top for a key with "{index}")."""
        if self.convert is not None:
            return self.convert(cfg, slot)
        out = {file_key(key): value for key, value in self.peft_tensors(cfg, slot, W, index, d_in=d_in).items()}
        dtype = next(iter(out.values())).dtype
        for key in self.zeros:
            out[key] = torch.zeros(self.zeros_shape(key, d_in, d_out), dtype=dtype)
        return out

    def zeros_shape(self, key: str, d_in: int, d_out: int) -> tuple[int, ...]:
        sizes = {"d_in": d_in, "d_out": d_out}
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.zeros[key])


def file_key(key: str) -> str:
    """PEFT's key in its file of its model's key under a layer (they differ for DoRA's magnitude)."""
    return _FILE_KEYS.get(key, key)


def model_key(key: str) -> str:
    """The inverse of file_key."""
    return {v: k for k, v in _FILE_KEYS.items()}.get(key, key)


def _offset(cfg: AdapterConfig, slot: Tensors, name: Offset, W: Tensor | None) -> Tensor | float:
    if callable(name):  # a function of the layer's weight (DEFT)
        if W is None:
            raise ValueError("this record's offset reads the layer's weight: pass W")
        return name(cfg, slot, W)
    if not isinstance(name, str):
        return float(name)  # a constant: PSOFT's vector_b is 1 + b_shift
    return slot[name].float() if name in slot else float(getattr(cfg, name))


def peft_tensor(peft_model: nn.Module, layer: str, key: str, top: bool = False) -> Tensor:
    """PEFT's adapter tensor on `layer` (our module name) of a PEFT model: key "lora_A.weight" ->
    the layer's lora_A["default"].weight; with `top`, the tensor at the model's top (VeRA's "vera_A" ->
    base_model.vera_A["default"], TinyLoRA's "tinylora_v.0" -> base_model.tinylora_v["default"]["0"])."""
    module = peft_model.base_model if top else peft_model.get_submodule(f"base_model.model.{layer}")
    head, *rest = key.split(".")
    value = getattr(module, head)[ADAPTER]
    for part in rest:
        value = getattr(value, part)
    return value


def target_order(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """`targets` in the model's module order, which a PeftTensor key with "{index}" numbers them by."""
    wanted = set(targets)
    return [name for name, _ in model.named_modules() if name in wanted]


def peft_twin(
    model: nn.Module,
    cfg: AdapterConfig,
    targets: Sequence[str],
    calibration: Sequence | None = None,
    **options: object,
) -> nn.Module:
    """`model` wrapped by `peft.get_peft_model` with PEFT's model of the method `cfg` configures (its record's twin)
    on `targets` (module names as PEFT matches them: ["q_proj", "v_proj"]).

    What our variant keeps frozen, PEFT's model keeps frozen too (LoRA-FA's A: PEFT's LoRA-FA optimizer freezes
    lora_A the same way); a twin with an `init` (EVA) runs it on the `calibration` batches. `options` go to
    get_peft_model (e.g. autocast_adapter_dtype=False). Raises ValueError with the record's reason when PEFT has
    no such method. Needs peft.
    """
    import peft

    variant = Variant.for_config(cfg)
    record = record_of(cfg)
    if record.twin is None:
        raise ValueError(f"PEFT has no twin of {record.title}: {record.refused}")
    frozen = _frozen_slots(variant, cfg, model, targets)
    if record.twin.setup is not None:
        record.twin.setup()
    wrapped = peft.get_peft_model(model, record.twin.config(cfg, targets), **options)
    keys = tuple(f".{spec.param_key}" for name, spec in record.tensors.items() if name in frozen and not spec.shared)
    for name, p in wrapped.named_parameters():
        if keys and name.endswith(keys):
            p.requires_grad_(False)
    if record.twin.init is not None:
        record.twin.init(wrapped, list(calibration or ()))
    return wrapped


def _frozen_slots(variant: type[Variant], cfg: AdapterConfig, model: nn.Module, targets: Sequence[str]) -> set[str]:
    """Our slots that do not train, on the first of `targets` (PEFT's rule: the name or its last component)."""
    for name, module in model.named_modules():
        if is_linear_like(module) and (name in targets or name.rsplit(".", 1)[-1] in targets):
            return {s.name for s in variant.slots(cfg, ops.d_in(module), ops.d_out(module)) if not s.trainable}
    return set()


def copy_to_twin(ours: nn.Module, theirs: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """Give PEFT's twin (`peft_twin`) the values of our attached adapter along the record's `tensors`; return
    (our key, our tensor, PEFT's tensor that holds it) for each pair, layer by layer (twin_gradients maps PEFT's
    gradients into our layout where the record's layout is more than a reshape).

    A tensor PEFT shares across layers (VeRA's A, B) goes the other way, once: our shared tensor (lora_shared,
    sized by the largest target as PEFT's) takes PEFT's values; so do the slots PEFT draws itself (the record's
    `redrawn`: FourierFT's spectral entries). Raises ValueError when sizes differ.
    """
    state, record = _attached(ours)
    pairs = []
    with torch.no_grad():
        mine = {name: getattr(state.shared, f"lora_{name}") for name, s in record.tensors.items() if s.shared}
        if mine:  # ours once on the model (lora_shared), PEFT's once too
            keys = {spec.key for spec in record.tensors.values() if spec.shared}
            theirs_shared = {key: peft_tensor(theirs, "", key, top=True) for key in keys}
            want = record.shared_tensors(state.cfg, {n: torch.empty(t.shape, device="meta") for n, t in mine.items()})
            for key, p in theirs_shared.items():
                if want[key].shape != p.shape:
                    raise ValueError(
                        f"our shared tensors make PEFT's {key} {list(want[key].shape)}, not {list(p.shape)}"
                    )
            for name, value in record.our_shared(state.cfg, mine, theirs_shared).items():
                mine[name].copy_(value)
                pairs.append((f"lora_shared.lora_{name}", mine[name], theirs_shared[record.tensors[name].key]))
        for index, target in enumerate(target_order(ours, state.target_names)):
            layer, slot = _layer_slots(ours, state, target)
            for name, draw in record.redrawn.items():
                slot[name].copy_(draw(state.cfg, ops.d_in(layer), ops.d_out(layer)))
            W = ops.weight(layer).float() if record.reads_weight else None
            for key, value in record.peft_tensors(state.cfg, slot, W, index, d_in=ops.d_in(layer)).items():
                p = peft_tensor(theirs, target, key, _top(record, key, index))
                if value.numel() != p.numel():
                    raise ValueError(f"{target}: our {list(value.shape)} does not fit PEFT's {key} {list(p.shape)}")
                p.copy_(value.reshape(p.shape))
            for name, spec in record.tensors.items():
                if not spec.shared:
                    key = spec.key.format(index=index)
                    pairs.append((f"{target}.lora_{name}", slot[name], peft_tensor(theirs, target, key, spec.at_top)))
    return pairs


def twin_gradients(ours: nn.Module, theirs: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """After a backward on both (copy_to_twin first), (our key, our gradient, PEFT's gradient in our slot's
    layout) for every slot under a layer that trains on both sides (not LoRA-FA's A, which PEFT's twin freezes):
    PEFT's gradients taken back through the record's layout."""
    state, record = _attached(ours)
    out = []
    for index, target in enumerate(target_order(ours, state.target_names)):
        layer, slot = _layer_slots(ours, state, target)
        grads, trained = {}, set()
        for key in record.peft_tensors(state.cfg, _meta(slot), index=index, offsets=False, d_in=ops.d_in(layer)):
            p = peft_tensor(theirs, target, key, _top(record, key, index))
            grads[key] = p.grad if p.grad is not None else torch.zeros_like(p)
            trained |= {key} if p.requires_grad else set()
        mapped = record.our_tensors(state.cfg, slot, grads, index=index, offsets=False, d_in=ops.d_in(layer))
        for name, grad in mapped.items():
            if slot[name].requires_grad and record.tensors[name].key.format(index=index) in trained:
                out.append((f"{target}.lora_{name}", slot[name].grad, grad))
    return out


def _top(record: PeftRecord, key: str, index: int) -> bool:
    return file_key(key) in record.top_keys(index)


def _meta(slot: Tensors) -> Tensors:
    return {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in slot.items()}


def _attached(model: nn.Module) -> tuple[runtime.Attachment, PeftRecord]:
    state = runtime.attachment(model)
    if state is None:
        raise ValueError("no lora-lite adapter is attached to the model")
    return state, record_for(state.variant, state.cfg)


def _layer_slots(model: nn.Module, state: runtime.Attachment, target: str) -> tuple[nn.Module, Tensors]:
    layer = model.get_submodule(target)
    names = next(a.slots for a in state.adapted if a.target.name == target)
    return layer, {name: getattr(layer, f"lora_{name}") for name in names}


def _alpha(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _lora_options(rank: Callable[[AdapterConfig], int], alpha: Callable[[AdapterConfig], float], **extra: object):
    def options(cfg: AdapterConfig, modules: list[str]) -> dict[str, object]:
        return {
            "peft_type": "LORA",
            "r": rank(cfg),
            "lora_alpha": _alpha(alpha(cfg)),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
            "lora_bias": False,
        } | extra

    return options


def _ia3_options(feedforward: bool):
    def options(cfg: AdapterConfig, modules: list[str]) -> dict[str, object]:
        return {"peft_type": "IA3", "feedforward_modules": modules if feedforward else [], "init_ia3_weights": True}

    return options


def _pissa_tensors(cfg: AdapterConfig, slot: Tensors) -> Tensors:
    """PEFT's own PiSSA -> LoRA conversion: A' = [A; A0], B' = [B, -B0] with s B0 A0 = U S Vt, on the original
    base, with rank 2r and lora_alpha 2 alpha (the same scaling s)."""
    s = cfg.alpha / cfg.r
    root = torch.sqrt(slot["S"].float() / s)
    A0 = root[:, None] * slot["Vt"].float()
    B0 = slot["U"].float() * root[None, :]
    dtype = slot["A"].dtype
    return {
        "lora_A.weight": torch.cat([slot["A"].float(), A0]).to(dtype),
        "lora_B.weight": torch.cat([slot["B"].float(), -B0], dim=1).to(dtype),
    }


def _boft_without_extension() -> None:
    """PEFT's BOFT tries to build its CUDA extension (fbd_cuda, needs nvcc and ninja) on every layer until it
    loads, about 20 s a try, then falls back to one butterfly factor with a warning. Where it has not loaded,
    take that fallback at once (the twin's function is the same for one factor, our default)."""
    from peft.tuners.boft import layer

    if layer._FBD_CUDA is None:
        layer._FBD_CUDA = False  # "tried, not available": get_fbd_cuda returns it without building


def _eva_config() -> object:
    import peft

    return peft.EvaConfig(rho=1.0, use_label_mask=False)  # one rank for every layer, as ours


def _eva_init(wrapped: nn.Module, calibration: list) -> None:
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    initialize_lora_eva_weights(wrapped, dataloader=calibration, show_progress_bar=False)


def _peft_entries(cfg: AdapterConfig, d_in: int, d_out: int) -> Tensor:
    """torch.randperm(d_out * d_in) from a generator seeded with random_loc_seed (our `seed`), its first
    n_frequency entries as flat row-major indices: PEFT's draw on every layer of that shape"""
    generator = torch.Generator().manual_seed(int(cfg.seed))
    return torch.randperm(d_out * d_in, generator=generator)[: cfg.n_frequency]


def _waveft_entries(cfg: AdapterConfig, d_in: int, d_out: int) -> Tensor:
    """PEFT's entries (torch.randperm(d_out * d_in) from random_loc_seed, our `seed`, its first n_frequency) moved
    to our layout of the Haar coefficients, which has PEFT's detail quadrants cH and cV ([[cA, cH], [cV, cD]])
    swapped"""
    flat = _peft_entries(cfg, d_in, d_out)
    rows, cols, m, n = flat // d_in, flat % d_in, d_out // 2, d_in // 2
    upper_right, lower_left = (rows < m) & (cols >= n), (rows >= m) & (cols < n)
    rows = torch.where(upper_right, rows + m, torch.where(lower_left, rows - m, rows))
    cols = torch.where(upper_right, cols - n, torch.where(lower_left, cols + n, cols))
    return rows * d_in + cols


def _deft_r0(cfg: AdapterConfig, slot: Tensors, W: Tensor) -> Tensor:
    """DEFT's R at our init, relu(P0)^T W / s, which our dR is stored as an offset from."""
    return torch.relu(slot["P0"].float()).T @ W.float() / (cfg.alpha / cfg.r)


_R_ALPHA = {"r": "r", "lora_alpha": "alpha"}
_LORA = {"A": PeftTensor("lora_A.weight"), "B": PeftTensor("lora_B.weight")}
_DORA = _LORA | {"m_shift": PeftTensor("lora_magnitude_vector.weight", offset="m0")}  # m = m0 + m_shift


def _lora(title: str, tensors: dict[str, PeftTensor] = _LORA, **flags: object) -> PeftRecord:
    """A PEFT LoRA method with `flags` (use_dora, use_rslora): its twin, and the file export_peft writes."""
    options = _lora_options(lambda c: c.r, lambda c: c.alpha, **flags)
    return PeftRecord(title, Twin("LoraConfig", _R_ALPHA, flags), tensors, "LORA", options)


_GROUPS = (("unflatten", 0, (-1, "group_size")),)  # a d_out vector as [d_out / g, g]
_ANTIPASTO = "gains on the singular values of a residual base are not a PEFT method"

RECORDS: dict[str, PeftRecord] = {
    "lora": _lora("LoRA"),
    "eva": PeftRecord(  # EVA's forward is LoRA's on the unchanged base: exported as plain LoRA
        "EVA",
        Twin("LoraConfig", _R_ALPHA, {"init_lora_weights": "eva", "eva_config": _eva_config}, _eva_init),
        _LORA,
        "LORA",
        _lora_options(lambda c: c.r, lambda c: c.alpha),
    ),
    "dora": _lora("DoRA", _DORA, use_dora=True),
    "pissa": PeftRecord(
        "PiSSA",
        Twin("LoraConfig", _R_ALPHA, {"init_lora_weights": "pissa"}),
        _LORA,
        "LORA",
        _lora_options(lambda c: 2 * c.r, lambda c: 2 * c.alpha),
        convert=_pissa_tensors,
    ),
    "ia3": PeftRecord(
        "IA3",
        Twin("IA3Config", fixed={"feedforward_modules": []}),
        {"g": PeftTensor("ia3_l", shape=(-1, 1))},
        "IA3",
        _ia3_options(False),
    ),
    "ia3_ff": PeftRecord(
        "IA3-FF",
        Twin("IA3Config", fixed={"feedforward_modules": TARGETS}),
        {"g": PeftTensor("ia3_l", shape=(1, -1))},
        "IA3",
        _ia3_options(True),
    ),
    "hra": PeftRecord(
        "HRA",
        Twin("HRAConfig", {"r": "r"}, {"apply_GS": False}),  # apply_GS=True (Gram-Schmidt) is another function
        {"U": PeftTensor("hra_u")},
    ),
    "delora": PeftRecord(
        "DeLoRA",
        Twin("DeloraConfig", {"r": "r", "delora_lambda": "lambda0"}),
        {
            "A": PeftTensor("delora_A"),
            "B": PeftTensor("delora_B"),
            "lam_shift": PeftTensor("delora_lambda", offset="lambda0", shape=(1,)),
            "w": PeftTensor("delora_w_norm"),  # ||W||'s columns: a buffer on both sides, saved by both
        },
    ),
    # Issue 13's methods (tests/test_peft_zoo.py checks each against PEFT 0.21).
    "rs_lora": _lora("RSLoRA", use_rslora=True),
    "rsdora": _lora("RSDoRA", _DORA, use_dora=True, use_rslora=True),
    # PEFT LoRA with lora_A frozen (PEFT's LoRA-FA optimizer; peft_twin freezes it as our A is frozen)
    "lorafa": _lora("LoRA-FA"),
    "vera": PeftRecord(  # A and B once at the model's top (save_projection), as ours in lora_shared
        "VeRA",
        Twin(
            "VeraConfig",
            {"r": "r", "d_initial": "d_initial", "projection_prng_key": "seed"},
            {"save_projection": True},
        ),
        {
            "lambda_b": PeftTensor("vera_lambda_b"),
            "d_shift": PeftTensor("vera_lambda_d", offset="d_initial"),
            "A": PeftTensor("vera_A", shared=True),
            "B": PeftTensor("vera_B", shared=True),
        },
    ),
    "vblora": PeftRecord(  # the bank once at the model's top; logits_B with PEFT's first two axes swapped
        "VB-LoRA",
        Twin("VBLoRAConfig", {h: h for h in ("r", "num_vectors", "vector_length", "topk")}),
        {
            "bank": PeftTensor("vblora_vector_bank", shared=True),
            "logits_A_shift": PeftTensor("vblora_logits_A", offset="logits_A0"),
            "logits_B_shift": PeftTensor("vblora_logits_B", offset="logits_B0", layout=(("permute", (1, 0, 2)),)),
        },
    ),
    "pvera": PeftRecord(  # PEFT stacks A_mu over A_logvar in one pvera_A, and the two lambdas in pvera_lambda_d
        "PVeRA",
        Twin(
            "PveraConfig",
            {"r": "r", "d_initial": "d_initial", "projection_prng_key": "seed"},
            {"save_projection": True},
        ),
        {
            "A_mu": PeftTensor("pvera_A", shared=True, part=(0, 0), stacked_layout=(("flatten", 0, 1),)),
            "A_logvar": PeftTensor("pvera_A", shared=True, part=(0, 1), stacked_layout=(("flatten", 0, 1),)),
            "B": PeftTensor("pvera_B", shared=True),
            "mu_shift": PeftTensor("pvera_lambda_d", offset="d_initial", part=(0, 0), shape=(-1,)),
            "logvar_shift": PeftTensor("pvera_lambda_d", offset="d_initial", part=(0, 1), shape=(-1,)),
            "lambda_b": PeftTensor("pvera_lambda_b"),
        },
    ),
    "loha": PeftRecord(
        "LoHa",
        Twin("LoHaConfig", {"r": "r", "alpha": "alpha"}),
        {
            "w1a_shift": PeftTensor("hada_w1_a", offset="w1a0"),
            "w1b_shift": PeftTensor("hada_w1_b", offset="w1b0"),
            "w2a_shift": PeftTensor("hada_w2_a", offset="w2a0"),
            "w2b": PeftTensor("hada_w2_b"),
        },
    ),
    "adalora": PeftRecord(
        "AdaLoRA",
        # one fixed rank: rank allocation runs only when training calls update_and_allocate, which nothing here
        # does, so total_step (which PEFT requires) has no effect
        Twin("AdaLoraConfig", {"init_r": "r", "target_r": "r", "lora_alpha": "alpha"}, {"total_step": 10}),
        {"Q": PeftTensor("lora_A"), "lam": PeftTensor("lora_E", shape=(-1, 1)), "P": PeftTensor("lora_B")},
    ),
    "hira": PeftRecord(
        "HiRA",
        Twin("HiraConfig", {"r": "r"}),
        {"A": PeftTensor("hira_A"), "B": PeftTensor("hira_B")},
    ),
    "beft": PeftRecord(
        "BEFT",
        Twin("BeftConfig"),
        {"b_v": PeftTensor("beft_bias", shape=(1, -1))},
    ),
    "oft": PeftRecord(
        "OFT",
        Twin("OFTConfig", {"oft_block_size": "b", "num_cayley_neumann_terms": "neumann_terms"}, {"r": 0}),
        {"q": PeftTensor("oft_R.weight")},
    ),
    "oft_cayley": PeftRecord(
        "OFT-Cayley",
        Twin("OFTConfig", {"oft_block_size": "b"}, {"r": 0, "use_cayley_neumann": False}),
        {"q": PeftTensor("oft_R.weight")},
    ),
    "boft": PeftRecord(
        "BOFT",
        Twin(
            "BOFTConfig",
            {"boft_block_size": "b", "boft_n_butterfly_factor": "n_butterfly_factor"},
            setup=_boft_without_extension,
        ),
        {"R": PeftTensor("boft_R"), "s_shift": PeftTensor("boft_s", offset=1.0, shape=(-1, 1))},
    ),
    "antipasto": PeftRecord("AntiPaSTO", refused=f"PEFT has no AntiPaSTO: {_ANTIPASTO}"),
    "antipasto_ablate": PeftRecord("AntiPaSTO-ablate", refused=f"PEFT has no AntiPaSTO-ablate: {_ANTIPASTO}"),
    "antipasto_arrow": PeftRecord("AntiPaSTO-arrow", refused=f"PEFT has no AntiPaSTO-arrow: {_ANTIPASTO}"),
    "antipasto_corda": PeftRecord(
        "AntiPaSTO-CorDA",
        refused="PEFT has no AntiPaSTO-CorDA: PEFT's CorDA initialises a plain LoRA, while this variant trains "
        "gains on the singular values of a residual base",
    ),
    "psoft": PeftRecord(  # A, B: PEFT's caches rebuilt from W on load, our buffers computed at attach
        "PSOFT",
        Twin("PsoftConfig", {"r": "r", "psoft_alpha": "alpha"}),
        {
            "q": PeftTensor("psoft_R.weight"),
            "b_shift": PeftTensor("psoft_R.vector_b", offset=1.0),
            "a_shift": PeftTensor("psoft_R.vector_a", offset=1.0),
        },
    ),
    "glora": PeftRecord(  # PEFT's default gives C, D, E to layers with a bias only: a spec is one form for all
        "GLoRA",
        Twin("GloraConfig", {"r": "r"}, {"config_C": "none", "config_D_E": "none"}),
        {
            "Ad": PeftTensor("glora_A.Xd"),
            "Au": PeftTensor("glora_A.Xu"),
            "Bd": PeftTensor("glora_B.Xd"),
            "Bu": PeftTensor("glora_B.Xu"),
        },
        zeros={"glora_C.zeros": ("d_in", 1), "glora_D.zeros": ("d_out",), "glora_E.zeros": ("d_out",)},
    ),
    "deft": PeftRecord(  # P0 is ours alone: import keeps our draw and stores PEFT's P and R as offsets from it
        "DEFT",
        Twin("DeftConfig", {"r": "r", "alpha": "alpha"}),
        {"dP": PeftTensor("deft_P", offset="P0"), "dR": PeftTensor("deft_R", offset=_deft_r0)},
    ),
    "peanut": PeftRecord(
        "PEANuT",
        Twin("PeanutConfig", {"r": "r", "scaling": "scaling"}),
        {"A": PeftTensor("peanut_A.weight"), "B": PeftTensor("peanut_B.weight")},
    ),
    "road": PeftRecord(
        "RoAd",
        Twin("RoadConfig", {"group_size": "group_size"}, {"variant": "road_1"}),
        {"theta": PeftTensor("road_theta"), "alpha_shift": PeftTensor("road_alpha", offset=1.0)},
    ),
    "road_2": PeftRecord(
        "RoAd-2",
        Twin("RoadConfig", {"group_size": "group_size"}, {"variant": "road_2"}),
        {"theta": PeftTensor("road_theta"), "alpha_shift": PeftTensor("road_alpha", offset=1.0)},
    ),
    "road_4": PeftRecord(  # PEFT keeps theta1 and theta2 (alpha1, alpha2) of each group side by side in one vector
        "RoAd-4",
        Twin("RoadConfig", {"group_size": "group_size"}, {"variant": "road_4"}),
        {
            "theta1": PeftTensor("road_theta", layout=_GROUPS, part=(1, 0), shape=(-1,)),
            "theta2": PeftTensor("road_theta", layout=_GROUPS, part=(1, 1), shape=(-1,)),
            "alpha1_shift": PeftTensor("road_alpha", offset=1.0, layout=_GROUPS, part=(1, 0), shape=(-1,)),
            "alpha2_shift": PeftTensor("road_alpha", offset=1.0, layout=_GROUPS, part=(1, 1), shape=(-1,)),
        },
    ),
    "tinylora": PeftRecord(  # weight_tying 0 (PEFT's default): one v per layer, at the model's top by layer index
        "TinyLoRA",
        Twin("TinyLoraConfig", {"r": "r", "u": "u", "projection_seed": "seed"}, {"save_projection": True}),
        {
            "v": PeftTensor("tinylora_v.{index}", shape=(-1,)),
            "P": PeftTensor("tinylora_P", layout=(("unflatten", 0, ("u", "r")),)),
            "A": PeftTensor("tinylora_A"),
            "B": PeftTensor("tinylora_B"),
        },
    ),
    "c3a": PeftRecord("C3A", Twin("C3AConfig", {"block_size": "b"}), {"K": PeftTensor("c3a_kernel")}),
    "fourierft": PeftRecord(  # PEFT's file has no spectral entries: PEFT draws them from random_loc_seed on load
        "FourierFT",
        Twin("FourierFTConfig", {"n_frequency": "n_frequency", "scaling": "scaling", "random_loc_seed": "seed"}),
        {"spectrum": PeftTensor("fourierft_spectrum")},
        redrawn={"idx": _peft_entries},
    ),
    "waveft": PeftRecord(  # as FourierFT
        "WaveFT",
        Twin("WaveFTConfig", {"n_frequency": "n_frequency", "scaling": "scaling", "random_loc_seed": "seed"}),
        {"spectrum": PeftTensor("waveft_spectrum")},
        redrawn={"idx": _waveft_entries},
    ),
    "lokr": PeftRecord(  # w1 full, w2 = w2_a @ w2_b low-rank (decompose_both False): PEFT's form for r small
        "LoKr",
        Twin("LoKrConfig", {"r": "r", "alpha": "alpha", "decompose_factor": "f"}),
        {
            "w1": PeftTensor("lokr_w1"),
            "w2_a_shift": PeftTensor("lokr_w2_a", offset="w2_a0"),
            "w2_b_shift": PeftTensor("lokr_w2_b", offset="w2_b0"),
        },
    ),
    "miss": PeftRecord(
        "MiSS", Twin("MissConfig", {"r": "r"}, {"init_weights": True}), {"block": PeftTensor("miss_block")}
    ),
    "miss_mini": PeftRecord(
        "MiSS-mini",
        Twin("MissConfig", {"r": "r", "mini_r": "mini_r"}, {"init_weights": "mini"}),
        {"block": PeftTensor("miss_block")},
    ),
    "gralora": PeftRecord(  # our blocks transposed, B's r columns in (sub-rank, input block) order: specs/gralora
        "GraLoRA",
        Twin("GraloraConfig", {"r": "r", "alpha": "alpha", "gralora_k": "k"}),
        {
            "A": PeftTensor("gralora_A", layout=(("permute", (0, 2, 1)),)),
            "B": PeftTensor(
                "gralora_B", layout=(("unflatten", 2, (-1, "k")), ("permute", (0, 3, 2, 1)), ("flatten", 1, 2))
            ),
        },
    ),
    "randlora": PeftRecord(
        "RandLoRA",
        Twin(
            "RandLoraConfig",
            {"r": "r", "randlora_alpha": "alpha", "projection_prng_key": "seed"},
            {"save_projection": True},
        ),
        {
            "lam": PeftTensor("randlora_lambda"),
            "gamma_shift": PeftTensor("randlora_gamma", offset="gamma0"),  # gamma = gamma0 + gamma_shift
            "A": PeftTensor("randlora_A", shared=True, repeated=True),
            "B": PeftTensor("randlora_B", shared=True, repeated=True),
        },
    ),
    "shira": PeftRecord(
        "SHiRA",
        Twin("ShiraConfig", {"r": "r"}),
        {"weight": PeftTensor("shira_weight"), "idx": PeftTensor("shira_indices", pairs=True)},
    ),
}


def exportable_titles() -> list[str]:
    """Titles of the package's variants that export_peft writes, in RECORDS order."""
    return [record.title for record in RECORDS.values() if record.refused is None]


def record_of(cfg: AdapterConfig) -> PeftRecord:
    """The record of the variant `cfg` configures (see record_for)."""
    return record_for(Variant.for_config(cfg), cfg)


def record_for(variant: type[Variant], cfg: AdapterConfig) -> PeftRecord:
    """The variant's record: the package's by name, a user variant's by its math (see the module docstring)."""
    if variant.__module__.startswith("lora_lite.generated.") and variant.name in RECORDS:
        return RECORDS[variant.name]
    return _probe(variant, cfg)


def _probe(variant: type[Variant], cfg: AdapterConfig) -> PeftRecord:
    """Match a user variant against PEFT LoRA and rsLoRA by running its forward; refuse with what differs."""
    title = variant.title
    names = {f.name for f in cfg.hyper_fields()}
    if variant.site != "output" or variant.has_residual:
        why = "its hook is at the layer input" if variant.site != "output" else "it replaces the layer weight"
        return PeftRecord(title, refused=f"{why}, and PEFT LoRA adds B A x to an unchanged layer's output")
    if not {"r", "alpha"} <= names:
        return PeftRecord(title, refused="PEFT LoRA needs hypers named r and alpha (PEFT's r and lora_alpha)")
    r = cfg.r
    d_in, d_out = r + 5, r + 3  # distinct from each other and from r: shapes say which tensor is which
    slots = variant.slots(cfg, d_in, d_out)
    role = {(r, d_in): "A", (d_out, r): "B"}
    found = {role.get(tuple(s.shape)): s.name for s in slots if s.trainable}
    if len(slots) != 2 or set(found) != {"A", "B"}:
        shapes = ", ".join(f"{s.name} {list(s.shape)}{'' if s.trainable else ' (frozen)'}" for s in slots)
        return PeftRecord(
            title,
            refused=f"PEFT LoRA holds two trained tensors, A [r, d_in] and B [d_out, r]; on a {d_out} x {d_in} layer "
            f"with r={r} this variant holds {shapes}",
        )
    probe = dataclasses.replace(cfg, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(d_in, d_out, dtype=torch.float64)
    A = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=gen, dtype=torch.float64)
    setattr(layer, f"lora_{found['A']}", A)
    setattr(layer, f"lora_{found['B']}", B)
    x = torch.randn(4, d_in, generator=gen, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = layer(x)
            delta = variant.output(layer, probe, x, y) - y
    except Exception as exc:  # the variant's own code: any error means it is not PEFT LoRA
        return PeftRecord(title, refused=f"its forward failed on a probe layer ({type(exc).__name__}: {exc})")
    BAx = x @ A.T @ B.T
    scales = {"LoRA (alpha / r)": cfg.alpha / r, "rsLoRA (alpha / sqrt(r))": cfg.alpha / math.sqrt(r)}
    for name, s in scales.items():
        if torch.allclose(delta, s * BAx, rtol=1e-9, atol=1e-9 * BAx.abs().max().item()):
            rslora = name.startswith("rsLoRA")
            tensors = {found["A"]: PeftTensor("lora_A.weight"), found["B"]: PeftTensor("lora_B.weight")}
            return _lora(title, tensors, use_rslora=rslora)
    off = min((delta - s * BAx).abs().max().item() for s in scales.values())
    return PeftRecord(
        title,
        refused="its forward is not PEFT LoRA's y + (alpha / r) B A x nor rsLoRA's y + (alpha / sqrt(r)) B A x "
        f"(on a probe layer with random A, B it differs from the closer one by {off:.3g})",
    )
