"""Triton kernel for the SGD step: one multi-tensor launch updates every parameter of a bucket.

A bucket is the parameters of one (device, dtype). Its launch reads three small device tensors:

* ``hyper`` (float64): weight decay, momentum, 1 - dampening and the gradient's sign
  (-1 when maximizing), uploaded once per distinct value and cached;
* ``lr`` (0-d, float64 from scratchops.optim): the learning rate, read on the device (a tensor
  learning rate needs no ``.item()``), rounded in the kernel to the compute type as torch rounds it;
* ``meta`` (int64), column by column for the T tensors: the raw addresses of the
  parameters, of their gradients and of their momentum buffers, their element counts,
  a flag set where the buffer is new (b ← g rather than b ← μ b + (1-τ) g), then one
  work item per program, ``(tensor index << WORK_SHIFT) | chunk index``.

A program turns the addresses back into typed pointers (``int64 -> pointer``), so one
launch reaches tensors scattered anywhere in memory, on the GPU and in the interpreter
alike (CPU tensors have real addresses). Each program updates one chunk of
``CHUNK_BLOCKS * BLOCK`` elements of one tensor, in ``BLOCK``-sized steps.

:class:`StepPlan` is one bucket's launch, built once: the columns that do not change from
step to step (sizes, flags, work items) are kept, and the address columns are uploaded
again only when an address changes. ``scratchops.optim.SGD`` keeps its plans across
steps; the ``sgd_step`` launcher (the custom op's path) builds them per call.

Math runs in the ACC dtype (fp64 for fp64 tensors, fp32 otherwise); parameters and
momentum buffers are loaded and stored in their dtype; the update uses the buffer as
stored (rounded to its dtype), as torch's does.
"""
import functools
import itertools
import operator

import torch
import triton
import triton.language as tl

from ._launch import (ALIGN_BYTES, FLOAT_TYPES, Kernel, acc_dtype, cdiv, config, is_dense, same_layout,
                      table_columns)

