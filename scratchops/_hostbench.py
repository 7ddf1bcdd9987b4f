"""Host overhead of scratchops' eager path against its ``torch.nn.functional`` twin (issue 11).

What one op costs the host (Python, dispatch, validation, backend choice, autograd.Function,
launcher: allocation, layout checks, grid) before any kernel runs. Two modes:

* ``cpu`` (issue 11's measure): CPU tensors, Triton in interpreter mode (``TRITON_INTERPRET=1``, so the Triton backend
  is chosen for CPU tensors), and every kernel *execution* replaced by a no-op at one point,
  ``InterpretedFunction.run`` (what ``fn[grid](...)`` calls). Everything up to that call runs:
  the launcher's own work and ``Kernel.__call__``'s config choice and grid. What remains is the
  scratchops host path a GPU run pays, minus Triton's compiled launch path (``JITFunction.run``,
  measured separately: :func:`triton_launch_cost`).
* ``launch``: CPU tensors, Triton *compiled* for sm_90 (interpreter off, ptxas from the wheel) and
  run through its real launch path, ``JITFunction.run`` (binding, specialization key, cache lookup,
  grid), down to a stand-in driver whose launcher does nothing: the GPU host path without a GPU,
  minus the driver's C launch (``cuLaunchKernel``, a few µs). First use compiles each kernel.
* ``gpu``: CUDA tensors, real launches, small shapes (the queue is drained between repetitions).

Timing: per repetition every op runs once per side, the side order alternating, each call timed
by ``perf_counter_ns``; the figure is the median over the repetitions, with the garbage collector
off while timing. ``fwd`` is a training forward (inputs require grad); ``fwd+bwd`` adds
``torch.autograd.grad`` with a fixed incoming gradient (no ``.grad`` accumulation on either side).
The SGD row is one ``step()`` over 1000 parameters of 8x8 (momentum 0.9, weight decay 1e-4)
against ``torch.optim.SGD(fused=True)``.
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time

import torch

PASSES = ("fwd", "fwd+bwd")
OPS = ("relu", "sigmoid", "tanh", "softmax", "log_softmax", "linear", "conv2d", "cross_entropy", "mse_loss",
       "dropout", "sgd_step")
SGD_PARAMS = 1000


MODES = ("cpu", "launch", "gpu")


def default_mode() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def prepare(mode: str) -> None:
    """Set the interpreter on (cpu) or off (launch) before anything imports triton."""
    import sys

    want = "1" if mode == "cpu" else "0"
    if os.environ.get("TRITON_INTERPRET", "0") != want:
        if "triton" in sys.modules:
            raise RuntimeError(f"host bench {mode} mode needs TRITON_INTERPRET={want} before triton is imported")
        os.environ["TRITON_INTERPRET"] = want
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if mode == "launch":
        _install_stand_in_driver()


# ----------------------------------------------------------------- the one stub
LAUNCHES = [0]
LAST_LAUNCH: list = [None]  # launch mode: the arguments the stand-in driver's launcher got last


@contextlib.contextmanager
def stubbed_launches():
    """Every interpreted kernel launch is counted and skipped (the launcher's Python still runs)."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        LAUNCHES[0] += 1

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def _install_stand_in_driver() -> None:
    """Triton's active driver: an sm_90 target whose modules load as nothing and whose launcher
    only counts; and CPU tensors allowed on the Triton backend (kernels compile, never run)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    import scratchops._backend

    class Utils:
        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                    "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

        def load_binary(self, name, kernel, shared, device):
            return 1, 1, 32, 0, 1024  # module, function, registers, spills, max threads

        def unload_module(self, module):
            pass

    class Launcher:
        def __init__(self, src, metadata):
            pass

        def __call__(self, *args):
            LAUNCHES[0] += 1
            LAST_LAUNCH[0] = args

    class StandIn(DriverBase):
        utils, launcher_cls = Utils(), Launcher

        @classmethod
        def is_active(cls):
            return True

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_device_capability(self, device=0):
            return (9, 0)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return None

        def get_benchmarker(self):  # autotuning: every config "takes" 1 ms, so the first is chosen uncompiled
            return lambda fn, quantiles=None, **kwargs: [1.0] * len(quantiles or (0.5,))

        def get_empty_cache_for_benchmark(self):
            return None

        def clear_cache(self, cache):
            pass

        def map_python_to_cpp_type(self, ty):
            return ty

    triton.runtime.driver.set_active(StandIn())
    scratchops._backend.triton_unavailable_reason = lambda *args, **kwargs: None


# ----------------------------------------------------------------- the cases
def _leaf(*shape, device, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device).requires_grad_(grad)


def cases(device):
    """name -> (inputs, scratchops fn, torch fn); fns take the inputs and return the output."""
    import torch.nn.functional as F

    import scratchops.functional as S

    x8 = lambda: (_leaf(8, 8, device=device),)  # noqa: E731
    target = torch.randint(0, 8, (8,), generator=torch.Generator().manual_seed(1)).to(device)
    table = {
        "relu": (x8(), S.relu, F.relu),
        "sigmoid": (x8(), S.sigmoid, torch.sigmoid),
        "tanh": (x8(), S.tanh, torch.tanh),
        "softmax": (x8(), lambda x: S.softmax(x, -1), lambda x: F.softmax(x, -1)),
        "log_softmax": (x8(), lambda x: S.log_softmax(x, -1), lambda x: F.log_softmax(x, -1)),
        "linear": ((_leaf(8, 8, device=device), _leaf(8, 8, device=device, seed=1), _leaf(8, device=device, seed=2)),
                   S.linear, F.linear),
        "conv2d": ((_leaf(1, 2, 8, 8, device=device), _leaf(4, 2, 3, 3, device=device, seed=1),
                    _leaf(4, device=device, seed=2)), lambda x, w, b: S.conv2d(x, w, b, padding=1),
                   lambda x, w, b: F.conv2d(x, w, b, padding=1)),
        "cross_entropy": (x8(), lambda x: S.cross_entropy(x, target), lambda x: F.cross_entropy(x, target)),
        "mse_loss": ((_leaf(8, 8, device=device), _leaf(8, 8, device=device, grad=False, seed=1)), S.mse_loss,
                     F.mse_loss),
        "dropout": (x8(), lambda x: S.dropout(x, 0.5), lambda x: F.dropout(x, 0.5)),
    }
    return table


def sgd_pair(device, n=SGD_PARAMS):
    """(scratchops step, torch fused step) over ``n`` parameters of 8x8 with gradients."""
    import scratchops.optim

    def params(seed):
        ps = [_leaf(8, 8, device=device, grad=True, seed=seed + i) for i in range(n)]
        for i, p in enumerate(ps):
            p.grad = _leaf(8, 8, device=device, grad=False, seed=10_000 + i)
        return ps

    kw = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)
    ours = scratchops.optim.SGD(params(0), **kw)
    theirs = torch.optim.SGD(params(0), fused=True, **kw)
    ours.step(), theirs.step()  # momentum buffers exist: the steady state is timed
    return ours.step, theirs.step


# ----------------------------------------------------------------- timing
def _callables(pass_, inputs, fn):
    grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if pass_ == "fwd":
        return lambda: fn(*inputs)
    out = fn(*inputs)
    g = torch.ones_like(out)

    def step():
        torch.autograd.grad(fn(*inputs), grads, g)
    return step


def _interleave(pairs, reps, sync) -> dict:
    """{(op, pass): (scratchops ns list, torch ns list)}: each repetition calls every pair once per side,
    the side order alternating and the pair order rotating (no op always first), the garbage collector off."""
    times = {(name, p): ([], []) for name, p, _, _ in pairs}
    clock = time.perf_counter_ns
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            k = r % len(pairs)
            for name, p, ours, theirs in pairs[k:] + pairs[:k]:
                mine, other = times[name, p]
                first, second = ((ours, mine), (theirs, other)) if r % 2 == 0 else ((theirs, other), (ours, mine))
                for fn, out in (first, second):
                    t0 = clock()
                    fn()
                    out.append(clock() - t0)
                sync()
    finally:
        if enabled:
            gc.enable()
    return times


def measure(ops=OPS, passes=PASSES, reps: int = 2000, warmup: int = 20, mode: str | None = None) -> list[dict]:
    """Rows of {op, pass, ours_us, torch_us, ratio, launches} (medians over ``reps`` interleaved calls).
    ``prepare(mode)`` must have run before triton was imported."""
    import scratchops

    mode = mode or default_mode()
    device = "cuda" if mode == "gpu" else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    stub = stubbed_launches() if mode == "cpu" else contextlib.nullcontext()
    rows, table = [], cases(device)
    with stub, scratchops.use_backend("triton"):
        pairs = []
        for name in ops:
            if name == "sgd_step":
                if "fwd" in passes or "fwd+bwd" in passes:
                    pairs.append((name, "step", *sgd_pair(device)))
                continue
            inputs, ours, theirs = table[name]
            for p in passes:
                pairs.append((name, p, _callables(p, inputs, ours), _callables(p, inputs, theirs)))
        launches = {}
        for name, p, ours, theirs in pairs:
            for _ in range(warmup):
                theirs()
            before = LAUNCHES[0]
            for _ in range(warmup):
                ours()
            launches[name, p] = (LAUNCHES[0] - before) / warmup
        # The SGD step (1000 tensors) rotates alone: it would evict the small ops' host state each round.
        times = {}
        for group in ([q for q in pairs if q[0] != "sgd_step"], [q for q in pairs if q[0] == "sgd_step"]):
            if group:
                times.update(_interleave(group, reps, sync))
    for name, p, _, _ in pairs:
        mine, other = times[name, p]
        a, b = statistics.median(mine) / 1e3, statistics.median(other) / 1e3
        rows.append({"op": name, "pass": p, "ours_us": round(a, 2), "torch_us": round(b, 2),
                     "ratio": round(a / b, 2), "launches": launches[name, p] if mode != "gpu" else None, "mode": mode})
    return rows


def table(rows) -> str:
    lines = ["| op | pass | scratchops µs | torch µs | ratio | launches |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['pass']} | {r['ours_us']:.1f} | {r['torch_us']:.1f} | {r['ratio']:.2f}x "
                     f"| {r['launches'] if r['launches'] is not None else '-'} |")
    return "\n".join(lines)
