"""Triton kernels for the conv2d backward: input gradient (dgrad), weight gradient (wgrad), bias gradient.

The formulas and the index algebra are in ``conv2d`` (its docstring, ``_in_coord`` and
``_out_coord``), which this module imports (never the other way round).

wgrad may split its N·P·Q reduction over programs to fill the GPU (and the batch is split
so that position indices stay int32): then each split writes a partial plane in the compute
dtype and one more kernel sums the planes into dw, in dw's dtype and layout. Otherwise wgrad
writes dw directly. No torch kernel runs between the launches.
"""
import torch
import triton
import triton.language as tl

from ._gemm import mma
from ._launch import FLOAT_TYPES, Kernel, acc_dtype, cdiv, config, flat_offsets
from .conv2d import (AUTOTUNE_KEY, DGRAD_TILES, INTERPRETER, INTERPRETER_WGRAD, LAYOUTS, WGRAD_IEEE_TILES, WGRAD_TILES,
                     _in_coord, _out_coord, _position_tile, _split3, _tap_step, batch_chunks, gemm_aot, gemm_configs,
                     gemm_grid, geometry, launch_class, out_strides, plan, scalar_args, spec_key, strides, unit_strides)

# wgrad splits its N·P·Q reduction over programs when the output tiles alone cannot fill the GPU.
TARGET_PROGRAMS = 264  # about two waves of 132 SMs (H100)
MIN_SPLIT_CHUNK = 4096  # reduction positions per split at least
SPLIT_ALIGN = 64  # chunks are whole multiples of every BLOCK_K


