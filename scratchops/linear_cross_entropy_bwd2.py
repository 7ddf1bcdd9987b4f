r"""The differentiable backward of the fused linear + cross-entropy (issue 13: double backward).

Notation of ``scratchops/linear_cross_entropy.py``. The first backward, per row r (ignored rows: 0),

    dZ_rc = (p_rc Σ_a,r - a_rc) g_r / D        dX = Σ_s dZ_s W_s    dW_s = dZ_sᵀ X    db_s = Σ_n dZ_s

is ``LinearCrossEntropyGradFunction``. Its backward takes the gradients U_x, U_W, U_b of (dX, dW, db). The
cotangent of dZ is G = U_x Wᵀ + X U_Wᵀ + U_b (one more logits-shaped product, like Z never stored), and with
ρ_r = Σ_c p_rc G_rc, γ_r = Σ_c (p_rc Σ_a,r - a_rc) G_rc (the softmax Jacobian p (δ - p) of the logits):

    G_Z = (g/D) Σ_a P ⊙ (G - ρ)                (the cotangent of the logits Z = X Wᵀ + b)
    gX = G_Z W + dZ U_W     gW = G_Zᵀ X + dZᵀ U_x     gb = Σ_n G_Z     g g_r = γ_r / D
    ∂/∂a_rc = (g_r/D)(ρ_r - G_rc):   g q_rc = (1-ε) w_c ∂/∂a_rc,   g w_c = Σ_r q'_rc ∂/∂a_rc   (probabilities)

Probability targets also have the first-backward gradients d q_rc = -(1-ε) w_c log p_rc g_r/D and
d w_c = -Σ_r q'_rc log p_rc g_r/D. With their gradients U_q, U_w, let K_rc = (1-ε) w_c U_q,rc + q'_rc U_w,c and
κ_r = Σ_c K_rc (∂ log p_rc/∂z_rc' = δ_cc' - p_rc'); these add

    G_Z -= (g/D)(K - P κ)     g g_r -= Σ_c K_rc log p_rc / D
    g q_rc -= (1-ε)(g_r/D) log p_rc U_w,c      g w_c -= (1-ε) Σ_r (g_r/D) log p_rc U_q,rc

D and the statistics are not differentiated (D depends on nothing differentiable: torch refuses a class
weight with grad for index targets; the statistics are the log-sum-exp, whose dependence on Z is inside
the softmax Jacobian above). It runs as one backend op, ``linear_cross_entropy_bwd2``: two sweeps over the
classes (ρ, γ, κ; then G_Z and dZ one chunk at a time, into the first backward's GEMMs). A third derivative
raises a RuntimeError (never a graph-less gradient).
"""
from typing import List, Optional

import torch

from scratchops._backend import Function, backend_op
from scratchops._common import compute_dtype
from scratchops.linear_cross_entropy import (KERNELS, _chunks, _eps, _logits, _no_autocast, _row_terms,
                                             linear_cross_entropy_bwd_op)

KERNELS_BWD2 = KERNELS + "_bwd2"
THIRD = (b"scratchops.linear_cross_entropy: a third derivative is not supported (the double backward's "
         b"gradients cannot be differentiated again)")


