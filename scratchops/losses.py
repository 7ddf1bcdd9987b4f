r"""Losses: mean squared error and cross-entropy.

Mean squared error, with e = x - y (after broadcasting), optional weights w and
n = numel(e):

    none  ℓ_i = w_i e_i²          sum  L = Σ_i w_i e_i²
    mean  L = Σ_i w_i e_i² / D    D = n without weights, D = Σ_j w_j (the weight as given) with them

    dx_i = 2 e_i w_i · g / D = -dy_i           (g the incoming gradient; D = 1 for none/sum)
    dw_i = e_i² · g / D  -  [mean] L · g / D    (the second term from D = Σ w)

Cross-entropy over the class dimension (C classes) of each row r of logits z,
with lse_r = log Σ_c e^{z_rc} (online: running max and rescaled sum, one sweep)
and p_rc = e^{z_rc - lse_r} the softmax. With class weights w (1 when absent),
label smoothing ε and class-index target t_r (ignored rows give 0):

    ℓ_r = (1-ε) w_t (lse_r - z_rt) + (ε/C) Σ_c w_c (lse_r - z_rc)
    ∂ℓ_r/∂z_rc = p_rc [(1-ε) w_t + (ε/C) W] - (1-ε) w_t [c = t] - (ε/C) w_c,   W = Σ_c w_c

With probability targets q (same shape as z), q' = (1-ε) q + ε/C:

    ℓ_r = Σ_c w_c q'_rc (lse_r - z_rc)
    ∂ℓ_r/∂z_rc = p_rc Σ_j w_j q'_rj - w_c q'_rc,      ∂ℓ_r/∂q_rc = -(1-ε) w_c log p_rc

Large logits: lse_r - z_rc is formed as (m_r - z_rc) + log Σ e^{z - m_r} with m_r
the row max, so ±1e4 logits lose nothing to cancellation.

Reductions: none keeps ℓ_r; sum L = Σ_r ℓ_r; mean L = Σ_r ℓ_r / D with
D = Σ_r w_{t_r} over non-ignored rows (class indices; 0/0 = nan when all are
ignored) or D = number of rows (probabilities). The forward writes ∂ℓ_r/∂z_r for
every row in the same pass that computes ℓ_r (the logits are read twice: the
lse sweep, then the gradient sweep) and saves it; the backward only scales it:

    dz_rc = ∂ℓ_r/∂z_rc · g_r / D                (g_r = g for sum and mean; D taken as 1 when every row is ignored)
"""
import math
import warnings
from typing import List, Optional

import torch

from scratchops._backend import backend_op, choose_backend
from scratchops._common import check_tensor, compute_dtype

KERNELS = "losses"
NONE, MEAN, SUM = 0, 1, 2
REDUCTIONS = {"none": NONE, "mean": MEAN, "sum": SUM}
LEGACY_WARNING = "size_average and reduce args will be deprecated, please use reduction='{}' instead."


# ----------------------------------------------------------------- reference math
def mse_fwd(x: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor], w_den: Optional[torch.Tensor],
            reduction: int) -> List[torch.Tensor]:
    """[L (or ℓ for none), D]; x, y, w share one shape; w_den is the weight as given (for D)."""
    cd = compute_dtype(x.dtype)
    e = x.to(cd) - y.to(cd)
    se = e * e if w is None else e * e * w.to(cd)
    if reduction == NONE:
        return [se.to(x.dtype), x.new_ones((), dtype=cd)]
    total = se.sum()
    if reduction == SUM:
        return [total.to(x.dtype), x.new_ones((), dtype=cd)]
    denom = x.new_full((), x.numel(), dtype=cd) if w_den is None else w_den.to(cd).sum()
    return [(total / denom).to(x.dtype), denom]


def mse_bwd(x: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor], denom: torch.Tensor, g: torch.Tensor,
            need_w: bool) -> List[torch.Tensor]:
    """[dx, dw part]: dx = 2 e w g / D; dw = e² g / D (empty when not needed)."""
    cd = compute_dtype(x.dtype)
    e = x.to(cd) - y.to(cd)
    scale = g.to(cd) / denom
    d = 2 * e * scale if w is None else 2 * e * w.to(cd) * scale
    dw = (e * e * scale).to(w.dtype) if (need_w and w is not None) else x.new_empty(0)
    return [d.to(x.dtype), dw]


