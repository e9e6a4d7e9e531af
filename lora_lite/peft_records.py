"""What each variant means to Hugging Face PEFT 0.21: one record per variant, read by export, import, the parity
tests and the benchmark.

A record (`PeftRecord`) says:

- `twin`: PEFT's model of the same method (`Twin`: its config class in peft, which of its fields are our
  hypers, its fixed fields, and what PEFT runs after wrapping, such as EVA's calibration). `peft_twin` wraps a
  model with it, for the parity tests and the benchmark's paired rows. A record without a twin says why in
  `refused`: a missing twin is a stated refusal, never a silence.
- `tensors`: how our tensors on one layer are PEFT's (`PeftTensor`: PEFT's key under the layer, the slot or
  hyper our spec stores the tensor as an offset from, PEFT's shape, whether PEFT holds one copy for all layers).
  `copy_to_twin` copies values along it (the parity tests' random values, the benchmark's initial values),
  export_peft writes it, import_peft reads it back.
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


@dataclass(frozen=True)
class PeftTensor:
    """PEFT's tensor on a layer that holds one of our slots: PEFT's value is ours + offset, in PEFT's shape."""

    key: str  # under the layer, without the adapter name: "lora_A.weight" is layer.lora_A["default"].weight
    offset: str | float | None = None  # our slot, hyper or a number the spec stores the tensor as an offset from
    shape: tuple[int, ...] | None = None  # PEFT's shape of it, where it differs (IA3's ia3_l is [d_out, 1])
    shared: bool = False  # PEFT holds one tensor for all layers (VeRA's A, B); ours is its corner on each layer
    # an index set PEFT holds as [2, k] (row, column) pairs of the [d_out, d_in] matrix (SHiRA's shira_indices),
    # ours as flat row-major positions: copy_to_twin converts it; export and import do not
    pairs: bool = False

    @property
    def file_key(self) -> str:
        return _FILE_KEYS.get(self.key, self.key)

    @property
    def param_key(self) -> str:
        """The key under the layer in PEFT's model: "lora_A.weight" -> "lora_A.default.weight"."""
        head, _, rest = self.key.partition(".")
        return ".".join(p for p in (head, ADAPTER, rest) if p)


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

    def __post_init__(self) -> None:
        if self.twin is not None and self.refused is None and self.peft_type is None:  # the file is the twin's
            if any(spec.shared for spec in self.tensors.values()) or callable(self.twin.init):
                raise ValueError(
                    f"the PEFT record of {self.title}: a twin with shared tensors or an init needs its own file "
                    "format (peft_type, options) or `refused`"
                )
            object.__setattr__(self, "peft_type", self.twin.peft_type)
            object.__setattr__(self, "options", self.twin.options)
        if self.twin is None and not self.refused:
            raise ValueError(f"the PEFT record of {self.title} has no twin: say why in `refused`")
        if self.twin is not None and not self.tensors:
            raise ValueError(f"the PEFT record of {self.title} has a twin but no `tensors` mapping onto it")
        if (self.refused is None) != (self.peft_type is not None and self.options is not None):
            raise ValueError(f"the PEFT record of {self.title} needs either peft_type and options or `refused`")

    def peft_value(self, cfg: AdapterConfig, slot: Tensors, name: str) -> Tensor:
        """PEFT's value of our slot `name` from one layer's tensors, in PEFT's shape and our dtype."""
        spec, value = self.tensors[name], slot[name]
        if spec.offset is not None:  # computed in float32: a bf16 sum of two bf16 numbers rounds once more
            value = (value.float() + _offset(cfg, slot, spec.offset)).to(value.dtype)
        return value.reshape(spec.shape) if spec.shape is not None else value

    def our_value(self, cfg: AdapterConfig, slot: Tensors, name: str, value: Tensor) -> Tensor:
        """Our slot `name` from PEFT's value of it (the inverse of peft_value), in the slot's shape and dtype."""
        spec, ours = self.tensors[name], slot[name]
        if spec.offset is not None:
            value = value.float() - _offset(cfg, slot, spec.offset)
        return value.reshape(ours.shape).to(ours.dtype)

    def export_tensors(self, cfg: AdapterConfig, slot: Tensors, d_in: int, d_out: int) -> Tensors:
        """One layer's tensors as export_peft writes them, by PEFT's file key under the layer."""
        if self.convert is not None:
            return self.convert(cfg, slot)
        out = {spec.file_key: self.peft_value(cfg, slot, name) for name, spec in self.tensors.items()}
        dtype = next(iter(out.values())).dtype
        for key in self.zeros:
            out[key] = torch.zeros(self.zeros_shape(key, d_in, d_out), dtype=dtype)
        return out

    def zeros_shape(self, key: str, d_in: int, d_out: int) -> tuple[int, ...]:
        sizes = {"d_in": d_in, "d_out": d_out}
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.zeros[key])


