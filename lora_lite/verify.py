"""The shared checks every variant must pass, run by `lora-lite verify` and by this project's test table.

    identity at init       attach changes no output
    gradients              every adapter tensor gets a non-zero gradient, no base tensor gets one
    training moves         a few AdamW steps change the output
    save/load exact        a fresh model loading the saved file gives the same output, bit for bit
    detach bit-exact       detach gives back the base's outputs, tensors, flags and hooks, bit for bit
    bf16 adapters move     in bfloat16, every trainable tensor changes in a few steps at a usual learning rate
    torch.compile          the attached model compiles with fullgraph=True (aot_eager), outputs and grads as eager
    merges exactly         after every adapter tensor moved off its init, lora_lite.merge gives a plain model
                           with the same outputs (within 1e-5 of their scale); a variant whose forward is not
                           affine in x is refused with the compiler's reason instead

Each check takes a `Case` (a model factory and a config factory) and returns a line of detail, or
raises `CheckFailed` saying what went wrong; `run` runs them all and catches every error. The
checks follow PEFT's tests/test_custom_models.py: one table of cases crossed with shared checks.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lora_lite import runtime
from lora_lite.variant import AdapterConfig, Variant

IDENTITY_ATOL = 1e-6


class CheckFailed(AssertionError):
    """A shared check failed; the message says how (an AssertionError, so pytest shows it as a test failure)."""


@dataclass
class Model:
    """A model, an input for it, and a loss on its output."""

    module: nn.Module
    inputs: Tensor
    vocab: int = 0  # > 0: the inputs are token ids below it

    def out(self) -> Tensor:
        result = self.module(self.inputs)
        return result.logits if hasattr(result, "logits") else result

    def calibration(self) -> list[Tensor]:
        """A few batches shaped like the inputs, for variants that calibrate."""
        g = torch.Generator().manual_seed(4)
        if self.vocab:
            return [torch.randint(0, self.vocab, self.inputs.shape, generator=g) for _ in range(3)]
        return [torch.randn(self.inputs.shape, generator=g) for _ in range(3)]

    def loss(self) -> Tensor:
        if hasattr(self.module, "config"):
            return self.module(self.inputs, labels=self.inputs).loss
        target = torch.linspace(-1, 1, self.out().shape[-1])
        return ((self.out() - target) ** 2).mean()


class TinyMLP(nn.Module):
    """Two linear layers, one with a bias (up, 12 -> 20) and one without (down, 20 -> 8), on 3-D inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 8, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(torch.tanh(self.up(x)))


def tiny_mlp() -> Model:
    """The built-in model `lora-lite verify` uses: TinyMLP, seeded, on a [2, 5, 12] input."""
    return Model(TinyMLP().eval(), torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3)))


@dataclass
class Case:
    """A variant under test: fresh models, and its config in a given adapter dtype."""

    model: Callable[[], Model]
    config: Callable[[torch.dtype], AdapterConfig]


def attach(m: Model, cfg: AdapterConfig) -> list[str]:
    """Attach, with calibration batches for the variants that need them."""
    data = m.calibration() if Variant.for_config(cfg).stats else None
    return runtime.attach(m.module, cfg, calibration_data=data)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def train_mode(module: nn.Module) -> Iterator[None]:
    """`module` in train mode, as training runs it (training-time builtins on: dropout, PVeRA's sample), then
    back in the mode it was in."""
    was_training = module.training
    module.train()
    try:
        yield
    finally:
        module.train(was_training)


def train(m: Model, steps: int, lr: float) -> None:
    """`steps` AdamW steps on m.loss(), in train mode, then m's mode as it was."""
    opt = torch.optim.AdamW(trainable(m.module).values(), lr=lr)
    with train_mode(m.module):
        for _ in range(steps):
            m.loss().backward()
            opt.step()
            opt.zero_grad()


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


def _started(case: Case, dtype: torch.dtype = torch.float32) -> tuple[Model, AdapterConfig]:
    m, cfg = case.model(), case.config(dtype)
    attach(m, cfg)
    return m, cfg


# ---------------------------------------------------------------------------- the checks


