r"""cross_entropy: softmax cross-entropy over the class dimension, as torch's.

Logits are viewed as (N, C, S): each row r = (n, s) holds C class logits z_r. With
lse_r = log Σ_c e^{z_rc}, p_rc = e^{z_rc - lse_r} the softmax, class weights w (1 when absent),
label smoothing ε and class-index target t_r (ignored rows give 0):

    ℓ_r = (1-ε) w_t (lse_r - z_rt) + (ε/C) Σ_c w_c (lse_r - z_rc)
    ∂ℓ_r/∂z_rc = p_rc · coef_r - (1-ε) w_t [c = t] - (ε/C) w_c,      coef_r = (1-ε) w_t + (ε/C) Σ_c w_c

With probability targets q (same shape as z), q' = (1-ε) q + ε/C and v = w q':

    ℓ_r = Σ_c v_rc (lse_r - z_rc)
    ∂ℓ_r/∂z_rc = p_rc · coef_r - v_rc,  coef_r = Σ_c v_rc
    ∂ℓ_r/∂q_rc = -(1-ε) w_c log p_rc,   ∂ℓ_r/∂w_c = -q'_rc log p_rc

Reductions: none keeps ℓ_r; sum L = Σ_r ℓ_r; mean L = Σ_r ℓ_r / D with D = Σ_r w_{t_r} over
non-ignored rows (class indices; 0/0 = nan when all are ignored) or D = number of rows
(probabilities). The backward scales by g_r / D (g_r = g for sum and mean; D taken as 1 when every
row is ignored, so their zero gradient stays 0 as torch's).

How it runs (issue 12's design): the forward reads the logits once (online log-sum-exp) and keeps
only per-row statistics (STATS rows of length N·S: the shift k = the row max, or 0 for an all -inf
row; log s = log Σ e^{z - k}; coef_r; ℓ_r; w_t; whether the row counts); nothing of size N·C is
written, with or without grad. The backward reads the logits once more and writes dlogits once:
p = e^{(z - k) - log s}, exact for rows shifted far from 0 (±1e4, ±1e30: z - k has no
cancellation). Saved for backward: the logits (an input), the target, the weight and the
statistics.

Bad class indices: CPU tensors get torch's IndexError from a host check before anything runs. On
CUDA there is no host check (it would synchronise the stream every call): the row of a bad target
gets a NaN loss and a NaN gradient, written on the device, asynchronously.
"""
import math
from typing import List, Optional

import torch

from scratchops._backend import Function, backend_op, choose_backend
from scratchops._common import Reduction, autocast_enabled, check_class_targets, check_same_device, check_tensor, \
    compute_dtype, legacy_reduction, reduction_code, type_name

KERNELS = "cross_entropy"
SHIFT, LOG_S, COEF, LOSS, WEIGHT, ACTIVE = range(6)  # rows of the statistics
STATS = 6
HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------- reference math
def _row(t: torch.Tensor, n: int, s: int) -> torch.Tensor:
    return t.reshape(n, 1, s)


def _scale(g: torch.Tensor, denom: torch.Tensor, n: int, s: int) -> torch.Tensor:
    """g_r / D per row, as (N, 1, S) or 0-d (D = 0 with active rows gives inf/nan, as torch's)."""
    scale = g.to(denom.dtype) / denom
    return scale.reshape(n, 1, s) if g.dim() else scale


def _weights(weight: Optional[torch.Tensor], c: int, like: torch.Tensor) -> torch.Tensor:
    return (weight.to(like.dtype) if weight is not None else like.new_ones(c)).view(1, c, 1)


