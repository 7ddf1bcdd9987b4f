"""Triton kernels for cross_entropy (formulas in scratchops/cross_entropy.py).

Logits are viewed as (N, C, S) (class stride ``stride_xc``; (N, C) logits are (N, C, 1)): row r = (n, s) holds the
C class logits z_r.

* ``_cross_entropy_fwd_kernel``: one program per row reads the row ONCE in BLOCK-wide chunks: an online
  log-sum-exp (running max m, Σ e^{z - k} rescaled whenever m grows; k = m, or 0 while every logit so far is -inf)
  plus Σ v_c (k - z_c) and Σ v_c for the smoothing / probability terms. It writes only per-row statistics: the
  shift k, log Σ e^{z - k}, the gradient coefficient, the row's loss and its weight in D. Nothing of size N·C is
  written: no_grad costs one read of the logits. ``BLOCK >= C`` runs the loop once (one read, in registers).
* ``_cross_entropy_reduce_kernel``: the row losses to the output (cast for none; Σ, / D for mean). For mean it
  also writes the backward's D: Σ w_t, or 1 when every row is ignored.
* ``_cross_entropy_bwd_kernel``: a (rows, class blocks) grid reads the logits once more and writes dlogits once,
  p = e^{(z - k) - log s} rebuilt from the statistics and scaled by g_r / D; for probability targets the same pass
  writes the target gradient when asked.
* ``_cross_entropy_weight_bwd_kernel``: the class-weight gradient for probability targets, one program per class
  block summing over rows (only when the weight requires grad).

Bad class indices on CUDA: no host check (it would synchronise the stream); a target outside [0, C) that is not
ignore_index makes its row's loss and gradient NaN, written asynchronously on the device. CPU tensors get torch's
IndexError from the host check before any launch. Offsets are int64; math in the ACC dtype.
"""
import torch
import triton
import triton.language as tl

from .._common import FLOAT_DTYPES, Reduction, check_class_targets, compute_dtype
from ._launch import FLOAT_TYPES, Kernel, acc_dtype, cdiv, config

NONE = tl.constexpr(Reduction.NONE.value)
MEAN = tl.constexpr(Reduction.MEAN.value)
SUM = tl.constexpr(Reduction.SUM.value)
# rows of the (STATS, R) statistics tensor
SHIFT, LOG_S, COEF, LOSS, WEIGHT, ACTIVE = range(6)
STATS = 6


