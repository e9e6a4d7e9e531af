"""Export to and import from Hugging Face PEFT's adapter format (adapter_config.json + adapter_model.safetensors).

    export_peft(model, dir)   the attached adapter -> a PEFT adapter folder
    import_peft(model, dir)   a PEFT adapter folder of a method a variant here computes -> attached as ours

What PEFT can represent, and how:

- LoRA and EVA: PEFT LoRA (`r`, `lora_alpha`, `target_modules`), scaling alpha / r on
  both sides. EVA's forward is LoRA's on the unchanged base, so it exports exactly.
- DoRA: PEFT LoRA with `use_dora: true` and `lora_magnitude_vector` = our `m` (`m0 + m_shift`).
- PiSSA: the layer holds the residual W - U S Vt, which a PEFT LoRA file cannot carry.
  It is exported as a rank-2r LoRA on the *original* base (PEFT's own PiSSA -> LoRA
  conversion): A' = [A; A0], B' = [B, -B0] with s B0 A0 = U S Vt, lora_alpha = 2 alpha, so
  W + s B' A' = W_res + s B A exactly. Load it on the original model, not a residual one.
- IA3 / IA3-FF: PEFT IA3 (`ia3_l` as [d_out, 1] / [1, d_in]); IA3-FF lists its targets
  in `feedforward_modules`.

- rsLoRA, or any variant of yours whose forward is LoRA's: PEFT LoRA (with `use_rslora`
  for an alpha / sqrt(r) scale), found by running its forward (lora_lite/peft_records.py).
- Every other variant whose record has a PEFT twin (HRA, DeLoRA, LoHa, AdaLoRA's SVD form,
  HiRA, BEFT, OFT, VeRA, GraLoRA, TinyLoRA, ...): that method's own file, `peft_type` and the
  twin's fields in adapter_config.json, the record's tensor mapping in the weights (under each
  layer, or at the model's top: VeRA's vera_A, TinyLoRA's tinylora_v.0). import_peft picks the
  variant whose twin the file's config is, and refuses a config field it cannot compute.
  FourierFT's and WaveFT's spectral entries are not in PEFT's file (PEFT draws them when it
  loads): import takes PEFT's draw, export refuses an adapter whose entries are not it.

Everything else is refused with the reason. What each variant is in PEFT's format is its
record in lora_lite/peft_records.py. Export needs safetensors only; importing a method
other than LoRA and IA3 imports peft, for its config's defaults.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lora_lite import ops, runtime
from lora_lite.peft_records import (
    RECORDS,
    PeftRecord,
    exportable_titles,
    file_key,
    model_key,
    record_for,
    target_order,
)
from lora_lite.targets import is_linear_like

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
TOP = "base_model."  # PEFT's tensors at the model's top (VeRA's vera_A, TinyLoRA's tinylora_v.0)


class PeftInteropError(ValueError):
    """The adapter cannot be exported to, or imported from, PEFT's format; the message says why."""


