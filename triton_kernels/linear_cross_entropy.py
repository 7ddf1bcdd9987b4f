r"""Triton kernels for the fused linear + cross-entropy (formulas: ``scratchops/linear_cross_entropy.py``).

Shapes as there: x (N, H), W (C, S, H), b (C, S); one launch sequence per position s (S = 1 without out_features).

* ``_lce_fwd_kernel``: one program per BLOCK_N token rows sweeps every class tile: the logits tile Z = X Wᵀ (+ b) is
  made by the K loop (``_gemm.mma``) and consumed on chip by the online log-sum-exp (running max from -inf, masked
  lanes at -inf, shift 0 for an all -inf row), which also gathers z_t and Σ b_c (m - z_c). Written: the row losses
  and the stats (m, log s, Σ_a) only.
* ``_lce_dlogits_kernel``: for one chunk of classes [v0, v0 + V_c), recomputes each logits tile from x, W and the
  stats and writes dZ = (p Σ_a - a) g_r / D for the chunk (and, for probability targets, d target and the class-weight
  gradient by atomic adds).
* ``_lce_gemm_kernel``: C (+)= A·B with fp32 (fp64) accumulation, or the row sums of A: dX += dZ W_chunk (into one
  accumulator), dW_chunk = dZᵀ X, db_chunk = Σ_n dZ.

Peak memory. The forward allocates the row losses and the stats: 4·N·S·a bytes (a = 4, or 8 for fp64), and O(N·S)
row temporaries (target checks, D). The backward adds, at most at once,

    N·V_c·e  (one dZ chunk, e = x's element size)  +  N·H·4 (the fp32 dX accumulator; fp16/bf16 only)
    + C·a (class-weight gradient, probability targets only),   V_c = min(C, max(H, 512)) rounded up to 128,

next to the gradients (dX, dW, db, d target: their inputs' sizes). No (N, C) logits or dlogits tensor: at B·T = 16384,
H = 4096, C = 128256, bf16, that is 128 + 256 MiB instead of 4 GiB of bf16 logits (plus softmax, gradient) unfused.
"""
import torch
import triton
import triton.language as tl

from .._common import check_class_targets, class_loss_denominator, reduce_rows
from ._gemm import CLASS_TYPES, dtype_class, input_precision, mma, tile_ids
from ._launch import Kernel, acc_dtype, cdiv, config, tiles

CHUNK_MIN = 512  # V_c >= this many classes (and >= H): dZ chunk about the size of x
ROW_FIELDS = ("BLOCK_N", "BLOCK_V", "BLOCK_K", "GROUP")
GEMM_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP")
# Tiles chosen against spills with triton 3.6 / 3.7.1's ptxas: "half_prob" (row kernels, 16-bit probability targets:
# 128x32, not 128x64), "<class>_acc" (dX += dZ W, C's tile and the product live at once: 64 columns, not 128); fp64 K 16
ROW_CONFIGS = {name: tiles(ROW_FIELDS, row) for name, row in [
    ("half", (128, 64, 64, 8, 8, 3)), ("half_prob", (128, 32, 64, 8, 8, 3)), ("tf32", (64, 64, 32, 8, 8, 3)),
    ("ieee", (32, 64, 32, 8, 4, 2)), ("fp64", (16, 16, 16, 8, 4, 2))]}
GEMM_CONFIGS = {name: tiles(GEMM_FIELDS, row) for name, row in [
    ("half", (128, 128, 64, 8, 8, 3)), ("half_acc", (128, 64, 64, 8, 8, 3)), ("tf32", (128, 128, 32, 8, 8, 3)),
    ("tf32_acc", (128, 64, 32, 8, 8, 3)), ("ieee", (64, 64, 32, 8, 4, 2)), ("ieee_acc", (64, 64, 32, 8, 4, 2)),
    ("fp64", (32, 32, 8, 8, 4, 2)), ("fp64_acc", (32, 16, 8, 8, 4, 2))]}
ROW_INTERPRETER = config(4, 1, BLOCK_N=16, BLOCK_V=32, BLOCK_K=16, GROUP=4)
GEMM_INTERPRETER = config(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP=4)