def _offset(cfg: AdapterConfig, slot: Tensors, name: str | float) -> Tensor | float:
    if not isinstance(name, str):
        return float(name)  # a constant: PSOFT's vector_b is 1 + b_shift
    return slot[name].float() if name in slot else float(getattr(cfg, name))


def peft_shape(spec: PeftTensor, ours: tuple[int, ...]) -> tuple[int, ...]:
    """PEFT's shape of a tensor that is `ours` in our layout (a -1 in spec.shape takes the rest)."""
    if spec.shape is None:
        return tuple(ours)
    return tuple(torch.empty(ours, device="meta").reshape(spec.shape).shape)


def peft_tensor(peft_model: nn.Module, layer: str, key: str) -> Tensor:
    """PEFT's adapter tensor on `layer` (our module name) of a PEFT model: key "lora_A.weight" ->
    the layer's lora_A["default"].weight."""
    module = peft_model.get_submodule(f"base_model.model.{layer}")
    head, *rest = key.split(".")
    value = getattr(module, head)[ADAPTER]
    for part in rest:
        value = getattr(value, part)
    return value


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
    (our key, our tensor, PEFT's tensor) for each pair, layer by layer.

    A tensor PEFT shares across layers (VeRA's A, B) goes the other way, once: our shared tensor (lora_shared,
    sized by the largest target as PEFT's) takes PEFT's values. Raises ValueError when sizes differ.
    """
    state = runtime.attachment(ours)
    if state is None:
        raise ValueError("copy_to_twin: no lora-lite adapter is attached to the first model")
    record = record_for(state.variant, state.cfg)
    pairs = []
    with torch.no_grad():
        for adapted in state.adapted:
            target = adapted.target.name
            layer = ours.get_submodule(target)
            slot = {name: getattr(layer, f"lora_{name}") for name in adapted.slots}
            for name, spec in record.tensors.items():
                p = peft_tensor(theirs, target, spec.key)
                if spec.shared:  # ours once on the model (lora_shared), PEFT's once too: copied from the first layer
                    t = getattr(state.shared, f"lora_{name}")
                    if any(key.endswith(f"lora_shared.lora_{name}") for key, _, _ in pairs):
                        continue
                    if t.shape != p.shape:
                        raise ValueError(f"our shared {name} {list(t.shape)} is not PEFT's {spec.key} {list(p.shape)}")
                    t.copy_(p)
                    pairs.append((f"lora_shared.lora_{name}", t, p))
                    continue
                t, value = slot[name], record.peft_value(state.cfg, slot, name)
                if spec.pairs:  # flat row-major positions -> (row, column) pairs
                    d_in = ops.d_in(layer)
                    value = torch.stack([value // d_in, value % d_in]).to(p.dtype)
                if value.numel() != p.numel():
                    raise ValueError(
                        f"{target}: our {name} {list(t.shape)} does not fit PEFT's {spec.key} {list(p.shape)}"
                    )
                p.copy_(value.reshape(p.shape))
                pairs.append((f"{target}.lora_{name}", t, p))
    return pairs


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


_R_ALPHA = {"r": "r", "lora_alpha": "alpha"}
_LORA = {"A": PeftTensor("lora_A.weight"), "B": PeftTensor("lora_B.weight")}
_DORA = _LORA | {"m_shift": PeftTensor("lora_magnitude_vector.weight", offset="m0")}  # m = m0 + m_shift


def _lora(title: str, tensors: dict[str, PeftTensor] = _LORA, **flags: object) -> PeftRecord:
    """A PEFT LoRA method with `flags` (use_dora, use_rslora): its twin, and the file export_peft writes."""
    options = _lora_options(lambda c: c.r, lambda c: c.alpha, **flags)
    return PeftRecord(title, Twin("LoraConfig", _R_ALPHA, flags), tensors, "LORA", options)


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
    "vera": PeftRecord(
        "VeRA",
        Twin("VeraConfig", {"r": "r", "d_initial": "d_initial"}),
        {
            "lambda_b": PeftTensor("vera_lambda_b"),
            "d_shift": PeftTensor("vera_lambda_d", offset="d_initial"),
            "A": PeftTensor("vera_A", shared=True),
            "B": PeftTensor("vera_B", shared=True),
        },
        refused="PEFT's VeRA file keeps A and B once, at the model's top (base_model.vera_A, vera_B), as ours "
        "keeps them in lora_shared; export_peft and import_peft map tensors under each layer only, so far",
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
    "deft": PeftRecord(
        "DEFT",
        refused="PEFT's DEFT holds R, ours dR = R - relu(P0)^T W / s (so that the init is the identity while R "
        "trains); a record's tensor offset is a slot or a constant, not computed from W",
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
    "road_4": PeftRecord(
        "RoAd-4",
        refused="PEFT's road_4 packs the two angle and two scale vectors into one road_theta and one road_alpha, "
        "group by group, where a record maps each slot to a whole tensor (tests/test_peft_road.py checks the "
        "function through that packing)",
    ),
    "tinylora": PeftRecord(
        "TinyLoRA",
        refused="PEFT's TinyLoRA keeps v in a table keyed by layer group (_tinylora_v_key), which a record's "
        "per-layer tensor mapping cannot name (tests/test_peft_road.py checks the function)",
    ),
    "c3a": PeftRecord("C3A", Twin("C3AConfig", {"block_size": "b"}), {"K": PeftTensor("c3a_kernel")}),
    "fourierft": PeftRecord(
        "FourierFT",
        refused="PEFT's FourierFT file does not hold its spectral entries: PEFT redraws them from random_loc_seed "
        "when it loads, one set for every layer, where ours are drawn per layer and saved with the adapter",
    ),
    "waveft": PeftRecord(
        "WaveFT",
        refused="PEFT's WaveFT file does not hold its spectral entries: PEFT redraws them from its seed when it "
        "loads, where ours are drawn per layer and saved with the adapter",
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
    "gralora": PeftRecord(
        "GraLoRA",
        refused="our A and B hold PEFT's gralora_A and gralora_B with each block transposed and the sub-ranks "
        "regrouped (so that the forward is blockdiag and shuffle operators), where a record maps a slot to a tensor "
        "by a reshape (tests/test_peft_lokr.py checks the function through that relabelling)",
    ),
    "shira": PeftRecord(
        "SHiRA",
        Twin("ShiraConfig", {"r": "r"}),
        {"weight": PeftTensor("shira_weight"), "idx": PeftTensor("shira_indices", pairs=True)},
        refused="PEFT's SHiRA file holds its positions as shira_indices, [2, k] (row, column) pairs, where our idx "
        "holds one flat row-major index per entry; export and import map a slot to a file tensor by a reshape and an "
        "offset, not by that conversion (copy_to_twin converts it: tests/test_peft_shira.py checks the function)",
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