# ---------------------------------------------------------------------------- export


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the attached adapter as a PEFT adapter folder; return the folder.

    `PeftModel.from_pretrained(base, directory)` on the original base model then
    computes what `model` computes (for PiSSA too: see the module docstring).
    """
    state = runtime.attachment(model)
    if state is None:
        raise PeftInteropError("cannot export: no lora-lite adapter is attached to the model")
    record = record_for(state.variant, state.cfg)
    if record.refused is not None:
        raise PeftInteropError(
            f"cannot export {state.variant.title} to PEFT's format: {record.refused}. "
            f"Exportable variants: {', '.join(exportable_titles())}, and variants of yours that compute LoRA or "
            "rsLoRA; save it with lora_lite.save instead."
        )
    targets = state.target_names
    tensors: dict[str, Tensor] = {}
    shared = {s: getattr(state.shared, f"lora_{s}").detach().to("cpu") for s in _shared_slots(record)}
    repeated = {spec.key for spec in record.tensors.values() if spec.repeated}
    shared_values = record.shared_tensors(state.cfg, shared)
    for key, value in shared_values.items():
        tensors[TOP + file_key(key)] = value
    for index, t in enumerate(target_order(model, targets)):
        for key in repeated:  # PEFT's file also repeats these under every layer
            tensors[f"{PREFIX}{t}.{file_key(key)}"] = shared_values[key].clone()  # safetensors: no shared memory
        layer = model.get_submodule(t)
        slot = {s: getattr(layer, f"lora_{s}").detach().to("cpu") for s in _slots_of(state, t)}
        _refuse_redrawn(record, state, t, slot, *dims(layer))
        W = ops.weight(layer).detach().to("cpu").float() if record.reads_weight else None
        for part, value in record.export_tensors(state.cfg, slot, *dims(layer), W, index).items():
            tensors[TOP + part if part in record.top_keys(index) else f"{PREFIX}{t}.{part}"] = value
    for key, value in runtime._module_tensors(model, state.modules).items():  # modules_to_save, as PEFT keys them
        tensors[PREFIX + key] = value.detach().to("cpu")
    modules = _target_modules(model, targets)
    config: dict[str, object] = {
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "target_modules": modules,
        "exclude_modules": None,
        "modules_to_save": list(state.modules) or None,
        "fan_in_fan_out": _fan_in_fan_out(model, targets),
        "inference_mode": True,
        "task_type": None,
        "revision": None,
    }
    config.update(record.options(state.cfg, modules))
    config = _known_fields(config)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _shared_slots(record: PeftRecord) -> list[str]:
    return [name for name, spec in record.tensors.items() if spec.shared]


def _refuse_redrawn(record: PeftRecord, state: runtime.Attachment, target: str, slot: dict, d_in: int, d_out: int):
    """Export writes an adapter only where the slots PEFT draws again when it loads are PEFT's draw."""
    for name, draw in record.redrawn.items():
        if not torch.equal(slot[name].cpu(), draw(state.cfg, d_in, d_out).to(slot[name].dtype)):
            what = " ".join((draw.__doc__ or "").split())
            raise PeftInteropError(
                f"cannot export {state.variant.title} to PEFT's format: PEFT's file does not hold {name}, which PEFT "
                f"draws again when it loads the file ({what}), and on {target!r} this adapter's {name} is not that "
                f"draw (lora-lite draws it per layer from seed and the layer's name), so PEFT would compute another "
                f"function. An adapter that lora_lite.import_peft attached (from a folder PEFT saved, at init or "
                f"trained) has PEFT's {name} and exports, also after training; save this one with lora_lite.save."
            )


def _known_fields(config: dict[str, object]) -> dict[str, object]:
    """The entries of `config` that its method's PEFT config has (fan_in_fan_out is LoRA's and IA3's, not
    OFT's), when peft is installed to say which; without peft, all of them (PEFT ignores the others)."""
    if config["peft_type"] in ("LORA", "IA3"):
        return config
    try:
        import dataclasses

        import peft
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    except ImportError:
        return config
    del peft
    fields = {f.name for f in dataclasses.fields(PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]])}
    return {key: value for key, value in config.items() if key in fields}


def _slots_of(state: runtime.Attachment, target: str) -> list[str]:
    for adapted in state.adapted:
        if adapted.target.name == target:
            return adapted.slots
    return []


