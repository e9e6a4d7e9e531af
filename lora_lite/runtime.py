"""attach / detach / save / load: forward hooks, adapter tensors as `lora_<name>` on each target."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lora_lite import __version__, quantized
from lora_lite._text import capped
from lora_lite.calibration import calibrate
from lora_lite.targets import Target, describe_candidates, find_targets
from lora_lite.variant import AdapterConfig, Variant

STATE = "_lora_lite"
BASE_WEIGHT = "_lora_lite_base_weight"  # the original weight, while the layer holds a residual
FORMAT = "lora-lite/1"
METADATA = ("format", "lora_lite_version", "variant", "spec_hash", "config", "targets")  # what save writes


@dataclass
class _Adapted:
    target: Target
    slots: list[str]
    handle: RemovableHandle | None = None


@dataclass
class Attachment:
    """What attach did to a model, so detach can undo it exactly."""

    variant: type[Variant]
    cfg: AdapterConfig
    adapted: list[_Adapted] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    held_layout: list[tuple[nn.Module, object]] = field(default_factory=list)  # bitsandbytes 4-bit repack flags

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
    """
    variant = Variant.for_config(cfg)
    targets = _plan(model, variant, cfg)
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
    return _apply(model, variant, cfg, targets, values)


def detach(model: nn.Module) -> None:
    """Remove the adapter: hooks, `lora_*` tensors, residual weights, frozen flags. Bit-exact base."""
    state = _state(model, "detach")
    for adapted in reversed(state.adapted):
        _undo(adapted)
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(name, param.requires_grad))
    quantized.release_trainable_layout(state.held_layout)
    delattr(model, STATE)


