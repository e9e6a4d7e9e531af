"""Tensors shared by every target of an attach (`shared param` / `shared frozen`): VeRA and VB-LoRA equal to
PEFT 0.21.

VeRA's A [r, max_d_in] and B [max_d_out, r] are one pair for all targets, as PEFT's vera_A and vera_B: the
parity test copies PEFT's whole shared buffers into ours (same shapes: the same largest layer) and compares
outputs and gradients as tests/test_peft_zoo.py does (tiny MLP `up` 12 -> 20 with bias, `down` 20 -> 8
without; tiny Qwen3 q_proj 64 -> 128 and v_proj 64 -> 64 with bias; 3-D inputs; fp32 within 1e-5 of the
scale, bf16 on the MLP within 2e-2).

VB-LoRA (specs/vblora.adapter: not the identity at init, as PEFT's is not, and its docstring says so, which
the shared checks then verify) shares one trainable vector bank; its logits are PEFT's, logits_B with its first
two axes swapped.

The runtime side is checked on VeRA (shared frozen buffers) and on a test spec with a shared *trainable*
tensor (LoRA whose A is one [r, max_d_in] param for every layer): stored once as `lora_shared.lora_NAME`, one key
in the adapter file, loaded once, removed by detach bit for bit, counted once, and trained with DDP and FSDP2
(gloo, 2 processes) to the single-process result.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
from conftest import VOCAB, assert_parity, peft_tensor, run_both, tiny_mlp, tiny_qwen
from safetensors import safe_open
from safetensors.torch import save_file
from test_distributed import WORLD, full, global_batch, run_workers, train
from torch import nn

import lora_lite as ll
from lora_lite import ops
from lora_lite.compiler import compile_source
from lora_lite.variant import Variant

peft = pytest.importorskip("peft")
from peft import VBLoRAConfig, VeraConfig, get_peft_model  # noqa: E402

TOL = 1e-5
BF16_TOL = 2e-2  # as tests/test_peft_zoo.py: a few bf16 ulps (spacing 2^-7), the two sides round in other orders

MODELS = {  # model -> (build, its targets, an input)
    "mlp": (tiny_mlp, ["up", "down"], lambda: torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(5))),
    "qwen": (
        tiny_qwen,
        ["q_proj", "v_proj"],
        lambda: torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6)),
    ),
}
RUNS = [("mlp", torch.float32, 4), ("qwen", torch.float32, 4), ("qwen", torch.float32, 8), ("mlp", torch.bfloat16, 4)]


def _regex(targets: list[str]) -> str:
    return "(^|\\.)(" + "|".join(targets) + ")$"


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("model", "dtype", "r"), RUNS, ids=["mlp-fp32", "qwen-fp32-r4", "qwen-fp32-r8", "mlp-bf16"])
def test_vera_matches_peft(model: str, dtype: torch.dtype, r: int) -> None:
    build, targets, make_x = MODELS[model]
    ours = build().to(dtype)
    theirs = get_peft_model(
        build().to(dtype), VeraConfig(r=r, d_initial=0.1, target_modules=targets), autocast_adapter_dtype=False
    )
    ll.attach(ours, ll.VeRAConfig(r=r, d_initial=0.1, target_names=_regex(targets), dtype=dtype))
    assert _trainable(ours) == _trainable(theirs) > 0
    state = ll.adapter_state_dict(ours)
    gen = torch.Generator().manual_seed(3)
    pairs = []
    with torch.no_grad():
        for ours_key, peft_key in (("lora_shared.lora_A", "vera_A"), ("lora_shared.lora_B", "vera_B")):
            shared = getattr(theirs.base_model, peft_key)["default"]
            assert state[ours_key].shape == shared.shape  # both sized by the largest target
            state[ours_key].copy_(shared)
        for key, t in state.items():
            if key.startswith("lora_shared."):
                continue
            layer, slot = key.rsplit(".lora_", 1)
            t.copy_(0.3 * torch.randn(t.shape, generator=gen))
            peft_key, offset = {"lambda_b": ("vera_lambda_b", 0.0), "d_shift": ("vera_lambda_d", 0.1)}[slot]
            p = peft_tensor(theirs, layer, peft_key)
            p.copy_(t + offset)
            pairs.append((key, t, p))
    assert len(pairs) == 2 * len(ll.attachment(ours).adapted)
    tol = TOL if dtype == torch.float32 else BF16_TOL
    outputs = run_both(ours, theirs, make_x(), dtype)
    assert_parity(f"VeRA r={r} ({model})", outputs, [(key, t.grad, p.grad) for key, t, p in pairs], tol, dtype)


def test_vera_trainable_count_is_peft_formula() -> None:
    """d_out + r per layer, the shared A and B not counted: PEFT's count on tiny Qwen3 (q 64 -> 128, v 64 -> 64)."""
    model = tiny_qwen()
    ll.attach(model, ll.VeRAConfig(r=8))
    layers = ll.attachment(model).adapted
    assert _trainable(model) == sum(a.target.d_out + 8 for a in layers) == 2 * (128 + 8) + 2 * (64 + 8)


