r"""conv2d: 2-D cross-correlation with stride, padding, dilation and groups, as torch's.

Shapes: x (N, C, H, W), w (K, C/G, R, S), b (K,), y (N, K, P, Q) with G groups,
padding (top, bottom, left, right) and

    P = ⌊(H + pad_top + pad_bottom − dil_h·(R − 1) − 1) / stride_h⌋ + 1      (Q likewise)

Forward, with ih = p·stride_h − pad_top + r·dil_h and iw = q·stride_w − pad_left + s·dil_w
(x is zero outside [0, H) × [0, W)), for k in group g = ⌊k / (K/G)⌋:

    y[n,k,p,q] = b[k] + Σ_{c<C/G} Σ_{r,s} x[n, g·C/G + c, ih, iw] · w[k,c,r,s]

Backward, with dy = ∂L/∂y:

    dx[n, g·C/G + c, h, w] = Σ_{k∈g} Σ_{r,s} Σ_{(p,q): ih=h, iw=w} dy[n,k,p,q] · w[k,c,r,s]
                              (the transposed convolution: each patch gradient dy·w lands where it was read)
    dw[k,c,r,s]            = Σ_{n,p,q} dy[n,k,p,q] · x[n, g·C/G + c, ih, iw]
    db[k]                  = Σ_{n,p,q} dy[n,k,p,q]

padding='same' pads dil·(R−1) in total, the odd one extra at the bottom/right (as torch); 'valid' pads
nothing. The output (and dx) is channels_last when torch would suggest channels_last for the input or the
weight, read from the strides as torch's ``suggest_memory_format`` does (size-1 and sliced dimensions
included). The reference backend gathers patches from an explicitly padded copy with ``as_strided`` and
contracts them with ``einsum``; dx accumulates the patch gradients tap by tap into a padded buffer. It also
computes integer (in int64, wrapped to the storage type as torch's) and complex convolutions (CPU, as
torch's); autocast casts the operands as torch's does (conv2d is a lower-precision op on CPU and CUDA).
Every backward is built from differentiable Functions on the same kernels (see "autograd" below).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch

from scratchops._backend import Function, backend_op, choose_backend
from scratchops._common import autocast_lower, check_tensor, compute_dtype, conv_output_size, no_autocast, type_name

KERNELS = "conv2d"  # the forward launcher's family; the gradients' is "conv2d_bwd"
SPATIAL_DIMS = 2


# ----------------------------------------------------------------- reference math
def _compute(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference sums in: float64/float32 for floats, int64 for integers (wrapping to the
    storage type at the end gives torch's result, modular sums being exact), complex as it is."""
    if dtype.is_complex:
        return dtype
    return compute_dtype(dtype) if dtype.is_floating_point else torch.int64


def _new_4d(shape, like, dtype, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=fmt)


def _patches(x, r_s, stride, padding, dilation, out_hw):
    """Zero-padded copy of x viewed as patches (N, C, P, Q, R, S): patch[n,c,p,q,r,s] = x[n,c,ih,iw]."""
    N, C, H, W = x.shape
    xp = x.new_zeros((N, C, H + padding[0] + padding[1], W + padding[2] + padding[3]))
    xp[:, :, padding[0]:padding[0] + H, padding[2]:padding[2] + W] = x
    sn, sc, sh, sw = xp.stride()
    return xp.as_strided((N, C, out_hw[0], out_hw[1], r_s[0], r_s[1]),
                         (sn, sc, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1]))


