r"""cross_entropy's class-weight gradient (reference formula), second derivatives and torch.func batching rules (the
forward and first backward, the autograd.Functions and the functional are in scratchops/cross_entropy.py).

The first backward is a Function whose own backward is the second derivative; every Function has a vmap rule and a
jvp (forward mode applied only under transforms), so vmap, grad, vjp, jacrev, jvp, jacfwd and hessian work. What is
not implemented (a third derivative, reverse mode over forward mode, a second derivative in the class weight) raises
where it is taken.

Everything here is plain torch on the saved tensors: the logits z, the target, the class weight and the per-row
statistics (rows SHIFT .. ACTIVE below), from which p = e^{(z - k) - log s} is rebuilt exactly.

vmap rules of the backend ops: the batch is folded into the N rows, so a batch of B samples is one launch
(reduction none), and each sample's Σ ℓ_r (/ D) is taken from the row statistics; in the backward each sample's
g_r / D is formed first (as the kernel does) and passed as a per-row g with D = 1. A batched class weight (and the
weight gradient, a sum over each sample's rows) loops over the batch.
"""
from typing import Optional

import torch

from scratchops._backend import batch_first
from scratchops._common import Reduction

SHIFT, LOG_S, COEF, LOSS, WEIGHT, ACTIVE = range(6)  # rows of the statistics
STATS = 6


def as_3d(x: torch.Tensor, *tensors):
    """(N, C) logits (the functional passes them as they are: no view node in the autograd graph) as (N, C, 1), with
    the tensors shaped like them or like the target ((N,) class indices, (N, C) probabilities; None kept)."""
    if x.dim() != 2:
        return (x, *tensors)
    return (x.unsqueeze(2), *(None if t is None else t.unsqueeze(-1) for t in tensors))


def as_given(shape, *outs) -> tuple:
    """Outputs of the logits' size back in the logits' own shape ``shape`` (empty placeholders kept)."""
    return tuple(o.reshape(shape) if o.dim() == 3 and len(shape) == 2 else o for o in outs)


def _row(t: torch.Tensor, n: int, s: int) -> torch.Tensor:
    return t.reshape(n, 1, s)


def _scale(g: torch.Tensor, denom: torch.Tensor, n: int, s: int) -> torch.Tensor:
    """g_r / D per row, as (N, 1, S) or 0-d (D = 0 with active rows gives inf/nan, as torch's)."""
    scale = g.to(denom.dtype) / denom
    return scale.reshape(n, 1, s) if g.dim() else scale


def _weights(weight: Optional[torch.Tensor], c: int, like: torch.Tensor) -> torch.Tensor:
    return (weight.to(like.dtype) if weight is not None else like.new_ones(c)).view(1, c, 1)


