"""Host-overhead tier (issue 11): scratchops' eager host path against its torch twin, kernels stubbed.

CPU tensors under Triton's interpreter with every kernel execution skipped (``scratchops._hostbench``):
what is timed is the host work a GPU run pays per call. The ratios are asserted with a margin;
the figures themselves are the benchmark's output (``python -m benchmarks.bench_host``).
"""
import pytest

from scratchops import _hostbench

# Bound on scratchops / torch host time per op, forward+backward (issue 11's goal: 2.0).
MAX_RATIO = 4.0
# Bound on scratchops' SGD step / torch.optim.SGD(fused=True) over 1000 parameters (issue 11's goal: 1.0).
MAX_SGD_RATIO = 4.0
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
