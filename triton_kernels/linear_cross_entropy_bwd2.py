r"""Triton kernels for the second derivative of the fused linear + cross-entropy (formulas:
``scratchops/linear_cross_entropy_bwd2.py``).

The first backward is dX = dZ W, dW = dZᵀ X, db = Σ_n dZ with dZ = (P Σ_a - A) g/D. Given the gradients
U_x, U_W, U_b of those three, ``_lce_bwd2_kernel`` works on (row block, class tile) tiles, recomputing the
logits Z = X Wᵀ + b and the cotangent of dZ, G = U_x Wᵀ + X U_Wᵀ + U_b (both made by the K loop, never stored):

* ``ROWS``: over every class, the row sums ρ = Σ_c p G and γ = Σ_c (p Σ_a - a) G (atomic adds of each tile's
  part; ignored rows add 0): the (2, N) row statistics;
* otherwise, for one chunk of classes, the tiles G_Z = (g/D) Σ_a P ⊙ (G - ρ) and dZ (as the first backward),
  and for probability targets d q = (1-ε) w_c (g/D)(ρ - G) and d w_c += Σ_r q'_rc (g/D)(ρ - G).

The GEMMs are the first backward's (``_lce_gemm_kernel``): gX += G_Z W_c + dZ U_W,c, gW_c = G_Zᵀ X + dZᵀ U_x,
gb_c = Σ_n G_Z. Peak memory, next to the gradients (the inputs' sizes), with e = x's element size and a = 4 (8 for
fp64): 2·N·V_c·e (the G_Z and dZ chunks) + 3·N·S·a (ρ, γ, κ) + N·H·a (the gX accumulator) + V_c·H·4 (one gW chunk's
fp32 accumulator, 16-bit only); no (N, C) tensor.
"""
import torch
import triton
import triton.language as tl

from ._gemm import CLASS_TYPES, input_precision
from ._launch import Kernel, cdiv, tiles
from .linear_cross_entropy import (ROW_CONFIGS, ROW_FIELDS, ROW_INTERPRETER, _chunk_tile, _class_mass, _common_args,
                                   _gemm_launch, _logits_tile, _row_target, _target_strides, chunk_width, row_class)


