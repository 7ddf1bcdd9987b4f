"""Triton kernels for sigmoid, ReLU and tanh: 1-D grids over the flat elements.

The activation formulas live here once, as two ``@triton.jit`` helpers that every kernel applying
an activation uses (these kernels, and linear's epilogue and backward):

* :func:`activate`: y = act(z);
* :func:`activation_grad`: dz = dy · act'(z), written with the output y.

One forward, one backward and one second-derivative kernel serve the three ops, the op chosen by the ACTIVATION
constexpr (``scratchops._common.Activation``). Offsets are int64; math runs in the ACC dtype
(fp64 for fp64 tensors, fp32 otherwise); loads and stores use the tensor's dtype.
"""
import torch
import triton
import triton.language as tl

from .._common import Activation
from ._launch import (FLOAT_TYPES, INT_TYPES, Kernel, acc_dtype, cdiv, config, elementwise_out, flat_offsets,
                       is_dense, same_layout)

NONE = tl.constexpr(Activation.NONE.value)
RELU = tl.constexpr(Activation.RELU.value)
SIGMOID = tl.constexpr(Activation.SIGMOID.value)
TANH = tl.constexpr(Activation.TANH.value)


# ----------------------------------------------------------------- the formulas (one owner)
@triton.jit
def activate(z, ACTIVATION: tl.constexpr, EXACT: tl.constexpr):
    """y = act(z) in z's dtype (the compute dtype; relu also takes integers).

    relu     max(z, 0), written so that NaN passes through as torch's does
    sigmoid  1 / (1 + e^{-z}): e^{-z} overflows to inf for z << 0, giving exactly 0
    tanh     tanh(|z|) = -m / (2 + m) with m = e^{-2|z|} - 1, the sign restored, tanh(±0) = ±0.
             EXACT: m by expm1 (Kahan: u = e^t; t if u == 1, -1 if u - 1 == -1, else (u - 1) t / ln u),
             free of cancellation near 0. Otherwise m = u - 1, about one ulp of 1 in absolute terms:
             a GEMM epilogue's own rounding, where expm1's registers would make big tiles spill.
    """
    if ACTIVATION == RELU:
        z = tl.where(z < 0, 0, z)
    elif ACTIVATION == SIGMOID:
        z = 1.0 / (1.0 + tl.exp(-z))
    elif ACTIVATION == TANH:
        t = -2.0 * tl.abs(z)
        u = tl.exp(t)
        if EXACT:
            m = tl.where(u == 1.0, t, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * t / tl.log(u)))
        else:
            m = u - 1.0
        y = -m / (2.0 + m)
        y = tl.where(z < 0, -y, y)
        z = tl.where(z == 0, z, y)
    return z


@triton.jit
def activation_grad(dy, y, ACTIVATION: tl.constexpr):
    """dz = dy · act'(z), from the output y, both in the compute dtype.

    relu     dy · [y > 0]: as torch's threshold_backward only y <= 0 blocks the gradient (NaN passes)
    sigmoid  dy · y (1 - y)
    tanh     dy · (1 - y²)
    """
    if ACTIVATION == RELU:
        dy = tl.where(y <= 0, 0.0, dy)
    elif ACTIVATION == SIGMOID:
        dy = dy * y * (1.0 - y)
    elif ACTIVATION == TANH:
        dy = dy * (1.0 - y * y)
    return dy


@triton.jit
def activation_grad_y(y, dy, g, ACTIVATION: tl.constexpr):
    """g · dy · s'(y): the derivative of dz = dy · s(y) with respect to y, applied to g.

    sigmoid  s'(y) = 1 - 2y;  tanh  s'(y) = -2y;  relu  s'(y) = 0
    """
    if ACTIVATION == SIGMOID:
        out = g * dy * (1.0 - 2.0 * y)
    elif ACTIVATION == TANH:
        out = g * dy * (-2.0 * y)
    else:
        out = tl.zeros_like(g)
    return out


