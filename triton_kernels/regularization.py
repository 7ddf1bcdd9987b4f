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
from ._launch import FLOAT_TYPES, Kernel, acc_dtype, cdiv, config, is_dense, same_layout

PHILOX_WORDS = tl.constexpr(4)  # 32-bit random words per Philox call: one per quarter of a block
# Table layout: one row per tensor (address, numel, first block, offset in the group's flat buffer, partner's address).
TABLE_COLUMNS = tl.constexpr(5)
COL_ADDR = tl.constexpr(0)
COL_NUMEL = tl.constexpr(1)
COL_FIRST_BLOCK = tl.constexpr(2)
COL_OFFSET = tl.constexpr(3)
COL_OTHER = tl.constexpr(4)
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


_dropout = Kernel(_dropout_kernel, [config(num_warps=4, BLOCK=2048)])  # four quarters of 512: one Philox call a lane
DROPOUT_BLOCK = _dropout.interpreter.kwargs["BLOCK"]  # its one config everywhere: the grid is a plain tuple


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
                 ACC=acc_dtype(dst.dtype))


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
    """This program's table row and the offsets, mask and flat-buffer offset of its block."""
    pid = tl.program_id(0)
    row = table_ptr + tl.load(block_tensor_ptr + pid).to(tl.int64) * TABLE_COLUMNS
    first_block = tl.load(row + COL_FIRST_BLOCK)
    offs = (pid - first_block) * BLOCK + tl.arange(0, BLOCK)
    return row, offs, offs < tl.load(row + COL_NUMEL), tl.load(row + COL_OFFSET)


@triton.jit
def _l2_sum_kernel(table_ptr, block_tensor_ptr, like_ptr, partial_ptr,  # pointers (like_ptr: the group's type)
                   ACC: tl.constexpr, DOT: tl.constexpr, BLOCK: tl.constexpr):
    # partial[pid] = Σ_{i in block} w_i², or with DOT Σ a_i b_i (b: the row's partner); the host adds the partials
    row, offs, mask, _ = _l2_locate(table_ptr, block_tensor_ptr, BLOCK)
    a = tl.load(tl.load(row + COL_ADDR).to(like_ptr.dtype) + offs, mask=mask, other=0.0).to(ACC)
    b = a
    if DOT:
        b = tl.load(tl.load(row + COL_OTHER).to(like_ptr.dtype) + offs, mask=mask, other=0.0).to(ACC)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(a * b, axis=0))


@triton.jit
def _l2_scale_kernel(table_ptr, block_tensor_ptr, like_ptr, coef_ptr, dw_ptr,  # pointers (coef: fp64 0-d)
                     ACC: tl.constexpr, BLOCK: tl.constexpr):
    # dw = coef·w (coef = 2λ·g), written at the tensor's offset in the group's flat buffer
    row, offs, mask, start = _l2_locate(table_ptr, block_tensor_ptr, BLOCK)
    w = tl.load(tl.load(row + COL_ADDR).to(like_ptr.dtype) + offs, mask=mask).to(ACC)
    coef = tl.load(coef_ptr).to(ACC)
    tl.store(dw_ptr + start + offs, (coef * w).to(dw_ptr.dtype.element_ty), mask=mask)


L2_CONFIGS = [config(num_warps=8, BLOCK=4096)]
_l2_sum = Kernel(_l2_sum_kernel, L2_CONFIGS)
_l2_scale = Kernel(_l2_scale_kernel, L2_CONFIGS)
L2_BLOCK = L2_CONFIGS[0].kwargs["BLOCK"]

_tables: collections.OrderedDict = collections.OrderedDict()


def _table(tensors: list[torch.Tensor], others: list[torch.Tensor] | None = None):
    """(table, block → tensor map, number of blocks) on the tensors' device, cached by addresses and sizes."""
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
    rows, first, offset = [], 0, 0
    for t, o, b in zip(tensors, partners, blocks):
        rows.append([t.data_ptr(), t.numel(), first, offset, o.data_ptr()])
        first, offset = first + b, offset + t.numel()
    table = torch.tensor(rows, dtype=torch.int64).to(tensors[0].device)
    block_tensor = torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int32),
                                           torch.tensor(blocks)).to(tensors[0].device)
    entry = (table, block_tensor, first)
    _tables[key] = entry
    while len(_tables) > TABLE_CACHE_SIZE:
        try:
            _tables.popitem(last=False)
        except KeyError:
            break
    return entry


def _sum(tensors: list[torch.Tensor], others: list[torch.Tensor] | None, weight_decay: float,
         out_dtype: torch.dtype) -> torch.Tensor:
    """λ · Σ_t <a_t, b_t> (b = a without ``others``): one launch per dtype group, the partials added on the device."""
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
        partners = [others[i].contiguous() for i in idx] if others is not None else None
        table, block_tensor, n_blocks = _table(dense, partners)
        partial = torch.empty(n_blocks, dtype=compute_dtype(dtype), device=device)
        _l2_sum((n_blocks,), table, block_tensor, dense[0], partial, ACC=acc_dtype(dtype), DOT=others is not None)
        sums.append(partial.sum(dtype=total_dtype))
    if not sums:  # every tensor is empty
        return torch.zeros((), dtype=out_dtype, device=device)
    total = sums[0] if len(sums) == 1 else torch.stack(sums).sum()
    return (total * weight_decay).to(out_dtype)


def l2_penalty_fwd(tensors: list[torch.Tensor], weight_decay: float, out_dtype: torch.dtype) -> torch.Tensor:
    return _sum(tensors, None, weight_decay, out_dtype)


def l2_penalty_dot(tensors: list[torch.Tensor], others: list[torch.Tensor], weight_decay: float,
                   out_dtype: torch.dtype) -> torch.Tensor:
    return _sum(tensors, others, weight_decay, out_dtype)


def l2_penalty_bwd(tensors: list[torch.Tensor], grad: torch.Tensor, weight_decay: float) -> list[torch.Tensor]:
    # coef = 2λ·g, in fp64 on the device (read by the kernel: no host sync)
    coef = grad.to(torch.float64) * (2.0 * weight_decay)
    out = []
    for dtype, group in dtype_groups(tensors).items():
        dw = torch.empty(sum(t.numel() for t in group), dtype=dtype, device=grad.device)
        dense = [t.contiguous() for t in group if t.numel()]
        if dense:
            table, block_tensor, n_blocks = _table(dense)
            _l2_scale((n_blocks,), table, block_tensor, dense[0], coef, dw, ACC=acc_dtype(dtype))
        out.append(dw)
    return out


# ----------------------------------------------------------------- ahead-of-time compiles
def aot_configs():
    """Every compile the launchers above get on a GPU (read by tests/aot.py, outside the interpreter)."""
    for t in FLOAT_TYPES:
        acc = "fp64" if t == "fp64" else "fp32"
        consts = {"ACC": tl.float64 if t == "fp64" else tl.float32}
        yield from _dropout.aot(t, consts, ints={"n": "i64", "p": "fp32", "scale_bits": "i64"},
                                pointers={"seed_ptr": "i64"})
        tables = {"table_ptr": "i64", "block_tensor_ptr": "i32"}
        for dot in (False, True):
            yield from _l2_sum.aot(t, {**consts, "DOT": dot}, pointers={**tables, "partial_ptr": acc})
        yield from _l2_scale.aot(t, consts, pointers={**tables, "coef_ptr": "fp64"})
