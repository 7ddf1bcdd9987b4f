"""Host-overhead tier (issue 11): scratchops' eager host path against its torch twin, kernels stubbed.

CPU tensors under Triton's interpreter with every kernel execution skipped (``scratchops._hostbench``):
what is timed is the host work a GPU run pays per call. The ratios are asserted with a margin;
the figures themselves are the benchmark's output (``python -m benchmarks.bench_host``).
"""
import pytest

from scratchops import _hostbench

# Bound on scratchops / torch host time per op, forward+backward (issue 11's goal: 2.0): the highest ratio
# measured (cross_entropy, 1.97x; the others 1.55-1.90x) with a 1.4x margin for CI noise.
MAX_RATIO = 2.8
# Bound on scratchops' SGD step / torch.optim.SGD(fused=True) over 1000 parameters: the goal itself (measured
# 0.54-0.65x).
MAX_SGD_RATIO = 1.0
REPS = 300


def _best(rows, op, pass_, bound):
    """The row, re-measured once alone if it is over ``bound``: a load spike on a shared machine slows
    Python more than torch's C++ (a real regression is over the bound both times)."""
    r = rows[op, pass_]
    if r["ratio"] > bound:
        again = _measure(ops=(op,))[op, pass_]
        r = min(r, again, key=lambda x: x["ratio"])
    return r


def _measure(**kwargs):
    """{(op, pass): row}, timed with one intra-op thread (tiny tensors; extra threads only spin)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {(r["op"], r["pass"]): r for r in _hostbench.measure(reps=REPS, mode="cpu", **kwargs)}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rows():
    from scratchops._backend import interpreter_mode

    if not interpreter_mode():
        pytest.skip("the host-overhead tier runs on CPU tensors under the interpreter (TRITON_INTERPRET=1)")
    return _measure()


@pytest.mark.parametrize("op", [op for op in _hostbench.OPS if op != "sgd_step"])
def test_fwd_bwd_ratio(rows, op):
    r = _best(rows, op, "fwd+bwd", MAX_RATIO)
    assert r["launches"] >= 2, f"{op}: the Triton path did not run (launches per fwd+bwd: {r['launches']})"
    assert r["ratio"] <= MAX_RATIO, f"{op} fwd+bwd: {r['ours_us']} µs = {r['ratio']}x torch's {r['torch_us']} µs"


def test_forward_launches(rows):
    """The forward of every op reaches a (stubbed) kernel launch: the Triton launcher's host work is what is timed."""
    missing = [op for op in _hostbench.OPS if op != "sgd_step" and rows[op, "fwd"]["launches"] < 1]
    assert not missing, missing


def test_sgd_step_ratio(rows):
    r = _best(rows, "sgd_step", "step", MAX_SGD_RATIO)
    assert r["launches"] >= 1
    assert r["ratio"] <= MAX_SGD_RATIO, f"SGD step {r['ours_us']} µs = {r['ratio']}x torch fused {r['torch_us']} µs"


def test_stub_restores_the_interpreter():
    """After measuring, kernels run again (the stub is scoped)."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    with _hostbench.stubbed_launches():
        assert InterpretedFunction.run is not original
    assert InterpretedFunction.run is original


LAUNCH_SCRIPT = r"""
import torch
from scratchops import _hostbench
_hostbench.prepare("launch")  # compiled for sm_90, launched down to the stand-in driver (no GPU)
import triton.language as tl
from scratchops._kernels import _launch, activations as A

def launch(n):
    before = _hostbench.LAUNCHES[0]
    A._fwd((1,), x, y, n, ACTIVATION=1, ACC=tl.float32)
    assert _hostbench.LAUNCHES[0] == before + 1
    return _hostbench.LAST_LAUNCH[0]

def equal(u, v):
    if type(u).__name__ == "LazyDict":  # launch metadata: a new one each launch (Triton's own path too)
        return type(v) is type(u) and u.get() == v.get()
    return u is v or (type(u) is type(v) and not isinstance(u, torch.Tensor) and u == v)

def same(a, b):
    return len(a) == len(b) and all(equal(u, v) for u, v in zip(a, b))

x, y = torch.randn(8, 8), torch.empty(8, 8)
print("direct", _launch._DIRECT_LAUNCH)
if _launch._DIRECT_LAUNCH:
    launch(64)  # Triton's own path: compiles; the CompiledKernel is kept
    assert len(A._fwd._compiled) == 1
    direct = launch(64)  # the kept CompiledKernel, launched directly
    _launch._DIRECT_LAUNCH = False
    plain = launch(64)  # JITFunction.run
    _launch._DIRECT_LAUNCH = True
    assert same(direct, plain), (direct, plain)
    launch(1)  # n == 1 is another specialization: Triton's path again, a second kernel kept
    assert len(A._fwd._compiled) == 2 and len({id(k) for k in A._fwd._compiled.values()}) == 2
    one = launch(1)
    _launch._DIRECT_LAUNCH = False
    assert same(one, launch(1)) and not same(one, plain)
print("ok")
"""


def test_compiled_launch_matches_triton_path():
    """Kernel's compiled fast path (a CompiledKernel kept per specialization) hands the driver's launcher exactly
    what JITFunction.run does, and a new specialization (n == 1) compiles and keeps another kernel."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", LAUNCH_SCRIPT], env=env, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
    if "direct False" in result.stdout:
        pytest.skip("this Triton version takes JITFunction.run for every launch (no compiled fast path)")


