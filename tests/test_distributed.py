"""DDP and FSDP2: 2 processes on gloo (CPU) train a scratchops model with the gradients of one process.

Each rank gets half of the batch; DDP averages the gradients, and with a mean loss
over equal halves the average is the full batch's gradient. Rank 0 records the
gradients and parameters of a few SGD steps (scratchops.optim.SGD); the parent
runs the same steps in one process on the full batch and compares. The workers
are spawned (torch.multiprocessing) and talk over 127.0.0.1 only.

FSDP2 (``torch.distributed.fsdp.fully_shard`` on every Linear/Conv2d and on the
root) shards the parameters as DTensors; a converted module's forward sees the
unsharded parameters that FSDP2 gathers, and its gradients are reduce-scattered
(averaged) back. Its optimizer is ``torch.optim.SGD``; ``scratchops.optim.SGD`` steps
the sharded parameters on their local shards (the test at the end of this file).

The workers run the reference backend: what DDP adds (gradient hooks, bucketing,
all-reduce) does not depend on the backend, which the op tests check on their
own, and Triton's interpreter would more than double this test's CPU time. A
backend name is passed to the workers, so adding "triton" to ``backends`` runs the
kernels too (in the interpreter: workers inherit TRITON_INTERPRET from the test
session's environment, set before anything imports triton).
"""
import contextlib
import os
import socket
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import scratchops
import scratchops.functional as SF
from scratchops._backend import LAUNCHES, triton_unavailable_reason
from tests.helpers import tolerances

WORLD = 2
STEPS = 3
BATCH = 8
JOIN_SECONDS = 120


pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 3))
    else:
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                    torch.nn.Linear(4 * 5 * 5, 16), torch.nn.Sigmoid(), torch.nn.Linear(16, 3))
    return scratchops.convert(model)


def data(name: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((BATCH, 6) if name == "mlp" else (BATCH, 1, 5, 5), generator=g)
    return x, torch.randn(BATCH, 3, generator=g)


def _full(t):
    """A DTensor (FSDP2's sharded parameter or gradient) gathered to the whole tensor; a tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, forward, x, y, optimizer_class=None):
    """STEPS SGD steps on (x, y); the losses, the gradients after each backward and the final parameters."""
    optimizer = (optimizer_class or scratchops.optim.SGD)(model.parameters(), lr=0.1, momentum=0.9)
    grads, losses = [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = SF.mse_loss(forward(x), y)
        loss.backward()
        losses.append(loss.detach())
        grads.append([_full(p.grad).clone() for p in model.parameters()])
        optimizer.step()
    return {"losses": losses, "grads": grads, "params": [_full(p.detach()).clone() for p in model.parameters()]}


def wrap(model, parallel: str):
    """(module to call, optimizer class): DDP around the model, or FSDP2 applied to it in place."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model), None
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            fully_shard(module)
    fully_shard(model)
    return model, torch.optim.SGD


@contextlib.contextmanager
def _gloo_group(rank, port):
    """A worker's gloo process group. When the body succeeds, the ranks leave together and the process ends
    without the interpreter's teardown: there a gloo thread still joinable can make C++ call std::terminate
    ("terminate called without an active exception", SIGABRT) after all the work is done and saved, about one
    run in three on 2 busy cores. A body that raised propagates its exception as usual."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _mean_over_ranks(losses):
    """The full batch's mean loss in place: the mean of the equal halves' losses."""
    import torch.distributed as dist

    for loss in losses:
        dist.all_reduce(loss)
        loss /= WORLD


def _worker(rank, port, backends, models, path, parallel="ddp"):
    with _gloo_group(rank, port):
        results = {}
        for backend in backends:
            for name in models:
                model = build(name)
                forward, optimizer_class = wrap(model, parallel)
                x, y = data(name)
                half = BATCH // WORLD
                before = sum(n for (_, b), n in LAUNCHES.items() if b == backend)
                with scratchops.use_backend(backend):
                    result = train(model, forward, x[rank * half:(rank + 1) * half],
                                   y[rank * half:(rank + 1) * half], optimizer_class)
                result["ran"] = sum(n for (_, b), n in LAUNCHES.items() if b == backend) - before
                result["sharded"] = all(hasattr(p, "full_tensor") for p in model.parameters())
                _mean_over_ranks(result["losses"])
                results[backend, name] = result
        if rank == 0:
            torch.save(results, path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, args, what):
    """Run ``worker(rank, port, *args)`` on WORLD spawned processes; a worker's exception is raised here, and
    workers still running after JOIN_SECONDS are killed and fail the test."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    context = mp.start_processes(worker, args=(_free_port(), *args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_SECONDS
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"{what} workers did not finish within {JOIN_SECONDS} s")


