"""Shared test helpers: an op's test file states its cases; these do the checking.

* ``make(shape, dtype)``: a random tensor on the test device.
* ``check_gradcheck(fn, *inputs, ops=...)``: float64 gradcheck, and proof the
  backend ops named in ``ops`` ran on the active backend.
* ``check_parity(ours, theirs, *inputs)``: forward values and the gradients of
  every floating input against torch, with one shared random grad_output.
* ``check_same_error(ours, theirs, *args)``: the same exception type as torch.
* ``check_compile_fullgraph(model, shape)``: torch.compile(fullgraph=True) gives eager's values and gradients.
* ``check_aot(module)``: every kernel config of a family compiles for sm_90 with no spills.
* ``import_timm()``: timm (random-init models, nothing downloaded), or a skip that says why not.
"""
import contextlib
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("reference", "triton")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Parity dtypes: bfloat16 only on a GPU (the interpreter does not do bfloat16).
PARITY_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def backend_skip_reason(backend: str):
    """Why ``backend`` cannot run here (None when it can)."""
    if backend == "reference":
        return None
    from scratchops._backend import triton_unavailable_reason

    return triton_unavailable_reason(torch.device(DEVICE), torch.float32)


def make(shape, dtype=torch.float32, *, low=None, high=None, requires_grad=False, seed=None):
    """A random tensor on the test device: standard normal, or uniform in [low, high)."""
    g = torch.Generator().manual_seed(seed if seed is not None else hash(tuple(shape)) % 2**31)
    if low is not None:
        t = torch.rand(shape, generator=g, dtype=torch.float64) * (high - low) + low
    else:
        t = torch.randn(shape, generator=g, dtype=torch.float64)
    return t.to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


@contextlib.contextmanager
def expect_ops(ops, backend=None):
    """Assert every backend op in ``ops`` ran at least once on ``backend`` (the active one by default)."""
    from scratchops._backend import LAUNCHES, requested_backend

    backend = backend or requested_backend()
    before = {op: LAUNCHES[op, backend] for op in ops}
    yield
    missing = [op for op in ops if LAUNCHES[op, backend] == before[op]]
    assert not missing, f"backend ops {missing} did not run on backend {backend!r}"


def tolerances(dtype, reduction_size=1):
    """assert_close tolerances for ``dtype``, widened by sqrt of the length of any reduction.

    Half types allow 2 ulp: torch's CPU kernels compute some half-precision
    backwards in half arithmetic (1 ulp off the exact result) while scratchops
    rounds once from fp32, so the two may sit an ulp apart on either side.
    """
    dtype = dtype.to_real()
    rtol, atol = {torch.float16: (2e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5),
                  torch.float32: (1.3e-6, 1e-5), torch.float64: (1e-7, 1e-7)}[dtype]
    scale = max(1.0, reduction_size ** 0.5)
    return {"rtol": rtol * scale, "atol": atol * scale}


def check_gradcheck(fn, *inputs, ops=(), **gradcheck_kwargs):
    """gradcheck ``fn`` at float64 ``inputs`` (those requiring grad are checked); ``ops`` must have run."""
    with expect_ops(ops):
        assert torch.autograd.gradcheck(fn, inputs, **gradcheck_kwargs)


