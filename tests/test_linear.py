"""linear (+ fused relu/sigmoid/tanh): every test tier of DESIGN.md, on both backends.

Shapes stay tiny: under the interpreter each tile program of a matmul costs
milliseconds (one 32x32x32 config runs there), so "odd" sizes are 1, 17, 33 (BLOCK + 1),
31 (BLOCK - 1) and 129 (K not a multiple of any block), and gradchecks use fast mode.
"""
import pytest
import torch
import torch.nn.functional as TF

import scratchops
import scratchops.functional as SF
import scratchops.nn as SN
from benchmarks.harness import saved_tensor_bytes
from tests.helpers import (DEVICE, PARITY_DTYPES, backend_skip_reason, check_aot, check_gradcheck, check_parity,
                           check_same_error, expect_ops, make, tolerances)

ACTIVATIONS = [None, "relu", "sigmoid", "tanh"]
TORCH_ACT = {None: lambda z: z, "relu": TF.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
ALL_OPS = ["linear_fwd", "linear_bwd_input", "linear_bwd_weight"]


def torch_linear(x, w, b=None, activation=None):
    return TORCH_ACT[activation](TF.linear(x, w, b))


def torch_linear_upcast(x, w, b=None, activation=None):
    up = [None if t is None else t.float() for t in (x, w, b)]
    return torch_linear(*up, activation=activation).to(x.dtype)


def ours(x, w, b=None, activation=None):
    return SF.linear(x, w, b, activation=activation)


def _k(x):
    return max(x.shape[-1], 1)


# ----------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(backend, activation):
    x, w, b = make((5, 11), torch.float64), make((7, 11), torch.float64), make((7,), torch.float64)
    for t in (x, w, b):
        t.requires_grad_()
    check_gradcheck(lambda *a: ours(*a, activation=activation), x, w, b, ops=ALL_OPS, fast_mode=True)


@pytest.mark.parametrize("activation", ["sigmoid", None])
def test_gradcheck_bias_without_weight_grad(backend, activation):
    # W frozen: db comes from the separate reduction (linear_bwd_bias), dX still from linear_bwd_input.
    x, w, b = make((6, 3), torch.float64, requires_grad=True), make((4, 3), torch.float64), make((4,), torch.float64)
    b.requires_grad_()
    check_gradcheck(lambda *a: ours(*a, activation=activation), x, w, b,
                    ops=["linear_fwd", "linear_bwd_input", "linear_bwd_bias"], fast_mode=True)


# ----------------------------------------------------------------- double backward, torch.func
SECOND_ORDER_OPS = ["linear_fwd", "linear_bwd_input", "linear_bwd_weight"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradgradcheck(backend, activation, bias):
    # The backward is built from differentiable Functions running the same kernels (GEMMs reuse linear's).
    x, w = make((4, 3), torch.float64, requires_grad=True), make((5, 3), torch.float64, requires_grad=True)
    inputs = (x, w, make((5,), torch.float64, requires_grad=True)) if bias else (x, w)
    with expect_ops(SECOND_ORDER_OPS):
        assert torch.autograd.gradgradcheck(lambda *a: ours(*a, activation=activation), inputs, fast_mode=True)


@pytest.mark.parametrize("case", ["frozen_weight", "bias_only", "bias_matrix", "batched_3d"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", None])
def test_gradgradcheck_variants(backend, case, activation):
    x, w = make((4, 3), torch.float64, requires_grad=True), make((5, 3), torch.float64, requires_grad=True)
    b = make((5,), torch.float64, requires_grad=True)
    fn = {"frozen_weight": (lambda x, b: ours(x, w.detach(), b, activation=activation), (x, b)),
          "bias_only": (lambda b: ours(x.detach(), w.detach(), b, activation=activation), (b,)),
          "bias_matrix": (lambda x, w, b: ours(x, w, b, activation=activation),
                          (x, w, make((4, 5), torch.float64, requires_grad=True))),
          "batched_3d": (lambda x, w: ours(x, w, None, activation=activation),
                         (make((2, 3, 3), torch.float64, requires_grad=True), w))}[case]
    assert torch.autograd.gradgradcheck(*fn, fast_mode=True)


def test_gradgradcheck_complex_reference():
    x, w, b = (make(s, torch.float64).to(torch.complex128).requires_grad_() for s in ((3, 4), (2, 4), (2,)))
    with scratchops.use_backend("auto"):
        assert torch.autograd.gradgradcheck(ours, (x, w, b))


def test_second_order_matches_torch(backend):
    # A gradient penalty: loss + ‖∂loss/∂x‖², differentiated to the parameters, as torch's.
    x, w, b = make((6, 4), torch.float64), make((3, 4), torch.float64), make((3,), torch.float64)
    grads = []
    for fn in (ours, torch_linear):
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        loss = fn(xx, ww, bb, activation="sigmoid").pow(2).sum()
        (gx,) = torch.autograd.grad(loss, xx, create_graph=True)
        assert gx.requires_grad, "the gradient came back without a graph"
        (loss + gx.pow(2).sum()).backward()
        grads.append((xx.grad, ww.grad, bb.grad))
    for a, t in zip(*grads):
        torch.testing.assert_close(a, t)


@pytest.mark.parametrize("activation", [None, "tanh", "sigmoid", "relu"])
def test_third_derivative(backend, activation):
    # Every piece is differentiable again: linear ops in the matrices, and the activation's derivative terms
    # close their own series (s'' is a constant), so third derivatives match torch's.
    x, w = make((3, 4), torch.float64), make((2, 4), torch.float64)
    results = []
    for fn in (ours, torch_linear):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(xx, ww, activation=activation).pow(3).sum(), xx, create_graph=True)
        (h,) = torch.autograd.grad(g.pow(2).sum(), ww, create_graph=True)
        results.append(torch.autograd.grad(h.sum(), xx)[0])
    torch.testing.assert_close(*results)


@pytest.mark.parametrize("activation", ["tanh", "relu", None])
def test_torch_func(backend, activation):
    from torch.func import grad, jacrev, vjp

    w, b = make((3, 4), torch.float64), make((3,), torch.float64)
    x = make((2, 4), torch.float64)
    mine, theirs = (lambda fn: lambda v: fn(v, w, b, activation=activation))(ours), \
        (lambda fn: lambda v: fn(v, w, b, activation=activation))(torch_linear)
    g = make((2, 3), torch.float64, seed=5)
    torch.testing.assert_close(vjp(mine, x)[1](g), vjp(theirs, x)[1](g))
    torch.testing.assert_close(jacrev(mine)(x), jacrev(theirs)(x))
    second = (lambda f: grad(lambda v: grad(lambda u: f(u).pow(2).sum())(v).pow(2).sum()))
    torch.testing.assert_close(second(mine)(x), second(theirs)(x))
    hess = (lambda f: jacrev(jacrev(lambda v: f(v.reshape(2, 4)).pow(2).sum())))
    torch.testing.assert_close(hess(mine)(x.reshape(-1)), hess(theirs)(x.reshape(-1)))


@pytest.mark.parametrize("activation", ["tanh", None])
def test_vmap(backend, activation):
    # A batch of inputs folds into the rows (one launch); a batch of weights runs per entry. Values as torch's.
    from scratchops._backend import LAUNCHES
    from torch.func import vmap

    xs, w, b, ws = make((5, 2, 4)), make((3, 4)), make((3,)), make((5, 3, 4))
    mine = (lambda fn: lambda *a: fn(*a, activation=activation))(ours)
    theirs = (lambda fn: lambda *a: fn(*a, activation=activation))(torch_linear)
    before = LAUNCHES["linear_fwd", backend]
    torch.testing.assert_close(vmap(mine, (1, None, None))(xs.transpose(0, 1), w, b),
                               vmap(theirs, (0, None, None))(xs, w, b))
    assert LAUNCHES["linear_fwd", backend] == before + 1
    torch.testing.assert_close(vmap(mine, (None, 0, None))(xs[0], ws, b), vmap(theirs, (None, 0, None))(xs[0], ws, b))


@pytest.mark.parametrize("activation", ["tanh", "relu", None])
def test_forward_mode(backend, activation):
    # jvp on every operand, jacfwd, and hessian (jacfwd of jacrev: the jvp of each backward piece).
    from torch.func import hessian, jacfwd, jvp

    x, w, b = make((2, 4), torch.float64), make((3, 4), torch.float64), make((3,), torch.float64)
    tangents = tuple(make(tuple(t.shape), torch.float64, seed=i) for i, t in enumerate((x, w, b)))
    mine = (lambda fn: lambda *a: fn(*a, activation=activation))(ours)
    theirs = (lambda fn: lambda *a: fn(*a, activation=activation))(torch_linear)
    torch.testing.assert_close(jvp(mine, (x, w, b), tangents), jvp(theirs, (x, w, b), tangents))
    torch.testing.assert_close(jacfwd(mine, argnums=(0, 1, 2))(x, w, b), jacfwd(theirs, argnums=(0, 1, 2))(x, w, b))
    for i, t in enumerate((x, w, b)):
        def loss(v, fn, i=i):
            args = [x, w, b]
            args[i] = v.reshape(t.shape)
            return fn(*args).pow(2).sum()
        torch.testing.assert_close(hessian(loss)(t.reshape(-1), mine), hessian(loss)(t.reshape(-1), theirs))


# ----------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", PARITY_DTYPES)
@pytest.mark.parametrize("mnk,activation", [((1, 1, 1), "relu"), ((17, 5, 129), "tanh"), ((3, 129, 17), "sigmoid"),
                                            ((17, 17, 17), None), ((33, 31, 65), "relu")])
def test_parity(backend, dtype, mnk, activation):
    m, n, k = mnk
    inputs = make((m, k), dtype), make((n, k), dtype), make((n,), dtype)
    check_parity(ours, torch_linear, *inputs, activation=activation, grad=dtype == torch.float32,
                 reduction_size=max(mnk))
    if dtype != torch.float32:
        _check_half_grads(inputs, activation, max(mnk))


def _check_half_grads(inputs, activation, reduction_size):
    """Half-precision gradients against torch's linear run in float32 (and rounded to half).

    A gradient element is a sum of products that may cancel, and both sides round dZ to half
    (as torch's fp16 activation backward does) at slightly different points, so the error scale
    is that of the terms, not of the result: atol is relative to the largest element.
    """
    tol = tolerances(inputs[0].dtype, reduction_size)["rtol"]
    a_in = [t.detach().clone().requires_grad_() for t in inputs]
    b_in = [t.detach().clone().requires_grad_() for t in inputs]
    a, b = ours(*a_in, activation=activation), torch_linear_upcast(*b_in, activation=activation)
    g = make(tuple(b.shape), b.dtype, seed=0)
    a.backward(g)
    b.backward(g)
    for x, y in zip(a_in, b_in):
        assert x.grad.dtype == y.grad.dtype
        torch.testing.assert_close(x.grad, y.grad, rtol=tol, atol=tol * y.grad.abs().max().item())


def _awkward(name):
    """(x, w, b) for an awkward case."""
    if name == "batched_3d":
        return make((2, 3, 9)), make((5, 9)), make((5,))
    if name == "rank_4":
        return make((2, 1, 3, 4)), make((6, 4)), make((6,))
    if name == "input_1d":
        return make((9,)), make((5, 9)), make((5,))
    if name == "weight_1d":
        return make((3, 9)), make((9,)), None
    if name == "weight_1d_bias_0d":  # torch adds a 0-d bias to a 1-D weight's product unless the input is 2-D
        return make((9,)), make((9,)), make(())
    if name == "weight_1d_bias_0d_3d":
        return make((2, 3, 9)), make((9,)), make(())
    if name == "non_contiguous_input":
        return make((4, 20, 6))[:, ::3, :].transpose(0, 1), make((5, 6)), make((5,))
    if name == "transposed_weight":
        return make((4, 6)), make((6, 5)).t(), make((5,))
    if name == "sliced_weight_and_bias":
        return make((4, 6)), make((5, 12))[:, ::2], make((10,))[::2]
    if name == "expanded_input_and_weight":
        return make((1, 6)).expand(4, 6), make((6,)).expand(5, 6), make(()).expand(5)
    if name == "bias_none":
        return make((4, 6)), make((5, 6)), None
    if name == "bias_broadcast":
        return make((4, 6)), make((5, 6)), make((1,))
    if name == "bias_row_2d":  # (1, N): torch broadcasts it over the rows
        return make((4, 6)), make((5, 6)), make((1, 5))
    if name == "bias_matrix":  # (M, N): one bias per output element
        return make((4, 6)), make((5, 6)), make((4, 5))
    if name == "bias_column":  # (M, 1)
        return make((4, 6)), make((5, 6)), make((4, 1))
    if name == "bias_matrix_3d":  # (S, N) against a (B, S, K) input
        return make((2, 3, 6)), make((5, 6)), make((3, 5))
    if name == "bias_matrix_3d_strided":
        return make((2, 3, 12))[..., ::2], make((5, 6)), make((2, 1, 5))
    if name == "input_1d_bias_row":
        return make((6,)), make((5, 6)), make((1, 5))
    if name == "empty_batch":
        return make((0, 6)), make((5, 6)), make((5,))
    if name == "empty_batch_3d":
        return make((2, 0, 6)), make((5, 6)), make((5,))
    if name == "k_zero":
        return make((4, 0)), make((5, 0)), make((5,))
    if name == "n_zero":
        return make((4, 6)), make((0, 6)), make((0,))
    raise KeyError(name)


AWKWARD = ["batched_3d", "rank_4", "input_1d", "weight_1d", "weight_1d_bias_0d", "weight_1d_bias_0d_3d",
           "non_contiguous_input", "transposed_weight",
           "sliced_weight_and_bias", "expanded_input_and_weight", "bias_none", "bias_broadcast", "bias_row_2d",
           "bias_matrix", "bias_column", "bias_matrix_3d", "bias_matrix_3d_strided", "input_1d_bias_row", "empty_batch",
           "empty_batch_3d", "k_zero", "n_zero"]


@pytest.mark.parametrize("name", AWKWARD)
def test_awkward_inputs(backend, name):
    x, w, b = _awkward(name)
    out = check_parity(ours, torch_linear, x, w, b, activation="tanh", reduction_size=_k(x))
    assert out.stride() == torch_linear(x, w, b).stride()


def test_huge_row_stride(backend):
    # A row stride of 2^24 elements: 128 rows of it overflow int32, so the launcher copies (tile offsets are int32).
    # (Called directly, not through check_parity, whose clone() would make x contiguous.)
    x = torch.zeros(2**24 + 8, device=DEVICE).as_strided((2, 5), (2**24, 1))
    x.copy_(make((2, 5)))
    w1, w2 = make((4, 5), requires_grad=True), make((4, 5), requires_grad=True)
    y1, y2 = ours(x, w1, None, activation="relu"), torch_linear(x, w2, None, activation="relu")
    torch.testing.assert_close(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_expanded_grad_output(backend, activation):
    x, w, b = make((5, 7)), make((3, 7)), make((3,))
    check_parity(ours, torch_linear, x, w, b, activation=activation,
                 grad_output=torch.ones((), device=DEVICE).expand(5, 3))
    check_parity(ours, torch_linear, x, w, b, activation=activation, grad_output=make((3,)).expand(5, 3))


@pytest.mark.parametrize("activation", [None, "relu"])
def test_special_values(backend, activation):
    x = make((4, 5))
    x[0, 1], x[2, 3], x[3, 0] = float("nan"), float("inf"), -float("inf")
    check_parity(ours, torch_linear, x, make((3, 5)), make((3,)), activation=activation, grad=False, equal_nan=True)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_saturating_logits(backend, activation):
    x = make((3, 4)) * 200  # z far out in the tails: sigmoid -> 0/1, tanh -> ±1, no NaN
    check_parity(ours, torch_linear, x, make((2, 4)), make((2,)), activation=activation, reduction_size=4)


# ----------------------------------------------------------------- what backward keeps and runs
def _saved(fn, x, w, b):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, w, b)]
    saved, out = saved_tensor_bytes(lambda: fn(*leaves))
    return saved["total"], out


# ----------------------------------------------------------------- the sm_90 path: TMA descriptors, persistent grid
# Under the interpreter the launchers take it whenever tensor descriptors can address the operands, so CPU CI
# runs the same kernels (there with 3 programs looping over the tiles of one 32x32x32 config). Sizes are not
# multiples of the block: the zero fill of loads and the clipping of stores at the edges are what is tested.
TMA_KERNELS = {"linear": ("_fwd_tma",), "linear_bwd": ("_input_tma", "_weight_tma")}
F32, F64, F16 = torch.float32, torch.float64, torch.float16
TMA_CASES = [((70, 40, 48), "sigmoid", "vector", F32), ((33, 72, 16), "tanh", "matrix", F32),
             ((40, 8, 104), "relu", None, F32), ((5, 40, 40), None, "vector", F32), ((70, 40, 48), "tanh", "vector", F64),
             ((33, 72, 16), None, "matrix", F64), ((70, 40, 48), "sigmoid", "vector", F16), ((40, 8, 104), None, None, F16)]
TMA_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3}


class _Spy:
    """A launcher's Kernel that records the dtype class of each launch."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs["cls"])
        return self.kernel(*args, **kwargs)


def _tma_spies(monkeypatch):
    """Record each launch of the TMA kernels: {attribute: [dtype class of each launch]}."""
    import importlib

    if backend_skip_reason("triton"):
        pytest.skip(backend_skip_reason("triton"))
    if DEVICE == "cuda" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the TMA path is sm_90's")
    calls = {}
    for module, names in TMA_KERNELS.items():
        mod = importlib.import_module(f"scratchops._kernels.{module}")
        for name in names:
            spy = _Spy(getattr(mod, name))
            monkeypatch.setattr(mod, name, spy)
            calls[name] = spy.calls
    return calls


@pytest.mark.parametrize("mnk,activation,bias,dtype", TMA_CASES)
def test_tma_persistent_path(monkeypatch, mnk, activation, bias, dtype):
    calls = _tma_spies(monkeypatch)
    (M, N, K), tol = mnk, TMA_TOL[dtype]
    shapes = [(M, K), (N, K)] + ([] if bias is None else [(N,) if bias == "vector" else (M, N)])
    leaves = [make(s, dtype, seed=i, requires_grad=True) for i, s in enumerate(shapes)]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    with scratchops.use_backend("triton"):
        y = ours(*leaves, activation=activation)
        dy = make((M, N), dtype, seed=7)
        y.backward(dy)
    ref = torch_linear(*exact, activation=activation)
    ref.backward(dy.double())
    assert {k: len(v) for k, v in calls.items()} == {"_fwd_tma": 1, "_input_tma": 1, "_weight_tma": 1}
    for got, want in [(y, ref)] + [(a.grad, e.grad) for a, e in zip(leaves, exact)]:
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol * want.abs().max().item())


def test_tma_path_edges(monkeypatch):
    # NaN/inf propagate through the TMA path; operands a descriptor cannot address (a 20-byte row stride, a
    # transposed W) take the pointer kernels, each GEMM choosing alone; a W-only backward runs the TMA dW
    # kernel without db.
    calls = _tma_spies(monkeypatch)
    x = make((9, 12))
    x[0, 1], x[2, 3], x[3, 0] = float("nan"), float("inf"), -float("inf")
    check_parity(ours, torch_linear, x, make((8, 12)), make((8,)), activation="relu", grad=False, equal_nan=True)
    assert len(calls["_fwd_tma"]) == 1
    check_parity(ours, torch_linear, make((9, 5)), make((8, 5)), None, activation="tanh")
    assert len(calls["_fwd_tma"]) == 1 and not calls["_input_tma"] and not calls["_weight_tma"]
    check_parity(ours, torch_linear, make((9, 12)), make((12, 8)).t(), None, activation="tanh")
    # x Wᵀ and dX read the transposed W: pointer kernels; dW = dZᵀ X writes a new (8, 12): TMA
    assert len(calls["_fwd_tma"]) == 1 and not calls["_input_tma"] and len(calls["_weight_tma"]) == 1
    w = make((12, 20), requires_grad=True)
    ours(make((33, 20)), w, make((12,)), activation="sigmoid").backward(make((33, 12)))
    exact = make((12, 20), torch.float64, requires_grad=True)
    torch_linear(make((33, 20), torch.float64), exact, make((12,), torch.float64), "sigmoid").backward(
        make((33, 12), torch.float64))
    torch.testing.assert_close(w.grad.double(), exact.grad, rtol=1e-5, atol=1e-5)
    assert len(calls["_fwd_tma"]) == 2 and len(calls["_weight_tma"]) == 2 and not calls["_input_tma"]


def test_tma_warp_specialized_kernels(monkeypatch):
    # The warp-specialized configs (sm_90 autotune lists, triton 3.6/3.7/3.9) launch the same TMA kernels with
    # WARP_SPECIALIZE=True: the tile loop unflattened and marked for Triton's Hopper pass. The interpreter runs
    # that variant too (forward and dX against float64 torch), so the source of the specialized loop is covered.
    import importlib

    from scratchops._kernels import _gemm

    K = importlib.import_module("scratchops._kernels.linear")
    KB = importlib.import_module("scratchops._kernels.linear_bwd")
    if K.WARP_SPECIALIZATION:  # the lists carry them: forward 16-bit and tf32, dX 16-bit
        for cls, configs in (("half", K.FWD_TMA_CONFIGS), ("tf32", K.FWD_TMA_CONFIGS), ("half", KB.INPUT_TMA_CONFIGS)):
            assert [c.num_warps for c in configs[cls] if c.kwargs.get("WARP_SPECIALIZE")] and all(
                c.num_warps == 4 and c.kwargs["BLOCK_M"] == 64 for c in configs[cls] if c.kwargs.get("WARP_SPECIALIZE"))
    if backend_skip_reason("triton") or DEVICE != "cpu":
        pytest.skip("launches the kernels under the interpreter")
    M, N, Kd = 40, 24, 48
    x, w, b, dy = make((M, Kd)), make((N, Kd)), make((N,)), make((M, N), seed=5)
    y, dx = torch.empty(M, N), torch.empty(M, Kd)
    cls, consts = K.launch_class(x.dtype, "BIAS", K.VECTOR_CODE, "ACTIVATION", 2)  # sigmoid
    descs = _gemm.tma_descriptors(K._fwd_tma.block_shapes, cls, x, w, y)
    K._fwd_tma((3,), *descs, b, M, N, Kd, 0, 1, cls=cls, WARP_SPECIALIZE=True, **consts)
    want = torch.sigmoid(x.double() @ w.double().t() + b.double())
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    cls, consts = K.launch_class(x.dtype, "ACTIVATION", 2)
    descs = _gemm.tma_descriptors(KB._input_tma.block_shapes, cls, dy, y, w, dx)
    KB._input_tma((3,), *descs, M, N, Kd, cls=cls, WARP_SPECIALIZE=True, **consts)
    want_dx = (dy.double() * want * (1 - want)) @ w.double()
    torch.testing.assert_close(dx.double(), want_dx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bytes_saved_for_backward(backend, activation, capsys):
    x, w, b = make((6, 9), requires_grad=True), make((5, 9), requires_grad=True), make((5,), requires_grad=True)
    mine, _ = _saved(lambda *a: ours(*a, activation=activation), x, w, b)
    theirs, _ = _saved(lambda *a: torch_linear(*a, activation=activation), x, w, b)
    expected = (x.numel() + w.numel() + (6 * 5 if activation else 0)) * 4  # x, W, and y for an activation
    with capsys.disabled():
        print(f"\nbytes saved for backward, linear+{activation}: scratchops {mine}, torch {theirs}")
    assert mine == expected and mine <= theirs
    # Frozen weight: x is not needed (dW is not computed), nor is W when x needs no grad.
    frozen, _ = _saved(lambda *a: ours(*a, activation=activation), x, w.detach(), b)
    assert frozen == expected - x.numel() * 4
    only_w, _ = _saved(lambda *a: ours(*a, activation=activation), x.detach(), w, b)
    assert only_w == expected - w.numel() * 4


def test_saves_output_not_preactivation(backend):
    x, w = make((4, 3), requires_grad=True), make((2, 3), requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = ours(x, w, None, activation="tanh")
    assert any(t is y or (t.shape == y.shape and torch.equal(t, y)) for t in kept)
    z = TF.linear(x.detach(), w.detach())
    assert not any(t.shape == z.shape and torch.equal(t, z) for t in kept), "z was saved"


def test_needs_input_grad(backend):
    from scratchops._backend import LAUNCHES

    x, w, b = make((4, 3), requires_grad=True), make((2, 3)), make((2,))
    before = {op: LAUNCHES[op, backend] for op in ["linear_bwd_weight", "linear_bwd_bias", "linear_bwd_input"]}
    ours(x, w, b, activation="relu").sum().backward()
    assert LAUNCHES["linear_bwd_weight", backend] == before["linear_bwd_weight"]
    assert LAUNCHES["linear_bwd_bias", backend] == before["linear_bwd_bias"]
    assert LAUNCHES["linear_bwd_input", backend] == before["linear_bwd_input"] + 1


# ----------------------------------------------------------------- bad inputs
BAD = {
    "k_mismatch": lambda: (make((3, 4)), make((5, 3)), None),
    "k_mismatch_3d": lambda: (make((2, 3, 4)), make((5, 3)), None),
    "k_mismatch_1d": lambda: (make((4,)), make((5, 3)), None),
    "weight_dtype": lambda: (make((3, 4)), make((5, 4), torch.float64), None),
    "input_dtype": lambda: (make((3, 4), torch.float64), make((5, 4)), make((5,))),
    "bias_dtype": lambda: (make((3, 4)), make((5, 4)), make((5,), torch.float64)),
    "bias_shape": lambda: (make((3, 4)), make((5, 4)), make((4,))),
    "bias_rows": lambda: (make((3, 4)), make((5, 4)), make((2, 5))),
    "bias_too_many_dims": lambda: (make((3, 4)), make((5, 4)), make((1, 1, 5))),
    "bias_rows_1d_input": lambda: (make((4,)), make((5, 4)), make((2, 5))),
    "input_0d": lambda: (make(()), make((5, 4)), None),
    "weight_3d": lambda: (make((3, 4)), make((2, 5, 4)), None),
    "weight_1d_with_bias": lambda: (make((3, 4)), make((4,)), make(())),
    "weight_1d_with_bias_1d": lambda: (make((4,)), make((4,)), make((1,))),
    "bool_inputs": lambda: (make((3, 4)) > 0, make((5, 4)) > 0, None),
    "bias_other_device": lambda: (make((3, 4)), make((5, 4)), torch.empty(5, device="meta")),
    "input_not_tensor": lambda: ([1.0, 2.0], make((5, 2)), None),
    "weight_not_tensor": lambda: (make((3, 4)), "w", None),
    "bias_not_tensor": lambda: (make((3, 4)), make((5, 4)), 3),
    # issue 16 fuzz: a 1-D input adds its bias in place to the (N,) product: a 2-D bias does not fit
    "input_1d_bias_2d": lambda: (make((4,)), make((5, 4)), make((1, 1))),
    "input_1d_strided_bias_2d": lambda: (make((8,))[::2], make((5, 4)), make((1, 5))),
    "input_1d_bias_2d_strided": lambda: (make((4,)), make((5, 4)), make((1, 10))[:, ::2]),
    "input_1d_bias_2d_one": lambda: (make((0,)), make((1, 0)), make((1, 1))),
}
MATCH = {"k_mismatch": r"mat1 and mat2 shapes cannot be multiplied \(3x4 and 3x5\)",
         "k_mismatch_3d": r"mat1 and mat2 shapes cannot be multiplied \(6x4 and 3x5\)",
         "k_mismatch_1d": r"mat1 and mat2 shapes cannot be multiplied \(1x4 and 3x5\)",
         "bias_shape": r"The expanded size of the tensor \(5\) must match the existing size \(4\) at non-singleton "
                       r"dimension 1.  Target sizes: \[3, 5\]",
         "bias_rows": r"The expanded size of the tensor \(3\) must match the existing size \(2\) at non-singleton "
                      r"dimension 0.  Target sizes: \[3, 5\]",
         "bias_too_many_dims": "the number of sizes provided",
         "weight_dtype": "same dtype", "input_dtype": "same dtype", "bias_dtype": "same dtype",
         "input_not_tensor": "must be Tensor", "weight_not_tensor": "must be Tensor",
         "bias_not_tensor": "must be Tensor",
         "input_1d_bias_2d": r"output with shape \[5\] doesn't match the broadcast shape \[1, 5\]",
         "input_1d_strided_bias_2d": r"output with shape \[5\] doesn't match the broadcast shape \[1, 5\]",
         "input_1d_bias_2d_strided": r"output with shape \[5\] doesn't match the broadcast shape \[1, 5\]",
         "input_1d_bias_2d_one": r"output with shape \[1\] doesn't match the broadcast shape \[1, 1\]"}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs(backend, name):
    check_same_error(ours, torch_linear, *BAD[name](), match=MATCH.get(name))


def test_input_1d_contiguous_bias_one_row(backend):
    # issue 16 fuzz: torch's fused path takes a contiguous (1, N) bias (N > 1) for a contiguous 1-D input
    x, w, b = make((4,), requires_grad=True), make((5, 4), requires_grad=True), make((1, 5), requires_grad=True)
    check_parity(ours, torch_linear, x, w, b)


def test_bad_bias_raises_before_any_kernel(backend):
    from scratchops._backend import LAUNCHES

    before = LAUNCHES.copy()
    for name in ("bias_shape", "bias_rows", "bias_too_many_dims", "bias_other_device", "k_mismatch"):
        with pytest.raises(RuntimeError):
            ours(*BAD[name]())
    assert LAUNCHES == before


INTEGER_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


@pytest.mark.parametrize("dtype", INTEGER_DTYPES + [torch.complex64, torch.complex128])
def test_integer_and_complex_as_torch_cpu(backend, dtype):
    # torch's CPU linear computes integer (wrapping) and complex products: the reference backend does the same;
    # the Triton kernels take real floating types only, so an explicit request refuses before any kernel runs.
    from scratchops._backend import LAUNCHES

    g = torch.Generator().manual_seed(0)

    def mk(*shape, scale=1):
        if dtype.is_complex:
            return torch.randn(*shape, dtype=dtype, generator=g)
        return (torch.randint(0 if dtype == torch.uint8 else -9, 10, shape, generator=g) * scale).to(dtype)

    x, w, b = mk(4, 6, scale=7), mk(5, 6, scale=5), mk(5)  # int8/uint8 products overflow and wrap, as torch's
    if backend == "triton":
        before = LAUNCHES.copy()
        with pytest.raises(RuntimeError, match="backend 'triton' was requested but cannot run"):
            SF.linear(x, w, b)
        assert LAUNCHES == before
    with scratchops.use_backend("auto"), expect_ops(["linear_fwd"], backend="reference"):
        check_parity(ours, torch_linear, x, w, b)
        check_parity(ours, torch_linear, x.unsqueeze(0), w, None)
        for act in ("relu", "sigmoid", "tanh"):
            if dtype.is_complex and act == "relu":
                check_same_error(ours, torch_linear, x, w, b, activation=act)
            else:
                check_parity(ours, torch_linear, x, w, b, activation=act)


def test_bool_raises_as_torch(backend):
    x = make((3, 4)) > 0
    check_same_error(ours, torch_linear, x, x[:2], None, match="not implemented for 'Bool'")


# ----------------------------------------------------------------- export, dynamic shapes
def _converted_mlp():
    torch.manual_seed(0)
    return scratchops.convert(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)))


def test_export_dynamic_batch(backend):
    model = _converted_mlp().to(DEVICE)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (make((4, 6)),), dynamic_shapes={"input": {0: batch}})
    for n in (1, 3, 9):
        x = make((n, 6), seed=n)
        torch.testing.assert_close(program.module()(x), model(x))
    program = torch.export.export(model, (make((2, 4, 6)),),
                                  dynamic_shapes={"input": {0: batch, 1: torch.export.Dim("seq")}})
    x = make((3, 5, 6), seed=1)
    torch.testing.assert_close(program.module()(x), model(x))


def test_compile_dynamic_no_recompile(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _converted_mlp().to(DEVICE)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for n in (2, 3, 5, 8):
        x1, x2 = make((n, 6), seed=n, requires_grad=True), make((n, 6), seed=n, requires_grad=True)
        y1, y2 = compiled(x1), model(x2)
        torch.testing.assert_close(y1, y2)
        y1.sum().backward()
        y2.sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for 4 batch sizes"


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation"):
        SF.linear(make((2, 3)), make((4, 3)), activation="gelu")
    with pytest.raises(ValueError, match="unknown activation"):
        SN.Linear(3, 4, activation="softplus")(make((2, 3)))


# ----------------------------------------------------------------- autocast
def test_autocast_leaves_float64_alone(backend):
    # torch's autocast casts no float64 operand: all-fp64 runs in fp64, a mix raises torch's dtype error.
    x, w, b = make((4, 6), torch.float64), make((3, 6), torch.float64), make((3,), torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = SF.linear(x, w, b, activation="tanh")
        ref = torch.tanh(TF.linear(x, w, b))
        assert y.dtype == ref.dtype == torch.float64
        torch.testing.assert_close(y, ref)
        check_same_error(ours, torch_linear, x.float(), w, b, match="same dtype")


@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_autocast_bf16(where):
    # Under autocast the op runs in bf16: on CPU on the reference backend, which "auto" chooses (the interpreter
    # has no bf16); on CUDA in the kernels. Values and (fp32) gradients as torch's.
    backend = "reference" if where == "cpu" else "triton"
    x, w, b = (make(s).to(where).requires_grad_() for s in ((64, 96), (48, 96), (48,)))
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with scratchops.use_backend("auto"), expect_ops(["linear_fwd"], backend=backend):
        with torch.autocast(where, dtype=torch.bfloat16):
            y = SF.linear(x, w, b, activation="relu")
            ref = TF.relu(TF.linear(x2, w2, b2))
        assert y.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(y, ref, rtol=1.6e-2, atol=1e-2)
        y.float().sum().backward()
    ref.float().sum().backward()
    for a, r in ((x, x2), (w, w2), (b, b2)):
        assert a.grad.dtype == r.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, r.grad, rtol=1.6e-2, atol=5e-2)


# Compute-dtype tolerance (relative to the largest element) of each autotuned GPU path, vs float64.
GPU_PATHS = {"bfloat16": (torch.bfloat16, False, 1.6e-2), "float16": (torch.float16, False, 2e-3),
             "tf32": (torch.float32, True, 4e-3), "float32": (torch.float32, False, 1e-5),
             "float64": (torch.float64, False, 1e-10)}


@pytest.mark.gpu
@pytest.mark.parametrize("path", sorted(GPU_PATHS))
def test_gpu_autotuned_paths(path, monkeypatch):
    # Shapes past one tile in every dim (odd, K not a multiple of any BLOCK_K), all three gradients.
    dtype, tf32, tol = GPU_PATHS[path]
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    x, w, b = make((300, 200), dtype), make((260, 200), dtype), make((260,), dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    exact = [t.detach().double().requires_grad_() for t in (x, w, b)]
    with scratchops.use_backend("triton"), expect_ops(ALL_OPS, backend="triton"):
        y = SF.linear(*leaves, activation="sigmoid")
        y.backward(torch.ones_like(y))
    ref = torch.sigmoid(TF.linear(*exact))
    ref.backward(torch.ones_like(ref))
    for got, want in [(y, ref)] + [(a.grad, e.grad) for a, e in zip(leaves, exact)]:
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol * want.abs().max().item())


# ----------------------------------------------------------------- modules
def test_module_matches_torch(backend):
    ref = torch.nn.Linear(6, 4, device=DEVICE)
    mine = SN.Linear(6, 4, device=DEVICE)
    assert isinstance(mine, torch.nn.Linear) and mine.state_dict().keys() == ref.state_dict().keys()
    mine.load_state_dict(ref.state_dict())
    x = make((2, 3, 6))
    torch.testing.assert_close(mine(x), ref(x))
    fused = SN.Linear(6, 4, bias=False, activation="sigmoid", device=DEVICE)
    assert "activation='sigmoid'" in repr(fused) and "bias=False" in repr(fused)


def _mlp_pair():
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                 torch.nn.Linear(16, 1), torch.nn.Sigmoid()).to(DEVICE)
    mine = torch.nn.Sequential(SN.Linear(8, 16, activation="relu"), SN.Linear(16, 16, activation="tanh"),
                               SN.Linear(16, 1, activation="sigmoid")).to(DEVICE)
    mine.load_state_dict({k.replace("2.", "1.").replace("4.", "2."): v for k, v in theirs.state_dict().items()})
    return mine, theirs


def test_mlp_trains_like_torch(backend):
    mine, theirs = _mlp_pair()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=g).to(DEVICE)
    target = torch.sigmoid(x[:, :1] - 0.5 * x[:, 1:2] * x[:, 2:3])  # a smooth regression target in (0, 1)
    losses = {}
    for name, model in (("mine", mine), ("theirs", theirs)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses[name] = []
        for _ in range(20):
            opt.zero_grad()
            loss = ((model(x) - target) ** 2).mean()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["mine"]), torch.tensor(losses["theirs"]), rtol=1e-4, atol=1e-6)
    assert losses["mine"][-1] < losses["mine"][0], "the model did not learn"


# ----------------------------------------------------------------- custom ops, AOT
def test_opcheck_without_bias(backend):
    # The contract test opchecks every op as its cases call them (all with a bias); these are the no-bias signatures.
    from scratchops import linear as L

    x, w, dy = make((5, 6)), make((4, 6)), make((5, 4))
    torch.library.opcheck(L.linear_fwd_op.custom, (backend, x, w, None, "none"))
    torch.library.opcheck(L.linear_bwd_weight_op.custom, (backend, dy, x, None, "none", False))


def _aot_rows_cover(rows, kernel, configs, constexprs):
    """Every config of every dtype class (and each element type of the class) is compiled with ``constexprs``."""
    from scratchops._kernels._gemm import CLASS_TYPES, input_precision

    for cls, cfgs in configs.items():
        for dt in CLASS_TYPES[cls]:
            for c in cfgs:
                want = {**{k: str(v) for k, v in c.kwargs.items()}, **{k: str(v) for k, v in constexprs.items()}}
                assert any(r["kernel"] == kernel.__name__ and r["dtypes"] == [f"*{dt}"] and
                           r["num_warps"] == c.num_warps and r["num_stages"] == c.num_stages and
                           r["constexprs"]["INPUT_PRECISION"] == input_precision(cls) and
                           all(r["constexprs"][f] == v for f, v in want.items()) for r in rows), (cls, dt, c)


def test_aot_compile_sm90_fwd():
    from scratchops._common import Activation
    from scratchops._kernels import linear as K

    rows = check_aot("scratchops._kernels.linear")
    assert {r["kernel"] for r in rows} == {"_linear_fwd_kernel", "_linear_fwd_tma_kernel"}
    for mode in K.Bias:
        for act in Activation:
            _aot_rows_cover(rows, K._linear_fwd_kernel, K.FWD_CONFIGS, {"BIAS": mode.value, "ACTIVATION": act.value})
    assert any(r["dtypes"] == ["*fp64"] for r in rows)
    # sm_90: every config of the tensor-core classes, with the epilogue costing the most (an (M, N) bias, sigmoid)
    _aot_rows_cover(rows, K._linear_fwd_tma_kernel, K.FWD_TMA_CONFIGS,
                    {"BIAS": K.Bias.MATRIX.value, "ACTIVATION": Activation.SIGMOID.value})


def test_aot_compile_sm90_bwd():
    from scratchops._common import Activation
    from scratchops._kernels import linear_bwd as K

    rows = check_aot("scratchops._kernels.linear_bwd")
    assert {r["kernel"] for r in rows} == {"_linear_bwd_input_kernel", "_linear_bwd_weight_kernel",
                                           "_linear_bwd_bias_kernel", "_linear_bwd_input_tma_kernel",
                                           "_linear_bwd_weight_tma_kernel"}
    sigmoid = Activation.SIGMOID.value
    _aot_rows_cover(rows, K._linear_bwd_input_tma_kernel, K.INPUT_TMA_CONFIGS, {"ACTIVATION": sigmoid})
    _aot_rows_cover(rows, K._linear_bwd_weight_tma_kernel, K.WEIGHT_TMA_CONFIGS,
                    {"ACTIVATION": sigmoid, "WITH_BIAS": True})
    for act in Activation:
        _aot_rows_cover(rows, K._linear_bwd_input_kernel, K.INPUT_CONFIGS, {"ACTIVATION": act.value})
        for with_bias in (False, True):
            _aot_rows_cover(rows, K._linear_bwd_weight_kernel, K.WEIGHT_CONFIGS,
                            {"ACTIVATION": act.value, "WITH_BIAS": with_bias})
        assert {tuple(r["dtypes"]) for r in rows if r["kernel"] == "_linear_bwd_bias_kernel" and
                r["constexprs"]["ACTIVATION"] == str(act.value)} == {("*fp16",), ("*bf16",), ("*fp32",), ("*fp64",)}
