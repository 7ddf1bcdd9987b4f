"""sigmoid, relu, tanh: every test tier of DESIGN.md, on both backends."""
import pytest
import torch
import torch.nn.functional as TF

import scratchops
import scratchops.functional as SF
import scratchops.nn as SN
from tests.helpers import (DEVICE, PARITY_DTYPES, check_aot, check_compile_fullgraph, check_gradcheck, check_parity,
                           check_same_error, check_sass, expect_ops, make)

BLOCK = 1024  # triton_kernels.activations.BLOCK: sizes around it exercise the masks
OPS = {"sigmoid": (SF.sigmoid, torch.sigmoid), "relu": (SF.relu, TF.relu), "tanh": (SF.tanh, torch.tanh)}
NAMES = sorted(OPS)
AWKWARD_SHAPES = [(), (0,), (1,), (BLOCK - 1,), (BLOCK + 1,), (3, 0, 2), (7, 13), (2, 3, 5, 7)]
SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e4, -1e4, 20.0, -20.0, 1e-8, -1e-8, 3e-4]


def _ops(name):
    return [f"{name}_fwd", f"{name}_bwd"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(7, 13), ()])
def test_gradcheck(backend, name, shape):
    x = make(shape, torch.float64, requires_grad=True)
    check_gradcheck(OPS[name][0], x, ops=_ops(name))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", PARITY_DTYPES)
@pytest.mark.parametrize("shape", AWKWARD_SHAPES)
def test_parity(backend, name, dtype, shape):
    check_parity(*OPS[name], make(shape, dtype))


@pytest.mark.parametrize("name", NAMES)
def test_tanh_precise_near_zero_and_large(backend, name):
    x = torch.tensor([1e-30, -1e-12, 1e-6, 3e-4, 0.05, 0.7, 5.0, -9.0, 40.0, -800.0], dtype=torch.float64,
                     device=DEVICE)
    check_parity(*OPS[name], x, grad=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_special_values(backend, name, dtype):
    x = torch.tensor(SPECIAL, dtype=dtype, device=DEVICE)
    check_parity(*OPS[name], x, equal_nan=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "storage_offset"])
def test_non_contiguous_input(backend, name, layout):
    base = make((4, 6, 5, 3))
    x = {"transposed": base.transpose(1, 3), "sliced": base[:, ::2, 1:, :],
         "channels_last": base.to(memory_format=torch.channels_last), "storage_offset": base[1:]}[layout]
    out = check_parity(*OPS[name], x)
    assert out.stride() == OPS[name][1](x).stride(), "output layout differs from torch's"
    ours = OPS[name][0](x)  # the view itself, storage offset included
    torch.testing.assert_close(ours, OPS[name][1](x))
    assert ours.stride() == OPS[name][1](x).stride()


@pytest.mark.parametrize("name", NAMES)
def test_expanded_grad_output(backend, name):
    x = make((5, 9))
    check_parity(*OPS[name], x, grad_output=torch.ones((), device=DEVICE).expand(5, 9))
    check_parity(*OPS[name], x, grad_output=make((9,)).expand(5, 9))


@pytest.mark.parametrize("name", NAMES)
def test_sum_backward(backend, name):
    x1, x2 = make((6, 7), requires_grad=True), make((6, 7), requires_grad=True)
    OPS[name][0](x1).sum().backward()
    OPS[name][1](x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.int8, torch.bool])
def test_integer_inputs(backend, name, dtype):
    x = torch.tensor([-3, -1, 0, 1, 2, 7], device=DEVICE).to(dtype)
    if name == "relu" and dtype == torch.bool:
        check_same_error(*OPS[name], x, match="Boolean inputs not supported for relu")
    else:
        check_parity(*OPS[name], x, grad=False)


def test_complex(backend):
    x = torch.tensor([0.5 + 1j, -2 - 0.3j], dtype=torch.complex128, device=DEVICE)
    check_same_error(SF.relu, TF.relu, x)
    if backend == "triton":  # the kernels take real dtypes only: an explicit request cannot be met
        with pytest.raises(RuntimeError, match="backend 'triton' was requested but cannot run"):
            SF.sigmoid(x)
        with scratchops.use_backend("auto"):  # auto falls back to the reference formulas
            check_parity(SF.tanh, torch.tanh, x)
    else:
        for name in ("sigmoid", "tanh"):
            check_parity(*OPS[name], x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [[1.0, 2.0], 3.0, None])