# ----------------------------------------------------------------- kernels
@triton.jit
def _activation_fwd_kernel(x_ptr, y_ptr, n,
                           ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = flat_offsets(n, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask)
    if ACTIVATION != RELU:  # relu compares in the storage dtype (integers included)
        x = x.to(ACC)
    tl.store(y_ptr + offs, activate(x, ACTIVATION, True).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activation_bwd_kernel(y_ptr, dy_ptr, dx_ptr, n,
                           ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = flat_offsets(n, BLOCK)
    y = tl.load(y_ptr + offs, mask=mask).to(ACC)
    dy = tl.load(dy_ptr + offs, mask=mask).to(ACC)
    tl.store(dx_ptr + offs, activation_grad(dy, y, ACTIVATION).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activation_bwd_y_kernel(y_ptr, dy_ptr, g_ptr, out_ptr, n,
                             ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = flat_offsets(n, BLOCK)
    y = tl.load(y_ptr + offs, mask=mask).to(ACC)
    dy = tl.load(dy_ptr + offs, mask=mask).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask).to(ACC)
    tl.store(out_ptr + offs, activation_grad_y(y, dy, g, ACTIVATION).to(out_ptr.dtype.element_ty), mask=mask)


ELEMENTWISE = [config(BLOCK=1024, num_warps=4)]
# 1-byte integers (relu): 2 warps, so that each thread moves 16 elements = one 16-byte access (same BLOCK and grid)
BYTES = [config(BLOCK=1024, num_warps=2)]
_fwd = Kernel(_activation_fwd_kernel, {"default": ELEMENTWISE, "bytes": BYTES})
_bwd = Kernel(_activation_bwd_kernel, ELEMENTWISE)
_bwd_y = Kernel(_activation_bwd_y_kernel, ELEMENTWISE)


# ----------------------------------------------------------------- launchers
BLOCK = ELEMENTWISE[0].kwargs["BLOCK"]  # the one config everywhere (interpreter too): grids are plain tuples


def _forward(activation: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """y = act(x) for x and y of the same dense layout (x may be y: in place); ``activation``: an int code."""
    n = y.numel()
    if n:
        _fwd((cdiv(n, BLOCK),), x, y, n, ACTIVATION=activation, ACC=acc_dtype(y.dtype),
             cls="bytes" if y.element_size() == 1 else "default")


def _unary(activation: int, x: torch.Tensor) -> torch.Tensor:
    y = elementwise_out(x)
    _forward(activation, same_layout(x, y), y)
    return y


def _backward(activation: int, y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    dx = elementwise_out(y, dtype=dy.dtype)
    n = dx.numel()
    if n:
        _bwd((cdiv(n, BLOCK),), same_layout(y, dx), same_layout(dy, dx), dx, n, ACTIVATION=activation,
             ACC=acc_dtype(dy.dtype))
    return dx


def _second(activation: int, y: torch.Tensor, dy: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    out = elementwise_out(y, dtype=g.dtype)
    n = out.numel()
    if n:
        _bwd_y((cdiv(n, BLOCK),), same_layout(y, out), same_layout(dy, out), same_layout(g, out), out, n,
               ACTIVATION=activation, ACC=acc_dtype(g.dtype))
    return out


def _launchers(activation: Activation):
    """The forward, backward and second-backward launchers of one activation (the reference's signatures)."""
    name, code = activation.name.lower(), activation.value  # the launchers pass the int code (host time)

    def fwd(x: torch.Tensor) -> torch.Tensor:
        return _unary(code, x)

    def bwd(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        return _backward(code, y, dy)

    def bwd_y(y: torch.Tensor, dy: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return _second(code, y, dy, g)

    for fn, suffix in ((fwd, "fwd"), (bwd, "bwd"), (bwd_y, "bwd_y")):
        fn.__name__ = fn.__qualname__ = f"{name}_{suffix}"
    return fwd, bwd, bwd_y


sigmoid_fwd, sigmoid_bwd, sigmoid_bwd_y = _launchers(Activation.SIGMOID)
relu_fwd, relu_bwd, relu_bwd_y = _launchers(Activation.RELU)
tanh_fwd, tanh_bwd, tanh_bwd_y = _launchers(Activation.TANH)


def relu_fwd_(x: torch.Tensor) -> None:
    """In place: y is written over x (through a dense copy, written back, when x has gaps)."""
    dense = x if is_dense(x) else x.contiguous()
    _forward(RELU.value, dense, dense)
    if dense is not x:
        x.copy_(dense)


# ----------------------------------------------------------------- ahead-of-time compiles
def aot_configs():
    """Every compile the launchers above get on a GPU (read by tests/aot.py, outside the interpreter)."""
    for act in (Activation.SIGMOID, Activation.RELU, Activation.TANH):
        types = FLOAT_TYPES + (INT_TYPES if act == Activation.RELU else ())
        for t in types:
            consts = {"ACTIVATION": act.value, "ACC": tl.float64 if t == "fp64" else tl.float32}
            yield from _fwd.aot(t, consts, ints={"n": "i64"}, cls="bytes" if t in ("i8", "u8") else "default")
            if t in FLOAT_TYPES:
                yield from _bwd.aot(t, consts, ints={"n": "i64"})
                yield from _bwd_y.aot(t, consts, ints={"n": "i64"})

