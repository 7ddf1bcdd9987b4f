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

from scratchops._backend import (FLOAT_DTYPES, backend_op, check_inplace, check_tensor, choose_backend,
                                 compute_dtype)

KERNELS = "triton_kernels.activations"
RELU_DTYPES = FLOAT_DTYPES + (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


# ----------------------------------------------------------------- reference math
def sigmoid_fwd(x: torch.Tensor) -> torch.Tensor:
    xc = x if x.is_complex() else x.to(compute_dtype(x.dtype))
    return (1 / (1 + torch.exp(-xc))).to(x.dtype)


def sigmoid_bwd(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    yc = y if y.is_complex() else y.to(compute_dtype(y.dtype))
    return (dy * (yc * (1 - yc)).conj()).to(dy.dtype)


def relu_fwd(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 0, torch.zeros_like(x), x)


def relu_fwd_(x: torch.Tensor) -> None:
    x.masked_fill_(x < 0, 0)


def relu_bwd(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    # As torch's threshold_backward: only y <= 0 blocks the gradient, so NaN passes.
    return torch.where(y <= 0, torch.zeros_like(dy), dy)


def tanh_fwd(x: torch.Tensor) -> torch.Tensor:
    if x.is_complex():
        e = torch.exp(2 * x)
        return torch.where(x.real.abs() > 20, torch.sgn(x.real).to(x.dtype), (e - 1) / (e + 1))
    xc = x.to(compute_dtype(x.dtype))
    # tanh(|x|) = -m / (2 + m) with m = e^{-2|x|} - 1 (expm1 keeps it exact near 0)
    m = torch.expm1(-2 * xc.abs())
    y = torch.where(xc < 0, m / (2 + m), -m / (2 + m))
    return torch.where(xc == 0, xc, y).to(x.dtype)  # tanh(±0) = ±0, the sign kept as torch's


def tanh_bwd(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    yc = y if y.is_complex() else y.to(compute_dtype(y.dtype))
    return (dy * (1 - yc * yc).conj()).to(dy.dtype)


# ----------------------------------------------------------------- backend ops
sigmoid_fwd_op = backend_op("sigmoid_fwd", sigmoid_fwd, KERNELS)
sigmoid_bwd_op = backend_op("sigmoid_bwd", sigmoid_bwd, KERNELS)
relu_fwd_op = backend_op("relu_fwd", relu_fwd, KERNELS)
relu_fwd__op = backend_op("relu_fwd_", relu_fwd_, KERNELS, mutates_args=("x",))
relu_bwd_op = backend_op("relu_bwd", relu_bwd, KERNELS)
tanh_fwd_op = backend_op("tanh_fwd", tanh_fwd, KERNELS)
tanh_bwd_op = backend_op("tanh_bwd", tanh_bwd, KERNELS)


# ----------------------------------------------------------------- autograd
class Sigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, backend):
        y = sigmoid_fwd_op(backend, x)
        ctx.backend = backend
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        # dx = dy · y (1 - y)
        dx = sigmoid_bwd_op(ctx.backend, y, dy) if ctx.needs_input_grad[0] else None
        return dx, None  # x, backend


class Relu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, backend):
        y = relu_fwd_op(backend, x)
        ctx.backend = backend
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        # dx = dy · [y > 0]
        dx = relu_bwd_op(ctx.backend, y, dy) if ctx.needs_input_grad[0] else None
        return dx, None  # x, backend


class ReluInplace(Relu):
    """relu_(x): x is overwritten by y, marked dirty, and y (that is, x) is saved; Relu's backward."""

    @staticmethod
    def forward(ctx, x, backend):
        relu_fwd__op(backend, x)
        ctx.mark_dirty(x)
        ctx.backend = backend
        ctx.save_for_backward(x)
        return x


class Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, backend):
        y = tanh_fwd_op(backend, x)
        ctx.backend = backend
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        # dx = dy · (1 - y²)
        dx = tanh_bwd_op(ctx.backend, y, dy) if ctx.needs_input_grad[0] else None
        return dx, None  # x, backend


# ----------------------------------------------------------------- functional
def _as_floating(x: torch.Tensor) -> torch.Tensor:
    """Integer and bool inputs are promoted to the default dtype, as torch's sigmoid and tanh do."""
    if x.is_floating_point() or x.is_complex():
        return x
    return x.to(torch.get_default_dtype())


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    check_tensor("sigmoid", input)
    x = _as_floating(input)
    return Sigmoid.apply(x, choose_backend(x))


def tanh(input: torch.Tensor) -> torch.Tensor:
    check_tensor("tanh", input)
    x = _as_floating(input)
    return Tanh.apply(x, choose_backend(x))


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
            return input.copy_(Relu.apply(input, backend))
        return ReluInplace.apply(input, backend)
    return Relu.apply(input, backend)


def relu_(input: torch.Tensor) -> torch.Tensor:
    return relu(input, inplace=True)