def _target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Short names (`q_proj`) when they select exactly the targets among the model's linear layers
    (what vLLM expects), else the full module names."""
    short = sorted({t.rsplit(".", 1)[-1] for t in targets})
    selected = {n for n, m in model.named_modules() if is_linear_like(m) and n.rsplit(".", 1)[-1] in short}
    return short if selected == set(targets) else sorted(targets)


def _fan_in_fan_out(model: nn.Module, targets: list[str]) -> bool:
    """PEFT's flag for layers that store their weight [d_in, d_out] (transformers' Conv1D, GPT-2's c_attn).

    It changes only how PEFT merges into the base weight: lora_A / lora_B / ia3_l keep the shapes
    they have on an nn.Linear, so the tensors are written and read the same way for both.
    """
    return any(ops.is_conv1d(model.get_submodule(t)) for t in targets)


# ---------------------------------------------------------------------------- import


def import_peft(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Attach the PEFT adapter saved in `directory` as ours; return the target names. Its method is a
    variant's whose record (lora_lite/peft_records.py) has that twin: LoRA, DoRA, rsLoRA, IA3, OFT, HiRA, ...

    Reads adapter_config.json and adapter_model.safetensors, checks both against
    the model, and changes nothing if anything does not fit. PEFT's `modules_to_save`
    (whole trained modules, such as a classifier head) become the config's
    `modules_to_save`: loaded into the model, restored by `detach`.
    """
    import lora_lite as ll

    folder = Path(directory)
    _refuse_lora_lite_file(folder)
    if runtime.attachment(model) is not None:
        raise RuntimeError("the model already has an adapter attached; call lora_lite.detach(model) first")
    config = _read_config(folder)
    tensors = _read_tensors(folder)
    peft_type = config.get("peft_type")
    if peft_type not in _PARTS:
        raise PeftInteropError(
            f"{folder / CONFIG_FILE}: peft_type {peft_type!r} is not supported; import_peft reads "
            f"{', '.join(sorted(_PARTS))} adapters (the PEFT methods a variant here computes)"
        )
    if peft_type == "LORA":
        _refuse_options(folder, config)
    saved_modules, tensors = _split_modules_to_save(model, folder, config, tensors)
    by_module: dict[str, dict[str, Tensor]] = {}
    top: dict[str, Tensor] = {}  # at the model's top (base_model.vera_A): checked against the record below
    for key, value in tensors.items():
        if not key.startswith(TOP):
            raise PeftInteropError(f"{folder / WEIGHTS_FILE}: unexpected tensor {key!r} (not under {TOP!r})")
        if not key.startswith(PREFIX):
            top[key[len(TOP) :]] = value
            continue
        module, part = _split_key(key[len(PREFIX) :], peft_type)
        if module is None:
            raise PeftInteropError(f"{folder / WEIGHTS_FILE}: unexpected tensor {key!r} for a {peft_type} adapter")
        by_module.setdefault(module, {})[part] = value
    if not by_module:
        raise PeftInteropError(f"{folder / WEIGHTS_FILE}: no adapter tensors under the layers ({PREFIX}...)")
    layers = {}
    for module in by_module:
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise PeftInteropError(
                f"{folder}: the adapter targets {module!r}, which this model does not have"
            ) from None
        if not is_linear_like(layer):
            raise PeftInteropError(
                f"{folder}: {module!r} is a {type(layer).__name__}; import_peft supports nn.Linear and Conv1D"
            )
        layers[module] = layer
    names = sorted(by_module)
    regex = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)  # (SHiRA's indices are int)
    if dtype is None:
        raise PeftInteropError(f"{folder / WEIGHTS_FILE}: no floating-point adapter tensors")
    common = dict(target_names=regex, exclude_names=None, dtype=dtype, modules_to_save=tuple(saved_modules) or None)
    values: dict[str, dict[str, Tensor]] = {}
    if peft_type == "LORA":
        r, alpha = config.get("r"), config.get("lora_alpha")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, (int, float)):
            raise PeftInteropError(f"{folder / CONFIG_FILE}: r={r!r} and lora_alpha={alpha!r} are not a valid rank")
        dora, rslora = bool(config.get("use_dora")), bool(config.get("use_rslora"))
        # rsLoRA scales by alpha / sqrt(r): our RSLoRA and RSDoRA specs, with PEFT's alpha as it is
        name = {(False, False): "lora", (True, False): "dora", (False, True): "rs_lora", (True, True): "rsdora"}
        name = name[(dora, rslora)]
        make = {"lora": ll.LoRAConfig, "dora": ll.DoRAConfig, "rs_lora": ll.RSLoRAConfig, "rsdora": ll.RSDoRAConfig}
        cfg = make[name](r=r, alpha=float(alpha), **common)
    elif peft_type != "IA3":
        name = _twin_record(folder, config)
        twin = RECORDS[name].twin
        hypers = {hyper: config[field] for field, hyper in twin.hypers.items() if config[field] is not None}
        if name not in ll.Variant.registry:  # the generated modules register their variants when imported
            ll.import_variants()
        cfg = ll.Variant.registry[name].config_class(**hypers, **common)  # None: PEFT's default is our default
    else:
        ff_cfg = config.get("feedforward_modules") or []
        ff = {m for m in names if _matches(m, ff_cfg)}
        if ff and ff != set(names):
            raise PeftInteropError(
                f"{folder / CONFIG_FILE}: feedforward_modules covers {sorted(ff)} but not "
                f"{sorted(set(names) - ff)}; lora-lite attaches one variant per model (IA3 or IA3-FF), not both"
            )
        name = "ia3_ff" if ff else "ia3"
        cfg = (ll.IA3FFConfig if ff else ll.IA3Config)(**common)
    record, variant = RECORDS[name], ll.Variant.for_config(cfg)
    order = target_order(model, names)  # the layers' indices in keys at the model's top (tinylora_v.0)
    for module, parts in by_module.items():
        for spec in record.tensors.values():  # a shared tensor PEFT repeats under every layer: one, at the top
            if spec.repeated and spec.file_key in parts:
                value = parts.pop(spec.file_key)
                if not torch.equal(top.setdefault(spec.file_key, value), value):
                    raise PeftInteropError(
                        f"{folder / WEIGHTS_FILE}: {PREFIX}{module}.{spec.file_key} differs from its other copies; "
                        f"{record.title} shares one {spec.file_key} across the layers"
                    )
        layer, index = layers[module], order.index(module)
        for key in record.zeros:  # GLoRA's empty paths: zeros in PEFT's file, nothing in ours
            value = parts.pop(key, None)
            if value is not None and (value.any() or tuple(value.shape) != record.zeros_shape(key, *dims(layer))):
                raise PeftInteropError(
                    f"{folder / WEIGHTS_FILE}: {PREFIX}{module}.{key} is not zeros of shape "
                    f"{record.zeros_shape(key, *dims(layer))}: another form of {record.title} than lora-lite's"
                )
        for spec in record.tensors.values():  # this layer's tensors at the model's top
            key = spec.file_key.format(index=index)
            if spec.at_top and not spec.shared and key in top:
                parts[key] = top.pop(key)
        values[module] = _take(folder, module, parts, record, cfg, variant, layer, index)
    shared = _take_shared(folder, top, record, cfg, variant, [dims(layers[m]) for m in order])
    with torch.random.fork_rng(devices=[]):  # attach's own init draws random numbers; they are overwritten
        attached = runtime.attach(model, cfg)
    try:
        if sorted(attached) != names:
            raise PeftInteropError(f"{folder}: attach found targets {attached}, expected {names}")
        state = runtime.attachment(model)
        with torch.no_grad():
            for index, module in enumerate(order):
                layer = layers[module]
                mine = {s: getattr(layer, f"lora_{s}") for s in _slots_of(state, module)}
                for slot, draw in record.redrawn.items():  # what PEFT draws again on load (FourierFT's entries)
                    mine[slot].copy_(draw(cfg, *dims(layer)))
                W = ops.weight(layer).float() if record.reads_weight else None
                # PEFT's values less the offsets our spec stores (DoRA's m0), back through the record's layout
                for slot, value in record.our_tensors(
                    cfg, mine, values[module], W, index, d_in=ops.d_in(layer)
                ).items():
                    mine[slot].copy_(value)
            mine = {s: getattr(state.shared, f"lora_{s}") for s in _shared_slots(record)}
            for slot, value in record.our_shared(cfg, mine, shared).items():
                mine[slot].copy_(value)
            current = runtime._module_tensors(model, list(saved_modules))
            for parts in saved_modules.values():
                for key, value in parts.items():
                    current[key].copy_(value)
    except BaseException:
        runtime.detach(model)
        raise
    return attached


