"""linear_cross_entropy: every option against torch's F.linear_cross_entropy (reference path), on both backends,
plus the memory bound of the Triton backend (no (N, C) tensor)."""
import pytest
import torch
import torch.nn.functional as TF
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import scratchops
import scratchops.nn as SN
from scratchops import linear_cross_entropy as LCE
from tests.helpers import DEVICE, check_aot, check_sass, check_same_error, expect_ops, make, tolerances

SF_LCE = LCE.linear_cross_entropy
OPS = ["linear_cross_entropy_fwd", "linear_cross_entropy_bwd"]


def _case(n, h, c, *, prob, dtype=torch.float32, bias=True, weight=False, out=(), seed=0, ignore=True):
    """(x, W, b, target, class weight) on the test device; index targets have an ignored row."""
    x = make((n, h), dtype, seed=seed)
    w = make((c, *out, h), dtype, seed=seed + 1)
    b = make((c, *out), dtype, seed=seed + 2) if bias else None
    if prob:
        t = make((n, c, *out), dtype, seed=seed + 3).softmax(1)
    else:
        t = torch.randint(0, c, (n, *out), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        if ignore and n > 1:
            t.view(-1)[1] = -100
    cw = make((c,), dtype, low=0.2, high=2.0, seed=seed + 4) if weight else None
    return x, w, b, t, cw


def _compare(x, w, b, t, cw, *, grad_target=False, grad_weight=False, tol=None, **kwargs):
    """Values and every gradient torch gives (x, W, b; probability target and class weight) equal torch's."""
    def leaves():
        out = []
        for v, want in ((x, True), (w, True), (b, True), (t, grad_target), (cw, grad_weight)):
            if v is not None and v.is_floating_point():  # a copy in the same layout (gaps included)
                v = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device).copy_(v)
                v.requires_grad_(want)
            out.append(v)
        return out

    mine, theirs = leaves(), leaves()
    a = SF_LCE(mine[0], mine[1], mine[3], linear_bias=mine[2], weight=mine[4], **kwargs)
    r = TF.linear_cross_entropy(theirs[0], theirs[1], theirs[3], linear_bias=theirs[2], weight=theirs[4], **kwargs)
    assert a.shape == r.shape and a.dtype == r.dtype, (a.shape, a.dtype, r.shape, r.dtype)
    tol = tol or tolerances(r.dtype, x.shape[-1])
    torch.testing.assert_close(a, r, equal_nan=True, **tol)
    g = make(r.shape, r.dtype, seed=9)
    wrt = [(m, th) for m, th in zip(mine, theirs) if m is not None and m.requires_grad]
    ga = torch.autograd.grad(a, [m for m, _ in wrt], g, allow_unused=True)
    gr = torch.autograd.grad(r, [th for _, th in wrt], g)
    for u, v in zip(ga, gr):
        assert u is not None, "scratchops gave no gradient where torch gives one"
        torch.testing.assert_close(u, v, equal_nan=True, **tol)
    return a


# ----------------------------------------------------------------- every option
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("bias,weight", [(False, False), (True, False), (False, True), (True, True)])
def test_every_option(backend, prob, reduction, smoothing, bias, weight):
    x, w, b, t, cw = _case(7, 5, 37, prob=prob, bias=bias, weight=weight)
    with expect_ops(OPS):
        _compare(x, w, b, t, cw, grad_target=prob, grad_weight=prob and weight, reduction=reduction,
                 label_smoothing=smoothing)


@pytest.mark.parametrize("ignore_index", [None, -100, 3, 0])
def test_ignore_index(backend, ignore_index):
    x, w, b, t, cw = _case(9, 4, 6, prob=False, weight=True)
    t[1] = 0
    t[2:5] = 3
    for reduction in ("mean", "none"):
        _compare(x, w, b, t, cw, reduction=reduction, ignore_index=ignore_index, label_smoothing=0.1)


