"""Triton kernel for the SGD step: one multi-tensor launch updates every parameter of a group.

The launcher packs, into one int64 ``meta`` tensor copied to the device once per
launch,

* ``HYPER_SLOTS`` hyperparameters as float64 bit patterns: lr, weight decay,
  momentum, 1 - dampening and the gradient's sign (-1 when maximizing);
* one row of ``TABLE_COLS`` per tensor: the raw addresses of the parameter, its
  gradient and its momentum buffer, its element count, and a flag set when its
  momentum buffer is new (first step: b ← g rather than b ← μ b + (1-τ) g);
* one work item per program: ``(tensor index << 32) | chunk index``.

A program turns the addresses back into typed pointers (``int64 -> pointer``),
so a single launch reaches tensors scattered anywhere in memory. This works on
the GPU and in Triton's interpreter alike (CPU tensors have real addresses), so
there is one code path in both modes. Each program updates one chunk of
``CHUNK_BLOCKS * BLOCK`` elements of one tensor, in ``BLOCK``-sized steps.

Math runs in fp32 (fp64 for fp64 tensors); parameters and momentum buffers are
loaded and stored in their dtype; the update uses the buffer as stored (rounded
to its dtype), as torch's does.
"""
import torch
import triton
import triton.language as tl

from triton_kernels._launch import FLOAT_DTYPE_NAMES, is_dense, same_layout

BLOCK = 1024
NUM_WARPS = 4
CHUNK_BLOCKS = 8  # blocks per program: a chunk is CHUNK_BLOCKS * BLOCK elements of one tensor
CHUNK = CHUNK_BLOCKS * BLOCK
HYPER_SLOTS = 5  # lr, weight_decay, momentum, 1 - dampening, gradient sign
TABLE_COLS = 5  # param address, grad address, buffer address, numel, fresh-buffer flag
WORK_SHIFT = 32  # a work item is (tensor index << WORK_SHIFT) | chunk index
WORK_MASK = (1 << WORK_SHIFT) - 1
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


@triton.jit
def _hyper(meta_ptr, slot, ACC: tl.constexpr):
    """Hyperparameter ``slot``, stored as float64 bits, in the compute type (rounded as torch rounds scalars)."""
    return tl.load(meta_ptr + slot).to(tl.float64, bitcast=True).to(ACC)


@triton.jit
def _sgd_step_kernel(meta_ptr, n_tensors, HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                     NESTEROV: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                     CHUNK_BLOCKS: tl.constexpr, HYPER_SLOTS: tl.constexpr, TABLE_COLS: tl.constexpr,
                     WORK_SHIFT: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if DTYPE == tl.float64 else tl.float32
    work = tl.load(meta_ptr + HYPER_SLOTS + n_tensors * TABLE_COLS + tl.program_id(0))
    t = work >> WORK_SHIFT
    chunk = work & ((1 << WORK_SHIFT) - 1)
    row = meta_ptr + HYPER_SLOTS + t * TABLE_COLS
    w_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    b_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE))
    numel = tl.load(row + 3)
    fresh = tl.load(row + 4)
    b_numel = numel * (1 - fresh)  # a fresh buffer is never read

    lr = _hyper(meta_ptr, 0, ACC)
    weight_decay = _hyper(meta_ptr, 1, ACC)
    momentum = _hyper(meta_ptr, 2, ACC)
    undamped = _hyper(meta_ptr, 3, ACC)
    sign = _hyper(meta_ptr, 4, ACC)

    start = chunk * (CHUNK_BLOCKS * BLOCK)
    n_blocks = tl.minimum(tl.cdiv(numel - start, BLOCK), CHUNK_BLOCKS)
    for i in range(0, n_blocks):
        offs = start + i * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < numel
        w = tl.load(w_ptr + offs, mask=mask).to(ACC)
        # g ← ±∇ (sign = -1 when maximizing); g ← g + λ w
        g = sign * tl.load(g_ptr + offs, mask=mask).to(ACC)
        if HAS_WEIGHT_DECAY:
            g = g + weight_decay * w
        if HAS_MOMENTUM:
            # b ← g on the first step, else b ← μ b + (1 - τ) g; stored in the parameter's dtype
            b = tl.load(b_ptr + offs, mask=offs < b_numel).to(ACC)
            b = tl.where(fresh != 0, g, momentum * b + undamped * g).to(DTYPE)
            tl.store(b_ptr + offs, b, mask=mask)
            if NESTEROV:
                g = g + momentum * b.to(ACC)  # g ← g + μ b
            else:
                g = b.to(ACC)  # g ← b
        # w ← w - η g
        tl.store(w_ptr + offs, (w - lr * g).to(DTYPE), mask=mask)