VB_RUNS = [  # model, dtype, vector_length, num_vectors, topk
    ("mlp", torch.float32, 4, 16, 2),
    ("qwen", torch.float32, 32, 32, 2),
    ("qwen", torch.float32, 16, 24, 3),
    ("mlp", torch.bfloat16, 4, 16, 2),
]


@pytest.mark.parametrize(
    ("model", "dtype", "b", "n", "k"), VB_RUNS, ids=["mlp-fp32", "qwen-fp32-b32", "qwen-fp32-b16-k3", "mlp-bf16"]
)
def test_vblora_matches_peft(model: str, dtype: torch.dtype, b: int, n: int, k: int) -> None:
    """The bank is PEFT's vblora_vector_bank (one for all layers); logits_A0 + logits_A_shift is PEFT's
    vblora_logits_A, logits_B0 + logits_B_shift PEFT's vblora_logits_B with its first two axes swapped."""
    build, targets, make_x = MODELS[model]
    hypers = dict(r=4, num_vectors=n, vector_length=b, topk=k)
    ours = build().to(dtype)
    theirs = get_peft_model(
        build().to(dtype), VBLoRAConfig(target_modules=targets, **hypers), autocast_adapter_dtype=False
    )
    ll.attach(ours, ll.VBLoRA.config_class(target_names=_regex(targets), dtype=dtype, **hypers))
    assert _trainable(ours) == _trainable(theirs) > 0
    state = ll.adapter_state_dict(ours)
    gen = torch.Generator().manual_seed(3)
    pairs = []
    with torch.no_grad():
        bank = theirs.base_model.vblora_vector_bank["default"]
        state["lora_shared.lora_bank"].copy_(0.3 * torch.randn(bank.shape, generator=gen))
        bank.copy_(state["lora_shared.lora_bank"])
        pairs.append(("lora_shared.lora_bank", state["lora_shared.lora_bank"], bank, lambda g: g))
        for key, t in state.items():
            if key.startswith("lora_shared."):
                continue
            layer, slot = key.rsplit(".lora_", 1)
            if not slot.endswith("_shift"):  # the frozen start logits_A0, logits_B0
                continue
            t.copy_(torch.randn(t.shape, generator=gen))  # PEFT's logits are our start + shift
            name = slot.removesuffix("_shift")
            p = peft_tensor(theirs, layer, f"vblora_{name}")
            swap = (lambda g: g.permute(1, 0, 2)) if name == "logits_B" else (lambda g: g)
            p.copy_(swap(state[f"{layer}.lora_{name}0"] + t))
            pairs.append((key, t, p, swap))
    tol = TOL if dtype == torch.float32 else BF16_TOL
    outputs = run_both(ours, theirs, make_x(), dtype)
    grads = [(key, swap(t.grad), p.grad) for key, t, p, swap in pairs]
    assert_parity(f"VB-LoRA b={b} k={k} ({model})", outputs, grads, tol, dtype)


