r"""Fused linear + cross-entropy: ``loss = cross_entropy(x Wᵀ + b, target)`` without the logits.

Canonical shapes (the functional reshapes into them): x (N, H), W (C, S, H), b (C, S), where S is
the product of torch's ``out_features`` (1 without them); a "row" r = (n, s) is one softmax over the
C classes of z_r = W[:, s, :] x_n + b[:, s]. Targets: class indices t (N, S) or probabilities
q (N, C, S); per-class weights w (1 when absent); smoothing ε (0 unless > 0).

Per row, with the coefficients b_c (the smoothing / probability mass on class c):

    index        b_c = [ε > 0] (ε/C) w_c          a_c = (1-ε) w_t [c = t] + b_c
    probability  b_c = w_c ((1-ε) q_c + ε/C)      a_c = b_c
    ℓ_r  = (1-ε) w_t (lse_r - z_rt) + Σ_c b_c (lse_r - z_rc)        (ignored rows: 0)
    ∂ℓ_r/∂z_rc = p_rc Σ_a - a_c,    Σ_a = Σ_c a_c,   p_rc = exp((z_rc - m_r) - log s_r)
    ∂ℓ_r/∂q_rc = -(1-ε) w_c log p_rc        ∂ℓ_r/∂w_c = -q'_rc log p_rc   (probability targets)

lse_r = m_r + log s_r, s_r = Σ_c e^{z_rc - m_r}, found online: m starts at -inf, each tile of
logits raises it, s is rescaled by e^{m_old - m_new}, and Σ b_c (m - z_c) by adding
(m_new - m_old) Σ b seen so far (no lse - z cancellation at ±1e4 logits). A row whose max is -inf
uses the shift 0. The forward keeps per row only (m, log s, Σ_a): the stats.

Reductions: none ℓ_r; sum Σ ℓ_r; mean Σ ℓ_r / D, D = Σ w_t over non-ignored rows (indices) or
N·S (probabilities). The backward recomputes each chunk of logits from x, W and the stats:

    dZ_rc = (p_rc Σ_a,r - a_rc) · g_r / D      dX = Σ_s dZ_s W_s    dW_s = dZ_sᵀ X    db_s = Σ_n dZ_s

Both backends chunk, so no (N, C) tensor is ever made: the reference over rows (R rows x C
classes per chunk, torch.matmul as the GEMM), the Triton kernels over classes (see
``triton_kernels/linear_cross_entropy.py`` for the peak-memory formula). ``options`` (torch's
LinearCrossEntropyOptions) is accepted and ignored: both backends always run chunked.
Double backward (create_graph=True): the backward is itself a Function, its second derivative derived
and run by ``scratchops/linear_cross_entropy_bwd2.py``; torch.func transforms raise a RuntimeError.
"""
import functools
import math
from typing import List, Optional

import torch

from scratchops._backend import Function, backend_op, choose_backend
from scratchops._common import (REDUCTIONS, Reduction, autocast_lower, check_class_targets, class_loss_denominator,
                                compute_dtype, reduce_rows, type_name)

KERNELS = "linear_cross_entropy"
REFERENCE_CHUNK = 1 << 16  # logits elements per reference chunk (R = REFERENCE_CHUNK // C rows)
_CPP_TYPE = {torch.float32: "float", torch.float64: "double", torch.float16: "c10::Half",
             torch.bfloat16: "c10::BFloat16"}


# ----------------------------------------------------------------- reference math
def _row_terms(target, weight, ignore_index: int, eps: float, c: int, rows: slice, s: int, cd):
    """(wt, b, active) of the rows ``rows`` at position s: (1-ε) w_t per row (0 if ignored), b (R, C)."""
    w = weight.to(cd) if weight is not None else None
    if target.is_floating_point():
        q = target[rows, :, s].to(cd)
        q = q * (1 - eps) + eps / c if eps else q
        b = q * w if w is not None else q
        return torch.zeros(b.shape[0], dtype=cd, device=b.device), b, None
    t = target[rows, s]
    active = t != ignore_index
    tc = torch.where(active, t, torch.zeros_like(t))
    wt = (w[tc] if w is not None else torch.ones(t.shape, dtype=cd, device=t.device)) * active
    b = None
    if eps:
        per_class = w if w is not None else torch.ones(c, dtype=cd, device=t.device)
        b = (eps / c) * per_class.expand(t.shape[0], c) * active[:, None]
    return (1 - eps) * wt, b, active


