"""Test session set-up: where no GPU is found, Triton runs in interpreter mode on CPU tensors.

This must happen before anything imports triton, which is why it lives here.
"""
import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 keeps its default

import torch  # noqa: E402  (torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers import BACKENDS, DEVICE, backend_skip_reason  # noqa: E402

try:  # hypothesis profiles for tests/test_fuzz.py: "ci" (the default) or --hypothesis-profile=long
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, max_examples=15, deadline=None, database=None,
                                          print_blob=True)
    _hypothesis_settings.register_profile("long", max_examples=1000, deadline=None, print_blob=True)
    _hypothesis_settings.load_profile("ci")
except ImportError:  # a dev extra; test_fuzz.py skips without it
    pass


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test once per backend ("reference", "triton"), inside ``use_backend``."""
    import scratchops

    reason = backend_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    with scratchops.use_backend(request.param):
        yield request.param


@pytest.fixture
def one_thread():
    """Tiny problems: one intra-op thread each (several threads on a shared 2-core machine mostly spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cuda":
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_sessionfinish(session):
    """Under pytest-xdist, each worker hands its backend-op counts to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        from scratchops._backend import LAUNCHES

        workeroutput["scratchops_launches"] = [[op, backend, n] for (op, backend), n in LAUNCHES.items()]


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent without pytest-xdist
def pytest_testnodedown(node, error):
    from scratchops._backend import LAUNCHES

    for op, backend, n in getattr(node, "workeroutput", {}).get("scratchops_launches", []):
        LAUNCHES[op, backend] += n


def pytest_terminal_summary(terminalreporter):
    """Print how often each backend op ran: the proof that the Triton kernels (not just the reference) ran."""
    from scratchops._backend import LAUNCHES

    if not LAUNCHES:
        return
    mode = "interpreter, CPU tensors" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled, CUDA tensors"
    terminalreporter.section(f"scratchops backend op calls (triton: {mode})")
    for op in sorted({op for op, _ in LAUNCHES}):
        terminalreporter.write_line(f"{op:28s} triton={LAUNCHES[op, 'triton']:6d}  reference={LAUNCHES[op, 'reference']:6d}")