def identity_at_init(case: Case) -> str:
    """The docstring's claim (`Variant.identity_at_init`), checked either way: attach leaves the output equal
    within IDENTITY_ATOL, or, for a spec that says "Identity at init: no" (VB-LoRA), it changes it."""
    m, cfg = case.model(), case.config(torch.float32)
    with torch.no_grad():
        base = m.out()
        attach(m, cfg)
        diff = (m.out() - base).abs().max().item()
    if not Variant.for_config(cfg).identity_at_init:
        _require(
            diff > IDENTITY_ATOL,
            f"the spec says it is not the identity at init, but attach changed the output by only {diff:.3g}",
        )
        return f"not the identity, as its spec says: max |adapted - base| = {diff:.1e}"
    _require(
        diff <= IDENTITY_ATOL,
        f"attach changed the output by up to {diff:.3g} (allowed {IDENTITY_ATOL:g}): the init is not the identity",
    )
    return f"max |adapted - base| = {diff:.1e}"


def gradients_reach_only_adapter(case: Case) -> str:
    """In train mode, as training runs: a tensor only a training-time builtin reads (PVeRA's log-variance, which
    `reparametrize` drops in eval mode) gets its gradient there."""
    m, _ = _started(case)
    with torch.no_grad():  # move zero-initialised factors off zero (and into clamps' ranges): every grad is non-zero
        for param in trainable(m.module).values():
            param.add_(0.05 * torch.rand(param.shape, generator=torch.Generator().manual_seed(6)).to(param.dtype))
    with train_mode(m.module):
        m.loss().backward()
    params = dict(m.module.named_parameters())
    adapter = {n for n in params if n.rsplit(".", 1)[-1].startswith("lora_")}
    _require(bool(adapter), "attach registered no adapter parameters")
    extra = sorted(set(trainable(m.module)) - adapter)
    _require(not extra, f"base parameters left trainable: {extra}")
    dead = [n for n in sorted(adapter) if params[n].grad is None or params[n].grad.abs().max() == 0]
    _require(not dead, f"adapter tensors with no gradient (they never reach the output): {dead}")
    leaked = [n for n in sorted(params) if n not in adapter and params[n].grad is not None]
    _require(not leaked, f"base tensors that got a gradient: {leaked}")
    return f"all {len(adapter)} adapter tensors, no base tensor"


def training_changes_output(case: Case, steps: int = 3, lr: float = 1e-2) -> str:
    m, _ = _started(case)
    with torch.no_grad():
        before = m.out()
    train(m, steps, lr)
    with torch.no_grad():
        change = (m.out() - before).abs().max().item()
    _require(change > 1e-4, f"{steps} AdamW steps at lr {lr:g} moved the output by only {change:.3g}")
    return f"{steps} steps at lr {lr:g}: max change {change:.2e}"


def save_load_exact(case: Case) -> str:
    m, _ = _started(case)
    train(m, steps=3, lr=1e-2)
    with torch.no_grad():
        trained = m.out()
    fresh = case.model()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "adapter.safetensors"
        runtime.save(m.module, path)
        runtime.load(fresh.module, path)
        size = path.stat().st_size
    with torch.no_grad():
        loaded = fresh.out()
    _require(torch.equal(loaded, trained), f"reloaded output differs by {(loaded - trained).abs().max().item():.3g}")
    _require(set(trainable(fresh.module)) == set(trainable(m.module)), "the reloaded model trains other tensors")
    return f"{size} bytes, outputs equal"


def detach_bit_exact(case: Case) -> str:
    m = case.model()
    state = {k: v.clone() for k, v in m.module.state_dict().items()}
    flags = {n: p.requires_grad for n, p in m.module.named_parameters()}
    with torch.no_grad():
        base = m.out()
    attach(m, case.config(torch.float32))
    train(m, steps=2, lr=1e-2)
    runtime.detach(m.module)
    with torch.no_grad():
        _require(torch.equal(m.out(), base), "the output after detach differs from the base's")
    after = m.module.state_dict()
    _require(after.keys() == state.keys(), f"state_dict keys changed: {sorted(set(after) ^ set(state))}")
    changed = [k for k in state if not torch.equal(after[k], state[k])]
    _require(not changed, f"base tensors changed: {changed}")
    _require({n: p.requires_grad for n, p in m.module.named_parameters()} == flags, "requires_grad flags changed")
    hooked = [n for n, mod in m.module.named_modules() if mod._forward_hooks or mod._forward_pre_hooks]
    _require(not hooked, f"hooks left on {hooked}")
    return "outputs, tensors, flags and hooks as before"