def test_vblora_trainable_count_is_peft_formula() -> None:
    """The bank once (num_vectors * vector_length) and r * (d_in + d_out) / b * num_vectors logits per layer."""
    model = tiny_qwen()
    cfg = ll.VBLoRA.config_class(r=4, num_vectors=32, vector_length=32)
    ll.attach(model, cfg)
    per_layer = sum(4 * (a.target.d_in + a.target.d_out) // 32 * 32 for a in ll.attachment(model).adapted)
    assert _trainable(model) == 32 * 32 + per_layer == 32 * 32 + 2 * (6 + 4) * 4 * 32
    assert ll.VBLoRA.num_trainable_shared(cfg, 64, 128) == 32 * 32


# ---------------------------------------------------------------------------- the shared-tensor runtime

SHARED_LORA = '''adapter shared_lora_test "SharedLoRATest"
"""
LoRA whose A is one trainable tensor for every target, sliced to each layer's d_in. Identity at init: B = 0.
"""

hyper r: int = 4
target "up|down|q_proj|v_proj"

shared param A[r, max_d_in] = kaiming
param B[d_out, r] = zeros

output y + B @ cols(A, d_in) @ x
'''


def _compiled(source: str, module: str, cls: str) -> type[Variant]:
    """A spec compiled into a module of its own and imported (registered once per test session)."""
    if module in sys.modules:
        return getattr(sys.modules[module], cls)
    path = os.path.join(tempfile.mkdtemp(prefix="lora_lite_shared_"), f"{module}.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(compile_source(source, f"{module}.adapter"))
    spec = importlib.util.spec_from_file_location(module, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded
    spec.loader.exec_module(loaded)
    return getattr(loaded, cls)


def _load_shared_lora() -> type[Variant]:
    return _compiled(SHARED_LORA, "shared_lora_test_module", "SharedLoRATest")


@pytest.fixture(scope="module", autouse=True)
def _own_registry():
    """The variants this file compiles leave the registry (and sys.modules) when its tests end, so that tests
    that walk every registered variant see the package's only."""
    ll.import_variants()
    saved = dict(Variant.registry)
    yield
    Variant.registry.clear()
    Variant.registry.update(saved)
    sys.modules.pop("shared_lora_test_module", None)


@pytest.fixture(scope="module")
def shared_lora() -> type[Variant]:
    return _load_shared_lora()


def _shared_cfg(variant: type[Variant], **kw: object):
    return variant.config_class(r=4, **kw)


def test_generated_code_reads_the_shared_tensor_and_slices_it() -> None:
    text = compile_source(SHARED_LORA, "shared_lora_test.adapter")
    assert "A = layer.lora_shared.lora_A.to(x.dtype)  # (r, max_d_in), shared" in text
    assert "A[..., :d_in]" in text
    assert 'Slot("A", (cfg.r, max_d_in), trainable=True)' in text
    assert 'shared_formula = "max_d_in*r"' in text
    assert 'trainable_formula = "d_out*r"' in text


def test_shared_tensor_is_registered_once_and_every_target_reads_it(shared_lora: type[Variant]) -> None:
    model = tiny_mlp()
    ll.attach(model, _shared_cfg(shared_lora))
    holder = model.lora_shared
    assert [n for n, _ in model.named_parameters() if n.startswith("lora_shared")] == ["lora_shared.lora_A"]
    assert holder.lora_A.shape == (4, 20) and holder.lora_A.requires_grad  # max_d_in: down's 20
    for name in ("up", "down"):
        layer = model.get_submodule(name)
        assert layer.lora_shared is holder
        assert not any("shared" in k for k in layer.state_dict())  # a reference, not a submodule
    assert sorted(ll.adapter_state_dict(model)) == ["down.lora_B", "lora_shared.lora_A", "up.lora_B"]
    # counted once: A [4, 20] plus B per layer
    variant = ll.attachment(model).variant
    assert _trainable(model) == 4 * 20 + 20 * 4 + 8 * 4
    assert variant.num_trainable_shared(ll.attachment(model).cfg, 20, 20) == 80
    # a step trains A from both layers: its gradient is the sum of what each layer sends
    with torch.no_grad():
        for a in ll.attachment(model).adapted:
            a.target.layer.lora_B.normal_()
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    model(x).sum().backward()
    grad = holder.lora_A.grad.clone()
    assert grad[:, :12].abs().sum() > 0 and grad[:, 12:].abs().sum() > 0  # up uses 12 columns, down all 20


def test_shared_frozen_values_depend_on_seed_and_name_only() -> None:
    first, second, other = tiny_mlp(), tiny_mlp(), tiny_mlp()
    torch.manual_seed(1)
    ll.attach(first, ll.VeRAConfig(r=4, target_names="up|down"))
    torch.manual_seed(2)  # the global RNG does not matter
    ll.attach(second, ll.VeRAConfig(r=4, target_names="up|down"))
    ll.attach(other, ll.VeRAConfig(r=4, seed=1, target_names="up|down"))
    expected = ops.kaiming_uniform((4, 20), 0, torch.device("cpu"), ops.shared_generator(0, "A"))
    assert torch.equal(first.lora_shared.lora_A, expected)  # drawn from the seed and the name, not the layers
    assert torch.equal(first.lora_shared.lora_B, second.lora_shared.lora_B)
    assert not torch.equal(first.lora_shared.lora_A, other.lora_shared.lora_A)
    assert not first.lora_shared.lora_A.requires_grad and "lora_shared.lora_A" in dict(first.named_buffers())


@pytest.mark.parametrize("which", ["vera", "shared_lora"])
def test_saved_once_and_loaded_back(which: str, shared_lora: type[Variant], tmp_path) -> None:
    cfg = ll.VeRAConfig(r=4, target_names="up|down") if which == "vera" else _shared_cfg(shared_lora)
    model = tiny_mlp()
    ll.attach(model, cfg)
    with torch.no_grad():
        for t in ll.adapter_state_dict(model).values():
            t.add_(0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())))
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(5))
    expected = model(x).detach()
    path = tmp_path / "adapter.safetensors"
    ll.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        saved = {k: f.get_tensor(k) for k in keys}
    assert sum(k.startswith("lora_shared.") for k in keys) == (2 if which == "vera" else 1)
    assert not any(".lora_shared" in k for k in keys)  # not once per layer
    fresh = tiny_mlp()
    ll.load(fresh, path)
    assert torch.equal(fresh(x), expected)
    assert fresh.up.lora_shared is fresh.lora_shared
    # a file without its shared tensor is refused, and the model is left as it was
    del saved["lora_shared.lora_A"]
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(saved, tmp_path / "broken.safetensors", metadata=metadata)
    untouched = tiny_mlp()
    with pytest.raises(ValueError, match=r"missing tensor lora_shared\.lora_A \(shared by every target\)"):
        ll.load(untouched, tmp_path / "broken.safetensors")
    assert ll.attachment(untouched) is None and not hasattr(untouched, "lora_shared")
    assert not hasattr(untouched.up, "lora_shared")


