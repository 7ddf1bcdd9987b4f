"""Triton kernels for dropout (Philox-seeded, mask regenerated in backward) and l2_penalty (multi-tensor).

Dropout works on the flat elements of a dense layout (the output's). Element e of
program ``pid`` (``e = pid·BLOCK + k·QUARTER + j``, quarter k in 0..3, lane j) takes
the k-th of the four 32-bit words Philox draws for the key ``seed`` and the 64-bit
counter ``pid·QUARTER + j`` (split in two 32-bit halves): one Philox call gives
four elements their random words. The element is kept when the word, as a uniform
u in [0, 1), satisfies u >= p. Dropout is linear in its input, so one kernel serves
forward (y = D x), backward (dx = D dy) and every higher derivative: the same seed
gives the same mask without storing it. The seed is read from a device tensor (no
host sync, traceable, CUDA-graph friendly).

l2_penalty groups the tensors by dtype; per group one launch covers every block of
every tensor: a table holds each tensor's address, size, first block, offset in the
group's flat output buffer and (for a dot product) the address of its partner, and a
block → tensor map tells a program which tensor it reads. Two kernels:

* sum: one partial sum per program of w·w (the penalty) or, with DOT, of a·b (the
  penalty's second derivative needs Σ <v_t, w_t>);
* scale: coef·w into the flat buffer, coef = 2λ·g read on the device (the gradient,
  and the gradient of the gradient).
"""
import collections
import functools
import struct

import torch
import triton
import triton.language as tl

from .._common import compute_dtype, dtype_groups
from ._launch import (ALIGN_BYTES, FLOAT_TYPES, Kernel, acc_dtype, cdiv, config, is_dense, same_layout,
                      table_columns)

PHILOX_WORDS = tl.constexpr(4)  # 32-bit random words per Philox call: one per quarter of a block
# Table layout: one row per tensor (address, numel, first block, offset in PIECEs in the group's flat buffer, partner).
COL_ADDR, COL_NUMEL, COL_FIRST_BLOCK, COL_OFFSET, COL_OTHER = table_columns(5)
TABLE_COLUMNS = tl.constexpr(5)
PIECE = tl.constexpr(16)  # each tensor's piece of a flat gradient buffer starts at a multiple of PIECE elements
TABLE_CACHE_SIZE = 64  # device tables kept per (device, addresses, sizes): params are reused every step


# ----------------------------------------------------------------- dropout
@triton.jit
def _dropout_quarter(x_ptr, y_ptr, offs, n, multiplier, ACC: tl.constexpr):
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    # y = x · m with m = scale for kept elements and 0 for dropped ones (NaN·0 stays NaN, as torch's x·noise)
    tl.store(y_ptr + offs, (x * multiplier).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dropout_kernel(x_ptr, seed_ptr, y_ptr,  # pointers: input, 0-d int64 seed, output (same dense layout)
                    n,  # sizes
                    p, scale_bits,  # scalars: drop probability, the float64 bits of 1/(1-p)
                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    # y = x · mask / (1 - p), mask = [u(seed, e) >= p]; backward: dx = dy · mask / (1 - p), the same mask
    QUARTER: tl.constexpr = BLOCK // PHILOX_WORDS
    pid = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, QUARTER)
    counter = pid * QUARTER + lane
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(tl.load(seed_ptr), c0, c1, zero, zero)
    scale = scale_bits.to(tl.float64, bitcast=True).to(ACC)  # 1/(1-p) exactly as the host rounded it
    base = pid * BLOCK + lane
    _dropout_quarter(x_ptr, y_ptr, base, n, tl.where(tl.uint_to_uniform_float(r0) >= p, scale, 0.0), ACC)
    _dropout_quarter(x_ptr, y_ptr, base + QUARTER, n, tl.where(tl.uint_to_uniform_float(r1) >= p, scale, 0.0), ACC)
    _dropout_quarter(x_ptr, y_ptr, base + 2 * QUARTER, n, tl.where(tl.uint_to_uniform_float(r2) >= p, scale, 0.0),
                     ACC)
    _dropout_quarter(x_ptr, y_ptr, base + 3 * QUARTER, n, tl.where(tl.uint_to_uniform_float(r3) >= p, scale, 0.0),
                     ACC)


# Four quarters of 512 elements: one Philox call a lane. A thread moves 16 bytes of a quarter at once: 4 x 32-bit
# elements with 4 warps, 8 x 16-bit ones with 2 (the same BLOCK, so the same mask for every dtype).
_dropout = Kernel(_dropout_kernel, {"default": [config(num_warps=4, BLOCK=2048)],
                                    "half": [config(num_warps=2, BLOCK=2048)]})
DROPOUT_BLOCK = _dropout.interpreter.kwargs["BLOCK"]  # one BLOCK for every config: the grid is a plain tuple


def _width_class(dtype: torch.dtype) -> str:
    """The config list for elements of ``dtype``: "half" for 16-bit ones (twice the elements per thread)."""
    return "half" if dtype.itemsize == 2 else "default"


@functools.lru_cache(maxsize=64)
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


def _launch_dropout(src: torch.Tensor, seed: torch.Tensor, p: float, dst: torch.Tensor) -> None:
    n = dst.numel()
    if n:
        _dropout((cdiv(n, DROPOUT_BLOCK),), src, seed, dst, n, p, _scale_bits(p, dst.dtype),
                 ACC=acc_dtype(dst.dtype), cls=_width_class(dst.dtype))


def dropout_fwd(x: torch.Tensor, seed: torch.Tensor, p: float, stride: list[int]) -> torch.Tensor:
    y = torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device)
    _launch_dropout(same_layout(x, y), seed, p, y)
    return y


