"""attach / detach / save / load: forward hooks, adapter tensors as `lora_<name>` on each target."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lora_lite import __version__, ops, quantized
from lora_lite._text import capped
from lora_lite.calibration import calibrate
from lora_lite.targets import Target, describe_candidates, find_targets, hidden_size, is_linear_like
from lora_lite.variant import AdapterConfig, Variant

STATE = "_lora_lite"
BASE_WEIGHT = "_lora_lite_base_weight"  # the original weight, while the layer holds a residual
SHARED = "lora_shared"  # the module on the model that holds the shared tensors; each target reads layer.lora_shared
FORMAT = "lora-lite/1"
METADATA = ("format", "lora_lite_version", "variant", "spec_hash", "config", "targets")  # what save writes


@dataclass
class _Adapted:
    target: Target
    slots: list[str]
    handle: RemovableHandle | None = None
    state_dict_handles: list[RemovableHandle] = field(default_factory=list)  # residual variants: see _ResidualSwap


class SharedTensors(nn.Module):
    """The tensors every target of one attach shares (VeRA's A and B, VB-LoRA's vector bank).

    Registered once on the model as the submodule `lora_shared`, so `model.parameters()`, optimizers, DDP and
    FSDP2 see each tensor once, and `model.state_dict()` and adapter files key it `lora_shared.lora_NAME`. Every
    target layer holds a plain reference to it (`layer.lora_shared`, not a submodule: not in the layer's
    parameters or state_dict), which its hook reads. Detach removes both.
    """


@dataclass
class Attachment:
    """What attach did to a model, so detach can undo it exactly."""

    variant: type[Variant]
    cfg: AdapterConfig
    adapted: list[_Adapted] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    held_layout: list[tuple[nn.Module, object]] = field(default_factory=list)  # bitsandbytes 4-bit repack flags
    probe: _ReachProbe | None = None  # until the first forward: which targets' forward ran
    modules: list[str] = field(default_factory=list)  # modules_to_save, resolved to module names
    originals: dict[str, Tensor] = field(default_factory=dict)  # their tensors before attach, for detach
    shared: SharedTensors | None = None  # the tensors every target shares, registered on the model as lora_shared

    @property
    def target_names(self) -> list[str]:
        return [a.target.name for a in self.adapted]


def attach(model: nn.Module, cfg: AdapterConfig, calibration_data: Iterable | None = None) -> list[str]:
    """Attach the adapter `cfg` describes to every target layer of `model`; return their names.

    Freezes the base model; the adapter tensors are the only trainable params.
    Targets, requirements, calibration and every init are done before the model
    is touched; a failure while registering undoes what was done.

    `calibration_data` (an iterable of batches: dicts of model kwargs, tuples of
    args, or tensors) feeds variants whose spec declares `stat`s: one pass, with
    temporary hooks on every target at once. Variants without stats ignore it.

    Raises TypeError for something that is not a lora-lite config instance (the class itself,
    a PEFT config), ValueError when no layer fits or a target cannot take the variant (the
    model is left as it was). Warns when r exceeds what a target can use, and, after the
    model's first forward, when a target's forward never ran (see `_ReachProbe`).
    """
    _require_config(cfg)
    variant = Variant.for_config(cfg)
    targets = _plan(model, variant, cfg)
    modules = _modules_to_save(model, cfg, targets)
    _refuse_meta(model, targets, modules, f"attach {variant.title}")
    stats: dict[str, dict[str, Tensor]] = {}
    if variant.stats:
        if calibration_data is None:
            wanted = ", ".join(f"{name} = {kind}(x)" for name, kind in variant.stats.items())
            raise ValueError(
                f"{variant.title} initialises from calibration statistics of each target's input ({wanted}): "
                "pass attach(model, cfg, calibration_data=batches), batches being model inputs "
                "(dicts of kwargs, tuples or tensors) from your training data"
            )
        held = quantized.hold_trainable_layout(model)  # calibration's eval forwards must not repack 4-bit layers
        try:
            stats = calibrate(model, targets, variant.stats, calibration_data, variant.title)
        finally:
            quantized.release_trainable_layout(held)
    values = {t.name: _initial_values(variant, cfg, t, stats.get(t.name, {})) for t in targets}
    shared = _shared_values(variant, cfg, targets)
    return _apply(model, variant, cfg, targets, values, {name: {} for name in modules}, shared)


def detach(model: nn.Module) -> None:
    """Remove the adapter: hooks, `lora_*` tensors, residual weights, frozen flags. Bit-exact base."""
    state = _state(model, "detach")
    for adapted in reversed(state.adapted):
        _undo(adapted)
    _remove_shared(model, state)
    _restore_modules(model, state.originals)
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(name, param.requires_grad))
    quantized.release_trainable_layout(state.held_layout)
    if state.probe is not None:
        state.probe.remove()
    delattr(model, STATE)


def attachment(model: nn.Module) -> Attachment | None:
    """The adapter attached to `model`, or None."""
    return getattr(model, STATE, None)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors, keyed as in `model.state_dict()`: every `lora_*` tensor, the shared ones once
    (`lora_shared.lora_NAME`), and the modules_to_save's."""
    state = _state(model, "read the adapter of")
    shared = (
        {} if state.shared is None else {f"{SHARED}.{k}": t for k, t in state.shared.state_dict(keep_vars=True).items()}
    )
    return (
        {
            f"{a.target.name}.lora_{slot}": getattr(a.target.layer, f"lora_{slot}")
            for a in state.adapted
            for slot in a.slots
        }
        | shared
        | _module_tensors(model, state.modules)
    )


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter tensors and their config to a safetensors file, atomically.

    Under FSDP2 (`fully_shard`) the adapter tensors are DTensors: save gathers their shards,
    a collective, so call it on every rank; only rank 0 writes the file.
    """
    state = _state(model, "save")
    tensors, sharded = {}, False
    for key, t in adapter_state_dict(model).items():
        if hasattr(t, "full_tensor"):  # a DTensor
            t, sharded = t.full_tensor(), True
        tensors[key] = t.detach().to("cpu").contiguous()
    if sharded and torch.distributed.get_rank() != 0:
        return
    metadata = {
        "format": FORMAT,
        "lora_lite_version": __version__,
        "variant": state.variant.name,
        "spec_hash": state.variant.spec_hash or "",
        "module": state.variant.__module__,  # named by load when the variant is not registered; never imported
        "config": json.dumps(state.cfg.to_dict(), sort_keys=True),
        "targets": json.dumps(state.target_names),
    }
    metadata.update(_base_metadata(model, state))
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private: give it the mode open() would
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half of one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(model: nn.Module, path: str | os.PathLike, *, allow_spec_change: bool = False) -> list[str]:
    """Attach the adapter saved at `path`: same variant, config, targets and tensors.

    Needs no calibration data: everything init computed is in the file. The file
    is checked against the model (metadata complete, variant known, its spec
    unchanged, targets present and linear, every key, shape and dtype as
    expected) before the model is changed; on any problem the model is left as
    it was. Only safetensors is read: nothing in the file is unpickled or run.

    `allow_spec_change=True` loads a file saved with a variant compiled from a
    different spec (another sha256 than the installed generated module's), for
    when the spec changed in ways that keep the tensors' meaning.
    """
    if attachment(model) is not None:
        raise RuntimeError("the model already has an adapter attached; call lora_lite.detach(model) first")
    from lora_lite import import_variants

    import_variants()
    metadata, tensors = _read(path)
    variant = Variant.registry.get(metadata["variant"])
    if variant is None:
        module = metadata.get("module", "")
        where = (
            f"it was saved from module {module!r}: `import {module}` (its folder's parent on sys.path) before loading"
            if module.isascii() and all(part.isidentifier() for part in module.split("."))
            else "import the module that defines it before loading"
        )
        close = difflib.get_close_matches(metadata["variant"], sorted(Variant.registry), n=3)
        known = f"closest known: {', '.join(map(repr, close))}" if close else f"{len(Variant.registry)} known"
        raise ValueError(
            f"{path}: unknown variant {metadata['variant']!r} ({known}); {where}. "
            "lora_lite.load never imports code named by a file"
        )
    saved_hash, current_hash = metadata["spec_hash"], variant.spec_hash or ""
    if saved_hash != current_hash and not allow_spec_change:
        raise ValueError(
            f"{path} was saved by {variant.title} compiled from another spec (sha256 {saved_hash[:12] or 'none'}; "
            f"the installed module {variant.__module__} has "
            f"{current_hash[:12] or 'none'}): its math may differ. Recompile the spec it was saved with, or pass "
            "lora_lite.load(..., allow_spec_change=True) to load it anyway"
        )
    try:
        cfg = variant.config_class.from_dict(json.loads(metadata["config"]))
        names = json.loads(metadata["targets"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: the adapter config in the metadata is unreadable: {exc}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{path}: the metadata's targets must be a list of distinct module names, not {names!r}")
    targets = []
    for name in names:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: the adapter targets {name!r}, which this model does not have") from None
        if not is_linear_like(layer):
            raise ValueError(
                f"{path}: the adapter targets {name!r}, which is a {type(layer).__name__}, not a linear layer"
            )
        targets.append(Target(name, layer, ops.d_in(layer), ops.d_out(layer)))
    modules = _saved_modules(model, path, metadata)
    _refuse_meta(model, targets, modules, f"load {path} into")
    _check_base(model, path, metadata, variant, targets)
    _check(model, variant, cfg, targets)
    values: dict[str, dict[str, Tensor]] = {t.name: {} for t in targets}
    expected = set()
    problems = []
    for t in targets:
        for slot in variant.slots(cfg, t.d_in, t.d_out):
            key = f"{t.name}.lora_{slot.name}"
            expected.add(key)
            if key not in tensors:
                problems.append(f"missing tensor {key}")
            elif tuple(tensors[key].shape) != tuple(slot.shape):
                problems.append(f"{key} is {tuple(tensors[key].shape)} in the file, {tuple(slot.shape)} on this model")
            elif slot.dtype is not None and tensors[key].dtype != slot.dtype:
                problems.append(f"{key} is {tensors[key].dtype} in the file, not {slot.dtype}")
            elif slot.dtype is None and not tensors[key].dtype.is_floating_point:
                problems.append(f"{key} is {tensors[key].dtype} in the file, not a floating-point tensor")
            else:
                values[t.name][slot.name] = tensors[key]
    shared: dict[str, Tensor] = {}
    for slot in variant.shared_slots(cfg, *_max_dims(targets)):
        key = f"{SHARED}.lora_{slot.name}"
        expected.add(key)
        if key not in tensors:
            problems.append(f"missing tensor {key} (shared by every target)")
        elif tuple(tensors[key].shape) != tuple(slot.shape):
            problems.append(f"{key} is {tuple(tensors[key].shape)} in the file, {tuple(slot.shape)} for these targets")
        elif not tensors[key].dtype.is_floating_point:
            problems.append(f"{key} is {tensors[key].dtype} in the file, not a floating-point tensor")
        else:
            shared[slot.name] = tensors[key]
    module_values = {name: {} for name in modules}
    for key, current in _module_tensors(model, modules).items():
        expected.add(key)
        name = next(n for n in modules if key.startswith(f"{n}."))
        if key not in tensors:
            problems.append(f"missing tensor {key} (modules_to_save)")
        elif tensors[key].shape != current.shape or tensors[key].is_floating_point() != current.is_floating_point():
            problems.append(
                f"{key} is {tuple(tensors[key].shape)} {tensors[key].dtype} in the file, "
                f"{tuple(current.shape)} {current.dtype} on this model"
            )
        else:
            module_values[name][key] = tensors[key]
    problems += [f"unexpected tensor {key}" for key in sorted(set(tensors) - expected)]
    if problems:
        raise ValueError(f"{path} does not fit this model ({variant.title}): " + _join(problems))
    return _apply(model, variant, cfg, targets, values, module_values, shared)


# ---------------------------------------------------------------------------- internals


def _state(model: nn.Module, action: str) -> Attachment:
    state = attachment(model)
    if state is None:
        raise RuntimeError(f"cannot {action} the model: no lora-lite adapter is attached (call lora_lite.attach first)")
    return state


def _require_config(cfg: object) -> None:
    """Clear errors for the config mistakes users bring from PEFT, before the variant is looked up."""
    if isinstance(cfg, type):
        name = cfg.__name__
        raise TypeError(f"pass a config instance, not the class {name}: {name}() or, e.g., {name}(r=8)")
    if type(cfg).__module__.split(".")[0] == "peft":
        raise TypeError(
            f"{type(cfg).__name__} is a PEFT config; lora-lite has its own configs, such as "
            "ll.LoRAConfig(r=8, alpha=16, target_names=['q_proj', 'v_proj']). To attach an adapter trained "
            "with PEFT, use ll.import_peft(model, adapter_folder)"
        )
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"attach takes a lora-lite config such as ll.LoRAConfig(r=8), not {type(cfg).__name__}")


def _plan(model: nn.Module, variant: type[Variant], cfg: AdapterConfig) -> list[Target]:
    if attachment(model) is not None:
        raise RuntimeError("the model already has an adapter attached; call lora_lite.detach(model) first")
    targets = find_targets(model, cfg)
    if not targets:
        raise ValueError(
            f"{variant.title}: no layer matches target_names={cfg.target_names!r}, target_roles={cfg.target_roles}, "
            f"target_layers={cfg.target_layers} (exclude_names={cfg.exclude_names!r}). "
            f"Linear layers in this model: {describe_candidates(model, exclude=cfg.exclude_names)}"
        )
    _check(model, variant, cfg, targets)
    return targets


def _check(model: nn.Module, variant: type[Variant], cfg: AdapterConfig, targets: list[Target]) -> None:
    hypers = ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in cfg.hyper_fields())
    problems = []
    for t in targets:
        where = f"{t.name} (d_in={t.d_in}, d_out={t.d_out}{', ' + hypers if hypers else ''})"
        problems += [f"{where}: {p}" for p in variant.check(cfg, t.d_in, t.d_out)]
        taken = [f"lora_{s.name}" for s in variant.slots(cfg, t.d_in, t.d_out) if hasattr(t.layer, f"lora_{s.name}")]
        if taken:
            problems.append(f"{where}: the layer already has {', '.join(taken)}; lora-lite would overwrite it")
        if quantized.is_quantized(t.layer) and not variant.quantizable:
            problems.append(
                f"{where}: {variant.title} reads the dense weight in its forward or replaces it with a residual, "
                "and this layer is quantized: dequantize the base first, or use a variant that runs on "
                f"quantized bases ({', '.join(_quantizable_titles())})"
            )
    if variant.has_residual:
        problems += _shared_weight_problems(model, variant, targets)
    if variant.shared_slots(cfg, *_max_dims(targets)):
        problems += _shared_tensor_problems(model, targets)
    repacked = quantized.repacked_problem(model)
    if repacked:
        problems.append(repacked)
    if problems:
        raise ValueError(f"cannot attach {variant.title}: " + _join(problems))
    _warn_rank(variant, cfg, targets)


def _max_dims(targets: list[Target]) -> tuple[int, int]:
    """max_d_in and max_d_out of an attach: the largest d_in and d_out over its targets."""
    return max(t.d_in for t in targets), max(t.d_out for t in targets)


def _shared_tensor_problems(model: nn.Module, targets: list[Target]) -> list[str]:
    """Shared tensors live once, on one device, as the model's `lora_shared`: refuse what would break that."""
    problems = []
    taken = [name for name, m in [("the model", model)] + [(t.name, t.layer) for t in targets] if hasattr(m, SHARED)]
    if taken:
        problems.append(f"{', '.join(taken[:3])} already has an attribute {SHARED}; lora-lite would overwrite it")
    devices = sorted({str(t.layer.weight.device) for t in targets})
    if len(devices) > 1:
        problems.append(
            f"the targets are on several devices ({', '.join(devices)}) and this variant shares tensors between "
            "them: put the model on one device, or target layers on one device (target_names, target_layers)"
        )
    return problems


def _shared_values(variant: type[Variant], cfg: AdapterConfig, targets: list[Target]) -> dict[str, Tensor]:
    """Run the variant's shared init once for the attach, without changing the model."""
    max_d_in, max_d_out = _max_dims(targets)
    slots = variant.shared_slots(cfg, max_d_in, max_d_out)
    if not slots:
        return {}
    with torch.no_grad():
        values = variant.shared_init(cfg, max_d_in, max_d_out, targets[0].layer.weight.device)
    for slot in slots:
        value = values.get(slot.name)
        if value is None or tuple(value.shape) != tuple(slot.shape):
            got = None if value is None else tuple(value.shape)
            raise RuntimeError(f"{variant.title}.shared_init gave {slot.name} as {got}; its slot is {slot.shape}")
    return values


def _remove_shared(model: nn.Module, state: Attachment) -> None:
    """Take the shared tensors off the model and the references to them off every target."""
    for adapted in state.adapted:
        adapted.target.layer.__dict__.pop(SHARED, None)
    if state.shared is not None and model._modules.get(SHARED) is state.shared:
        del model._modules[SHARED]
    state.shared = None


def _shared_weight_problems(model: nn.Module, variant: type[Variant], targets: list[Target]) -> list[str]:
    """A residual is written into the layer's weight: refuse a weight another module also holds (tied)."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    problems = []
    for t in targets:
        others = [n for n in owners.get(id(t.layer.weight), []) if n != f"{t.name}.weight"]
        if others:
            problems.append(
                f"{t.name}: {variant.title} replaces this layer's weight with a residual, and the same weight is "
                f"also {', '.join(others)} (tied weights), which would change too. Untie it first (e.g. "
                f"layer.weight = nn.Parameter(layer.weight.detach().clone()), or load the model with "
                "tie_word_embeddings=False), or use a variant that leaves the weight alone (LoRA, DoRA, ...)"
            )
    return problems


def _rank_bound(variant: type[Variant], cfg: AdapterConfig, d_in: int, d_out: int) -> int | None:
    """The largest useful r on a layer: the smallest layer dim that a slot pairs with r (LoRA's A [r, d_in] and
    B [d_out, r]: min(d_in, d_out); HRA's U [d_in, r]: d_in), found from the slots at a sentinel r."""
    sentinel = max(d_in, d_out) + 1
    try:
        probe = dataclasses.replace(cfg, r=sentinel)
        # shared tensors too (VeRA's A, B), as this layer slices them: to its own d_in and d_out
        slots = variant.slots(probe, d_in, d_out) + variant.shared_slots(probe, d_in, d_out)
    except (TypeError, ValueError):
        return None
    paired = {d for s in slots if sentinel in s.shape for d in s.shape if d in (d_in, d_out)}
    return min(paired) if paired else None


def _warn_rank(variant: type[Variant], cfg: AdapterConfig, targets: list[Target]) -> None:
    """Warn when r exceeds what a target can use (where the math still holds: specs refuse where it breaks)."""
    r = getattr(cfg, "r", None)
    if not isinstance(r, int) or isinstance(r, bool):
        return
    over = [(t.name, bound) for t in targets if (bound := _rank_bound(variant, cfg, t.d_in, t.d_out)) and r > bound]
    if over:
        shown = ", ".join(capped([f"{name}: rank {bound} at most" for name, bound in over], 5))
        warnings.warn(
            f"{variant.title}: r={r} is more than {len(over)} targets can use ({shown}): the extra "
            f"directions add parameters but nothing the layer can express; use r <= {min(b for _, b in over)}",
            UserWarning,
            stacklevel=4,
        )


def _initial_values(
    variant: type[Variant], cfg: AdapterConfig, t: Target, stats: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Run the variant's init for one target, without changing the model."""
    # A quantized weight is dequantized for the init (bitsandbytes' own functions): W is float32 either way.
    W = quantized.dense_weight(t.layer) if variant.init_reads_weight else None
    try:
        with torch.no_grad(), ops.init_layer(t.name):
            values = variant.init(cfg, t.d_in, t.d_out, W, stats, t.layer.weight.device)
    except (ValueError, RuntimeError, IndexError) as exc:  # e.g. a singular matrix, an SVD that did not converge
        raise ValueError(
            f"cannot attach {variant.title}: init failed on {t.name} (d_in={t.d_in}, d_out={t.d_out}): {exc}"
        ) from exc
    for slot in variant.slots(cfg, t.d_in, t.d_out):
        value = values.get(slot.name)
        if value is None or tuple(value.shape) != tuple(slot.shape):
            got = None if value is None else tuple(value.shape)
            raise RuntimeError(f"{variant.title}.init gave {slot.name} as {got} for {t.name}; its slot is {slot.shape}")
        if not torch.isfinite(value).all():
            raise ValueError(
                f"cannot attach {variant.title}: init gave non-finite values for {slot.name} on {t.name}; "
                "check the calibration data, or add damping"
            )
    return values


def _apply(
    model: nn.Module,
    variant: type[Variant],
    cfg: AdapterConfig,
    targets: list[Target],
    values: dict[str, dict[str, Tensor]],
    module_values: dict[str, dict[str, Tensor]],
    shared: dict[str, Tensor] | None = None,
) -> list[str]:
    """Change the model: adapter tensors and hooks on each target, the shared tensors once (`lora_shared`);
    modules_to_save trainable (and loaded)."""
    state = Attachment(variant, cfg, requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
    state.modules = list(module_values)
    try:
        for param in model.parameters():
            param.requires_grad_(False)
        for t in targets:
            adapted = _Adapted(t, [])
            state.adapted.append(adapted)
            _attach_layer(adapted, variant, cfg, values[t.name])
        if shared:
            _attach_shared(model, state, targets, shared)
        state.originals = _hold_modules(model, module_values)
    except BaseException:
        for adapted in reversed(state.adapted):
            _undo(adapted)
        _remove_shared(model, state)
        _restore_modules(model, state.originals)
        for name, param in model.named_parameters():
            param.requires_grad_(state.requires_grad.get(name, param.requires_grad))
        raise
    state.held_layout = quantized.hold_trainable_layout(model)
    state.probe = _ReachProbe(model, targets)
    setattr(model, STATE, state)
    return state.target_names


def _attach_shared(model: nn.Module, state: Attachment, targets: list[Target], values: dict[str, Tensor]) -> None:
    """Register the shared tensors once, as the model's `lora_shared`, and point every target at them."""
    holder = SharedTensors()
    device = targets[0].layer.weight.device
    for slot in state.variant.shared_slots(state.cfg, *_max_dims(targets)):
        tensor = values[slot.name].detach().to(device=device, dtype=state.cfg.dtype, copy=True)
        if slot.trainable:
            holder.register_parameter(f"lora_{slot.name}", nn.Parameter(tensor))
        else:
            holder.register_buffer(f"lora_{slot.name}", tensor)
    state.shared = holder
    model.add_module(SHARED, holder)
    for t in targets:
        t.layer.__dict__[SHARED] = holder  # a reference, not a submodule: the model holds the tensors once


def _attach_layer(adapted: _Adapted, variant: type[Variant], cfg: AdapterConfig, values: dict[str, Tensor]) -> None:
    t = adapted.target
    layer = t.layer
    device = layer.weight.device
    for slot in variant.slots(cfg, t.d_in, t.d_out):
        tensor = values[slot.name].detach().to(device=device, dtype=slot.dtype or cfg.dtype, copy=True)
        if slot.trainable:
            layer.register_parameter(f"lora_{slot.name}", nn.Parameter(tensor))
        else:
            layer.register_buffer(f"lora_{slot.name}", tensor)
        adapted.slots.append(slot.name)
    if variant.has_residual:
        base = layer.weight.data
        residual = _residual_of(variant, cfg, layer, base)
        # Kept as a non-persistent buffer, so model.to(...) moves and casts it with the layer.
        layer.register_buffer(BASE_WEIGHT, base, persistent=False)
        layer.weight.data = residual.to(base.dtype).contiguous()
        swap = _ResidualSwap(variant, cfg)
        adapted.state_dict_handles = [
            layer.register_state_dict_post_hook(swap),
            layer.register_load_state_dict_pre_hook(swap.load),
        ]
    if variant.site == "output":
        adapted.handle = layer.register_forward_hook(_OutputHook(variant, cfg))
    else:
        adapted.handle = layer.register_forward_pre_hook(_InputHook(variant, cfg))


class _OutputHook:
    """The forward hook of an output-site variant: y -> variant.output(layer, cfg, x, y).

    A module-level class, not a closure, so an attached model can be pickled (`torch.save(model)`, `copy.deepcopy`).
    """

    def __init__(self, variant: type[Variant], cfg: AdapterConfig) -> None:
        self.variant, self.cfg = variant, cfg

    def __call__(self, layer: nn.Module, args: tuple, y: Tensor) -> Tensor:
        x = _input(args)
        dtype = torch.promote_types(self.cfg.dtype, x.dtype)
        return self.variant.output(layer, self.cfg, x.to(dtype), y.to(dtype)).to(y.dtype)


class _InputHook:
    """The forward pre-hook of an input-site variant: x -> variant.input(layer, cfg, x). Picklable, as `_OutputHook`."""

    def __init__(self, variant: type[Variant], cfg: AdapterConfig) -> None:
        self.variant, self.cfg = variant, cfg

    def __call__(self, layer: nn.Module, args: tuple) -> tuple:
        x = _input(args)
        dtype = torch.promote_types(self.cfg.dtype, x.dtype)
        return (self.variant.input(layer, self.cfg, x.to(dtype)).to(x.dtype), *args[1:])


class _ReachProbe:
    """Until the model's first forward ends, records which targets' forward ran; then warns about the others.

    A layer whose weight its parent reads directly (`F.linear(x, self.proj.weight)`) is never called,
    so a hook there does nothing and its adapter gets no gradient. Such targets cannot be known before
    a forward; the first one tells. The probe's hooks remove themselves after it.
    """

    def __init__(self, model: nn.Module, targets: list[Target]) -> None:
        self.pending = {t.name for t in targets}
        self.handles = [t.layer.register_forward_pre_hook(_Reached(self, t.name)) for t in targets]
        self.handles.append(model.register_forward_hook(self))

    def __call__(self, model: nn.Module, args: tuple, output: object) -> None:
        self.remove()
        if self.pending:
            names = sorted(self.pending)
            shown = ", ".join(capped(names, 5))
            warnings.warn(
                f"lora-lite: the model's first forward never called {len(names)} adapted layers ({shown}): their "
                "parent reads the weight directly (e.g. F.linear(x, self.proj.weight)) or skipped them, so the "
                "adapter there does nothing and gets no gradient. Exclude them (exclude_names) unless other "
                "inputs reach them (experts a router did not pick)",
                RuntimeWarning,
                stacklevel=2,
            )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class _Reached:
    def __init__(self, probe: _ReachProbe, name: str) -> None:
        self.probe, self.name = probe, name

    def __call__(self, layer: nn.Module, args: tuple) -> None:
        self.probe.pending.discard(self.name)


def _input(args: tuple) -> Tensor:
    if not args:
        raise TypeError("a lora-lite target layer reads its input as the first positional argument: call layer(x)")
    return args[0]


def _undo(adapted: _Adapted) -> None:
    layer = adapted.target.layer
    if adapted.handle is not None:
        adapted.handle.remove()
    for handle in adapted.state_dict_handles:
        handle.remove()
    base = layer._buffers.pop(BASE_WEIGHT, None)
    if base is not None:
        layer.weight.data = base
    for slot in adapted.slots:
        name = f"lora_{slot}"
        layer._parameters.pop(name, None)
        layer._buffers.pop(name, None)


class _ResidualSwap:
    """State-dict hooks of a layer that holds a residual (PiSSA, the AntiPaSTO family) while attached.

    `model.state_dict()` (so `save_pretrained`, `Trainer.save_model`, `torch.save(model.state_dict())`) gives the
    layer's ORIGINAL weight, not the residual W - E it computes with: a checkpoint written while the adapter is
    attached holds the base model. `load_state_dict` takes such a checkpoint back: the weight it brings is the
    original, so it is stored as the base and the layer gets the residual rebuilt from it (after the layer's
    adapter tensors from the same state dict, which the residual reads).
    """

    def __init__(self, variant: type[Variant], cfg: AdapterConfig) -> None:
        self.variant, self.cfg = variant, cfg

    def __call__(self, layer: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        base = layer._buffers.get(BASE_WEIGHT)
        weight = state_dict.get(prefix + "weight")
        if base is not None and weight is not None:
            state_dict[prefix + "weight"] = _like(base, weight)

    def load(self, layer: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
        base = layer._buffers.get(BASE_WEIGHT)
        weight = state_dict.get(prefix + "weight")
        if base is None or weight is None or tuple(weight.shape) != tuple(base.shape):
            return  # nothing to swap, or a mismatch that load_state_dict itself reports
        with torch.no_grad():
            for name, tensor in [*layer._parameters.items(), *layer._buffers.items()]:
                if name.startswith("lora_") and prefix + name in state_dict:
                    _copy_into(tensor, state_dict[prefix + name])
            base.copy_(weight.full_tensor() if hasattr(weight, "full_tensor") else weight)
            residual = _residual_of(self.variant, self.cfg, layer, base).to(base.dtype)
            state_dict[prefix + "weight"] = _like(residual, weight)


def _residual_of(variant: type[Variant], cfg: AdapterConfig, layer: nn.Module, stored: Tensor) -> Tensor:
    """The residual weight of `layer` computed from its original weight `stored`, both in the layer's own storage
    layout ([d_out, d_in]; Conv1D's [d_in, d_out]), in float32. The variant sees [d_out, d_in]."""
    transposed = ops.is_conv1d(layer)
    with torch.no_grad():
        residual = variant.residual(layer, cfg, (stored.T if transposed else stored).detach().float())
    return residual.T if transposed else residual


def _like(full: Tensor, template: Tensor) -> Tensor:
    """`full` as `template` holds it: sharded the same way when `template` is a DTensor (FSDP2), from every
    rank's own full copy (no communication), else as it is."""
    if not hasattr(template, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, template.device_mesh, template.placements, src_data_rank=None)


def _copy_into(tensor: Tensor, value: Tensor) -> None:
    if hasattr(tensor, "device_mesh") and not hasattr(value, "device_mesh"):
        value = _like(value, tensor)
    elif hasattr(value, "full_tensor") and not hasattr(tensor, "device_mesh"):
        value = value.full_tensor()
    tensor.copy_(value)


def _modules_to_save(model: nn.Module, cfg: AdapterConfig, targets: list[Target]) -> list[str]:
    """The modules `cfg.modules_to_save` names (PEFT's rule: a module whose name is, or ends with, `.` + an entry)."""
    wanted = getattr(cfg, "modules_to_save", None) or ()
    names = [n for n, _ in model.named_modules() if n]
    found, problems = [], []
    for entry in wanted:
        matches = [n for n in names if n == entry or n.endswith(f".{entry}")]
        if not matches:
            problems.append(f"no module is named {entry!r} (or ends with .{entry})")
        found += [n for n in matches if n not in found]
    nested = [(a, b) for a in found for b in found if a != b and b.startswith(f"{a}.")]
    problems += [f"{b} is inside {a}: name one of them" for a, b in nested]
    for name in found:
        clash = [
            t.name for t in targets if t.name == name or t.name.startswith(f"{name}.") or name.startswith(f"{t.name}.")
        ]
        if clash:
            problems.append(f"{name} would be trained whole and also holds the target {clash[0]}: exclude one")
    if problems:
        top = ", ".join(n for n in names if "." not in n)
        raise ValueError(f"modules_to_save={tuple(wanted)!r}: " + _join(problems) + f"\nTop-level modules: {top}")
    return found


def _saved_modules(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str]) -> list[str]:
    """The modules_to_save a file holds (none in files written before modules_to_save), checked against `model`."""
    try:
        names = json.loads(metadata.get("modules_to_save", "[]"))
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: the metadata's modules_to_save must be a list of module names, not {names!r}")
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: the adapter saves the module {name!r}, which this model does not have") from None
    return names


def _module_tensors(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """The parameters and persistent buffers of the modules_to_save, keyed as in `model.state_dict()`."""
    return {
        f"{name}.{key}": tensor
        for name in names
        for key, tensor in model.get_submodule(name).state_dict(keep_vars=True).items()
    }


def _hold_modules(model: nn.Module, module_values: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """Keep a copy of the modules_to_save's tensors for detach, load the given values, make their params trainable."""
    current = _module_tensors(model, list(module_values))
    originals = {key: tensor.detach().clone() for key, tensor in current.items()}
    with torch.no_grad():
        for values in module_values.values():
            for key, value in values.items():
                current[key].copy_(value)
    for name in module_values:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    return originals


def _restore_modules(model: nn.Module, originals: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for key, value in originals.items():
            module, _, attr = key.rpartition(".")
            getattr(model.get_submodule(module), attr).copy_(value)


def _refuse_meta(model: nn.Module, targets: list[Target], modules: list[str], action: str) -> None:
    """Refuse, before any change, a model whose targets (or modules_to_save) have no data: the meta device."""
    held = [(t.name, t.layer) for t in targets] + [(n, model.get_submodule(n)) for n in modules]
    empty = [name for name, module in held if any(p.is_meta for p in module.parameters())]
    if empty:
        shown = ", ".join(empty[:3]) + (f", ... ({len(empty)} in all)" if len(empty) > 3 else "")
        raise ValueError(
            f"cannot {action} the model: {shown} are on the meta device (no data, e.g. built under "
            "init_empty_weights or offloaded by a device_map): materialize the model first (load its weights, "
            "e.g. from_pretrained with the weights on cpu or cuda), then attach or load"
        )


def _probe(weight: Tensor) -> list[float]:
    """Four fixed random bilinear forms q_j^T W p_j of a weight: a fingerprint that survives dtype casts."""
    W = weight.detach().float().reshape(weight.shape[0], -1)
    g = torch.Generator().manual_seed(0)
    p = torch.randn(W.shape[1], 4, generator=g).to(W.device)
    q = torch.randn(W.shape[0], 4, generator=g).to(W.device)
    return ((W @ p) * q).sum(0).tolist()


def _base_record(model: nn.Module) -> dict[str, object]:
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": hidden_size(model),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
    }


def _base_metadata(model: nn.Module, state: Attachment) -> dict[str, str]:
    """What save records of the base: the model (class, model_type, hidden size, name_or_path), the
    modules_to_save, and for a residual variant a fingerprint of each target's original and residual weight."""
    out = {"base_model": json.dumps(_base_record(model)), "modules_to_save": json.dumps(state.modules)}
    if state.variant.has_residual:
        prints = {}
        for a in state.adapted:
            # The residual is rebuilt from the stored original (buffers only): the layer's weight may be a
            # sharded DTensor (FSDP2), which only a collective could read.
            base = a.target.layer._buffers[BASE_WEIGHT]
            residual = _residual_of(state.variant, state.cfg, a.target.layer, base)
            prints[a.target.name] = {"base": _probe(base), "residual": _probe(residual)}
        out["base_fingerprint"] = json.dumps(prints)
    return out


def _check_base(
    model: nn.Module, path: str | os.PathLike, metadata: dict[str, str], variant: type[Variant], targets: list[Target]
) -> None:
    """Warn when the file was saved on another kind of model; refuse a base that already holds the residual."""
    try:
        saved = json.loads(metadata.get("base_model", "{}"))
        fingerprints = json.loads(metadata.get("base_fingerprint", "{}"))
    except ValueError:
        raise ValueError(f"{path}: the metadata's base_model or base_fingerprint is not JSON") from None
    here = _base_record(model)
    keys = ("model_type", "hidden_size") if saved.get("model_type") or here["model_type"] else ("class",)
    differ = [k for k in keys if saved.get(k) is not None and here[k] is not None and saved.get(k) != here[k]]
    if differ:
        warnings.warn(
            f"{path} was saved on a {saved.get('class')} ({', '.join(f'{k}={saved.get(k)!r}' for k in differ)}, "
            f"name_or_path={saved.get('name_or_path')!r}); this model is a {here['class']} "
            f"({', '.join(f'{k}={here[k]!r}' for k in differ)}): its outputs will not be those trained",
            stacklevel=3,
        )
    if not variant.has_residual:
        return
    held = []
    for t in targets:
        saved_probe = fingerprints.get(t.name)
        if not saved_probe:
            continue
        now, base, residual = (
            torch.tensor(v, dtype=torch.float64)
            for v in (_probe(t.layer.weight), saved_probe["base"], saved_probe["residual"])
        )
        if (now - residual).norm() < (now - base).norm():
            held.append(t.name)
    if held:
        raise ValueError(
            f"cannot load {path}: the weights of {', '.join(held[:3])}{' ...' if len(held) > 3 else ''} are already "
            f"the residual W - E of {variant.title}, not the original base (a checkpoint of the model written while "
            "the adapter was attached, by a lora-lite without residual-safe state dicts?). Loading would apply the "
            "residual twice: load the original base model, then lora_lite.load"
        )


def _read(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        if Path(path).is_dir():
            raise ValueError(_folder_problem(Path(path))) from None
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    if metadata.get("format") != FORMAT:
        if any(key.startswith("base_model.model.") for key in tensors):
            raise ValueError(
                f"{path} is a PEFT adapter (adapter_model.safetensors), not a lora-lite file: attach it with "
                "lora_lite.import_peft(model, its_folder)"
            )
        raise ValueError(f"{path} was not written by lora_lite.save (metadata format {metadata.get('format')!r})")
    missing = [key for key in METADATA if key not in metadata]
    if missing:
        raise ValueError(f"{path}: the metadata lacks {', '.join(missing)} (a file written by lora_lite.save has them)")
    return metadata, tensors


def _folder_problem(folder: Path) -> str:
    if (folder / "adapter_config.json").exists():
        return f"{folder} is a PEFT adapter folder: attach it with lora_lite.import_peft(model, {str(folder)!r})"
    return f"{folder} is not a readable safetensors file: it is a folder (lora_lite.load reads the file save wrote)"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _quantizable_titles() -> list[str]:
    from lora_lite import import_variants

    import_variants()
    return sorted(v.title for v in Variant.registry.values() if v.quantizable and v.spec_hash)


def _join(problems: list[str], limit: int = 10) -> str:
    shown = capped(problems, limit)
    return "\n  " + "\n  ".join(shown)
