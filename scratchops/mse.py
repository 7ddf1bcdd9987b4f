r"""mse_loss: the mean squared error, optionally weighted.

With e = x - y (after broadcasting), optional weights w and n = numel(e):

    none  ℓ_i = w_i e_i²          sum  L = Σ_i w_i e_i²
    mean  L = Σ_i w_i e_i² / D    D = n without weights, D = Σ_j w_j (the weight as given) with them

Backward, g the incoming gradient (per element for none, else a scalar) and D = 1 for none/sum:

    dx_i = e_i · (2 g / D) · w_i = -dy_i
    dw_i = e_i² · g / D  -  [mean] L · g / D    (the second term from D = Σ w)

The small factors 2 g / D (and w) are formed first, as torch's backward does, so an error
near the largest finite value (|e| ~ 1.7e38 in float32) gives torch's finite gradient rather
than overflowing in 2 e.

Higher order and torch.func: the first backward is a Function (MSEBackwardFunction) whose backward is the second
derivative; every Function has a vmap rule (the backend ops batch in one launch) and a jvp (applied only under
transforms), so vmap, grad, vjp, jacrev, jvp, jacfwd and hessian work. What is not implemented (a third derivative,
reverse mode over forward mode, the second derivative through a weighted mean's D = Σ w) raises where it is taken
(:func:`terminal_function`), never a gradient without a graph.
"""
import warnings
from typing import List, Optional

import torch

from scratchops._backend import Function, backend_op, batch_first, choose_backend, forward_mode, tangent_functions, \
    terminal_function, with_jvp
from scratchops._common import Reduction, compute_dtype, legacy_reduction, reduction_code, \
    type_name

KERNELS = "mse"
_grad_enabled, _is_compiling = torch.is_grad_enabled, torch.compiler.is_compiling


# ----------------------------------------------------------------- reference math
def mse_fwd(x: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor], w_den: Optional[torch.Tensor],
            reduction: int) -> List[torch.Tensor]:
    """[L (or ℓ for none), D]; x, y, w share one shape; w_den is the weight as given (for D)."""
    cd = compute_dtype(x.dtype)
    e = x.to(cd) - y.to(cd)
    se = e * e if w is None else e * e * w.to(cd)
    if reduction == Reduction.NONE:
        return [se.to(x.dtype), x.new_ones((), dtype=cd)]
    total = se.sum()
    if reduction == Reduction.SUM:
        return [total.to(x.dtype), x.new_ones((), dtype=cd)]
    denom = x.new_full((), x.numel(), dtype=cd) if w_den is None else w_den.to(cd).sum()
    return [(total / denom).to(x.dtype), denom]


def mse_bwd(x: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor], denom: torch.Tensor, g: torch.Tensor,
            need_w: bool) -> List[torch.Tensor]:
    """[dx, dw part]: dx = e · (2 g / D) · w; dw = e² · g / D (empty when not needed)."""
    cd = compute_dtype(x.dtype)
    e = x.to(cd) - y.to(cd)
    scale = g.to(cd) / denom
    factor = 2 * scale if w is None else 2 * scale * w.to(cd)
    dw = (e * e * scale).to(w.dtype) if (need_w and w is not None) else x.new_empty(0)
    return [(e * factor).to(x.dtype), dw]


# ----------------------------------------------------------------- backend ops
def _mse_fwd_vmap(info, in_dims, backend, x, y, w, w_den, reduction):
    """The whole batch in one launch (elementwise), reduced per sample: Σ ℓ, / D with D = n or Σ w."""
    x, y, w = (batch_first(info, t, d) for t, d in zip((x, y, w), in_dims[1:4]))
    if reduction == Reduction.NONE:
        out, one = mse_fwd_op(backend, x, y, w, None, Reduction.NONE)
        return (out, one), (0, None)
    cd = compute_dtype(x.dtype)  # per-element terms kept in the compute dtype before each sample's Σ (16-bit inputs)
    out, one = mse_fwd_op(backend, x.to(cd), y.to(cd), None if w is None else w.to(cd), None, Reduction.NONE)
    total = out.reshape(info.batch_size, -1).sum(1)
    if reduction == Reduction.SUM:
        return (total.to(x.dtype), one), (0, None)
    if w_den is None:
        denom = total.new_full((info.batch_size,), x[0].numel())
    else:
        denom = batch_first(info, w_den, in_dims[4]).to(one.dtype).reshape(info.batch_size, -1).sum(1)
    return ((total / denom).to(x.dtype), denom), (0, 0)