def dropout_fwd_(x: torch.Tensor, seed: torch.Tensor, p: float, stride: list[int]) -> None:
    """In place: through a dense copy in the layout ``stride`` (written back) when x is not in it."""
    work = x if tuple(x.stride()) == tuple(stride) and is_dense(x) else \
        torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device).copy_(x)
    _launch_dropout(work, seed, p, work)
    if work is not x:
        x.copy_(work)


def dropout_bwd(dy: torch.Tensor, seed: torch.Tensor, p: float, stride: list[int]) -> torch.Tensor:
    dx = torch.empty_strided(dy.shape, stride, dtype=dy.dtype, device=dy.device)
    _launch_dropout(same_layout(dy, dx), seed, p, dx)
    return dx


# ----------------------------------------------------------------- l2_penalty
@triton.jit
def _l2_locate(table_ptr, block_tensor_ptr, BLOCK: tl.constexpr):
    """This program's table row, the offsets of its block, the tensor's numel and flat-buffer offset (in PIECEs),
    and whether the block is full (no mask needed)."""
    pid = tl.program_id(0)
    row = table_ptr + tl.load(block_tensor_ptr + pid).to(tl.int64) * TABLE_COLUMNS
    block = pid - tl.load(row + COL_FIRST_BLOCK)
    numel = tl.load(row + COL_NUMEL)
    return row, block * BLOCK + tl.arange(0, BLOCK), numel, tl.load(row + COL_OFFSET), (block + 1) * BLOCK <= numel


