"""Triton kernels for mse_loss and cross_entropy (formulas in scratchops/losses.py).

mse: a 1-D elementwise kernel that either writes w e² or per-program partial sums,
a one-program finishing kernel (Σ partials / D) and an elementwise backward.

cross_entropy: one program per row r = (n, s) of logits viewed as (N, C, S). It
sweeps the row in BLOCK-wide chunks twice: first for the running max and the
rescaled sum of exponentials (online log-sum-exp, plus Σ w z, Σ w q' ... for the
smoothing / probability terms), then to write ∂ℓ_r/∂z_r into the saved gradient.
Per-row losses go through a small reduction kernel; the backward scales the saved
gradient by g_r / D on a (rows, class blocks) grid. Offsets are int64; math in fp32
(fp64 for fp64 inputs).
"""
import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPE_NAMES, acc_type, elementwise_out, grid_1d, same_layout

NONE, MEAN, SUM = 0, 1, 2  # scratchops.losses reduction codes
BLOCK = 1024
NUM_WARPS = 4
CE_BLOCKS = (256, 4096)  # class-dimension chunk: the small one for C <= 256 (and for float64, never timed)
CE_WARPS = {256: 4, 4096: 16}
REDUCE_BLOCK = 1024


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------- mse
@triton.jit
def _mse_fwd_kernel(x_ptr, y_ptr, w_ptr, out_ptr, n, HAS_Y: tl.constexpr, HAS_W: tl.constexpr,
                    REDUCE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = acc_type(tl.load(x_ptr + offs, mask=mask, other=0))
    if HAS_Y:  # e² = (x - y)²; without y the kernel sums x itself (used for D = Σ w)
        e = v - acc_type(tl.load(y_ptr + offs, mask=mask, other=0))
        v = e * e
    if HAS_W:
        v = v * acc_type(tl.load(w_ptr + offs, mask=mask, other=0))
    if REDUCE:
        tl.store(out_ptr + pid, tl.sum(tl.where(mask, v, 0.0), 0).to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mse_finish_kernel(part_ptr, wpart_ptr, out_ptr, denom_ptr, n_part, n_wpart, n, MEAN: tl.constexpr,
                       HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    for start in range(0, n_part, BLOCK):
        total += tl.load(part_ptr + start + cols, mask=start + cols < n_part, other=0)
    loss = tl.sum(total, 0)
    denom = tl.sum(tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty), 0) + 1.0
    if MEAN:
        if HAS_W:  # D = Σ w
            wsum = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
            for start in range(0, n_wpart, BLOCK):
                wsum += tl.load(wpart_ptr + start + cols, mask=start + cols < n_wpart, other=0)
            denom = tl.sum(wsum, 0)
        else:  # D = n (0/0 = nan for an empty input, as torch)
            denom = denom * 0.0 + n
        loss = loss / denom
    tl.store(out_ptr, loss.to(out_ptr.dtype.element_ty))
    tl.store(denom_ptr, denom.to(denom_ptr.dtype.element_ty))


@triton.jit
def _mse_bwd_kernel(x_ptr, y_ptr, w_ptr, g_ptr, denom_ptr, d_ptr, dw_ptr, n, G_SCALAR: tl.constexpr,
                    HAS_W: tl.constexpr, NEED_W: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e = acc_type(tl.load(x_ptr + offs, mask=mask)) - acc_type(tl.load(y_ptr + offs, mask=mask))
    if G_SCALAR:
        g = acc_type(tl.load(g_ptr))
    else:
        g = acc_type(tl.load(g_ptr + offs, mask=mask))
    scale = g / tl.load(denom_ptr)
    # d = 2 e w g / D (dx = d, dy = -d);  dw = e² g / D
    d = 2.0 * e * scale
    if HAS_W:
        d = d * acc_type(tl.load(w_ptr + offs, mask=mask))
    tl.store(d_ptr + offs, d.to(d_ptr.dtype.element_ty), mask=mask)
    if NEED_W:
        tl.store(dw_ptr + offs, (e * e * scale).to(dw_ptr.dtype.element_ty), mask=mask)


def _sum_parts(x, y, w):
    """Per-program partial sums of w (x - y)² (or of x alone when y is None), in the compute dtype."""
    n = x.numel()
    parts = torch.empty(triton.cdiv(n, BLOCK), dtype=_acc_dtype(x.dtype), device=x.device)
    if n:
        _mse_fwd_kernel[grid_1d(n, BLOCK)](x, x if y is None else y, x if w is None else w, parts, n,
                                           HAS_Y=y is not None, HAS_W=w is not None, REDUCE=True, BLOCK=BLOCK,
                                           num_warps=NUM_WARPS)
    return parts


def mse_fwd(x, y, w, w_den, reduction):
    out_like = elementwise_out(x)
    x, y = same_layout(x, out_like), same_layout(y, out_like)
    w = None if w is None else same_layout(w, out_like)
    cd = _acc_dtype(x.dtype)
    if reduction == NONE:
        if x.numel():
            _mse_fwd_kernel[grid_1d(x.numel(), BLOCK)](x, y, x if w is None else w, out_like, x.numel(), HAS_Y=True,
                                                      HAS_W=w is not None, REDUCE=False, BLOCK=BLOCK,
                                                      num_warps=NUM_WARPS)
        return [out_like, torch.ones((), dtype=cd, device=x.device)]
    parts = _sum_parts(x, y, w)
    has_w = reduction == MEAN and w_den is not None
    wparts = _sum_parts(w_den.contiguous(), None, None) if has_w else parts
    out = torch.empty((), dtype=x.dtype, device=x.device)
    denom = torch.empty((), dtype=cd, device=x.device)
    _mse_finish_kernel[(1,)](parts, wparts, out, denom, parts.numel(), wparts.numel(), x.numel(),
                             MEAN=reduction == MEAN, HAS_W=has_w, BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS)
    return [out, denom]


def mse_bwd(x, y, w, denom, g, need_w):
    d = elementwise_out(x)
    x, y = same_layout(x, d), same_layout(y, d)
    w = None if w is None else same_layout(w, d)
    g_scalar = g.dim() == 0
    g = g if g_scalar else same_layout(g, d)
    need_w = bool(need_w and w is not None)
    dw = torch.empty_like(d) if need_w else x.new_empty(0)
    if d.numel():
        _mse_bwd_kernel[grid_1d(d.numel(), BLOCK)](x, y, x if w is None else w, g, denom, d, dw if need_w else d,
                                                   d.numel(), G_SCALAR=g_scalar, HAS_W=w is not None,
                                                   NEED_W=need_w, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return [d, dw]


# ----------------------------------------------------------------- cross-entropy
@triton.jit
def _cross_entropy_fwd_kernel(x_ptr, t_ptr, w_ptr, grad_ptr, loss_ptr, wt_ptr, stats_ptr, R, C, S,
                              stride_xn, stride_xc, stride_xs, stride_tn, stride_tc, stride_ts,
                              ignore_index, smoothing, HAS_WEIGHT: tl.constexpr, PROB: tl.constexpr,
                              BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = row // S
    s = row % S
    x_row = x_ptr + n * stride_xn + s * stride_xs
    t_row = t_ptr + n * stride_tn + s * stride_ts
    g_row = grad_ptr + n * C * S + s
    cols = tl.arange(0, BLOCK)
    zeros = acc_type(tl.zeros([BLOCK], dtype=x_ptr.dtype.element_ty))
    eps = tl.sum(zeros, 0) + smoothing
    eps = tl.where(eps > 0, eps, 0.0)  # torch ignores a negative label_smoothing
    eps_c = eps / C
    m = tl.sum(zeros, 0)  # running max, 0 while every logit so far is -inf
    s_exp = tl.sum(zeros, 0)  # Σ e^{z - m}
    dist = tl.sum(zeros, 0)  # Σ v_c (m - z_c), v = w (class indices) or w q' (probabilities)
    v_all = tl.sum(zeros, 0)  # Σ v_c
    sums = eps > 0
    if PROB:
        sums = eps >= 0  # always
    # sweep 1: online log-sum-exp; when the max grows from m to m', the sums are rescaled / shifted
    for start in range(0, C, BLOCK):
        c = start + cols
        mask = c < C
        z = acc_type(tl.load(x_row + c * stride_xc, mask=mask, other=float("-inf")))
        m_new = tl.maximum(m, tl.max(z, 0))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        if sums:  # only for label smoothing or probability targets
            v = zeros + 1.0
            if HAS_WEIGHT:
                v = acc_type(tl.load(w_ptr + c, mask=mask, other=0))
            if PROB:
                q = acc_type(tl.load(t_row + c * stride_tc, mask=mask, other=0))
                v = v * (q * (1.0 - eps) + eps_c)
            v = tl.where(mask, v, 0.0)
            dist = dist + (m_new - m) * v_all + tl.sum(v * tl.where(mask, m_new - z, 0.0), 0)
            v_all += tl.sum(v, 0)
        s_exp = s_exp * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    log_s = tl.log(s_exp)
    if PROB:
        loss = dist + v_all * log_s  # Σ v_c (lse - z_c)
        coef = v_all
        w_t = tl.sum(zeros, 0) + 1.0  # not coef · 0 + 1: nan for an inf/nan target
        t = ignore_index  # unused: every row counts
        active = w_t > 0.0
    else:
        t = tl.load(t_row).to(tl.int64)
        active = t != ignore_index
        t_safe = tl.where(active, t, 0)
        z_t = acc_type(tl.load(x_row + t_safe * stride_xc, mask=active, other=0))
        if HAS_WEIGHT:
            w_t = acc_type(tl.load(w_ptr + t_safe, mask=active, other=0))
        else:
            w_t = tl.where(active, 1.0, 0.0) + tl.sum(zeros, 0)
        loss = (1.0 - eps) * w_t * ((m - z_t) + log_s)
        loss += tl.where(eps > 0, eps_c * (dist + v_all * log_s), 0.0)
        loss = tl.where(active, loss, 0.0)
        coef = (1.0 - eps) * w_t + eps_c * v_all
    # sweep 2: ∂ℓ/∂z_c = p_c · coef - (1-ε) w_t [c = t] - (ε/C) w_c   (probabilities: p_c Σ v - v_c)
    for start in range(0, C, BLOCK):
        c = start + cols
        mask = c < C
        z = acc_type(tl.load(x_row + c * stride_xc, mask=mask, other=0))
        w = zeros + 1.0
        if HAS_WEIGHT:
            w = acc_type(tl.load(w_ptr + c, mask=mask, other=0))
        p = tl.exp((z - m) - log_s)
        if PROB:
            q = acc_type(tl.load(t_row + c * stride_tc, mask=mask, other=0))
            grad = p * coef - w * (q * (1.0 - eps) + eps_c)
        else:
            grad = p * coef - tl.where(c == t, (1.0 - eps) * w_t, 0.0)
            grad -= tl.where(eps > 0, eps_c * w, 0.0)  # not 0 · w without smoothing: nan for an inf/nan weight
            grad = tl.where(active, grad, 0.0)
        tl.store(g_row + c * S, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + row, loss)
    tl.store(wt_ptr + row, w_t)
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + R + row, log_s)


@triton.jit
def _cross_entropy_reduce_kernel(loss_ptr, wt_ptr, out_ptr, denom_ptr, R, REDUCTION: tl.constexpr,
                                 BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    if REDUCTION == 0:  # none: cast each row's loss, BLOCK rows per program
        offs = tl.program_id(0).to(tl.int64) * BLOCK + cols
        mask = offs < R
        tl.store(out_ptr + offs, tl.load(loss_ptr + offs, mask=mask).to(out_ptr.dtype.element_ty), mask=mask)
    else:  # one program: L = Σ ℓ_r (/ D = Σ w_t for mean)
        total = tl.zeros([BLOCK], dtype=loss_ptr.dtype.element_ty)
        wsum = tl.zeros([BLOCK], dtype=loss_ptr.dtype.element_ty)
        for start in range(0, R, BLOCK):
            mask = start + cols < R
            total += tl.load(loss_ptr + start + cols, mask=mask, other=0)
            wsum += tl.load(wt_ptr + start + cols, mask=mask, other=0)
        loss = tl.sum(total, 0)
        denom = tl.sum(tl.zeros_like(wsum), 0) + 1.0
        if REDUCTION == 1:
            denom = tl.sum(wsum, 0)
            loss = loss / denom
        tl.store(out_ptr, loss.to(out_ptr.dtype.element_ty))
        tl.store(denom_ptr, denom)


@triton.jit
def _cross_entropy_bwd_kernel(grad_ptr, g_ptr, denom_ptr, dx_ptr, C, S, stride_g, BLOCK: tl.constexpr):
    # grid (rows, class blocks): row r = (n, s) is a scalar per program, no per-element division
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    offs = (row // S) * C * S + c * S + row % S
    # dz = (∂ℓ_r/∂z_r saved by the forward) · g_r / D
    # (the autograd.Function passes D = 1 when every row is ignored, so their zero gradients stay 0 as torch's;
    # D = 0 with active rows, their weights summing to 0, gives inf/nan as torch's)
    denom = tl.load(denom_ptr)
    g = acc_type(tl.load(g_ptr + row * stride_g))
    scale = g / denom
    grad = acc_type(tl.load(grad_ptr + offs, mask=mask, other=0))
    tl.store(dx_ptr + offs, (grad * scale).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_target_bwd_kernel(x_ptr, stats_ptr, w_ptr, g_ptr, denom_ptr, dt_ptr, R, C, S,
                                     stride_xn, stride_xc, stride_xs, stride_g, smoothing,
                                     HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    n = row // S
    s = row % S
    z = acc_type(tl.load(x_ptr + n * stride_xn + c * stride_xc + s * stride_xs, mask=mask, other=0))
    m = tl.load(stats_ptr + row)
    log_s = tl.load(stats_ptr + R + row)
    g = acc_type(tl.load(g_ptr + row * stride_g))
    w = tl.zeros_like(z) + 1.0  # not z · 0 + 1: nan at a -inf logit
    if HAS_WEIGHT:
        w = acc_type(tl.load(w_ptr + c, mask=mask, other=0))
    eps = tl.sum(tl.zeros_like(z), 0) + smoothing
    eps = tl.where(eps > 0, eps, 0.0)
    # dq = -(1-ε) w_c log p_c · g_r / D,  log p_c = (z_c - m) - log Σ e^{z - m}
    denom = tl.load(denom_ptr)
    dq = -(1.0 - eps) * w * ((z - m) - log_s) * tl.where(denom == 0, 0.0, g / denom)
    tl.store(dt_ptr + n * C * S + c * S + s, dq.to(dt_ptr.dtype.element_ty), mask=mask)


def _ce_block(classes: int, dtype: torch.dtype) -> int:
    return CE_BLOCKS[0] if (classes <= CE_BLOCKS[0] or dtype == torch.float64) else CE_BLOCKS[1]


def _check_targets(target, classes, ignore_index):
    """IndexError as torch's, on the host, before any launch."""
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


def cross_entropy_fwd(x, target, weight, ignore_index, label_smoothing, reduction):
    n, c, s = x.shape
    rows = n * s
    prob = target.is_floating_point()
    if not prob:
        _check_targets(target, c, ignore_index)
        target = target.long()  # uint8 targets: one kernel signature for every index dtype (a rows-sized copy)
    cd = _acc_dtype(x.dtype)
    grad = torch.empty((n, c, s), dtype=x.dtype, device=x.device)
    loss = torch.empty(rows, dtype=cd, device=x.device)
    wt = torch.empty(rows, dtype=cd, device=x.device)
    stats = torch.empty((2, rows), dtype=cd, device=x.device)
    weight = None if weight is None else weight.contiguous()
    if rows and not c:
        # no classes: every row's loss is 0 (nan with class indices and smoothing: torch's ε/C · 0); D is nan for
        # probabilities (torch divides by numel / C = 0 / 0) and Σ w_t = 0 for class indices (all rows ignored)
        loss.fill_(float("nan") if not prob and label_smoothing > 0 else 0.0)
        wt.fill_(float("nan") if prob else 0.0)
        stats.zero_()
    elif rows:
        ts = (target.stride(0), target.stride(1), target.stride(2)) if prob else (target.stride(0), 0,
                                                                                 target.stride(1))
        block = _ce_block(c, x.dtype)
        _cross_entropy_fwd_kernel[(rows,)](x, target, x if weight is None else weight, grad, loss, wt, stats, rows,
                                           c, s, *x.stride(), *ts, ignore_index, label_smoothing,
                                           HAS_WEIGHT=weight is not None, PROB=prob, BLOCK=block,
                                           num_warps=CE_WARPS[block])
    denom = torch.ones((), dtype=cd, device=x.device)
    out = torch.empty(rows if reduction == NONE else (), dtype=x.dtype, device=x.device)
    grid = grid_1d(rows, REDUCE_BLOCK) if reduction == NONE else (1,)
    if grid[0]:
        _cross_entropy_reduce_kernel[grid](loss, wt, out, denom, rows, REDUCTION=reduction, BLOCK=REDUCE_BLOCK,
                                           num_warps=NUM_WARPS)
    return [out, grad, denom, stats]


def _row_grad(g, rows):
    """g as a per-row vector (any stride) or a 0-d scalar (stride 0)."""
    if g.dim() == 0:
        return g, 0
    g = g.reshape(rows)
    return g, g.stride(0)


def cross_entropy_bwd(grad, denom, g):
    n, c, s = grad.shape
    dx = torch.empty_like(grad)
    g, stride_g = _row_grad(g, n * s)
    if dx.numel():
        _cross_entropy_bwd_kernel[(n * s, triton.cdiv(c, BLOCK))](grad, g, denom, dx, c, s, stride_g, BLOCK=BLOCK,
                                                                  num_warps=NUM_WARPS)
    return dx


def cross_entropy_target_bwd(x, stats, weight, denom, g, label_smoothing):
    n, c, s = x.shape
    dq = torch.empty((n, c, s), dtype=x.dtype, device=x.device)
    g, stride_g = _row_grad(g, n * s)
    weight = None if weight is None else weight.contiguous()
    if dq.numel():
        _cross_entropy_target_bwd_kernel[(n * s, triton.cdiv(c, BLOCK))](
            x, stats, x if weight is None else weight, g, denom, dq, n * s, c, s, *x.stride(), stride_g,
            label_smoothing, HAS_WEIGHT=weight is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dq


# ----------------------------------------------------------------- AOT configs
def _aot_configs():
    configs = []
    for dt in FLOAT_DTYPE_NAMES:
        acc = "fp64" if dt == "fp64" else "fp32"
        for has_y, has_w, reduce in ((1, 0, 1), (1, 1, 1), (1, 0, 0), (1, 1, 0), (0, 0, 1)):
            out = acc if reduce else dt
            sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "w_ptr": f"*{dt}", "out_ptr": f"*{out}", "n": "i64",
                   "HAS_Y": "constexpr", "HAS_W": "constexpr", "REDUCE": "constexpr", "BLOCK": "constexpr"}
            configs.append((_mse_fwd_kernel, sig, {"HAS_Y": has_y, "HAS_W": has_w, "REDUCE": reduce,
                                                   "BLOCK": BLOCK}, NUM_WARPS))
        for mean, has_w in ((0, 0), (1, 0), (1, 1)):
            sig = {"part_ptr": f"*{acc}", "wpart_ptr": f"*{acc}", "out_ptr": f"*{dt}", "denom_ptr": f"*{acc}",
                   "n_part": "i64", "n_wpart": "i64", "n": "i64", "MEAN": "constexpr", "HAS_W": "constexpr",
                   "BLOCK": "constexpr"}
            configs.append((_mse_finish_kernel, sig, {"MEAN": mean, "HAS_W": has_w, "BLOCK": REDUCE_BLOCK},
                            NUM_WARPS))
        for g_scalar in (0, 1):
            for has_w, need_w in ((0, 0), (1, 0), (1, 1)):
                sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "w_ptr": f"*{dt}", "g_ptr": f"*{dt}",
                       "denom_ptr": f"*{acc}", "d_ptr": f"*{dt}", "dw_ptr": f"*{dt}", "n": "i64",
                       "G_SCALAR": "constexpr", "HAS_W": "constexpr", "NEED_W": "constexpr", "BLOCK": "constexpr"}
                configs.append((_mse_bwd_kernel, sig, {"G_SCALAR": g_scalar, "HAS_W": has_w, "NEED_W": need_w,
                                                       "BLOCK": BLOCK}, NUM_WARPS))
        for target in ("i64", dt):
            for has_weight in (0, 1):
                for block in CE_BLOCKS[:1] if dt == "fp64" else CE_BLOCKS:
                    sig = {"x_ptr": f"*{dt}", "t_ptr": f"*{target}", "w_ptr": f"*{dt}", "grad_ptr": f"*{dt}",
                           "loss_ptr": f"*{acc}", "wt_ptr": f"*{acc}", "stats_ptr": f"*{acc}", "R": "i64", "C": "i64",
                           "S": "i64",
                           **{k: "i64" for k in ("stride_xn", "stride_xc", "stride_xs", "stride_tn", "stride_tc",
                                                 "stride_ts", "ignore_index")},
                           "smoothing": "fp32", "HAS_WEIGHT": "constexpr", "PROB": "constexpr", "BLOCK": "constexpr"}
                    configs.append((_cross_entropy_fwd_kernel, sig, {"HAS_WEIGHT": has_weight,
                                                                     "PROB": int(target == dt), "BLOCK": block},
                                    CE_WARPS[block]))
        for reduction in (NONE, MEAN, SUM):
            sig = {"loss_ptr": f"*{acc}", "wt_ptr": f"*{acc}", "out_ptr": f"*{dt}", "denom_ptr": f"*{acc}",
                   "R": "i64", "REDUCTION": "constexpr", "BLOCK": "constexpr"}
            configs.append((_cross_entropy_reduce_kernel, sig, {"REDUCTION": reduction, "BLOCK": REDUCE_BLOCK},
                            NUM_WARPS))
        sig = {"grad_ptr": f"*{dt}", "g_ptr": f"*{dt}", "denom_ptr": f"*{acc}", "dx_ptr": f"*{dt}", "C": "i64",
               "S": "i64", "stride_g": "i64", "BLOCK": "constexpr"}
        configs.append((_cross_entropy_bwd_kernel, sig, {"BLOCK": BLOCK}, NUM_WARPS))
        for has_weight in (0, 1):
            sig = {"x_ptr": f"*{dt}", "stats_ptr": f"*{acc}", "w_ptr": f"*{dt}", "g_ptr": f"*{dt}",
                   "denom_ptr": f"*{acc}", "dt_ptr": f"*{dt}", "R": "i64", "C": "i64", "S": "i64",
                   **{k: "i64" for k in ("stride_xn", "stride_xc", "stride_xs", "stride_g")}, "smoothing": "fp32",
                   "HAS_WEIGHT": "constexpr", "BLOCK": "constexpr"}
            configs.append((_cross_entropy_target_bwd_kernel, sig, {"HAS_WEIGHT": has_weight, "BLOCK": BLOCK},
                            NUM_WARPS))
    return configs


# Every (kernel, signature, constexprs, num_warps) the launchers above launch with.
AOT_CONFIGS = _aot_configs()