@pytest.mark.parametrize("which", ["vera", "shared_lora"])
def test_detach_removes_the_shared_tensors_bit_exact(which: str, shared_lora: type[Variant]) -> None:
    model = tiny_qwen()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [n for n, _ in model.named_parameters()]
    cfg = ll.VeRAConfig(r=4) if which == "vera" else _shared_cfg(shared_lora)
    ll.attach(model, cfg)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6))
    model(ids, labels=ids).loss.backward()
    ll.detach(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [n for n, _ in model.named_parameters()] == params
    assert not hasattr(model, "lora_shared")
    assert not any(hasattr(m, "lora_shared") for m in model.modules())


def test_attach_refuses_a_model_that_has_lora_shared(shared_lora: type[Variant]) -> None:
    model = tiny_mlp()
    model.lora_shared = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="the model already has an attribute lora_shared"):
        ll.attach(model, _shared_cfg(shared_lora))
    assert ll.attachment(model) is None and not hasattr(model.up, "lora_shared")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_shared_module_moves_and_deepcopies_with_the_model(shared_lora: type[Variant]) -> None:
    import copy

    model = tiny_mlp()
    ll.attach(model, _shared_cfg(shared_lora))
    model.to(torch.float64)
    assert model.lora_shared.lora_A.dtype == torch.float64 and model.up.lora_shared.lora_A.dtype == torch.float64
    twin = copy.deepcopy(model)
    assert twin.up.lora_shared is twin.lora_shared is twin.down.lora_shared
    assert twin.lora_shared is not model.lora_shared


