"""Triton kernels for conv2d: the forward here, the gradients in ``conv2d_bwd`` (which imports this module).

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
(and its inverse ``_out_coord``, built on it).

An NCHW row gather cannot be vectorized in general (a tap shifts each run along W by
s·dil − pad elements, and W is rarely a multiple of 16), so the NCHW forward loads 16-bit
elements one at a time. A 1×1 convolution with step 1 and no padding over dense (h, w)
— most of a ResNet's — is a plain GEMM per image: its launch (FLAT) tiles each image's
h·w in aligned runs, and both operands go through vectorized cp.async copies.

The convolution's own stride is called ``step_h`` / ``step_w`` in the kernels (``stride_<tensor><dim>``
are memory strides). Products go through ``_gemm.mma``: tensor cores for fp16/bf16 with fp32
accumulation; fp32 in tf32 or ieee as ``torch.backends.cudnn.allow_tf32`` says (as torch's
convolutions); fp64 multiplies and sums in fp64. Every output is written once, in its final layout.
"""
import torch
import triton
import triton.language as tl

from .._common import conv_output_size
from ._gemm import CLASS_TYPES, dtype_class, input_precision, mma
from ._launch import Kernel, cdiv, config, kept, tiles


# ----------------------------------------------------------------- index algebra (the one place)
@triton.jit
def _in_coord(out, tap, step, pad, dil):
    """Input coordinate that output coordinate ``out`` reads through kernel tap ``tap``.

    Output position ``out`` sees the window that starts at ``out·step − pad`` (the
    top/left padding shifts it back), and tap ``tap`` sits ``tap·dil`` into it:

        in = out·step − pad + tap·dil

    ``in`` outside [0, size) is a padding position, read as zero.
    """
    return out * step - pad + tap * dil


@triton.jit
def _out_coord(inp, tap, step, pad, dil, out_size):
    """The inverse: the output coordinate whose tap ``tap`` reads input ``inp``, and whether one exists.

    From inp = _in_coord(out, tap) = out·step + _in_coord(0, tap):  out·step = inp − _in_coord(0, tap),
    which must be a non-negative multiple of the step, with out < out_size.
    """
    t = inp - _in_coord(0, tap, step, pad, dil)
    t_pos = tl.where(t >= 0, t, 0)  # integer division of negatives differs between backends: never divide one
    out = t_pos // step
    return out, (t >= 0) & (t_pos - out * step == 0) & (out < out_size)


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


