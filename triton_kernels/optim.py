"""Triton kernel for the SGD step: one multi-tensor launch updates every parameter of a group.

The launcher hands the kernel two small tensors, uploaded to the device only when
they change (they are cached, so a training loop's steps upload nothing):

* ``hyper`` (float64): lr, weight decay, momentum, 1 - dampening and the
  gradient's sign (-1 when maximizing), rounded in the kernel to the compute
  type as torch rounds its scalars;
* ``meta`` (int64): one row of ``TABLE_COLS`` per tensor (the raw addresses of
  the parameter, its gradient and its momentum buffer, its element count, and a
  flag set when its momentum buffer is new: b ← g rather than b ← μ b + (1-τ) g),
  then one work item per program: ``(tensor index << WORK_SHIFT) | chunk index``.

A program turns the addresses back into typed pointers (``int64 -> pointer``),
so a single launch reaches tensors scattered anywhere in memory. This works on
the GPU and in Triton's interpreter alike (CPU tensors have real addresses), so
there is one code path in both modes. Each program updates one chunk of
``CHUNK_BLOCKS * BLOCK`` elements of one tensor, in ``BLOCK``-sized steps.

Math runs in fp32 (fp64 for fp64 tensors); parameters and momentum buffers are
loaded and stored in their dtype; the update uses the buffer as stored (rounded
to its dtype), as torch's does.
"""
import itertools

import torch
import triton
import triton.language as tl

from ._launch import is_dense, same_layout

BLOCK = 1024
NUM_WARPS = 4
CHUNK_BLOCKS = 8  # blocks per program: a chunk is CHUNK_BLOCKS * BLOCK elements of one tensor
CHUNK = CHUNK_BLOCKS * BLOCK
TABLE_COLS = 5  # param address, grad address, buffer address, numel, fresh-buffer flag
WORK_SHIFT = 32  # a work item is (tensor index << WORK_SHIFT) | chunk index
ALIGN_BYTES = 16  # addresses all multiples of this take the vectorized variant of the kernel
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


@triton.jit
def _sgd_update(w_ptr, g_ptr, b_ptr, offs, mask, b_mask, fresh, lr, weight_decay, momentum, undamped, sign,
                HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                DTYPE: tl.constexpr, ACC: tl.constexpr):
    """The update of one block of elements ``offs`` (``mask``/``b_mask`` None for a full block)."""
    w = tl.load(w_ptr + offs, mask=mask).to(ACC)
    # g ← ±∇ (sign = -1 when maximizing); g ← g + λ w
    g = sign * tl.load(g_ptr + offs, mask=mask).to(ACC)
    if HAS_WEIGHT_DECAY:
        g = g + weight_decay * w
    if HAS_MOMENTUM:
        # b ← g on the first step, else b ← μ b + (1 - τ) g; stored in the parameter's dtype
        b = tl.load(b_ptr + offs, mask=b_mask).to(ACC)
        b = tl.where(fresh != 0, g, momentum * b + undamped * g).to(DTYPE)
        tl.store(b_ptr + offs, b, mask=mask)
        if NESTEROV:
            g = g + momentum * b.to(ACC)  # g ← g + μ b
        else:
            g = b.to(ACC)  # g ← b
    # w ← w - η g
    tl.store(w_ptr + offs, (w - lr * g).to(DTYPE), mask=mask)


@triton.jit
def _sgd_step_kernel(hyper_ptr, meta_ptr, n_tensors, HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                     NESTEROV: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                     CHUNK_BLOCKS: tl.constexpr, TABLE_COLS: tl.constexpr, WORK_SHIFT: tl.constexpr,
                     ALIGN_BYTES: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if DTYPE == tl.float64 else tl.float32
    work = tl.load(meta_ptr + n_tensors * TABLE_COLS + tl.program_id(0))
    t = work >> WORK_SHIFT
    chunk = work & ((1 << WORK_SHIFT) - 1)
    row = meta_ptr + t * TABLE_COLS
    w_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    b_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE))
    numel = tl.load(row + 3)
    fresh = tl.load(row + 4)
    b_numel = numel * (1 - fresh)  # a fresh buffer is never read

    lr = tl.load(hyper_ptr).to(ACC)
    weight_decay = tl.load(hyper_ptr + 1).to(ACC)
    momentum = tl.load(hyper_ptr + 2).to(ACC)
    undamped = tl.load(hyper_ptr + 3).to(ACC)
    sign = tl.load(hyper_ptr + 4).to(ACC)

    if ALIGNED:  # every address is a multiple of ALIGN_BYTES: full blocks load and store in wide vectors
        w_ptr = tl.multiple_of(w_ptr, ALIGN_BYTES)
        g_ptr = tl.multiple_of(g_ptr, ALIGN_BYTES)
        b_ptr = tl.multiple_of(b_ptr, ALIGN_BYTES)
    start = chunk * (CHUNK_BLOCKS * BLOCK)
    n_blocks = tl.minimum(tl.cdiv(numel - start, BLOCK), CHUNK_BLOCKS)
    for i in range(0, n_blocks):
        offs = start + i * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        if start + (i + 1) * BLOCK <= numel:  # a full block: no masks (a fresh buffer's load is discarded)
            _sgd_update(w_ptr, g_ptr, b_ptr, offs, None, None, fresh, lr, weight_decay, momentum, undamped,
                        sign, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, DTYPE, ACC)
        else:  # the tensor's last, partial block; a fresh buffer is not read
            _sgd_update(w_ptr, g_ptr, b_ptr, offs, offs < numel, offs < b_numel, fresh, lr, weight_decay,
                        momentum, undamped, sign, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, DTYPE, ACC)