def _dense_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` laid out element for element as ``like`` (``t`` itself when it already is)."""
    return same_layout(t, like)


def sgd_step(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
             fresh: list[bool], lr: float, weight_decay: float, momentum: float, dampening: float,
             nesterov: bool, maximize: bool) -> None:
    """Update ``params`` (and ``momentum_buffers`` when momentum ≠ 0) in place: one launch per (device, dtype).

    Operands that are not dense, or whose layouts differ from their parameter's,
    go through dense copies that are written back after the launch.
    """
    has_momentum = momentum != 0
    buckets: dict = {}
    for i, p in enumerate(params):
        if p.numel():
            buckets.setdefault((p.device, p.dtype), []).append(i)
    for (device, dtype), idx in buckets.items():
        rows, write_back = [], []
        keep = []  # every tensor whose address is in the table stays alive until the launch is queued
        for i in idx:
            w = params[i] if is_dense(params[i]) else params[i].contiguous()
            if w is not params[i]:
                write_back.append((params[i], w))
            g = _dense_view(grads[i], w)
            b = w  # placeholder address when there is no momentum: never read nor written
            if has_momentum:
                b = _dense_view(momentum_buffers[i], w)
                if b is not momentum_buffers[i]:
                    write_back.append((momentum_buffers[i], b))
            keep += [w, g, b]
            rows.append((w.data_ptr(), g.data_ptr(), b.data_ptr(), w.numel(), int(has_momentum and fresh[i])))
        _launch(rows, device, dtype, lr, weight_decay, momentum, dampening, nesterov, maximize)
        for dst, src in write_back:
            dst.copy_(src)
        del keep


def _launch(rows, device, dtype, lr, weight_decay, momentum, dampening, nesterov, maximize):
    table = torch.tensor(rows, dtype=torch.int64)
    chunks = (table[:, 3] + CHUNK - 1) // CHUNK
    tensor_index = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int64), chunks)
    first_item = torch.cumsum(chunks, 0) - chunks
    work = (tensor_index << WORK_SHIFT) | (torch.arange(len(tensor_index)) - first_item[tensor_index])
    hyper = torch.tensor([lr, weight_decay, momentum, 1.0 - dampening, -1.0 if maximize else 1.0],
                         dtype=torch.float64).view(torch.int64)
    meta = torch.cat([hyper, table.flatten(), work])
    if device.type != "cpu":
        meta = meta.pin_memory().to(device, non_blocking=True)
    _sgd_step_kernel[(len(work),)](meta, len(rows), HAS_WEIGHT_DECAY=weight_decay != 0,
                                   HAS_MOMENTUM=momentum != 0, NESTEROV=bool(nesterov and momentum != 0),
                                   DTYPE=TL_DTYPES[dtype], BLOCK=BLOCK, CHUNK_BLOCKS=CHUNK_BLOCKS,
                                   HYPER_SLOTS=HYPER_SLOTS, TABLE_COLS=TABLE_COLS, WORK_SHIFT=WORK_SHIFT,
                                   num_warps=NUM_WARPS)


def _configs():
    modes = [(False, False), (True, False), (True, True)]  # (HAS_MOMENTUM, NESTEROV)
    for name in FLOAT_DTYPE_NAMES:
        for has_wd in (False, True):
            for has_momentum, nesterov in modes:
                constexprs = {"HAS_WEIGHT_DECAY": has_wd, "HAS_MOMENTUM": has_momentum, "NESTEROV": nesterov,
                              "DTYPE": getattr(tl, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32",
                                                    "fp64": "float64"}[name]),
                              "BLOCK": BLOCK, "CHUNK_BLOCKS": CHUNK_BLOCKS, "HYPER_SLOTS": HYPER_SLOTS,
                              "TABLE_COLS": TABLE_COLS, "WORK_SHIFT": WORK_SHIFT}
                signature = {"meta_ptr": "*i64", "n_tensors": "i32", **{k: "constexpr" for k in constexprs}}
                yield _sgd_step_kernel, signature, constexprs, NUM_WARPS


# Every (kernel, signature, constexprs, num_warps) the launcher launches with.
AOT_CONFIGS = list(_configs())
