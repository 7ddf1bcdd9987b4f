"""mse_loss: every test tier of DESIGN.md, on both backends."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as TF

import scratchops.functional as SF
import scratchops.nn as SN
from tests.helpers import (DEVICE, PARITY_DTYPES, check_aot, check_gradcheck, check_legacy_reduction, check_parity,
                           check_same_error, check_sass, expect_ops, make)

BLOCK = 1024  # triton_kernels/mse.py BLOCK (elementwise kernels, one partial sum per block)
REDUCTIONS = ("none", "mean", "sum")
MSE_OPS = ["mse_fwd", "mse_bwd"]


# ----------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("weighted,broadcast,reduction",
                         list(itertools.product((False, True), (False, True), REDUCTIONS)))
def test_mse_gradcheck(backend, weighted, broadcast, reduction):
    x = make((2, 1) if broadcast else (2, 3), torch.float64, requires_grad=True)
    y = make((3,) if broadcast else (2, 3), torch.float64, requires_grad=True, seed=1)
    w = make(x.shape, torch.float64, low=0.5, high=2.0, requires_grad=True, seed=2) if weighted else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        inputs = (x, y) + ((w,) if weighted else ())
        check_gradcheck(lambda *a: SF.mse_loss(a[0], a[1], reduction=reduction, weight=a[2] if weighted else None),
                        *inputs, ops=MSE_OPS)
        check_parity(SF.mse_loss, TF.mse_loss, x.detach(), y.detach(), reduction=reduction,
                     weight=None if w is None else w.detach())



# ----------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", PARITY_DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (BLOCK - 1,), (BLOCK + 1,), (3 * BLOCK + 7,), (7, 13), (2, 3, 5, 7)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_parity(backend, dtype, shape, reduction):
    n = max(1, torch.Size(shape).numel())
    check_parity(SF.mse_loss, TF.mse_loss, make(shape, dtype), make(shape, dtype, seed=5), reduction=reduction,
                 reduction_size=n)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_broadcast_weight_layouts(backend, reduction):
    x, y = make((4, 1, 3)), make((5, 3), seed=1)
    msg = r"Using a target size \(torch.Size\(\[5, 3\]\)\) that is different to the input size"
    with pytest.warns(UserWarning, match=msg):
        check_parity(SF.mse_loss, TF.mse_loss, x, y, reduction=reduction)
    base = make((6, 8))
    check_parity(SF.mse_loss, TF.mse_loss, base.t(), make((6, 8), seed=2)[:, ::1].t(), reduction=reduction,
                 weight=make((8, 6), low=0.0, high=2.0))
    check_parity(SF.mse_loss, TF.mse_loss, base[:, ::2], make((6, 4), seed=2), reduction=reduction,
                 weight=make((6, 4), low=0.0, high=2.0), grad_output=None if reduction != "none" else
                 make((4,)).expand(6, 4))
    check_parity(SF.mse_loss, TF.mse_loss, make((5,)), make((5,), seed=1).double(), reduction=reduction)


def test_mse_empty_and_special(backend):
    for reduction in REDUCTIONS:
        check_parity(SF.mse_loss, TF.mse_loss, make((0, 3)), make((0, 3)), reduction=reduction, equal_nan=True)
    assert torch.isnan(SF.mse_loss(make((0,)), make((0,))))
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, 0.0], device=DEVICE)
    y = torch.tensor([0.0, 1.0, -float("inf"), -1e30, -0.0], device=DEVICE)
    for reduction in REDUCTIONS:
        check_parity(SF.mse_loss, TF.mse_loss, x, y, reduction=reduction, equal_nan=True)


BAD_MSE = {
    "not broadcastable": lambda: ((make((3,)), make((4,))), {}),
    "weight size": lambda: ((make((3, 1)), make((4,))), {"weight": make((3, 4))}),
    "bad reduction": lambda: ((make((3,)), make((3,))), {"reduction": "bad"}),
    "bad reduction with weight": lambda: ((make((3,)), make((3,))), {"reduction": "bad", "weight": make((3,))}),
    "integer input": lambda: ((torch.ones(3, dtype=torch.long, device=DEVICE),
                               torch.ones(3, dtype=torch.long, device=DEVICE)), {}),
    "not a tensor": lambda: (([1.0], make((1,))), {}),
}


@pytest.mark.parametrize("name", sorted(BAD_MSE))
def test_mse_bad_inputs(backend, name):
    args, kw = BAD_MSE[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check_same_error(SF.mse_loss, TF.mse_loss, *args, **kw)


def test_legacy_reduction_flags(backend):
    check_legacy_reduction(SF.mse_loss, TF.mse_loss, make((4, 6)), make((4, 6), seed=7))


# ----------------------------------------------------------------- modules, registration
def test_modules(backend):
    x = make((5, 6))
    for reduction in REDUCTIONS:
        check_parity(SN.MSELoss(reduction=reduction), torch.nn.MSELoss(reduction=reduction), x, make((5, 6), seed=9))


def test_opcheck(backend):
    from scratchops import mse as M

    x, y, w = make((5, 6)), make((5, 6), seed=1), make((5, 6), low=0.5, high=1.0)
    for reduction in (0, 1, 2):
        torch.library.opcheck(M.mse_fwd_op.custom, (backend, x, y, w, w, reduction))
    out, denom = M.mse_fwd(x, y, w, w, 1)
    torch.library.opcheck(M.mse_bwd_op.custom, (backend, x, y, w, denom, torch.ones((), device=DEVICE), True))
    torch.library.opcheck(M.mse_bwd_op.custom, (backend, x, y, None, denom, make((5, 6)), False))


def test_aot_streaming_loads_are_128_bit():
    """sm_90 as launched (the contract compiles it, no spills): every elementwise compile moves its streams with
    128-bit global accesses (issue 12)."""
    rows = check_aot("scratchops._kernels.mse")
    assert {r["kernel"] for r in rows} == {"_mse_fwd_kernel", "_mse_finish_kernel", "_mse_bwd_kernel"}
    check_sass(rows, vector128=("_mse_fwd_kernel", "_mse_bwd_kernel"))


# ----------------------------------------------------------------- reliability (issue 16)
def test_mse_backward_near_float_max(backend):
    """|e| ~ 1.8e38: torch's gradient e · (2 g / n) is finite; forming 2 e first overflowed."""
    x = torch.tensor([1.7e38, -1.7e38, 0.0, 1.0], device=DEVICE, requires_grad=True)
    y = torch.tensor([-1e37, 1e37, 0.0, 0.0], device=DEVICE)
    for reduction in ("mean", "sum"):  # (torch's weighted path forms 2 e itself: its gradient overflows there)
        out = check_parity(SF.mse_loss, TF.mse_loss, x, y, reduction=reduction,
                           grad_output=torch.ones((), device=DEVICE))
        assert torch.isinf(out)
    xx = x.detach().clone().requires_grad_()
    SF.mse_loss(xx, y).backward()  # mean: e · (2 / 4), finite (sum: 2 e overflows in torch too, checked above)
    assert torch.isfinite(xx.grad).all(), xx.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mse_autocast_is_float32(backend, dtype):
    """mse_loss is an fp32-policy op under autocast: it returns float32, as torch's."""
    x, y = make((4, 7), dtype, requires_grad=True), make((4, 7), dtype, seed=1)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ours, theirs = SF.mse_loss(x, y), TF.mse_loss(x, y)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)