def test_not_a_tensor(name, bad):
    check_same_error(*OPS[name], bad, match="must be Tensor")


def test_relu_inplace(backend):
    for shape in [(BLOCK + 3,), (0,)]:
        leaf = make(shape, requires_grad=True)
        x = leaf * 1.0
        version = x._version
        y = SF.relu(x, inplace=True)
        assert y is x and x._version > version
        torch.testing.assert_close(y, TF.relu(leaf.detach()))
        y.backward(torch.ones_like(y))
        torch.testing.assert_close(leaf.grad, (leaf.detach() > 0).float())
    inplace = (lambda t: SF.relu(t, inplace=True)), (lambda t: TF.relu(t, inplace=True))
    check_same_error(*inplace, make((4,), requires_grad=True), match="leaf Variable")
    check_same_error(*inplace, make((4, 2), requires_grad=True)[1:], match="view of a leaf Variable")


def test_relu_inplace_non_contiguous(backend):
    base = make((6, 8))
    expect = base.clone()
    TF.relu(expect[:, ::3], inplace=True)
    out = SF.relu_(base[:, ::3])
    assert out.data_ptr() == base[:, ::3].data_ptr()
    torch.testing.assert_close(base, expect)


def test_relu_inplace_overlapping_memory(backend):
    # An expanded tensor has elements sharing memory: torch refuses the in-place write (both backends must too).
    from scratchops._backend import LAUNCHES

    before = LAUNCHES.copy()
    check_same_error(lambda t: SF.relu(t, inplace=True), lambda t: TF.relu(t, inplace=True),
                     make((3, 1)).expand(3, 4), match="more than one element")
    assert LAUNCHES == before  # raised on the host, before any kernel


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_tanh_signed_zero(backend, dtype):
    x = torch.tensor([-0.0, 0.0, -1e-30, 1e-30, -2.0], dtype=dtype, device=DEVICE)
    y = SF.tanh(x)
    assert torch.equal(y.signbit(), torch.tanh(x).signbit())
    torch.testing.assert_close(y, torch.tanh(x))


@pytest.mark.parametrize("ours,theirs,kwargs", [(SN.ReLU, torch.nn.ReLU, {}), (SN.ReLU, torch.nn.ReLU, {"inplace": True}),
                                                 (SN.Sigmoid, torch.nn.Sigmoid, {}), (SN.Tanh, torch.nn.Tanh, {})])
def test_modules(backend, ours, theirs, kwargs):
    mine, ref = ours(**kwargs), theirs(**kwargs)
    assert isinstance(mine, theirs) and repr(mine) == repr(ref)
    assert mine.state_dict().keys() == ref.state_dict().keys()
    x = make((3, 17))
    torch.testing.assert_close(mine(x.clone()), ref(x.clone()))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_modules(backend, compiler):
    """The nn modules chained, on both compilers (test_contract compiles each functional with aot_eager)."""
    check_compile_fullgraph(torch.nn.Sequential(SN.Tanh(), SN.ReLU(), SN.Sigmoid()), (4, 33), compiler)


def test_torch_compile_fullgraph_relu_inplace(backend):
    # ReLU(inplace=True) on a strided view of an intermediate, as in a model: values and grads as eager torch.
    def model(x, relu):
        h = x * 2.0
        relu(h[:, ::2])
        return h

    compiled = torch.compile(lambda x: model(x, SN.ReLU(inplace=True)), fullgraph=True, backend="aot_eager")
    x1, x2 = make((4, 33), requires_grad=True), make((4, 33), requires_grad=True)
    y1, y2 = compiled(x1), model(x2, torch.nn.ReLU(inplace=True))
    torch.testing.assert_close(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    x3 = make((4, 33))  # no grad anywhere: the traced path differs
    torch.testing.assert_close(compiled(x3), model(x3, torch.nn.ReLU(inplace=True)))


@pytest.mark.parametrize("name", ["sigmoid", "relu", "tanh"])
def test_opcheck_second_backward_and_inplace(backend, name):
    """The backend ops test_contract's opcheck (first derivatives of the verify cases) does not reach."""
    from scratchops import activations as A

    y = getattr(A, f"{name}_fwd")(make((5, 6)))
    _, _, bwd_y = A.OPS[name]
    torch.library.opcheck(bwd_y.custom, (backend, y, make((5, 6), seed=1), make((5, 6), seed=2)))
    if name == "relu":
        torch.library.opcheck(A.relu_fwd__op.custom, (backend, make((5, 6))))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(7, 13), ()])
