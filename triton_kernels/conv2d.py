"""Triton kernels for conv2d: forward, input gradient (dgrad), weight gradient (wgrad), bias gradient.

All three convolution kernels are implicit GEMMs: no patch matrix is ever stored,
each program gathers its operand tiles from the 4-D tensors on the fly, through
the strides it is given (NCHW, channels_last or any other layout run without a
copy). Per group g, with C_G = C/groups input and K_G = K/groups output channels:

    forward  y[n,k,p,q]  = Σ_{c,r,s} x[n,c,ih,iw] · w[k,c,r,s]      GEMM  (N·P·Q) × K_G, reduced over C_G·R·S
    dgrad    dx[n,c,h,w] = Σ_{k,r,s} dy[n,k,p,q] · w[k,c,r,s]        GEMM  (N·H·W) × C_G, reduced over K_G·R·S
             summed over the taps whose (p, q) lands on (h, w) exactly: the transposed convolution
    wgrad    dw[k,c,r,s] = Σ_{n,p,q} dy[n,k,p,q] · x[n,c,ih,iw]      GEMM  K_G × C_G per tap, reduced over N·P·Q
    bias     db[k]       = Σ_{n,p,q} dy[n,k,p,q]

Forward and dgrad walk their reduction as (tap r, tap s, block of channels), one
flat loop with scalar r and s: for a fixed tap the input coordinate of a row is a
row vector, so every gathered tile is (row vector) + (channel vector) with a mask
of the same form, and a channels_last tensor is read along contiguous channels.
wgrad gives each program one tap. Coordinates come from one helper, ``_in_coord``
(and its inverse ``_out_coord``, built on it). wgrad may split its N·P·Q
reduction over programs (partial planes summed by the launcher) to fill the GPU.

Tensor cores (``tl.dot``) for fp16/bf16 with fp32 accumulation; fp32 uses tf32
or ieee as ``torch.backends.cudnn.allow_tf32`` says; fp64 multiplies and sums in
fp64 (``tl.dot`` on fp64 does not compile for sm_90).
"""
import torch
import triton
import triton.language as tl

from ._launch import acc_type


# ----------------------------------------------------------------- index algebra (the one place)
@triton.jit
def _in_coord(out, tap, stride, pad, dil):
    """Input coordinate that output coordinate ``out`` reads through kernel tap ``tap``.

    Output position ``out`` sees the window that starts at ``out·stride − pad`` (the
    top/left padding shifts it back), and tap ``tap`` sits ``tap·dil`` into it:

        in = out·stride − pad + tap·dil

    ``in`` outside [0, size) is a padding position, read as zero.
    """
    return out * stride - pad + tap * dil


@triton.jit
def _out_coord(inp, tap, stride, pad, dil, out_size):
    """The inverse: the output coordinate whose tap ``tap`` reads input ``inp``, and whether one exists.

    From inp = _in_coord(out, tap) = out·stride + _in_coord(0, tap):  out·stride = inp − _in_coord(0, tap),
    which must be a non-negative multiple of the stride, with out < out_size.
    """
    t = inp - _in_coord(0, tap, stride, pad, dil)
    t_pos = tl.where(t >= 0, t, 0)  # integer division of negatives differs between backends: never divide one
    out = t_pos // stride
    return out, (t >= 0) & (t_pos - out * stride == 0) & (out < out_size)


@triton.jit
def _mma(acc, a, b, INPUT_PRECISION: tl.constexpr):
    """acc += a @ b: tensor cores, or multiply-and-sum for fp64 (no fp64 ``tl.dot`` on sm_90)."""
    if a.dtype == tl.float64:
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _split3(idx, D1, D2):
    """idx = (i0·D1 + i1)·D2 + i2 → (i0, i1, i2)."""
    i2 = idx % D2
    rest = idx // D2
    return rest // D1, rest % D1, i2


@triton.jit
def _tap_step(it, S, CHANNELS, BLOCK_K: tl.constexpr):
    """Step ``it`` of a reduction over (r, s, channel block), channel blocks fastest: scalar r, s and the block."""
    blocks = tl.cdiv(CHANNELS, BLOCK_K)
    rs = it // blocks
    return rs // S, rs % S, (it % blocks) * BLOCK_K + tl.arange(0, BLOCK_K)