def conv2d_fwd(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], stride: list[int],
               padding: list[int], dilation: list[int], groups: int, channels_last: bool) -> torch.Tensor:
    N, C, H, W = x.shape
    K, C_G, R, S = w.shape
    P = conv_output_size(H, R, stride[0], padding[0], padding[1], dilation[0])
    Q = conv_output_size(W, S, stride[1], padding[2], padding[3], dilation[1])
    ct = _compute(x.dtype)
    with no_autocast(x):
        patches = _patches(x.to(ct), (R, S), stride, padding, dilation, (P, Q)).reshape(N, groups, C_G, P, Q, R, S)
        y = torch.einsum("ngcpqrs,gkcrs->ngkpq", patches, w.to(ct).reshape(groups, K // groups, C_G, R, S))
        y = y.reshape(N, K, P, Q)
        if bias is not None:
            y = y + bias.to(ct)[None, :, None, None]
        return _new_4d((N, K, P, Q), x, x.dtype, channels_last).copy_(y)


def conv2d_bwd_input(dy: torch.Tensor, w: torch.Tensor, input_size: list[int], stride: list[int],
                     padding: list[int], dilation: list[int], groups: int, channels_last: bool) -> torch.Tensor:
    # dx[n,c,h,w] = Σ_{r,s} Σ_{k∈g} dy[n,k,p,q] · w[k,c,r,s] at h = p·stride − pad + r·dil: for each tap,
    # the patch gradients dy·w[:, :, r, s] are added into a padded buffer at rows r·dil + p·stride.
    N, C, H, W = input_size
    K, C_G, R, S = w.shape
    P, Q = dy.shape[2], dy.shape[3]
    ct = _compute(dy.dtype)
    with no_autocast(dy):
        dyg = dy.to(ct).reshape(N, groups, K // groups, P, Q)
        wg = w.to(ct).conj().reshape(groups, K // groups, C_G, R, S)  # complex: dy · conj(w), as autograd wants
        dxp = dy.new_zeros((N, groups, C_G, H + padding[0] + padding[1], W + padding[2] + padding[3]), dtype=ct)
        for r in range(R):
            for s in range(S):
                h0, w0 = r * dilation[0], s * dilation[1]
                rows = slice(h0, h0 + stride[0] * (P - 1) + 1, stride[0])
                cols = slice(w0, w0 + stride[1] * (Q - 1) + 1, stride[1])
                dxp[:, :, :, rows, cols] += torch.einsum("ngkpq,gkc->ngcpq", dyg, wg[:, :, :, r, s])
        dx = dxp.reshape(N, C, dxp.shape[3], dxp.shape[4])[:, :, padding[0]:padding[0] + H, padding[2]:padding[2] + W]
        return _new_4d((N, C, H, W), dy, dy.dtype, channels_last).copy_(dx)


def conv2d_bwd_weight(dy: torch.Tensor, x: torch.Tensor, weight_size: list[int], stride: list[int],
                      padding: list[int], dilation: list[int], groups: int, channels_last: bool) -> torch.Tensor:
    # dw[k,c,r,s] = Σ_{n,p,q} dy[n,k,p,q] · patch[n, g·C/G + c, p, q, r, s]
    N, C, H, W = x.shape
    K, C_G, R, S = weight_size
    P, Q = dy.shape[2], dy.shape[3]
    ct = _compute(x.dtype)
    with no_autocast(x):
        xc = x.to(ct).conj()  # complex: dy · conj(x), as autograd wants
        patches = _patches(xc, (R, S), stride, padding, dilation, (P, Q)).reshape(N, groups, C_G, P, Q, R, S)
        dw = torch.einsum("ngcpqrs,ngkpq->gkcrs", patches, dy.to(ct).reshape(N, groups, K // groups, P, Q))
        return _new_4d((K, C_G, R, S), x, x.dtype, channels_last).copy_(dw.reshape(K, C_G, R, S))


def conv2d_bwd_bias(dy: torch.Tensor) -> torch.Tensor:
    # db[k] = Σ_{n,p,q} dy[n,k,p,q]
    with no_autocast(dy):
        return dy.to(_compute(dy.dtype)).sum(dim=(0, 2, 3)).to(dy.dtype)


# ----------------------------------------------------------------- backend ops
conv2d_fwd_op = backend_op("conv2d_fwd", conv2d_fwd, KERNELS)
conv2d_bwd_input_op = backend_op("conv2d_bwd_input", conv2d_bwd_input, "conv2d_bwd")
conv2d_bwd_weight_op = backend_op("conv2d_bwd_weight", conv2d_bwd_weight, "conv2d_bwd")
conv2d_bwd_bias_op = backend_op("conv2d_bwd_bias", conv2d_bwd_bias, "conv2d_bwd")


# ----------------------------------------------------------------- autograd
# Every gradient is linear in each of its operands, so every backward is built from these same Functions
# and differentiates again, to any order, on the same kernels. With spec = (stride, padding, dilation,
# groups, channels_last, backend), conv(x, w) the forward without bias, dgrad(dy, w) = ∂L/∂x and
# wgrad(dy, x) = ∂L/∂w of the forward, db(dy) = Σ_{n,p,q} dy, and gg· the gradient flowing into a gradient:
#
#   y  = conv(x, w) + b      dx = dgrad(dy, w)          dw = wgrad(dy, x)          db = Σ dy
#   dx = dgrad(dy, w)        ∂/∂dy = conv(ggx, w)       ∂/∂w = wgrad(dy, ggx)
#   dw = wgrad(dy, x)        ∂/∂dy = conv(x, ggw)       ∂/∂x = dgrad(dy, ggw)
#   db = Σ_{n,p,q} dy        ∂/∂dy = ggb broadcast over (n, p, q)
#   ggb broadcast            ∂/∂ggb = Σ_{n,p,q} of its gradient (db again)
#
# (dgrad is the adjoint of x ↦ conv(x, w), so its adjoint in dy is that map again; it is bilinear in
# (dy, w) with the same contraction as wgrad, hence wgrad(dy, ggx); likewise for wgrad.) The first backward
# saves what it always did: x for dw, w for dx; each gradient Function saves its own operands only when a
# graph is being built (create_graph=True), and without one the backend ops run directly.
def _conv(spec, x, w):
    return Conv2dFunction.apply(x, w, None, *spec)


def _grad(function, spec, *args):
    """``function`` (differentiable) when a graph is being built, else its backend op directly."""
    return function.apply(*args, *spec) if torch.is_grad_enabled() else function.op(spec[-1], *args, *spec[:-1])


class Conv2dFunction(Function):
    """y = conv(x, w) + b; dx = dgrad(dy, w), dw = wgrad(dy, x), db = Σ_{n,p,q} dy."""

    @staticmethod
    def forward(x, w, bias, stride, padding, dilation, groups, channels_last, backend):
        return conv2d_fwd_op(backend, x, w, bias, stride, padding, dilation, groups, channels_last)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _, *spec = inputs
        ctx.spec, ctx.input_size, ctx.weight_size = spec, list(x.shape), list(w.shape)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w if ctx.needs_input_grad[0] else None)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        if torch.is_grad_enabled() and dy.is_complex():  # the gradient Functions' formulas are for real tensors
            raise RuntimeError("scratchops conv2d: no double backward (create_graph=True) for complex tensors")
        dx = _grad(Conv2dInputGradFunction, ctx.spec, dy, w, ctx.input_size) if ctx.needs_input_grad[0] else None
        dw = _grad(Conv2dWeightGradFunction, ctx.spec, dy, x, ctx.weight_size) if ctx.needs_input_grad[1] else None
        db = _grad(Conv2dBiasGradFunction, ctx.spec[-1:], dy) if ctx.needs_input_grad[2] else None
        return (dx, dw, db,
                None, None, None, None, None, None)  # stride, padding, dilation, groups, channels_last, backend


class _BilinearGradFunction(Function):
    """g = op(dy, t, size, *spec), bilinear in (dy, t): dgrad (t = w) or wgrad (t = x). The backward needs dy
    for ∂/∂t and t for ∂/∂dy: each is saved only when that gradient is wanted."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, t, _, *spec = inputs
        ctx.spec, ctx.t_size = spec, list(t.shape)
        ctx.save_for_backward(dy if ctx.needs_input_grad[1] else None, t if ctx.needs_input_grad[0] else None)


class Conv2dInputGradFunction(_BilinearGradFunction):
    """dx = dgrad(dy, w); backward: ∂/∂dy = conv(ggx, w), ∂/∂w = wgrad(dy, ggx)."""
    op = staticmethod(conv2d_bwd_input_op)  # the backend op, run directly when no graph is built

    @staticmethod
    def forward(dy, w, input_size, stride, padding, dilation, groups, channels_last, backend):
        return conv2d_bwd_input_op(backend, dy, w, input_size, stride, padding, dilation, groups, channels_last)

    @staticmethod
    def backward(ctx, ggx):
        dy, w = ctx.saved_tensors
        g_dy = _conv(ctx.spec, ggx, w) if ctx.needs_input_grad[0] else None
        g_w = _grad(Conv2dWeightGradFunction, ctx.spec, dy, ggx, ctx.t_size) if ctx.needs_input_grad[1] else None
        # input_size, stride, padding, dilation, groups, channels_last, backend: not differentiable
        return g_dy, g_w, None, None, None, None, None, None, None


class Conv2dWeightGradFunction(_BilinearGradFunction):
    """dw = wgrad(dy, x); backward: ∂/∂dy = conv(x, ggw), ∂/∂x = dgrad(dy, ggw)."""
    op = staticmethod(conv2d_bwd_weight_op)  # the backend op, run directly when no graph is built

    @staticmethod
    def forward(dy, x, weight_size, stride, padding, dilation, groups, channels_last, backend):
        return conv2d_bwd_weight_op(backend, dy, x, weight_size, stride, padding, dilation, groups, channels_last)

    @staticmethod
    def backward(ctx, ggw):
        dy, x = ctx.saved_tensors
        g_dy = _conv(ctx.spec, x, ggw) if ctx.needs_input_grad[0] else None
        g_x = _grad(Conv2dInputGradFunction, ctx.spec, dy, ggw, ctx.t_size) if ctx.needs_input_grad[1] else None
        # weight_size, stride, padding, dilation, groups, channels_last, backend: not differentiable
        return g_dy, g_x, None, None, None, None, None, None, None


class Conv2dBiasGradFunction(Function):
    """db = Σ_{n,p,q} dy; backward: ∂/∂dy = ggb broadcast over (n, p, q)."""
    op = staticmethod(conv2d_bwd_bias_op)  # the backend op, run directly when no graph is built

    @staticmethod
    def forward(dy, backend):
        return conv2d_bwd_bias_op(backend, dy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shape, ctx.backend = inputs[0].shape, inputs[1]

    @staticmethod
    def backward(ctx, ggb):
        return Conv2dBiasBroadcastFunction.apply(ggb, ctx.shape, ctx.backend), None  # backend


class Conv2dBiasBroadcastFunction(Function):
    """g[n,k,p,q] = ggb[k] (a zero-stride view); backward: Σ_{n,p,q} of its gradient, the bias gradient kernel."""

    @staticmethod
    def forward(ggb, shape, backend):
        return ggb[None, :, None, None].expand(shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.backend = inputs[2]

    @staticmethod
    def backward(ctx, g):
        return _grad(Conv2dBiasGradFunction, (ctx.backend,), g), None, None  # shape, backend


# ----------------------------------------------------------------- functional
def _int(name: str, value) -> int:
    """An int argument as torch's parser takes it: any integer (numpy's, a 0-d int tensor), but no bool or
    float (TypeError)."""
    if type(value) is int:  # the common case, first
        return value
    if isinstance(value, (bool, float)) or not hasattr(type(value), "__index__"):
        raise TypeError(f"conv2d(): argument '{name}' must be int or tuple of ints, not {type(value).__name__}")
    return operator.index(value)


def _pair(name: str, value) -> list[int]:
    """int or 1-/2-sequence → [h, w], with torch's error for a wrong length."""
    if type(value) is int:  # the common case, first
        return [value] * SPATIAL_DIMS
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    values = [_int(name, v) for v in values]
    if len(values) == 1:
        values = values * SPATIAL_DIMS
    if len(values) != SPATIAL_DIMS:
        raise RuntimeError(f"expected {name} to be a single integer value or a list of {SPATIAL_DIMS} values to "
                           f"match the convolution dimensions, but got {name}={list(values)}")
    return values


def _suggests_channels_last(t: torch.Tensor) -> bool:
    """torch's ``suggest_memory_format() == channels_last`` for a 4-D tensor: its strides order the
    dimensions C, W, H, N from the innermost out (sliced and size-1 dimensions included); a zero-size
    tensor, a zero channel stride, or an N111-like tie (N's stride equal to C's) stays contiguous."""
    smallest, shape, strides = 0, t.shape, t.stride()
    for d in (1, 3, 2, 0):
        if shape[d] == 0 or strides[d] < smallest or (d == 1 and strides[1] == 0):
            return False
        if d == 0 and smallest == strides[1]:
            return False
        smallest = strides[d] * max(shape[d], 1)
    return True


def _resolve_padding(padding, stride, dilation, w) -> list[int]:
    """[top, bottom, left, right]; 'same' puts the odd one of dil·(R−1) at the bottom/right, as torch."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding != "same":
            raise RuntimeError(f"Invalid padding string: '{padding}'")
        if any(s != 1 for s in stride):
            raise RuntimeError("padding='same' is not supported for strided convolutions")
        out = []
        for i in range(SPATIAL_DIMS):
            total = dilation[i] * (w.shape[2 + i] - 1)
            out += [total // 2, total - total // 2]
        return out
    ph, pw = _pair("padding", padding)
    if ph < 0 or pw < 0:
        raise RuntimeError("negative padding is not supported")
    return [ph, ph, pw, pw]


def _check(x, w, bias, stride, padding, dilation, groups):
    if w.dim() != 4:
        raise RuntimeError(f"weight of conv2d should be 4-D (out_channels, in_channels/groups, kH, kW), "
                           f"but got weight of size {list(w.shape)}")
    if min(stride) <= 0:
        raise RuntimeError("non-positive stride is not supported")
    if min(dilation) <= 0:
        raise RuntimeError(f"dilation should be greater than zero, but got {dilation}")
    if groups <= 0:
        raise RuntimeError("non-positive groups is not supported")
    if w.shape[0] == 0 or w.shape[0] % groups:
        kind = "at least" if w.shape[0] == 0 else "divisible by"
        raise RuntimeError(f"Given groups={groups}, expected weight to be {kind} {1 if w.shape[0] == 0 else groups} "
                           f"at dimension 0, but got weight of size [{list(w.shape)}] instead")
    if x.shape[1] != w.shape[1] * groups:
        raise RuntimeError(f"Given groups={groups}, weight of size {list(w.shape)}, expected input{list(x.shape)} to "
                           f"have {w.shape[1] * groups} channels, but got {x.shape[1]} channels instead")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != w.shape[0]):
        raise RuntimeError(f"Given weight of size {list(w.shape)}, expected bias to be 1-dimensional with "
                           f"{w.shape[0]} elements, but got bias of size {list(bias.shape)} instead")
    padded = [x.shape[2] + padding[0] + padding[1], x.shape[3] + padding[2] + padding[3]]
    kernel = [dilation[i] * (w.shape[2 + i] - 1) + 1 for i in range(SPATIAL_DIMS)]
    if any(k > p for k, p in zip(kernel, padded)):
        raise RuntimeError(f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). Kernel size: "
                           f"({kernel[0]} x {kernel[1]}). Kernel size can't be greater than actual input size")
    if x.numel() == 0 and x.shape[0] and x.shape[1]:
        raise RuntimeError(f"Only zero batch or zero channel inputs are supported, but got input shape: "
                           f"{list(x.shape)}")
    if x.dtype == torch.bool:  # torch's kernels dispatch on the input's dtype first
        raise NotImplementedError(f"\"slow_conv2d_{x.device.type}\" not implemented for 'Bool'")
    if w.dtype != x.dtype:
        raise RuntimeError(f"Input type ({x.dtype}) and weight type ({w.dtype}) should be the same")
    if bias is not None and bias.dtype != x.dtype:
        raise RuntimeError(f"Input type ({x.dtype}) and bias type ({bias.dtype}) should be the same")
    if not (x.is_floating_point() or x.is_complex()) and x.device.type != "cpu":  # integers: torch's CPU op only
        raise NotImplementedError(f"\"slow_conv2d_{x.device.type}\" not implemented for '{type_name(x.dtype)}'")


def _check_devices(x, w, bias) -> None:
    """torch's RuntimeError for operands on different devices, before anything runs."""
    for name, t in (("weight", w), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"Input type ({x.type()}) and {name} type ({t.type()}) should be the same")


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> torch.Tensor:
    check_tensor("conv2d", input)
    check_tensor("conv2d", weight, "weight", 2)
    if bias is not None:
        check_tensor("conv2d", bias, "bias", 3)
    _check_devices(input, weight, bias)
    if input.dim() not in (3, 4):
        raise RuntimeError(f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: "
                           f"{list(input.shape)}")
    stride, dilation, groups = _pair("stride", stride), _pair("dilation", dilation), _int("groups", groups)
    if weight.dim() != 4:
        raise RuntimeError(f"weight of conv2d should be 4-D, but got weight of size {list(weight.shape)}")
    pads = _resolve_padding(padding, stride, dilation, weight)
    input, weight, bias = autocast_lower(input, weight, bias)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    _check(x, weight, bias, stride, pads, dilation, groups)
    channels_last = _suggests_channels_last(x) or _suggests_channels_last(weight)
    y = Conv2dFunction.apply(x, weight, bias, stride, pads, dilation, groups, channels_last, choose_backend(x))
    return y.squeeze(0) if unbatched else y