# ---------------------------------------------------------------------------- DDP and FSDP2 (gloo, 2 processes)

DIST_TOL = 1e-4
DIST_CASES = {
    "VeRA": lambda: ll.VeRAConfig(r=4),
    "VB-LoRA": lambda: ll.VBLoRA.config_class(r=4, num_vectors=32, vector_length=32),
    "shared": lambda: _shared_cfg(_load_shared_lora()),
}


def _attached(title: str) -> nn.Module:
    model = tiny_qwen()
    torch.manual_seed(7)  # the same adapter init in every process
    ll.attach(model, DIST_CASES[title]())
    with torch.no_grad():  # off the identity, so that A's gradient is not zero at the first step
        for a in ll.attachment(model).adapted:
            for slot in a.slots:
                t = getattr(a.target.layer, f"lora_{slot}")
                t.copy_(0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())))
    return model.train()


def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        local = global_batch()[rank::WORLD]
        for mode in ("ddp", "fsdp2"):
            for title in DIST_CASES:
                model = _attached(title)
                if mode == "ddp":
                    train(DistributedDataParallel(model), local)
                else:
                    for layer in model.model.layers:
                        fully_shard(layer)
                    fully_shard(model)
                    train(model, local)
                adapter = {k: full(v) for k, v in ll.adapter_state_dict(model).items()}
                torch.save(adapter, os.path.join(out, f"{mode}-{title}-rank{rank}.pt"))
                if mode == "fsdp2" or rank == 0:  # FSDP2: the gather is a collective, every rank calls save
                    ll.save(model, os.path.join(out, f"{mode}-{title}.safetensors"))
                dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, shared_lora: type[Variant]) -> str:
    out = str(tmp_path_factory.mktemp("shared_distributed"))
    run_workers(_worker, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("title", list(DIST_CASES))
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_training_of_shared_tensors_matches_one_process(runs: str, mode: str, title: str) -> None:
    model = _attached(title)
    start = {k: v.detach().clone() for k, v in ll.adapter_state_dict(model).items()}
    train(model, global_batch())
    expected = {k: v.detach().clone() for k, v in ll.adapter_state_dict(model).items()}
    ranks = [torch.load(os.path.join(runs, f"{mode}-{title}-rank{r}.pt")) for r in range(WORLD)]
    assert ranks[0].keys() == expected.keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in expected)
    for key in {"shared": ["lora_shared.lora_A"], "VB-LoRA": ["lora_shared.lora_bank"]}.get(title, []):
        assert (expected[key] - start[key]).abs().max() > 10 * DIST_TOL  # trained, reduced across ranks
    diff = max((ranks[0][k] - expected[k]).abs().max().item() for k in expected)
    print(f"\n{mode} {title}: max abs diff vs one process {diff:.1e}", end="")
    assert diff <= DIST_TOL
    fresh = tiny_qwen()
    ll.load(fresh, os.path.join(runs, f"{mode}-{title}.safetensors"))
    loaded = ll.adapter_state_dict(fresh)
    assert all(torch.equal(loaded[k], ranks[0][k]) for k in ranks[0])
