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

Higher order and torch.func (vmap, grad, vjp, jacrev, jvp, jacfwd, hessian; what is not implemented raises where
it is taken): scratchops/cross_entropy_grad.py, with the class-weight gradient's reference formula.

Bad class indices: CPU tensors get torch's IndexError from a host check before anything runs. On
CUDA there is no host check (it would synchronise the stream every call): the row of a bad target
gets a NaN loss and a NaN gradient, written on the device, asynchronously.
"""
import math
from typing import List, Optional

import torch

from scratchops._backend import Function, backend_op, choose_backend, forward_mode, tangent_functions, \
    terminal_function, with_jvp
from scratchops._common import Reduction, autocast_enabled, check_class_targets, check_same_device, check_tensor, \
    compute_dtype, legacy_reduction, reduction_code, type_name
from scratchops.cross_entropy_checks import check_index_targets
from scratchops.cross_entropy_grad import ACTIVE, COEF, LOSS, STATS, WEIGHT, _log_p, _row, _scale, _weights, \
    as_3d, as_given, backward_tangents, bwd_vmap, cross_entropy_weight_bwd, fwd_vmap, loop_vmap, second

KERNELS = "cross_entropy"
HALF = (torch.float16, torch.bfloat16)
_grad_enabled, _is_compiling = torch.is_grad_enabled, torch.compiler.is_compiling


# ----------------------------------------------------------------- reference math
def cross_entropy_fwd(x: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
                      label_smoothing: float, reduction: int) -> List[torch.Tensor]:
    """x: (N, C, S) or (N, C) logits; target: (N, S) / (N,) class indices or probabilities shaped as x.

    Returns [out, stats, D]: out is (N·S,) for none else 0-d (x's dtype); stats (STATS, N·S) and the
    backward's D (0-d) are in the compute dtype.
    """
    cd = compute_dtype(x.dtype)
    x, target = as_3d(x, target)
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
    rows = x.size(0) * (x.size(2) if x.dim() == 3 else 1)
    cd = compute_dtype(x.dtype)
    out = x.new_empty((rows,) if reduction == Reduction.NONE else ())
    return [out, x.new_empty((STATS, rows), dtype=cd), x.new_empty((), dtype=cd)]


def cross_entropy_bwd(x: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], stats: torch.Tensor,
                      denom: torch.Tensor, g: torch.Tensor, ignore_index: int, label_smoothing: float, need_dx: bool,
                      need_dt: bool) -> List[torch.Tensor]:
    """[dz, dq]: dz = ∂ℓ_r/∂z_r · g_r / D; dq = -(1-ε) w log p · g_r / D (probabilities); empty when not needed."""
    shape = x.shape
    x, target = as_3d(x, target)
    n, c, s = x.shape
    cd = denom.dtype
    prob = target.is_floating_point()
    eps = label_smoothing if label_smoothing > 0 and c else 0.0
    logp = _log_p(x, stats, cd)
    p = torch.exp(logp)
    coef = _row(stats[COEF], n, s)
    w = _weights(weight, c, logp)
    scale = _scale(g, denom, n, s)
    dx, dt = x.new_empty(0), x.new_empty(0)  # two tensors: a custom op's outputs may not alias
    if prob:
        if need_dx:
            q = target.to(cd) * (1 - eps) + eps / c if eps else target.to(cd)
            dx = ((p * coef - w * q) * scale).to(x.dtype)
        if need_dt:
            # the small factors first, as torch's: (-(1-ε) g/D) w log p is finite where (w log p) overflows
            factor = -(1 - eps) * torch.where(denom == 0, torch.zeros_like(scale), scale)
            dt = ((factor * w) * logp).to(target.dtype)
    elif need_dx:
        t = target.long().unsqueeze(1)
        active = t != ignore_index
        grad = p * coef - (1 - eps) * _row(stats[WEIGHT], n, s) * (torch.arange(c, device=x.device).view(1, c, 1) == t)
        if eps:
            grad = grad - eps / c * w
        dx = torch.where(active, grad * scale, p * 0).to(x.dtype)  # ignored rows: 0, nan where p is nan (torch)
    return list(as_given(shape, dx, dt))


# ----------------------------------------------------------------- backend ops and their vmap rules
cross_entropy_fwd_op = backend_op("cross_entropy_fwd", cross_entropy_fwd, KERNELS, fake=_cross_entropy_fwd_fake)
cross_entropy_bwd_op = backend_op("cross_entropy_bwd", cross_entropy_bwd, KERNELS)
cross_entropy_weight_bwd_op = backend_op("cross_entropy_weight_bwd", cross_entropy_weight_bwd, KERNELS)
cross_entropy_fwd_op.custom.register_vmap(fwd_vmap(cross_entropy_fwd_op))
cross_entropy_bwd_op.custom.register_vmap(bwd_vmap(cross_entropy_bwd_op))
cross_entropy_weight_bwd_op.custom.register_vmap(loop_vmap(cross_entropy_weight_bwd_op))


# ----------------------------------------------------------------- autograd
_WEIGHT_TWICE = ("scratchops.cross_entropy: a second derivative with respect to the class weight is not implemented "
                 "(detach the weight)")


CrossEntropySecondFunction = terminal_function(
    "CrossEntropySecondFunction", second, "scratchops.cross_entropy: a third derivative is not implemented "
    "(derivatives above the second cannot be differentiated again)")


class CrossEntropyBackwardFunction(Function):
    r"""(dz, dq) = cross_entropy_bwd(...): the first backward, differentiable once more (CrossEntropySecondFunction).

    Forward mode along (ż, q̇, ġ), the transpose of the reverse formulas (the Hessian in z is symmetric):
    ḋz = s coef p (ż - Σ p ż) + (1-ε) s (p Σ w q̇ - w q̇) + A ġ / D,   ḋq = -(1-ε) s' w (ż - Σ p ż) - (1-ε) w log p ġ/D'.
    """
    generate_vmap_rule = True

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
        if forward_mode():  # what only the jvp reads (its Function is applied only then): no eager host cost
            ctx.has_output = [o.dim() > 1 for o in output]
            ctx.mark_non_differentiable(*[o for o in output if o.dim() == 1])  # the empty placeholders: no tangent
            ctx.save_for_forward(x, target, weight, stats, denom, g)

    @staticmethod
    def backward(ctx, u, ut):
        if ctx.needs_input_grad[2]:
            raise NotImplementedError(_WEIGHT_TWICE)
        u = None if u is None or u.numel() == 0 else u
        ut = None if ut is None or ut.numel() == 0 else ut
        need = ctx.needs_input_grad
        if u is None and ut is None:
            return (None,) * 11
        dz, dq, dg = CrossEntropySecondFunction.apply(*ctx.saved_tensors, u, ut, ctx.ignore_index,
                                                      ctx.label_smoothing)
        return (dz if need[0] else None, dq if need[1] and dq.numel() else None, None, None, None,
                dg if need[5] else None, None, None, None, None, None)


def _backward_jvp(ctx, x_t, q_t, w_t, _stats_t, _denom_t, g_t, *_):
    if w_t is not None:
        raise NotImplementedError(_WEIGHT_TWICE)
    dz_t, dq_t = CrossEntropyBackwardTangentFunction.apply(*ctx.saved_tensors, x_t, q_t, g_t, ctx.ignore_index,
                                                           ctx.label_smoothing)
    return (dz_t if ctx.has_output[0] else None), (dq_t if ctx.has_output[1] else None)


def _cross_entropy_weight_grad(x, target, stats, denom, g, label_smoothing, backend):
    """dw_c = Σ_r -q'_rc log p_rc · g_r / D (probability targets)."""
    return cross_entropy_weight_bwd_op(backend, x, target, stats, denom, g, label_smoothing)


CrossEntropyWeightGradFunction = terminal_function("CrossEntropyWeightGradFunction", _cross_entropy_weight_grad,
                                                   _WEIGHT_TWICE)


class CrossEntropyFunction(Function):
    """cross_entropy(x, target, weight, ignore_index, ε, reduction, backend) -> (L, stats, D).

    Backward: dz = ∂ℓ_r/∂z_r · g_r / D, dq = -(1-ε) w log p · g_r / D, dw = Σ_r -q' log p · g_r / D
    (probability targets), all rebuilt from the logits and the per-row statistics; dz and dq by
    CrossEntropyBackwardFunction, differentiable once more. Forward mode: ℓ̇_r = Σ_c (dz ż + dq q̇) with (dz, dq)
    the backward op at g = 1, plus Σ_c -q' log p ẇ / D for probability targets.
    """
    generate_vmap_rule = True

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
        if forward_mode():
            ctx.save_for_forward(x, target, weight, stats, denom)

    @staticmethod
    def backward(ctx, g, _g_stats, _g_denom):
        x, target, weight, stats, denom = ctx.saved_tensors
        need_dx, need_dt, need_dw = ctx.needs_input_grad[:3] if g is not None else (False,) * 3
        dx = dt = dw = None
        if need_dx or need_dt:
            args = (x, target, weight, stats, denom, g, ctx.ignore_index, ctx.label_smoothing, need_dx, need_dt)
            if _grad_enabled() or forward_mode() or _is_compiling():  # a graph to record: the Function
                backward = CrossEntropyBackwardJvpFunction if forward_mode() else CrossEntropyBackwardFunction
                dx, dt = backward.apply(*args, ctx.backend)
            else:  # what its apply does then (fresh_outputs), without the apply
                dx, dt = cross_entropy_bwd_op(ctx.backend, *args)
            dx, dt = (dx if need_dx else None), (dt if need_dt else None)
        if need_dw:  # probability targets only (the functional refuses it for class indices, as torch)
            dw = CrossEntropyWeightGradFunction.apply(x, target, stats, denom, g, ctx.label_smoothing, ctx.backend)
        return dx, dt, dw, None, None, None, None  # x, target, weight, ignore_index, ε, reduction, backend


class CrossEntropyEagerFunction(Function):
    """CrossEntropyFunction for a plain eager call (no torch.func transform, no forward AD, not compiling): a ctx
    forward that returns the loss alone and saves the statistics (no setup_context call, no non-differentiable
    outputs to wrap: host time); the same backward."""

    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, label_smoothing, reduction, backend):
        out, stats, denom = cross_entropy_fwd_op(backend, x, target, weight, ignore_index, label_smoothing, reduction)
        ctx.ignore_index, ctx.label_smoothing, ctx.reduction, ctx.backend = ignore_index, label_smoothing, reduction, \
            backend
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, target, weight, stats, denom)
        return out

    @staticmethod
    def backward(ctx, g):
        return CrossEntropyFunction.backward(ctx, g, None, None)