def test_every_row_ignored(backend):
    # mean over no rows: nan, as torch; the gradient is 0, not nan
    x, w, b, t, cw = _case(4, 3, 5, prob=False)
    t[:] = -100
    _compare(x, w, b, t, cw)


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_k_dimensional_and_unbatched(backend, prob):
    x, w, b, t, cw = _case(5, 4, 7, prob=prob, out=(2, 3), weight=True)
    for reduction in ("none", "mean"):
        _compare(x, w, b, t, cw, grad_target=prob, grad_weight=prob, reduction=reduction, label_smoothing=0.2)
    x1, w1, b1, t1, _ = _case(1, 4, 7, prob=prob)
    t1 = t1[0]
    _compare(x1[0], w1, b1, t1, None, grad_target=prob, reduction="none")
    if not prob:  # a (1,) target for a 1-D input: torch's own backward fails on it, so values only
        torch.testing.assert_close(SF_LCE(x1[0], w1, t1.reshape(1), linear_bias=b1),
                                   TF.linear_cross_entropy(x1[0], w1, t1.reshape(1), linear_bias=b1))


def test_several_class_chunks(backend):
    # C above one backward chunk (chunk_width: 512 classes here): dX accumulates over chunks, dW/db per chunk
    from scratchops._kernels.linear_cross_entropy import chunk_width

    x, w, b, t, cw = _case(19, 6, 1100, prob=False, weight=True)
    assert chunk_width(1100, 6) < 1100
    _compare(x, w, b, t, cw, label_smoothing=0.1)


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_strided_operands(backend, prob):
    # transposed x and W, a sliced bias and target: read through their strides
    x, w, b, t, cw = _case(6, 5, 33, prob=prob, weight=True)
    xs, ws = x.t().contiguous().t(), w.t().contiguous().t()
    bs = torch.stack([b, b], 1)[:, 1]
    ts = torch.stack([t, t], -1)[..., 0]
    assert not (xs.is_contiguous() or ws.is_contiguous() or bs.is_contiguous() or ts.is_contiguous())
    _compare(xs, ws, bs, ts, cw, grad_target=prob, label_smoothing=0.1, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_dtypes(backend, dtype):
    for prob in (False, True):
        x, w, b, t, cw = _case(6, 8, 40, prob=prob, dtype=dtype, weight=True)
        tol = tolerances(dtype, 40) if dtype == torch.float16 else None
        _compare(x, w, b, t, cw, tol=tol, label_smoothing=0.1)


@pytest.mark.parametrize("shape", [(0, 4, 5), (3, 0, 5)], ids=["no_rows", "no_features"])
def test_empty(backend, shape):
    for reduction in ("mean", "sum", "none"):
        _compare(*_case(*shape, prob=False), reduction=reduction)
        _compare(*_case(*shape, prob=True), reduction=reduction)


@pytest.mark.parametrize("wants", ["w", "b", "x", "t"])
def test_some_inputs_need_no_gradient(backend, wants):
    x, w, b, t, cw = _case(5, 4, 9, prob=True, weight=True)
    leaves = {k: v.clone().requires_grad_(k == wants) for k, v in {"x": x, "w": w, "b": b, "t": t}.items()}
    theirs = {k: v.clone().requires_grad_(k == wants) for k, v in {"x": x, "w": w, "b": b, "t": t}.items()}
    a = SF_LCE(leaves["x"], leaves["w"], leaves["t"], linear_bias=leaves["b"], weight=cw, label_smoothing=0.1)
    r = TF.linear_cross_entropy(theirs["x"], theirs["w"], theirs["t"], linear_bias=theirs["b"], weight=cw,
                                label_smoothing=0.1)
    a.backward()
    r.backward()
    torch.testing.assert_close(leaves[wants].grad, theirs[wants].grad)


# ----------------------------------------------------------------- special values (issue 17)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_rows_far_from_zero(backend, dtype, prob):
    big = 1e30 if dtype == torch.float32 else 1e300
    x, w, b, t, cw = _case(5, 3, 40, prob=prob, dtype=dtype, weight=True)
    x[1] = 0.0  # row 1: logits = b exactly
    for shift in (-1e4, 1e4, -big, big):
        b2 = b + shift  # ±1e30 / ±1e300: every logit of a row the same number
        _compare(x, w, b2, t, cw, label_smoothing=0.1, reduction="none")
    masked = torch.full_like(b, -1e4)  # a fully masked row (padding / vocabulary masking): finite, as torch
    _compare(x * 0, w, masked, t, cw, reduction="mean")


def test_issue_17_repro(backend):
    # logits [[-110, -111, -112]] and a batch with a masked row: finite loss and gradient, as torch
    x = torch.eye(3, dtype=torch.float32, device=DEVICE)[:1]
    w = torch.tensor([[-110.0, 0, 0], [-111.0, 0, 0], [-112.0, 0, 0]], device=DEVICE)
    _compare(x, w, None, torch.tensor([0], device=DEVICE), None)
    x2 = torch.eye(2, dtype=torch.float32, device=DEVICE)
    w2 = torch.tensor([[2.0, -1e4], [-1.0, -1e4], [0.5, -1e4]], device=DEVICE)
    # dx[:, 1] = Σ_c dz_c · (-1e4) with Σ_c dz_c = 0: fp32 rounding of 1e4-sized terms (about 1e-3) is the bound
    _compare(x2, w2, None, torch.tensor([0, 1], device=DEVICE), None, tol={"rtol": 1.3e-6, "atol": 1e-3})


# ----------------------------------------------------------------- autodiff
def _autodiff_case(prob):
    """(fn, fp64 inputs): x, W, b, and for probabilities the target and the class weight, all differentiated."""
    x, w, b, t, cw = _case(3, 2, 4, prob=prob, dtype=torch.float64, weight=True)
    leaves = [v.detach().requires_grad_() for v in (x, w, b)]
    if prob:
        def fn(x, w, b, t, cw):
            return SF_LCE(x, w, t, linear_bias=b, weight=cw, label_smoothing=0.2)
        return fn, (*leaves, t.detach().requires_grad_(), cw.detach().requires_grad_())

    def fn(x, w, b):
        return SF_LCE(x, w, t, linear_bias=b, weight=cw, label_smoothing=0.2, reduction="none")
    return fn, leaves


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_gradcheck(backend, prob):
    fn, inputs = _autodiff_case(prob)
    with expect_ops(OPS):
        assert torch.autograd.gradcheck(fn, inputs)


# ----------------------------------------------------------------- double backward (issue 13)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_gradgradcheck(backend, prob):
    # the incoming gradient is differentiated too; fast mode under the interpreter (its launches are slow)
    fn, inputs = _autodiff_case(prob)
    with expect_ops(OPS + ["linear_cross_entropy_bwd2"]):
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=backend == "triton")