def _logits(x, w, bias, rows: slice, s: int, cd):
    z = torch.matmul(x[rows].to(cd), w[:, s, :].to(cd).t())
    if bias is not None:
        z = z + bias[:, s].to(cd)
    return z.to(x.dtype).to(cd)  # rounded as torch's linear output is


def _eps(label_smoothing: float, c: int) -> float:
    return label_smoothing if label_smoothing > 0 and c else 0.0


def _chunks(n: int, c: int):
    step = max(1, REFERENCE_CHUNK // max(c, 1))
    return [slice(r, min(r + step, n)) for r in range(0, n, step)]


def _no_autocast(fn):
    """The reference formulas run in the dtypes they name, even when called under autocast."""
    @functools.wraps(fn)
    def wrapper(x, *args):
        if x.device.type not in ("cpu", "cuda"):
            return fn(x, *args)
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args)
    return wrapper


@_no_autocast
def linear_cross_entropy_fwd(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], target: torch.Tensor,
                             weight: Optional[torch.Tensor], ignore_index: int, label_smoothing: float,
                             reduction: int) -> List[torch.Tensor]:
    """[out (N, S) or 0-d, D for the backward (0-d), stats (3, N, S): m, log s, Σ_a], all in the compute dtype."""
    n, c, s_len = x.shape[0], w.shape[0], w.shape[1]
    cd = compute_dtype(x.dtype)
    if not target.is_floating_point():
        check_class_targets(target, c, ignore_index)
    eps = _eps(label_smoothing, c)
    loss = torch.zeros((n, s_len), dtype=cd, device=x.device)
    stats = torch.zeros((3, n, s_len), dtype=cd, device=x.device)
    for s in range(s_len):
        for rows in _chunks(n, c):
            z = _logits(x, w, b, rows, s, cd)
            m = z.amax(dim=1) if c else torch.full((z.shape[0],), float("-inf"), dtype=cd, device=x.device)
            m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
            shifted = z - m[:, None]
            log_s = torch.log(torch.exp(shifted).sum(dim=1))
            logp = shifted - log_s[:, None]
            wt, bc, active = _row_terms(target, weight, ignore_index, eps, c, rows, s, cd)
            ell = torch.zeros_like(m)
            sum_a = wt.clone()
            if active is not None:  # (1-ε) w_t (lse - z_t)
                tc = torch.where(active, target[rows, s], torch.zeros_like(target[rows, s]))
                ell = -wt * logp.gather(1, tc[:, None])[:, 0] if c else ell
            if bc is not None:
                ell = ell - (bc * logp).sum(dim=1)
                sum_a = sum_a + bc.sum(dim=1)
            if active is not None:
                ell = torch.where(active, ell, torch.zeros_like(ell))
            loss[rows, s] = ell
            stats[0, rows, s], stats[1, rows, s], stats[2, rows, s] = m, log_s, sum_a
    d_fwd, d_bwd = class_loss_denominator(x, target, weight, ignore_index, reduction, cd)
    return [reduce_rows(loss, d_fwd, reduction), d_bwd, stats]


def _fwd_fake(backend, x, w, b, target, weight, ignore_index, label_smoothing, reduction):
    cd = compute_dtype(x.dtype)
    n, s = x.shape[0], w.shape[1]
    out = x.new_empty((n, s) if reduction == Reduction.NONE else (), dtype=cd)
    return [out, x.new_empty((), dtype=cd), x.new_empty((3, n, s), dtype=cd)]