def _mse_bwd_vmap(info, in_dims, backend, x, y, w, denom, g, need_w):
    """One launch: the per-sample g / D formed first (as the kernel does) and passed as g with D = 1."""
    x, y, w, denom, g = (batch_first(info, t, d) for t, d in zip((x, y, w, denom, g), in_dims[1:6]))
    shape = (info.batch_size,) + (1,) * (x.dim() - 1)
    g = g.reshape(shape) if g.dim() == 1 else g  # a per-sample scalar g
    scale = (g.to(denom.dtype) / denom.view(shape)).expand(x.shape)
    d, dw = mse_bwd_op(backend, x, y, w, denom.new_ones(()), scale, need_w)
    return (d, dw), (0, 0 if dw.dim() == x.dim() else None)


mse_fwd_op = backend_op("mse_fwd", mse_fwd, KERNELS)
mse_bwd_op = backend_op("mse_bwd", mse_bwd, KERNELS)
mse_fwd_op.custom.register_vmap(_mse_fwd_vmap)
mse_bwd_op.custom.register_vmap(_mse_bwd_vmap)


# ----------------------------------------------------------------- autograd
def _mse_second(x, y, w, denom, g, u, v):
    r"""(∂/∂x, ∂/∂w, ∂/∂g) of <u, d> + <v, dw>, d = e · 2s · w, dw = e² s, s = g / D (D a constant here):

        ∂/∂x = u · 2 s w + v · 2 e s = -∂/∂y,    ∂/∂w = u · 2 e s,    ∂/∂g = (u · 2 e w + v · e²) / D
    (∂/∂g summed over the elements when g is a scalar; empty tensors for what is not asked).
    """
    cd = denom.dtype
    e, s = x.to(cd) - y.to(cd), g.to(cd) / denom
    wc = w.to(cd) if w is not None else torch.ones((), dtype=cd, device=x.device)
    gx = gg = torch.zeros((), dtype=cd, device=x.device)
    gw = x.new_empty(0)
    if u is not None:
        gx, gg = gx + u.to(cd) * (2 * s * wc), gg + u.to(cd) * (2 * e * wc)
        gw = (u.to(cd) * (2 * e * s)).to(w.dtype) if w is not None else gw
    if v is not None:
        gx, gg = gx + v.to(cd) * (2 * e * s), gg + v.to(cd) * (e * e)
    gg = gg / denom
    return gx.expand(x.shape).to(x.dtype), gw, (gg.sum() if g.dim() == 0 else gg.expand(g.shape)).to(g.dtype)


MSESecondFunction = terminal_function("MSESecondFunction", _mse_second,
                                      "scratchops.mse_loss: a third derivative is not implemented (derivatives "
                                      "above the second cannot be differentiated again)")
_DEN_MESSAGE = ("scratchops.mse_loss: the second derivative through a weighted mean's denominator Σ w is not "
                "implemented (detach the weight, or use reduction='sum')")


def _mse_den_grad(out, g, denom, shape):
    """∂L/∂w_j from the denominator D = Σ w: -L · g / D, for every element of the weight as given."""
    return (-(out.to(denom.dtype) * g.to(denom.dtype)) / denom).to(out.dtype).expand(shape)


MSEDenGradFunction = terminal_function("MSEDenGradFunction", _mse_den_grad, _DEN_MESSAGE)