# ----------------------------------------------------------------- device helpers
@triton.jit
def _logits_tile(x_rows, w_ptr, b_ptr, cols, H, stride_xk, stride_wv, stride_wk, stride_b,
                 HAS_BIAS: tl.constexpr, ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Z = X Wᵀ (+ b) of rows ``x_rows``, in-range classes ``cols``, in x's dtype (as torch's linear), in ACC."""
    rk = tl.arange(0, BLOCK_K)
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), ACC)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < H
        a = tl.load(x_rows + kk[None, :] * stride_xk, mask=k_mask[None, :], other=0.0)
        bt = tl.load(w_cols + kk[:, None] * stride_wk, mask=k_mask[:, None], other=0.0)
        acc = mma(acc, a, bt, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * stride_b).to(ACC)[None, :]
    return acc.to(x_rows.dtype.element_ty).to(ACC)


@triton.jit
def _chunk_tile(x_ptr, w_ptr, b_ptr, stats_ptr, N, H, v_start, width, stride_xn, stride_xk, stride_wv, stride_wk,
                stride_b, stride_sn, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """This program's (rows, classes) tile of the chunk [v_start, v_start + width): rows, n_mask, local class offsets,
    v_mask, classes, the tile mask, x and stats row pointers, the logits tile (past-the-end indices clamped)."""
    pid_n, pid_v = tile_ids(N, width, BLOCK_N, BLOCK_V, GROUP)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    rows = tl.where(n_mask, rows, 0)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = local < width
    cols = v_start + tl.where(v_mask, local, 0)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    z = _logits_tile(x_rows, w_ptr, b_ptr, cols, H, stride_xk, stride_wv, stride_wk, stride_b,
                     HAS_BIAS, ACC, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    mask = n_mask[:, None] & v_mask[None, :]
    return rows, n_mask, local, v_mask, cols, mask, x_rows, stats_ptr + rows.to(tl.int64) * stride_sn, z


@triton.jit
def _row_target(t_ptr, cw_ptr, rows, n_mask, stride_tn, ignore_index, eps,
                HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """Class-index rows: (t, active, (1-ε) w_t (0 when ignored))."""
    t = tl.load(t_ptr + rows.to(tl.int64) * stride_tn, mask=n_mask, other=ignore_index)
    active = (t != ignore_index) & n_mask
    t = tl.where(active, t, 0)
    wt = tl.full((), 1.0, ACC) - eps
    if HAS_WEIGHT:
        wt = wt * tl.load(cw_ptr + t).to(ACC)
    return t, active, tl.where(active, wt, 0.0)


@triton.jit
def _class_mass(t_ptr, cw_ptr, rows, cols, mask, active, C, stride_tn, stride_tv, eps,
                PROB: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, ACC: tl.constexpr):
    """b_c of each (row, class) lane: w_c q'_c (probabilities) or (ε/C) w_c (smoothed indices); 0 off ``mask``."""
    if PROB:
        q = tl.load(t_ptr + rows.to(tl.int64)[:, None] * stride_tn + cols.to(tl.int64)[None, :] * stride_tv,
                    mask=mask, other=0.0).to(ACC)
        if SMOOTH:
            q = q * (1.0 - eps) + eps / C
    else:
        q = tl.where(mask & active[:, None], eps / C, 0.0).to(ACC)
    if HAS_WEIGHT:
        q = q * tl.load(cw_ptr + cols).to(ACC)[None, :]
    return tl.where(mask, q, 0.0)