@_no_autocast
def linear_cross_entropy_bwd(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], target: torch.Tensor,
                             weight: Optional[torch.Tensor], stats: torch.Tensor, denom: torch.Tensor,
                             g: torch.Tensor, ignore_index: int, label_smoothing: float, need_x: bool, need_w: bool,
                             need_b: bool, need_weight: bool, need_target: bool) -> List[torch.Tensor]:
    """[dx, dW, db, dweight, dtarget]; the ones not needed are empty (0,) tensors."""
    n, c, s_len = x.shape[0], w.shape[0], w.shape[1]
    cd = compute_dtype(x.dtype)
    eps = _eps(label_smoothing, c)
    prob = target.is_floating_point()
    dx = torch.zeros(x.shape, dtype=cd, device=x.device) if need_x else x.new_empty((0,))
    dw = torch.zeros(w.shape, dtype=cd, device=x.device) if need_w else x.new_empty((0,))
    db = torch.zeros((c, s_len), dtype=cd, device=x.device) if need_b else x.new_empty((0,))
    dcw = torch.zeros((c,), dtype=cd, device=x.device) if need_weight else x.new_empty((0,))
    dq = torch.zeros(target.shape, dtype=cd, device=x.device) if need_target else x.new_empty((0,))
    scale = g.to(cd) / denom  # (N, S) for none, else 0-d
    for s in range(s_len):
        for rows in _chunks(n, c):
            z = _logits(x, w, b, rows, s, cd)
            m, log_s, sum_a = stats[0, rows, s], stats[1, rows, s], stats[2, rows, s]
            logp = (z - m[:, None]) - log_s[:, None]
            wt, bc, active = _row_terms(target, weight, ignore_index, eps, c, rows, s, cd)
            r_scale = (scale[rows, s] if scale.dim() else scale.expand(z.shape[0]))[:, None]
            dz = torch.exp(logp) * sum_a[:, None] - (bc if bc is not None else 0)
            if active is not None:
                tc = torch.where(active, target[rows, s], torch.zeros_like(target[rows, s]))
                dz = dz - wt[:, None] * (torch.arange(c, device=x.device) == tc[:, None])
                dz = torch.where(active[:, None], dz, torch.zeros_like(dz))
            dz = (dz * r_scale).to(x.dtype).to(cd)  # rounded to the logits' dtype, as torch's dlogits
            if need_x:  # in place: no (rows, H) or (C, H) temporary per chunk
                dx[rows].addmm_(dz, w[:, s, :].to(cd))
            if need_w:
                dw[:, s, :].addmm_(dz.t(), x[rows].to(cd))
            if need_b:
                db[:, s] += dz.sum(dim=0)
            if prob and (need_weight or need_target):
                if need_target:
                    cw = weight.to(cd) if weight is not None else 1.0
                    dq[rows, :, s] = -(1 - eps) * cw * logp * r_scale
                if need_weight:
                    q = target[rows, :, s].to(cd)
                    q = q * (1 - eps) + eps / c if eps else q
                    dcw += (-q * logp * r_scale).sum(dim=0)
    return [dx.to(x.dtype), dw.to(w.dtype), db.to(x.dtype), dcw.to(weight.dtype) if need_weight else dcw,
            dq.to(target.dtype) if need_target else dq]


def _bwd_fake(backend, x, w, b, target, weight, stats, denom, g, ignore_index, label_smoothing, need_x, need_w,
              need_b, need_weight, need_target):
    # shapes only: the reference's Python loop over row chunks would specialise a dynamic batch (torch.compile)
    def skipped(dtype=x.dtype):
        return x.new_empty((0,), dtype=dtype)  # one tensor per output: outputs never alias each other
    return [x.new_empty(x.shape) if need_x else skipped(), w.new_empty(w.shape) if need_w else skipped(w.dtype),
            x.new_empty((w.shape[0], w.shape[1])) if need_b else skipped(),
            weight.new_empty(weight.shape) if need_weight else skipped(),
            target.new_empty(target.shape) if need_target else skipped()]


# ----------------------------------------------------------------- backend ops
linear_cross_entropy_fwd_op = backend_op("linear_cross_entropy_fwd", linear_cross_entropy_fwd, KERNELS,
                                         fake=_fwd_fake)
linear_cross_entropy_bwd_op = backend_op("linear_cross_entropy_bwd", linear_cross_entropy_bwd, KERNELS,
                                         fake=_bwd_fake)