_PARTS = {  # the PEFT keys import_peft reads under each layer, by peft_type
    kind: tuple(
        dict.fromkeys(
            [
                *(
                    t.file_key
                    for r in RECORDS.values()
                    if r.peft_type == kind and r.convert is None
                    for t in r.tensors.values()
                    if not t.at_top or t.repeated
                ),
                *(key for r in RECORDS.values() if r.peft_type == kind and r.convert is None for key in r.zeros),
            ]
        )
    )
    for kind in sorted({r.peft_type for r in RECORDS.values() if r.peft_type is not None})
}


def dims(layer: nn.Module) -> tuple[int, int]:
    return ops.d_in(layer), ops.d_out(layer)


def _twin_record(folder: Path, config: dict) -> str:
    """The variant whose record's twin is the method `config` (an adapter_config.json) configures.

    Among the records of its peft_type, the one whose fixed fields the file has, and every other field of
    PEFT's config at PEFT's default, except what does not change the adapted function at inference (the base
    PeftConfig's fields, target and saved modules, init_* choices and dropout unless the twin fixes them). Of
    several, the one with the most fixed fields. Anything else is refused by name.
    Imports peft (for its config class's defaults).
    """
    import dataclasses

    import peft

    base = {f.name for f in dataclasses.fields(peft.PeftConfig)}
    base |= {"target_modules", "exclude_modules", "modules_to_save", "fan_in_fan_out", "layers_to_transform"}
    base |= {"layers_pattern"}
    problems, found = [], []
    for name, record in RECORDS.items():
        twin = record.twin
        if twin is None or record.refused is not None or twin.peft_type != config["peft_type"]:
            continue
        defaults = {}
        for f in dataclasses.fields(getattr(peft, twin.config_class)):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
        wanted = {**defaults, **twin.fixed}
        differs = [
            f"{field}={wanted[field]!r}, not {config[field]!r}"
            for field in sorted(config)
            if field in wanted
            and field not in base | set(twin.hypers)
            and (field in twin.fixed or not field.startswith("init_") and "dropout" not in field)
            and config[field] != wanted[field]
        ]
        differs += [f"{field} (the file has none)" for field in twin.hypers if field not in config]
        if not differs:
            found.append((len(twin.fixed), name))
        problems.append(f"{record.title} needs {', '.join(differs)}")
    if found:
        return max(found)[1]  # the most specific: OFT-Cayley's use_cayley_neumann=False over OFT's default
    raise PeftInteropError(
        f"{folder / CONFIG_FILE}: a {config['peft_type']} adapter in a form no variant here computes ("
        + "; ".join(problems)
        + "); load it with PEFT (PeftModel.from_pretrained), or train that form with a spec of your own"
    )


