"""Training an attached model with DDP and FSDP2 (gloo, 2 processes on the CPU) matches one process.

One start of 2 workers (a module fixture) runs both wrappers for each variant: attach, wrap, a few SGD
steps on each rank's half of a global batch, gather the adapter, save from rank 0. The
tests then compare, in this process, against a single-process run on the whole batch.
`pytest -s -m slow tests/test_distributed.py` prints the max differences.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import VOCAB, tiny_qwen
from torch import Tensor, nn

import lora_lite as ll

pytestmark = pytest.mark.slow
__all__ = ["WORLD", "full", "global_batch", "run_workers", "train"]  # what tests/test_peft_shared.py imports

WORLD = 2
STEPS = 3
LR = 0.5
TOL = 1e-4
TIMEOUT_S = 120
MODES = ("ddp", "fsdp2")
CASES = {
    "LoRA": lambda: ll.LoRAConfig(r=4),
    "PiSSA": lambda: ll.PiSSAConfig(r=4),  # a residual weight and a buffer
    "DoRA": lambda: ll.DoRAConfig(r=4),
    "IA3": lambda: ll.IA3Config(),
    # frozen random tensors (buffers drawn per layer from the seed): the same on every rank, never reduced
    "LoRA-FA": lambda: ll.LoRAFAConfig(r=4),
    "VeRA": lambda: ll.VeRAConfig(r=4),
    # an int64 index set (a buffer DDP broadcasts and FSDP2 keeps whole) read by a custom sparse op
    "SHiRA": lambda: ll.SHiRAConfig(r=4),
}


def global_batch() -> Tensor:
    return torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(6))


def attached(title: str) -> nn.Module:
    model = tiny_qwen()
    torch.manual_seed(7)  # the same adapter init in every process
    ll.attach(model, CASES[title]())
    return model.train()


def train(model: nn.Module, ids: Tensor) -> None:
    """SGD on `ids`; the optimizer is built after wrapping, on the params that require grad."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()


def full(t: Tensor) -> Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        local = global_batch()[rank::WORLD]
        for mode in MODES:
            for title in CASES:
                model = attached(title)  # attach before wrapping
                if mode == "ddp":
                    train(DistributedDataParallel(model), local)
                else:
                    for layer in model.model.layers:
                        fully_shard(layer)
                    fully_shard(model)
                    train(model, local)
                adapter = {k: full(v) for k, v in ll.adapter_state_dict(model).items()}
                torch.save(adapter, os.path.join(out, f"{mode}-{title}-rank{rank}.pt"))
                if title == "PiSSA":  # the state dict holds the original base, and loads back to the same model
                    with torch.no_grad():
                        before = model(local, labels=local).loss
                        state = model.state_dict()
                        sharded = all(hasattr(v, "device_mesh") for k, v in state.items() if k.endswith("proj.weight"))
                        base = {k: full(v) for k, v in state.items() if ".lora_" not in k}
                        model.load_state_dict(state)
                        after = model(local, labels=local).loss
                    saved = (base, before, after, sharded)
                    torch.save(saved, os.path.join(out, f"{mode}-{title}-state-rank{rank}.pt"))
                if mode == "ddp":
                    if rank == 0:
                        ll.save(model, os.path.join(out, f"{mode}-{title}.safetensors"))
                else:  # FSDP2: the gather is a collective, so every rank calls save; rank 0 writes
                    ll.save(model, os.path.join(out, f"{mode}-{title}.safetensors"))
                dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker, out: str) -> None:
    """Run worker(rank, port, out) in WORLD processes and wait for them (failing the test after TIMEOUT_S).
    fork: the workers start from this process's imports and registered variants (about 2 s; spawn re-imports
    torch and transformers in each, about 15 s on a loaded 2-core machine). conftest keeps torch on one thread."""
    workers = mp.start_processes(worker, args=(_free_port(), out), nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + TIMEOUT_S
    while not workers.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the {WORLD} distributed workers did not finish in {TIMEOUT_S} s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("distributed"))
    run_workers(_worker, out)
    return out


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, Tensor]]:
    """The single-process run on the whole batch, per variant."""
    result = {}
    for title in CASES:
        model = attached(title)
        train(model, global_batch())
        result[title] = {k: v.detach().clone() for k, v in ll.adapter_state_dict(model).items()}
    return result


@pytest.mark.parametrize("title", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_distributed_training_matches_one_process(runs: str, single, mode: str, title: str) -> None:
    ranks = [torch.load(os.path.join(runs, f"{mode}-{title}-rank{r}.pt")) for r in range(WORLD)]
    expected = single[title]
    assert ranks[0].keys() == expected.keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in expected)  # both ranks end identical
    moved = max((expected[k] - attached(title).get_parameter(k).detach()).abs().max().item() for k in _params(title))
    assert moved > 100 * TOL  # the steps changed the adapter: the comparison below means something
    diff = max((ranks[0][k] - expected[k]).abs().max().item() for k in expected)
    print(f"\n{mode} {title}: max abs diff vs one process {diff:.1e} (adapter moved {moved:.1e})", end="")
    assert diff <= TOL


@pytest.mark.parametrize("title", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_saved_from_rank_0_loads_back(runs: str, mode: str, title: str) -> None:
    rank0 = torch.load(os.path.join(runs, f"{mode}-{title}-rank0.pt"))
    model = tiny_qwen()
    ll.load(model, os.path.join(runs, f"{mode}-{title}.safetensors"))
    loaded = ll.adapter_state_dict(model)
    assert loaded.keys() == rank0.keys()
    assert all(torch.equal(loaded[k], rank0[k]) for k in rank0)


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_of_a_wrapped_residual_variant_holds_the_original_base(runs: str, mode: str) -> None:
    original = tiny_qwen().state_dict()
    for rank in range(WORLD):
        base, before, after, sharded = torch.load(os.path.join(runs, f"{mode}-PiSSA-state-rank{rank}.pt"))
        assert sharded == (mode == "fsdp2")  # FSDP2's state dict holds DTensors, the swapped-in base too
        assert base.keys() == original.keys()
        assert all(torch.equal(v, original[k]) for k, v in base.items())
        assert torch.equal(before, after)


def _params(title: str) -> list[str]:
    return [n for n, p in attached(title).named_parameters() if p.requires_grad]