# ----------------------------------------------------------------- forward
@triton.jit
def _conv2d_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr,
                       N, C_G, H, W, K_G, P, Q, R, S,
                       sxn, sxc, sxh, sxw, swk, swc, swr, sws, syn, syk, syp, syq,
                       stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr):
    # y[n,k,p,q] = b[k] + Σ_{r,s,c} x[n,c,_in_coord(p,r),_in_coord(q,s)] · w[k,c,r,s]:
    # rows m = (n, p, q) output positions, columns = output channels of group g;
    # the reduction walks the taps (r, s) and, for each, blocks of the group's input channels.
    g = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # < 2^31: the launcher splits the batch
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n, p, q = _split3(offs_m, P, Q)
    m_ok = n < N
    n_ok = offs_n < K_G
    x_rows = x_ptr + n.to(tl.int64) * sxn + (g * C_G).to(tl.int64) * sxc
    k_out = (g * K_G + offs_n).to(tl.int64)
    w_cols = w_ptr + k_out * swk
    acc = acc_type(tl.zeros((BLOCK_M, BLOCK_N), dtype=x_ptr.dtype.element_ty))
    for it in range(0, R * S * tl.cdiv(C_G, BLOCK_K)):
        r, s, c = _tap_step(it, S, C_G, BLOCK_K)
        ih = _in_coord(p, r, stride_h, pad_h, dil_h)
        iw = _in_coord(q, s, stride_w, pad_w, dil_w)
        row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_ok = c < C_G
        a = tl.load((x_rows + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None] + (c.to(tl.int64) * sxc)[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load((w_cols + r * swr + s * sws)[None, :] + (c.to(tl.int64) * swc)[:, None],
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(acc, a, b, INPUT_PRECISION)
    bias = tl.load(b_ptr + k_out, mask=n_ok, other=0.0)
    acc += acc_type(bias)[None, :]
    y = y_ptr + (n.to(tl.int64) * syn + p.to(tl.int64) * syp + q.to(tl.int64) * syq)[:, None] + (k_out * syk)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------- launch configuration
# One small config under the interpreter (it costs per program); autotuned tiles on a GPU,
# except fp64 (multiply-and-sum: a BLOCK_M×BLOCK_K×BLOCK_N product lives in registers).
# The interpreter's cost is per program and per loop step, not per element: tall tiles over the
# positions (rows of forward/dgrad, reduction of wgrad), 16 (the tl.dot minimum) over channels.
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}
INTERPRETER_CONFIG_WGRAD = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}
INTERPRETER_WARPS = 4
FP64_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
FP64_WARPS = 4
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried by the autotuner on a GPU: the tiles that
# compile for sm_90 without spilling (the gathers' address and mask tiles live in registers too;
# 128×128 spills, and dgrad's divisibility tests need the smaller rows).
FWD_TILES = [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3)]
DGRAD_TILES = [(64, 128, 16, 8, 3), (64, 64, 32, 8, 3)]  # 64×128×32: fp32 ieee spills (dgrad masks its acc)
WGRAD_TILES = [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3)]
GEMM_DTYPES = ("fp16", "bf16", "fp32")  # tl.dot; fp64 takes FP64_CONFIG
PRECISIONS = {"fp16": ("ieee",), "bf16": ("ieee",), "fp32": ("tf32", "ieee"), "fp64": ("ieee",)}
AUTOTUNE_KEY = ["N", "C_G", "H", "W", "K_G", "P", "Q", "R", "S", "stride_h", "stride_w", "dil_h", "dil_w"]