@triton.jit
def _cross_entropy_fwd_kernel(x_ptr, t_ptr, w_ptr, stats_ptr,  # pointers (w unused unless HAS_WEIGHT)
                              R, C, S,  # sizes: rows N·S, classes, spatial
                              stride_xn, stride_xc, stride_xs, stride_tn, stride_tc, stride_ts,  # strides
                              ignore_index, smoothing, smoothing_c,  # scalars: ε, ε / C (from the host)
                              HAS_WEIGHT: tl.constexpr, PROB: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = pid.to(tl.int64)
    n = (pid // S).to(tl.int64)  # 32-bit division (the grid bounds the rows): no 64-bit division subroutine
    s = (pid % S).to(tl.int64)
    x_row = x_ptr + n * stride_xn + s * stride_xs
    t_row = t_ptr + n * stride_tn + s * stride_ts
    cols = tl.arange(0, BLOCK)
    eps = tl.full((), smoothing, ACC)
    eps = tl.where(eps > 0, eps, 0.0)  # torch ignores a negative label_smoothing
    eps_c = tl.full((), smoothing_c, ACC)  # 0 then too; divided on the host, as torch's: no division here
    m = tl.full((), float("-inf"), ACC)  # running max (-inf until a logit above -inf is seen)
    k = tl.full((), 0.0, ACC)  # the shift: m, or 0 while m = -inf (z - k stays -inf, never -inf - -inf)
    s_exp = tl.full((), 0.0, ACC)  # Σ e^{z - k}
    dist = tl.full((), 0.0, ACC)  # Σ v_c (k - z_c), v = w (class indices) or w q' (probabilities)
    v_all = tl.full((), 0.0, ACC)  # Σ v_c
    odd = tl.full((), 0.0, ACC)  # non-zero when some v_c is ±inf or nan (then the loss is summed again below)
    sums = eps > 0  # Σ v terms: for label smoothing, and always for probability targets
    if PROB:
        sums = eps >= 0
    for start in range(0, C, BLOCK):
        c = start + cols
        mask = c < C
        z = tl.load(x_row + c * stride_xc, mask=mask, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(z, 0))
        k_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        # rescale Σ e^{z - k}: by e^{m - m'} (0 from m = -inf, 1 when the max is unchanged, -inf or inf included)
        alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
        s_exp = s_exp * alpha + tl.sum(tl.where(mask, tl.exp(z - k_new), 0.0), 0)
        if sums:
            v = tl.full([BLOCK], 1.0, ACC)
            if HAS_WEIGHT:
                v = tl.load(w_ptr + c, mask=mask, other=0).to(ACC)
            if PROB:
                q = tl.load(t_row + c * stride_tc, mask=mask, other=0).to(ACC)
                v = v * (q * (1.0 - eps) + eps_c)
            v = tl.where(mask, v, 0.0)
            shift = tl.where(k_new == k, 0.0, (k_new - k) * v_all)
            dist = dist + shift + tl.sum(tl.where(mask, v * (k_new - z), 0.0), 0)
            v_all += tl.sum(v, 0)
            odd += tl.sum(tl.where(v - v == 0, 0.0, 1.0), 0)
        m = m_new
        k = k_new
    log_s = tl.log(s_exp)
    if PROB:
        loss = dist + v_all * log_s  # Σ v_c (lse - z_c)
        if odd != 0:
            # an infinite (or nan) v_c: torch's per-class products v_c · log p_c, so inf · log p is ±inf (not
            # the inf - inf of the split sum); pathological rows only, read a second time
            loss = tl.full((), 0.0, ACC)
            for start in range(0, C, BLOCK):
                c = start + cols
                mask = c < C
                z = tl.load(x_row + c * stride_xc, mask=mask, other=0).to(ACC)
                v = tl.full([BLOCK], 1.0, ACC)
                if HAS_WEIGHT:
                    v = tl.load(w_ptr + c, mask=mask, other=0).to(ACC)
                q = tl.load(t_row + c * stride_tc, mask=mask, other=0).to(ACC)
                v = v * (q * (1.0 - eps) + eps_c)
                loss += tl.sum(tl.where(mask, -(v * ((z - k) - log_s)), 0.0), 0)
        coef = v_all
        w_t = tl.full((), 1.0, ACC)
        active = tl.full((), 1.0, ACC)
    else:
        t = tl.load(t_row).to(tl.int64)
        is_active = t != ignore_index
        bad = is_active & ((t < 0) | (t >= C))  # CUDA only (CPU raised on the host): NaN row, no sync
        ok = is_active & (t >= 0) & (t < C)
        t_safe = tl.where(ok, t, 0)
        z_t = tl.load(x_row + t_safe * stride_xc, mask=ok, other=0).to(ACC)
        if HAS_WEIGHT:
            w_t = tl.load(w_ptr + t_safe, mask=ok, other=0).to(ACC)
        else:
            w_t = tl.where(ok, 1.0, 0.0).to(ACC)
        loss = (1.0 - eps) * w_t * ((k - z_t) + log_s)
        if smoothing > 0:
            loss += eps_c * (dist + v_all * log_s)
        coef = (1.0 - eps) * w_t + eps_c * v_all
        loss = tl.where(ok, loss, 0.0)
        coef = tl.where(ok, coef, 0.0)
        loss = tl.where(bad, float("nan"), loss)
        coef = tl.where(bad, float("nan"), coef)
        active = tl.where(is_active, 1.0, 0.0).to(ACC)
    stat = stats_ptr + row  # one statistic after the other, R apart (pointer steps: no 32-bit j · R to overflow)
    tl.store(stat, k)
    tl.store(stat + R, log_s)
    tl.store(stat + R + R, coef)
    stat += R + R + R
    tl.store(stat, loss)
    tl.store(stat + R, w_t)
    tl.store(stat + R + R, active)


@triton.jit
def _cross_entropy_reduce_kernel(stats_ptr, out_ptr, denom_ptr,  # pointers
                                 R,  # sizes
                                 REDUCTION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    if REDUCTION == NONE:  # cast each row's loss, BLOCK rows per program
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + cols
        mask = offs < R
        tl.store(out_ptr + offs, tl.load(stats_ptr + R + R + R + offs, mask=mask).to(out_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(denom_ptr, tl.full((), 1.0, ACC), mask=pid == 0)  # unused by the backward of none
    else:  # one program: L = Σ ℓ_r (/ D = Σ w_t for mean)
        total = tl.zeros([BLOCK], dtype=ACC)
        wsum = tl.zeros([BLOCK], dtype=ACC)
        count = tl.zeros([BLOCK], dtype=ACC)
        losses = stats_ptr + R + R + R  # the LOSS, WEIGHT and ACTIVE statistics (pointer steps, no 32-bit j · R)
        for start in range(0, R, BLOCK):
            mask = start + cols < R
            total += tl.load(losses + start + cols, mask=mask, other=0)
            wsum += tl.load(losses + R + start + cols, mask=mask, other=0)
            count += tl.load(losses + R + R + start + cols, mask=mask, other=0)
        loss = tl.sum(total, 0)
        denom = tl.full((), 1.0, ACC)
        if REDUCTION == MEAN:
            d = tl.sum(wsum, 0)
            loss = loss / d  # every row ignored: 0 / 0 = nan, as torch
            # the backward divides by 1 when every row is ignored (their gradient is 0, as torch's)
            denom = tl.where(tl.sum(count, 0) == 0, 1.0, d)
        tl.store(out_ptr, loss.to(out_ptr.dtype.element_ty))
        tl.store(denom_ptr, denom)


@triton.jit
def _cross_entropy_bwd_kernel(x_ptr, t_ptr, w_ptr, stats_ptr, g_ptr, denom_ptr, dx_ptr, dt_ptr,  # pointers
                              R, C, S,  # sizes
                              stride_xn, stride_xc, stride_xs, stride_tn, stride_tc, stride_ts, stride_g,  # strides
                              ignore_index, smoothing, smoothing_c,  # scalars: ε, ε / C (from the host)
                              HAS_WEIGHT: tl.constexpr, PROB: tl.constexpr, NEED_DX: tl.constexpr,
                              NEED_DT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = pid.to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    n = (pid // S).to(tl.int64)  # 32-bit division (the grid bounds the rows)
    s = (pid % S).to(tl.int64)
    k = tl.load(stats_ptr + row)
    log_s = tl.load(stats_ptr + R + row)
    coef = tl.load(stats_ptr + R + R + row)
    scale = tl.load(g_ptr + row * stride_g).to(ACC) / tl.load(denom_ptr)
    eps = tl.full((), smoothing, ACC)
    eps = tl.where(eps > 0, eps, 0.0)
    eps_c = tl.full((), smoothing_c, ACC)
    z = tl.load(x_ptr + n * stride_xn + c * stride_xc + s * stride_xs, mask=mask, other=0).to(ACC)
    log_p = (z - k) - log_s
    p = tl.exp(log_p)
    w = tl.full([BLOCK], 1.0, ACC)  # not z · 0 + 1: nan at a -inf logit
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c, mask=mask, other=0).to(ACC)
    out = n * C * S + c * S + s
    if PROB:
        q_ptrs = t_ptr + n * stride_tn + c * stride_tc + s * stride_ts
        if NEED_DX:
            # dz_c = (p_c Σ v - v_c) g / D,  v = w q'
            q = tl.load(q_ptrs, mask=mask, other=0).to(ACC)
            dx = (p * coef - w * (q * (1.0 - eps) + eps_c)) * scale
            tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DT:
            # dq_c = -(1-ε) w_c log p_c · g / D (0 when D = 0: no rows), the small factors first as torch's: finite
            # where w log p alone overflows (a logit near -3.4e38)
            dq = ((-(1.0 - eps) * tl.where(tl.load(denom_ptr) == 0, 0.0, scale)) * w) * log_p
            tl.store(dt_ptr + out, dq.to(dt_ptr.dtype.element_ty), mask=mask)
    else:
        t = tl.load(t_ptr + n * stride_tn + s * stride_ts).to(tl.int64)
        active = t != ignore_index
        w_t = tl.full((), 1.0, ACC)
        if HAS_WEIGHT:
            w_t = tl.load(w_ptr + t, mask=active & (t >= 0) & (t < C), other=0).to(ACC)
        # dz_c = (p_c coef - (1-ε) w_t [c = t] - (ε/C) w_c) g / D, coef = (1-ε) w_t + (ε/C) Σ w
        dx = p * coef - tl.where(c == t, (1.0 - eps) * w_t, 0.0)
        if smoothing > 0:  # not 0 · w without smoothing: nan for an inf/nan weight
            dx -= eps_c * w
        dx = tl.where(active, dx * scale, p * 0.0)  # ignored rows: 0, nan where p is (torch's log_softmax)
        tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_weight_bwd_kernel(x_ptr, t_ptr, stats_ptr, g_ptr, denom_ptr, dw_ptr,  # pointers
                                     R, C, S,  # sizes
                                     stride_xn, stride_xc, stride_xs, stride_tn, stride_tc, stride_ts,
                                     stride_g,  # strides
                                     smoothing, smoothing_c,  # scalars
                                     ACC: tl.constexpr, BLOCK: tl.constexpr):
    # probability targets: dw_c = Σ_r -q'_rc log p_rc · g_r / D
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    eps = tl.full((), smoothing, ACC)
    eps = tl.where(eps > 0, eps, 0.0)
    denom = tl.load(denom_ptr)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for row in range(0, R):
        n = (row // S).to(tl.int64)  # 32-bit division as launched (R, S < 2^31: the forward's grid bounds the rows)
        s = (row % S).to(tl.int64)
        z = tl.load(x_ptr + n * stride_xn + c * stride_xc + s * stride_xs, mask=mask, other=0).to(ACC)
        q = tl.load(t_ptr + n * stride_tn + c * stride_tc + s * stride_ts, mask=mask, other=0).to(ACC)
        log_p = (z - tl.load(stats_ptr + row)) - tl.load(stats_ptr + R + row)
        scale = tl.load(g_ptr + row * stride_g).to(ACC) / denom
        acc += -(q * (1.0 - eps) + smoothing_c) * log_p * scale
    tl.store(dw_ptr + c, acc.to(dw_ptr.dtype.element_ty), mask=mask)


# One program per row: the small block for short rows (and fp64, and spatial rows), the wide one (16 warps) for
# vocabularies.
SMALL_C = 256
FWD = {"small": Kernel(_cross_entropy_fwd_kernel, [config(BLOCK=SMALL_C, num_warps=4)]),
       "large": Kernel(_cross_entropy_fwd_kernel, [config(BLOCK=4096, num_warps=16)])}
ROWS_BLOCK = 1024  # the grids below are computed from it
ROWS = [config(BLOCK=ROWS_BLOCK, num_warps=4)]
_reduce = Kernel(_cross_entropy_reduce_kernel, ROWS)
_bwd = Kernel(_cross_entropy_bwd_kernel, ROWS)
_weight_bwd = Kernel(_cross_entropy_weight_bwd_kernel, ROWS)


def fwd_size(classes: int, dtype: torch.dtype) -> str:
    """Which forward kernel runs a row of ``classes`` logits (tests replace it to force the looped branch)."""
    return "small" if classes <= SMALL_C or dtype == torch.float64 else "large"


# ----------------------------------------------------------------- launchers
def _dims(x):
    """(N, C, S) and the three logit strides: (N, C) logits are (N, C, 1) (spatial stride 1, as a contiguous view's)."""
    return (*x.shape, 1, (*x.stride(), 1)) if x.dim() == 2 else (*x.shape, x.stride())


def _target_strides(target, prob):
    """(n, c, s) strides of the target: probabilities like the logits; class indices (N, S) or (N,) with c = 0."""
    if prob:
        return (*target.stride(), 1) if target.dim() == 2 else target.stride()
    return (target.stride(0), 0, target.stride(1) if target.dim() == 2 else 1)


def _row_grad(g, rows):
    """g as a per-row vector (any stride) or a 0-d scalar (stride 0)."""
    if g.dim() == 0:
        return g, 0
    g = g.reshape(rows)
    return g, g.stride(0)


def _eps_c(label_smoothing, classes):
    """ε / C in double precision, as torch's (0 without smoothing or classes)."""
    return label_smoothing / classes if label_smoothing > 0 and classes else 0.0


# per dtype: (ACC, the dtype keyword for a compute-dtype allocation: none when it is x's own)
_ACC = {dtype: (acc_dtype(dtype), {} if compute_dtype(dtype) == dtype else {"dtype": compute_dtype(dtype)})
        for dtype in FLOAT_DTYPES}


def cross_entropy_fwd(x, target, weight, ignore_index, label_smoothing, reduction):
    n, c, s, x_strides = _dims(x)
    rows = n * s
    prob = target.is_floating_point()
    if not prob:
        if x.is_cpu:
            check_class_targets(target, c, ignore_index)
        if target.dtype != torch.int64:
            target = target.long()  # uint8 targets: one kernel signature for every index dtype (a rows-sized copy)
    acc, cd = _ACC[x.dtype]
    stats, denom = x.new_empty((STATS, rows), **cd), x.new_empty((), **cd)  # new_empty: cheaper than empty
    weight = weight if weight is None or weight.is_contiguous() else weight.contiguous()
    if rows and not c:
        # no classes: every row's loss is 0 (nan with class indices and smoothing: torch's ε/C · 0); D is nan for
        # probabilities (torch divides by numel / C = 0 / 0) and Σ w_t = 0 for class indices (all rows ignored)
        stats.zero_()
        stats[LOSS].fill_(float("nan") if not prob and label_smoothing > 0 else 0.0)
        stats[WEIGHT].fill_(float("nan") if prob else 0.0)
        stats[ACTIVE].fill_(1.0 if prob else 0.0)
    elif rows:
        # spatial rows (class stride S: gathers, no vector loads to gain from a wide block) take the small block
        size = fwd_size(c, x.dtype) if s == 1 else "small"
        FWD[size]((rows,), x, target, x if weight is None else weight, stats, rows, c, s, *x_strides,
                  *_target_strides(target, prob), ignore_index, label_smoothing, _eps_c(label_smoothing, c),
                  HAS_WEIGHT=weight is not None, PROB=prob, ACC=acc)
    if reduction == Reduction.NONE:
        out = x.new_empty(rows)
        _reduce((max(1, cdiv(rows, ROWS_BLOCK)),), stats, out, denom, rows, REDUCTION=0, ACC=acc)
    else:
        out = x.new_empty(())
        _reduce((1,), stats, out, denom, rows, REDUCTION=int(reduction), ACC=acc)
        if not rows and not c and not prob and label_smoothing > 0:
            out.fill_(float("nan"))  # torch's ε/C · Σ 0 is nan even with no rows
    return [out, stats, denom]


def cross_entropy_bwd(x, target, weight, stats, denom, g, ignore_index, label_smoothing, need_dx, need_dt):
    n, c, s, x_strides = _dims(x)
    prob = target.is_floating_point()
    if not prob and target.dtype != torch.int64:
        target = target.long()
    dx = (torch.empty_like(x) if x.is_contiguous() else torch.empty_like(x, memory_format=torch.contiguous_format)) \
        if need_dx else x.new_empty(0)  # x's shape, contiguous
    dt = torch.empty_like(target, memory_format=torch.contiguous_format) if need_dt else x.new_empty(0)
    g, stride_g = _row_grad(g, n * s)
    weight = weight if weight is None or weight.is_contiguous() else weight.contiguous()
    if (need_dx or need_dt) and n * c * s:
        _bwd((n * s, cdiv(c, ROWS_BLOCK)), x, target, x if weight is None else weight, stats, g, denom, dx, dt, n * s,
             c, s, *x_strides, *_target_strides(target, prob), stride_g, ignore_index, label_smoothing,
             _eps_c(label_smoothing, c), HAS_WEIGHT=weight is not None, PROB=prob, NEED_DX=bool(need_dx),
             NEED_DT=bool(need_dt and prob), ACC=_ACC[x.dtype][0])
    return [dx, dt]


def cross_entropy_weight_bwd(x, target, stats, denom, g, label_smoothing):
    n, c, s, x_strides = _dims(x)
    dw = x.new_empty(c)
    g, stride_g = _row_grad(g, n * s)
    if c:
        _weight_bwd((cdiv(c, ROWS_BLOCK),), x, target, stats, g, denom, dw, n * s, c, s, *x_strides,
                    *_target_strides(target, True), stride_g, label_smoothing, _eps_c(label_smoothing, c),
                    ACC=_ACC[x.dtype][0])
    return dw


# ----------------------------------------------------------------- ahead-of-time compiles
# Integers as a launch types them (i32 below 2^31): R = N·S and S always are (one forward program per row).
I64 = {name: "i64" for name in ("C", "stride_xn", "stride_xc", "stride_xs", "stride_tn", "stride_tc", "stride_ts",
                                "stride_g", "ignore_index")} | {"R": "i32", "S": "i32"}


def _units(prob: bool, rows: bool) -> dict:
    """The unit strides a launch specializes (triton makes an integer argument equal to 1 a constant): contiguous
    (N, C) logits (``rows``: S = 1, unit class stride; a class-index target (N,) is (N, 1) with unit strides) or
    contiguous (N, C, S) ones (unit spatial strides)."""
    if not rows:
        return {"stride_xs": 1, "stride_ts": 1}
    return {"S": 1, "stride_xc": 1, "stride_xs": 1, "stride_ts": 1, **({"stride_tc": 1} if prob else {"stride_tn": 1})}


def aot_configs():
    """Every compile the launchers above get on a GPU (read by tests/aot.py, outside the interpreter), as launched:
    contiguous (N, C) logits for every dtype and option, and contiguous (N, C, S) ones (spatial) in fp32."""
    for t in FLOAT_TYPES:
        acc = "fp64" if t == "fp64" else "fp32"
        ACC = tl.float64 if t == "fp64" else tl.float32
        scalars = {**I64, "smoothing": "fp32", "smoothing_c": "fp32"}
        for prob in (0, 1):
            ptrs = {"t_ptr": t if prob else "i64", "stats_ptr": acc, "denom_ptr": acc}
            for has_weight, rows in ((0, True), (1, True), (0, False)):
                if not rows and t != "fp32":
                    continue
                units = _units(prob, rows)
                for size in (("small",) if t == "fp64" or not rows else ("small", "large")):
                    yield from FWD[size].aot(t, {"HAS_WEIGHT": has_weight, "PROB": prob, "ACC": ACC, **units},
                                             ints=scalars, pointers=ptrs)
                needs = ((1, 0), (0, 1), (1, 1)) if prob else ((1, 0),)
                for need_dx, need_dt in needs:
                    yield from _bwd.aot(t, {"HAS_WEIGHT": has_weight, "PROB": prob, "NEED_DX": need_dx,
                                            "NEED_DT": need_dt, "ACC": ACC, **units}, ints=scalars, pointers=ptrs)
        for reduction in Reduction:
            yield from _reduce.aot(acc, {"REDUCTION": reduction.value, "ACC": ACC}, ints=I64, pointers={"out_ptr": t})
        yield from _weight_bwd.aot(t, {"ACC": ACC, **_units(True, True)}, ints=scalars,
                                   pointers={"stats_ptr": acc, "denom_ptr": acc})