def cross_entropy_fwd(x: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
                      label_smoothing: float, reduction: int) -> List[torch.Tensor]:
    """x: (N, C, S) logits; target: (N, S) class indices or (N, C, S) probabilities.

    Returns [out, stats, D]: out is (N·S,) for none else 0-d (x's dtype); stats (STATS, N·S) and the
    backward's D (0-d) are in the compute dtype.
    """
    cd = compute_dtype(x.dtype)
    n, c, s = x.shape
    prob = target.is_floating_point()
    if not prob and x.device.type == "cpu":
        check_class_targets(target, c, ignore_index)
    xc = x.to(cd)
    m = xc.amax(dim=1, keepdim=True) if c else xc.new_full((n, 1, s), float("-inf"))
    k = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    shifted = xc - k  # z - k, exact: no cancellation against lse for large logits
    log_s = torch.log(torch.exp(shifted).sum(dim=1, keepdim=True))
    logp = shifted - log_s
    w = _weights(weight, c, xc)
    eps = label_smoothing if label_smoothing > 0 and c else 0.0  # no classes: nothing to smooth over
    ones = torch.ones_like(m)
    if prob:
        v = w * (target.to(cd) * (1 - eps) + eps / c if eps else target.to(cd))
        loss = -(v * logp).sum(dim=1, keepdim=True)  # per class products: inf · log p stays ±inf, as torch's
        coef = v.sum(dim=1, keepdim=True)
        wt, active = ones if c else torch.full_like(m, float("nan")), ones  # no classes: D = 0 / 0, as torch
    else:
        t = target.long().unsqueeze(1)
        active = t != ignore_index
        ok = active & (t >= 0) & (t < c)
        tc = torch.where(ok, t, torch.zeros_like(t))
        zero = torch.zeros((), dtype=cd, device=x.device)
        wt = torch.where(ok, w.view(-1)[tc], zero) if c else torch.zeros_like(m)
        loss = -(1 - eps) * wt * logp.gather(1, tc) if c else torch.zeros_like(m)
        coef = (1 - eps) * wt
        if eps:
            loss = loss - eps / c * (w * logp).sum(dim=1, keepdim=True)
            coef = coef + eps / c * w.sum()
        nan = torch.full((), float("nan"), dtype=cd, device=x.device)
        bad = active & ~ok  # CUDA only (CPU raised above): a NaN row, as the kernel's
        loss = torch.where(bad, nan, torch.where(ok, loss, zero))
        coef = torch.where(bad, nan, torch.where(ok, coef, zero))
        if not c and label_smoothing > 0:  # no classes: torch's smoothing term ε/C · 0 is nan for every row
            loss = torch.full_like(loss, float("nan"))
        active = active.to(cd)
    stats = torch.stack([t.expand(n, 1, s).reshape(-1) for t in (k, log_s, coef, loss, wt, active)])
    loss = stats[LOSS]
    if reduction == Reduction.NONE:
        return [loss.to(x.dtype, copy=True), stats, x.new_ones((), dtype=cd)]
    if reduction == Reduction.SUM:
        total = loss.sum()
        if not prob and not c and label_smoothing > 0:  # torch's ε/C · Σ 0 is nan even with no rows
            total = torch.full_like(total, float("nan"))
        return [total.to(x.dtype), stats, x.new_ones((), dtype=cd)]
    total = stats[WEIGHT].sum()
    denom = torch.where(stats[ACTIVE].sum() == 0, torch.ones_like(total), total)
    return [(loss.sum() / total).to(x.dtype), stats, denom]


def _cross_entropy_fwd_fake(backend, x, target, weight, ignore_index, label_smoothing, reduction):
    n, c, s = x.shape
    cd = compute_dtype(x.dtype)
    out = x.new_empty((n * s,) if reduction == Reduction.NONE else ())
    return [out, x.new_empty((STATS, n * s), dtype=cd), x.new_empty((), dtype=cd)]


def cross_entropy_bwd(x: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], stats: torch.Tensor,
                      denom: torch.Tensor, g: torch.Tensor, ignore_index: int, label_smoothing: float, need_dx: bool,
                      need_dt: bool) -> List[torch.Tensor]:
    """[dz, dq]: dz = ∂ℓ_r/∂z_r · g_r / D; dq = -(1-ε) w log p · g_r / D (probabilities); empty when not needed."""
    n, c, s = x.shape
    cd = denom.dtype
    prob = target.is_floating_point()
    eps = label_smoothing if label_smoothing > 0 and c else 0.0
    logp = (x.to(cd) - _row(stats[SHIFT], n, s)) - _row(stats[LOG_S], n, s)
    p = torch.exp(logp)
    coef = _row(stats[COEF], n, s)
    w = _weights(weight, c, logp)
    scale = _scale(g, denom, n, s)
    dx = dt = x.new_empty(0)
    if prob:
        if need_dx:
            q = target.to(cd) * (1 - eps) + eps / c if eps else target.to(cd)
            dx = ((p * coef - w * q) * scale).to(x.dtype)
        if need_dt:
            dt = (-(1 - eps) * w * logp * torch.where(denom == 0, torch.zeros_like(scale), scale)).to(target.dtype)
    elif need_dx:
        t = target.long().unsqueeze(1)
        active = t != ignore_index
        grad = p * coef - (1 - eps) * _row(stats[WEIGHT], n, s) * (torch.arange(c, device=x.device).view(1, c, 1) == t)
        if eps:
            grad = grad - eps / c * w
        dx = torch.where(active, grad * scale, p * 0).to(x.dtype)  # ignored rows: 0, nan where p is nan (torch)
    return [dx, dt]


