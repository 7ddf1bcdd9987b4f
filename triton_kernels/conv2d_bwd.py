"""Triton kernels for the conv2d backward: input gradient (dgrad), weight gradient (wgrad), bias gradient.

The formulas and the index algebra are in triton_kernels/conv2d.py (its docstring,
``_in_coord`` and ``_out_coord``); this file holds the backward kernels and launchers.
"""
import torch
import triton
import triton.language as tl

from ._launch import acc_type
from .conv2d import (DGRAD_TILES, INTERPRETER_CONFIG_WGRAD, SIZE_ARGS, WGRAD_TILES, _in_coord, _mma,
                                   _out_coord, _split3, _tap_step, batch_chunks, gemm_aot_configs, geometry, launch,
                                   new_4d, tuned)

BIAS_BLOCK = 1024
BIAS_WARPS = 4
# wgrad splits its N·P·Q reduction over programs when the output tiles alone cannot fill the GPU.
TARGET_PROGRAMS = 264  # about two waves of 132 SMs (H100)
MIN_SPLIT_CHUNK = 4096  # reduction positions per split at least
SPLIT_ALIGN = 64  # chunks are whole multiples of every BLOCK_K


# ----------------------------------------------------------------- dgrad
@triton.jit
def _conv2d_bwd_input_kernel(dy_ptr, w_ptr, dx_ptr,
                             N, C_G, H, W, K_G, P, Q, R, S,
                             sdyn, sdyk, sdyp, sdyq, swk, swc, swr, sws, sdxn, sdxc, sdxh, sdxw,
                             stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             INPUT_PRECISION: tl.constexpr):
    # dx[n,c,h,w] = Σ_{r,s,k} dy[n,k,p,q] · w[k,c,r,s] over the taps with h = _in_coord(p, r), w = _in_coord(q, s)
    # for an integer output position (p, q) = _out_coord(h, r), _out_coord(w, s) (the transposed convolution):
    # rows m = (n, h, w) input positions, columns = input channels of group g; the reduction walks the taps
    # (r, s) and blocks of the group's output channels. A row whose h + pad − r·dil is not a multiple of
    # the stride (or lands outside the output) gets nothing from that tap: its dy row is masked out and its
    # accumulator row kept as it was.
    g = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # < 2^31: the launcher splits the batch
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n, h, w = _split3(offs_m, H, W)
    m_ok = n < N
    n_ok = offs_n < C_G
    c_in = (g * C_G + offs_n).to(tl.int64)
    dy_rows = dy_ptr + n.to(tl.int64) * sdyn + (g * K_G).to(tl.int64) * sdyk
    w_cols = w_ptr + (g * K_G).to(tl.int64) * swk + offs_n.to(tl.int64) * swc
    acc = acc_type(tl.zeros((BLOCK_M, BLOCK_N), dtype=dy_ptr.dtype.element_ty))
    for it in range(0, R * S * tl.cdiv(K_G, BLOCK_K)):
        r, s, k = _tap_step(it, S, K_G, BLOCK_K)
        p, p_ok = _out_coord(h, r, stride_h, pad_h, dil_h, P)
        q, q_ok = _out_coord(w, s, stride_w, pad_w, dil_w, Q)
        row_ok = m_ok & p_ok & q_ok
        k_ok = k < K_G
        a = tl.load((dy_rows + p.to(tl.int64) * sdyp + q.to(tl.int64) * sdyq)[:, None]
                    + (k.to(tl.int64) * sdyk)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load((w_cols + r * swr + s * sws)[None, :] + (k.to(tl.int64) * swk)[:, None],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        # A row this tap does not reach adds nothing, not 0·w (NaN for an infinite weight, unlike torch).
        acc = tl.where(row_ok[:, None], _mma(acc, a, b, INPUT_PRECISION), acc)
    dx = (dx_ptr + (n.to(tl.int64) * sdxn + h.to(tl.int64) * sdxh + w.to(tl.int64) * sdxw)[:, None]
          + (c_in * sdxc)[None, :])
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------- wgrad
@triton.jit
def _conv2d_bwd_weight_kernel(dy_ptr, x_ptr, dw_ptr,
                              NPQ, C_G, H, W, K_G, P, Q, R, S, SPLIT, CHUNK,
                              sdyn, sdyk, sdyp, sdyq, sxn, sxc, sxh, sxw, sdwz, sdwk, sdwc, sdwr, sdws,
                              stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              INPUT_PRECISION: tl.constexpr):
    # dw[k,c,r,s] = Σ_{n,p,q} dy[n,k,p,q] · x[n,c,_in_coord(p,r),_in_coord(q,s)]:
    # for one tap (r, s) per program, rows = output channels, columns = input channels of group g,
    # reduction j = (n, p, q). Program z = ((g·R + r)·S + s)·SPLIT + split sums the slice
    # [split·CHUNK, (split+1)·CHUNK) of the reduction into plane `split` (the launcher sums the planes).
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
    dy_rows = dy_ptr + k_out * sdyk
    x_cols = x_ptr + c_in * sxc
    acc = acc_type(tl.zeros((BLOCK_M, BLOCK_N), dtype=x_ptr.dtype.element_ty))
    start = split * CHUNK  # < 2^31: the launcher splits the batch
    end = tl.minimum(start + CHUNK, NPQ)
    for j0 in range(start, end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        n, p, q = _split3(j, P, Q)
        ih = _in_coord(p, r, stride_h, pad_h, dil_h)
        iw = _in_coord(q, s, stride_w, pad_w, dil_w)
        j_ok = j < end
        dy_cols = n.to(tl.int64) * sdyn + p.to(tl.int64) * sdyp + q.to(tl.int64) * sdyq
        a = tl.load(dy_rows[:, None] + dy_cols[None, :],
                    mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        x_ok = j_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_rows = n.to(tl.int64) * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        b = tl.load(x_cols[None, :] + x_rows[:, None],
                    mask=x_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(acc, a, b, INPUT_PRECISION)
    dw = (dw_ptr + split.to(tl.int64) * sdwz + r * sdwr + s * sdws + (k_out * sdwk)[:, None]
          + (offs_n.to(tl.int64) * sdwc)[None, :])
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------- bias grad
@triton.jit
def _conv2d_bwd_bias_kernel(dy_ptr, db_ptr, NPQ, P, Q, sdyn, sdyk, sdyp, sdyq, BLOCK: tl.constexpr):
    # db[k] = Σ_{n,p,q} dy[n,k,p,q]; program k walks the N·P·Q positions of its channel.
    k = tl.program_id(0).to(tl.int64)
    acc = acc_type(tl.zeros((BLOCK,), dtype=dy_ptr.dtype.element_ty))
    for j0 in range(0, NPQ, BLOCK):
        j = (j0 + tl.arange(0, BLOCK)).to(tl.int64)
        n, p, q = _split3(j, P, Q)  # int64 here: one pass over dy, no register pressure
        acc += acc_type(tl.load(dy_ptr + k * sdyk + n * sdyn + p * sdyp + q * sdyq, mask=j < NPQ, other=0.0))
    tl.store(db_ptr + k, tl.sum(acc, axis=0).to(db_ptr.dtype.element_ty))



_input_tuned = tuned(_conv2d_bwd_input_kernel, DGRAD_TILES)
_weight_tuned = tuned(_conv2d_bwd_weight_kernel, WGRAD_TILES,
                      key=["NPQ", "C_G", "H", "W", "K_G", "P", "Q", "R", "S", "SPLIT", "stride_h", "stride_w", "dil_h",
                           "dil_w"])


def conv2d_bwd_input(dy, w, input_size, stride, padding, dilation, groups, channels_last):
    N, C, H, W = input_size
    K, C_G, R, S = w.shape
    P, Q = dy.shape[2], dy.shape[3]
    dx = new_4d((N, C, H, W), dy, channels_last)
    if not dx.numel():
        return dx
    for chunk in batch_chunks(N, H * W):
        dys, dxs = dy[chunk], dx[chunk]
        args = (dys, w, dxs, dxs.shape[0], C_G, H, W, K // groups, P, Q, R, S, *dys.stride(), *w.stride(),
                *dxs.stride(), *geometry(stride, padding, dilation))
        launch(_conv2d_bwd_input_kernel, _input_tuned, dxs.shape[0] * H * W, C_G, groups, args, dy.dtype, dy.device)
    return dx


def _split_k(tiles: int, npq: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, tiles), npq // MIN_SPLIT_CHUNK))


def conv2d_bwd_weight(dy, x, weight_size, stride, padding, dilation, groups, channels_last):
    N, C, H, W = x.shape
    K, C_G, R, S = weight_size
    P, Q = dy.shape[2], dy.shape[3]
    K_G = K // groups
    dw = new_4d((K, C_G, R, S), x, channels_last)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    total = torch.zeros((K, C_G, R, S), dtype=acc_dtype, device=x.device)
    if not dw.numel():
        return dw
    tiles = groups * R * S * triton.cdiv(K_G, WGRAD_TILES[0][0]) * triton.cdiv(C_G, WGRAD_TILES[0][1])
    for batch in batch_chunks(N, P * Q):
        dys, xs = dy[batch], x[batch]
        npq = xs.shape[0] * P * Q
        split = _split_k(tiles, npq, x.device)
        chunk = triton.cdiv(triton.cdiv(npq, split), SPLIT_ALIGN) * SPLIT_ALIGN
        # Partial sums, one plane per split of the N·P·Q reduction.
        partial = torch.empty((split, K, C_G, R, S), dtype=acc_dtype, device=x.device)
        args = (dys, xs, partial, npq, C_G, H, W, K_G, P, Q, R, S, split, chunk, *dys.stride(), *xs.stride(),
                *partial.stride(), *geometry(stride, padding, dilation))
        launch(_conv2d_bwd_weight_kernel, _weight_tuned, K_G, C_G, groups * R * S * split, args, x.dtype, x.device,
               INTERPRETER_CONFIG_WGRAD)
        total += partial[0] if split == 1 else partial.sum(0)
    return dw.copy_(total)


def conv2d_bwd_bias(dy):
    N, K, P, Q = dy.shape
    db = torch.empty(K, dtype=dy.dtype, device=dy.device)
    if K:
        _conv2d_bwd_bias_kernel[(K,)](dy, db, N * P * Q, P, Q, *dy.stride(), BLOCK=BIAS_BLOCK, num_warps=BIAS_WARPS)
    return db


def _bias_aot_configs():
    for dt in ("fp16", "bf16", "fp32", "fp64"):
        sig = {"dy_ptr": f"*{dt}", "db_ptr": f"*{dt}", **{a: "i32" for a in ["NPQ", "P", "Q", "sdyn", "sdyk", "sdyp",
                                                                            "sdyq"]}, "BLOCK": "constexpr"}
        yield _conv2d_bwd_bias_kernel, sig, {"BLOCK": BIAS_BLOCK}, BIAS_WARPS


AOT_CONFIGS = [
    *gemm_aot_configs(_conv2d_bwd_input_kernel, DGRAD_TILES, ["dy_ptr", "w_ptr", "dx_ptr"],
                      ["sdyn", "sdyk", "sdyp", "sdyq", "swk", "swc", "swr", "sws", "sdxn", "sdxc", "sdxh", "sdxw"]),
    *gemm_aot_configs(_conv2d_bwd_weight_kernel, WGRAD_TILES, ["dy_ptr", "x_ptr", "dw_ptr"],
                      ["sdyn", "sdyk", "sdyp", "sdyq", "sxn", "sxc", "sxh", "sxw", "sdwz", "sdwk", "sdwc", "sdwr",
                       "sdws"], sizes=["NPQ", *SIZE_ARGS[1:], "SPLIT", "CHUNK"]),
    *_bias_aot_configs(),
]