# ----------------------------------------------------------------- autograd
class LinearCrossEntropyFunction(Function):
    """(x, W, b, target, weight, ignore_index, label_smoothing, reduction, backend) -> (loss, D, stats)."""

    @staticmethod
    def forward(x, w, b, target, weight, ignore_index, label_smoothing, reduction, backend):
        out, denom, stats = linear_cross_entropy_fwd_op(backend, x, w, b, target, weight, ignore_index,
                                                        label_smoothing, reduction)
        return out, denom, stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, target, weight, ctx.ignore_index, ctx.label_smoothing, _, ctx.backend = inputs
        _, denom, stats = output
        ctx.mark_non_differentiable(denom, stats)
        ctx.save_for_backward(x, w, b, target, weight, stats, denom)

    @staticmethod
    def backward(ctx, g, _g_denom, _g_stats):
        if torch._C._are_functorch_transforms_active():  # their nesting could not be guarded as create_graph is
            raise RuntimeError("scratchops.linear_cross_entropy: torch.func transforms are not supported")
        x, w, b, target, weight, stats, denom = ctx.saved_tensors
        need = list(ctx.needs_input_grad[:5])
        need[2] = need[2] and b is not None
        need[3] = need[3] and target.is_floating_point()
        need[4] = need[4] and weight is not None and target.is_floating_point()
        grads = [None] * 5
        if any(need):  # differentiable (create_graph=True): scratchops/linear_cross_entropy_bwd2.py
            dx, dw, db, dcw, dq = _bwd2.LinearCrossEntropyGradFunction.apply(
                x, w, b, target, weight, stats, denom, g, ctx.ignore_index, ctx.label_smoothing,
                (need[0], need[1], need[2], need[4], need[3]), ctx.backend)
            grads = [t if flag else None for t, flag in zip((dx, dw, db, dq, dcw), need)]
        # x, W, b, target, weight; ignore_index, label_smoothing, reduction, backend: not tensors
        return (*grads, None, None, None, None)


# ----------------------------------------------------------------- functional
def _autocast(*tensors):
    """As torch's autocast for the linear (its lower-precision list), and whether it applied."""
    device_type = tensors[0].device.type
    applied = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
    return autocast_lower(*tensors), applied


def _check_linear(input, linear_weight, linear_bias) -> None:
    """torch's linear errors: same device, same dtypes."""
    devices = {t.device for t in (input, linear_weight, linear_bias) if t is not None}
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, {names}!")
    if linear_bias is not None and linear_bias.dtype != linear_weight.dtype:
        raise RuntimeError(f"self and mat2 must have the same dtype, but got {type_name(linear_bias.dtype)} and "
                           f"{type_name(linear_weight.dtype)}")
    if input.dtype != linear_weight.dtype:
        names = [_CPP_TYPE.get(d, str(d).replace("torch.", "")) for d in (input.dtype, linear_weight.dtype)]
        raise RuntimeError(f"expected m1 and m2 to have the same dtype, but got: {names[0]} != {names[1]}")
    if not input.is_floating_point():
        raise NotImplementedError(f"\"log_softmax_lastdim_kernel_impl\" not implemented for "
                                  f"'{type_name(input.dtype)}'")


def _check_index_target(logits_shape, batch: int, target, weight, dtype, classes: int) -> None:
    """torch's nll_loss checks of a class-index target against logits of ``logits_shape``."""
    logits_dim = len(logits_shape)
    if logits_dim == 1:
        if target.dim() == 1 and target.numel() != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.numel()}")
    else:
        tb = target.size(0) if target.dim() else 0
        if tb != batch:
            raise ValueError(f"Expected input batch_size ({batch}) to match target batch_size ({tb}).")
        if logits_dim == 2 and target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        expected = [batch, *logits_shape[2:]]
        if logits_dim > 2 and list(target.shape) != expected:
            raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")
    if weight is not None and (weight.dim() != 1 or weight.numel() != classes):
        raise RuntimeError(f"weight tensor should be defined either for all {classes} classes or no classes but "
                           f"got weight tensor of shape: {list(weight.shape)}")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {type_name(target.dtype)}")
    if logits_dim > 2 and target.dtype != torch.int64:
        raise RuntimeError("expected scalar type Long but found Byte")
    if weight is not None and weight.dtype != dtype:
        raise RuntimeError(f"expected scalar type {type_name(dtype)} but found {type_name(weight.dtype)}")


