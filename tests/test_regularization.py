"""dropout, l2_penalty, nn.Dropout, nn.L2Penalty: every test tier of DESIGN.md, on both backends.

Dropout's mask is random, so its tests check laws rather than torch's values:
binomial statistics of the zeroed fraction, exact scaling of the survivors, the
same mask in backward, reproducibility under ``torch.manual_seed``, and
``dropout(x) == x * dropout(ones)`` under one seed (values, NaN, -0 and layouts).
Where the result is deterministic (p = 0, p = 1, eval) it is compared with torch.
"""
import math

import pytest
import torch
import torch.nn.functional as TF
import torch.utils.checkpoint

import scratchops
import scratchops.functional as SF
import scratchops.nn as SN
from scratchops._backend import LAUNCHES
from tests.helpers import (DEVICE, backend_skip_reason, check_aot, check_gradcheck, check_parity, check_same_error,
                           check_sass, expect_ops, make, tolerances)

BLOCK = 2048  # the BLOCK of triton_kernels.regularization._dropout: sizes around it exercise the masks
L2_BLOCK = 4096  # triton_kernels.regularization.L2_BLOCK
SIGMAS = 5  # statistical bounds: a correct implementation fails one with probability < 1e-6


def _seeded(fn, seed=0):
    """``fn`` run with the global RNG set to ``seed`` and restored afterwards: a fixed mask, callable many times."""
    devices = [torch.device(DEVICE)] if DEVICE == "cuda" else []

    def run(*args, **kwargs):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return fn(*args, **kwargs)
    return run


def _rng_state():
    """The generator states a dropout draw could advance (CPU, and the GPU's when the tests run on one)."""
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if DEVICE == "cuda" else [])