@triton.jit
def _l2_load(row, column, like_ptr, offs, numel, ACC: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """The block ``offs`` of the tensor whose address is in ``column`` of a table row, as ACC (MASKED: 0 past
    numel). ALIGNED: the address is known 16-byte aligned, so an unmasked (full) block loads in 16-byte vectors."""
    ptr = tl.load(row + column).to(like_ptr.dtype)
    if ALIGNED:
        ptr = tl.multiple_of(ptr, ALIGN_BYTES)
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < numel, other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x.to(ACC)


@triton.jit
def _l2_block_sum(row, like_ptr, offs, numel, ACC: tl.constexpr, DOT: tl.constexpr, ALIGNED: tl.constexpr,
                  MASKED: tl.constexpr):
    a = _l2_load(row, COL_ADDR, like_ptr, offs, numel, ACC, ALIGNED, MASKED)
    b = a
    if DOT:
        b = _l2_load(row, COL_OTHER, like_ptr, offs, numel, ACC, ALIGNED, MASKED)
    return tl.sum(a * b, axis=0)


@triton.jit
def _l2_sum_kernel(table_ptr, block_tensor_ptr, like_ptr, partial_ptr,  # pointers (like_ptr: the group's type)
                   ACC: tl.constexpr, DOT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # partial[pid] = Σ_{i in block} w_i², or with DOT Σ a_i b_i (b: the row's partner); the host adds the partials
    row, offs, numel, _, full = _l2_locate(table_ptr, block_tensor_ptr, BLOCK)
    if ALIGNED:  # a full block loads unmasked, in 16-byte vectors (an unknown numel in a mask cuts them to elements)
        if full:
            partial = _l2_block_sum(row, like_ptr, offs, numel, ACC, DOT, ALIGNED, False)
        else:  # the tensor's last, partial block
            partial = _l2_block_sum(row, like_ptr, offs, numel, ACC, DOT, ALIGNED, True)
    else:
        partial = _l2_block_sum(row, like_ptr, offs, numel, ACC, DOT, ALIGNED, True)
    tl.store(partial_ptr + tl.program_id(0), partial)


@triton.jit
def _l2_scale_block(row, like_ptr, out_ptr, offs, numel, coef, ACC: tl.constexpr, ALIGNED: tl.constexpr,
                    MASKED: tl.constexpr):
    """dw = coef·w for the block ``offs`` (MASKED: the tensor's last block, its piece's padding written 0)."""
    w = _l2_load(row, COL_ADDR, like_ptr, offs, numel, ACC, ALIGNED, MASKED)
    if MASKED:
        dw = tl.where(offs < numel, coef * w, 0.0)
        tl.store(out_ptr + offs, dw.to(out_ptr.dtype.element_ty), mask=offs < tl.cdiv(numel, PIECE) * PIECE)
    else:
        tl.store(out_ptr + offs, (coef * w).to(out_ptr.dtype.element_ty))


@triton.jit
def _l2_scale_kernel(table_ptr, block_tensor_ptr, like_ptr, coef_ptr, dw_ptr,  # pointers (coef: fp64 0-d)
                     ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # dw = coef·w (coef = 2λ·g), written at the tensor's piece of the group's flat buffer (its offset is stored in
    # PIECEs: the piece is 16-byte aligned as the compiler sees it); the piece's padding is written 0
    row, offs, numel, pieces, full = _l2_locate(table_ptr, block_tensor_ptr, BLOCK)
    out_ptr = dw_ptr + pieces * PIECE
    coef = tl.load(coef_ptr).to(ACC)
    if ALIGNED:  # full blocks unmasked: 16-byte loads and stores (see the sum kernel)
        if full:
            _l2_scale_block(row, like_ptr, out_ptr, offs, numel, coef, ACC, ALIGNED, False)
        else:
            _l2_scale_block(row, like_ptr, out_ptr, offs, numel, coef, ACC, ALIGNED, True)
    else:
        _l2_scale_block(row, like_ptr, out_ptr, offs, numel, coef, ACC, ALIGNED, True)


L2_CONFIGS = [config(num_warps=8, BLOCK=4096)]
_l2_sum = Kernel(_l2_sum_kernel, L2_CONFIGS)
_l2_scale = Kernel(_l2_scale_kernel, L2_CONFIGS)
L2_BLOCK = L2_CONFIGS[0].kwargs["BLOCK"]

_tables: collections.OrderedDict = collections.OrderedDict()


def padded(numel: int) -> int:
    """The length of a tensor's piece of a flat gradient buffer: ``numel`` rounded up to a multiple of PIECE."""
    return cdiv(numel, PIECE.value) * PIECE.value


def _table(tensors: list[torch.Tensor], others: list[torch.Tensor] | None = None):
    """(table, block → tensor map, number of blocks, every address 16-byte aligned) on the tensors' device,
    cached by addresses and sizes."""
    partners = others or tensors
    key = (tensors[0].device, tuple((t.data_ptr(), o.data_ptr(), t.numel()) for t, o in zip(tensors, partners)))
    entry = _tables.get(key)
    if entry is not None:
        try:
            _tables.move_to_end(key)
        except KeyError:  # evicted meanwhile by another thread
            pass
        return entry
    blocks = [cdiv(t.numel(), L2_BLOCK) for t in tensors]
    rows, first, offset, bits = [], 0, 0, 0
    for t, o, b in zip(tensors, partners, blocks):
        rows.append([t.data_ptr(), t.numel(), first, offset // PIECE.value, o.data_ptr()])
        first, offset, bits = first + b, offset + padded(t.numel()), bits | t.data_ptr() | o.data_ptr()
    table = torch.tensor(rows, dtype=torch.int64).to(tensors[0].device)
    block_tensor = torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int32),
                                           torch.tensor(blocks)).to(tensors[0].device)
    entry = (table, block_tensor, first, bits % ALIGN_BYTES.value == 0)
    _tables[key] = entry
    while len(_tables) > TABLE_CACHE_SIZE:
        try:
            _tables.popitem(last=False)
        except KeyError:
            break
    return entry


def l2_penalty_dot(tensors: list[torch.Tensor], others: list[torch.Tensor], weight_decay: float,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """λ · Σ_t <a_t, b_t>: one launch per dtype group, the partials added on the device. ``others`` the same
    list as ``tensors`` (the forward, Σ w²): each tensor is read once."""
    square = others is tensors
    groups: dict = {}  # indices by dtype, as dtype_groups orders the tensors
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    total_dtype = torch.float64 if torch.float64 in groups else torch.float32
    device = tensors[0].device
    sums = []
    for dtype, idx in groups.items():
        idx = [i for i in idx if tensors[i].numel()]
        if not idx:
            continue
        dense = [tensors[i].contiguous() for i in idx]  # row-major, as the gradient views are
        partners = None if square else [others[i].contiguous() for i in idx]
        table, block_tensor, n_blocks, aligned = _table(dense, partners)
        partial = torch.empty(n_blocks, dtype=compute_dtype(dtype), device=device)
        _l2_sum((n_blocks,), table, block_tensor, dense[0], partial, ACC=acc_dtype(dtype), DOT=not square,
                ALIGNED=aligned)
        sums.append(partial.sum(dtype=total_dtype))
    if not sums:  # every tensor is empty
        return torch.zeros((), dtype=out_dtype, device=device)
    total = sums[0] if len(sums) == 1 else torch.stack(sums).sum()
    return (total * weight_decay).to(out_dtype)


def l2_penalty_fwd(tensors: list[torch.Tensor], weight_decay: float, out_dtype: torch.dtype) -> torch.Tensor:
    return l2_penalty_dot(tensors, tensors, weight_decay, out_dtype)  # Σ w²: one read of each tensor


def l2_penalty_bwd(tensors: list[torch.Tensor], grad: torch.Tensor, weight_decay: float) -> list[torch.Tensor]:
    # coef = 2λ·g, in fp64 on the device (read by the kernel: no host sync)
    coef = grad.to(torch.float64) * (2.0 * weight_decay)
    out = []
    for dtype, group in dtype_groups(tensors).items():
        dw = torch.empty(sum(padded(t.numel()) for t in group), dtype=dtype, device=grad.device)
        dense = [t.contiguous() for t in group if t.numel()]
        if dense:
            table, block_tensor, n_blocks, aligned = _table(dense)
            _l2_scale((n_blocks,), table, block_tensor, dense[0], coef, dw, ACC=acc_dtype(dtype), ALIGNED=aligned)
        out.append(dw)
    return out


# ----------------------------------------------------------------- ahead-of-time compiles
def aot_configs():
    """Every compile the launchers above get on a GPU (read by tests/aot.py, outside the interpreter)."""
    for t in FLOAT_TYPES:
        acc = "fp64" if t == "fp64" else "fp32"
        consts = {"ACC": tl.float64 if t == "fp64" else tl.float32}
        yield from _dropout.aot(t, consts, cls="half" if t in ("fp16", "bf16") else "default",
                                ints={"n": "i64", "p": "fp32", "scale_bits": "i64"}, pointers={"seed_ptr": "i64"})
        tables = {"table_ptr": "i64", "block_tensor_ptr": "i32"}
        for aligned in (False, True):  # tensors at 16-byte aligned addresses (allocations), or not (views)
            for dot in (False, True):
                yield from _l2_sum.aot(t, {**consts, "DOT": dot, "ALIGNED": aligned},
                                       pointers={**tables, "partial_ptr": acc})
            yield from _l2_scale.aot(t, {**consts, "ALIGNED": aligned}, pointers={**tables, "coef_ptr": "fp64"})
