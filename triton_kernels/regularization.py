"""Triton kernels for dropout (Philox-seeded, mask regenerated in backward) and l2_penalty (multi-tensor).

Dropout works on the flat elements of a dense layout (the output's). Element e of
program ``pid`` (``e = pid·BLOCK + k·QUARTER + j``, quarter k in 0..3, lane j) takes
the k-th of the four 32-bit words Philox draws for the key ``seed`` and the 64-bit
counter ``pid·QUARTER + j`` (split in two 32-bit halves): one Philox call gives
four elements their random words. The element is kept when the word, as a uniform
u in [0, 1), satisfies u >= p. Backward runs the same draw, so forward and
backward see the same mask without storing it. The seed is read from a device
tensor (no host sync, traceable, CUDA-graph friendly).

l2_penalty groups the tensors by dtype; per group one launch covers every block of
every tensor: a table holds each tensor's address, size, first block and offset
in the group's flat gradient buffer, and a block → tensor map tells a program
which tensor it reads. The forward writes one partial sum of squares per program;
the backward writes coef·w into the flat buffer (coef = 2λ·g).
"""
import collections
import struct

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPE_NAMES, acc_type, is_dense, same_layout

DROPOUT_BLOCK = 2048  # elements per program: four quarters of 512, one Philox call per lane
DROPOUT_WARPS = 4
PHILOX_WORDS = tl.constexpr(4)  # 32-bit random words per Philox call: one per quarter of a block
L2_BLOCK = 4096
L2_WARPS = 8
# Table layout: one row per tensor (address, numel, first block, offset in the group's flat buffer).
TABLE_COLUMNS = tl.constexpr(4)
COL_ADDR = tl.constexpr(0)
COL_NUMEL = tl.constexpr(1)
COL_FIRST_BLOCK = tl.constexpr(2)
COL_OFFSET = tl.constexpr(3)
TABLE_CACHE_SIZE = 64  # device tables kept per (device, addresses, sizes): params are reused every step


# ----------------------------------------------------------------- dropout
@triton.jit
def _dropout_quarter(x_ptr, y_ptr, offs, n, multiplier):
    mask = offs < n
    x = acc_type(tl.load(x_ptr + offs, mask=mask))
    # y = x · m with m = scale for kept elements and 0 for dropped ones (NaN·0 stays NaN, as torch's x·noise)
    tl.store(y_ptr + offs, (x * multiplier).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dropout_apply(x_ptr, seed_ptr, y_ptr, n, p, scale_bits, BLOCK: tl.constexpr):
    QUARTER: tl.constexpr = BLOCK // PHILOX_WORDS
    pid = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, QUARTER)
    counter = pid * QUARTER + lane
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(tl.load(seed_ptr), c0, c1, zero, zero)
    scale = scale_bits.to(tl.float64, bitcast=True)  # 1/(1-p) exactly as the host computed it
    if x_ptr.dtype.element_ty != tl.float64:
        scale = scale.to(tl.float32)
    base = pid * BLOCK + lane
    _dropout_quarter(x_ptr, y_ptr, base, n, tl.where(tl.uint_to_uniform_float(r0) >= p, scale, 0.0))
    _dropout_quarter(x_ptr, y_ptr, base + QUARTER, n, tl.where(tl.uint_to_uniform_float(r1) >= p, scale, 0.0))
    _dropout_quarter(x_ptr, y_ptr, base + 2 * QUARTER, n, tl.where(tl.uint_to_uniform_float(r2) >= p, scale, 0.0))
    _dropout_quarter(x_ptr, y_ptr, base + 3 * QUARTER, n, tl.where(tl.uint_to_uniform_float(r3) >= p, scale, 0.0))


@triton.jit
def _dropout_fwd_kernel(x_ptr, seed_ptr, y_ptr, n, p, scale_bits, BLOCK: tl.constexpr):
    # y = x · mask / (1 - p), mask = [u(seed, e) >= p]
    _dropout_apply(x_ptr, seed_ptr, y_ptr, n, p, scale_bits, BLOCK)


@triton.jit
def _dropout_bwd_kernel(dy_ptr, seed_ptr, dx_ptr, n, p, scale_bits, BLOCK: tl.constexpr):
    # dx = dy · mask / (1 - p), the mask regenerated from the same seed and element indices
    _dropout_apply(dy_ptr, seed_ptr, dx_ptr, n, p, scale_bits, BLOCK)


