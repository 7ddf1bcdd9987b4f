r"""Activations: sigmoid, ReLU and tanh, applied elementwise.

Forward, with y the output:

    sigmoid   y = σ(x) = 1 / (1 + e^{-x})
    relu      y = max(x, 0)
    tanh      y = (e^{x} - e^{-x}) / (e^{x} + e^{-x})

Backward, written with the saved output y only (the input is never kept):

    sigmoid   dx = dy · y (1 - y)          since σ'(x) = σ(x)(1 - σ(x))
    relu      dx = dy · [y > 0]            the subgradient 0 is taken at x = 0
    tanh      dx = dy · (1 - y²)           since tanh' = 1 - tanh²

For complex inputs (reference backend only) autograd wants dx = dy · conj(f'(x)).

Second derivatives. The backward dx = dy · s(y) is itself an op (ActivationGradFunction) with a
hand-derived backward, so gradients of gradients run the same kernels. With s(y) = act'(z) written
in the output and s'(y) its derivative in y:

    sigmoid   s(y) = y (1 - y)     s'(y) = 1 - 2y
    relu      s(y) = [y > 0]       s'(y) = 0
    tanh      s(y) = 1 - y²        s'(y) = -2y

    for an incoming g (the gradient of dx):   d(dy) = g · s(y)        (the first backward's kernel)
                                              d(y)  = g · dy · s'(y)  (activation_grad_y)

and autograd chains d(y) through y = act(x). Forward mode (jvp) uses the same two kernels:
y_t = x_t · s(y) and dx_t = dy_t · s(y) + y_t · dy · s'(y). Higher orders: g · dy · s'(y) is linear in g
and dy, and s''(y) is a constant (-2 for sigmoid and tanh, 0 for relu), so every further derivative is a
product of the incoming tensors (ActivationGradYFunction's backward).
"""
import torch

from scratchops._backend import Function, backend_op, choose_backend, forward_mode, with_jvp
from scratchops._common import FLOAT_DTYPES, INT_DTYPES, check_inplace, check_tensor, compute_dtype

KERNELS = "activations"
RELU_DTYPES = FLOAT_DTYPES + INT_DTYPES


# ----------------------------------------------------------------- reference math (one owner per formula)
def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    """y = act(z) for real z in its compute dtype: the formulas linear's epilogue uses too."""
    if activation == "relu":
        return torch.where(z < 0, torch.zeros_like(z), z)
    if activation == "sigmoid":
        return 1 / (1 + torch.exp(-z))
    if activation == "tanh":
        # tanh(|z|) = -m / (2 + m) with m = e^{-2|z|} - 1 (expm1 keeps it exact near 0)
        m = torch.expm1(-2 * z.abs())
        y = torch.where(z < 0, m / (2 + m), -m / (2 + m))
        return torch.where(z == 0, z, y)  # tanh(±0) = ±0, the sign kept as torch's
    return z


def activation_grad(dy: torch.Tensor, y: torch.Tensor, activation: str) -> torch.Tensor:
    """dz = dy · act'(z) written with the output y (complex: dy · conj(act'(z)))."""
    if activation == "relu":
        # As torch's threshold_backward: only y <= 0 blocks the gradient, so NaN passes.
        return torch.where(y <= 0, torch.zeros_like(dy), dy)
    if activation == "sigmoid":
        return dy * (y * (1 - y)).conj()
    if activation == "tanh":
        return dy * (1 - y * y).conj()
    return dy


def activation_grad_y(y: torch.Tensor, dy: torch.Tensor, g: torch.Tensor, activation: str) -> torch.Tensor:
    """d(dx)/dy applied to g: g · dy · s'(y), the second-derivative term (see the module docstring)."""
    if activation == "sigmoid":
        return g * dy * (1 - 2 * y)
    if activation == "tanh":
        return g * dy * (-2 * y)
    return torch.zeros_like(g)  # relu, and the identity


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_complex() else t.to(compute_dtype(t.dtype))


def sigmoid_fwd(x: torch.Tensor) -> torch.Tensor:
    return activate(_compute(x), "sigmoid").to(x.dtype)