@triton.jit
def _position_tile(N, D1, D2, COLS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile of a GEMM over rows m = (n, i1, i2) positions and columns = channels of group g:
    g, (n, i1, i2) of its rows, its columns, and both masks. Rows stay below 2^31: the launcher splits the batch."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n, i1, i2 = _split3(offs_m, D1, D2)
    return tl.program_id(2), n, i1, i2, n < N, offs_n, offs_n < COLS


@triton.jit
def _image_run_tile(HW, COLS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """As ``_position_tile`` for a grid of (images × runs of BLOCK_M positions h·w of one image): the rows
    are ``run·BLOCK_M + arange`` (a unit-stride run aligned to BLOCK_M) of image ``n``, returned as p = h·w
    (and q = 0): a division into (p, q) would hide the run from the compiler."""
    runs = tl.cdiv(HW, BLOCK_M)
    n = tl.program_id(0) // runs
    hw = (tl.program_id(0) % runs) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.program_id(2), n, hw, 0, hw < HW, offs_n, offs_n < COLS


# ----------------------------------------------------------------- forward
@triton.jit
def _conv2d_fwd_kernel(
        # pointers
        x_ptr, w_ptr, b_ptr, y_ptr,
        # sizes
        N, C_G, H, W, K_G, P, Q, R, S,
        # strides
        stride_xn, stride_xc, stride_xh, stride_xw, stride_wk, stride_wc, stride_wr, stride_ws, stride_b,
        stride_yn, stride_yk, stride_yp, stride_yq,
        # geometry
        step_h, step_w, pad_h, pad_w, dil_h, dil_w,
        # constexprs
        HAS_BIAS: tl.constexpr, ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FLAT: tl.constexpr = False):
    # y[n,k,p,q] = b[k] + Σ_{r,s,c} x[n,c,_in_coord(p,r),_in_coord(q,s)] · w[k,c,r,s]:
    # rows m = (n, p, q) output positions, columns = output channels of group g;
    # the reduction walks the taps (r, s) and, for each, blocks of the group's input channels.
    if FLAT:  # 1×1, step 1, no padding, (h, w) dense in x and y: one image per program, a run of h·w.
        # y is NCHW, so P·Q is stride_yk: an argument, which a launch specializes when it is a multiple of 16
        # (P·Q computed here would not be, and the row mask would split every vector load: 56×56 = 3136).
        g, n, p, q, m_ok, offs_n, n_ok = _image_run_tile(stride_yk, K_G, BLOCK_M, BLOCK_N)
    else:
        g, n, p, q, m_ok, offs_n, n_ok = _position_tile(N, P, Q, K_G, BLOCK_M, BLOCK_N)
    x_rows = x_ptr + n.to(tl.int64) * stride_xn + (g * C_G).to(tl.int64) * stride_xc
    k_out = (g * K_G + offs_n).to(tl.int64)
    w_cols = w_ptr + k_out * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for it in range(0, R * S * tl.cdiv(C_G, BLOCK_K)):
        if FLAT:  # the one tap (0, 0), known to the compiler: aligned weight runs along c (KCRS of 1×1: unit stride)
            r, s, c = 0, 0, it * BLOCK_K + tl.arange(0, BLOCK_K)
        else:
            r, s, c = _tap_step(it, S, C_G, BLOCK_K)
        ih = _in_coord(p, r, step_h, pad_h, dil_h)
        iw = _in_coord(q, s, step_w, pad_w, dil_w)
        row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_ok = c < C_G
        if FLAT:  # x[n, c, hw]: a unit-stride run the compiler sees (vector loads, cp.async)
            row_ok = m_ok
            x_pos = x_rows + p.to(tl.int64) * stride_xw  # p = h·w
        else:
            x_pos = x_rows + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
        a = tl.load(x_pos[:, None] + (c.to(tl.int64) * stride_xc)[None, :], mask=row_ok[:, None] & c_ok[None, :],
                    other=0.0)
        b = tl.load((w_cols + r * stride_wr + s * stride_ws)[None, :] + (c.to(tl.int64) * stride_wc)[:, None],
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        # A row whose tap reads padding adds nothing, not 0·w (NaN for an infinite weight; torch's oneDNN path).
        acc = tl.where(row_ok[:, None], mma(acc, a, b, INPUT_PRECISION), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + k_out * stride_b, mask=n_ok, other=0.0).to(ACC)[None, :]
    if FLAT:
        y_pos = n.to(tl.int64) * stride_yn + p.to(tl.int64) * stride_yq
    else:
        y_pos = n.to(tl.int64) * stride_yn + p.to(tl.int64) * stride_yp + q.to(tl.int64) * stride_yq
    y = y_ptr + y_pos[:, None] + (k_out * stride_yk)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------- launch configuration
TILE_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
# The tiles the autotuner tries on a GPU, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): those that compile for
# sm_90 without spilling (the gathers' address and mask tiles live in registers too; 128×128 spills, and
# dgrad's divisibility tests need the smaller rows). fp64 (multiply-and-sum: a BLOCK_M×BLOCK_K×BLOCK_N
# product lives in registers) runs one small tile.
FWD_TILES = [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3)]
# fp32 ieee: 64×128 spills (even with BLOCK_K 16). 64×64 with 4 warps: BLOCK_K 32 spills with triton 3.6 (NCHW: up
# to 208 bytes), BLOCK_K 16 with 3.9 (channels_last with bias: 8 bytes); each is clean where it is used.
FWD_IEEE_TILES = [(128, 64, 32, 8, 3), (64, 64, 16 if triton.__version__.startswith("3.6.") else 32, 4, 3)]
DGRAD_TILES = [(64, 128, 16, 8, 3), (64, 64, 32, 8, 3)]  # 64×128×32: fp32 ieee spills (dgrad masks its acc)
WGRAD_TILES = [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3)]
WGRAD_IEEE_TILES = [(128, 64, 32, 8, 3), (64, 128, 16, 8, 3), (64, 64, 32, 8, 3)]  # ieee 64×128×32, 64×64/4 spill
FP64_TILE = (16, 16, 16, 4, 3)
FWD_FP64_TILE = (16, 16, 8, 4, 3)  # the forward's 16×16×16 spills once unit strides are constants
# The interpreter's cost is per program and per loop step, not per element: tall tiles over the positions
# (rows of forward/dgrad, reduction of wgrad), 16 (the tl.dot minimum) over channels.
INTERPRETER = config(4, 3, BLOCK_M=64, BLOCK_N=16, BLOCK_K=16)
INTERPRETER_WGRAD = config(4, 3, BLOCK_M=16, BLOCK_N=16, BLOCK_K=64)
AUTOTUNE_KEY = ["N", "C_G", "H", "W", "K_G", "P", "Q", "R", "S", "step_h", "step_w", "dil_h", "dil_w"]


def gemm_configs(rows, ieee_rows=None, fp64_tile=FP64_TILE) -> dict:
    """The config lists of a conv GEMM kernel by dtype class (``_gemm.dtype_class``)."""
    tuned = tiles(TILE_FIELDS, *rows)
    ieee = tiles(TILE_FIELDS, *ieee_rows) if ieee_rows else tuned
    return {"half": tuned, "tf32": tuned, "ieee": ieee, "fp64": tiles(TILE_FIELDS, fp64_tile)}


def precision_class(dtype: torch.dtype) -> str:
    """The dtype class of a convolution: fp32 follows torch.backends.cudnn.allow_tf32, as torch's do."""
    return dtype_class(dtype, torch.backends.cudnn.allow_tf32)


def class_constexprs(cls: str) -> dict:
    """INPUT_PRECISION and ACC of a dtype class (the same for every launch of the class)."""
    return {"INPUT_PRECISION": input_precision(cls), "ACC": tl.float64 if cls == "fp64" else tl.float32}


def launch_class(dtype: torch.dtype) -> tuple[str, dict]:
    """The dtype class of a launch and its constexprs (INPUT_PRECISION, ACC)."""
    cls = precision_class(dtype)
    return cls, class_constexprs(cls)


def gemm_grid(kernel: Kernel, cls: str, rows: int, cols: int, planes: int, images: int = 1):
    """The grid of a conv GEMM launch, (images · rows / BLOCK_M, cols / BLOCK_N, planes) (``images`` > 1: row
    blocks per image): a tuple where the config is known before the launch (the interpreter's; a class of one
    config), else a function of the config the autotuner picks."""
    grid = lambda meta: (images * cdiv(rows, meta["BLOCK_M"]), cdiv(cols, meta["BLOCK_N"]), planes)  # noqa: E731
    fixed = kernel.known_config(cls)
    return grid if fixed is None else grid(fixed.kwargs)


# ----------------------------------------------------------------- launch plans
# What a launcher computes on the host (output shape and strides, batch chunks, grids, every scalar argument)
# depends only on the operands' shapes, strides and dtype, the geometry and the launch policy (dtype class, batch
# limit, split-k). It is computed once per such key and kept: a call then allocates its outputs and launches,
# the kernel's arguments after its tensors passed as one positional tuple (no keyword dicts per call).
PLAN_CACHE_SIZE = 512
_PLANS: dict = {}
_tf32 = torch._C._get_cudnn_allow_tf32  # torch.backends.cudnn.allow_tf32, without the module property


def plan(key: tuple, build, *args):
    """The plan of ``key`` (its first element names the launcher), made by ``build(*args)`` on first use."""
    return kept(_PLANS, PLAN_CACHE_SIZE, key, build, *args)


def scalar_args(kernel: Kernel, tensors: int, **named) -> tuple:
    """The named arguments of ``kernel`` after its first ``tensors`` parameters, in its parameter order (the
    configs' constexprs follow them)."""
    args = []
    for name in kernel.fn.arg_names[tensors:]:  # JITFunction and the interpreter's InterpretedFunction alike
        if name not in named:
            break
        args.append(named.pop(name))
    assert not named, f"{kernel.fn.__name__}: arguments out of parameter order: {sorted(named)}"
    return tuple(args)


def out_strides(shape: tuple, channels_last: bool) -> tuple:
    """The strides torch gives a new 4-D tensor of ``shape`` in its final layout, NCHW or channels_last (torch's
    rules, zero sizes included: only NCHW counts a zero size as 1)."""
    _, c, h, w = shape
    if channels_last:
        return (h * w * c, 1, w * c, c)
    w, h = max(w, 1), max(h, 1)
    return (max(c, 1) * h * w, h * w, w, 1)


LAYOUTS = ("nchw", "nhwc")  # the layouts launches specialize: unit stride along W (NCHW) or channels (NHWC)


def unit_strides(layout: str, **tensors: str) -> dict:
    """The strides a launch on ``layout`` tensors gets as the constant 1 (Triton specializes an int equal to 1):
    ``unit_strides("nhwc", x="nchw", y="nkpq")`` -> {"stride_xc": 1, "stride_yk": 1}."""
    return {f"stride_{name}{dims[-1 if layout == 'nchw' else -3]}": 1 for name, dims in tensors.items()}


def gemm_aot(kernel: Kernel, constexprs: dict | None = None, pointers: dict | None = None, classes=CLASS_TYPES):
    """The AOT compiles of a conv GEMM kernel: every dtype class x its element types x its tiles."""
    for cls in classes:
        yield from kernel.aot(CLASS_TYPES[cls], {**class_constexprs(cls), **(constexprs or {})}, cls=cls,
                              pointers=pointers)


# ----------------------------------------------------------------- host helpers (shared with conv2d_bwd)
# Position indices (n, p, q) are decomposed in int32 (64-bit division is slow and costs registers);
# memory offsets are int64. A launch therefore covers fewer than MAX_POSITIONS positions.
MAX_POSITIONS = 2**31 - 2**20


def batch_chunks(n: int, positions_per_image: int) -> list[tuple]:
    """(slice, images) per launch: chunks of the batch whose positions (images × positions per image) stay below
    MAX_POSITIONS; the slice is None for the whole batch (the common case: the operands themselves, no views)."""
    step = max(1, MAX_POSITIONS // max(positions_per_image, 1))
    if step >= n:
        return [(None, n)]
    return [(slice(n0, min(n, n0 + step)), min(n, n0 + step) - n0) for n0 in range(0, n, step)]


def spec_key(dtype: torch.dtype, stride, padding, dilation, groups: int, channels_last: bool) -> tuple:
    """The part of a plan's key every conv launcher shares: dtype, dtype class policy, batch limit, geometry."""
    return (dtype, _tf32(), MAX_POSITIONS, *stride, *padding, *dilation, groups, channels_last)


def output_hw(h: int, w: int, r: int, s: int, stride, padding, dilation) -> tuple[int, int]:
    """P, Q for padding (top, bottom, left, right)."""
    return (conv_output_size(h, r, stride[0], padding[0], padding[1], dilation[0]),
            conv_output_size(w, s, stride[1], padding[2], padding[3], dilation[1]))


def strides(name: str, values: tuple, dims: str) -> dict:
    """The ``stride_<name><dim>`` keyword arguments of strides ``values`` (one dim letter per dimension)."""
    return {f"stride_{name}{d}": v for d, v in zip(dims, values)}


def geometry(stride, padding, dilation) -> dict:
    """The geometry keyword arguments (top/left padding only: the bottom/right one is implied by P, Q)."""
    return {"step_h": stride[0], "step_w": stride[1], "pad_h": padding[0], "pad_w": padding[2],
            "dil_h": dilation[0], "dil_w": dilation[1]}


_fwd = Kernel(_conv2d_fwd_kernel, gemm_configs(FWD_TILES, FWD_IEEE_TILES, FWD_FP64_TILE), interpreter=INTERPRETER,
              key=AUTOTUNE_KEY)


# ----------------------------------------------------------------- launcher
def _fwd_plan(x, w, bias, stride, padding, dilation, groups, channels_last):
    """y's shape and strides, the dtype class, and per batch chunk (slice, grid, arguments after the tensors)."""
    N, _, H, W = x.shape
    K, C_G, R, S = w.shape
    P, Q = output_hw(H, W, R, S, stride, padding, dilation)
    shape = (N, K, P, Q)
    y_strides = out_strides(shape, channels_last)
    cls, consts = launch_class(x.dtype)
    # 1×1, step 1, no padding, x's and y's (h, w) dense: the rows of a tile are one run of an image's h·w
    # (not fp32 ieee: its 128×64 tile spills 8 bytes there with triton 3.6; it keeps the gather)
    flat = (R == S == 1 and tuple(stride) == (1, 1) and not any(padding) and not channels_last
            and x.stride(3) == 1 and (H == 1 or x.stride(2) == W) and cls != "ieee")
    launches = tuple(
        (chunk, gemm_grid(_fwd, cls, P * Q, K // groups, groups, n) if flat else
         gemm_grid(_fwd, cls, n * P * Q, K // groups, groups), {"FLAT": True} if flat else {},
         scalar_args(_fwd, 4, N=n, C_G=C_G, H=H, W=W, K_G=K // groups, P=P, Q=Q, R=R, S=S,
                     **strides("x", x.stride(), "nchw"), **strides("w", w.stride(), "kcrs"),
                     stride_b=0 if bias is None else bias.stride(0), **strides("y", y_strides, "nkpq"),
                     **geometry(stride, padding, dilation), HAS_BIAS=bias is not None, **consts))
        for chunk, n in batch_chunks(N, P * Q)) if N * K * P * Q else ()
    return shape, y_strides, cls, launches


def conv2d_fwd(x: torch.Tensor, w: torch.Tensor, bias, stride, padding, dilation, groups: int,
               channels_last: bool) -> torch.Tensor:
    shape, y_strides, cls, launches = plan(
        (_fwd_plan, x.shape, x.stride(), w.shape, w.stride(), None if bias is None else bias.stride(0),
         *spec_key(x.dtype, stride, padding, dilation, groups, channels_last)),
        _fwd_plan, x, w, bias, stride, padding, dilation, groups, channels_last)
    y = x.new_empty_strided(shape, y_strides)  # directly in its final layout
    for chunk, grid, flat, args in launches:
        xs, ys = (x, y) if chunk is None else (x[chunk], y[chunk])
        _fwd(grid, xs, w, ys if bias is None else bias, ys, *args, cls=cls, **flat)
    return y


# ----------------------------------------------------------------- ahead-of-time compiles
def aot_configs():
    """Every forward compile a GPU launch gets: layout x bias or not x dtype class x element type x tile."""
    for layout in LAYOUTS:
        unit = unit_strides(layout, x="nchw", w="kcrs", y="nkpq")
        yield from gemm_aot(_fwd, {"HAS_BIAS": True, "stride_b": 1, **unit})
        yield from gemm_aot(_fwd, {"HAS_BIAS": False, **unit})
    # 1×1, step 1, no padding, NCHW (FLAT): the integers a launch gets as the constant 1, weights KCRS of 1×1
    one = dict.fromkeys(("R", "S", "step_h", "step_w", "dil_h", "dil_w", "stride_wc", "stride_wr", "stride_ws"), 1)
    for bias in ({"HAS_BIAS": True, "stride_b": 1}, {"HAS_BIAS": False}):
        yield from gemm_aot(_fwd, {**bias, "FLAT": True, **one, **unit_strides("nchw", x="nchw", y="nkpq")},
                            classes=("half", "tf32", "fp64"))