def _same_rng(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _scale(p, dtype=torch.float32):
    """torch's 1/(1-p) for ``dtype``: fp32 noise divided by (1 - p) rounded to fp32."""
    one = torch.ones((), dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return one / (1 - p)


def _torch_formula(tensors, weight_decay):
    return weight_decay * sum(w.pow(2).sum() for w in tensors)


# ----------------------------------------------------------------- dropout: statistics and mask laws
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_statistics(backend, p):
    n = 3 * BLOCK + 5
    x = make((n,), low=1.0, high=2.0)
    y = SF.dropout(x, p)
    dropped = y == 0
    frac, bound = dropped.double().mean().item(), SIGMAS * math.sqrt(p * (1 - p) / n)
    torch_frac = (TF.dropout(x, p) == 0).double().mean().item()
    print(f"\np={p}: zeroed {frac:.4f} (scratchops), {torch_frac:.4f} (torch), bound ±{bound:.4f}")
    assert abs(frac - p) < bound, (frac, p, bound)
    kept = ~dropped
    torch.testing.assert_close(y[kept], x[kept] * _scale(p), rtol=0, atol=0)  # survivors scaled exactly
    # E[y] = E[x]; Var[y_i] = x_i² p / (1 - p)
    mean_bound = SIGMAS * math.sqrt((x.double() ** 2).sum().item() * p / (1 - p)) / n
    assert abs(y.double().mean().item() - x.double().mean().item()) < mean_bound


def test_dropout_mask_not_correlated_across_quarters(backend):
    # The four Philox words of one call go to four elements: check they are not the same mask shifted.
    y = SF.dropout(torch.ones(BLOCK, device=DEVICE), 0.5) == 0
    quarters = y.view(4, BLOCK // 4).double()
    agree = (quarters[0] == quarters[1]).double().mean().item()
    assert abs(agree - 0.5) < SIGMAS * math.sqrt(0.25 / (BLOCK // 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_dropout_same_mask_in_backward(backend, dtype):
    x = make((5, BLOCK // 8 + 3), dtype, requires_grad=True)
    y = SF.dropout(x, 0.3)
    g = make(y.shape, dtype, seed=1)
    y.backward(g)
    assert torch.equal(x.grad == 0, y == 0)  # no x or g is exactly 0 here
    kept, acc = y != 0, torch.float64 if dtype == torch.float64 else torch.float32
    expect = (g.to(acc) * _scale(0.3, dtype)).to(dtype)
    torch.testing.assert_close(x.grad[kept], expect[kept], rtol=0, atol=0)
    torch.testing.assert_close(y[kept], (x.detach().to(acc) * _scale(0.3, dtype)).to(dtype)[kept], rtol=0, atol=0)


def test_dropout_determinism(backend):
    x = make((BLOCK + 7,))
    torch.manual_seed(123)
    a, b = SF.dropout(x, 0.5), SF.dropout(x, 0.5)
    torch.manual_seed(123)
    c = SF.dropout(x, 0.5)
    assert torch.equal(a, c), "manual_seed must reproduce the mask"
    assert not torch.equal(a, b), "two calls must draw two masks"


@pytest.mark.parametrize("shape", [(1,), (BLOCK - 1,), (BLOCK + 1,), (3, 1, 7), (2, 3, 5, 7), ()])
def test_dropout_equals_x_times_dropped_ones(backend, shape):
    x = make(shape)
    flat = x.view(-1)
    if flat.numel() > 3:
        flat[::3] = float("nan")
        flat[1], flat[2] = float("inf"), -float("inf")
    m = _seeded(SF.dropout, 7)(torch.ones_like(x), 0.4)
    y = _seeded(SF.dropout, 7)(x, 0.4)
    torch.testing.assert_close(y, x * m, rtol=0, atol=0, equal_nan=True)
    # as torch's x * noise: dropped negatives are -0, dropped NaN and ±inf are NaN
    finite, dropped = torch.isfinite(x), m == 0
    assert torch.equal(torch.signbit(y[dropped & finite]), torch.signbit(x[dropped & finite]))
    assert torch.isnan(y[dropped & ~finite]).all()


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "expanded"])
def test_dropout_non_contiguous(backend, layout):
    base = make((4, 6, 5, 3), low=1.0, high=2.0)
    x = {"transposed": base.transpose(1, 3), "sliced": base[:, ::2, 1:, :],
         "channels_last": base.to(memory_format=torch.channels_last),
         "expanded": base[:1, :1].expand(4, 6, 5, 3)}[layout].requires_grad_()
    y = SF.dropout(x, 0.5)
    assert y.stride() == TF.dropout(x, 0.5).stride(), "output layout differs from torch's"
    kept = y != 0
    torch.testing.assert_close(y[kept], (x.detach() * _scale(0.5))[kept], rtol=0, atol=0)
    # gradients arriving expanded (zero strides) and transposed see the same mask
    y.backward(torch.ones((), device=DEVICE).expand(y.shape), retain_graph=True)
    grad = x.grad.clone() if layout != "expanded" else None
    if grad is not None:
        assert torch.equal(grad, kept.float() * _scale(0.5))
        x.grad = None
        g = make(tuple(reversed(y.shape)), seed=3).permute(3, 2, 1, 0)
        y.backward(g)
        assert torch.equal(x.grad, g * kept * _scale(0.5))


def test_dropout_p0_eval_empty_return_input(backend):
    x = make((9,), requires_grad=True)
    before, rng = dict(LAUNCHES), _rng_state()
    assert SF.dropout(x, 0.0) is x and TF.dropout(x, 0.0) is x
    assert SF.dropout(x, 0.7, training=False) is x
    assert SF.dropout(x, 0.0, inplace=True) is x  # p = 0 in place on a leaf is allowed by torch too
    empty = make((0, 3), requires_grad=True)
    assert SF.dropout(empty, 0.5) is empty
    assert dict(LAUNCHES) == before, "p = 0, eval and empty inputs must launch nothing"
    assert _same_rng(_rng_state(), rng), "and draw nothing"


def test_dropout_p1(backend):
    x = torch.tensor([1.5, -2.0, 0.0, -0.0, float("nan"), float("inf"), -float("inf")], device=DEVICE)
    rng = _rng_state()
    check_parity(lambda t: SF.dropout(t, 1.0), lambda t: TF.dropout(t, 1.0), x, equal_nan=True)
    out = SF.dropout(x, 1.0)
    assert torch.equal(torch.signbit(out), torch.signbit(TF.dropout(x, 1.0)))
    assert _same_rng(_rng_state(), rng), "p = 1 draws nothing, as torch"
    w = make((BLOCK + 3,), requires_grad=True)
    SF.dropout(w, 1.0).sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_dropout_inplace(backend):
    leaf = make((BLOCK + 3,), low=1.0, high=2.0, requires_grad=True)
    x = leaf * 1.0
    version = x._version
    y = SF.dropout(x, 0.25, inplace=True)
    assert y is x and x._version > version
    kept = y != 0
    torch.testing.assert_close(y[kept], (leaf.detach() * _scale(0.25))[kept], rtol=0, atol=0)
    y.backward(torch.ones_like(y))
    assert torch.equal(leaf.grad, kept.float() * _scale(0.25))
    inplace = (lambda t, p: SF.dropout(t, p, inplace=True)), (lambda t, p: TF.dropout(t, p, inplace=True))
    for p in (0.5, 1.0):
        check_same_error(*inplace, make((4,), requires_grad=True), p, match="leaf Variable")
        check_same_error(*inplace, make((4, 2), requires_grad=True)[1:], p, match="view of a leaf Variable")


def test_dropout_inplace_without_grad_returns_input(backend):
    """Under no_grad (even for a leaf requiring grad) torch returns the input object itself, written in place."""
    for x in (make((5,), low=1.0, high=2.0, requires_grad=True), make((5,), low=1.0, high=2.0)):
        before = x.detach().clone()
        with torch.no_grad():
            y = SF.dropout(x, 0.5, inplace=True)
        assert y is x and y.requires_grad == x.requires_grad
        assert torch.equal(x.detach(), torch.where(x.detach() != 0, 2 * before, 0.0))  # kept ones scaled by 1/(1-p)


def test_dropout_inplace_non_contiguous(backend):
    base = make((6, 8), low=1.0, high=2.0)
    keep = base.clone()
    view = base[:, ::3]
    out = _seeded(SF.dropout, 3)(view, 0.5, inplace=True)
    assert out.data_ptr() == base[:, ::3].data_ptr()
    expect = keep[:, ::3] * _seeded(SF.dropout, 3)(torch.ones_like(keep[:, ::3]), 0.5)
    torch.testing.assert_close(base[:, ::3], expect, rtol=0, atol=0)
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched[:, ::3] = False
    assert torch.equal(base[untouched], keep[untouched])


def test_dropout_saves_no_mask(backend):
    def saved_bytes(fn, x):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        return sum(seen.values())

    x = make((64, 64), requires_grad=True)
    ours, theirs = saved_bytes(lambda t: SF.dropout(t, 0.5), x), saved_bytes(lambda t: TF.dropout(t, 0.5), x)
    print(f"\nbytes saved for backward, {x.numel()} fp32 elements: scratchops {ours}, torch {theirs}")
    assert ours <= 8, "only the 8-byte seed may be saved"
    assert theirs >= x.numel(), "torch keeps a mask (the yardstick)"


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_dropout_under_checkpoint(backend, use_reentrant):
    w = make((16, 16), requires_grad=True)
    x = make((8, 16), seed=2, requires_grad=True)

    def block(t):
        return SF.dropout(torch.tanh(t @ w), 0.5) @ w

    def grads(checkpointed):
        w.grad = x.grad = None
        torch.manual_seed(11)
        out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=use_reentrant) if checkpointed else block(x)
        out.pow(2).sum().backward()
        return out.detach(), w.grad.clone(), x.grad.clone()

    plain, ckpt = grads(False), grads(True)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dropout_gradcheck(backend):
    x = make((3, 4), torch.float64, requires_grad=True)
    check_gradcheck(_seeded(lambda t: SF.dropout(t, 0.4)), x, ops=["dropout_fwd", "dropout_bwd"])
    check_gradcheck(lambda t: SF.dropout(t, 1.0), x, ops=["dropout_fwd", "dropout_bwd"])
    check_gradcheck(_seeded(lambda t: SF.dropout(t * 1.0, 0.4, inplace=True)), x,
                    ops=["dropout_fwd_", "dropout_bwd"])


def test_dropout_bad_inputs(backend):
    x = make((4,))
    for p in (-0.1, 1.5):
        check_same_error(SF.dropout, TF.dropout, x, p, match="dropout probability has to be between 0 and 1")
    check_same_error(SF.dropout, TF.dropout, x, float("nan"), match="dropout probability")
    check_same_error(SF.dropout, TF.dropout, [1.0, 2.0], 0.5, match="must be Tensor")
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
        ints = torch.tensor([0, 1, 2, 3], device=DEVICE).to(dtype)
        check_same_error(SF.dropout, TF.dropout, ints, 0.5, match="can't be cast")
        check_parity(lambda t: SF.dropout(t, 1.0), lambda t: TF.dropout(t, 1.0), ints, grad=False)
        same = ints.clone()
        assert SF.dropout(same, 1.0, inplace=True) is same and not same.any()
    if DEVICE == "cpu":  # torch's CUDA kernel raises the same type with another message
        check_same_error(SF.dropout, TF.dropout, torch.ones(3, dtype=torch.complex64), 0.5)


def test_dropout_complex_p1(backend):
    z = torch.tensor([1 + 2j, -3 - 0.5j], dtype=torch.complex128, device=DEVICE)
    if backend == "triton":
        with pytest.raises(RuntimeError, match="backend 'triton' was requested but cannot run"):
            SF.dropout(z, 1.0)
        with scratchops.use_backend("auto"):
            check_parity(lambda t: SF.dropout(t, 1.0), lambda t: TF.dropout(t, 1.0), z)
    else:
        check_parity(lambda t: SF.dropout(t, 1.0), lambda t: TF.dropout(t, 1.0), z)


# ----------------------------------------------------------------- l2_penalty
L2_SHAPES = [(), (0,), (1,), (L2_BLOCK - 1,), (L2_BLOCK + 1,), (3, 5, 7), (2, 0, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_l2_penalty_parity(backend, dtype):
    ws = [make(s, dtype, seed=i) for i, s in enumerate(L2_SHAPES)]
    n = sum(w.numel() for w in ws)
    check_parity(lambda *t: SF.l2_penalty(t, 0.01), lambda *t: _torch_formula(t, 0.01), *ws, reduction_size=n)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.float64, torch.float16),
                                    (torch.float16, torch.float16)])
def test_l2_penalty_mixed_dtypes(backend, dtypes):
    ws = [make((7, 3), d, seed=i, requires_grad=True) for i, d in enumerate(dtypes)]
    ws.append(make((5,), dtypes[0], seed=9, requires_grad=True))
    ours, theirs = SF.l2_penalty(ws, 0.5), _torch_formula(ws, 0.5)
    assert ours.dtype == theirs.dtype  # torch's promotion of the per-tensor sums
    # torch rounds each fp16 sum to fp16; ours accumulates in fp32: compare both with the exact value
    exact = _torch_formula([w.detach().double() for w in ws], 0.5)
    tol = tolerances(max(dtypes, key=lambda d: torch.finfo(d).eps), reduction_size=26)
    torch.testing.assert_close(ours.double(), exact, **tol)
    torch.testing.assert_close(theirs.double(), exact, **tol)
    for w, g in zip(ws, torch.autograd.grad(ours, ws)):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, (w.detach().double()).to(w.dtype), **tolerances(w.dtype))  # 2 · 0.5 · w


def test_l2_penalty_one_launch_per_dtype(monkeypatch):
    if backend_skip_reason("triton"):
        pytest.skip(backend_skip_reason("triton"))
    import scratchops._kernels.regularization as K

    launches = []

    def counting(kernel):
        def launch(grid, *args, **kwargs):
            launches.append((kernel.fn.__name__, grid))
            return kernel(grid, *args, **kwargs)
        return launch

    for name in ("_l2_sum", "_l2_scale"):
        monkeypatch.setattr(K, name, counting(getattr(K, name)))
    ws = [make((i + 1, 3), seed=i, requires_grad=True) for i in range(12)] + [make((L2_BLOCK + 9,), torch.float64)]
    with scratchops.use_backend("triton"):
        pen = SF.l2_penalty(ws, 0.1)
    assert len(launches) == 2, launches  # forward: one per dtype (fp32: 12 tensors, fp64: 1)
    pen.backward()
    assert len(launches) == 3, launches  # backward: the fp32 group only (the fp64 tensor needs no grad)


def test_l2_penalty_gradcheck(backend):
    ws = [make((3, 4), torch.float64, requires_grad=True, seed=1), make((), torch.float64, requires_grad=True),
          make((2, 5), torch.float64, seed=3).t().requires_grad_(), make((0, 2), torch.float64, requires_grad=True),
          make((6,), torch.float64, seed=4)]  # the last one needs no gradient
    check_gradcheck(lambda *t: SF.l2_penalty(t, 0.3), *ws, ops=["l2_penalty_fwd", "l2_penalty_bwd"])


def test_l2_penalty_non_dense_and_layouts(backend):
    base = make((6, 8), seed=5, requires_grad=True)
    tied = make((4, 3), seed=6, requires_grad=True)
    parts = lambda: [base[:, ::3], base.t(), tied, tied, base[:1].expand(5, 8)]  # noqa: E731
    pen = SF.l2_penalty(parts(), 2.0)
    ref = _torch_formula(parts(), 2.0)
    torch.testing.assert_close(pen, ref)
    ours = torch.autograd.grad(pen, [base, tied])
    theirs = torch.autograd.grad(ref, [base, tied])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    cl = make((2, 3, 4, 5), seed=7).to(memory_format=torch.channels_last).requires_grad_()
    SF.l2_penalty([cl], 0.5).backward()
    assert cl.grad.stride() == cl.stride()
    torch.testing.assert_close(cl.grad, cl.detach())


def test_l2_penalty_special_values(backend):
    w = torch.tensor([1.0, float("inf")], device=DEVICE)
    check_parity(lambda t: SF.l2_penalty([t]), lambda t: _torch_formula([t], 1.0), w, grad=False)
    w = torch.tensor([1.0, float("nan")], device=DEVICE)
    assert torch.isnan(SF.l2_penalty([w]))


def test_l2_penalty_inputs(backend):
    w = make((3,))
    torch.testing.assert_close(SF.l2_penalty(w, 2.0), _torch_formula([w], 2.0))  # one tensor is one tensor
    torch.testing.assert_close(SF.l2_penalty((t for t in [w, w])), _torch_formula([w, w], 1.0))  # generators
    assert SF.l2_penalty([], 0.5) == 0
    for bad in (3, None, [w, 1.0], [w, "a"]):
        with pytest.raises(TypeError, match="l2_penalty"):
            SF.l2_penalty(bad)
    with pytest.raises(TypeError, match="floating point"):
        SF.l2_penalty([torch.arange(3, device=DEVICE)])
    with pytest.raises(TypeError, match="weight_decay"):
        SF.l2_penalty([w], "0.1")


# ----------------------------------------------------------------- inference tensors (issue 16, items 3 and 7)
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_dropout_inplace_inference_tensor_writes_nothing(backend, p):
    with torch.inference_mode():
        x = make((BLOCK + 3,), low=1.0, high=2.0)
    before, launches = x.clone(), dict(LAUNCHES)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        SF.dropout(x, p, inplace=True)
    assert torch.equal(x, before), "raised after writing"
    assert dict(LAUNCHES) == launches, "a kernel ran before the error"
    with torch.inference_mode():  # inside inference mode the write is allowed, as torch's
        assert SF.dropout(x, p, inplace=True) is x and (x == 0).any()


def test_l2_penalty_inference_tensor_needing_no_grad(backend):
    with torch.inference_mode():
        frozen = make((3, 4), seed=2)
    w = make((5,), requires_grad=True)
    pen = SF.l2_penalty([w, frozen], 0.1)
    torch.testing.assert_close(pen, _torch_formula([w, frozen], 0.1))
    pen.backward()
    torch.testing.assert_close(w.grad, 0.2 * w.detach())
    torch.testing.assert_close(SF.l2_penalty([frozen], 0.1), _torch_formula([frozen], 0.1))


# ----------------------------------------------------------------- second derivatives (issue 13)
def test_dropout_gradgradcheck(backend):
    x = make((3, 5), torch.float64, requires_grad=True)
    for fn in (_seeded(lambda t: SF.dropout(t, 0.4)), _seeded(lambda t: SF.dropout(t.t(), 0.4)),
               _seeded(lambda t: SF.dropout(t * 1.0, 0.4, inplace=True)), lambda t: SF.dropout(t, 1.0)):
        with expect_ops(["dropout_bwd"]):
            assert torch.autograd.gradgradcheck(fn, (x,))


def test_dropout_create_graph(backend):
    """The gradient built with create_graph is a function of the incoming gradient: D dy, differentiable again."""
    x = make((BLOCK + 5,), torch.float64, requires_grad=True)
    dy = make(x.shape, torch.float64, seed=1, requires_grad=True)
    y = _seeded(SF.dropout, 4)(x, 0.3)
    (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    assert dx.grad_fn is not None, "a gradient without a graph under create_graph=True"
    kept = y != 0
    v = make(x.shape, torch.float64, seed=2)
    before = LAUNCHES["dropout_bwd", backend]
    (ddy,) = torch.autograd.grad(dx, dy, v, create_graph=True)
    assert LAUNCHES["dropout_bwd", backend] > before, "the second derivative did not run the dropout kernel"
    torch.testing.assert_close(ddy, torch.where(kept, v / 0.7, 0.0), rtol=1e-15, atol=0)


L2_GRADGRAD = [((3, 4), True), ((), True), ((2, 5), "t"), ((0, 2), True), ((6,), False)]


def _l2_inputs():
    out = []
    for i, (shape, grad) in enumerate(L2_GRADGRAD):
        w = make(shape, torch.float64, seed=i)
        if grad == "t":
            w = make(shape[::-1], torch.float64, seed=i).t()
        out.append(w.requires_grad_(bool(grad)))
    return out


def test_l2_penalty_gradgradcheck(backend):
    ws = _l2_inputs()
    with expect_ops(["l2_penalty_bwd", "l2_penalty_dot"]):
        assert torch.autograd.gradgradcheck(lambda *t: SF.l2_penalty(t, 0.3), ws)
    tied = ws[0]
    assert torch.autograd.gradgradcheck(lambda a, b: SF.l2_penalty([a, b, a], 0.3), (tied, ws[2]))


def test_l2_penalty_second_derivatives_match_torch(backend):
    ours, theirs = _l2_inputs(), _l2_inputs()
    needs = [w for w in ours if w.requires_grad], [w for w in theirs if w.requires_grad]
    pen_a, pen_b = SF.l2_penalty(ours, 0.3), _torch_formula(theirs, 0.3)
    ga = torch.autograd.grad(pen_a * pen_a, needs[0], create_graph=True)  # g = 2P depends on w: both terms
    gb = torch.autograd.grad(pen_b * pen_b, needs[1], create_graph=True)
    assert all(g.grad_fn is not None for g in ga), "a gradient without a graph under create_graph=True"
    vs = [make(g.shape, torch.float64, seed=30 + i) for i, g in enumerate(ga)]
    hv_a = torch.autograd.grad(sum((g * v).sum() for g, v in zip(ga, vs)), needs[0], create_graph=True)
    hv_b = torch.autograd.grad(sum((g * v).sum() for g, v in zip(gb, vs)), needs[1])
    for a, b in zip(hv_a, hv_b):
        torch.testing.assert_close(a, b)
    assert all(h.grad_fn is not None for h in hv_a)


# ----------------------------------------------------------------- torch.func (issue 13)
def test_l2_penalty_torch_func(backend):
    w, v = make((3, 4), torch.float64, seed=1), make((5,), torch.float64, seed=2)
    ours, theirs = (lambda a, b: SF.l2_penalty([a, b], 0.3)), (lambda a, b: _torch_formula([a, b], 0.3))
    for transform in (lambda f: torch.func.grad(f, argnums=(0, 1)), lambda f: torch.func.jacrev(f, argnums=(0, 1))):
        for a, b in zip(transform(ours)(w, v), transform(theirs)(w, v)):
            torch.testing.assert_close(a, b)
    hessian = torch.func.jacrev(torch.func.jacrev(lambda a: SF.l2_penalty([a, v], 0.3)))(w)
    torch.testing.assert_close(hessian, torch.func.hessian(lambda a: _torch_formula([a, v], 0.3))(w))
    batch = make((6, 3, 4), torch.float64, seed=3)
    torch.testing.assert_close(torch.func.vmap(lambda a: SF.l2_penalty([a, v], 0.3))(batch),
                               torch.func.vmap(lambda a: _torch_formula([a, v], 0.3))(batch))


def test_dropout_torch_func(backend):
    x = make((4, 6), torch.float64, low=1.0, high=2.0)
    with pytest.raises(RuntimeError, match="randomness"):  # as torch's dropout under vmap's default
        torch.func.vmap(lambda a: SF.dropout(a, 0.5))(x)
    check_same_error(lambda t: torch.func.vmap(lambda a: SF.dropout(a, 0.5))(t),
                     lambda t: torch.func.vmap(lambda a: TF.dropout(a, 0.5))(t), x)
    same = _seeded(torch.func.vmap(lambda a: SF.dropout(a, 0.5), randomness="same"))(x)
    assert torch.equal(same == 0, (same == 0)[:1].expand_as(same)), "randomness='same': one mask"
    different = _seeded(torch.func.vmap(lambda a: SF.dropout(a, 0.5), randomness="different"))(x)
    assert not torch.equal(different == 0, (different == 0)[:1].expand_as(different))
    kept = different != 0
    torch.testing.assert_close(different[kept], (x * 2)[kept], rtol=0, atol=0)
    v = x[0]
    jacobian = _seeded(torch.func.jacrev(lambda a: SF.dropout(a, 0.5)))(v)
    y = _seeded(SF.dropout)(v, 0.5)
    torch.testing.assert_close(jacobian, torch.diag(y / v), rtol=0, atol=0)


# ----------------------------------------------------------------- threads (issue 16, item 9)
def test_l2_penalty_and_sgd_in_two_threads(backend):
    """Interpreted launches from two threads at once used to crash the process (the interpreter patches module
    state): every launch of these families goes through the one launch policy, which serialises them."""
    import threading

    import scratchops.optim

    errors = []

    def guarded(fn):
        def run():
            try:
                with scratchops.use_backend(backend):
                    fn()
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
        return run

    def penalties():
        for i in range(30):
            w = make((L2_BLOCK + 3,), seed=i, requires_grad=True)
            SF.l2_penalty([w, w[:7]], 0.5).backward()
            torch.testing.assert_close(w.grad[7:], w.detach()[7:])

    def steps():
        p = make((L2_BLOCK + 3,), seed=99, requires_grad=True)
        q = p.detach().clone().requires_grad_()
        ours = scratchops.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
        theirs = torch.optim.SGD([q], lr=0.1, momentum=0.9, weight_decay=0.01)
        for i in range(30):
            p.grad, q.grad = make(p.shape, seed=i), make(p.shape, seed=i)
            ours.step()
            theirs.step()
        torch.testing.assert_close(p, q, **tolerances(torch.float32, 30))

    threads = [threading.Thread(target=guarded(fn)) for fn in (penalties, steps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# ----------------------------------------------------------------- modules, training
def test_dropout_module(backend):
    mine, ref = SN.Dropout(0.3), torch.nn.Dropout(0.3)
    assert isinstance(mine, torch.nn.Dropout) and repr(mine) == repr(ref)
    mine.load_state_dict(ref.state_dict())
    assert mine.state_dict().keys() == ref.state_dict().keys()
    x = make((3, 50))
    assert mine.eval()(x) is x
    y = mine.train()(x)
    assert (y == 0).any() and y.shape == x.shape


def test_l2_penalty_module(backend):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(DEVICE)
    pen = SN.L2Penalty(0.05)
    assert "weight_decay=0.05" in repr(pen)
    out = pen(model.parameters())
    torch.testing.assert_close(out, _torch_formula(model.parameters(), 0.05))
    out.backward()
    for w in model.parameters():
        torch.testing.assert_close(w.grad, 0.1 * w.detach())


def _train(modules, optim, l2, dropout_p, steps=10):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), modules.Dropout(dropout_p),
                                torch.nn.Linear(16, 1)).to(DEVICE)
    opt = optim(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    x, y = make((32, 6), seed=1), make((32, 1), seed=2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean() + l2(model.parameters())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_model_trains_like_torch(backend):
    import scratchops.optim

    ours = lambda p: _train(SN, scratchops.optim.SGD, SN.L2Penalty(1e-2), p)  # noqa: E731
    theirs = lambda p: _train(torch.nn, torch.optim.SGD, lambda ps: _torch_formula(ps, 1e-2), p)  # noqa: E731
    torch.testing.assert_close(ours(0.0), theirs(0.0), rtol=1e-5, atol=1e-6)  # dropout off: the same curve
    with_dropout, reference = ours(0.2), theirs(0.2)
    assert with_dropout[-1] < with_dropout[0] and with_dropout[-1] < 2 * reference[-1] + 0.05


# ----------------------------------------------------------------- compile, opcheck, AOT
def test_torch_compile_fullgraph(backend):
    def f(x, w):
        h = SF.dropout(SF.dropout(x, 0.3) * 1.5, 0.2, inplace=True)  # both autograd.Functions in one graph
        return (h @ w).sum() + SF.l2_penalty([w, x], 0.1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for x0 in (make((4, 33)), make((33, 4)).t()):  # the transposed input: the layout logic traces too
        x1, w1 = x0.detach().clone().requires_grad_(), make((33, 5), seed=1, requires_grad=True)
        x2, w2 = x0.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()
        torch.manual_seed(5)
        a = compiled(x1, w1)
        torch.manual_seed(5)
        b = f(x2, w2)
        torch.testing.assert_close(a, b)
        a.backward()
        b.backward()
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(w1.grad, w2.grad)


def test_opcheck(backend):
    """What test_contract's opcheck does not reach: in place, a transposed layout, mixed dtypes, the dot product."""
    from scratchops import regularization as R

    x, seed = make((5, 6)), torch.tensor(1234, dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(R.dropout_fwd__op.custom, (backend, make((5, 6)), seed, 0.5, [6, 1]))
    torch.library.opcheck(R.dropout_bwd_op.custom, (backend, x, seed, 0.5, [1, 5]))
    ws = [make((3, 4)), make((5,), torch.float64), make(())]
    torch.library.opcheck(R.l2_penalty_fwd_op.custom, (backend, ws, 0.5, torch.float64))
    torch.library.opcheck(R.l2_penalty_bwd_op.custom, (backend, ws, torch.tensor(1.5, device=DEVICE), 0.5))
    vs = [make((3, 4), seed=1), make((5,), torch.float64, seed=2), make((), seed=3)]
    torch.library.opcheck(R.l2_penalty_dot_op.custom, (backend, ws, vs, 0.5, torch.float32))


@pytest.mark.skipif(backend_skip_reason("triton") is not None, reason=str(backend_skip_reason("triton")))
def test_l2_flat_buffer_layout():
    """Both backends lay out a dtype group's flat gradient buffer alike: each piece at a multiple of PIECE elements,
    the padding 0; tensors at unaligned addresses (views one element in) take the kernels' unaligned variant."""
    from scratchops._kernels.regularization import PIECE as KERNEL_PIECE
    from scratchops.regularization import PIECE, l2_penalty_bwd_op

    assert KERNEL_PIECE.value == PIECE
    base = make((40,), seed=1)
    tensors = [make((3, 5), seed=2), base[1:18], make((16,), seed=3), base[2:3]]  # 17 and 1 elements at +4/+8 bytes
    grad = torch.tensor(0.75, device=DEVICE)
    flats = {b: l2_penalty_bwd_op(b, tensors, grad, 0.5) for b in ("triton", "reference")}
    assert flats["triton"][0].numel() == 16 + 32 + 16 + 16
    torch.testing.assert_close(flats["triton"], flats["reference"], rtol=0, atol=0)
    ws = [t.detach().clone().requires_grad_() for t in tensors]
    with scratchops.use_backend("triton"):
        SF.l2_penalty(ws, 0.5).backward(grad)
    for w, t in zip(ws, tensors):
        torch.testing.assert_close(w.grad, 0.75 * t, rtol=1e-6, atol=0)


def test_aot_compile_sm90():
    rows = check_aot("scratchops._kernels.regularization")
    assert {r["kernel"] for r in rows} == {"_dropout_kernel", "_l2_sum_kernel", "_l2_scale_kernel"}
    # per dtype: dropout; the sum kernel with and without its partner tensor (DOT) and the scale kernel, each for
    # tables of 16-byte aligned addresses and for others
    assert len(rows) == 4 * (1 + 2 * 3), "every kernel compiles for fp16, bf16, fp32 and fp64"
    streaming = [r for r in rows if r["kernel"] == "_dropout_kernel" or r["constexprs"].get("ALIGNED") == "True"]
    check_sass(streaming, vector128=("_dropout_kernel", "_l2_sum_kernel", "_l2_scale_kernel"))
    for r in streaming:  # the data moves in 16-byte accesses (8 x 16-bit elements a thread in a 16-bit dropout);
        # the l2 kernels read a tensor's last, partial block element by element, and the sum kernel stores one partial
        assert "128" in r["ldg"] and ("128" in r["stg"] or r["kernel"] == "_l2_sum_kernel"), r
        assert r["kernel"] != "_dropout_kernel" or ("16" not in r["ldg"] and "16" not in r["stg"]), r