def attachment(model: nn.Module) -> Attachment | None:
    """The adapter attached to `model`, or None."""
    return getattr(model, STATE, None)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors, keyed as in `model.state_dict()`."""
    state = _state(model, "read the adapter of")
    return {
        f"{a.target.name}.lora_{slot}": getattr(a.target.layer, f"lora_{slot}")
        for a in state.adapted
        for slot in a.slots
    }


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
        "config": json.dumps(state.cfg.to_dict(), sort_keys=True),
        "targets": json.dumps(state.target_names),
    }
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
        raise ValueError(
            f"{path}: unknown variant {metadata['variant']!r}; known: {sorted(Variant.registry)}. "
            "Import the module that defines it before loading."
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
        if not all(hasattr(layer, a) for a in ("in_features", "out_features", "weight")):
            raise ValueError(
                f"{path}: the adapter targets {name!r}, which is a {type(layer).__name__}, not a linear layer"
            )
        targets.append(Target(name, layer, layer.in_features, layer.out_features))
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
            elif not tensors[key].dtype.is_floating_point:
                problems.append(f"{key} is {tensors[key].dtype} in the file, not a floating-point tensor")
            else:
                values[t.name][slot.name] = tensors[key]
    problems += [f"unexpected tensor {key}" for key in sorted(set(tensors) - expected)]
    if problems:
        raise ValueError(f"{path} does not fit this model ({variant.title}): " + _join(problems))
    return _apply(model, variant, cfg, targets, values)


# ---------------------------------------------------------------------------- internals


def _state(model: nn.Module, action: str) -> Attachment:
    state = attachment(model)
    if state is None:
        raise RuntimeError(f"cannot {action} the model: no lora-lite adapter is attached (call lora_lite.attach first)")
    return state


def _plan(model: nn.Module, variant: type[Variant], cfg: AdapterConfig) -> list[Target]:
    if attachment(model) is not None:
        raise RuntimeError("the model already has an adapter attached; call lora_lite.detach(model) first")
    targets = find_targets(model, cfg)
    if not targets:
        raise ValueError(
            f"{variant.title}: no layer matches target_names={cfg.target_names!r}, target_roles={cfg.target_roles}, "
            f"target_layers={cfg.target_layers} (exclude_names={cfg.exclude_names!r}). "
            f"Linear layers in this model: {describe_candidates(model)}"
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
    repacked = quantized.repacked_problem(model)
    if repacked:
        problems.append(repacked)
    if problems:
        raise ValueError(f"cannot attach {variant.title}: " + _join(problems))


def _initial_values(
    variant: type[Variant], cfg: AdapterConfig, t: Target, stats: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Run the variant's init for one target, without changing the model."""
    # A quantized weight is dequantized for the init (bitsandbytes' own functions): W is float32 either way.
    W = quantized.dense_weight(t.layer) if variant.init_reads_weight else None
    try:
        with torch.no_grad():
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
) -> list[str]:
    state = Attachment(variant, cfg, requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
    try:
        for param in model.parameters():
            param.requires_grad_(False)
        for t in targets:
            adapted = _Adapted(t, [])
            state.adapted.append(adapted)
            _attach_layer(adapted, variant, cfg, values[t.name])
    except BaseException:
        for adapted in reversed(state.adapted):
            _undo(adapted)
        for name, param in model.named_parameters():
            param.requires_grad_(state.requires_grad.get(name, param.requires_grad))
        raise
    state.held_layout = quantized.hold_trainable_layout(model)
    setattr(model, STATE, state)
    return state.target_names


def _attach_layer(adapted: _Adapted, variant: type[Variant], cfg: AdapterConfig, values: dict[str, Tensor]) -> None:
    t = adapted.target
    layer = t.layer
    device = layer.weight.device
    for slot in variant.slots(cfg, t.d_in, t.d_out):
        tensor = values[slot.name].detach().to(device=device, dtype=cfg.dtype, copy=True)
        if slot.trainable:
            layer.register_parameter(f"lora_{slot.name}", nn.Parameter(tensor))
        else:
            layer.register_buffer(f"lora_{slot.name}", tensor)
        adapted.slots.append(slot.name)
    if variant.has_residual:
        base = layer.weight.data
        with torch.no_grad():
            residual = variant.residual(layer, cfg, base.float())
        # Kept as a non-persistent buffer, so model.to(...) moves and casts it with the layer.
        layer.register_buffer(BASE_WEIGHT, base, persistent=False)
        layer.weight.data = residual.to(base.dtype)
    if variant.site == "output":
        adapted.handle = layer.register_forward_hook(_output_hook(variant, cfg))
    else:
        adapted.handle = layer.register_forward_pre_hook(_input_hook(variant, cfg))


def _output_hook(variant: type[Variant], cfg: AdapterConfig):
    def hook(layer: nn.Module, args: tuple, y: Tensor) -> Tensor:
        x = _input(args)
        dtype = torch.promote_types(cfg.dtype, x.dtype)
        return variant.output(layer, cfg, x.to(dtype), y.to(dtype)).to(y.dtype)

    return hook


def _input_hook(variant: type[Variant], cfg: AdapterConfig):
    def hook(layer: nn.Module, args: tuple) -> tuple:
        x = _input(args)
        dtype = torch.promote_types(cfg.dtype, x.dtype)
        return (variant.input(layer, cfg, x.to(dtype)).to(x.dtype), *args[1:])

    return hook


def _input(args: tuple) -> Tensor:
    if not args:
        raise TypeError("a lora-lite target layer reads its input as the first positional argument: call layer(x)")
    return args[0]


def _undo(adapted: _Adapted) -> None:
    layer = adapted.target.layer
    if adapted.handle is not None:
        adapted.handle.remove()
    base = layer._buffers.pop(BASE_WEIGHT, None)
    if base is not None:
        layer.weight.data = base
    for slot in adapted.slots:
        name = f"lora_{slot}"
        layer._parameters.pop(name, None)
        layer._buffers.pop(name, None)


def _read(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} was not written by lora_lite.save (metadata format {metadata.get('format')!r})")
    missing = [key for key in METADATA if key not in metadata]
    if missing:
        raise ValueError(f"{path}: the metadata lacks {', '.join(missing)} (a file written by lora_lite.save has them)")
    return metadata, tensors


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