def _check_targets(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """IndexError as torch's, on the host, for a class index outside [0, C) that is not ignored."""
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


def _row_scale(g: torch.Tensor, denom: torch.Tensor, n: int, s: int) -> torch.Tensor:
    """g_r / D per row, as (N, 1, S) or 0-d (D = 0 with active rows gives inf/nan, as torch's)."""
    scale = g.to(denom.dtype) / denom
    return scale.reshape(n, 1, s) if g.dim() else scale


def cross_entropy_fwd(x: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
                      label_smoothing: float, reduction: int) -> List[torch.Tensor]:
    """x: (N, C, S) logits; target: (N, S) class indices or (N, C, S) probabilities.

    Returns [out, grad, D, stats]: out is (N·S,) for none else 0-d (x's dtype); grad
    is ∂ℓ_r/∂z_r (N, C, S) in x's dtype; D (0-d) and stats (2, N·S: the row max m
    and log Σ e^{z - m}, so lse = m + log Σ e^{z - m}) in the compute dtype.
    """
    cd = compute_dtype(x.dtype)
    n, c, s = x.shape
    prob = target.is_floating_point()
    if not prob:
        _check_targets(target, c, ignore_index)
    xc = x.to(cd)
    m = xc.amax(dim=1, keepdim=True) if c else xc.new_full((n, 1, s), float("-inf"))
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    shifted = xc - m  # z - m, exact: no cancellation against lse for large logits
    log_s = torch.log(torch.exp(shifted).sum(dim=1, keepdim=True))
    logp = shifted - log_s
    p = torch.exp(logp)
    w = (weight.to(cd) if weight is not None else xc.new_ones(c)).view(1, c, 1)
    eps = label_smoothing if label_smoothing > 0 and c else 0.0  # no classes: nothing to smooth over
    if prob:
        q = target.to(cd) * (1 - eps) + eps / c if eps else target.to(cd)
        wq = w * q
        loss = -(wq * logp).sum(dim=1, keepdim=True)
        grad = p * wq.sum(dim=1, keepdim=True) - wq
        # no classes: D = nan, as torch's mean over numel / C = 0 / 0
        wt = xc.new_full((n * s,), 1.0 if c else float("nan"))
    else:
        t = target.long().unsqueeze(1)
        active = t != ignore_index
        tc = torch.where(active, t, torch.zeros_like(t))
        zero = torch.zeros((), dtype=cd, device=x.device)
        wt = torch.where(active, w.view(-1)[tc], zero) if c else torch.zeros_like(m)
        loss = -(1 - eps) * wt * logp.gather(1, tc) if c else torch.zeros_like(m)
        grad = p * (1 - eps) * wt - (1 - eps) * wt * (torch.arange(c, device=x.device).view(1, c, 1) == tc)
        if eps:
            loss = loss - eps / c * (w * logp).sum(dim=1, keepdim=True)
            grad = grad + eps / c * (p * w.sum() - w)
        loss = torch.where(active, loss, torch.zeros_like(loss))
        grad = torch.where(active, grad, torch.zeros_like(grad))
        wt = wt.reshape(-1)
        if not c and label_smoothing > 0:  # no classes: torch's smoothing term ε/C · 0 is nan for every row
            loss = torch.full_like(loss, float("nan"))
    loss = loss.reshape(-1)
    if reduction == NONE:
        out, denom = loss.to(x.dtype), x.new_ones((), dtype=cd)
    elif reduction == SUM:
        out, denom = loss.sum().to(x.dtype), x.new_ones((), dtype=cd)
    else:
        denom = wt.sum()
        out = (loss.sum() / denom).to(x.dtype)
    return [out, grad.to(x.dtype), denom, torch.stack([m.reshape(-1), log_s.reshape(-1)])]


def _cross_entropy_fwd_fake(backend, x, target, weight, ignore_index, label_smoothing, reduction):
    n, c, s = x.shape
    cd = compute_dtype(x.dtype)
    out = x.new_empty((n * s,) if reduction == NONE else ())
    return [out, x.new_empty((n, c, s)), x.new_empty((), dtype=cd), x.new_empty((2, n * s), dtype=cd)]


def cross_entropy_bwd(grad: torch.Tensor, denom: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dz = grad · g_r / D, g (N·S,) per row (any stride, 0 included) or 0-d."""
    n, c, s = grad.shape
    return (grad.to(denom.dtype) * _row_scale(g, denom, n, s)).to(grad.dtype)


def cross_entropy_target_bwd(x: torch.Tensor, stats: torch.Tensor, weight: Optional[torch.Tensor],
                             denom: torch.Tensor, g: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """dq = -(1-ε) w_c log p_c · g_r / D for probability targets, log p = (z - m) - log Σ e^{z - m}."""
    n, c, s = x.shape
    cd = denom.dtype
    eps = label_smoothing if label_smoothing > 0 else 0.0
    w = (weight.to(cd) if weight is not None else x.new_ones(c, dtype=cd)).view(1, c, 1)
    logp = (x.to(cd) - stats[0].view(n, 1, s)) - stats[1].view(n, 1, s)
    return (-(1 - eps) * w * logp * _row_scale(g, denom, n, s)).to(x.dtype)


# ----------------------------------------------------------------- backend ops
mse_fwd_op = backend_op("mse_fwd", mse_fwd, KERNELS)
mse_bwd_op = backend_op("mse_bwd", mse_bwd, KERNELS)
cross_entropy_fwd_op = backend_op("cross_entropy_fwd", cross_entropy_fwd, KERNELS, fake=_cross_entropy_fwd_fake)
cross_entropy_bwd_op = backend_op("cross_entropy_bwd", cross_entropy_bwd, KERNELS)
cross_entropy_target_bwd_op = backend_op("cross_entropy_target_bwd", cross_entropy_target_bwd, KERNELS)


# ----------------------------------------------------------------- autograd
class MSELossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, w, w_den, reduction, backend):
        out, denom = mse_fwd_op(backend, x, y, w, w_den, reduction)
        ctx.backend, ctx.reduction = backend, reduction
        ctx.den_shape = None if w_den is None else w_den.shape
        ctx.save_for_backward(x, y, w, out, denom)
        return out

    @staticmethod
    def backward(ctx, g):
        x, y, w, out, denom = ctx.saved_tensors
        need_x, need_y, need_w, need_den = ctx.needs_input_grad[:4]
        dx = dy = dw = dden = None
        if need_x or need_y or need_w:
            # d = 2 e w g / D (dx = d, dy = -d); dw = e² g / D
            d, dw = mse_bwd_op(ctx.backend, x, y, w, denom, g, need_w)
            dx = d if need_x else None
            dy = -d if need_y else None
            dw = dw if need_w else None
        if need_den and ctx.reduction == MEAN:
            # D = Σ w: ∂L/∂w_j gets -L · g / D from the denominator
            dden = (-(out.to(denom.dtype) * g.to(denom.dtype)) / denom).to(w.dtype).expand(ctx.den_shape)
        return dx, dy, dw, dden, None, None  # x, y, w, w_den, reduction, backend


class CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, label_smoothing, reduction, backend):
        out, grad, denom, stats = cross_entropy_fwd_op(backend, x, target, weight, ignore_index, label_smoothing,
                                                       reduction)
        ctx.backend, ctx.label_smoothing = backend, label_smoothing
        if reduction == MEAN and not target.is_floating_point():
            # every row ignored: D = 0 and every saved gradient row is 0; the backward divides by 1 instead, so
            # the gradient is 0 as torch's (D = 0 from weights summing to 0 over active rows stays: inf/nan)
            denom = torch.where((target != ignore_index).any(), denom, torch.ones_like(denom))
        if target.is_floating_point() and target.requires_grad:
            ctx.save_for_backward(grad, denom, x, stats, weight)
        else:
            ctx.save_for_backward(grad, denom)
        return out

    @staticmethod
    def backward(ctx, g):
        grad, denom = ctx.saved_tensors[:2]
        # dz = (∂ℓ_r/∂z_r, saved by the forward) · g_r / D
        dx = cross_entropy_bwd_op(ctx.backend, grad, denom, g) if ctx.needs_input_grad[0] else None
        dt = None
        if ctx.needs_input_grad[1]:
            # dq = -(1-ε) w_c log p_c · g_r / D
            x, stats, weight = ctx.saved_tensors[2:]
            dt = cross_entropy_target_bwd_op(ctx.backend, x, stats, weight, denom, g, ctx.label_smoothing)
        # weight: refused at the forward; ignore_index, label_smoothing, reduction, backend: not tensors
        return dx, dt, None, None, None, None, None


# ----------------------------------------------------------------- functional
def _legacy_reduction(size_average, reduce) -> str:
    """torch's rule for the deprecated size_average/reduce flags (each defaults to True)."""
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    reduction = "mean" if (size_average and reduce) else ("sum" if reduce else "none")
    warnings.warn(LEGACY_WARNING.format(reduction), stacklevel=3)
    return reduction


def _reduction_enum(reduction: str) -> int:
    if reduction == "elementwise_mean":
        warnings.warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.",
                      stacklevel=3)
        return MEAN
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return REDUCTIONS[reduction]


def mse_loss(input: torch.Tensor, target: torch.Tensor, size_average: Optional[bool] = None,
             reduce: Optional[bool] = None, reduction: str = "mean", weight: Optional[torch.Tensor] = None):
    if target.size() != input.size():
        warnings.warn(f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
                      "This will likely lead to incorrect results due to broadcasting. "
                      "Please ensure they have the same size.", stacklevel=2)
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    dtype = torch.promote_types(input.dtype, target.dtype)
    if weight is not None:
        if weight.size() != input.size():
            raise ValueError("Weights and input must have the same size.")
        if reduction not in REDUCTIONS:
            raise ValueError(f"Invalid reduction mode: {reduction}. Expected one of 'none', 'mean', 'sum'.")
        dtype = torch.promote_types(dtype, weight.dtype)
    enum = _reduction_enum(reduction)
    if not dtype.is_floating_point:
        raise NotImplementedError(f"\"mse_cpu\" not implemented for '{_type_name(dtype)}'")
    x, y = torch.broadcast_tensors(input.to(dtype), target.to(dtype))
    w = None if weight is None else weight.to(dtype)
    return MSELossFn.apply(x, y, None if w is None else w.expand(x.shape), w, enum, choose_backend(x))


def _type_name(dtype: torch.dtype) -> str:
    return {torch.int64: "Long", torch.uint8: "Byte", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.bool: "Bool",
            torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
            torch.bfloat16: "BFloat16"}.get(dtype, str(dtype).split(".")[-1])


def _check_class_targets(input, target, weight):
    """torch's shape and dtype checks for class-index targets (nll_loss / nll_loss2d)."""
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_type_name(target.dtype)}")
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
        raise RuntimeError(f"expected scalar type {_type_name(input.dtype)} but found {_type_name(weight.dtype)}")


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
        reduction = _legacy_reduction(size_average, reduce)
    enum = _reduction_enum(reduction)
    if input.dim() == 0:
        if target.is_floating_point():  # torch's class-probability path indexes dim 1 of the 0-d input
            raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
        raise RuntimeError("Expected floating point type for target with class probabilities, got "
                           f"{_type_name(target.dtype)}" if not target.is_floating_point()
                           else "cross_entropy: input must have at least one dimension")
    if not input.is_floating_point():
        raise NotImplementedError(f"\"log_softmax_lastdim_kernel_impl\" not implemented for "
                                  f"'{_type_name(input.dtype)}'")
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
                               f"{_type_name(target.dtype)}")
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        dtype = torch.promote_types(input.dtype, target.dtype)
        if weight is not None:
            dtype = torch.promote_types(dtype, weight.dtype)
        input, target = input.to(dtype), target.to(dtype)
        weight = None if weight is None else weight.to(dtype)
    else:
        _check_class_targets(input, target, weight)
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("scratchops.cross_entropy: the gradient with respect to 'weight' is not implemented "
                           "(torch's class-index path refuses it too); pass weight.detach()")
    n = 1 if input.dim() == 1 else input.size(0)
    x = input.reshape(n, classes, math.prod(input.shape[2:]))
    t = target.reshape(x.shape) if prob else target.reshape(n, x.size(2))
    out = CrossEntropyFn.apply(x, t, weight, int(ignore_index), float(label_smoothing), enum, choose_backend(x))
    if enum != NONE:
        return out
    return out.reshape(input.shape[:1] + input.shape[2:] if input.dim() > 1 else ())