TUNED_SCRIPT = r"""
import itertools
import torch
from scratchops import _hostbench
_hostbench.prepare("launch")  # compiled for sm_90, launched down to the stand-in driver (no GPU)
import triton
import triton.language as tl
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor
from scratchops._kernels import _launch
from scratchops._kernels._gemm import set_blocks

# The stand-in's benchmarker times each config faster than the one before: the autotuner picks the last (BM=32),
# so the launched descriptor's block shape (made [16, 16]) comes from the pre_hook, as on a GPU.
times = itertools.count(100, -1)
driver.active.get_benchmarker = lambda: lambda fn, quantiles=None, **kw: [float(next(times))] * len(quantiles or [0])


@triton.jit
def _tile_kernel(x_desc, y_ptr, n, alpha, BM: tl.constexpr, BN: tl.constexpr):
    tile = x_desc.load([0, 0])
    offs = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    tl.store(y_ptr + offs, tile * alpha, mask=offs < n)


configs = [_launch.config(4, 2, BM=16, BN=16), _launch.config(4, 3, BM=32, BN=16)]
HOOKED = []
for c in configs:
    blocks = set_blocks({"x_desc": ("BM", "BN")})
    c.pre_hook = lambda nargs, blocks=blocks: (HOOKED.append(dict(nargs)), blocks(nargs))
kernel = _launch.Kernel(_tile_kernel, {"tf32": configs}, key=["n"])
x, y = torch.randn(64, 16), torch.empty(64, 16)


def launch(n):
    desc = TensorDescriptor.from_tensor(x, [16, 16])
    before, hooked = _hostbench.LAUNCHES[0], len(HOOKED)
    kernel(lambda meta: (triton.cdiv(n, meta["BM"] * meta["BN"]),), desc, y, n, 0.5, cls="tf32")
    assert _hostbench.LAUNCHES[0] == before + 1 and len(HOOKED) == hooked + 1
    return _hostbench.LAST_LAUNCH[0], HOOKED[-1]


def equal(u, v):
    if type(u).__name__ == "LazyDict":  # launch metadata: a new one each launch (Triton's own path too)
        return type(v) is type(u) and u.get() == v.get()
    if isinstance(u, TensorDescriptor):  # a new descriptor each launch: same tensor, shape, strides, block
        return type(v) is TensorDescriptor and u.base is v.base and [list(u.shape), list(u.strides), u.block_shape] == [
            list(v.shape), list(v.strides), v.block_shape]
    if callable(u) and type(u).__name__ == "function":  # the grid lambda: a new one each launch
        return callable(v)
    return u is v or (type(u) is type(v) and not isinstance(u, torch.Tensor) and u == v)


def same(a, b):
    return len(a) == len(b) and all(equal(u, v) for u, v in zip(a, b))


def same_hook(a, b):
    return list(a) == list(b) and all(equal(a[k], b[k]) for k in a)


print("direct", _launch._DIRECT_LAUNCH)
if _launch._DIRECT_LAUNCH:
    launch(1000)  # a new autotuning key: the Autotuner benchmarks (stand-in times), caches BM=32, compiles it
    tuned = kernel._tuned["tf32"]
    assert len(tuned.cache) == 1 and tuned.best_config is configs[1], tuned.cache
    assert not kernel._compiled
    launch(1000)  # the cached config through _launch_compiled: Triton's JITFunction.run once, its kernel kept
    assert len(kernel._compiled) == 1 and next(iter(kernel._compiled))[1] == ("tf32", id(configs[1]))
    direct, direct_hook = launch(1000)  # the autotuned fast path
    _launch._DIRECT_LAUNCH = False
    plain, plain_hook = launch(1000)  # Autotuner.run + JITFunction.run
    _launch._DIRECT_LAUNCH = True
    assert same(direct, plain), (direct, plain)
    assert same_hook(direct_hook, plain_hook), (direct_hook, plain_hook)
    desc = [a for a in direct if isinstance(a, TensorDescriptor)]
    assert len(desc) == 1 and desc[0].block_shape == [32, 16], desc  # the pre_hook's block shape was launched
    assert direct_hook["BM"] == 32 and direct_hook["num_stages"] == 3 and direct_hook["grid"] is not None
    assert direct[:3] == (2, 1, 1), direct[:3]  # grid from the chosen config: cdiv(1000, 32 * 16), not 16 * 16
    launch(16)  # a new key (n): the Autotuner's own path again (it benchmarks; the counter picks BM=32 again)
    assert len(tuned.cache) == 2
print("ok")
"""


def test_tuned_launch_matches_autotuner_path(tmp_path):
    """Kernel's autotuned fast path (the Autotuner's cached config, its pre_hook, the kept CompiledKernel) hands
    the driver's launcher exactly what Autotuner.run + JITFunction.run do: the chosen config's constexprs and
    grid, and the block shape its pre_hook (set_blocks) writes into a TMA descriptor; a new autotuning key takes
    the Autotuner's own path."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "tuned_launch.py"  # @triton.jit needs its source in a file
    script.write_text(TUNED_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, cwd=root,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
    if "direct False" in result.stdout:
        pytest.skip("this Triton version takes Autotuner.run for every launch (no compiled fast path)")