def _penalty_gradients(fn, x, w, b, t, cw, prob, **kwargs):
    """[loss, loss + ‖∂loss/∂(x, W, b[, q])‖², and that penalty's gradients]: a double backward."""
    leaves = [v.detach().clone().requires_grad_() for v in ((x, w, b, t) if prob else (x, w, b))]
    loss = fn(leaves[0], leaves[1], leaves[3] if prob else t, linear_bias=leaves[2], weight=cw, **kwargs)
    grads = torch.autograd.grad(loss, leaves, loss.detach().clone(), create_graph=True)  # a non-uniform g
    penalty = (loss * loss.detach()).sum() + sum((g * g).sum() for g in grads)
    return [loss, penalty, *torch.autograd.grad(penalty, leaves)]


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_gradient_penalty_matches_torch(backend, prob):
    # issue 13's user: loss + ‖∂loss/∂(x, W, b[, q])‖²; its parameter gradients equal torch's (second-order
    # terms included). Index targets: C over one chunk (the statistics pass spans every class, the tile pass each chunk)
    from scratchops._kernels.linear_cross_entropy import chunk_width

    c = 9 if prob else 600
    assert prob or chunk_width(c, 3) < c
    case = _case(5, 3, c, prob=prob, dtype=torch.float64, weight=True)
    kwargs = dict(label_smoothing=0.1, reduction="sum" if prob else "mean")
    for a, r in zip(_penalty_gradients(SF_LCE, *case, prob, **kwargs),
                    _penalty_gradients(TF.linear_cross_entropy, *case, prob, **kwargs)):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_double_backward_k_dimensional(backend, prob):
    # out_features (2,): one launch sequence per position; unreduced, so the incoming gradient is a tensor.
    # Smoothing 0.25: the kernels take ε as an fp32 scalar (0.2 would be off by 1.5e-8 relative, seen at fp64's 1e-7)
    case = _case(4, 3, 5, prob=prob, dtype=torch.float64, weight=True, out=(2,))
    kwargs = dict(reduction="none", label_smoothing=0.25)
    for a, r in zip(_penalty_gradients(SF_LCE, *case, prob, **kwargs),
                    _penalty_gradients(TF.linear_cross_entropy, *case, prob, **kwargs)):
        torch.testing.assert_close(a, r)