# ----------------------------------------------------------------- double backward (issue 13)
@pytest.mark.parametrize("weighted,reduction", list(itertools.product((None, "constant", "learned"), REDUCTIONS)))
def test_mse_gradgradcheck(backend, weighted, reduction):
    x = make((2, 3), torch.float64, requires_grad=True)
    y = make((2, 3), torch.float64, requires_grad=True, seed=1)
    inputs = [x, y]
    w = None if weighted is None else make((2, 3), torch.float64, low=0.5, high=2.0, seed=2)
    if weighted == "learned":
        if reduction == "mean":
            pytest.skip("a learned weight's mean denominator Σ w is refused under create_graph (see test below)")
        inputs.append(w.requires_grad_())
    with expect_ops(MSE_OPS):
        assert torch.autograd.gradgradcheck(lambda x, y, *ws: SF.mse_loss(x, y, reduction=reduction,
                                                                          weight=ws[0] if ws else w), tuple(inputs))


def test_mse_no_graphless_gradient(backend):
    """A derivative that is not implemented raises where it is taken (create_graph=True and the torch.func
    transforms always build the graph), never a gradient without one."""
    x, y = make((3,), torch.float64, requires_grad=True), make((3,), torch.float64, seed=1)
    w = make((3,), torch.float64, low=0.5, high=2.0, requires_grad=True)
    gx, gw = torch.autograd.grad(SF.mse_loss(x, y, weight=w), (x, w), create_graph=True)
    torch.testing.assert_close(gw, torch.autograd.grad(TF.mse_loss(x, y, weight=w), w)[0])
    for first in (gx, gw):  # through the weighted mean's denominator Σ w
        with pytest.raises(NotImplementedError, match="denominator"):
            torch.autograd.grad(first.sum(), w, retain_graph=True)
    (gx,) = torch.autograd.grad(SF.mse_loss(x, y), x, create_graph=True)
    (gxx,) = torch.autograd.grad(gx.sum(), x, create_graph=True)  # the second derivative itself works
    torch.testing.assert_close(gxx, torch.full_like(x, 2 / 3))
    with pytest.raises(NotImplementedError, match="third derivative is not implemented"):
        torch.autograd.grad(gxx.sum(), x)