def sigmoid_bwd(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return activation_grad(dy, _compute(y), "sigmoid").to(dy.dtype)


def relu_fwd(x: torch.Tensor) -> torch.Tensor:
    return activate(x, "relu")


def relu_fwd_(x: torch.Tensor) -> None:
    x.masked_fill_(x < 0, 0)


def relu_bwd(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return activation_grad(dy, y, "relu")


def tanh_fwd(x: torch.Tensor) -> torch.Tensor:
    if x.is_complex():
        e = torch.exp(2 * x)
        return torch.where(x.real.abs() > 20, torch.sgn(x.real).to(x.dtype), (e - 1) / (e + 1))
    return activate(_compute(x), "tanh").to(x.dtype)


def tanh_bwd(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return activation_grad(dy, _compute(y), "tanh").to(dy.dtype)


def sigmoid_bwd_y(y: torch.Tensor, dy: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return activation_grad_y(_compute(y), _compute(dy), _compute(g), "sigmoid").to(g.dtype)


def relu_bwd_y(y: torch.Tensor, dy: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return activation_grad_y(y, dy, g, "relu")


def tanh_bwd_y(y: torch.Tensor, dy: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return activation_grad_y(_compute(y), _compute(dy), _compute(g), "tanh").to(g.dtype)


# ----------------------------------------------------------------- backend ops
OPS = {  # activation -> (forward, backward, second-derivative) backend ops
    act: tuple(backend_op(f"{act}_{part}", globals()[f"{act}_{part}"], KERNELS) for part in ("fwd", "bwd", "bwd_y"))
    for act in ("sigmoid", "relu", "tanh")}
relu_fwd__op = backend_op("relu_fwd_", relu_fwd_, KERNELS, mutates_args=("x",))


# ----------------------------------------------------------------- autograd
def _batched_first(info, in_dims, *tensors):
    """vmap: the batch dim of every tensor moved to the front (unbatched ones expanded to it)."""
    return [t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
            for t, d in zip(tensors, in_dims)]


class ActivationFunction(Function):
    """y = act(x) for act in sigmoid, relu, tanh; backward dx = dy · s(y) (ActivationGradFunction)."""

    @staticmethod
    def forward(x, activation, backend):
        return OPS[activation][0](backend, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.activation, ctx.backend = inputs
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dx = _activation_grad(y, dy, ctx.activation, ctx.backend) if ctx.needs_input_grad[0] else None
        return dx, None, None  # x, activation, backend

    @staticmethod
    def vmap(info, in_dims, x, activation, backend):
        (x,) = _batched_first(info, in_dims[:1], x)
        return _activation(x, activation, backend), 0


class ActivationGradFunction(Function):
    """dx = dy · s(y) (the first backward); its backward: d(dy) = g · s(y), d(y) = g · dy · s'(y)."""

    fresh_outputs = True  # a backward without create_graph calls forward directly (see _backend.Function)

    @staticmethod
    def forward(y, dy, activation, backend):
        return OPS[activation][1](backend, y, dy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, dy, ctx.activation, ctx.backend = inputs
        ctx.save_for_backward(y, dy)
        ctx.save_for_forward(y, dy)

    @staticmethod
    def backward(ctx, g):
        y, dy = ctx.saved_tensors
        if y.is_complex() or dy.is_complex():
            raise RuntimeError("scratchops: second derivatives of complex activations are not implemented")
        need_y, need_dy = ctx.needs_input_grad[:2]
        grad_dy = _activation_grad(y, g, ctx.activation, ctx.backend) if need_dy else None
        grad_y = ActivationGradYFunction.apply(y, dy, g, ctx.activation, ctx.backend) if need_y else None
        return grad_y, grad_dy, None, None  # y, dy, activation, backend

    @staticmethod
    def vmap(info, in_dims, y, dy, activation, backend):
        y, dy = _batched_first(info, in_dims[:2], y, dy)
        return _activation_grad(y, dy, activation, backend), 0


SECOND_DERIVATIVE_OF_S = {"sigmoid": -2.0, "tanh": -2.0, "relu": 0.0}  # s''(y): s is a polynomial of degree ≤ 2


class ActivationGradYFunction(Function):
    """g · dy · s'(y), the second-derivative term (linear in g and dy); its own derivatives close the series."""

    fresh_outputs = True

    @staticmethod
    def forward(y, dy, g, activation, backend):
        return OPS[activation][2](backend, y, dy, g)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, dy, g, ctx.activation, ctx.backend = inputs
        ctx.save_for_backward(y, dy, g)

    @staticmethod
    def backward(ctx, h):
        # out = g · dy · s'(y) is linear in g and in dy; s'' is a constant (sigmoid, tanh: -2; relu: 0), so
        # d(y) = h · g · dy · s''(y) is a plain product (differentiable to any order) and higher terms vanish.
        y, dy, g = ctx.saved_tensors
        need_y, need_dy, need_g = ctx.needs_input_grad[:3]
        grad_dy = ActivationGradYFunction.apply(y, g, h, ctx.activation, ctx.backend) if need_dy else None
        grad_g = ActivationGradYFunction.apply(y, dy, h, ctx.activation, ctx.backend) if need_g else None
        grad_y = None
        if need_y:
            grad_y = h * g * dy * SECOND_DERIVATIVE_OF_S[ctx.activation]
        return grad_y, grad_dy, grad_g, None, None  # y, dy, g, activation, backend

    @staticmethod
    def vmap(info, in_dims, y, dy, g, activation, backend):
        y, dy, g = _batched_first(info, in_dims[:3], y, dy, g)
        return ActivationGradYFunction.apply(y, dy, g, activation, backend), 0


def _activation_jvp(ctx, x_t, _activation, _backend):
    # y_t = x_t · s(y)
    (y,) = ctx.saved_tensors
    return _activation_grad(y, x_t, ctx.activation, ctx.backend)  # a Function, so batched tangents keep its vmap rule


def _activation_grad_jvp(ctx, y_t, dy_t, _activation, _backend):
    # dx_t = dy_t · s(y) + y_t · dy · s'(y)
    y, dy = ctx.saved_tensors
    out = _activation_grad(y, dy_t, ctx.activation, ctx.backend) if dy_t is not None else None
    if y_t is not None:
        term = ActivationGradYFunction.apply(y, dy, y_t, ctx.activation, ctx.backend)
        out = term if out is None else out + term
    return out


# Forward mode (torch.func.jvp / jacfwd / hessian, forward-AD dual tensors); dynamo cannot trace a Function with jvp.
ActivationJvpFunction = with_jvp(ActivationFunction, _activation_jvp)
ActivationGradJvpFunction = with_jvp(ActivationGradFunction, _activation_grad_jvp)


def _activation(x, activation, backend):
    return (ActivationJvpFunction if forward_mode() else ActivationFunction).apply(x, activation, backend)


def _activation_grad(y, dy, activation, backend):
    return (ActivationGradJvpFunction if forward_mode() else ActivationGradFunction).apply(y, dy, activation, backend)


class ReluInplaceFunction(ActivationFunction):
    """relu_(x): x is overwritten by y, marked dirty, and y (that is, x) is saved; ActivationFunction's backward."""

    @staticmethod
    def forward(x, activation, backend):
        relu_fwd__op(backend, x)
        return x

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.activation, ctx.backend = inputs
        ctx.mark_dirty(x)
        ctx.save_for_backward(output)


# ----------------------------------------------------------------- functional
def _as_floating(x: torch.Tensor) -> torch.Tensor:
    """Integer and bool inputs are promoted to the default dtype, as torch's sigmoid and tanh do."""
    if x.is_floating_point() or x.is_complex():
        return x
    return x.to(torch.get_default_dtype())


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    check_tensor("sigmoid", input)
    x = _as_floating(input)
    return _activation(x, "sigmoid", choose_backend(x))


def tanh(input: torch.Tensor) -> torch.Tensor:
    check_tensor("tanh", input)
    x = _as_floating(input)
    return _activation(x, "tanh", choose_backend(x))


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    check_tensor("relu", input)
    if input.dtype == torch.bool:
        raise RuntimeError("Boolean inputs not supported for relu")
    if input.is_complex():
        raise NotImplementedError("clamp is not supported for complex types")
    backend = choose_backend(input, RELU_DTYPES)
    if inplace:
        check_inplace(input)
        if any(size > 1 and stride == 0 for size, stride in zip(input.shape, input.stride())):
            # elements sharing memory (an expanded tensor): torch refuses to write them
            raise RuntimeError("unsupported operation: more than one element of the written-to tensor refers to a "
                               "single memory location. Please clone() the tensor before performing the operation.")
        if torch.compiler.is_compiling():
            # Dynamo cannot trace ctx.mark_dirty: the out-of-place op written back traces to the same result.
            return input.copy_(_activation(input, "relu", backend))
        return ReluInplaceFunction.apply(input, "relu", backend)
    return _activation(input, "relu", backend)


def relu_(input: torch.Tensor) -> torch.Tensor:
    return relu(input, inplace=True)