def test_double_backward_fp16(backend):
    # 16-bit: the tile kernels' half configs and the fp32 accumulators (gX, one gW chunk), against torch in fp32
    case = _case(6, 8, 40, prob=False, dtype=torch.float16, weight=True)
    mine = _penalty_gradients(SF_LCE, *case, False, label_smoothing=0.1)
    theirs = _penalty_gradients(TF.linear_cross_entropy, *[v.float() if v is not None and v.is_floating_point() else v
                                                           for v in case], False, label_smoothing=0.1)
    for a, r in zip(mine, theirs):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a.float(), r, atol=2e-2, rtol=2e-2)


def test_third_derivative_raises(backend):
    x, w, b, t, _ = _case(3, 2, 4, prob=False, dtype=torch.float64)
    x.requires_grad_()
    (dx,) = torch.autograd.grad(SF_LCE(x, w, t, linear_bias=b), x, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.pow(2).sum(), x, create_graph=True)
    xr = x.detach().requires_grad_()
    (dxr,) = torch.autograd.grad(TF.linear_cross_entropy(xr, w, t, linear_bias=b), xr, create_graph=True)
    torch.testing.assert_close(ddx, torch.autograd.grad(dxr.pow(2).sum(), xr)[0])
    assert ddx.requires_grad  # not a graph-less gradient: differentiating it raises
    with pytest.raises(RuntimeError, match="third derivative"):
        ddx.sum().backward()


def test_torch_func_raises(backend):
    # not supported (a nested transform could not be guarded as create_graph is): a clear error, not a wrong value
    x, w, b, t, _ = _case(4, 3, 5, prob=False, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="torch.func transforms are not supported"):
        torch.func.grad(lambda x: SF_LCE(x, w, t, linear_bias=b))(x)


def test_retain_graph(backend):
    x, w, b, t, _ = _case(5, 3, 6, prob=False)
    x.requires_grad_()
    loss = SF_LCE(x, w, t, linear_bias=b)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)


def test_backward_uses_forward_backend(backend):
    from scratchops._backend import LAUNCHES

    other = {"triton": "reference", "reference": "triton"}[backend]
    x, w, b, t, _ = _case(4, 3, 5, prob=False)
    loss = SF_LCE(x.requires_grad_(), w, t)
    before = LAUNCHES["linear_cross_entropy_bwd", backend]
    with scratchops.use_backend(other):
        loss.backward()
    assert LAUNCHES["linear_cross_entropy_bwd", backend] == before + 1