def _tangent(x, target, weight, stats, denom, x_t, q_t, w_t, ignore_index, label_smoothing, reduction, backend):
    """L̇ (CrossEntropyFunction's docstring)."""
    x, target, x_t, q_t = as_3d(x, target, x_t, q_t)
    (n, c, s), cd, prob = x.shape, denom.dtype, target.is_floating_point()
    if w_t is not None and not prob:
        raise NotImplementedError("scratchops.cross_entropy: forward-mode derivatives with respect to the class "
                                  "weight are implemented for probability targets only")
    ones = denom.new_ones(n * s if reduction == Reduction.NONE else ())
    dz, dq = cross_entropy_bwd_op(backend, x, target, weight, stats, denom, ones, ignore_index,
                                  label_smoothing, x_t is not None, prob and q_t is not None)
    lt = torch.zeros((n, 1, s), dtype=cd, device=x.device)
    for grad, tangent in ((dz, x_t), (dq, q_t if prob else None)):
        if tangent is not None:
            lt = lt + (grad.to(cd) * tangent.to(cd)).sum(dim=1, keepdim=True)
    if w_t is not None:
        eps = label_smoothing if label_smoothing > 0 and c else 0.0
        logp, q = _log_p(x, stats, cd), target.to(cd) * (1 - eps) + eps / c if eps else target.to(cd)
        lt = lt - (q * logp * w_t.to(cd).view(1, c, 1)).sum(dim=1, keepdim=True) / denom
    return (lt.reshape(-1) if reduction == Reduction.NONE else lt.sum()).to(x.dtype)