def _split_key(rest: str, peft_type: str) -> tuple[str | None, str]:
    parts = _PARTS[peft_type]
    for part in parts:
        if rest.endswith("." + part):
            return rest[: -len(part) - 1], part
    return None, ""


def _take(
    folder: Path,
    module: str,
    parts: dict[str, Tensor],
    record: PeftRecord,
    cfg: object,
    variant: type,
    layer: nn.Module,
    index: int,
) -> dict[str, Tensor]:
    """PEFT's tensors of one layer, by PEFT's key in its model, checked against the keys and shapes the record
    gives for this layer (its peft_tensors of our slots' shapes)."""
    d_in, d_out = dims(layer)
    meta = {s.name: torch.empty(s.shape, device="meta") for s in variant.slots(cfg, d_in, d_out)}
    W = torch.empty(d_out, d_in, device="meta") if record.reads_weight else None
    want = {file_key(k): v.shape for k, v in record.peft_tensors(cfg, meta, W, index, d_in=d_in).items()}

    def where(key: str) -> str:
        return f"{TOP}{key}" if key in record.top_keys(index) else f"{PREFIX}{module}.{key}"

    missing = [p for p in want if p not in parts]
    extra = sorted(set(parts) - set(want))
    if missing or extra:
        what = [f"missing {where(p)}" for p in missing] + [f"unexpected {where(p)}" for p in extra]
        raise PeftInteropError(f"{folder / WEIGHTS_FILE}: " + "; ".join(what))
    for part, shape in want.items():
        if parts[part].shape != shape:
            raise PeftInteropError(
                f"{folder / WEIGHTS_FILE}: {where(part)} is {tuple(parts[part].shape)}, {tuple(shape)} on this model"
            )
    return {model_key(part): value for part, value in parts.items()}


def _take_shared(
    folder: Path, top: dict[str, Tensor], record: PeftRecord, cfg: object, variant: type, sizes: list[tuple[int, int]]
) -> dict[str, Tensor]:
    """PEFT's tensors at the model's top that every layer shares (VeRA's vera_A, vera_B), by key, checked against
    our shared slots (sized by the largest target, as PEFT's); any other tensor left at the top is refused."""
    max_d_in, max_d_out = max(d for d, _ in sizes), max(d for _, d in sizes)
    meta = {s.name: torch.empty(s.shape, device="meta") for s in variant.shared_slots(cfg, max_d_in, max_d_out)}
    want = {file_key(k): v.shape for k, v in record.shared_tensors(cfg, meta).items()}
    missing = [f"missing {TOP}{k}" for k in want if k not in top]
    extra = [f"unexpected {TOP}{k}" for k in sorted(set(top) - set(want))]
    if missing or extra:
        raise PeftInteropError(f"{folder / WEIGHTS_FILE}: " + "; ".join(missing + extra))
    for key, shape in want.items():
        if top[key].shape != shape:
            raise PeftInteropError(
                f"{folder / WEIGHTS_FILE}: {TOP}{key} is {tuple(top[key].shape)}, {tuple(shape)} on this model "
                "(sized by its largest target)"
            )
    return {model_key(k): v for k, v in top.items()}