def cross_entropy_weight_bwd(x: torch.Tensor, target: torch.Tensor, stats: torch.Tensor, denom: torch.Tensor,
                             g: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """dw_c = Σ_r -q'_rc log p_rc · g_r / D (probability targets)."""
    n, c, s = x.shape
    cd = denom.dtype
    eps = label_smoothing if label_smoothing > 0 and c else 0.0
    logp = (x.to(cd) - _row(stats[SHIFT], n, s)) - _row(stats[LOG_S], n, s)
    q = target.to(cd) * (1 - eps) + eps / c if eps else target.to(cd)
    return (-(q * logp) * _scale(g, denom, n, s)).sum(dim=(0, 2)).to(x.dtype)


# ----------------------------------------------------------------- backend ops
cross_entropy_fwd_op = backend_op("cross_entropy_fwd", cross_entropy_fwd, KERNELS, fake=_cross_entropy_fwd_fake)
cross_entropy_bwd_op = backend_op("cross_entropy_bwd", cross_entropy_bwd, KERNELS)
cross_entropy_weight_bwd_op = backend_op("cross_entropy_weight_bwd", cross_entropy_weight_bwd, KERNELS)


# ----------------------------------------------------------------- autograd
class CrossEntropyBackwardFunction(Function):
    r"""(dz, dq) = cross_entropy_bwd(...): the first backward, differentiable once more (double backward).

    With s_r = g_r / D, p the softmax (rebuilt from the statistics), A_rc = ∂ℓ_r/∂z_rc (the unscaled
    gradient, see the module docstring) and u = ∂/∂dz, u' = ∂/∂dq incoming:

        ∂/∂z_rj = s_r coef_r p_rj (u_rj - Σ_c u_rc p_rc)                      (softmax Jacobian, coef constant in z)
                  - (1-ε) s'_r (u'_rj w_j - p_rj Σ_c u'_rc w_c)               (probabilities: dq = -(1-ε) w log p s')
        ∂/∂q_rj = (1-ε) s_r w_j (Σ_c u_rc p_rc - u_rj)                        (probabilities: coef = Σ w q')
        ∂/∂g_r  = Σ_c (u_rc A_rc - (1-ε) u'_rc w_c log p_rc [D ≠ 0]) / D     (summed over rows when g is a scalar)

    Ignored rows have coef = 0 and A = 0, so they contribute nothing. D and the statistics are constants
    (D depends on the weight only, which is not differentiated twice).
    """

    fresh_outputs = True  # a backward without create_graph calls forward directly (see _backend.Function)

    @staticmethod
    def forward(x, target, weight, stats, denom, g, ignore_index, label_smoothing, need_dx, need_dt, backend):
        return tuple(cross_entropy_bwd_op(backend, x, target, weight, stats, denom, g, ignore_index,
                                          label_smoothing, need_dx, need_dt))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, weight, stats, denom, g, ctx.ignore_index, ctx.label_smoothing = inputs[:8]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, target, weight, stats, denom, g)

    @staticmethod
    def backward(ctx, u, ut):
        if torch.is_grad_enabled():
            raise NotImplementedError("scratchops.cross_entropy: derivatives above the second are not implemented")
        x, target, weight, stats, denom, g = ctx.saved_tensors
        n, c, s = x.shape
        cd = denom.dtype
        prob = target.is_floating_point()
        eps = ctx.label_smoothing if ctx.label_smoothing > 0 and c else 0.0
        u = None if u is None or u.numel() == 0 else u.to(cd)
        ut = None if ut is None or ut.numel() == 0 else ut.to(cd)
        logp = (x.to(cd) - _row(stats[SHIFT], n, s)) - _row(stats[LOG_S], n, s)
        p = torch.exp(logp)
        coef = _row(stats[COEF], n, s)
        w = _weights(weight, c, logp)
        scale = _scale(g, denom, n, s)
        gz = gq = None
        gg = torch.zeros((n, 1, s), dtype=cd, device=x.device)
        if u is not None:
            up = (u * p).sum(dim=1, keepdim=True)
            gz = scale * coef * p * (u - up)
            if prob:
                q = target.to(cd) * (1 - eps) + eps / c if eps else target.to(cd)
                gg = gg + (u * (p * coef - w * q)).sum(dim=1, keepdim=True) / denom
                gq = scale * (1 - eps) * w * (up - u)
            else:
                t = target.long().unsqueeze(1)
                active = t != ctx.ignore_index
                a = p * coef - (1 - eps) * _row(stats[WEIGHT], n, s) * (torch.arange(c, device=x.device).view(1, c, 1)
                                                                       == t)
                if eps:
                    a = a - eps / c * w
                gz = torch.where(active, gz, torch.zeros_like(gz))
                gg = gg + torch.where(active, (u * a).sum(dim=1, keepdim=True), torch.zeros_like(gg)) / denom
        if ut is not None:
            s_dt = torch.where(denom == 0, torch.zeros_like(scale), scale)
            utw = ut * w
            term = -(1 - eps) * s_dt * (utw - p * utw.sum(dim=1, keepdim=True))
            gz = term if gz is None else gz + term
            inv = torch.where(denom == 0, torch.zeros_like(denom), 1 / denom)
            gg = gg + (-(1 - eps) * utw * logp).sum(dim=1, keepdim=True) * inv
        need = ctx.needs_input_grad
        dz = gz.to(x.dtype) if gz is not None and need[0] else None
        dq = gq.to(target.dtype) if gq is not None and need[1] else None
        dg = (gg.sum() if g.dim() == 0 else gg.reshape(g.shape)).to(g.dtype) if need[5] else None
        return dz, dq, None, None, None, dg, None, None, None, None, None