class MSEBackwardFunction(Function):
    r"""(d, dw) = mse_bwd(x, y, w, D, g): d = e · (2g/D) · w, dw = e² g / D (the first backward, differentiable).

    Its backward is MSESecondFunction (formulas there). Forward mode along (ẋ, ẏ, ẇ, ġ), s = g / D:
    ḋ = 2 s w (ẋ - ẏ) + 2 e s ẇ + 2 e w ġ / D,  (dw)˙ = 2 e s (ẋ - ẏ) + e² ġ / D.
    ``den_sum``: D = Σ w (a weighted mean), whose dependence on w is not differentiated here, so a second
    derivative with respect to w raises.
    """
    generate_vmap_rule = True

    fresh_outputs = True  # a backward without create_graph calls forward directly (see _backend.Function)

    @staticmethod
    def forward(x, y, w, denom, g, need_w, den_sum, backend):
        return tuple(mse_bwd_op(backend, x, y, w, denom, g, need_w))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, w, denom, g, need_w, ctx.den_sum, ctx.backend = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, y, w, denom, g)
        if forward_mode():  # what only the jvp reads (its Function is applied only then): no eager host cost
            ctx.need_w = bool(need_w and w is not None)
            if not ctx.need_w:
                ctx.mark_non_differentiable(output[1])  # the empty placeholder: no tangent
            ctx.save_for_forward(x, y, w, denom, g)

    @staticmethod
    def backward(ctx, u, v):
        x, y, w, denom, g = ctx.saved_tensors
        if ctx.den_sum and ctx.needs_input_grad[2]:
            raise NotImplementedError(_DEN_MESSAGE)
        u = None if u is None or u.numel() == 0 else u
        v = None if v is None or v.numel() == 0 or w is None else v
        if u is None and v is None:
            return (None,) * 8
        gx, gw, gg = MSESecondFunction.apply(x, y, w, denom, g, u, v)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, -gx if need[1] else None, gw if need[2] and gw.numel() else None, None,
                gg if need[4] else None, None, None, None)  # x, y, w, denom, g, need_w, den_sum, backend