def _operands(w: torch.Tensor, g: torch.Tensor, b: torch.Tensor, write_back: list):
    """Dense operands laid out element for element alike, for operands that are not all contiguous.

    Dense copies where needed; ``write_back`` gets (tensor, copy) for the ones the kernel writes.
    """
    dense = w if is_dense(w) else w.contiguous()
    if dense is not w:
        write_back.append((w, dense))
    b_dense = dense if b is w else same_layout(b, dense)
    if b_dense is not b and b is not w:
        write_back.append((b, b_dense))
    return dense, same_layout(g, dense), b_dense


def sgd_step(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
             fresh: list[bool], lr: float, weight_decay: float, momentum: float, dampening: float,
             nesterov: bool, maximize: bool) -> None:
    """Update ``params`` (and ``momentum_buffers`` when μ ≠ 0) in place: one launch per (device, dtype).

    Operands that are not dense, or whose layouts differ from their parameter's,
    go through dense copies that are written back after the launch.
    """
    has_momentum = momentum != 0
    buckets: dict = {}
    for i, p in enumerate(params):  # empty tensors get no work items: their addresses are never used
        buckets.setdefault((p.device, p.dtype), []).append(i)
    hyper = (lr, weight_decay, momentum, 1.0 - dampening, -1.0 if maximize else 1.0)
    for (device, dtype), idx in buckets.items():
        rows, write_back, keep = [], [], []  # keep: the operands (copies included) whose addresses are in the table
        addresses = 0  # the OR of every address: its low bits say whether all are aligned
        for i in idx:
            w, g = params[i], grads[i]
            b = momentum_buffers[i] if has_momentum else w  # w stands in for an absent buffer: never touched
            if not (w.is_contiguous() and g.is_contiguous() and b.is_contiguous()):
                w, g, b = _operands(w, g, b, write_back)
                keep.append((w, g, b))
            w_at, g_at, b_at = w.data_ptr(), g.data_ptr(), b.data_ptr()
            addresses |= w_at | g_at | b_at
            rows += (w_at, g_at, b_at, w.numel(), int(has_momentum and fresh[i]))
        meta, n_programs = _meta(tuple(rows), device)
        if not n_programs:  # only empty tensors
            continue
        _sgd_step_kernel[(n_programs,)](_hyper_tensor(hyper, device), meta, len(idx),
                                        HAS_WEIGHT_DECAY=weight_decay != 0, HAS_MOMENTUM=has_momentum,
                                        NESTEROV=bool(nesterov and has_momentum), DTYPE=TL_DTYPES[dtype],
                                        ALIGNED=addresses % ALIGN_BYTES == 0, BLOCK=BLOCK, CHUNK_BLOCKS=CHUNK_BLOCKS,
                                        TABLE_COLS=TABLE_COLS, WORK_SHIFT=WORK_SHIFT, ALIGN_BYTES=ALIGN_BYTES,
                                        num_warps=NUM_WARPS)
        for dst, src in write_back:
            dst.copy_(src)
        del keep


# The device copies of recent tables and hyperparameters: a training loop steps the same
# tensors (same addresses) with the same options, so a step usually uploads nothing.
# Keys hold addresses only (no tensors); an equal key means an identical table.
_META_CACHE: dict = {}
_HYPER_CACHE: dict = {}
CACHE_ENTRIES = 16


def _remember(cache: dict, key, value):
    if len(cache) >= CACHE_ENTRIES:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def _upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _meta(rows: tuple, device: torch.device):
    """The per-tensor table followed by one work item per program (see the module docstring), on ``device``."""
    key = (device, rows)
    hit = _META_CACHE.get(key)
    if hit is not None:
        return hit
    work = []
    for t in range(len(rows) // TABLE_COLS):
        first = t << WORK_SHIFT
        work.extend(range(first, first + triton.cdiv(rows[t * TABLE_COLS + 3], CHUNK)))
    return _remember(_META_CACHE, key, (_upload(list(rows) + work, torch.int64, device), len(work)))


def _hyper_tensor(hyper: tuple, device: torch.device) -> torch.Tensor:
    """lr, λ, μ, 1 - τ and the gradient's sign on ``device``, in float64 (fp64 parameters need every bit)."""
    key = (device, hyper)
    hit = _HYPER_CACHE.get(key)
    return hit if hit is not None else _remember(_HYPER_CACHE, key, _upload(list(hyper), torch.float64, device))


def _configs():
    modes = [(False, False), (True, False), (True, True)]  # (HAS_MOMENTUM, NESTEROV)
    for dtype, has_wd, (has_momentum, nesterov), aligned in itertools.product(
            TL_DTYPES.values(), (False, True), modes, (False, True)):
        constexprs = {"HAS_WEIGHT_DECAY": has_wd, "HAS_MOMENTUM": has_momentum, "NESTEROV": nesterov, "DTYPE": dtype,
                      "ALIGNED": aligned, "BLOCK": BLOCK, "CHUNK_BLOCKS": CHUNK_BLOCKS, "TABLE_COLS": TABLE_COLS,
                      "WORK_SHIFT": WORK_SHIFT, "ALIGN_BYTES": ALIGN_BYTES}
        signature = {"hyper_ptr": "*fp64", "meta_ptr": "*i64", "n_tensors": "i32",
                     **{k: "constexpr" for k in constexprs}}
        yield _sgd_step_kernel, signature, constexprs, NUM_WARPS


# Every (kernel, signature, constexprs, num_warps) the launcher launches with: each dtype, with and
# without weight decay, momentum or Nesterov momentum, aligned or not.
AOT_CONFIGS = list(_configs())