# ----------------------------------------------------------------- dgrad
@triton.jit
def _conv2d_bwd_input_kernel(
        # pointers
        dy_ptr, w_ptr, dx_ptr,
        # sizes
        N, C_G, H, W, K_G, P, Q, R, S,
        # strides
        stride_dyn, stride_dyk, stride_dyp, stride_dyq, stride_wk, stride_wc, stride_wr, stride_ws,
        stride_dxn, stride_dxc, stride_dxh, stride_dxw,
        # geometry
        step_h, step_w, pad_h, pad_w, dil_h, dil_w,
        # constexprs
        ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # dx[n,c,h,w] = Σ_{r,s,k} dy[n,k,p,q] · w[k,c,r,s] over the taps with h = _in_coord(p, r), w = _in_coord(q, s)
    # for an integer output position (p, q) = _out_coord(h, r), _out_coord(w, s) (the transposed convolution):
    # rows m = (n, h, w) input positions, columns = input channels of group g; the reduction walks the taps
    # (r, s) and blocks of the group's output channels. A row whose h + pad − r·dil is not a multiple of
    # the step (or lands outside the output) gets nothing from that tap: its dy row is masked out and its
    # accumulator row kept as it was.
    g, n, h, w, m_ok, offs_n, n_ok = _position_tile(N, H, W, C_G, BLOCK_M, BLOCK_N)
    c_in = (g * C_G + offs_n).to(tl.int64)
    dy_rows = dy_ptr + n.to(tl.int64) * stride_dyn + (g * K_G).to(tl.int64) * stride_dyk
    w_cols = w_ptr + (g * K_G).to(tl.int64) * stride_wk + offs_n.to(tl.int64) * stride_wc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for it in range(0, R * S * tl.cdiv(K_G, BLOCK_K)):
        r, s, k = _tap_step(it, S, K_G, BLOCK_K)
        p, p_ok = _out_coord(h, r, step_h, pad_h, dil_h, P)
        q, q_ok = _out_coord(w, s, step_w, pad_w, dil_w, Q)
        row_ok = m_ok & p_ok & q_ok
        k_ok = k < K_G
        a = tl.load((dy_rows + p.to(tl.int64) * stride_dyp + q.to(tl.int64) * stride_dyq)[:, None]
                    + (k.to(tl.int64) * stride_dyk)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load((w_cols + r * stride_wr + s * stride_ws)[None, :] + (k.to(tl.int64) * stride_wk)[:, None],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        # A row this tap does not reach adds nothing, not 0·w (NaN for an infinite weight, unlike torch).
        acc = tl.where(row_ok[:, None], mma(acc, a, b, INPUT_PRECISION), acc)
    dx = (dx_ptr + (n.to(tl.int64) * stride_dxn + h.to(tl.int64) * stride_dxh + w.to(tl.int64) * stride_dxw)[:, None]
          + (c_in * stride_dxc)[None, :])
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------- wgrad
@triton.jit
def _conv2d_bwd_weight_kernel(
        # pointers
        dy_ptr, x_ptr, dw_ptr,
        # sizes
        NPQ, C_G, H, W, K_G, P, Q, R, S, SPLIT, CHUNK, PLANE0,
        # strides
        stride_dyn, stride_dyk, stride_dyp, stride_dyq, stride_xn, stride_xc, stride_xh, stride_xw,
        stride_dwz, stride_dwk, stride_dwc, stride_dwr, stride_dws,
        # geometry
        step_h, step_w, pad_h, pad_w, dil_h, dil_w,
        # constexprs
        ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # dw[k,c,r,s] = Σ_{n,p,q} dy[n,k,p,q] · x[n,c,_in_coord(p,r),_in_coord(q,s)]:
    # for one tap (r, s) per program, rows = output channels, columns = input channels of group g,
    # reduction j = (n, p, q). Program z = ((g·R + r)·S + s)·SPLIT + split sums the slice
    # [split·CHUNK, (split+1)·CHUNK) of the reduction into plane PLANE0 + split (dw itself when there is one).
    z = tl.program_id(2)
    split = z % SPLIT
    rs = (z // SPLIT) % (R * S)
    g = z // (SPLIT * R * S)
    r = rs // S
    s = rs % S
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < K_G
    n_ok = offs_n < C_G
    k_out = (g * K_G + offs_m).to(tl.int64)
    c_in = (g * C_G + offs_n).to(tl.int64)
    dy_rows = dy_ptr + k_out * stride_dyk
    x_cols = x_ptr + c_in * stride_xc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    start = split * CHUNK  # < 2^31: the launcher splits the batch
    end = tl.minimum(start + CHUNK, NPQ)
    for j0 in range(start, end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        n, p, q = _split3(j, P, Q)
        ih = _in_coord(p, r, step_h, pad_h, dil_h)
        iw = _in_coord(q, s, step_w, pad_w, dil_w)
        j_ok = j < end
        x_ok = j_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        # a position where the tap reads padding adds nothing: its dy is masked too (not inf·0 = NaN)
        dy_cols = n.to(tl.int64) * stride_dyn + p.to(tl.int64) * stride_dyp + q.to(tl.int64) * stride_dyq
        a = tl.load(dy_rows[:, None] + dy_cols[None, :], mask=m_ok[:, None] & x_ok[None, :], other=0.0)
        x_rows = n.to(tl.int64) * stride_xn + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
        b = tl.load(x_cols[None, :] + x_rows[:, None], mask=x_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(acc, a, b, INPUT_PRECISION)
    dw = (dw_ptr + (PLANE0 + split).to(tl.int64) * stride_dwz + r * stride_dwr + s * stride_dws
          + (k_out * stride_dwk)[:, None] + (offs_n.to(tl.int64) * stride_dwc)[None, :])
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv2d_sum_planes_kernel(
        # pointers
        partial_ptr, dw_ptr,
        # sizes
        n, PLANES, C_G, R, S,
        # strides (partial is contiguous: planes of n elements)
        stride_dwk, stride_dwc, stride_dwr, stride_dws,
        # constexprs
        ACC: tl.constexpr, BLOCK: tl.constexpr):
    # dw[k,c,r,s] = Σ_z partial[z,k,c,r,s], element e = ((k·C_G + c)·R + r)·S + s of a plane.
    offs, mask = flat_offsets(n, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for z in range(0, PLANES):
        acc += tl.load(partial_ptr + z * n + offs, mask=mask, other=0.0).to(ACC)
    kc, r, s = _split3(offs, R, S)
    dw = dw_ptr + (kc // C_G) * stride_dwk + (kc % C_G) * stride_dwc + r * stride_dwr + s * stride_dws
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------- bias grad
@triton.jit
def _conv2d_bwd_bias_kernel(
        # pointers
        dy_ptr, db_ptr,
        # sizes
        NPQ, P, Q,
        # strides
        stride_dyn, stride_dyk, stride_dyp, stride_dyq,
        # constexprs
        ACC: tl.constexpr, BLOCK: tl.constexpr):
    # db[k] = Σ_{n,p,q} dy[n,k,p,q]; program k walks the N·P·Q positions of its channel.
    k = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for j0 in range(0, NPQ, BLOCK):
        j = (j0 + tl.arange(0, BLOCK)).to(tl.int64)
        n, p, q = _split3(j, P, Q)  # int64 here: one pass over dy, no register pressure
        acc += tl.load(dy_ptr + k * stride_dyk + n * stride_dyn + p * stride_dyp + q * stride_dyq,
                       mask=j < NPQ, other=0.0).to(ACC)
    tl.store(db_ptr + k, tl.sum(acc, axis=0).to(db_ptr.dtype.element_ty))


WGRAD_KEY = ["NPQ", "C_G", "H", "W", "K_G", "P", "Q", "R", "S", "SPLIT", "step_h", "step_w", "dil_h", "dil_w"]
_dgrad = Kernel(_conv2d_bwd_input_kernel, gemm_configs(DGRAD_TILES), interpreter=INTERPRETER, key=AUTOTUNE_KEY)
_wgrad = Kernel(_conv2d_bwd_weight_kernel, gemm_configs(WGRAD_TILES, WGRAD_IEEE_TILES), interpreter=INTERPRETER_WGRAD,
                key=WGRAD_KEY)
# 8 warps (4 elements a thread): with 4, the 16-bit channels_last compile spills 8 bytes (triton 3.6 and 3.7.1)
_sum_planes = Kernel(_conv2d_sum_planes_kernel, [config(8, 3, BLOCK=1024)])
_bias = Kernel(_conv2d_bwd_bias_kernel, [config(4, 3, BLOCK=1024)])


# ----------------------------------------------------------------- launchers
def _dgrad_plan(dy, w, input_size, stride, padding, dilation, groups, channels_last):
    """dx's shape and strides, the dtype class, and per batch chunk (slice, grid, arguments after the tensors)."""
    N, C, H, W = input_size
    K, C_G, R, S = w.shape
    P, Q = dy.shape[2], dy.shape[3]
    shape = (N, C, H, W)
    dx_strides = out_strides(shape, channels_last)
    cls, consts = launch_class(dy.dtype)
    launches = tuple(
        (chunk, gemm_grid(_dgrad, cls, n * H * W, C_G, groups),
         scalar_args(_dgrad, 3, N=n, C_G=C_G, H=H, W=W, K_G=K // groups, P=P, Q=Q, R=R, S=S,
                     **strides("dy", dy.stride(), "nkpq"), **strides("w", w.stride(), "kcrs"),
                     **strides("dx", dx_strides, "nchw"), **geometry(stride, padding, dilation), **consts))
        for chunk, n in batch_chunks(N, H * W)) if N * C * H * W else ()
    return shape, dx_strides, cls, launches


def conv2d_bwd_input(dy, w, input_size, stride, padding, dilation, groups, channels_last):
    shape, dx_strides, cls, launches = plan(
        (_dgrad_plan, dy.shape, dy.stride(), w.shape, w.stride(), *input_size,
         *spec_key(dy.dtype, stride, padding, dilation, groups, channels_last)),
        _dgrad_plan, dy, w, input_size, stride, padding, dilation, groups, channels_last)
    dx = dy.new_empty_strided(shape, dx_strides)  # directly in its final layout
    for chunk, grid, args in launches:
        _dgrad(grid, dy if chunk is None else dy[chunk], w, dx if chunk is None else dx[chunk], *args, cls=cls)
    return dx


def _split_k(tiles: int, npq: int, on_cuda: bool) -> int:
    if not on_cuda:
        return 1
    return max(1, min(cdiv(TARGET_PROGRAMS, tiles), npq // MIN_SPLIT_CHUNK))


def _wgrad_plan(dy, x, weight_size, stride, padding, dilation, groups, channels_last):
    """dw's shape and strides, the dtype class, the partial planes (None: wgrad writes dw itself; else their
    shape and dtype), per batch chunk (slice, grid, arguments after the tensors), and the plane sum's (grid,
    arguments), or ZERO_FILL for an empty reduction."""
    N, _, H, W = x.shape
    K, C_G, R, S = weight_size
    P, Q = dy.shape[2], dy.shape[3]
    K_G = K // groups
    shape = (K, C_G, R, S)
    dw_strides = out_strides(shape, channels_last)
    cls, consts = launch_class(x.dtype)
    if not K * C_G * R * S:
        return shape, dw_strides, cls, None, (), None
    if not N * P * Q:  # an empty reduction: zeros (one fill, no launch)
        return shape, dw_strides, cls, None, (), ZERO_FILL
    tile_m, tile_n = WGRAD_TILES[0][0], WGRAD_TILES[0][1]
    tiles = groups * R * S * cdiv(K_G, tile_m) * cdiv(C_G, tile_n)
    batches = batch_chunks(N, P * Q)
    splits = [_split_k(tiles, n * P * Q, x.is_cuda) for _, n in batches]
    planes = sum(splits)
    # One plane: dw itself. Several: partial sums in the compute dtype, one plane per split, then summed.
    numel = K * C_G * R * S
    partial = None if planes == 1 else ((planes, *shape), torch.float64 if x.dtype == torch.float64 else
                                        torch.float32)
    out_strides5 = (numel, *dw_strides) if partial is None else (numel, C_G * R * S, R * S, S, 1)
    launches, plane0 = [], 0
    for (chunk, n), split in zip(batches, splits):
        npq = n * P * Q
        chunk_positions = cdiv(cdiv(npq, split), SPLIT_ALIGN) * SPLIT_ALIGN
        launches.append((chunk, gemm_grid(_wgrad, cls, K_G, C_G, groups * R * S * split), scalar_args(
            _wgrad, 3, NPQ=npq, C_G=C_G, H=H, W=W, K_G=K_G, P=P, Q=Q, R=R, S=S, SPLIT=split, CHUNK=chunk_positions,
            PLANE0=plane0, **strides("dy", dy.stride(), "nkpq"), **strides("x", x.stride(), "nchw"),
            **strides("dw", out_strides5, "zkcrs"), **geometry(stride, padding, dilation), **consts)))
        plane0 += split
    finish = None if partial is None else (
        lambda meta: (cdiv(numel, meta["BLOCK"]),),
        scalar_args(_sum_planes, 2, n=numel, PLANES=planes, C_G=C_G, R=R, S=S, **strides("dw", dw_strides, "kcrs"),
                    ACC=acc_dtype(x.dtype)))
    return shape, dw_strides, cls, partial, tuple(launches), finish


ZERO_FILL = "zero fill"


def conv2d_bwd_weight(dy, x, weight_size, stride, padding, dilation, groups, channels_last):
    shape, dw_strides, cls, partial, launches, finish = plan(
        (_wgrad_plan, dy.shape, dy.stride(), x.shape, x.stride(), *weight_size, _split_k, x.is_cuda,
         *spec_key(x.dtype, stride, padding, dilation, groups, channels_last)),
        _wgrad_plan, dy, x, weight_size, stride, padding, dilation, groups, channels_last)
    dw = x.new_empty_strided(shape, dw_strides)  # directly in its final layout
    if finish is ZERO_FILL:
        return dw.zero_()
    out = dw if partial is None else torch.empty(partial[0], dtype=partial[1], device=x.device)
    for chunk, grid, args in launches:
        _wgrad(grid, dy if chunk is None else dy[chunk], x if chunk is None else x[chunk], out, *args, cls=cls)
    if finish is not None:
        _sum_planes(finish[0], out, dw, *finish[1])
    return dw


def conv2d_bwd_bias(dy):
    N, K, P, Q = dy.shape
    db = dy.new_empty((K,))
    if K:
        _bias((K,), dy, db, N * P * Q, P, Q, *dy.stride(), acc_dtype(dy.dtype))
    return db


# ----------------------------------------------------------------- ahead-of-time compiles
def aot_configs():
    """Every backward compile a GPU launch gets: layout x dtype class x element type x tile; wgrad into dw or
    into (contiguous) compute-dtype partial planes; the plane sum; the bias sum."""
    for layout in LAYOUTS:
        yield from gemm_aot(_dgrad, unit_strides(layout, dy="nkpq", w="kcrs", dx="nchw"))
        operands = unit_strides(layout, dy="nkpq", x="nchw")
        yield from gemm_aot(_wgrad, {**operands, **unit_strides(layout, dw="zkcrs")})  # one plane: dw itself
        yield from gemm_aot(_wgrad, {**operands, "stride_dws": 1}, pointers={"dw_ptr": "fp32"}, classes=("half",))
        for t in FLOAT_TYPES:
            acc = {"ACC": tl.float64 if t == "fp64" else tl.float32}
            yield from _sum_planes.aot(t, {**acc, **unit_strides(layout, dw="kcrs")},
                                       pointers={"partial_ptr": "fp64" if t == "fp64" else "fp32"})
            yield from _bias.aot(t, {**acc, **unit_strides(layout, dy="nkpq")})