def _scale_bits(p: float, dtype: torch.dtype) -> int:
    """The bits of 1/(1-p) as a float64, rounded as torch rounds it for ``dtype`` (1.0 for p = 1: unused)."""
    if p >= 1:
        scale = 1.0
    elif dtype == torch.float64:
        scale = 1.0 / (1.0 - p)
    else:  # torch divides the fp32 mask by (1 - p) rounded to fp32
        f32 = lambda v: struct.unpack("<f", struct.pack("<f", v))[0]  # noqa: E731
        scale = f32(1.0 / f32(1.0 - p))
    return struct.unpack("<q", struct.pack("<d", scale))[0]


def _launch_dropout(kernel, src: torch.Tensor, seed: torch.Tensor, p: float, dst: torch.Tensor) -> None:
    n = dst.numel()
    if n:
        kernel[(triton.cdiv(n, DROPOUT_BLOCK),)](src, seed, dst, n, p, _scale_bits(p, dst.dtype),
                                                 BLOCK=DROPOUT_BLOCK, num_warps=DROPOUT_WARPS)


def dropout_fwd(x: torch.Tensor, seed: torch.Tensor, p: float, stride: list[int]) -> torch.Tensor:
    y = torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device)
    _launch_dropout(_dropout_fwd_kernel, same_layout(x, y), seed, p, y)
    return y


def dropout_fwd_(x: torch.Tensor, seed: torch.Tensor, p: float, stride: list[int]) -> None:
    """In place: through a dense copy in the layout ``stride`` (written back) when x is not in it."""
    work = x if tuple(x.stride()) == tuple(stride) and is_dense(x) else \
        torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device).copy_(x)
    _launch_dropout(_dropout_fwd_kernel, work, seed, p, work)
    if work is not x:
        x.copy_(work)


def dropout_bwd(dy: torch.Tensor, seed: torch.Tensor, p: float, stride: list[int]) -> torch.Tensor:
    dx = torch.empty_strided(dy.shape, stride, dtype=dy.dtype, device=dy.device)
    _launch_dropout(_dropout_bwd_kernel, same_layout(dy, dx), seed, p, dx)
    return dx


# ----------------------------------------------------------------- l2_penalty
@triton.jit
def _l2_locate(table_ptr, block_tensor_ptr, like_ptr, BLOCK: tl.constexpr):
    """The tensor this program reads: its base pointer, offsets of this block, mask and flat-buffer offset."""
    pid = tl.program_id(0)
    row = tl.load(block_tensor_ptr + pid).to(tl.int64) * TABLE_COLUMNS
    base = tl.load(table_ptr + row + COL_ADDR).to(like_ptr.dtype)
    numel = tl.load(table_ptr + row + COL_NUMEL)
    first_block = tl.load(table_ptr + row + COL_FIRST_BLOCK)
    offs = (pid - first_block) * BLOCK + tl.arange(0, BLOCK)
    return base, offs, offs < numel, tl.load(table_ptr + row + COL_OFFSET)


@triton.jit
def _l2_penalty_fwd_kernel(table_ptr, block_tensor_ptr, like_ptr, partial_ptr, BLOCK: tl.constexpr):
    # partial[pid] = Σ_{i in block} w_i²   (the host sums the partials and multiplies by λ)
    base, offs, mask, _ = _l2_locate(table_ptr, block_tensor_ptr, like_ptr, BLOCK)
    w = acc_type(tl.load(base + offs, mask=mask, other=0.0))
    tl.store(partial_ptr + tl.program_id(0), tl.sum(w * w, axis=0).to(partial_ptr.dtype.element_ty))


@triton.jit
def _l2_penalty_bwd_kernel(table_ptr, block_tensor_ptr, like_ptr, coef_ptr, dw_ptr, BLOCK: tl.constexpr):
    # dw = 2λ·g·w = coef·w, written at the tensor's offset in the group's flat buffer
    base, offs, mask, start = _l2_locate(table_ptr, block_tensor_ptr, like_ptr, BLOCK)
    w = acc_type(tl.load(base + offs, mask=mask))
    coef = tl.load(coef_ptr).to(w.dtype)
    tl.store(dw_ptr + start + offs, (coef * w).to(dw_ptr.dtype.element_ty), mask=mask)