def tuned(kernel, tiles, key=AUTOTUNE_KEY):
    """``kernel`` autotuned over ``tiles`` (multi-config autotune needs a GPU: None under the interpreter)."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
               for bm, bn, bk, nw, ns in tiles]
    return triton.autotune(configs=configs, key=key)(kernel)


def input_precision(dtype: torch.dtype) -> str:
    """fp32 convolutions follow torch.backends.cudnn.allow_tf32, as torch's do."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def launch(kernel, autotuned, rows: int, cols: int, planes: int, args, dtype: torch.dtype, device: torch.device,
           interpreter_config=INTERPRETER_CONFIG):
    """Launch a GEMM kernel over a (rows / BLOCK_M, cols / BLOCK_N, planes) grid with the right config."""
    precision = input_precision(dtype)
    if device.type == "cuda" and dtype != torch.float64 and autotuned is not None:
        def grid(meta):
            return (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"]), planes)

        autotuned[grid](*args, INPUT_PRECISION=precision)
        return
    config, warps = (interpreter_config, INTERPRETER_WARPS) if device.type == "cpu" else (FP64_CONFIG, FP64_WARPS)
    grid = (triton.cdiv(rows, config["BLOCK_M"]), triton.cdiv(cols, config["BLOCK_N"]), planes)
    kernel[grid](*args, **config, INPUT_PRECISION=precision, num_warps=warps)


# Position indices (n, p, q) are decomposed in int32 (64-bit division is slow and costs registers);
# memory offsets are int64. A launch therefore covers fewer than MAX_POSITIONS positions.
MAX_POSITIONS = 2**31 - 2**20


def batch_chunks(n: int, positions_per_image: int):
    """Slices of the batch whose positions (images × positions per image) stay below MAX_POSITIONS."""
    step = max(1, MAX_POSITIONS // max(positions_per_image, 1))
    return [slice(n0, min(n, n0 + step)) for n0 in range(0, n, step)]


def output_hw(h, w, r, s, stride, padding, dilation):
    """P, Q: the output size for padding (top, bottom, left, right)."""
    p = (h + padding[0] + padding[1] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + padding[2] + padding[3] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


def new_4d(shape, like: torch.Tensor, channels_last: bool, dtype=None) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    return out.to(memory_format=torch.channels_last) if channels_last else out


def geometry(stride, padding, dilation):
    """The scalar kernel arguments: stride_h, stride_w, pad_h, pad_w, dil_h, dil_w (top/left padding only)."""
    return (stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1])


_fwd_tuned = tuned(_conv2d_fwd_kernel, FWD_TILES)


def conv2d_fwd(x: torch.Tensor, w: torch.Tensor, bias, stride, padding, dilation, groups: int,
               channels_last: bool) -> torch.Tensor:
    N, C, H, W = x.shape
    K, C_G, R, S = w.shape
    P, Q = output_hw(H, W, R, S, stride, padding, dilation)
    y = new_4d((N, K, P, Q), x, channels_last)
    if not y.numel():
        return y
    # The kernel reads the bias as a contiguous vector: a strided or expanded one is copied (K elements).
    b = bias.contiguous() if bias is not None else torch.zeros(K, dtype=x.dtype, device=x.device)
    for chunk in batch_chunks(N, P * Q):
        xs, ys = x[chunk], y[chunk]
        args = (xs, w, b, ys, xs.shape[0], C_G, H, W, K // groups, P, Q, R, S, *xs.stride(), *w.stride(),
                *ys.stride(), *geometry(stride, padding, dilation))
        launch(_conv2d_fwd_kernel, _fwd_tuned, xs.shape[0] * P * Q, K // groups, groups, args, x.dtype, x.device)
    return y


# The backward launchers live in conv2d_bwd.py (imported on first use: it imports this module).
def conv2d_bwd_input(dy, w, input_size, stride, padding, dilation, groups, channels_last):
    from . import conv2d_bwd

    return conv2d_bwd.conv2d_bwd_input(dy, w, input_size, stride, padding, dilation, groups, channels_last)


def conv2d_bwd_weight(dy, x, weight_size, stride, padding, dilation, groups, channels_last):
    from . import conv2d_bwd

    return conv2d_bwd.conv2d_bwd_weight(dy, x, weight_size, stride, padding, dilation, groups, channels_last)


def conv2d_bwd_bias(dy):
    from . import conv2d_bwd

    return conv2d_bwd.conv2d_bwd_bias(dy)


# ----------------------------------------------------------------- AOT
SIZE_ARGS = ["N", "C_G", "H", "W", "K_G", "P", "Q", "R", "S"]
GEOMETRY_ARGS = ["stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w"]
CONSTEXPRS = ["BLOCK_M", "BLOCK_N", "BLOCK_K", "INPUT_PRECISION"]


def gemm_aot_configs(kernel, tiles, pointers, strides, sizes=SIZE_ARGS):
    """(kernel, signature, constexprs, num_warps, num_stages) for every dtype × precision × tile it launches with."""
    ints = list(sizes) + strides + GEOMETRY_ARGS
    for dt in GEMM_DTYPES + ("fp64",):
        sig = {**{p: f"*{dt}" for p in pointers}, **{a: "i32" for a in ints}, **{c: "constexpr" for c in CONSTEXPRS}}
        if "dw_ptr" in pointers and dt != "fp64":  # split-K partials may go to an fp32 workspace
            sig["dw_ptr"] = "*fp32"
        for prec in PRECISIONS[dt]:
            for bm, bn, bk, nw, ns in tiles if dt in GEMM_DTYPES else [(*FP64_CONFIG.values(), FP64_WARPS, None)]:
                yield kernel, sig, {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "INPUT_PRECISION": prec}, nw, ns


AOT_CONFIGS = list(gemm_aot_configs(_conv2d_fwd_kernel, FWD_TILES, ["x_ptr", "w_ptr", "b_ptr", "y_ptr"],
                                    ["sxn", "sxc", "sxh", "sxw", "swk", "swc", "swr", "sws",
                                     "syn", "syk", "syp", "syq"]))