@_no_autocast
def linear_cross_entropy_bwd2(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], target: torch.Tensor,
                              weight: Optional[torch.Tensor], stats: torch.Tensor, denom: torch.Tensor,
                              g: torch.Tensor, ux: Optional[torch.Tensor], uw: Optional[torch.Tensor],
                              ub: Optional[torch.Tensor], uq: Optional[torch.Tensor], ucw: Optional[torch.Tensor],
                              ignore_index: int, label_smoothing: float, need_x: bool,
                              need_w: bool, need_b: bool, need_g: bool, need_weight: bool,
                              need_target: bool) -> List[torch.Tensor]:
    """[gx, gW, gb, gg, gweight, gtarget]; the ones not needed are empty (0,) tensors."""
    n, c, s_len = x.shape[0], w.shape[0], w.shape[1]
    cd = compute_dtype(x.dtype)
    eps = _eps(label_smoothing, c)
    prob = target.is_floating_point()
    zeros = lambda shape, need: torch.zeros(shape, dtype=cd, device=x.device) if need else x.new_empty((0,))  # noqa
    gx, gw, gb = zeros(x.shape, need_x), zeros(w.shape, need_w), zeros((c, s_len), need_b)
    gcw, gq = zeros((c,), need_weight), zeros(target.shape, need_target)
    gamma = torch.zeros((n, s_len), dtype=cd, device=x.device)
    scale = g.to(cd) / denom
    for s in range(s_len):
        ws = w[:, s, :].to(cd)
        for rows in _chunks(n, c):
            z = _logits(x, w, b, rows, s, cd)
            m, log_s, sum_a = stats[0, rows, s], stats[1, rows, s], stats[2, rows, s]
            logp = (z - m[:, None]) - log_s[:, None]
            p = torch.exp(logp)
            wt, a, active = _row_terms(target, weight, ignore_index, eps, c, rows, s, cd)
            a = a if a is not None else torch.zeros_like(p)
            cot = torch.zeros_like(p)  # G
            if ux is not None:
                cot = cot + torch.matmul(ux[rows].to(cd), ws.t())
            if uw is not None:
                cot = cot + torch.matmul(x[rows].to(cd), uw[:, s, :].to(cd).t())
            if ub is not None:
                cot = cot + ub[:, s].to(cd)
            if active is not None:
                tc = torch.where(active, target[rows, s], torch.zeros_like(target[rows, s]))
                a = a + wt[:, None] * (torch.arange(c, device=x.device) == tc[:, None])
                cot = torch.where(active[:, None], cot, torch.zeros_like(cot))
            r_scale = (scale[rows, s] if scale.dim() else scale.expand(z.shape[0]))[:, None]
            rho = (p * cot).sum(dim=1, keepdim=True)
            dz = (p * sum_a[:, None] - a) * r_scale
            gamma[rows, s] = ((p * sum_a[:, None] - a) * cot).sum(dim=1)
            gz = r_scale * sum_a[:, None] * p * (cot - rho)
            kk, q1 = torch.zeros_like(p), None  # K (probability targets: the cotangents of d q and d w)
            if uq is not None:
                kk = kk + (1 - eps) * uq[rows, :, s].to(cd) * (weight.to(cd) if weight is not None else 1.0)
            if ucw is not None:
                q1 = target[rows, :, s].to(cd)
                q1 = q1 * (1 - eps) + eps / c if eps else q1
                kk = kk + q1 * ucw.to(cd)
            if uq is not None or ucw is not None:
                gamma[rows, s] -= (logp * kk).sum(dim=1)
                gz = gz - r_scale * (kk - p * kk.sum(dim=1, keepdim=True))
            if need_x:
                gx[rows] += torch.matmul(gz, ws) + (torch.matmul(dz, uw[:, s, :].to(cd)) if uw is not None else 0)
            if need_w:
                gw[:, s, :] += torch.matmul(gz.t(), x[rows].to(cd))
                if ux is not None:
                    gw[:, s, :] += torch.matmul(dz.t(), ux[rows].to(cd))
            if need_b:
                gb[:, s] += gz.sum(dim=0)
            ga = r_scale * (rho - cot)  # ∂/∂a (0 on ignored rows: G is 0 there)
            if need_target:
                gq[rows, :, s] = (1 - eps) * ga * (weight.to(cd) if weight is not None else 1.0)
                if ucw is not None:
                    gq[rows, :, s] -= (1 - eps) * r_scale * logp * ucw.to(cd)
            if need_weight:
                q = target[rows, :, s].to(cd)
                gcw += ((q * (1 - eps) + eps / c if eps else q) * ga).sum(dim=0)
                if uq is not None:
                    gcw -= ((1 - eps) * r_scale * logp * uq[rows, :, s].to(cd)).sum(dim=0)
    gg = (gamma / denom).to(g.dtype) if need_g else x.new_empty((0,))
    gg = gg.sum() if need_g and not g.dim() else gg
    return [gx.to(x.dtype), gw.to(w.dtype), gb.to(x.dtype), gg, gcw.to(weight.dtype) if need_weight else gcw,
            gq.to(target.dtype) if need_target else gq]


linear_cross_entropy_bwd2_op = backend_op("linear_cross_entropy_bwd2", linear_cross_entropy_bwd2, KERNELS_BWD2)


class LinearCrossEntropyGradFunction(Function):
    """(x, W, b, target, weight, stats, D, g, ignore_index, label_smoothing, need, backend) ->
    (dx, dW, db, dweight, dtarget), the first backward (``linear_cross_entropy_bwd``), differentiable in x, W, b,
    g (and the probability target and class weight through dx, dW, db)."""

    @staticmethod
    def forward(x, w, b, target, weight, stats, denom, g, ignore_index, label_smoothing, need, backend):
        return tuple(linear_cross_entropy_bwd_op(backend, x, w, b, target, weight, stats, denom, g, ignore_index,
                                                 label_smoothing, *need))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, target, weight, stats, denom, g, ctx.ignore_index, ctx.label_smoothing, _, ctx.backend = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, w, b, target, weight, stats, denom, g)

    @staticmethod
    def backward(ctx, ux, uw, ub, ucw, uq):
        x, w, b, target, weight, stats, denom, g = ctx.saved_tensors
        prob = target.is_floating_point()
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and b is not None,
                ctx.needs_input_grad[7], ctx.needs_input_grad[4] and weight is not None and prob,
                ctx.needs_input_grad[3] and prob]
        grads = [None] * 6
        if any(need) and any(u is not None for u in (ux, uw, ub, uq, ucw)):
            with torch.no_grad():  # a third derivative raises (below), never a graph-less gradient
                out = linear_cross_entropy_bwd2_op(ctx.backend, x, w, b, target, weight, stats, denom, g, ux, uw, ub,
                                                   uq, ucw, ctx.ignore_index, ctx.label_smoothing, *need)
            grads = [t if flag else None for t, flag in zip(out, need)]
            grads = raise_if_differentiated(grads, (x, w, b, target, weight, g, ux, uw, ub, uq, ucw), THIRD)
        gx, gw, gb, gg, gcw, gq = grads
        # stats, D; ignore_index, label_smoothing, need, backend: not differentiated / not tensors
        return gx, gw, gb, gq, gcw, None, None, gg, None, None, None, None


def raise_if_differentiated(grads, inputs, message: bytes):
    """Under create_graph (grad mode on and an input requiring grad), each gradient gets a node that raises when it is
    differentiated, never a graph-less gradient; otherwise ``grads`` as they are."""
    live = [i for i, t in enumerate(grads) if t is not None]
    if not live or not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in inputs):
        return grads
    wrapped = torch._C._functions.DelayedError(message, len(live))(*[grads[i].detach().requires_grad_() for i in live])
    grads = list(grads)
    for i, t in zip(live, wrapped if isinstance(wrapped, tuple) else (wrapped,)):
        grads[i] = t
    return grads