def _leaf_like(x: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``x`` with the same sizes and strides (gaps included: a sliced view stays
    strided), so the op under test sees the caller's layout. Overlapping (expanded) tensors cannot
    be written, so they become contiguous: test those by expanding inside the function under test.
    """
    overlapping = any(st == 0 and sz > 1 for sz, st in zip(x.shape, x.stride()))
    if overlapping:
        return x.detach().clone(memory_format=torch.contiguous_format)
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x.detach())


def _leaves(inputs):
    """Copies of the inputs in their layouts; floating tensors get requires_grad."""
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            x = _leaf_like(x).requires_grad_(x.is_floating_point() or x.is_complex())
        out.append(x)
    return out


def _grad_like(out):
    g = torch.Generator().manual_seed(0)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=out.device, dtype=out.dtype)


def check_parity(ours, theirs, *inputs, grad=True, grad_output=None, reduction_size=1, equal_nan=False, **kwargs):
    """``ours(*inputs, **kwargs)`` matches ``theirs`` in value, dtype and shape, and (``grad``) in every input gradient.

    ``grad_output`` defaults to one random tensor shared by both sides; pass an
    expanded tensor to test zero-stride gradients.
    """
    a_in, b_in = _leaves(inputs), _leaves(inputs)
    a, b = ours(*a_in, **kwargs), theirs(*b_in, **kwargs)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    exact = not (b.is_floating_point() or b.is_complex())
    tol = {"rtol": 0, "atol": 0} if exact else tolerances(b.dtype, reduction_size)
    torch.testing.assert_close(a, b, equal_nan=equal_nan, **tol)
    if not grad or not b.requires_grad:
        return a
    g = _grad_like(b) if grad_output is None else grad_output
    a.backward(g)
    b.backward(g)
    for x, y in zip(a_in, b_in):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            assert x.grad is not None, "scratchops gave no gradient where torch gives one"
            torch.testing.assert_close(x.grad, y.grad, equal_nan=equal_nan, **tolerances(y.grad.dtype, reduction_size))
    return a


def check_same_error(ours, theirs, *args, match=None, **kwargs):
    """``ours`` raises the exception type ``theirs`` raises (and ``match``, a regex, when given).

    Tensor arguments are compared before and after: a rejected call writes nothing.
    """
    with pytest.raises(Exception) as torch_error:
        theirs(*copy.deepcopy(args), **kwargs)
    before = [a.clone() if isinstance(a, torch.Tensor) else None for a in args]
    with pytest.raises(torch_error.type, match=match):
        ours(*args, **kwargs)
    for a, b in zip(args, before):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def check_compile_fullgraph(model, shape, compiler="aot_eager"):
    """``torch.compile(model, fullgraph=True, backend=compiler)`` at a random input of ``shape`` gives eager's
    output and input gradient (sum backward)."""
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    x1, x2 = make(shape, requires_grad=True), make(shape, requires_grad=True)
    y1, y2 = compiled(x1), model(x2)
    torch.testing.assert_close(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def _aot_rows(module: str) -> list[dict]:
    """The JSON rows of ``python -m tests.aot <module>``, computed once per checkout state.

    The contract test and a family's own AOT test read the same compiles: the rows are kept in the
    checkout's ``.aot-cache/`` (git-ignored), keyed by the kernels' and tests/aot.py's source and the
    Triton version, so a fresh clone computes them and no edit can be answered by stale rows.
    """
    import hashlib

    import triton

    digest = hashlib.sha256(f"{module} {triton.__version__}".encode())
    kernels = os.path.join(REPO, "triton_kernels")
    for name in sorted(os.listdir(kernels)) + ["../scratchops/_common.py", "../tests/aot.py"]:
        if name.endswith(".py"):
            with open(os.path.join(kernels, name), "rb") as f:
                digest.update(name.encode() + f.read())
    path = os.path.join(REPO, ".aot-cache", digest.hexdigest() + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.aot", module], cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + f".{os.getpid()}", "w") as f:
        json.dump(rows, f)
    os.replace(path + f".{os.getpid()}", path)
    return rows


def check_aot(module: str):
    """Compile every config in ``<module>.aot_configs()`` for sm_90; assert no spills; return the report rows."""
    pytest.importorskip("triton")
    rows = _aot_rows(module)
    assert rows, f"{module} lists no aot_configs()"
    print(f"\nsm_90 resource usage for {module}:")
    for r in rows:
        print(f"  {r['kernel']:32s} {','.join(r['dtypes']):18s} {r['constexprs']} warps={r['num_warps']} "
              f"regs={r['registers']} stack={r['stack']} local={r['local']} shared={r['shared']}")
    spilled = [r for r in rows if r["stack"] or r["local"]]
    assert not spilled, f"kernels spill to local memory: {spilled}"
    return rows


def check_sass(rows, *, vector128=(), hgmma=(), utmaldg=()):
    """From ``check_aot``'s rows (compiled as launched): every row of a kernel named in ``vector128`` makes
    128-bit global accesses, in ``hgmma`` uses wgmma (HGMMA), in ``utmaldg`` loads through TMA (UTMALDG).

    Pass the rows the claim is about (e.g. only 16-bit/tf32 rows for ``hgmma``: fp32 ieee and fp64 GEMMs have none).
    """
    failures = []
    for r in rows:
        for field, names in (("vector128", vector128), ("hgmma", hgmma), ("utmaldg", utmaldg)):
            if r["kernel"] in names and not r[field]:
                failures.append(f"{r['kernel']} {','.join(r['dtypes'])} {r['constexprs']}: no {field} "
                                f"(ldg={r['ldg']} stg={r['stg']} hgmma={r['hgmma']} utmaldg={r['utmaldg']})")
    assert not failures, "\n".join(failures)


# The operators torchvision's Python side registers fake kernels for at import (torchvision/_meta_registrations.py)
TORCHVISION_OPS = ("nms", "qnms", "roi_align", "_roi_align_backward", "qroi_align", "ps_roi_align",
                   "_ps_roi_align_backward", "roi_pool", "_roi_pool_backward", "ps_roi_pool", "_ps_roi_pool_backward",
                   "deform_conv2d", "_deform_conv2d_backward")
_TORCHVISION_SHIM = []


def import_timm():
    """timm, or ``pytest.skip`` with the reason; offline (models are random-init: nothing is downloaded).

    timm imports torchvision. PyPI's torchvision wheels are CUDA builds: next to a CPU torch their C++ library
    does not load, and ``import torchvision`` then fails registering fake kernels for its absent operators
    (``operator torchvision::nms does not exist``). Only in exactly that case, the operator names are declared
    without any kernel (calling one raises; no model here calls one) and the import is retried: timm needs
    torchvision's Python side only. torch itself is never changed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import timm
        return timm
    except ImportError as e:
        pytest.skip(f"timm is not installed ({e}); `make setup` installs it (pinned, --no-deps)")
    except RuntimeError as e:
        if "torchvision::" not in str(e) or _TORCHVISION_SHIM:
            pytest.skip(f"timm does not import next to this torch: {e}")
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
        del sys.modules[name]  # the half-imported packages
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in TORCHVISION_OPS:
        lib.define(f"{op}(Tensor[] args) -> Tensor")
    _TORCHVISION_SHIM.append(lib)  # the definitions live as long as the library object
    import timm
    return timm


def check_legacy_reduction(ours, theirs, *inputs):
    """A loss's deprecated ``size_average`` / ``reduce`` flags: torch's warning and torch's result for each pair."""
    for size_average, reduce in [(None, False), (False, None), (True, True), (False, True)]:
        results = []
        for loss in (ours, theirs):
            with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
                results.append(loss(*inputs, size_average=size_average, reduce=reduce))
        torch.testing.assert_close(*results)
