"""Leak tier (issue 16): per op, many forward+backward iterations on tiny tensors.

After a warm-up (caches, plans, lazily built tables), neither the process's resident memory nor the count of
live Python objects may grow: 2,000 iterations per op on the reference backend, a few hundred on Triton
(interpreted on CPU).
"""
import gc
import os

import pytest
import torch

import scratchops
import scratchops.functional as SF
from tests.helpers import backend_skip_reason, make

RSS_MARGIN = 8 * 2**20  # bytes
ITERATIONS = {"reference": 2000, "triton": 60}  # the interpreter runs a launch in milliseconds
TRITON_ITERATIONS = {"conv2d": 20}  # several GEMM programs per launch, three launches a step
WARMUP = 20


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cases():
    target = torch.tensor([0, 2, 1])
    return {
        "relu": (lambda x: SF.relu(x), [(3, 4)]),
        "sigmoid": (lambda x: SF.sigmoid(x), [(3, 4)]),
        "tanh": (lambda x: SF.tanh(x), [(3, 4)]),
        "softmax": (lambda x: SF.softmax(x, -1), [(3, 4)]),
        "log_softmax": (lambda x: SF.log_softmax(x, -1), [(3, 4)]),
        "linear": (lambda x, w, b: SF.linear(x, w, b), [(3, 4), (2, 4), (2,)]),
        "conv2d": (lambda x, w: SF.conv2d(x, w, padding=1), [(1, 2, 3, 3), (2, 2, 2, 2)]),
        "mse_loss": (lambda x, t: SF.mse_loss(x, t), [(6,), (6,)]),
        "cross_entropy": (lambda x: SF.cross_entropy(x, target), [(3, 4)]),
        "linear_cross_entropy": (lambda x, w: SF.linear_cross_entropy(x, w, target), [(3, 4), (4, 4)]),
        "dropout": (lambda x: SF.dropout(x, 0.5), [(3, 4)]),
        "l2_penalty": (lambda a, b: SF.l2_penalty([a, b], 0.1), [(4,), (2, 2)]),
    }


def _loop(fn, inputs, n):
    for _ in range(n):
        y = fn(*inputs)
        y.sum().backward()
    for t in inputs:
        t.grad = None


@pytest.mark.parametrize("name", sorted(_cases()))
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_no_growth(backend_name, name, one_thread):
    reason = backend_skip_reason(backend_name)
    if reason:
        pytest.skip(reason)
    fn, shapes = _cases()[name]
    inputs = [make(s, requires_grad=True, seed=i) for i, s in enumerate(shapes)]
    n = TRITON_ITERATIONS.get(name, ITERATIONS[backend_name]) if backend_name == "triton" else ITERATIONS[backend_name]
    object_margin = min(50, n // 2)  # one leaked object per iteration fails; a few lazily built ones do not
    with scratchops.use_backend(backend_name):
        _loop(fn, inputs, WARMUP)
        gc.collect()
        objects, rss = len(gc.get_objects()), _rss()
        _loop(fn, inputs, n)
        gc.collect()
        grown_objects, grown_rss = len(gc.get_objects()) - objects, _rss() - rss
    print(f"{backend_name} {name}: {grown_objects} objects, {grown_rss / 2**20:.2f} MiB over {n} iterations")
    assert grown_objects < object_margin, f"{grown_objects} more live Python objects after {n} iterations"
    assert grown_rss < RSS_MARGIN, f"RSS grew {grown_rss / 2**20:.1f} MiB over {n} iterations"