class CrossEntropyFunction(Function):
    """cross_entropy(x, target, weight, ignore_index, ε, reduction, backend) -> (L, stats, D).

    Backward: dz = ∂ℓ_r/∂z_r · g_r / D, dq = -(1-ε) w log p · g_r / D, dw = Σ_r -q' log p · g_r / D
    (probability targets), all rebuilt from the logits and the per-row statistics; dz and dq by
    CrossEntropyBackwardFunction, differentiable once more.
    """

    @staticmethod
    def forward(x, target, weight, ignore_index, label_smoothing, reduction, backend):
        return tuple(cross_entropy_fwd_op(backend, x, target, weight, ignore_index, label_smoothing, reduction))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, weight, ctx.ignore_index, ctx.label_smoothing, ctx.reduction, ctx.backend = inputs
        _, stats, denom = output
        ctx.mark_non_differentiable(stats, denom)
        ctx.set_materialize_grads(False)  # no zero gradients made for the statistics
        ctx.save_for_backward(x, target, weight, stats, denom)

    @staticmethod
    def backward(ctx, g, _g_stats, _g_denom):
        x, target, weight, stats, denom = ctx.saved_tensors
        need_dx, need_dt, need_dw = ctx.needs_input_grad[:3] if g is not None else (False,) * 3
        dx = dt = dw = None
        if need_dx or need_dt:
            dx, dt = CrossEntropyBackwardFunction.apply(x, target, weight, stats, denom, g, ctx.ignore_index,
                                                        ctx.label_smoothing, need_dx, need_dt, ctx.backend)
            dx, dt = (dx if need_dx else None), (dt if need_dt else None)
        if need_dw:  # probability targets only (the functional refuses it for class indices, as torch)
            if torch.is_grad_enabled():
                raise NotImplementedError("scratchops.cross_entropy: double backward with respect to the class "
                                          "weight is not implemented (detach the weight)")
            dw = cross_entropy_weight_bwd_op(ctx.backend, x, target, stats, denom, g, ctx.label_smoothing)
        return dx, dt, dw, None, None, None, None  # x, target, weight, ignore_index, ε, reduction, backend


