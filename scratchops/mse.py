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
"""
import warnings
from typing import List, Optional

import torch

from scratchops._backend import Function, backend_op, choose_backend
from scratchops._common import Reduction, compute_dtype, legacy_reduction, reduction_code, \
    type_name

KERNELS = "mse"


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
mse_fwd_op = backend_op("mse_fwd", mse_fwd, KERNELS)
mse_bwd_op = backend_op("mse_bwd", mse_bwd, KERNELS)


# ----------------------------------------------------------------- autograd
def _no_third_derivative(name: str) -> None:
    """Under create_graph=True a second backward would return a gradient without a graph: refuse instead."""
    if torch.is_grad_enabled():
        raise NotImplementedError(f"scratchops.{name}: derivatives above the second are not implemented")


class MSEBackwardFunction(Function):
    r"""(d, dw) = mse_bwd(x, y, w, D, g): d = e · (2g/D) · w, dw = e² g / D (the first backward, differentiable).

    Second derivatives, u = ∂/∂d and v = ∂/∂dw incoming, s = g / D (D a constant here):

        ∂/∂x = u · 2 s w + v · 2 e s = -∂/∂y
        ∂/∂w = u · 2 e s
        ∂/∂g = (u · 2 e w + v · e²) / D       (summed over the elements when g is a scalar)
    """

    fresh_outputs = True  # a backward without create_graph calls forward directly (see _backend.Function)

    @staticmethod
    def forward(x, y, w, denom, g, need_w, backend):
        return tuple(mse_bwd_op(backend, x, y, w, denom, g, need_w))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, w, denom, g, _, ctx.backend = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, y, w, denom, g)

    @staticmethod
    def backward(ctx, u, v):
        _no_third_derivative("mse_loss")
        x, y, w, denom, g = ctx.saved_tensors
        cd = denom.dtype
        e = x.to(cd) - y.to(cd)
        s = g.to(cd) / denom
        wc = w.to(cd) if w is not None else torch.ones((), dtype=cd, device=x.device)
        u = None if u is None or u.numel() == 0 else u.to(cd)
        v = None if v is None or v.numel() == 0 or w is None else v.to(cd)
        gx = gw = gg = None
        terms_x, terms_g = [], []
        if u is not None:
            terms_x.append(u * (2 * s * wc))
            terms_g.append(u * (2 * e * wc))
            gw = (u * (2 * e * s)).to(w.dtype) if w is not None and ctx.needs_input_grad[2] else None
        if v is not None:
            terms_x.append(v * (2 * e * s))
            terms_g.append(v * (e * e))
        if terms_x:
            gx = sum(terms_x[1:], terms_x[0])
            gg = sum(terms_g[1:], terms_g[0]) / denom
            gg = (gg.sum() if g.dim() == 0 else gg).to(g.dtype)
        dx = gx.to(x.dtype) if gx is not None and ctx.needs_input_grad[0] else None
        dy = (-gx).to(y.dtype) if gx is not None and ctx.needs_input_grad[1] else None
        gg = gg if ctx.needs_input_grad[4] else None
        return dx, dy, gw, None, gg, None, None  # x, y, w, denom, g, need_w, backend


class MSELossFunction(Function):
    """mse_loss(x, y, w, w_den, reduction, backend) -> (L, D); backward dx = e (2g/D) w = -dy, dw = e² g/D (- L g/D).

    The backward is MSEBackwardFunction (differentiable once more, for double backward).
    """

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

    @staticmethod
    def backward(ctx, g, _g_denom):
        x, y, w, out, denom = ctx.saved_tensors
        need_x, need_y, need_w, need_den = ctx.needs_input_grad[:4] if g is not None else (False,) * 4
        dx = dy = dw = dden = None
        if need_x or need_y or need_w:
            d, dw = MSEBackwardFunction.apply(x, y, w, denom, g, need_w, ctx.backend)
            dx = d if need_x else None
            dy = -d if need_y else None
            dw = dw if need_w else None
        if need_den and ctx.reduction == Reduction.MEAN:
            if torch.is_grad_enabled():
                raise NotImplementedError("scratchops.mse_loss: double backward through a weighted mean's "
                                          "denominator Σ w is not implemented (detach the weight, or use sum)")
            # D = Σ w: ∂L/∂w_j gets -L · g / D from the denominator
            dden = (-(out.to(denom.dtype) * g.to(denom.dtype)) / denom).to(w.dtype).expand(ctx.den_shape)
        return dx, dy, dw, dden, None, None  # x, y, w, w_den, reduction, backend


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
    x, y = torch.broadcast_tensors(input.to(dtype), target.to(dtype))
    w = None if weight is None else weight.to(dtype)
    out, _ = MSELossFunction.apply(x, y, None if w is None else w.expand(x.shape), w, code, choose_backend(x))
    return out