def _cross_entropy_jvp(ctx, x_t, q_t, w_t, *_):
    return CrossEntropyTangentFunction.apply(*ctx.saved_tensors, x_t, q_t, w_t, ctx.ignore_index, ctx.label_smoothing,
                                             ctx.reduction, ctx.backend), None, None


CrossEntropyTangentFunction, CrossEntropyBackwardTangentFunction = tangent_functions(
    "cross_entropy", CrossEntropyTangentFunction=_tangent, CrossEntropyBackwardTangentFunction=backward_tangents)
# Forward mode (torch.func.jvp / jacfwd / hessian); dynamo cannot trace a Function with jvp.
CrossEntropyJvpFunction = with_jvp(CrossEntropyFunction, _cross_entropy_jvp)
CrossEntropyBackwardJvpFunction = with_jvp(CrossEntropyBackwardFunction, _backward_jvp)


# ----------------------------------------------------------------- functional
def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  size_average: Optional[bool] = None, ignore_index: int = -100, reduce: Optional[bool] = None,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    check_tensor("cross_entropy_loss", input)
    check_tensor("cross_entropy_loss", target, "target", 2)
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"cross_entropy_loss(): argument 'weight' (position 3) must be Tensor, not "
                        f"{type(weight).__name__}")
    if type(ignore_index) is not int and not hasattr(ignore_index, "__index__"):
        raise TypeError(f"cross_entropy_loss(): argument 'ignore_index' (position 5) must be int, not "
                        f"{type(ignore_index).__name__}")
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce)
    code = reduction_code(reduction)
    if not (input.is_cpu and target.is_cpu and (weight is None or weight.is_cpu)):  # no device objects if all CPU
        check_same_device(input, target, weight)
    if autocast_enabled(input):
        # torch's autocast runs cross_entropy in float32 (an fp32-policy op): 16-bit floats are cast up
        input, target, weight = (t.float() if t is not None and t.dtype in HALF else t for t in (input, target, weight))
    dim = input.dim()
    if dim == 0:
        if target.is_floating_point():  # torch's class-probability path indexes dim 1 of the 0-d input
            raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
        raise RuntimeError("Expected floating point type for target with class probabilities, got "
                           f"{type_name(target.dtype)}" if not target.is_floating_point()
                           else "cross_entropy: input must have at least one dimension")
    if not input.is_floating_point():
        raise NotImplementedError(f"\"log_softmax_lastdim_kernel_impl\" not implemented for "
                                  f"'{type_name(input.dtype)}'")
    classes = input.size(0 if dim == 1 else 1)
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
        check_index_targets(input, target, weight)
        if classes == 0 and dim > 2:  # torch's nll_loss2d view of (N, 0, ...) logits
            raise RuntimeError(f"size mismatch (got input: {[input.size(0), 0, 0, 0]} , target: "
                               f"{[target.size(0), 1, math.prod(target.shape[1:])]}")
    if not prob and weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("scratchops.cross_entropy: the gradient with respect to 'weight' is not implemented "
                           "(torch's class-index path refuses it too); pass weight.detach()")
    if dim == 2:  # (N, C) as it is: no view node in the graph (the kernels take 2-D logits)
        x, t = input, target
    else:
        n = 1 if dim == 1 else input.size(0)
        x = input.reshape(n, classes, math.prod(input.shape[2:]))
        t = target.reshape(x.shape) if prob else target.reshape(n, x.size(2))
    args = (x, t, weight, int(ignore_index), float(label_smoothing), code, choose_backend(x))
    if _is_compiling():  # the setup_context Functions (dynamo; torch.func, forward AD), their outputs a tuple
        out = CrossEntropyFunction.apply(*args)[0]
    elif forward_mode():
        out = CrossEntropyJvpFunction.apply(*args)[0]
    else:
        out = CrossEntropyEagerFunction.apply(*args)
    if code != Reduction.NONE or dim == 2:
        return out
    return out.reshape(input.shape[:1] + input.shape[2:] if dim > 1 else ())