# ----------------------------------------------------------------- functional
def _check_index_targets(input, target, weight):
    """torch's shape and dtype checks for class-index targets (nll_loss / nll_loss2d)."""
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {type_name(target.dtype)}")
    if input.dim() == 1:
        if target.dim() == 1 and target.numel() != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.numel()}")
    elif input.dim() == 2:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if target.dim() == 0 or target.size(0) != input.size(0):
            raise ValueError(f"Expected input batch_size ({input.size(0)}) to match target batch_size "
                             f"({target.size(0) if target.dim() else 0}).")
    else:
        if target.dim() >= 1 and target.size(0) != input.size(0):
            raise ValueError(f"Expected input batch_size ({input.size(0)}) to match target batch_size "
                             f"({target.size(0)}).")
        expected = [input.size(0), *input.shape[2:]]
        if list(target.shape) != expected:
            raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")
        if target.dtype != torch.int64:
            raise RuntimeError("expected scalar type Long but found Byte")
    if weight is not None and weight.dtype != input.dtype:
        raise RuntimeError(f"expected scalar type {type_name(input.dtype)} but found {type_name(weight.dtype)}")


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  size_average: Optional[bool] = None, ignore_index: int = -100, reduce: Optional[bool] = None,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    check_tensor("cross_entropy_loss", input)
    check_tensor("cross_entropy_loss", target, "target", 2)
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"cross_entropy_loss(): argument 'weight' (position 3) must be Tensor, not "
                        f"{type(weight).__name__}")
    if not hasattr(ignore_index, "__index__"):
        raise TypeError(f"cross_entropy_loss(): argument 'ignore_index' (position 5) must be int, not "
                        f"{type(ignore_index).__name__}")
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce)
    code = reduction_code(reduction)
    check_same_device(input, target, weight)
    if autocast_enabled(input):
        # torch's autocast runs cross_entropy in float32 (an fp32-policy op): 16-bit floats are cast up
        input, target, weight = (t.float() if t is not None and t.dtype in HALF else t for t in (input, target, weight))
    if input.dim() == 0:
        if target.is_floating_point():  # torch's class-probability path indexes dim 1 of the 0-d input
            raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
        raise RuntimeError("Expected floating point type for target with class probabilities, got "
                           f"{type_name(target.dtype)}" if not target.is_floating_point()
                           else "cross_entropy: input must have at least one dimension")
    if not input.is_floating_point():
        raise NotImplementedError(f"\"log_softmax_lastdim_kernel_impl\" not implemented for "
                                  f"'{type_name(input.dtype)}'")
    classes = input.size(0 if input.dim() == 1 else 1)
    prob = input.shape == target.shape
    if weight is not None and (weight.dim() != 1 or weight.numel() != classes):
        raise RuntimeError(f"{'cross_entropy: ' if prob else ''}weight tensor should be defined either for all "
                           f"{classes} classes or no classes but got weight tensor of shape: {list(weight.shape)}")
    if label_smoothing > 0 and label_smoothing > 1:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if prob:
        if not target.is_floating_point():
            raise RuntimeError(f"Expected floating point type for target with class probabilities, got "
                               f"{type_name(target.dtype)}")
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        dtype = torch.promote_types(input.dtype, target.dtype)
        if weight is not None:
            dtype = torch.promote_types(dtype, weight.dtype)
        input, target = input.to(dtype), target.to(dtype)
        weight = None if weight is None else weight.to(dtype)
    else:
        _check_index_targets(input, target, weight)
        if classes == 0 and input.dim() > 2:  # torch's nll_loss2d view of (N, 0, ...) logits
            raise RuntimeError(f"size mismatch (got input: {[input.size(0), 0, 0, 0]} , target: "
                               f"{[target.size(0), 1, math.prod(target.shape[1:])]}")
    if not prob and weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("scratchops.cross_entropy: the gradient with respect to 'weight' is not implemented "
                           "(torch's class-index path refuses it too); pass weight.detach()")
    n = 1 if input.dim() == 1 else input.size(0)
    x = input.reshape(n, classes, math.prod(input.shape[2:]))
    t = target.reshape(x.shape) if prob else target.reshape(n, x.size(2))
    out, _, _ = CrossEntropyFunction.apply(x, t, weight, int(ignore_index), float(label_smoothing), code,
                                           choose_backend(x))
    if code != Reduction.NONE:
        return out
    return out.reshape(input.shape[:1] + input.shape[2:] if input.dim() > 1 else ())