# meta columns (each T long), then the work items
COL_PARAM, COL_GRAD, COL_BUF, COL_NUMEL, COL_FRESH, COL_WORK = table_columns(6)
WORK_SHIFT = tl.constexpr(32)  # a work item is (tensor index << WORK_SHIFT) | chunk index
WORK_CHUNK = tl.constexpr((1 << 32) - 1)  # its chunk-index bits
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}
# hyper entries
HYPER_WEIGHT_DECAY, HYPER_MOMENTUM, HYPER_UNDAMPED, HYPER_SIGN = table_columns(4)


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
def _sgd_step_kernel(hyper_ptr, lr_ptr, meta_ptr,  # pointers: fp64 [λ, μ, 1 - τ, sign], fp64 0-d η, int64 table
                     n_tensors,  # sizes: T, the length of each meta column
                     HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                     ALIGNED: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                     CHUNK_BLOCKS: tl.constexpr):
    work = tl.load(meta_ptr + COL_WORK * n_tensors + tl.program_id(0))
    t = work >> WORK_SHIFT
    chunk = work & WORK_CHUNK
    w_ptr = tl.load(meta_ptr + COL_PARAM * n_tensors + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(meta_ptr + COL_GRAD * n_tensors + t).to(tl.pointer_type(DTYPE))
    b_ptr = tl.load(meta_ptr + COL_BUF * n_tensors + t).to(tl.pointer_type(DTYPE))
    numel = tl.load(meta_ptr + COL_NUMEL * n_tensors + t)
    fresh = tl.load(meta_ptr + COL_FRESH * n_tensors + t)
    b_numel = numel * (1 - fresh)  # a fresh buffer is never read

    lr = tl.load(lr_ptr).to(ACC)
    weight_decay = tl.load(hyper_ptr + HYPER_WEIGHT_DECAY).to(ACC)
    momentum = tl.load(hyper_ptr + HYPER_MOMENTUM).to(ACC)
    undamped = tl.load(hyper_ptr + HYPER_UNDAMPED).to(ACC)
    sign = tl.load(hyper_ptr + HYPER_SIGN).to(ACC)

    if ALIGNED:  # every address is a multiple of ALIGN_BYTES: full blocks load and store in wide vectors
        w_ptr = tl.multiple_of(w_ptr, ALIGN_BYTES)
        g_ptr = tl.multiple_of(g_ptr, ALIGN_BYTES)
        b_ptr = tl.multiple_of(b_ptr, ALIGN_BYTES)
    start = chunk * (CHUNK_BLOCKS * BLOCK)
    # a constant trip count (triton 3.6's interpreter cannot take a loaded value as a loop bound); blocks past the
    # tensor's end do nothing
    for i in range(0, CHUNK_BLOCKS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        if start + (i + 1) * BLOCK <= numel:  # a full block: no masks (a fresh buffer's load is discarded)
            _sgd_update(w_ptr, g_ptr, b_ptr, offs, None, None, fresh, lr, weight_decay, momentum, undamped,
                        sign, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, DTYPE, ACC)
        elif start + i * BLOCK < numel:  # the tensor's last, partial block; a fresh buffer is not read
            _sgd_update(w_ptr, g_ptr, b_ptr, offs, offs < numel, offs < b_numel, fresh, lr, weight_decay,
                        momentum, undamped, sign, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, DTYPE, ACC)


_step = Kernel(_sgd_step_kernel, [config(num_warps=4, BLOCK=1024, CHUNK_BLOCKS=8)])
BLOCK = _step.configs["default"][0].kwargs["BLOCK"]
CHUNK = BLOCK * _step.configs["default"][0].kwargs["CHUNK_BLOCKS"]  # elements per program


# ----------------------------------------------------------------- device-side constants
# A training loop steps with the same options: their device copies are cached (keys hold numbers only).
_CONSTANTS: dict = {}
CACHE_ENTRIES = 16


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _to_device(torch.tensor(values, dtype=dtype), device)


def hyper_tensor(weight_decay: float, momentum: float, dampening: float, maximize: bool, device) -> torch.Tensor:
    """λ, μ, 1 - τ and the gradient's sign as a float64 tensor on ``device``, uploaded once per distinct value."""
    key = (device, weight_decay, momentum, dampening, maximize)
    hit = _CONSTANTS.get(key)
    if hit is None:
        if len(_CONSTANTS) >= CACHE_ENTRIES:
            _evict(_CONSTANTS)
        values = [weight_decay, momentum, 1.0 - dampening, -1.0 if maximize else 1.0]
        hit = _CONSTANTS[key] = _upload(values, torch.float64, device)
    return hit


# ----------------------------------------------------------------- plans
class StepPlan:
    """One bucket's launch: contiguous parameters of one device and dtype, their gradients (contiguous, of
    that dtype) and momentum buffers. Everything but the gradients' addresses is fixed (the parameters' and
    buffers' addresses, sizes, fresh flags, work items); :meth:`launch` takes the gradients' addresses and
    builds and uploads the table only when they differ from the last launch's."""

    def __init__(self, numels: list[int], fresh: list[bool], dtype: torch.dtype, device: torch.device,
                 has_momentum: bool, param_addresses: list[int], buffer_addresses: list[int]):
        self.n, self.dtype, self.device, self.has_momentum = len(numels), dtype, device, has_momentum
        work = [(t << WORK_SHIFT.value) + c for t, numel in enumerate(numels) for c in range(cdiv(numel, CHUNK))]
        self.n_programs = len(work)
        self.head = torch.tensor(param_addresses, dtype=torch.int64)
        self.tail = torch.tensor(buffer_addresses + numels + [int(has_momentum and f) for f in fresh] + work,
                                 dtype=torch.int64)
        self.fixed_bits = functools.reduce(operator.or_, param_addresses + buffer_addresses, 0)
        self.table = (None, None, False)  # (gradient addresses, device table, all aligned): replaced as one value

    def launch(self, grad_addresses: list[int], lr: torch.Tensor, hyper: torch.Tensor, weight_decay: float,
               nesterov: bool) -> None:
        """One launch. Safe from several threads: a launch uses the table it read or built, never another's."""
        if not self.n_programs:  # only empty tensors
            return
        table = self.table
        if grad_addresses != table[0]:
            host = torch.cat([self.head, torch.tensor(grad_addresses, dtype=torch.int64), self.tail])
            aligned = (functools.reduce(operator.or_, grad_addresses, self.fixed_bits) % ALIGN_BYTES.value) == 0
            self.table = table = (grad_addresses, _to_device(host, self.device), aligned)
        _step((self.n_programs,), hyper, lr, table[1], self.n,
              HAS_WEIGHT_DECAY=weight_decay != 0, HAS_MOMENTUM=self.has_momentum,
              NESTEROV=bool(nesterov and self.has_momentum), ALIGNED=table[2], DTYPE=TL_DTYPES[self.dtype],
              ACC=acc_dtype(self.dtype))


def _evict(cache: dict) -> None:
    """Make room in a small cache (oldest entry first); another thread may be evicting too."""
    try:
        cache.pop(next(iter(cache)), None)
    except (StopIteration, RuntimeError):
        pass


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


_PLANS: dict = {}  # the sgd_step launcher's plans, by everything but the gradients' addresses


def sgd_step(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
             fresh: list[bool], lr: torch.Tensor, weight_decay: float, momentum: float, dampening: float,
             nesterov: bool, maximize: bool) -> None:
    """Update ``params`` (and ``momentum_buffers`` when μ ≠ 0) in place: one launch per (device, dtype).

    Gradients of another dtype are read through a copy in the parameter's dtype; operands that are not
    dense, or whose layouts differ from their parameter's, through dense copies written back after the launch.
    """
    has_momentum = momentum != 0
    buckets: dict = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    for (device, dtype), idx in buckets.items():
        columns, write_back, keep = ([], [], []), [], []  # keep: the copies whose addresses are in the table
        for i in idx:
            w, g = params[i], grads[i]
            g = g if g.dtype == dtype else g.to(dtype)
            b = momentum_buffers[i] if has_momentum else w  # w stands in for an absent buffer: never touched
            if not (w.is_contiguous() and g.is_contiguous() and b.is_contiguous()):
                w, g, b = _operands(w, g, b, write_back)
            keep.append((w, g, b))
            for column, t in zip(columns, (w, g, b)):
                column.append(t.data_ptr())
        numels, flags = [params[i].numel() for i in idx], [has_momentum and fresh[i] for i in idx]
        key = (device, dtype, has_momentum, tuple(numels), tuple(flags), tuple(columns[0]), tuple(columns[2]))
        plan = _PLANS.get(key) or StepPlan(numels, flags, dtype, device, has_momentum, columns[0], columns[2])
        if len(_PLANS) >= CACHE_ENTRIES:
            _evict(_PLANS)
        _PLANS[key] = plan
        plan.launch(columns[1], lr if lr.device == device else lr.to(device),
                    hyper_tensor(weight_decay, momentum, dampening, maximize, device), weight_decay, nesterov)
        for dst, src in write_back:
            dst.copy_(src)
        del keep


# ----------------------------------------------------------------- ahead-of-time compiles
def aot_configs():
    """Every compile the launcher makes: each dtype, with and without weight decay, momentum or Nesterov
    momentum, aligned or not (read by tests/aot.py, outside the interpreter)."""
    modes = [(False, False), (True, False), (True, True)]  # (HAS_MOMENTUM, NESTEROV)
    for t, has_wd, (has_momentum, nesterov), aligned in itertools.product(FLOAT_TYPES, (False, True), modes,
                                                                           (False, True)):
        dtype = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32, "fp64": tl.float64}[t]
        consts = {"HAS_WEIGHT_DECAY": has_wd, "HAS_MOMENTUM": has_momentum, "NESTEROV": nesterov, "ALIGNED": aligned,
                  "DTYPE": dtype, "ACC": tl.float64 if t == "fp64" else tl.float32}
        yield from _step.aot(t, consts, pointers={"hyper_ptr": "fp64", "lr_ptr": "fp64", "meta_ptr": "i64"})