class MSELossFunction(Function):
    """mse_loss(x, y, w, w_den, reduction, backend) -> (L, D); backward dx = e (2g/D) w = -dy, dw = e² g/D (- L g/D).

    The backward is MSEBackwardFunction (differentiable once more, for double backward). Forward mode: L̇ = Σ d (ẋ -
    ẏ) + Σ dw ẇ - [mean, D = Σ w] L Σ ẇ_den / D with (d, dw) the backward op at g = 1.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, y, w, w_den, reduction, backend):
        return tuple(mse_fwd_op(backend, x, y, w, w_den, reduction))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, w, w_den, ctx.reduction, ctx.backend = inputs
        out, denom = output
        ctx.den_shape = None if w_den is None else w_den.shape
        ctx.mark_non_differentiable(denom)
        ctx.set_materialize_grads(False)  # no zero gradients made for the statistics
        ctx.save_for_backward(x, y, w, out, denom)
        if forward_mode():
            ctx.save_for_forward(x, y, w, out, denom)

    @staticmethod
    def backward(ctx, g, _g_denom):
        x, y, w, out, denom = ctx.saved_tensors
        need_x, need_y, need_w, need_den = ctx.needs_input_grad[:4] if g is not None else (False,) * 4
        dx = dy = dw = dden = None
        den_sum = ctx.reduction == Reduction.MEAN and ctx.den_shape is not None
        if need_x or need_y or need_w:
            if _grad_enabled() or forward_mode() or _is_compiling():  # a graph to record: the Function
                backward = MSEBackwardJvpFunction if forward_mode() else MSEBackwardFunction
                d, dw = backward.apply(x, y, w, denom, g, need_w, den_sum, ctx.backend)
            else:  # what its apply does then (fresh_outputs), without the apply
                d, dw = mse_bwd_op(ctx.backend, x, y, w, denom, g, need_w)
            dx = d if need_x else None
            dy = -d if need_y else None
            dw = dw if need_w else None
        if need_den and den_sum:  # D = Σ w: ∂L/∂w_j gets -L · g / D from the denominator
            dden = MSEDenGradFunction.apply(out, g, denom, ctx.den_shape)
        return dx, dy, dw, dden, None, None  # x, y, w, w_den, reduction, backend


def _mse_backward_tangents(x, y, w, denom, g, x_t, y_t, w_t, g_t, need_w):
    """(ḋ, (dw)˙): the first backward's derivative along (ẋ, ẏ, ẇ, ġ) (MSEBackwardFunction's docstring)."""
    cd = denom.dtype
    e, s = x.to(cd) - y.to(cd), g.to(cd) / denom
    wc = w.to(cd) if w is not None else torch.ones((), dtype=cd, device=x.device)
    et = (0 if x_t is None else x_t.to(cd)) - (0 if y_t is None else y_t.to(cd))
    d_t = 2 * s * wc * et + (0 if w_t is None else 2 * e * s * w_t.to(cd))
    dw_t = 2 * e * s * et
    if g_t is not None:
        d_t, dw_t = d_t + 2 * e * wc * g_t.to(cd) / denom, dw_t + e * e * g_t.to(cd) / denom
    d_t = (d_t + torch.zeros_like(e)).to(x.dtype)  # a tangent of x's shape even where a term is a constant
    return d_t, ((dw_t + torch.zeros_like(e)).to(w.dtype) if need_w else x.new_empty(0))


def _mse_backward_jvp(ctx, x_t, y_t, w_t, _denom_t, g_t, *_):
    if ctx.den_sum and w_t is not None:
        raise NotImplementedError(_DEN_MESSAGE)
    d_t, dw_t = MSEBackwardTangentFunction.apply(*ctx.saved_tensors, x_t, y_t, w_t, g_t, ctx.need_w)
    return d_t, (dw_t if ctx.need_w else None)


def _mse_tangent(x, y, w, out, denom, x_t, y_t, w_t, w_den_t, reduction, backend):
    """L̇ (MSELossFunction's docstring)."""
    cd = denom.dtype
    d, dw = mse_bwd_op(backend, x, y, w, denom, denom.new_ones(()), w_t is not None)
    et = (0 if x_t is None else x_t.to(cd)) - (0 if y_t is None else y_t.to(cd))
    lt = d.to(cd) * et + (0 if w_t is None else dw.to(cd) * w_t.to(cd))
    lt = lt + torch.zeros(x.shape, dtype=cd, device=x.device)
    if reduction == Reduction.NONE:
        return lt.to(x.dtype)
    lt = lt.sum()
    if reduction == Reduction.MEAN and w_den_t is not None:
        lt = lt - out.to(cd) * w_den_t.to(cd).sum() / denom
    return lt.to(x.dtype)


def _mse_jvp(ctx, x_t, y_t, w_t, w_den_t, *_):
    return MSETangentFunction.apply(*ctx.saved_tensors, x_t, y_t, w_t, w_den_t, ctx.reduction, ctx.backend), None


MSETangentFunction, MSEBackwardTangentFunction = tangent_functions(
    "mse_loss", MSETangentFunction=_mse_tangent, MSEBackwardTangentFunction=_mse_backward_tangents)


# Forward mode (torch.func.jvp / jacfwd / hessian); dynamo cannot trace a Function with jvp.
MSELossJvpFunction = with_jvp(MSELossFunction, _mse_jvp)
MSEBackwardJvpFunction = with_jvp(MSEBackwardFunction, _mse_backward_jvp)


# ----------------------------------------------------------------- functional
def mse_loss(input: torch.Tensor, target: torch.Tensor, size_average: Optional[bool] = None,
             reduce: Optional[bool] = None, reduction: str = "mean", weight: Optional[torch.Tensor] = None):
    if target.size() != input.size():
        warnings.warn(f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
                      "This will likely lead to incorrect results due to broadcasting. "
                      "Please ensure they have the same size.", stacklevel=2)
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce)
    dtype = torch.promote_types(input.dtype, target.dtype)
    if weight is not None:
        if weight.size() != input.size():
            raise ValueError("Weights and input must have the same size.")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"Invalid reduction mode: {reduction}. Expected one of 'none', 'mean', 'sum'.")
        dtype = torch.promote_types(dtype, weight.dtype)
    code = reduction_code(reduction)
    if dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(input.device.type) and (
            weight is None or input.device.type == "cuda"):
        # torch's autocast runs mse_loss in float32 (an fp32-policy op); its weighted form is elementwise torch
        # ops, whose pow is fp32-policy on CUDA only (on CPU it runs, and returns, the input's dtype)
        dtype = torch.float32
    if not dtype.is_floating_point:
        raise NotImplementedError(f"\"mse_cpu\" not implemented for '{type_name(dtype)}'")
    x, y = (t if t.dtype == dtype else t.to(dtype) for t in (input, target))
    if x.shape != y.shape:  # equal shapes (the common case) need no broadcast views (no expand nodes in the graph)
        x, y = torch.broadcast_tensors(x, y)
    w = None if weight is None else weight.to(dtype)
    function = MSELossJvpFunction if forward_mode() else MSELossFunction
    out, _ = function.apply(x, y, None if w is None else w.expand(x.shape), w, code, choose_backend(x))
    return out
