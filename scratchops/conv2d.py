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
included). The reference backend walks the taps (r, s): for each, one ``einsum`` over the window of positions
that tap reads inside the image (a padded position adds nothing, not 0·w: see ``_taps``). It also
computes integer (in int64, wrapped to the storage type as torch's) and complex convolutions (CPU, as
torch's); autocast casts the operands as torch's does (conv2d is a lower-precision op on CPU and CUDA).
Every backward is built from differentiable Functions on the same kernels (see "autograd" below).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from scratchops._backend import Function, backend_op, choose_backend, forward_mode, with_jvp
from scratchops._common import autocast_lower, check_tensor, compute_dtype, conv_output_size, no_autocast
from scratchops.conv2d_checks import (as_int, check_devices, check_operands, pair, resolve_padding,
                                      suggests_channels_last)

KERNELS = "conv2d"  # the forward launcher's family; the gradients' is "conv2d_bwd"


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


def _taps(R, S, out_hw, in_hw, stride, padding, dilation):
    """Per tap (r, s): the output window (p, q) whose tap reads inside the image, and the input window it reads,
    as slices (ih = p·stride − pad + r·dil). A padded position contributes nothing, not 0·w (NaN for an
    infinite weight), as torch's oneDNN path (its im2col path multiplies: torch is not consistent)."""
    def window(out_size, size, tap, i):
        off = tap * dilation[i] - padding[2 * i]
        lo, hi = max(0, -(off // stride[i])), min(out_size, (size - 1 - off) // stride[i] + 1)
        if hi <= lo:
            return slice(0, 0), slice(0, 0)
        return slice(lo, hi), slice(lo * stride[i] + off, (hi - 1) * stride[i] + off + 1, stride[i])
    for r in range(R):
        for s in range(S):
            (p, ih), (q, iw) = window(out_hw[0], in_hw[0], r, 0), window(out_hw[1], in_hw[1], s, 1)
            yield r, s, (..., p, q), (..., ih, iw)


def conv2d_fwd(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], stride: list[int],
               padding: list[int], dilation: list[int], groups: int, channels_last: bool) -> torch.Tensor:
    # y[n,k,p,q] = b[k] + Σ_{r,s} Σ_{c} x[n,c,ih,iw] · w[k,c,r,s], tap by tap over the positions it reaches
    N, C, H, W = x.shape
    K, C_G, R, S = w.shape
    P = conv_output_size(H, R, stride[0], padding[0], padding[1], dilation[0])
    Q = conv_output_size(W, S, stride[1], padding[2], padding[3], dilation[1])
    ct = _compute(x.dtype)
    with no_autocast(x):
        xg, wg = x.to(ct).reshape(N, groups, C_G, H, W), w.to(ct).reshape(groups, K // groups, C_G, R, S)
        y = x.new_zeros((N, groups, K // groups, P, Q), dtype=ct)
        for r, s, out, inp in _taps(R, S, (P, Q), (H, W), stride, padding, dilation):
            y[out] += torch.einsum("ngchw,gkc->ngkhw", xg[inp], wg[..., r, s])
        y = y.reshape(N, K, P, Q)
        if bias is not None:
            y = y + bias.to(ct)[None, :, None, None]
        return _new_4d((N, K, P, Q), x, x.dtype, channels_last).copy_(y)


def conv2d_bwd_input(dy: torch.Tensor, w: torch.Tensor, input_size: list[int], stride: list[int],
                     padding: list[int], dilation: list[int], groups: int, channels_last: bool) -> torch.Tensor:
    # dx[n,c,h,w] = Σ_{r,s} Σ_{k∈g} dy[n,k,p,q] · w[k,c,r,s] at h = p·stride − pad + r·dil: for each tap, the
    # patch gradients dy·w[:, :, r, s] are added where that tap read
    N, C, H, W = input_size
    K, C_G, R, S = w.shape
    P, Q = dy.shape[2], dy.shape[3]
    ct = _compute(dy.dtype)
    with no_autocast(dy):
        dyg = dy.to(ct).reshape(N, groups, K // groups, P, Q)
        wg = w.to(ct).conj().reshape(groups, K // groups, C_G, R, S)  # complex: dy · conj(w), as autograd wants
        dx = dy.new_zeros((N, groups, C_G, H, W), dtype=ct)
        for r, s, out, inp in _taps(R, S, (P, Q), (H, W), stride, padding, dilation):
            dx[inp] += torch.einsum("ngkpq,gkc->ngcpq", dyg[out], wg[..., r, s])
        return _new_4d((N, C, H, W), dy, dy.dtype, channels_last).copy_(dx.reshape(N, C, H, W))


def conv2d_bwd_weight(dy: torch.Tensor, x: torch.Tensor, weight_size: list[int], stride: list[int],
                      padding: list[int], dilation: list[int], groups: int, channels_last: bool) -> torch.Tensor:
    # dw[k,c,r,s] = Σ_{n,p,q} dy[n,k,p,q] · x[n, g·C/G + c, ih, iw] over the positions tap (r, s) reaches
    N, C, H, W = x.shape
    K, C_G, R, S = weight_size
    P, Q = dy.shape[2], dy.shape[3]
    ct = _compute(x.dtype)
    with no_autocast(x):
        xg = x.to(ct).conj().reshape(N, groups, C_G, H, W)  # complex: dy · conj(x), as autograd wants
        dyg = dy.to(ct).reshape(N, groups, K // groups, P, Q)
        dw = x.new_zeros((groups, K // groups, C_G, R, S), dtype=ct)
        for r, s, out, inp in _taps(R, S, (P, Q), (H, W), stride, padding, dilation):
            dw[..., r, s] = torch.einsum("ngchw,ngkhw->gkc", xg[inp], dyg[out])
        return _new_4d((K, C_G, R, S), x, x.dtype, channels_last).copy_(dw.reshape(K, C_G, R, S))


def conv2d_bwd_bias(dy: torch.Tensor) -> torch.Tensor:
    # db[k] = Σ_{n,p,q} dy[n,k,p,q]
    with no_autocast(dy):
        return dy.to(_compute(dy.dtype)).sum(dim=(0, 2, 3)).to(dy.dtype)


# ----------------------------------------------------------------- backend ops
# Shape-only fakes: the reference formulas on symbolic sizes cost torch.compile(dynamic=True) ~100 s of sympy
def _fwd_fake(backend, x, w, bias, stride, padding, dilation, groups, channels_last):
    (N, _, H, W), (K, _, R, S) = x.shape, w.shape
    return _new_4d((N, K, conv_output_size(H, R, stride[0], padding[0], padding[1], dilation[0]),
                    conv_output_size(W, S, stride[1], padding[2], padding[3], dilation[1])), x, x.dtype, channels_last)


conv2d_fwd_op = backend_op("conv2d_fwd", conv2d_fwd, KERNELS, fake=_fwd_fake)
conv2d_bwd_input_op = backend_op("conv2d_bwd_input", conv2d_bwd_input, "conv2d_bwd", fake=lambda backend, dy, w, size,
                                 *spec: _new_4d(tuple(size), dy, dy.dtype, spec[-1]))
conv2d_bwd_weight_op = backend_op("conv2d_bwd_weight", conv2d_bwd_weight, "conv2d_bwd", fake=lambda backend, dy, x,
                                  size, *spec: _new_4d(tuple(size), x, x.dtype, spec[-1]))
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
#
# Forward mode (jvp: torch.func.jvp, jacfwd, hessian). Each map is linear in each operand, so its tangent is
# the map with one operand replaced by its tangent, summed over the operands:
#   y_t = conv(x_t, w) + conv(x, w_t) + b_t      dgrad_t = dgrad(dy_t, w) + dgrad(dy, w_t)   (wgrad alike)
#   db_t = db(dy_t)                               broadcast_t = broadcast(ggb_t)
# The jvp-carrying twins (_backend.with_jvp) run only in forward mode: dynamo cannot trace a Function with jvp.
# vmap, a batch B on any operand: a batch of images alone (x of conv, dy of dgrad) folds into N; otherwise B
# becomes more groups, images (B, N, C, H, W) -> (N, B·C, H, W), weights (B, K, ...) -> (B·K, ...), groups
# B·G, and the output unfolds the same way. One launch either way.
def _apply(function, *args):
    return (_JVP[function] if forward_mode() else function).apply(*args)


def _conv(spec, x, w):
    return _apply(Conv2dFunction, x, w, None, *spec)


def _grad(function, spec, *args):
    """``function`` (differentiable) when a graph is built or a transform runs, else its backend op directly."""
    if torch.is_grad_enabled() or forward_mode():
        return _apply(function, *args, *spec)
    return function.op(spec[-1], *args, *spec[:-1])


def _tangent(function, spec, args, tangents):
    """Σ_i function(args with args[i] replaced by its tangent) over the tangents given."""
    terms = [_grad(function, spec, *args[:i], t, *args[i + 1:]) for i, t in enumerate(tangents) if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


def _fold(info, t, dim, image: bool):
    """The vmap batch of ``t`` (moved first; an unbatched ``t`` expanded) as more groups (see above)."""
    t = t.movedim(dim, 0) if dim is not None else t.expand(info.batch_size, *t.shape)
    return t.transpose(0, 1).flatten(1, 2) if image else t.flatten(0, 1)


def _unfold(t, batch: int, image: bool):
    return (t.unflatten(1, (batch, -1)).transpose(0, 1) if image else t.unflatten(0, (batch, -1))), 0


def _vmap(function, t_image, info, in_dims, a, t, third, stride, padding, dilation, groups, channels_last, backend):
    """vmap of conv (a, t, third = x, w, bias), dgrad (dy, w, input_size) or wgrad (dy, x, weight_size)."""
    batch, out_image, spec = info.batch_size, not t_image, (stride, padding, dilation)
    if out_image and in_dims[1] is None and in_dims[2] is None:  # only the images batched: B·N of them
        third = [batch * third[0], *third[1:]] if isinstance(third, list) else third
        out = _apply(function, a.movedim(in_dims[0], 0).flatten(0, 1), t, third, *spec, groups, channels_last,
                     backend)
        return out.unflatten(0, (batch, -1)), 0
    if isinstance(third, list):  # the output's size
        third = [third[0], batch * third[1], *third[2:]] if out_image else [batch * third[0], *third[1:]]
    elif third is not None:  # a bias
        third = _fold(info, third, in_dims[2], False)
    out = _apply(function, _fold(info, a, in_dims[0], True), _fold(info, t, in_dims[1], t_image), third, *spec,
                 groups * batch, channels_last, backend)
    return _unfold(out, batch, out_image)


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
        if forward_mode():
            ctx.out_shape = list(output.shape)  # for the jvp of the bias
            ctx.save_for_forward(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        needs, spec = ctx.needs_input_grad, ctx.spec
        if not (torch.is_grad_enabled() or forward_mode()):  # no graph built: the backend ops directly (_grad)
            backend, geometry = spec[-1], spec[:-1]
            return (conv2d_bwd_input_op(backend, dy, w, ctx.input_size, *geometry) if needs[0] else None,
                    conv2d_bwd_weight_op(backend, dy, x, ctx.weight_size, *geometry) if needs[1] else None,
                    conv2d_bwd_bias_op(backend, dy) if needs[2] else None, None, None, None, None, None, None)
        if torch.is_grad_enabled() and dy.is_complex():  # the gradient Functions' formulas are for real tensors
            raise RuntimeError("scratchops conv2d: no double backward (create_graph=True) for complex tensors")
        dx = _grad(Conv2dInputGradFunction, spec, dy, w, ctx.input_size) if needs[0] else None
        dw = _grad(Conv2dWeightGradFunction, spec, dy, x, ctx.weight_size) if needs[1] else None
        db = _grad(Conv2dBiasGradFunction, spec[-1:], dy) if needs[2] else None
        return (dx, dw, db,
                None, None, None, None, None, None)  # stride, padding, dilation, groups, channels_last, backend


def _conv_jvp(ctx, x_t, w_t, b_t, *_spec):
    y_t = _tangent(Conv2dFunction, ctx.spec, (*ctx.saved_tensors, None), (x_t, w_t))
    b_t = None if b_t is None else _apply(Conv2dBiasBroadcastFunction, b_t, ctx.out_shape, ctx.spec[-1])
    return b_t if y_t is None else y_t if b_t is None else y_t + b_t


def _bilinear_grad_function(name: str, op, conv_operands, t_image: bool, doc: str):
    """A gradient g = op(dy, t, size, *spec), bilinear in (dy, t): dgrad (t = w) or wgrad (t = x). Its backward
    needs dy for ∂/∂t and t for ∂/∂dy, each saved only when that gradient is wanted: ∂/∂dy is the forward
    conv(*conv_operands(gg, t)), ∂/∂t the other gradient Function (``other``)."""

    def forward(dy, t, size, stride, padding, dilation, groups, channels_last, backend):
        return op(backend, dy, t, size, stride, padding, dilation, groups, channels_last)

    def setup_context(ctx, inputs, output):
        dy, t, ctx.size, *spec = inputs
        ctx.spec, ctx.t_size = spec, list(t.shape)
        ctx.save_for_backward(dy if ctx.needs_input_grad[1] else None, t if ctx.needs_input_grad[0] else None)
        if forward_mode():
            ctx.save_for_forward(dy, t)

    def backward(ctx, gg):
        dy, t = ctx.saved_tensors
        g_dy = _conv(ctx.spec, *conv_operands(gg, t)) if ctx.needs_input_grad[0] else None
        g_t = _grad(function.other, ctx.spec, dy, gg, ctx.t_size) if ctx.needs_input_grad[1] else None
        return g_dy, g_t, None, None, None, None, None, None, None  # size and spec: not differentiable

    def jvp(ctx, dy_t, t_t, *_size_spec):
        return _tangent(function, ctx.spec, (*ctx.saved_tensors, ctx.size), (dy_t, t_t))

    function = type(name, (Function,), {
        "__doc__": doc, "op": staticmethod(op), "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context), "backward": staticmethod(backward)})
    function.vmap = staticmethod(functools.partial(_vmap, function, t_image))
    _JVP[function] = with_jvp(function, jvp)
    return function


_JVP = {}
Conv2dInputGradFunction = _bilinear_grad_function(
    "Conv2dInputGradFunction", conv2d_bwd_input_op, lambda ggx, w: (ggx, w), False,
    "dx = dgrad(dy, w); backward: ∂/∂dy = conv(ggx, w), ∂/∂w = wgrad(dy, ggx).")
Conv2dWeightGradFunction = _bilinear_grad_function(
    "Conv2dWeightGradFunction", conv2d_bwd_weight_op, lambda ggw, x: (x, ggw), True,
    "dw = wgrad(dy, x); backward: ∂/∂dy = conv(x, ggw), ∂/∂x = dgrad(dy, ggw).")


class Conv2dBiasGradFunction(Function):
    """db = Σ_{n,p,q} dy; backward: ∂/∂dy = ggb broadcast over (n, p, q)."""
    op = staticmethod(conv2d_bwd_bias_op)  # the backend op, run directly when no graph is built

    @staticmethod
    def forward(dy, backend):
        return conv2d_bwd_bias_op(backend, dy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shape, ctx.backend = list(inputs[0].shape), inputs[1]

    @staticmethod
    def backward(ctx, ggb):
        return _apply(Conv2dBiasBroadcastFunction, ggb, ctx.shape, ctx.backend), None  # backend

    @staticmethod
    def vmap(info, in_dims, dy, backend):
        return _unfold(_apply(Conv2dBiasGradFunction, _fold(info, dy, in_dims[0], True), backend), info.batch_size,
                       False)


class Conv2dBiasBroadcastFunction(Function):
    """g[n,k,p,q] = ggb[k] (a zero-stride view); backward: Σ_{n,p,q} of its gradient, the bias gradient kernel."""

    @staticmethod
    def forward(ggb, shape, backend):
        return ggb[None, :, None, None].expand(shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shape, ctx.backend = inputs[1:]

    @staticmethod
    def backward(ctx, g):
        return _grad(Conv2dBiasGradFunction, (ctx.backend,), g), None, None  # shape, backend

    @staticmethod
    def vmap(info, in_dims, ggb, shape, backend):
        batch = info.batch_size
        g = _apply(Conv2dBiasBroadcastFunction, _fold(info, ggb, in_dims[0], False),
                   [shape[0], batch * shape[1], *shape[2:]], backend)
        return _unfold(g, batch, True)


_JVP[Conv2dFunction] = with_jvp(Conv2dFunction, _conv_jvp)
_JVP[Conv2dBiasGradFunction] = with_jvp(Conv2dBiasGradFunction, lambda ctx, dy_t, _backend: _grad(
    Conv2dBiasGradFunction, (ctx.backend,), dy_t))
_JVP[Conv2dBiasBroadcastFunction] = with_jvp(Conv2dBiasBroadcastFunction, lambda ctx, ggb_t, _shape, _backend: _apply(
    Conv2dBiasBroadcastFunction, ggb_t, ctx.shape, ctx.backend))
Conv2dFunction.vmap = staticmethod(functools.partial(_vmap, Conv2dFunction, False))
Conv2dInputGradFunction.other, Conv2dWeightGradFunction.other = Conv2dWeightGradFunction, Conv2dInputGradFunction


# ----------------------------------------------------------------- functional
def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> torch.Tensor:
    check_tensor("conv2d", input)
    check_tensor("conv2d", weight, "weight", 2)
    if bias is not None:
        check_tensor("conv2d", bias, "bias", 3)
    check_devices(input, weight, bias)
    if input.dim() not in (3, 4):
        raise RuntimeError(f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: "
                           f"{list(input.shape)}")
    stride, dilation, groups = pair("stride", stride), pair("dilation", dilation), as_int("groups", groups)
    if weight.dim() != 4:
        raise RuntimeError(f"weight of conv2d should be 4-D, but got weight of size {list(weight.shape)}")
    pads = resolve_padding(padding, stride, dilation, weight)
    input, weight, bias = autocast_lower(input, weight, bias)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    check_operands(x, weight, bias, stride, pads, dilation, groups)
    channels_last = suggests_channels_last(x) or suggests_channels_last(weight)
    y = _apply(Conv2dFunction, x, weight, bias, stride, pads, dilation, groups, channels_last, choose_backend(x))
    return y.squeeze(0) if unbatched else y