def bf16_adapters_move(case: Case, lr: float = 1e-4, steps: int = 3) -> str:
    m, _ = _started(case, torch.bfloat16)
    params = trainable(m.module)
    wrong = [n for n, p in params.items() if p.dtype != torch.bfloat16]
    _require(not wrong, f"not bfloat16: {wrong}")
    before = {n: p.detach().clone() for n, p in params.items()}
    train(m, steps, lr)  # a plain AdamW
    stuck = [n for n, p in params.items() if torch.equal(p.detach(), before[n])]
    _require(
        not stuck,
        f"did not move in {steps} bf16 AdamW steps at lr {lr:g} (updates round away): {stuck}; store what is "
        "trained as an offset from a frozen value (DoRA's m = m0 + m_shift), or train in float32",
    )
    return f"all {len(params)} moved in {steps} steps at lr {lr:g}"


def compiles_fullgraph(case: Case, backend: str = "aot_eager") -> str:
    """In train mode, as training runs (training-time builtins on, torch's RNG seeded alike for both runs)."""
    m, _ = _started(case)
    with torch.no_grad():  # off the identity, so that every term of the forward counts
        for param in trainable(m.module).values():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(5)).to(param.dtype))
    with train_mode(m.module):
        return _compiles_fullgraph(m, backend)


def _compiles_fullgraph(m: Model, backend: str) -> str:
    torch.manual_seed(0)
    eager = m.out()
    eager.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in trainable(m.module).items()}
    m.module.zero_grad()
    torch._dynamo.reset()
    torch.manual_seed(0)
    try:
        compiled = torch.compile(m.module, backend=backend, fullgraph=True)(m.inputs)
    except Exception as exc:  # dynamo's graph breaks and unsupported ops come as many exception types
        raise CheckFailed(f"torch.compile(fullgraph=True) failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    finally:
        torch._dynamo.reset()
    compiled = compiled.logits if hasattr(compiled, "logits") else compiled
    compiled.square().mean().backward()
    compiled_grads = {n: p.grad.clone() for n, p in trainable(m.module).items()}
    try:
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    except AssertionError as exc:
        raise CheckFailed(f"compiled and eager differ: {_first_line(exc)}") from None
    return f"fullgraph, {backend}: outputs and grads as eager"


MERGE_RTOL = 1e-5


def merges_exactly(case: Case) -> str:
    from lora_lite import merging

    m, cfg = _started(case)
    variant = Variant.for_config(cfg)
    params = trainable(m.module)
    init = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():  # off the init: zeros (B, g) stay zeros under some gradients
        for param in params.values():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(6)).to(param.dtype))
    train(m, steps=2, lr=1e-2)
    stuck = [n for n, p in params.items() if torch.equal(p.detach(), init[n])]
    _require(not stuck, f"still at their init: {stuck}")
    if variant.merge_refusal:
        try:
            merging.merge(m.module)
        except merging.MergeError as exc:
            _require(variant.merge_refusal in str(exc), f"refused for another reason: {exc}")
            return f"refused: {variant.merge_refusal}"
        raise CheckFailed("merge_refusal is set, but merge did not refuse")
    with torch.no_grad():
        adapted = m.out()
        merging.merge(m.module)
        merged = m.out()
    diff, scale = (merged - adapted).abs().max().item(), adapted.abs().max().item()
    _require(diff <= MERGE_RTOL * scale, f"the merged model differs by {diff:.3g} (outputs up to {scale:.3g})")
    leftovers = [n for n in m.module.state_dict() if n.rsplit(".", 1)[-1].startswith("lora_")]
    _require(not leftovers and runtime.attachment(m.module) is None, f"adapter tensors left: {leftovers}")
    return f"max diff {diff:.1e} (outputs up to {scale:.2g})"