def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                         linear_bias: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                         reduction: str = "mean", ignore_index: Optional[int] = None, label_smoothing: float = 0.0,
                         options=None) -> torch.Tensor:
    """``torch.nn.functional.linear_cross_entropy``, never making the (N, C) logits (``options`` is ignored)."""
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    batch, in_features = input.shape[:-1], input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError("expected equal input and linear_weight last dimensions (in_features), "
                           f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively")
    classes, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (classes, *out_features):
        raise RuntimeError(f"expected linear_bias shape {(classes, *out_features)}, got {tuple(linear_bias.shape)}")
    if out_features and not batch:
        raise RuntimeError(f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
                           f" batched input, (N, {in_features}), got unbatched input with shape {tuple(input.shape)}")
    logits_shape = (*batch, classes, *out_features)
    prob = tuple(target.shape) == logits_shape
    if prob and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = -100 if ignore_index is None else ignore_index
    (input, linear_weight, linear_bias), autocast = _autocast(input, linear_weight, linear_bias)
    if autocast:  # cross_entropy is an fp32-policy op: autocast casts its 16-bit class weight and probabilities up
        target, weight = (t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16)
                          else t for t in (target, weight))
    _check_linear(input, linear_weight, linear_bias)
    # cross_entropy's argument parsing, then its checks
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"cross_entropy_loss(): argument 'weight' (position 3) must be Tensor, not "
                        f"{type(weight).__name__}")
    if isinstance(ignore_index, bool) or not hasattr(ignore_index, "__index__"):
        raise TypeError(f"cross_entropy_loss(): argument 'ignore_index' (position 5) must be int, not "
                        f"{type(ignore_index).__name__}")
    ignore_index = int(ignore_index)
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError("Overflow when unpacking long long")
    if reduction not in REDUCTIONS and reduction != "elementwise_mean":
        raise ValueError(f"{reduction} is not a valid value for reduction")
    enum = REDUCTIONS.get(reduction, Reduction.MEAN)  # elementwise_mean: torch's deprecated name of mean
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing:g}")
    dtype = input.dtype
    if prob:
        if not target.is_floating_point():
            raise RuntimeError(f"Expected floating point type for target with class probabilities, got "
                               f"{type_name(target.dtype)}")
        if weight is not None and (weight.dim() != 1 or weight.numel() != classes):
            raise RuntimeError(f"cross_entropy: weight tensor should be defined either for all {classes} classes or "
                               f"no classes but got weight tensor of shape: {list(weight.shape)}")
        dtype = torch.promote_types(dtype, target.dtype)
        dtype = dtype if weight is None else torch.promote_types(dtype, weight.dtype)
    else:
        ce_dtype = torch.float32 if autocast and dtype != torch.float64 else dtype  # autocast runs it in fp32
        _check_index_target(logits_shape, batch[0] if batch else 1, target, weight, ce_dtype, classes)
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("The function 'nll_loss_forward' is not differentiable with respect to argument "
                               "'weight'. This input cannot have requires_grad True.")
    n, s = (batch[0] if batch else 1), math.prod(out_features)
    x = input.reshape(n, in_features)
    w = linear_weight.reshape(classes, s, in_features)
    b = None if linear_bias is None else linear_bias.reshape(classes, s)
    if prob:
        t = target.reshape(n, classes, s)
    else:
        t = target.reshape(n, s).long()
    args = (x, w, b, t, weight, ignore_index, float(label_smoothing), int(enum), choose_backend(x))
    if autocast:  # the operands are cast already: the op itself runs in their dtypes
        with torch.autocast(x.device.type, enabled=False):
            out = LinearCrossEntropyFunction.apply(*args)[0]
    else:
        out = LinearCrossEntropyFunction.apply(*args)[0]
    if enum == Reduction.NONE:
        out = out.reshape((*batch, *out_features))
    return out.to(torch.float32 if autocast and dtype != torch.float64 else dtype)


# the backward's Function and the second derivative's backend op (registered with the package, like every op)
from scratchops import linear_cross_entropy_bwd2 as _bwd2  # noqa: E402 - it imports the names above