def _spawn_and_compare(tmp_path, parallel, backends, models):
    path = str(tmp_path / "rank0.pt")
    _spawn(_worker, (backends, models, path, parallel), parallel)
    distributed = torch.load(path)
    assert set(distributed) == {(b, m) for b in backends for m in models}
    for backend in backends:
        for name in models:
            model = build(name)
            with scratchops.use_backend(backend):
                single = train(model, model, *data(name), None if parallel == "ddp" else torch.optim.SGD)
            got = distributed[backend, name]
            assert got["ran"] > 0, "no scratchops backend op ran in the workers"
            assert got["sharded"] == (parallel == "fsdp2")
            tol = tolerances(torch.float32, reduction_size=BATCH)
            torch.testing.assert_close(torch.stack(got["losses"]), torch.stack(single["losses"]), **tol)
            for step, (a, b) in enumerate(zip(got["grads"], single["grads"])):
                for i, (ga, gb) in enumerate(zip(a, b)):
                    torch.testing.assert_close(ga, gb, **tol, msg=lambda m: f"{backend} {name} step {step} p{i}: {m}")
            for pa, pb in zip(got["params"], single["params"]):
                torch.testing.assert_close(pa, pb, **tol)


def test_ddp_gradients_equal_single_process(tmp_path):
    _spawn_and_compare(tmp_path, "ddp", ["reference"], ["mlp", "cnn"])  # reference only: see the module docstring


def test_fsdp2_losses_and_gradients_equal_single_process(tmp_path):
    """A converted model sharded by FSDP2 (fully_shard) trains with one process's losses, gradients, parameters."""
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed.fsdp")
    if not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    _spawn_and_compare(tmp_path, "fsdp2", ["reference"], ["mlp", "cnn"])


# ----------------------------------------------------------------- scratchops.optim.SGD on FSDP2 (issue 15)
SGD_OPTIONS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}


def _sgd_run(model, forward, x, y):
    """STEPS steps of scratchops.optim.SGD (momentum, weight decay, Nesterov), the forward and backward on the
    reference backend, the step on the Triton backend where it runs: the losses, final parameters and buffers."""
    optimizer = scratchops.optim.SGD(model.parameters(), **SGD_OPTIONS)
    step_backend = "reference" if triton_unavailable_reason(x.device, x.dtype) else "triton"
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        with scratchops.use_backend("reference"):
            loss = SF.mse_loss(forward(x), y)
            loss.backward()
        losses.append(loss.detach())
        with scratchops.use_backend(step_backend):
            optimizer.step()
    buffers = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    return {"losses": losses, "params": [_full(p.detach()).clone() for p in model.parameters()],
            "buffers": [_full(b).clone() for b in buffers], "step_backend": step_backend,
            "sharded": all(hasattr(t, "full_tensor") for t in list(model.parameters()) + buffers)}


def _fsdp2_sgd_worker(rank, port, path):
    from torch.distributed.fsdp import fully_shard

    with _gloo_group(rank, port):
        model = build("mlp")  # Linear(16, 3): uneven shards of 2 and 1 rows
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                fully_shard(module)
        fully_shard(model)
        x, y = data("mlp")
        half = BATCH // WORLD
        result = _sgd_run(model, model, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
        _mean_over_ranks(result["losses"])
        if rank == 0:
            torch.save(result, path)


def test_fsdp2_scratchops_sgd_equals_single_process(tmp_path):
    """scratchops.optim.SGD steps FSDP2's sharded (DTensor) parameters shard by shard, momentum buffers as
    DTensors: the losses, parameters and buffers of one process on the whole batch."""
    if not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    path = str(tmp_path / "sgd.pt")
    _spawn(_fsdp2_sgd_worker, (path,), "FSDP2 SGD")
    got = torch.load(path)
    model = build("mlp")
    single = _sgd_run(model, model, *data("mlp"))
    assert got["sharded"] and got["step_backend"] == single["step_backend"]
    tol = tolerances(torch.float32, reduction_size=BATCH)
    torch.testing.assert_close(torch.stack(got["losses"]), torch.stack(single["losses"]), **tol)
    for kind in ("params", "buffers"):
        for i, (a, b) in enumerate(zip(got[kind], single[kind])):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{kind} {i}: {m}")