def test_torch_compile_fullgraph(backend):
    x, w, b, t, cw = _case(6, 4, 9, prob=False, weight=True)
    fn = torch.compile(lambda x, w, b: SF_LCE(x, w, t, linear_bias=b, weight=cw, label_smoothing=0.1),
                       fullgraph=True, backend="aot_eager")
    mine = [v.clone().requires_grad_() for v in (x, w, b)]
    theirs = [v.clone().requires_grad_() for v in (x, w, b)]
    a = fn(*mine)
    r = TF.linear_cross_entropy(theirs[0], theirs[1], t, linear_bias=theirs[2], weight=cw, label_smoothing=0.1)
    torch.testing.assert_close(a, r)
    a.backward()
    r.backward()
    for u, v in zip(mine, theirs):
        torch.testing.assert_close(u.grad, v.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(backend, dtype):
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter does not support bfloat16")
    x, w, b, t, _ = _case(6, 8, 10, prob=False)
    mine = [v.clone().requires_grad_() for v in (x, w, b)]
    theirs = [v.clone().requires_grad_() for v in (x, w, b)]
    with torch.autocast(DEVICE, dtype=dtype):
        a = SF_LCE(mine[0], mine[1], t, linear_bias=mine[2])
        r = TF.linear_cross_entropy(theirs[0], theirs[1], t, linear_bias=theirs[2])
    assert a.dtype == r.dtype == torch.float32
    tol = tolerances(dtype, 8)
    torch.testing.assert_close(a, r, **tol)
    a.backward()
    r.backward()
    for u, v in zip(mine, theirs):
        assert u.grad.dtype == v.grad.dtype
        torch.testing.assert_close(u.grad, v.grad, **tol)


def test_opcheck(backend):
    x, w, b, t, cw = _case(4, 3, 5, prob=False, weight=True, out=(2,))
    w3, b2, t2 = w, b, t
    fwd_args = (x, w3, b2, t2, cw, -100, 0.1, 1)
    out, denom, stats = LCE.linear_cross_entropy_fwd(*fwd_args)
    torch.library.opcheck(LCE.linear_cross_entropy_fwd_op.custom, (backend, *fwd_args))
    bwd_args = (x, w3, b2, t2, cw, stats, denom, torch.ones((), device=DEVICE), -100, 0.1, True, True, True, False,
                False)
    torch.library.opcheck(LCE.linear_cross_entropy_bwd_op.custom, (backend, *bwd_args))


# ----------------------------------------------------------------- errors, as torch's
def _bad_calls():
    x, w, b, t, cw = _case(4, 3, 5, prob=False)
    q = make((4, 5)).softmax(1)
    return [
        ((x[None], w, t), {}), ((x, w[0], t), {}), ((x, w[:, :2], t), {}), ((x, w, t), {"linear_bias": b[:3]}),
        ((x[0], w[:, None], t[0]), {}), ((x, w, q), {"ignore_index": -100}), ((x.double(), w, t), {}),
        ((x, w, t), {"linear_bias": b.double()}), ((x, w, t.int()), {}), ((x, w, t), {"reduction": "bogus"}),
        ((x, w, t), {"label_smoothing": 1.5}), ((x, w, t[:3]), {}),
        ((x[0], w, t[:2]), {}), ((x, w, t), {"weight": torch.ones(4, device=DEVICE)}),
        ((x, w, t), {"weight": torch.ones(5, dtype=torch.float64, device=DEVICE)}), ((x, w, q.long()), {}),
        ((x, w, t), {"ignore_index": 1.5}), ((x, w, t), {"ignore_index": True}), ((x, w, t), {"weight": [1.0] * 5}),
        ((x, w, q), {"weight": torch.ones(4, device=DEVICE)}), ((x.int(), w.int(), t), {}),
        ((x, w, t[:, None]), {}), ((x, w, t), {"weight": torch.ones(5, device=DEVICE, requires_grad=True)}),
        ((x, w.reshape(5, 1, 3), t[:, None].to(torch.uint8)), {}), ((x, w.reshape(5, 1, 3), t), {}),
    ]


def test_errors(backend):
    from scratchops._backend import LAUNCHES

    before = LAUNCHES.copy()
    for args, kwargs in _bad_calls():
        check_same_error(SF_LCE, TF.linear_cross_entropy, *args, **kwargs)
    assert LAUNCHES == before  # raised on the host, before any backend op
    # a class index out of range: found by the forward op (so that it traces), before any kernel
    x, w, b, t, _ = _case(4, 3, 5, prob=False)
    check_same_error(SF_LCE, TF.linear_cross_entropy, x, w, t + 10, match="out of bounds")


# ----------------------------------------------------------------- module
@pytest.mark.parametrize("kwargs", [{}, {"bias": True, "label_smoothing": 0.1, "reduction": "sum"},
                                    {"out_features": (2,), "ignore_index": 1}])
def test_module_loads_torch_state_dict(backend, kwargs):
    torch.manual_seed(0)
    ref = torch.nn.LinearCrossEntropyLoss(6, 9, weight=torch.rand(9), **kwargs).to(DEVICE)
    mine = SN.LinearCrossEntropyLoss(6, 9, weight=torch.rand(9), **kwargs).to(DEVICE)
    assert isinstance(mine, torch.nn.LinearCrossEntropyLoss)
    assert mine.state_dict().keys() == ref.state_dict().keys()
    mine.load_state_dict(ref.state_dict())
    x = make((4, 6))
    t = torch.randint(0, 9, (4, *kwargs.get("out_features", ())), device=DEVICE)
    torch.testing.assert_close(mine(x, t), ref(x, t))
    converted = scratchops.convert(ref)
    assert type(converted) is SN.LinearCrossEntropyLoss
    torch.testing.assert_close(converted(x, t), mine(x, t))


# ----------------------------------------------------------------- memory: no (N, C) tensor on the Triton backend
class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (bytes) any op makes, INSIDE the scratchops custom ops too: with a dispatch mode
    active the ops run as custom ops, and each is run here by its launcher with this mode pushed again, so every
    torch allocation a launcher makes (torch.empty of a chunk, zeros of an accumulator...) passes through it."""

    def __init__(self):
        super().__init__()
        self.largest, self.inner = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "scratchops":
            op = scratchops._backend.REGISTRY[func._opname]
            with self:
                out = op.impl(args[0])(*args[1:], **kwargs)
            self.inner += 1
        else:
            out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):  # in bytes: the interpreter moves storages as uint8 tensors
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _train_step(fn, n, h, c):
    x = make((n, h), requires_grad=True)
    w = make((c, h), requires_grad=True)
    t = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    fn(x, w, t).backward()
    return x.grad, w.grad


def test_no_tensor_larger_than_a_chunk():
    if not scratchops._backend.triton_unavailable_reason(torch.device(DEVICE), torch.float32) is None:
        pytest.skip("the Triton backend cannot run here")
    n, h, c = 256, 16, 4096
    from scratchops._kernels.linear_cross_entropy import chunk_width

    with scratchops.use_backend("triton"), LargestTensor() as mode:
        grads = _train_step(SF_LCE, n, h, c)
    fp32 = 4  # bytes
    assert mode.inner == 2  # forward and backward ran as custom ops, through the mode
    assert mode.largest <= n * c // 4 * fp32, mode.largest
    assert mode.largest >= n * chunk_width(c, h) * fp32  # the dZ chunk, allocated inside the launcher, was seen
    with LargestTensor() as torch_mode:  # the same check catches torch's (N, C) logits
        expected = _train_step(TF.linear_cross_entropy, n, h, c)
    assert torch_mode.largest >= n * c * fp32
    for u, v in zip(grads, expected):
        torch.testing.assert_close(u, v)


def test_double_backward_no_tensor_larger_than_a_chunk():
    # a gradient penalty (create_graph) on the Triton backend: the second derivative's tiles (G_Z, dZ: N x 512) stay
    # chunk-sized too; N = 16, H = 2, C = 4096 keeps the interpreter's program count small
    if not scratchops._backend.triton_unavailable_reason(torch.device(DEVICE), torch.float32) is None:
        pytest.skip("the Triton backend cannot run here")
    n, h, c = 16, 2, 4096
    x, w, b, t, _ = _case(n, h, c, prob=False)

    def penalty_gradients(fn):
        leaves = [v.detach().clone().requires_grad_() for v in (x, w, b)]
        grads = torch.autograd.grad(fn(leaves[0], leaves[1], t, linear_bias=leaves[2]), leaves, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in grads), leaves)

    with scratchops.use_backend("triton"), LargestTensor() as mode:
        mine = penalty_gradients(SF_LCE)
    assert mode.inner == 3  # forward, backward and second derivative ran as custom ops, through the mode
    assert mode.largest <= n * c // 4 * 4, mode.largest  # bytes of fp32; the chunks are n * 512 * 4
    with LargestTensor() as torch_mode:
        theirs = penalty_gradients(TF.linear_cross_entropy)
    assert torch_mode.largest >= n * c * 4
    for a, r in zip(mine, theirs):
        torch.testing.assert_close(a, r)


def test_aot_compile_sm90():
    rows = check_aot("scratchops._kernels.linear_cross_entropy")
    assert {r["kernel"] for r in rows} == {"_lce_fwd_kernel", "_lce_dlogits_kernel", "_lce_gemm_kernel"}
    second = check_aot("scratchops._kernels.linear_cross_entropy_bwd2")  # the double backward's: no spills either
    assert {r["kernel"] for r in second} == {"_lce_bwd2_kernel"}
    # wgmma in every 16-bit and tf32 GEMM (fp16/bf16 rows carry INPUT_PRECISION "tf32" too; db's row sums: no product)
    tensor_core = [r for r in rows + second if r["constexprs"]["INPUT_PRECISION"] == "tf32"
                   and r["constexprs"].get("PRODUCT", "True") == "True"]
    assert {t for r in tensor_core for t in r["dtypes"]} >= {"*fp16", "*bf16", "*fp32"}
    assert {r["kernel"] for r in tensor_core} == {"_lce_fwd_kernel", "_lce_dlogits_kernel", "_lce_gemm_kernel",
                                                  "_lce_bwd2_kernel"}
    check_sass(tensor_core, hgmma=("_lce_fwd_kernel", "_lce_dlogits_kernel", "_lce_gemm_kernel", "_lce_bwd2_kernel"))



@pytest.mark.skipif(DEVICE == "cuda", reason="the no-GPU path")
def test_benchmark_without_gpu_exits_0(capsys):
    from benchmarks import bench_linear_cross_entropy as bench

    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU: the GPU comparison is skipped" in out and "impl=torch " in out and "error=" not in out