def _log_p(x: torch.Tensor, stats: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """log p = (z - k) - log s, exact for rows shifted far from 0 (z - k has no cancellation)."""
    n, _, s = x.shape
    return (x.to(cd) - _row(stats[SHIFT], n, s)) - _row(stats[LOG_S], n, s)


def cross_entropy_weight_bwd(x: torch.Tensor, target: torch.Tensor, stats: torch.Tensor, denom: torch.Tensor,
                             g: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """dw_c = Σ_r -q'_rc log p_rc · g_r / D (probability targets)."""
    x, target = as_3d(x, target)
    n, c, s = x.shape
    cd = denom.dtype
    eps = label_smoothing if label_smoothing > 0 and c else 0.0
    logp = _log_p(x, stats, cd)
    q = target.to(cd) * (1 - eps) + eps / c if eps else target.to(cd)
    return (-(q * logp) * _scale(g, denom, n, s)).sum(dim=(0, 2)).to(x.dtype)


# ----------------------------------------------------------------- second derivatives
def _pieces(x, target, weight, stats, denom, g, ignore_index, label_smoothing):
    """What the second derivatives read, in the compute dtype: s = g / D per row, p, log p, coef, w, ε, the
    unscaled first derivative A (0 on ignored rows) and the mask of counted rows (None for probabilities)."""
    n, c, s = x.shape
    cd = denom.dtype
    eps = label_smoothing if label_smoothing > 0 and c else 0.0
    logp = _log_p(x, stats, cd)
    p, coef, w = torch.exp(logp), _row(stats[COEF], n, s), _weights(weight, c, logp)
    if target.is_floating_point():
        q = target.to(cd) * (1 - eps) + eps / c if eps else target.to(cd)
        return _scale(g, denom, n, s), p, logp, coef, w, eps, p * coef - w * q, None
    t = target.long().unsqueeze(1)
    a = p * coef - (1 - eps) * _row(stats[WEIGHT], n, s) * (torch.arange(c, device=x.device).view(1, c, 1) == t)
    active = t != ignore_index
    return _scale(g, denom, n, s), p, logp, coef, w, eps, torch.where(active, a - eps / c * w if eps else a, 0), active


def second(x, target, weight, stats, denom, g, u, ut, ignore_index, label_smoothing):
    r"""(∂/∂z, ∂/∂q, ∂/∂g) of <u, dz> + <u', dq> (dq's an empty tensor for class indices). With s_r = g_r / D,
    p the softmax, A_rc = ∂ℓ_r/∂z_rc (unscaled), D and the statistics constants:

        ∂/∂z_rj = s_r coef_r p_rj (u_rj - Σ_c u_rc p_rc)                      (softmax Jacobian, coef constant in z)
                  - (1-ε) s'_r (u'_rj w_j - p_rj Σ_c u'_rc w_c)               (probabilities: dq = -(1-ε) w log p s')
        ∂/∂q_rj = (1-ε) s_r w_j (Σ_c u_rc p_rc - u_rj)                        (probabilities: coef = Σ w q')
        ∂/∂g_r  = Σ_c (u_rc A_rc - (1-ε) u'_rc w_c log p_rc [D ≠ 0]) / D     (summed over rows when g is a scalar)

    Ignored rows have coef = 0 and A = 0, so they contribute nothing.
    """
    shape = x.shape
    x, target, u, ut = as_3d(x, target, u, ut)
    scale, p, logp, coef, w, eps, a, active = _pieces(x, target, weight, stats, denom, g, ignore_index,
                                                      label_smoothing)
    cd = denom.dtype
    gz = gg = torch.zeros((), dtype=cd, device=x.device)
    gq = x.new_empty(0)
    if u is not None:
        uc = u.to(cd)
        up = (uc * p).sum(dim=1, keepdim=True)
        gz = scale * coef * p * (uc - up)
        gz = gz if active is None else torch.where(active, gz, 0)
        gg = (uc * a).sum(dim=1, keepdim=True) / denom
        if active is None:
            gq = (scale * (1 - eps) * w * (up - uc)).to(target.dtype)
    if ut is not None:
        utw = ut.to(cd) * w
        gz = gz - (1 - eps) * torch.where(denom == 0, 0, scale) * (utw - p * utw.sum(dim=1, keepdim=True))
        gg = gg + (-(1 - eps) * utw * logp).sum(dim=1, keepdim=True) * torch.where(denom == 0, 0, 1 / denom)
    gg = gg.expand(x.size(0), 1, x.size(2))
    return (*as_given(shape, gz.expand(x.shape).to(x.dtype), gq),
            (gg.sum() if g.dim() == 0 else gg.reshape(g.shape)).to(g.dtype))


def backward_tangents(x, target, weight, stats, denom, g, x_t, q_t, g_t, ignore_index, label_smoothing):
    r"""(ḋz, ḋq) in x's and the target's dtypes: the derivative of the first backward along (ż, q̇, ġ), the
    transpose of :func:`second` (the Hessian in z is symmetric, the mixed terms are each other's transposes):

        ḋz = s coef p (ż - Σ p ż) + (1-ε) s (p Σ w q̇ - w q̇) + A ġ / D
        ḋq = -(1-ε) s' w (ż - Σ p ż) - (1-ε) w log p ġ / D        (s' and 1/D taken as 0 when D = 0)
    """
    shape = x.shape
    x, target, x_t, q_t = as_3d(x, target, x_t, q_t)
    scale, p, logp, coef, w, eps, a, active = _pieces(x, target, weight, stats, denom, g, ignore_index,
                                                      label_smoothing)
    cd, (n, _, s) = denom.dtype, x.shape
    dz_t = dq_t = torch.zeros(x.shape, dtype=cd, device=x.device)
    if x_t is not None:
        centred = x_t.to(cd) - (x_t.to(cd) * p).sum(dim=1, keepdim=True)
        dz_t = dz_t + scale * coef * p * centred
        dq_t = dq_t - (1 - eps) * torch.where(denom == 0, 0, scale) * w * centred
    if q_t is not None:
        wq = w * q_t.to(cd)
        dz_t = dz_t + (1 - eps) * scale * (p * wq.sum(dim=1, keepdim=True) - wq)
    if g_t is not None:
        dz_t = dz_t + a * _scale(g_t, denom, n, s)
        dq_t = dq_t - (1 - eps) * w * logp * _scale(g_t, torch.where(denom == 0, torch.inf, denom), n, s)
    dz_t = dz_t if active is None else torch.where(active, dz_t, 0)
    return as_given(shape, dz_t.to(x.dtype), dq_t.to(target.dtype if target.is_floating_point() else x.dtype))


# ----------------------------------------------------------------- vmap rules of the backend ops
def loop_vmap(op):
    """vmap by a loop over the batch: a batched class weight, and the weight gradient (a sum over each sample)."""

    def rule(info, in_dims, backend, *args):
        outs = [op(backend, *[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims[1:])])
                for i in range(info.batch_size)]
        if isinstance(outs[0], torch.Tensor):
            return torch.stack(outs), 0
        return [torch.stack(o) for o in zip(*outs)], [0] * len(outs[0])

    return rule


def _fold(info, in_dims, x, target):
    """x and target with the batch folded into the N rows, (B, N, C, S) and the batched logits' shape."""
    x, target = (batch_first(info, t, d) for t, d in zip((x, target), in_dims))
    shape = x.shape
    if x.dim() == 3:  # (N, C) samples
        x, target = x.unsqueeze(3), target.unsqueeze(-1)
    b, n, c, s = x.shape
    return x.reshape(b * n, c, s), target.reshape(b * n, *target.shape[2:]), (b, n, c, s), shape


def fwd_vmap(op):
    """The vmap rule of ``op`` = cross_entropy_fwd."""

    def rule(info, in_dims, backend, x, target, weight, ignore_index, label_smoothing, reduction):
        if in_dims[3] is not None:
            return loop_vmap(op)(info, in_dims, backend, x, target, weight, ignore_index, label_smoothing, reduction)
        xf, tf, (b, n, c, s), _ = _fold(info, in_dims[1:3], x, target)
        out, stats, one = op(backend, xf, tf, weight, ignore_index, label_smoothing, Reduction.NONE)
        stats = stats.view(STATS, b, n * s)
        if reduction == Reduction.NONE:
            return [out.view(b, n * s), stats, one], [0, 1, None]
        total = stats[LOSS].sum(1)
        if reduction == Reduction.SUM:
            if not target.is_floating_point() and not c and label_smoothing > 0:
                total = torch.full_like(total, float("nan"))  # torch's ε/C · Σ 0, as the unbatched op
            return [total.to(x.dtype), stats, one], [0, 1, None]
        d = stats[WEIGHT].sum(1)
        denom = torch.where(stats[ACTIVE].sum(1) == 0, torch.ones_like(d), d)
        return [(total / d).to(x.dtype), stats, denom], [0, 1, 0]

    return rule


def bwd_vmap(op):
    """The vmap rule of ``op`` = cross_entropy_bwd."""

    def rule(info, in_dims, backend, x, target, weight, stats, denom, g, ignore_index, label_smoothing, need_dx,
             need_dt):
        args = (x, target, weight, stats, denom, g, ignore_index, label_smoothing, need_dx, need_dt)
        if in_dims[3] is not None:
            return loop_vmap(op)(info, in_dims, backend, *args)
        xf, tf, (b, n, c, s), shape = _fold(info, in_dims[1:3], x, target)
        if in_dims[4] is not None:
            stats = stats.movedim(in_dims[4], 1)
        else:
            stats = stats.unsqueeze(1).expand(STATS, b, n * s)
        denom, g = batch_first(info, denom, in_dims[5]), batch_first(info, g, in_dims[6])
        scale = (g.to(denom.dtype).reshape(b, -1) / denom.view(b, 1)).expand(b, n * s).reshape(-1)
        outs = op(backend, xf, tf, weight, stats.reshape(STATS, b * n * s), denom.new_ones(()), scale, ignore_index,
                  label_smoothing, need_dx, need_dt)
        return [o.view(shape) if o.dim() == 3 else o for o in outs], [0 if o.dim() == 3 else None for o in outs]

    return rule