def test_gradgradcheck(backend, name, shape):
    x = make(shape, torch.float64, requires_grad=True)
    with expect_ops([f"{name}_bwd_y"] if name != "relu" or shape else []):
        assert torch.autograd.gradgradcheck(OPS[name][0], (x,))


@pytest.mark.parametrize("name", NAMES)
def test_create_graph_matches_torch(backend, name):
    """A gradient penalty through the activation: the weight of the second-order term is torch's."""
    ours, theirs = OPS[name]
    x1, x2 = make((4, 5), torch.float64, requires_grad=True), make((4, 5), torch.float64, requires_grad=True)
    for fn, x in ((ours, x1), (theirs, x2)):
        (g,) = torch.autograd.grad(fn(x).pow(2).sum(), x, create_graph=True)
        assert g.requires_grad
        (g.pow(2).sum() + fn(x).sum()).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("name", NAMES)
def test_third_and_fourth_derivatives_match_torch(backend, name):
    ours, theirs = OPS[name]
    x = make((6,), torch.float64)
    derivatives = []
    for fn in (ours, theirs):
        xi = x.clone().requires_grad_()
        g, out = fn(xi).sum(), []
        for _ in range(4):
            (g,) = torch.autograd.grad(g, xi, create_graph=True)
            out.append(g)
            g = g.sum()
        derivatives.append(out)
    for a, b in zip(*derivatives):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("transform", ["vmap", "grad", "jacrev", "jacfwd", "hessian", "jvp"])
def test_torch_func(backend, name, transform):
    from torch import func

    x = make((3, 4), torch.float64)
    apply = {"vmap": lambda f: func.vmap(f)(x),
             "grad": lambda f: func.grad(lambda u: f(u).sum())(x),
             "jacrev": lambda f: func.jacrev(f)(x[0]),
             "jacfwd": lambda f: func.jacfwd(f)(x[0]),
             "hessian": lambda f: func.hessian(lambda u: f(u).sum())(x[0]),
             "jvp": lambda f: func.jvp(f, (x,), (make((3, 4), torch.float64, seed=3),))[1]}[transform]
    with expect_ops([f"{name}_fwd"]):
        ours = apply(OPS[name][0])
    torch.testing.assert_close(ours, apply(OPS[name][1]))


def test_aot_compile_sm90():
    rows = check_aot("scratchops._kernels.activations")
    assert {r["kernel"] for r in rows} == {"_activation_fwd_kernel", "_activation_bwd_kernel",
                                           "_activation_bwd_y_kernel"}
    assert len(rows) == 3 * 3 * 4 + 5  # sigmoid, relu, tanh x fwd, bwd, bwd_y x 4 float types, + relu fwd on ints
    # contiguous streams: 16-byte accesses in every compile (1-byte relu takes 2 warps: 16 elements a thread)
    check_sass(rows, vector128=("_activation_fwd_kernel", "_activation_bwd_kernel", "_activation_bwd_y_kernel"))


@pytest.mark.gpu
def test_more_than_2_31_elements():
    """int64 offsets: the elements past index 2^31 are reached (fp16, 4 GiB per tensor)."""
    n = 2**31 + 7
    x = torch.full((n,), -1.0, dtype=torch.float16, device="cuda")
    x[-3:] = 2.0
    y = SF.relu(x)
    assert y[-3:].eq(2).all() and y[-10:-3].eq(0).all() and y[:1024].eq(0).all()
    del y
    dx = torch.ops.scratchops.relu_bwd("triton", x, torch.ones_like(x))
    assert dx[-3:].eq(1).all() and dx[-10:-3].eq(0).all()