@triton.jit
def _lce_bwd2_kernel(
        # pointers: x, W, b, target, class weight, stats, g, D, U_x, U_W, U_b, U_q, U_w; ρ/γ/κ (3, N); G_Z, dZ
        # chunks; d q, d w
        x_ptr, w_ptr, b_ptr, t_ptr, cw_ptr, stats_ptr, g_ptr, d_ptr, ux_ptr, uw_ptr, ub_ptr, uq_ptr, ucw_ptr, rho_ptr,
        gz_ptr, dz_ptr, dq_ptr, dcw_ptr,
        # sizes: the chunk is classes [v_start, v_start + width)
        N, C, H, v_start, width,
        # strides
        stride_xn, stride_xk, stride_wv, stride_wk, stride_b, stride_tn, stride_tv, stride_sq, stride_sn, stride_gn,
        stride_uxn, stride_uxk, stride_uwv, stride_uwk, stride_ub, stride_uqn, stride_uqv, stride_rq, stride_rn,
        stride_zn, stride_zv, stride_dqn, stride_dqv,
        # scalars
        ignore_index, eps,
        # constexprs
        ROWS: tl.constexpr, PROB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
        SMOOTH: tl.constexpr, HAS_UX: tl.constexpr, HAS_UW: tl.constexpr, HAS_UB: tl.constexpr,
        HAS_UQ: tl.constexpr, HAS_UCW: tl.constexpr,
        NEED_DQ: tl.constexpr, NEED_DCW: tl.constexpr, ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    if not ROWS:  # 1/D first: an fp64 division is a subroutine call, and little is live here
        inv_d = 1.0 / tl.load(d_ptr).to(ACC)
    rows, n_mask, local, v_mask, cols, mask, x_rows, stats_rows, z = _chunk_tile(
        x_ptr, w_ptr, b_ptr, stats_ptr, N, H, v_start, width, stride_xn, stride_xk, stride_wv, stride_wk, stride_b,
        stride_sn, HAS_BIAS, ACC, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K, GROUP)
    logp = (z - tl.load(stats_rows)[:, None]) - tl.load(stats_rows + stride_sq)[:, None]
    p = tl.exp(logp)
    sum_a = tl.load(stats_rows + 2 * stride_sq)
    cot = tl.zeros((BLOCK_N, BLOCK_V), ACC)  # G, the cotangent of dZ
    if HAS_UX:
        cot += _logits_tile(ux_ptr + rows.to(tl.int64)[:, None] * stride_uxn, w_ptr, b_ptr, cols, H, stride_uxk,
                            stride_wv, stride_wk, stride_b, False, ACC, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    if HAS_UW:
        cot += _logits_tile(x_rows, uw_ptr, b_ptr, cols, H, stride_xk, stride_uwv, stride_uwk, stride_b,
                            False, ACC, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    if HAS_UB:
        cot += tl.load(ub_ptr + cols * stride_ub).to(ACC)[None, :]
    if PROB:
        active = n_mask
        a = tl.zeros((BLOCK_N, BLOCK_V), ACC)
    else:
        t, active, wt = _row_target(t_ptr, cw_ptr, rows, n_mask, stride_tn, ignore_index, eps, HAS_WEIGHT, ACC)
        a = tl.where(cols[None, :] == t[:, None], wt[:, None], 0.0)
    if PROB or SMOOTH:
        a += _class_mass(t_ptr, cw_ptr, rows, cols, mask, active, C, stride_tn, stride_tv, eps,
                         PROB, HAS_WEIGHT, SMOOTH, ACC)
    live = mask & active[:, None]
    kk = tl.zeros((BLOCK_N, BLOCK_V), ACC)  # K, the cotangent of -(g/D) log P from d q and d w (probabilities)
    if HAS_UQ:
        uq = tl.load(uq_ptr + rows.to(tl.int64)[:, None] * stride_uqn + cols.to(tl.int64)[None, :] * stride_uqv,
                     mask=mask, other=0.0).to(ACC) * (1.0 - eps)
        if HAS_WEIGHT:
            kk += uq * tl.load(cw_ptr + cols).to(ACC)[None, :]
        else:
            kk += uq
    if HAS_UCW:
        kk += _class_mass(t_ptr, cw_ptr, rows, cols, mask, active, C, stride_tn, stride_tv, eps, PROB, False,
                          SMOOTH, ACC) * tl.load(ucw_ptr + cols).to(ACC)[None, :]
    rho_rows = rho_ptr + rows.to(tl.int64) * stride_rn
    if ROWS:
        gamma = (p * sum_a[:, None] - a) * cot
        if HAS_UQ or HAS_UCW:
            gamma -= logp * kk
            tl.atomic_add(rho_rows + 2 * stride_rq, tl.sum(tl.where(live, kk, 0.0), axis=1), mask=n_mask)
        tl.atomic_add(rho_rows, tl.sum(tl.where(live, p * cot, 0.0), axis=1), mask=n_mask)
        tl.atomic_add(rho_rows + stride_rq, tl.sum(tl.where(live, gamma, 0.0), axis=1), mask=n_mask)
    else:
        rho = tl.load(rho_rows)
        scale = tl.load(g_ptr + rows.to(tl.int64) * stride_gn).to(ACC) * inv_d  # g_r / D
        gz = (scale * sum_a)[:, None] * p * (cot - rho[:, None])
        if HAS_UQ or HAS_UCW:
            gz -= scale[:, None] * (kk - p * tl.load(rho_rows + 2 * stride_rq)[:, None])
        gz = tl.where(live, gz, 0.0)
        dz = tl.where(live, (p * sum_a[:, None] - a) * scale[:, None], 0.0)
        offsets = rows.to(tl.int64)[:, None] * stride_zn + local[None, :] * stride_zv
        tl.store(gz_ptr + offsets, gz.to(gz_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        ga = tl.where(live, scale[:, None] * (rho[:, None] - cot), 0.0)  # ∂/∂a_rc
        if NEED_DQ:  # a_c = w_c ((1-ε) q_c + ε/C); K's q'_c U_w,c
            dq = (1.0 - eps) * ga
            if HAS_WEIGHT:
                dq = dq * tl.load(cw_ptr + cols).to(ACC)[None, :]
            if HAS_UCW:
                dq -= tl.where(live, (1.0 - eps) * scale[:, None] * logp * tl.load(ucw_ptr + cols).to(ACC)[None, :],
                               0.0)
            tl.store(dq_ptr + rows.to(tl.int64)[:, None] * stride_dqn + cols.to(tl.int64)[None, :] * stride_dqv,
                     dq.to(dq_ptr.dtype.element_ty), mask=mask)
        if NEED_DCW:
            q = _class_mass(t_ptr, cw_ptr, rows, cols, mask, active, C, stride_tn, stride_tv, eps, PROB, False,
                            SMOOTH, ACC)
            part = q * ga
            if HAS_UQ:  # K's (1-ε) w_c U_q,c
                part -= tl.where(live, scale[:, None] * logp * uq, 0.0)
            tl.atomic_add(dcw_ptr + cols, tl.sum(part, axis=0), mask=v_mask)


# The forward's row tiles, but half-size 16-bit ones: with the tiles Z, G and K live at once, 128 rows spill.
CONFIGS = {**ROW_CONFIGS, "half": tiles(ROW_FIELDS, (64, 64, 32, 8, 8, 3))}
CONFIGS["half_prob"] = tiles(ROW_FIELDS, (64, 32, 32, 8, 8, 3))  # 16-bit probability targets (64 classes: spilled)
_bwd2 = Kernel(_lce_bwd2_kernel, CONFIGS, interpreter=ROW_INTERPRETER)


def _launch(rows_pass, n, c, h, v0, wd, tensors, strides, ignore_index, eps, cls, consts):
    grid = lambda meta: (cdiv(n, meta["BLOCK_N"]) * cdiv(wd, meta["BLOCK_V"]),)  # noqa: E731
    _bwd2(grid, *tensors, n, c, h, v0, wd, *strides, ignore_index, eps, ROWS=rows_pass, cls=cls, **consts)


def linear_cross_entropy_bwd2(x: torch.Tensor, w: torch.Tensor, b, target: torch.Tensor, weight,
                              stats: torch.Tensor, denom: torch.Tensor, g: torch.Tensor, ux, uw, ub, uq, ucw,
                              ignore_index: int, label_smoothing: float, need_x: bool, need_w: bool, need_b: bool,
                              need_g: bool, need_weight: bool, need_target: bool):
    n, h = x.shape
    c, s_len = w.shape[0], w.shape[1]
    cd = stats.dtype
    eps, cls, row_cls, consts = _common_args(x, w, b, target, weight, label_smoothing)
    consts.update(HAS_UX=ux is not None, HAS_UW=uw is not None, HAS_UB=ub is not None, HAS_UQ=uq is not None,
                  HAS_UCW=ucw is not None)
    gx = torch.zeros(x.shape, dtype=cd, device=x.device) if need_x else x.new_empty((0,))
    gw = torch.empty(w.shape, dtype=w.dtype, device=x.device) if need_w else x.new_empty((0,))
    gb = torch.empty((c, s_len), dtype=x.dtype, device=x.device) if need_b else x.new_empty((0,))
    gcw = torch.zeros((c,), dtype=cd, device=x.device) if need_weight else x.new_empty((0,))
    gq = torch.empty(target.shape, dtype=target.dtype, device=x.device) if need_target else x.new_empty((0,))
    rho = torch.zeros((3, n, s_len), dtype=cd, device=x.device)  # ρ, γ, κ per row
    width = chunk_width(c, h)
    gw_acc = torch.empty((width, h), dtype=cd, device=x.device) if need_w and w.dtype != cd else None  # 16-bit
    gz_chunk = torch.empty((n, width), dtype=x.dtype, device=x.device)
    dz_chunk = torch.empty((n, width), dtype=x.dtype, device=x.device)
    g = g.to(cd)
    precision = consts["INPUT_PRECISION"]
    for s in range(s_len if n else 0):
        ws = w[:, s, :]
        ts, stride_tn, stride_tv = _target_strides(target, s)
        bs = b[:, s] if b is not None else ws
        uws = uw[:, s, :] if uw is not None else ws
        ubs = ub[:, s] if ub is not None else ws[:, 0]
        uxs = ux if ux is not None else x
        uqs = uq[:, :, s] if uq is not None else rho[:, :, s]
        ss, rs = stats[:, :, s], rho[:, :, s]
        gs = g[:, s] if g.dim() else g
        dqs = gq[:, :, s] if need_target else gz_chunk
        tiles = need_x or need_w or need_b or need_weight or need_target  # else the statistics (γ) alone
        for rows_pass, v0, wd in [(True, 0, c)] + [(False, v, min(width, c - v)) for v in range(0, c, width)
                                                   if tiles]:
            gzc, dzc = gz_chunk[:, :wd], dz_chunk[:, :wd]
            tensors = (x, ws, bs, ts, weight if weight is not None else ws, ss, gs, denom, uxs, uws, ubs, uqs,
                       ucw if ucw is not None else ubs, rs, gzc, dzc, dqs, gcw if need_weight else ss)
            strides = (x.stride(0), x.stride(1), ws.stride(0), ws.stride(1), bs.stride(0), stride_tn, stride_tv,
                       ss.stride(0), ss.stride(1), gs.stride(0) if gs.dim() else 0, uxs.stride(0), uxs.stride(1),
                       uws.stride(0), uws.stride(1), ubs.stride(0), uqs.stride(0), uqs.stride(1), rs.stride(0),
                       rs.stride(1), gzc.stride(0),
                       gzc.stride(1), dqs.stride(0), dqs.stride(1))
            flags = dict(consts, NEED_DQ=need_target and not rows_pass, NEED_DCW=need_weight and not rows_pass)
            _launch(rows_pass, n, c, h, v0, wd, tensors, strides, ignore_index, eps, row_cls, flags)
            if rows_pass or not (need_x or need_w or need_b):
                continue
            if need_x:  # gX += G_Z W_c (+ dZ U_W,c)
                _gemm_launch(gzc, ws[v0:v0 + wd], gx, gx[0], cls, product=True, accumulate=True, row_sum=False,
                             precision=precision)
                if uw is not None:
                    _gemm_launch(dzc, uws[v0:v0 + wd], gx, gx[0], cls, product=True, accumulate=True,
                                 row_sum=False, precision=precision)
            if need_w:  # gW_c = G_Zᵀ X (+ dZᵀ U_x)
                gwc = gw_acc[:wd] if gw_acc is not None else gw[v0:v0 + wd, s, :]
                _gemm_launch(gzc.t(), x, gwc, gwc[0], cls, product=h > 0, accumulate=False, row_sum=False,
                             precision=precision)
                if ux is not None:
                    _gemm_launch(dzc.t(), ux, gwc, gwc[0], cls, product=h > 0, accumulate=True, row_sum=False,
                                 precision=precision)
                if gw_acc is not None:  # one chunk accumulates in fp32, then is rounded once
                    gw[v0:v0 + wd, s, :].copy_(gwc)
            if need_b:  # gb_c = Σ_n G_Z
                _gemm_launch(gzc.t(), x, gzc.t(), gb[v0:v0 + wd, s], cls, product=False, accumulate=False,
                             row_sum=True, precision=precision)
    for grad, need in ((gw, need_w), (gb, need_b)):
        if need and not n:
            grad.zero_()
    gg = (rho[1] / denom).to(g.dtype) if need_g else x.new_empty((0,))  # ∂/∂g_r = γ_r / D
    gg = gg.sum() if need_g and not g.dim() else gg
    return [gx.to(x.dtype), gw, gb, gg, gcw.to(weight.dtype) if need_weight else gcw, gq]


def aot_configs():
    """The sm_90 compiles of the launches above, for S = 1, every dtype class: the statistics pass and the tile pass of
    index targets with every cotangent, and of probability targets with all on."""
    for cls, types in CLASS_TYPES.items():
        for t in types:
            acc = "fp64" if t == "fp64" else "fp32"
            consts = {"ACC": tl.float64 if t == "fp64" else tl.float32, "INPUT_PRECISION": input_precision(cls)}
            for prob in (False, True):
                for rows_pass in (True, False):
                    flags = dict(ROWS=rows_pass, PROB=prob, HAS_BIAS=True, HAS_WEIGHT=True, SMOOTH=True, HAS_UX=True,
                                 HAS_UW=True, HAS_UB=True, HAS_UQ=prob, HAS_UCW=prob, NEED_DQ=prob and not rows_pass,
                                 NEED_DCW=prob and not rows_pass, stride_xk=1, stride_wk=1, stride_b=1, stride_sn=1,
                                 stride_uxk=1, stride_uwk=1, stride_ub=1, stride_uqv=1, stride_rn=1, stride_zv=1,
                                 stride_dqv=1,
                                 **consts)
                    flags.update(stride_tv=1) if prob else flags.update(stride_tn=1)
                    pointers = {"t_ptr": t if prob else "i64",
                                **dict.fromkeys(("stats_ptr", "g_ptr", "d_ptr", "rho_ptr", "dcw_ptr"), acc)}
                    yield from _bwd2.aot(t, flags, cls=row_class(cls, prob),
                                         ints={"ignore_index": "i32", "eps": "fp32"}, pointers=pointers)