def _matches(module: str, patterns: object) -> bool:
    """PEFT's rule: a string is a full-match regex; a list entry matches the name or its last components."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module) is not None
    return any(module == p or module.endswith("." + p) for p in patterns)


_UNSUPPORTED_OPTIONS = {
    "rank_pattern": "per-layer ranks",
    "alpha_pattern": "per-layer alphas",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
}


def _refuse_options(folder: Path, config: dict) -> None:
    problems = [f"{key} ({what})" for key, what in _UNSUPPORTED_OPTIONS.items() if config.get(key)]
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("trained biases (bias / lora_bias)")
    if config.get("use_qalora") or config.get("use_bdlora"):
        problems.append("QA-LoRA / BD-LoRA")
    if problems:
        raise PeftInteropError(f"{folder / CONFIG_FILE}: lora-lite cannot represent " + ", ".join(problems))


def _refuse_lora_lite_file(path: Path) -> None:
    """import_peft reads a PEFT folder; a file lora_lite.save wrote gets pointed back to lora_lite.load."""
    if not path.is_file():
        return
    try:
        with safe_open(str(path), framework="pt") as f:
            written_by_us = (f.metadata() or {}).get("format") == runtime.FORMAT
    except Exception:  # not safetensors: the folder checks below say what import_peft expects
        written_by_us = False
    if written_by_us:
        raise PeftInteropError(
            f"{path} was written by lora_lite.save: attach it with lora_lite.load(model, {str(path)!r})"
        )
    raise PeftInteropError(f"{path} is a file: import_peft takes the PEFT adapter folder (with {CONFIG_FILE})")


def _split_modules_to_save(
    model: nn.Module, folder: Path, config: dict, tensors: dict[str, Tensor]
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """The tensors of PEFT's modules_to_save (`base_model.model.<module>.<param>`), by module, and the others.

    An entry selects the modules whose name is it or ends with `.` + it (PEFT's rule); entries PEFT adds by task
    type that match no module of this model (a BERT has `classifier`, no `score`) select nothing, as in PEFT.
    """
    entries = config.get("modules_to_save") or []
    if isinstance(entries, str):
        entries = [entries]
    names = [n for n, _ in model.named_modules() if n and any(n == e or n.endswith(f".{e}") for e in entries)]
    found: dict[str, dict[str, Tensor]] = {}
    rest = dict(tensors)
    for name in names:
        expected = {f"{name}.{k}": v for k, v in model.get_submodule(name).state_dict().items()}
        keys = [k for k in expected if PREFIX + k in tensors]
        if not keys:
            continue
        missing = sorted(set(expected) - set(keys))
        if missing:
            raise PeftInteropError(f"{folder / WEIGHTS_FILE}: modules_to_save {name!r} lacks {', '.join(missing)}")
        for key in keys:
            value = rest.pop(PREFIX + key)
            if value.shape != expected[key].shape:
                raise PeftInteropError(
                    f"{folder / WEIGHTS_FILE}: {PREFIX}{key} is {tuple(value.shape)}, "
                    f"{tuple(expected[key].shape)} on this model"
                )
            found.setdefault(name, {})[key] = value.to(expected[key].dtype)
    return found, rest


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise PeftInteropError(f"{path}: no such file (a PEFT adapter folder holds {CONFIG_FILE})") from None
    except (OSError, ValueError) as exc:
        raise PeftInteropError(f"{path}: not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise PeftInteropError(f"{path}: expected a JSON object")
    return config


def _read_tensors(folder: Path) -> dict[str, Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.exists():
        extra = " (adapter_model.bin, pickled weights, is not read)" if (folder / "adapter_model.bin").exists() else ""
        raise PeftInteropError(f"{path}: no such file{extra}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise PeftInteropError(f"{path} is not a readable safetensors file: {exc}") from None
