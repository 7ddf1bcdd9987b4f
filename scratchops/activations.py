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
"""
import torch

from scratchops._backend import backend_op, choose_backend
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


# ----------------------------------------------------------------- backend ops
sigmoid_fwd_op = backend_op("sigmoid_fwd", sigmoid_fwd, KERNELS)
sigmoid_bwd_op = backend_op("sigmoid_bwd", sigmoid_bwd, KERNELS)
relu_fwd_op = backend_op("relu_fwd", relu_fwd, KERNELS)
relu_fwd__op = backend_op("relu_fwd_", relu_fwd_, KERNELS, mutates_args=("x",))
relu_bwd_op = backend_op("relu_bwd", relu_bwd, KERNELS)
tanh_fwd_op = backend_op("tanh_fwd", tanh_fwd, KERNELS)
tanh_bwd_op = backend_op("tanh_bwd", tanh_bwd, KERNELS)


# ----------------------------------------------------------------- autograd
def _activation_function(name: str, fwd_op, bwd_op, formula: str):
    """The autograd.Function of an activation: y = fwd(x) saved, dx = bwd(y, dy) (``formula``)."""

    def forward(x, backend):
        return fwd_op(backend, x)

    def setup_context(ctx, inputs, output):
        ctx.backend = inputs[1]
        ctx.save_for_backward(output)

    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dx = bwd_op(ctx.backend, y, dy) if ctx.needs_input_grad[0] else None
        return dx, None  # x, backend

    backward.__doc__ = formula
    return type(name, (torch.autograd.Function,), {
        "__doc__": f"{name[:-len('Function')].lower()}(x, backend); backward {formula}",
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward)})


SigmoidFunction = _activation_function("SigmoidFunction", sigmoid_fwd_op, sigmoid_bwd_op, "dx = dy · y (1 - y)")
ReluFunction = _activation_function("ReluFunction", relu_fwd_op, relu_bwd_op, "dx = dy · [y > 0]")
TanhFunction = _activation_function("TanhFunction", tanh_fwd_op, tanh_bwd_op, "dx = dy · (1 - y²)")


class ReluInplaceFunction(ReluFunction):
    """relu_(x): x is overwritten by y, marked dirty, and y (that is, x) is saved; ReluFunction's backward."""

    @staticmethod
    def forward(x, backend):
        relu_fwd__op(backend, x)
        return x

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.backend = inputs
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
    return SigmoidFunction.apply(x, choose_backend(x))


def tanh(input: torch.Tensor) -> torch.Tensor:
    check_tensor("tanh", input)
    x = _as_floating(input)
    return TanhFunction.apply(x, choose_backend(x))


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
            return input.copy_(ReluFunction.apply(input, backend))
        return ReluInplaceFunction.apply(input, backend)
    return ReluFunction.apply(input, backend)


def relu_(input: torch.Tensor) -> torch.Tensor:
    return relu(input, inplace=True)
