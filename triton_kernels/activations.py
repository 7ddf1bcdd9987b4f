"""Triton kernels for sigmoid, ReLU and tanh: 1-D grids over the flat elements.

Forward kernels read x and write y; backward kernels read the saved output y and
the incoming gradient dy and write dx. Offsets are int64; math runs in fp32
(fp64 for fp64 tensors); loads and stores use the tensor's dtype.
"""
import torch
import triton
import triton.language as tl

from triton_kernels._launch import (FLOAT_DTYPE_NAMES, acc_type, elementwise_out, grid_1d, is_dense,
                                    same_layout)

BLOCK = 1024
NUM_WARPS = 4
RELU_INT_DTYPE_NAMES = ("i8", "u8", "i16", "i32", "i64")


@triton.jit
def _offsets(n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _sigmoid_fwd_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    x = acc_type(tl.load(x_ptr + offs, mask=mask))
    # σ(x) = 1 / (1 + e^{-x}): e^{-x} overflows to inf for x << 0, giving exactly 0.
    y = 1.0 / (1.0 + tl.exp(-x))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sigmoid_bwd_kernel(y_ptr, dy_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    y = acc_type(tl.load(y_ptr + offs, mask=mask))
    dy = acc_type(tl.load(dy_ptr + offs, mask=mask))
    # dx = dy · σ'(x) = dy · y (1 - y)
    tl.store(dx_ptr + offs, (dy * y * (1.0 - y)).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_fwd_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask)
    # relu(x) = max(x, 0), written so that NaN passes through as torch's does.
    tl.store(y_ptr + offs, tl.where(x < 0, 0, x), mask=mask)


@triton.jit
def _relu_bwd_kernel(y_ptr, dy_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    y = tl.load(y_ptr + offs, mask=mask)
    dy = tl.load(dy_ptr + offs, mask=mask)
    # dx = dy · [y > 0]; as torch's threshold_backward, only y <= 0 blocks the gradient (NaN passes).
    tl.store(dx_ptr + offs, tl.where(y <= 0, 0, dy).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tanh_fwd_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    x = acc_type(tl.load(x_ptr + offs, mask=mask))
    # tanh(|x|) = -m / (2 + m) with m = expm1(-2|x|), free of cancellation near 0.
    # expm1(t) by Kahan's trick: u = e^t; t if u == 1, -1 if u - 1 == -1, else (u - 1) t / ln u.
    t = -2.0 * tl.abs(x)
    u = tl.exp(t)
    m = tl.where(u == 1.0, t, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * t / tl.log(u)))
    y = -m / (2.0 + m)
    y = tl.where(x < 0, -y, y)
    y = tl.where(x == 0, x, y)  # tanh(±0) = ±0, the sign kept as torch's
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tanh_bwd_kernel(y_ptr, dy_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    y = acc_type(tl.load(y_ptr + offs, mask=mask))
    dy = acc_type(tl.load(dy_ptr + offs, mask=mask))
    # dx = dy · (1 - y²)
    tl.store(dx_ptr + offs, (dy * (1.0 - y * y)).to(dx_ptr.dtype.element_ty), mask=mask)


def _unary(kernel, x: torch.Tensor) -> torch.Tensor:
    y = elementwise_out(x)
    if y.numel():
        kernel[grid_1d(y.numel(), BLOCK)](same_layout(x, y), y, y.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y


def _backward(kernel, y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    dx = elementwise_out(y, dtype=dy.dtype)
    if dx.numel():
        kernel[grid_1d(dx.numel(), BLOCK)](same_layout(y, dx), same_layout(dy, dx), dx, dx.numel(),
                                            BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dx


def sigmoid_fwd(x: torch.Tensor) -> torch.Tensor:
    return _unary(_sigmoid_fwd_kernel, x)


def sigmoid_bwd(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return _backward(_sigmoid_bwd_kernel, y, dy)


def relu_fwd(x: torch.Tensor) -> torch.Tensor:
    return _unary(_relu_fwd_kernel, x)


def relu_fwd_(x: torch.Tensor) -> None:
    """In place: y is written over x (through a dense copy, written back, when x has gaps)."""
    if not x.numel():
        return
    dense = x if is_dense(x) else x.contiguous()
    _relu_fwd_kernel[grid_1d(x.numel(), BLOCK)](dense, dense, x.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    if dense is not x:
        x.copy_(dense)


def relu_bwd(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return _backward(_relu_bwd_kernel, y, dy)


def tanh_fwd(x: torch.Tensor) -> torch.Tensor:
    return _unary(_tanh_fwd_kernel, x)


def tanh_bwd(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return _backward(_tanh_bwd_kernel, y, dy)


def _configs(kernel, n_tensors, dtype_names):
    names = ("x_ptr", "y_ptr") if n_tensors == 2 else ("y_ptr", "dy_ptr", "dx_ptr")
    for dt in dtype_names:
        yield kernel, {**{p: f"*{dt}" for p in names}, "n": "i64", "BLOCK": "constexpr"}, {"BLOCK": BLOCK}, NUM_WARPS


# Every (kernel, signature, constexprs, num_warps) the launchers above launch with.
AOT_CONFIGS = [
    *_configs(_sigmoid_fwd_kernel, 2, FLOAT_DTYPE_NAMES),
    *_configs(_sigmoid_bwd_kernel, 3, FLOAT_DTYPE_NAMES),
    *_configs(_relu_fwd_kernel, 2, FLOAT_DTYPE_NAMES + RELU_INT_DTYPE_NAMES),
    *_configs(_relu_bwd_kernel, 3, FLOAT_DTYPE_NAMES),
    *_configs(_tanh_fwd_kernel, 2, FLOAT_DTYPE_NAMES),
    *_configs(_tanh_bwd_kernel, 3, FLOAT_DTYPE_NAMES),
]