_tables: collections.OrderedDict = collections.OrderedDict()


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` read row-major: itself when contiguous, else a contiguous copy (the gradient views are row-major)."""
    return t.contiguous()


def _table(tensors: list[torch.Tensor]):
    """(table, block → tensor map, number of blocks) on the tensors' device, cached by addresses and sizes."""
    key = (tensors[0].device, tuple((t.data_ptr(), t.numel()) for t in tensors))
    if key in _tables:
        _tables.move_to_end(key)
        return _tables[key]
    blocks = [triton.cdiv(t.numel(), L2_BLOCK) for t in tensors]
    rows, first, offset = [], 0, 0
    for t, b in zip(tensors, blocks):
        rows.append([t.data_ptr(), t.numel(), first, offset])
        first, offset = first + b, offset + t.numel()
    table = torch.tensor(rows, dtype=torch.int64).to(tensors[0].device)
    block_tensor = torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int32),
                                           torch.tensor(blocks)).to(tensors[0].device)
    entry = (table, block_tensor, first)
    _tables[key] = entry
    while len(_tables) > TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return entry


def _groups(tensors: list[torch.Tensor]) -> dict:
    """Tensors by dtype, in order of first appearance (the same rule as the reference)."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return groups


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def l2_penalty_fwd(tensors: list[torch.Tensor], weight_decay: float, out_dtype: torch.dtype) -> torch.Tensor:
    groups = _groups(tensors)
    total_dtype = torch.float64 if torch.float64 in groups else torch.float32
    device = tensors[0].device
    sums = []
    for dtype, group in groups.items():
        dense = [_dense(t) for t in group if t.numel()]
        if not dense:
            continue
        table, block_tensor, n_blocks = _table(dense)
        partial = torch.empty(n_blocks, dtype=_acc_dtype(dtype), device=device)
        _l2_penalty_fwd_kernel[(n_blocks,)](table, block_tensor, dense[0], partial, BLOCK=L2_BLOCK,
                                            num_warps=L2_WARPS)
        sums.append(partial.sum(dtype=total_dtype))
    if not sums:  # every tensor is empty
        return torch.zeros((), dtype=out_dtype, device=device)
    total = sums[0] if len(sums) == 1 else torch.stack(sums).sum()
    return (total * weight_decay).to(out_dtype)


def l2_penalty_bwd(tensors: list[torch.Tensor], grad: torch.Tensor, weight_decay: float) -> list[torch.Tensor]:
    out = []
    for dtype, group in _groups(tensors).items():
        # coef = 2λ·g, in fp64 on the device (read by the kernel: no host sync)
        coef = grad.to(torch.float64) * (2.0 * weight_decay)
        dw = torch.empty(sum(t.numel() for t in group), dtype=dtype, device=grad.device)
        dense = [_dense(t) for t in group if t.numel()]
        if dense:
            table, block_tensor, n_blocks = _table(dense)
            _l2_penalty_bwd_kernel[(n_blocks,)](table, block_tensor, dense[0], coef, dw, BLOCK=L2_BLOCK,
                                                num_warps=L2_WARPS)
        out.append(dw)
    return out


def _dropout_configs(kernel):
    for dt in FLOAT_DTYPE_NAMES:
        sig = {"x_ptr": f"*{dt}", "seed_ptr": "*i64", "y_ptr": f"*{dt}", "n": "i64", "p": "fp32",
               "scale_bits": "i64", "BLOCK": "constexpr"}
        if kernel is _dropout_bwd_kernel:
            sig = {"dy_ptr": sig.pop("x_ptr"), "seed_ptr": sig.pop("seed_ptr"), "dx_ptr": sig.pop("y_ptr"), **sig}
        yield kernel, sig, {"BLOCK": DROPOUT_BLOCK}, DROPOUT_WARPS


def _l2_configs():
    for dt in FLOAT_DTYPE_NAMES:
        acc = "fp64" if dt == "fp64" else "fp32"
        head = {"table_ptr": "*i64", "block_tensor_ptr": "*i32", "like_ptr": f"*{dt}"}
        yield (_l2_penalty_fwd_kernel, {**head, "partial_ptr": f"*{acc}", "BLOCK": "constexpr"},
               {"BLOCK": L2_BLOCK}, L2_WARPS)
        yield (_l2_penalty_bwd_kernel, {**head, "coef_ptr": "*fp64", "dw_ptr": f"*{dt}", "BLOCK": "constexpr"},
               {"BLOCK": L2_BLOCK}, L2_WARPS)


# Every (kernel, signature, constexprs, num_warps) the launchers above launch with.
AOT_CONFIGS = [*_dropout_configs(_dropout_fwd_kernel), *_dropout_configs(_dropout_bwd_kernel), *_l2_configs()]