# ----------------------------------------------------------------- torch.func (issue 13)
@pytest.mark.parametrize("weighted,reduction", [(False, "mean"), (True, "none"), (True, "sum"), (True, "mean")])
def test_mse_torch_func(backend, weighted, reduction):
    """vmap (per-sample losses and gradients), grad, vjp, jacrev, jvp, jacfwd and hessian against torch's (fp64),
    in the input, the target and (first order) the weight."""
    x, y = make((2, 3), torch.float64), make((2, 3), torch.float64, seed=1)
    w = make((2, 3), torch.float64, low=0.5, high=2.0, seed=2) if weighted else None
    results = {}
    for name, mse in (("ours", SF.mse_loss), ("torch", TF.mse_loss)):
        f = lambda x, y, *ws: mse(x, y, reduction=reduction, weight=ws[0] if ws else None)  # noqa: E731
        total = lambda *a: f(*a).sum()  # noqa: E731
        args, argnums = ((x, y, w), (0, 1, 2)) if weighted else ((x, y), (0, 1))
        second = (0, 1) if reduction == "mean" and weighted else argnums  # Σ w's second derivative is refused
        tangents = tuple(make(a.shape, torch.float64, seed=5 + i) for i, a in enumerate(args))
        batch = [torch.stack([a, a.flip(0)]) for a in args]
        results[name] = [torch.func.grad(total, argnums)(*args), torch.func.vjp(f, *args)[1](f(*args)),
                         torch.func.jacrev(f, argnums)(*args), torch.func.jvp(f, args, tangents),
                         torch.func.jacfwd(f, argnums)(*args), torch.func.hessian(total, second)(*args)]
        if name == "ours":
            results[name] += [torch.func.vmap(f)(*batch), torch.func.vmap(torch.func.grad(total, argnums))(*batch)]
        else:  # torch's per-sample loop is the oracle of vmap
            results[name] += [torch.stack([f(*a) for a in zip(*batch)]),
                              [torch.stack(g) for g in zip(*[torch.func.grad(total, argnums)(*a)
                                                             for a in zip(*batch)])]]
    torch.testing.assert_close(results["ours"], results["torch"])