# ----------------------------------------------------------------- kernels
@triton.jit
def _lce_fwd_kernel(
        # pointers: x (N, H), W (C, H), b (C,), target (N,) or (N, C), class weight (C,), outputs
        x_ptr, w_ptr, b_ptr, t_ptr, cw_ptr, loss_ptr, stats_ptr,
        N, C, H,  # sizes
        # strides
        stride_xn, stride_xk, stride_wv, stride_wk, stride_b, stride_tn, stride_tv, stride_ln, stride_sq, stride_sn,
        ignore_index, eps,  # scalars
        # constexprs
        PROB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
        ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    rows = tl.where(n_mask, rows, 0)  # rows past N re-read row 0; nothing of theirs is stored
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    rv = tl.arange(0, BLOCK_V)
    if PROB:
        t, active, wt = rows, n_mask, tl.zeros((BLOCK_N,), ACC)
    else:
        t, active, wt = _row_target(t_ptr, cw_ptr, rows, n_mask, stride_tn, ignore_index, eps, HAS_WEIGHT, ACC)
    m = tl.full((BLOCK_N,), float("-inf"), ACC)  # running max
    shift = tl.zeros((BLOCK_N,), ACC)  # m, or 0 while every logit seen is -inf
    s = tl.zeros((BLOCK_N,), ACC)  # Σ e^{z - shift}
    zt = tl.zeros((BLOCK_N,), ACC)  # the target's logit
    mass_gap = tl.zeros((BLOCK_N,), ACC)  # Σ b_c (shift - z_c)
    mass = tl.zeros((BLOCK_N,), ACC)  # Σ b_c
    for v0 in range(0, C, BLOCK_V):
        cols = v0 + rv
        v_mask = cols < C
        cols = tl.where(v_mask, cols, 0)
        z = _logits_tile(x_rows, w_ptr, b_ptr, cols, H, stride_xk, stride_wv, stride_wk, stride_b,
                         HAS_BIAS, ACC, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        z = tl.where(v_mask[None, :], z, float("-inf"))
        m_old = m
        m = tl.maximum(m, tl.max(z, axis=1))
        new_shift = tl.where(m == float("-inf"), 0.0, m)
        # e^{m_old - shift}, not e^{shift_old - shift}: 0 (not 0·inf) while nothing finite was seen
        s = s * tl.exp(m_old - new_shift) + tl.sum(tl.exp(z - new_shift[:, None]), axis=1)
        if PROB or SMOOTH:
            bc = _class_mass(t_ptr, cw_ptr, rows, cols, v_mask[None, :] & n_mask[:, None], active, C, stride_tn,
                             stride_tv, eps, PROB, HAS_WEIGHT, SMOOTH, ACC)
            gap = tl.where(v_mask[None, :], bc * (new_shift[:, None] - z), 0.0)
            mass_gap += (new_shift - shift) * mass + tl.sum(gap, axis=1)
            mass += tl.sum(bc, axis=1)
        if not PROB:
            zt += tl.sum(tl.where((cols[None, :] == t[:, None]) & v_mask[None, :], z, 0.0), axis=1)
        shift = new_shift
    log_s = tl.log(s)
    loss = mass_gap + mass * log_s
    if not PROB:
        loss = tl.where(active, loss + wt * ((shift - zt) + log_s), 0.0)
    tl.store(loss_ptr + rows.to(tl.int64) * stride_ln, loss.to(loss_ptr.dtype.element_ty), mask=n_mask)
    stats_rows = stats_ptr + rows.to(tl.int64) * stride_sn
    tl.store(stats_rows, shift, mask=n_mask)
    tl.store(stats_rows + stride_sq, log_s, mask=n_mask)
    tl.store(stats_rows + 2 * stride_sq, wt + mass, mask=n_mask)


@triton.jit
def _lce_dlogits_kernel(
        # pointers: x, W, b, target, class weight, stats, g, D; outputs dZ chunk (N, V_c), d target, d class weight
        x_ptr, w_ptr, b_ptr, t_ptr, cw_ptr, stats_ptr, g_ptr, d_ptr, dz_ptr, dq_ptr, dcw_ptr,
        # sizes: the chunk is classes [v_start, v_start + width)
        N, C, H, v_start, width,
        # strides
        stride_xn, stride_xk, stride_wv, stride_wk, stride_b, stride_tn, stride_tv, stride_sq, stride_sn, stride_gn,
        stride_dzn, stride_dzv, stride_dqn, stride_dqv,
        ignore_index, eps,  # scalars
        # constexprs
        PROB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
        NEED_DQ: tl.constexpr, NEED_DCW: tl.constexpr, ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    rows, n_mask, local, v_mask, cols, mask, x_rows, stats_rows, z = _chunk_tile(
        x_ptr, w_ptr, b_ptr, stats_ptr, N, H, v_start, width, stride_xn, stride_xk, stride_wv, stride_wk, stride_b,
        stride_sn, HAS_BIAS, ACC, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K, GROUP)
    shift = tl.load(stats_rows)
    log_s = tl.load(stats_rows + stride_sq)
    sum_a = tl.load(stats_rows + 2 * stride_sq)
    scale = tl.load(g_ptr + rows.to(tl.int64) * stride_gn).to(ACC) / tl.load(d_ptr)  # g_r / D
    logp = (z - shift[:, None]) - log_s[:, None]
    dz = tl.exp(logp) * sum_a[:, None]
    if PROB:
        active = n_mask
    else:
        t, active, wt = _row_target(t_ptr, cw_ptr, rows, n_mask, stride_tn, ignore_index, eps, HAS_WEIGHT, ACC)
        dz -= tl.where(cols[None, :] == t[:, None], wt[:, None], 0.0)
    if PROB or SMOOTH:
        dz -= _class_mass(t_ptr, cw_ptr, rows, cols, mask, active, C, stride_tn, stride_tv, eps,
                          PROB, HAS_WEIGHT, SMOOTH, ACC)
    dz = tl.where(active[:, None], dz * scale[:, None], 0.0)
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * stride_dzn + local[None, :] * stride_dzv,
             dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if NEED_DQ:  # d q_c = -(1-ε) w_c log p_c · g / D
        dq = -(1.0 - eps) * logp * scale[:, None]
        if HAS_WEIGHT:
            dq = dq * tl.load(cw_ptr + cols).to(ACC)[None, :]
        tl.store(dq_ptr + rows.to(tl.int64)[:, None] * stride_dqn + cols.to(tl.int64)[None, :] * stride_dqv,
                 dq.to(dq_ptr.dtype.element_ty), mask=mask)
    if NEED_DCW:  # d w_c = -Σ_r q'_rc log p_rc · g_r / D
        q = _class_mass(t_ptr, cw_ptr, rows, cols, mask, active, C, stride_tn, stride_tv, eps, PROB, False, SMOOTH,
                        ACC)
        part = tl.sum(tl.where(mask, -q * logp * scale[:, None], 0.0), axis=0)
        tl.atomic_add(dcw_ptr + cols, part, mask=v_mask)


@triton.jit
def _lce_gemm_kernel(
        # pointers: C (M, N) (+)= A (M, K) · B (K, N); rs (M,) = Σ_k A
        a_ptr, b_ptr, c_ptr, rs_ptr,
        M, N, K,  # sizes
        # strides
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_rs,
        # constexprs (PRODUCT False: the row sums alone)
        PRODUCT: tl.constexpr, ACCUMULATE: tl.constexpr, ROW_SUM: tl.constexpr,
        ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    rm64 = tl.where(m_mask, rm, 0).to(tl.int64)
    rn64 = tl.where(n_mask, rn, 0).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    row_sum = tl.zeros((BLOCK_M,), ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        a = tl.load(a_ptr + rm64[:, None] * stride_am + kk[None, :].to(tl.int64) * stride_ak,
                    mask=k_mask[None, :], other=0.0)
        if PRODUCT:
            b = tl.load(b_ptr + kk[:, None].to(tl.int64) * stride_bk + rn64[None, :] * stride_bn,
                        mask=k_mask[:, None], other=0.0)
            acc = mma(acc, a, b, INPUT_PRECISION)
        if ROW_SUM:
            row_sum += tl.sum(a.to(ACC), axis=1)
    c_ptrs = c_ptr + rm64[:, None] * stride_cm + rn64[None, :] * stride_cn
    mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0).to(ACC)
    if PRODUCT:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    if ROW_SUM:
        if pid_n == 0:
            tl.store(rs_ptr + rm64 * stride_rs, row_sum.to(rs_ptr.dtype.element_ty), mask=m_mask)


_fwd = Kernel(_lce_fwd_kernel, ROW_CONFIGS, interpreter=ROW_INTERPRETER)
_dlogits = Kernel(_lce_dlogits_kernel, ROW_CONFIGS, interpreter=ROW_INTERPRETER)
_gemm = Kernel(_lce_gemm_kernel, GEMM_CONFIGS, interpreter=GEMM_INTERPRETER)


# ----------------------------------------------------------------- launchers
def chunk_width(c: int, h: int) -> int:
    """V_c, the classes of one dZ chunk: about as many as x has features (at least CHUNK_MIN), at most C."""
    return min(cdiv(max(c, 1), 128), cdiv(max(h, CHUNK_MIN), 128)) * 128


def _target_strides(target, s):
    """(target at position s, stride_tn, stride_tv)."""
    ts = target[:, :, s] if target.is_floating_point() else target[:, s]
    return ts, ts.stride(0), ts.stride(1) if target.is_floating_point() else 0


def _common_args(x, w, b, target, weight, label_smoothing):
    eps = float(label_smoothing) if label_smoothing > 0 and w.shape[0] else 0.0
    cls = dtype_class(x.dtype, torch.backends.cuda.matmul.allow_tf32)
    consts = dict(PROB=target.is_floating_point(), HAS_BIAS=b is not None, HAS_WEIGHT=weight is not None,
                  SMOOTH=eps > 0, ACC=acc_dtype(x.dtype), INPUT_PRECISION=input_precision(cls))
    return eps, cls, row_class(cls, consts["PROB"]), consts


def row_class(cls: str, prob: bool) -> str:  # the row kernels' config class of a dtype class (ROW_CONFIGS)
    return "half_prob" if prob and cls == "half" else cls


def linear_cross_entropy_fwd(x: torch.Tensor, w: torch.Tensor, b, target: torch.Tensor, weight,
                             ignore_index: int, label_smoothing: float, reduction: int):
    n, h = x.shape
    c, s_len = w.shape[0], w.shape[1]
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not target.is_floating_point():
        check_class_targets(target, c, ignore_index)
    eps, _, row_cls, consts = _common_args(x, w, b, target, weight, label_smoothing)
    loss = torch.empty((n, s_len), dtype=cd, device=x.device)
    stats = torch.empty((3, n, s_len), dtype=cd, device=x.device)
    for s in range(s_len if n else 0):
        ws = w[:, s, :]
        ts, stride_tn, stride_tv = _target_strides(target, s)
        bs = b[:, s] if b is not None else ws
        ls, ss = loss[:, s], stats[:, :, s]
        _fwd(lambda meta: (cdiv(n, meta["BLOCK_N"]),), x, ws, bs, ts, weight if weight is not None else ws, ls, ss,
             n, c, h,
             x.stride(0), x.stride(1), ws.stride(0), ws.stride(1), bs.stride(0), stride_tn, stride_tv, ls.stride(0),
             ss.stride(0), ss.stride(1), ignore_index, eps, cls=row_cls, **consts)
    d_fwd, d_bwd = class_loss_denominator(x, target, weight, ignore_index, reduction, cd)
    return [reduce_rows(loss, d_fwd, reduction), d_bwd, stats]


def _gemm_launch(a, b, c_out, rs, cls, *, product: bool, accumulate: bool, row_sum: bool, precision):
    (m, k), ncols = a.shape, c_out.shape[1] if product else 1
    if not (product or row_sum) or m == 0 or ncols == 0:
        return
    _gemm(lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(ncols, meta["BLOCK_N"]),), a, b, c_out, rs, m, ncols, k,
          a.stride(0), a.stride(1), b.stride(0), b.stride(1), c_out.stride(0), c_out.stride(1), rs.stride(0),
          cls=cls + "_acc" if accumulate else cls, PRODUCT=product, ACCUMULATE=accumulate, ROW_SUM=row_sum,
          ACC=acc_dtype(a.dtype), INPUT_PRECISION=precision)


def linear_cross_entropy_bwd(x: torch.Tensor, w: torch.Tensor, b, target: torch.Tensor, weight,
                             stats: torch.Tensor, denom: torch.Tensor, g: torch.Tensor, ignore_index: int,
                             label_smoothing: float, need_x: bool, need_w: bool, need_b: bool, need_weight: bool,
                             need_target: bool):
    n, h = x.shape
    c, s_len = w.shape[0], w.shape[1]
    cd = stats.dtype
    eps, cls, row_cls, consts = _common_args(x, w, b, target, weight, label_smoothing)
    dx = torch.zeros(x.shape, dtype=cd, device=x.device) if need_x else x.new_empty((0,))  # the accumulator
    dw = torch.empty(w.shape, dtype=w.dtype, device=x.device) if need_w else x.new_empty((0,))
    db = torch.empty((c, s_len), dtype=x.dtype, device=x.device) if need_b else x.new_empty((0,))
    dcw = torch.zeros((c,), dtype=cd, device=x.device) if need_weight else x.new_empty((0,))
    dq = torch.empty(target.shape, dtype=target.dtype, device=x.device) if need_target else x.new_empty((0,))
    width = chunk_width(c, h)
    dz = torch.empty((n, width), dtype=x.dtype, device=x.device)
    g = g.to(cd)
    for s in range(s_len):
        ws = w[:, s, :]
        ts, stride_tn, stride_tv = _target_strides(target, s)
        bs = b[:, s] if b is not None else ws
        ss = stats[:, :, s]
        gs = g[:, s] if g.dim() else g
        dqs = dq[:, :, s] if need_target else dz
        for v0 in range(0, c, width):
            wd = min(width, c - v0)
            dzc = dz[:, :wd]
            if n:
                grid = lambda meta: (cdiv(n, meta["BLOCK_N"]) * cdiv(wd, meta["BLOCK_V"]),)  # noqa: E731
                _dlogits(grid, x, ws, bs, ts, weight if weight is not None else ws, ss, gs, denom,
                         dzc, dqs, dcw if need_weight else ss, n, c, h, v0, wd,
                         x.stride(0), x.stride(1), ws.stride(0), ws.stride(1), bs.stride(0), stride_tn, stride_tv,
                         ss.stride(0), ss.stride(1), gs.stride(0) if gs.dim() else 0,
                         dzc.stride(0), dzc.stride(1), dqs.stride(0), dqs.stride(1),
                         ignore_index, eps, NEED_DQ=need_target, NEED_DCW=need_weight, cls=row_cls, **consts)
            precision = consts["INPUT_PRECISION"]
            if need_x:  # dX += dZ W_chunk
                _gemm_launch(dzc, ws[v0:v0 + wd], dx, dx[0] if n else dx.view(-1), cls, product=True,
                             accumulate=True, row_sum=False, precision=precision)
            if need_w:  # dW_chunk = dZᵀ X
                _gemm_launch(dzc.t(), x, dw[v0:v0 + wd, s, :], dz.view(-1), cls, product=h > 0, accumulate=False,
                             row_sum=False, precision=precision)
            if need_b:  # db_chunk = Σ_n dZ (its own launch: fused into the dW tiles it makes them spill)
                _gemm_launch(dzc.t(), x, dzc.t(), db[v0:v0 + wd, s], cls, product=False, accumulate=False,
                             row_sum=True, precision=precision)
    return [dx.to(x.dtype), dw, db, dcw.to(weight.dtype) if need_weight else dcw, dq]


# ----------------------------------------------------------------- ahead-of-time compiles
def aot_configs():
    """The sm_90 compiles of the launches above, for S = 1 (unit strides as a launch specializes them), every dtype
    class: the plainest and the fullest variant of each kernel (index targets; probability targets with all on)."""
    row_variants = [(False, False, False, False), (False, True, True, True), (True, True, True, True)]
    for cls, types in CLASS_TYPES.items():
        for t in types:
            acc = "fp64" if t == "fp64" else "fp32"
            consts = {"ACC": tl.float64 if t == "fp64" else tl.float32, "INPUT_PRECISION": input_precision(cls)}
            for prob, has_bias, has_weight, smooth in row_variants:
                flags = dict(PROB=prob, HAS_BIAS=has_bias, HAS_WEIGHT=has_weight, SMOOTH=smooth,
                             stride_xk=1, stride_wk=1, stride_b=1, stride_sn=1, **consts)
                flags.update(stride_tv=1) if prob else flags.update(stride_tn=1)
                outs = dict.fromkeys(("loss_ptr", "stats_ptr", "g_ptr", "d_ptr", "dcw_ptr"), acc)
                kw = dict(cls=row_class(cls, prob), pointers={"t_ptr": t if prob else "i64",
                          **outs}, ints={"ignore_index": "i32", "eps": "fp32"})  # ignore_index -100: i32
                yield from _fwd.aot(t, {**flags, "stride_ln": 1}, **kw)
                bwd = {"NEED_DQ": prob, "NEED_DCW": prob, "stride_dzv": 1, "stride_dqv": 1}
                yield from _dlogits.aot(t, {**flags, **bwd}, **kw)
            gemm = {**consts, "stride_bn": 1, "stride_cn": 1, "stride_rs": 1}
            # dX += dZ W_chunk (fp32/fp64 accumulator); dW_chunk = dZᵀ X; db_chunk = Σ_n dZ
            yield from _gemm.aot(t, {**gemm, "PRODUCT": True, "ACCUMULATE": True, "ROW_SUM": False, "stride_ak": 1},
                                 cls=cls + "_acc", pointers={"c_ptr": acc, "rs_ptr": acc})
            for product in (True, False):
                yield from _gemm.aot(t, {**gemm, "PRODUCT": product, "ACCUMULATE": False, "ROW_SUM": not product,
                                         "stride_am": 1}, cls=cls)
