"""Thread tier (issue 16): ops and ``use_backend`` from several threads.

* each thread's results equal the single-threaded ones (both backends);
* ``use_backend`` is per thread: one thread inside ``use_backend("reference")`` does not change another
  thread's ``scratchops.current_backend()``, and interleaved exits pop only the exiting thread's entry.
"""
import threading

import pytest
import torch
import torch.nn.functional as F

import scratchops
import scratchops.functional as SF
from tests.helpers import backend_skip_reason, make

THREADS, ITERS = 4, 3


def _cases():
    """name -> (fn, inputs maker): tiny problems, one launch or two each."""
    def ce_inputs():
        return make((3, 4), requires_grad=True, seed=1), torch.tensor([0, 3, 1])

    return {
        "relu": (SF.relu, lambda: (make((5, 3), requires_grad=True, seed=2),)),
        "softmax": (lambda x: SF.softmax(x, -1), lambda: (make((3, 5), requires_grad=True, seed=3),)),
        "linear": (SF.linear, lambda: (make((3, 4), requires_grad=True, seed=4), make((2, 4), requires_grad=True,
                                                                                       seed=5))),
        "mse_loss": (SF.mse_loss, lambda: (make((6,), requires_grad=True, seed=6), make((6,), seed=7))),
        "cross_entropy": (SF.cross_entropy, ce_inputs),
        "conv2d": (SF.conv2d, lambda: (make((1, 2, 3, 3), requires_grad=True, seed=8),
                                       make((2, 2, 2, 2), requires_grad=True, seed=9))),
        "l2_penalty": (lambda a, b: SF.l2_penalty([a, b], 0.5), lambda: (make((4,), requires_grad=True, seed=10),
                                                                        make((2, 2), requires_grad=True, seed=11))),
    }


def _run(fn, maker):
    inputs = maker()
    y = fn(*inputs)
    grads = torch.autograd.grad(y.sum(), [t for t in inputs if t.requires_grad])
    return [y.detach(), *grads]


def _in_threads(target, n=THREADS):
    errors, barrier = [], threading.Barrier(n)

    def wrapped(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("name", sorted(_cases()))
def test_ops_from_threads_match_single_threaded(backend, name):
    fn, maker = _cases()[name]
    expected = _run(fn, maker)
    results = {}

    def work(i):
        with scratchops.use_backend(backend):  # use_backend is per thread: each thread asks for its own
            results[i] = [_run(fn, maker) for _ in range(ITERS)]

    _in_threads(work)
    for i in range(THREADS):
        for got in results[i]:
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_threads_on_different_backends_at_once():
    """Two threads on the reference backend and two on Triton, at the same time: each matches torch."""
    if backend_skip_reason("triton"):
        pytest.skip(backend_skip_reason("triton"))
    x, w = make((3, 4), seed=12), make((5, 4), seed=13)
    expected = F.linear(x, w)
    seen = {}

    def work(i):
        name = ("reference", "triton")[i % 2]
        with scratchops.use_backend(name):
            for _ in range(ITERS):
                assert scratchops.current_backend() == name
                torch.testing.assert_close(SF.linear(x, w), expected)
            seen[i] = scratchops.current_backend()

    _in_threads(work)
    assert seen == {0: "reference", 1: "triton", 2: "reference", 3: "triton"}


def test_use_backend_does_not_leak_across_threads():
    outer = scratchops.current_backend()
    inside, outside = threading.Event(), threading.Event()
    observed = {}

    def holder():
        with scratchops.use_backend("reference"):
            observed["holder"] = scratchops.current_backend()
            inside.set()
            assert outside.wait(30)

    def observer():
        assert inside.wait(30)
        observed["observer"] = scratchops.current_backend()
        outside.set()

    threads = [threading.Thread(target=holder), threading.Thread(target=observer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert observed == {"holder": "reference", "observer": outer}
    assert scratchops.current_backend() == outer


def test_interleaved_exits_pop_only_their_own_entry():
    """A enters, B enters, A exits, B checks, B exits: each thread sees only its own stack."""
    step = [threading.Event() for _ in range(4)]
    observed = {}

    def a():
        with scratchops.use_backend("reference"):
            step[0].set()
            assert step[1].wait(30)  # B is inside its own use_backend("triton")
            observed["a_inside"] = scratchops.current_backend()
        observed["a_after"] = scratchops.current_backend()
        step[2].set()

    def b():
        assert step[0].wait(30)
        with scratchops.use_backend("triton"):
            step[1].set()
            assert step[2].wait(30)  # A has exited
            observed["b_inside"] = scratchops.current_backend()
        observed["b_after"] = scratchops.current_backend()

    outer = scratchops.current_backend()
    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert observed == {"a_inside": "reference", "a_after": outer, "b_inside": "triton", "b_after": outer}


def test_main_thread_request_is_not_inherited():
    """A new thread starts from the environment's default, not from the creating thread's use_backend."""
    outer = scratchops.current_backend()
    seen = []
    with scratchops.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(scratchops.current_backend()))
        t.start()
        t.join(30)
        assert scratchops.current_backend() == "reference"
    assert seen == [outer] and scratchops.current_backend() == outer