CHECKS: tuple[tuple[str, Callable[[Case], str]], ...] = (
    ("identity at init", identity_at_init),
    ("gradients reach every adapter tensor, only them", gradients_reach_only_adapter),
    ("training changes the output", training_changes_output),
    ("save/load exact", save_load_exact),
    ("detach bit-exact", detach_bit_exact),
    ("bf16 adapters move", bf16_adapters_move),
    ("torch.compile fullgraph", compiles_fullgraph),
    ("merges exactly", merges_exactly),
)


@dataclass(frozen=True)
class Outcome:
    check: str
    ok: bool
    detail: str


def run(case: Case, lr: float = 1e-4) -> list[Outcome]:
    """Every check on `case`; an exception in a check is its failure, reported with its message."""
    outcomes = []
    for name, check in CHECKS:
        try:
            detail = bf16_adapters_move(case, lr=lr) if check is bf16_adapters_move else check(case)
            outcomes.append(Outcome(name, True, detail))
        except Exception as exc:  # a check's failure, or the variant's own error: both are the user's to read
            message = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
            outcomes.append(Outcome(name, False, message))
    return outcomes


def variants_of(target: str) -> list[type[Variant]]:
    """The variants a spec file (compiled into a temporary module), an importable module (`mygen.lora`) or a
    module's file (`mygen/lora.py`, imported by its dotted name from the working directory) defines.

    Raises CompileError for a spec that does not compile, ImportError for a module that does not import,
    LookupError when it defines no variant.
    """
    import importlib
    import importlib.util
    import sys

    path = Path(target)
    if path.suffix == ".adapter":
        from lora_lite.compiler import compile_source
        from lora_lite.compiler.driver import read_source

        code = compile_source(read_source(path), str(path))
        folder = Path(tempfile.mkdtemp(prefix="lora-lite-verify-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        module_path = folder / f"{path.stem}.py"
        module_path.write_text(code, encoding="utf-8")
        name = f"lora_lite_verify_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, module_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        if path.suffix == ".py":
            if not path.is_file():
                raise ImportError(f"no such file: {target}")
            if path.is_absolute() or ".." in path.parts:
                raise ImportError(f"give {target} by its dotted module name, or as a path below this directory")
            target = ".".join(path.with_suffix("").parts)
        module = importlib.import_module(target)
    found = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, Variant) and v is not Variant and v.__module__ == module.__name__
    ]
    if not found:
        raise LookupError(f"{target} defines no lora-lite variant (no subclass of lora_lite.Variant)")
    return found


def config_factory(variant: type[Variant], hypers: dict[str, str]) -> Callable[[torch.dtype], AdapterConfig]:
    """The variant's config with every linear layer targeted and `hypers` (NAME -> text) set; ValueError if
    a name is not a hyper or a value does not parse."""
    fields = {f.name: f for f in variant.config_class.hyper_fields()}
    values: dict[str, object] = {}
    for name, text in hypers.items():
        if name not in fields:
            raise ValueError(f"{variant.title} has no hyper {name!r}; its hypers: {sorted(fields) or 'none'}")
        kind = fields[name].type if isinstance(fields[name].type, str) else fields[name].type.__name__
        try:
            values[name] = int(text) if kind.startswith("int") else float(text)
        except ValueError:
            raise ValueError(f"{name}={text!r}: not a number ({kind})") from None
    variant.config_class(target_names=None, **values)  # a bad value fails here, before any check runs
    return lambda dtype: variant.config_class(target_names=None, dtype=dtype, **values)


def table(outcomes: list[Outcome]) -> str:
    """The outcomes as an aligned text table, with a summary line."""
    width = max(len(o.check) for o in outcomes)
    lines = [f"{'check':<{width}}  result  detail"]
    for o in outcomes:
        lines.append(f"{o.check:<{width}}  {'ok' if o.ok else 'FAIL':<6}  {o.detail}")
    passed = sum(o.ok for o in outcomes)
    lines.append(f"{passed} of {len(outcomes)} checks pass")
    return "\n".join(lines)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
