"""Triton kernels for softmax and log-softmax along one dim of a strided tensor.

The launchers see the tensor as a (rows, N) matrix with N the size of ``dim``. A row r splits into (outer, inner) =
(r // n_inner, r % n_inner), "outer" collapsing the dims before ``dim`` and "inner" the dims after it; an element
sits at ``outer * stride_<t>o + inner * stride_<t>i + col * stride_<t>n``. Each operand has its own three strides,
so a transposed, sliced or expanded (zero-stride) tensor needs no copy as long as the dims before ``dim`` form one
arithmetic progression and so do the dims after it; otherwise the launcher copies that operand contiguous explicitly
(``_as_rows``). Outputs are contiguous, as torch's. ``IS_LOG`` picks log-softmax.

Two kernels, ``_softmax_fwd_kernel`` and ``_softmax_bwd_kernel``, each with two bodies (the ``LOOPED`` constexpr);
the host's :class:`Plan` (:func:`_plan`) picks one from the row length, the dtype and the GPU:

* single block (``LOOPED=False``): a program holds BLOCK_M whole rows in registers, BLOCK_N = the first of 64, 256,
  1024, 4096, 16384, 32768, 65536 that holds N. Each operand is read once: forward: x held, m = max, s = Σ e^{x-m},
  then y written; log-softmax backward: dY held, Σ dY taken, then Y streamed in one half-row at a time, dX = dY -
  e^Y Σ dY; softmax backward: both held (dX = Y ⊙ (dY - Σ dY⊙Y) needs both after the sum). One CTA (1024 threads at
  32 warps, 64 registers each: the 256 KiB register file) holds 32768 values (ROW_ELEMENTS; fp64: 8192), so on one
  CTA a row is capped at 32768 columns and softmax's backward above 16384 holds Y and reads dY twice
  (``REREAD_DY``): two 128 KiB fp32 operands are the whole register file, and Triton has no explicit shared memory.
  There a backward row above cap / 2 takes a single block only with exactly BLOCK_N columns (``EVEN_N``: per-element
  masks would make it spill). On sm_90 with Triton >= 3.9 (``CLUSTERS``) a program is a thread-block cluster of
  ``num_ctas`` CTAs that splits the row between them (Triton reduces across them through distributed shared memory):
  each CTA holds at most 32768 forward or 2 x 16384 backward values, so rows of up to 65536 16/32-bit columns are
  read once, forward and backward (2 CTAs for a 65536-column forward, 4 for its backward). 16-bit rows do not go
  further on one CTA: the compiler widens the held row to fp32.
* looped (``LOOPED=True``): one row per program, LOOP_BLOCK_N columns a step, for longer rows. The forward keeps a
  running max m (from -inf) and a running sum s = Σ e^{x - m} (from 0), rescaled by e^{m_old - m_new} when the max
  grows (online softmax), then writes the row in a second sweep; the backward sums in a first sweep. They read their
  inputs twice.

Launch shapes come from one place, :func:`launch_config`, one :class:`Kernel` per (kernel, LOOPED, BLOCK_N, CTAs);
the host builds a launch once per (shape, dim, dtype, kind) (:func:`_launch`) and looks it up on later calls. The
interpreter and a GPU run the same plan (the interpreter ignores num_ctas); ``aot_configs()`` lists exactly the
shapes the default plan launches (:func:`launch_plans`). Special values, as torch: while the running max is -inf the
shift is 0 (no -inf - (-inf)); an all -inf row gives NaN (x - m = NaN); a NaN or +inf makes the row NaN.
"""
from __future__ import annotations

import collections
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_TYPES, Kernel, acc_dtype, cdiv, config, kept

ROW_ELEMENTS, ROW_ELEMENTS_FP64 = 32768, 8192  # the widest row one CTA holds (module docstring)
CLUSTER_ROW = 65536  # the widest row a cluster of CTAs holds (16- and 32-bit dtypes)
MAX_BLOCK_N = CLUSTER_ROW  # tests lower it to force the other kernels on short rows
MIN_BLOCK_N, BLOCK_N_STEP, FINE_LADDER, LOOP_BLOCK_N = 64, 4, 16384, 4096  # the BLOCK_N ladder; looped kernels' step
# Clusters: Triton spreads a program's tensors over num_ctas CTAs (reductions through distributed shared memory)
# from 3.9 on; 3.6 and 3.7 cannot compile a reduction across CTAs.
CLUSTERS = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 9)
TILE = 2048  # elements per program on short rows: BLOCK_M = TILE // BLOCK_N rows
ELEMENTS_PER_WARP, MIN_WARPS, MAX_WARPS = 256, 4, 32

# How many times each kernel variant was launched: tests read it to prove every branch ran.
BRANCHES: collections.Counter = collections.Counter()


# ----------------------------------------------------------------- kernels
@triton.jit
def _row_start(rows, n_inner, stride_o, stride_i):
    """Offset of each row's first element: rows split into (outer, inner) indices."""
    return (rows // n_inner) * stride_o + (rows % n_inner) * stride_i


@triton.jit
def _softmax_fwd_kernel(
        x_ptr, y_ptr,  # pointers
        n_rows, n_cols, n_inner,  # sizes
        stride_xo, stride_xi, stride_xn, stride_yo, stride_yi, stride_yn,  # strides
        IS_LOG: tl.constexpr, LOOPED: tl.constexpr, EVEN_N: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr):
    if LOOPED:  # one row a program, BLOCK_N columns a step (module docstring)
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + _row_start(row, n_inner, stride_xo, stride_xi)
        y_row = y_ptr + _row_start(row, n_inner, stride_yo, stride_yi)
        # Running max m (from -inf) and running sum s = Σ e^{x - m} (from 0), in ACC.
        m = tl.full((), -float("inf"), ACC)
        s = tl.full((), 0.0, ACC)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
            x = tl.load(x_row + cols * stride_xn, mask=cols < n_cols, other=-float("inf")).to(ACC)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            shift = tl.where(m_new == -float("inf"), 0.0, m_new)  # no -inf - (-inf) while the row is all -inf so far
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
            m = m_new
        log_s = tl.log(s)
        inv_s = 1.0 / s
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
            mask = cols < n_cols
            z = tl.load(x_row + cols * stride_xn, mask=mask, other=0.0).to(ACC) - m
            if IS_LOG:
                y = z - log_s
            else:
                y = tl.exp(z) * inv_s
            tl.store(y_row + cols * stride_yn, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:  # BLOCK_M whole rows a program
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        if EVEN_N:  # n_cols == BLOCK_N
            mask = row_mask[:, None]
        else:
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + _row_start(rows, n_inner, stride_xo, stride_xi)[:, None] + cols[None, :] * stride_xn,
                    mask=mask, other=-float("inf"))
        # m = max x (exact in any dtype); z = x - m; s = Σ e^z; softmax y = e^z / s, log-softmax y = z - log s.
        # Rows past the end get m = 0 and s = 1: nothing is stored for them, no 0/0 or log 0 is computed.
        m = tl.where(row_mask, tl.max(x, axis=1).to(ACC), 0.0)
        s = tl.where(row_mask, tl.sum(tl.exp(x.to(ACC) - m[:, None]), axis=1), 1.0)
        z = x.to(ACC) - m[:, None]
        if IS_LOG:
            y = z - tl.log(s)[:, None]
        else:
            y = tl.exp(z) * (1.0 / s)[:, None]
        y_offs = _row_start(rows, n_inner, stride_yo, stride_yi)[:, None] + cols[None, :] * stride_yn
        tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(
        y_ptr, dy_ptr, dx_ptr,  # pointers
        n_rows, n_cols, n_inner,  # sizes
        stride_yo, stride_yi, stride_yn, stride_dyo, stride_dyi, stride_dyn, stride_dxo, stride_dxi,
        stride_dxn,  # strides
        IS_LOG: tl.constexpr, LOOPED: tl.constexpr, REREAD_DY: tl.constexpr, EVEN_N: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if LOOPED:  # one row a program, BLOCK_N columns a step (module docstring)
        row = tl.program_id(0).to(tl.int64)
        y_row = y_ptr + _row_start(row, n_inner, stride_yo, stride_yi)
        dy_row = dy_ptr + _row_start(row, n_inner, stride_dyo, stride_dyi)
        dx_row = dx_ptr + _row_start(row, n_inner, stride_dxo, stride_dxi)
        # First sweep: per-lane partial sums of Σ dY⊙Y (softmax) or Σ dY (log-softmax), from 0 (masked lanes add 0).
        acc = tl.zeros([BLOCK_N], ACC)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
            mask = cols < n_cols
            dy = tl.load(dy_row + cols * stride_dyn, mask=mask, other=0.0).to(ACC)
            if IS_LOG:
                acc += dy
            else:
                acc += dy * tl.load(y_row + cols * stride_yn, mask=mask, other=0.0).to(ACC)
        total = tl.sum(acc, axis=0)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
            mask = cols < n_cols
            y = tl.load(y_row + cols * stride_yn, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dy_row + cols * stride_dyn, mask=mask, other=0.0).to(ACC)
            if IS_LOG:
                dx = dy - tl.exp(y) * total  # dX = dY - e^Y · Σ dY
            else:
                dx = y * (dy - total)  # dX = Y ⊙ (dY - Σ dY⊙Y)
            tl.store(dx_row + cols * stride_dxn, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:  # BLOCK_M whole rows a program
        # The row is handled as two halves (a, b) of BLOCK_N // 2 columns, so that what is streamed in after
        # the sum (Y for log-softmax, dY again for softmax with REREAD_DY) is live one half at a time.
        HALF: tl.constexpr = BLOCK_N // 2
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_a = tl.arange(0, HALF)
        cols_b = HALF + tl.arange(0, HALF)
        row_mask = (rows < n_rows)[:, None]
        if EVEN_N:  # n_cols == BLOCK_N: no column mask (per-element predicates would cost a 32K row its registers)
            mask_a = row_mask
            mask_b = row_mask
        else:
            mask_a = row_mask & (cols_a < n_cols)[None, :]
            mask_b = row_mask & (cols_b < n_cols)[None, :]
        y_a = y_ptr + _row_start(rows, n_inner, stride_yo, stride_yi)[:, None] + cols_a[None, :] * stride_yn
        y_b = y_ptr + _row_start(rows, n_inner, stride_yo, stride_yi)[:, None] + cols_b[None, :] * stride_yn
        dy_a = dy_ptr + _row_start(rows, n_inner, stride_dyo, stride_dyi)[:, None] + cols_a[None, :] * stride_dyn
        dy_b = dy_ptr + _row_start(rows, n_inner, stride_dyo, stride_dyi)[:, None] + cols_b[None, :] * stride_dyn
        dx_a = dx_ptr + _row_start(rows, n_inner, stride_dxo, stride_dxi)[:, None] + cols_a[None, :] * stride_dxn
        dx_b = dx_ptr + _row_start(rows, n_inner, stride_dxo, stride_dxi)[:, None] + cols_b[None, :] * stride_dxn
        if IS_LOG:
            # dX = dY - e^Y · Σ dY: dY held, Y read after the sum, one half at a time
            g_a = tl.load(dy_a, mask=mask_a, other=0.0)
            g_b = tl.load(dy_b, mask=mask_b, other=0.0)
            total = (tl.sum(g_a.to(ACC), axis=1) + tl.sum(g_b.to(ACC), axis=1))[:, None]
            p_a = tl.exp(tl.load(y_a, mask=mask_a, other=0.0).to(ACC))
            tl.store(dx_a, (g_a.to(ACC) - p_a * total).to(dx_ptr.dtype.element_ty), mask=mask_a)
            p_b = tl.exp(tl.load(y_b, mask=mask_b, other=0.0).to(ACC))
            tl.store(dx_b, (g_b.to(ACC) - p_b * total).to(dx_ptr.dtype.element_ty), mask=mask_b)
        else:
            # dX = Y ⊙ (dY - Σ dY⊙Y)
            p_a = tl.load(y_a, mask=mask_a, other=0.0)
            p_b = tl.load(y_b, mask=mask_b, other=0.0)
            if REREAD_DY:  # Y held; dY read for the sum, then again for dX, one half at a time
                total = tl.sum(tl.load(dy_a, mask=mask_a, other=0.0, eviction_policy="evict_last").to(ACC)
                               * p_a.to(ACC), axis=1)
                total += tl.sum(tl.load(dy_b, mask=mask_b, other=0.0, eviction_policy="evict_last").to(ACC)
                                * p_b.to(ACC), axis=1)
                g_a = tl.load(dy_a, mask=mask_a, other=0.0, eviction_policy="evict_first")
                tl.store(dx_a, (p_a.to(ACC) * (g_a.to(ACC) - total[:, None])).to(dx_ptr.dtype.element_ty), mask=mask_a)
                g_b = tl.load(dy_b, mask=mask_b, other=0.0, eviction_policy="evict_first")
                tl.store(dx_b, (p_b.to(ACC) * (g_b.to(ACC) - total[:, None])).to(dx_ptr.dtype.element_ty), mask=mask_b)
            else:
                g_a = tl.load(dy_a, mask=mask_a, other=0.0)
                g_b = tl.load(dy_b, mask=mask_b, other=0.0)
                total = (tl.sum(g_a.to(ACC) * p_a.to(ACC), axis=1) + tl.sum(g_b.to(ACC) * p_b.to(ACC), axis=1))[:, None]
                tl.store(dx_a, (p_a.to(ACC) * (g_a.to(ACC) - total)).to(dx_ptr.dtype.element_ty), mask=mask_a)
                tl.store(dx_b, (p_b.to(ACC) * (g_b.to(ACC) - total)).to(dx_ptr.dtype.element_ty), mask=mask_b)


# ----------------------------------------------------------------- launch policy (one place)
class Plan(NamedTuple):
    """How a row of N columns runs: LOOPED, BLOCK_N, EVEN_N, CTAs a program (a cluster) and REREAD_DY."""
    looped: bool
    block_n: int
    even: bool
    ctas: int = 1
    reread: bool = False


def launch_config(block_n: int, looped: bool, ctas: int = 1, per_warp: int = ELEMENTS_PER_WARP) -> triton.Config:
    """The launch shape of a BLOCK_N: rows per program (TILE elements a program on short rows, one row
    from 4096 columns on and in the looped kernels), warps (one per ``per_warp`` elements a CTA, 4 to 32), CTAs."""
    block_m = 1 if looped else max(1, TILE // block_n)
    warps = max(MIN_WARPS, min(MAX_WARPS, block_m * block_n // ctas // per_warp))
    return config(warps, 1, ctas, BLOCK_M=block_m, BLOCK_N=block_n)


_KERNELS: dict = {}
_CAPABILITY: dict = {}  # device index -> compute capability (major)


def _kernel(backward: bool, plan: Plan, dtype: torch.dtype) -> Kernel:
    """The Kernel of the forward or backward at this plan's shape (one config: the host has chosen it). A 16-bit
    backward takes half the warps, so that each thread's share of a half-row is 8 values: one 128-bit access."""
    per_warp = 2 * ELEMENTS_PER_WARP if backward and dtype.itemsize == 2 else ELEMENTS_PER_WARP
    key = backward, plan.looped, plan.block_n, plan.ctas, per_warp
    if key not in _KERNELS:
        fn = _softmax_bwd_kernel if backward else _softmax_fwd_kernel
        _KERNELS[key] = Kernel(fn, [launch_config(plan.block_n, plan.looped, plan.ctas, per_warp)])
    return _KERNELS[key]


def clusters(dtype: torch.dtype, device: torch.device | None = None) -> bool:
    """Whether rows may be spread over a thread-block cluster: CLUSTERS (the installed Triton compiles it), a
    16- or 32-bit dtype, and an sm_90+ CUDA ``device`` (None, CPU tensors in the interpreter: the sm_90 plan)."""
    if not CLUSTERS or dtype == torch.float64:
        return False
    if device is None or device.type != "cuda":
        return True
    if device.index not in _CAPABILITY:
        _CAPABILITY[device.index] = torch.cuda.get_device_capability(device)[0]
    return _CAPABILITY[device.index] >= 9


def row_cap(dtype: torch.dtype, cluster: bool = False) -> int:
    """The widest row the single-block kernels take for ``dtype`` (at most MAX_BLOCK_N)."""
    widest = ROW_ELEMENTS_FP64 if dtype == torch.float64 else CLUSTER_ROW if cluster else ROW_ELEMENTS
    return min(MAX_BLOCK_N, widest)


def _plan(n_cols: int, cap: int, backward: bool, cluster: bool = False) -> Plan:
    """The plan for rows of ``n_cols`` under the single-block cap ``cap``, on one CTA or a ``cluster`` (module
    docstring: BLOCK_N is the first rung that holds the row, or ``cap``; REREAD_DY, EVEN_N, CTAs)."""
    block_n = MIN_BLOCK_N
    while block_n < n_cols:
        block_n *= BLOCK_N_STEP if block_n < FINE_LADDER else 2
    if block_n > cap and triton.next_power_of_2(n_cols) <= cap:
        block_n = cap
    even = n_cols == block_n
    if block_n > cap or (backward and not cluster and 2 * block_n > cap and not even):
        return Plan(True, min(cap, LOOP_BLOCK_N), False)
    if cluster:
        return Plan(False, block_n, even, max(1, block_n * (2 if backward else 1) // ROW_ELEMENTS))
    return Plan(False, block_n, even, reread=backward and 2 * block_n > cap)


def _constexprs(is_log: bool, plan: Plan, backward: bool, dtype) -> dict:
    """The kernel's constexprs for a plan (log-softmax's backward streams Y: it never re-reads)."""
    consts = {"IS_LOG": is_log, "LOOPED": plan.looped, "EVEN_N": plan.even, "ACC": acc_dtype(dtype)}
    return {**consts, "REREAD_DY": plan.reread and not is_log} if backward else consts


# ----------------------------------------------------------------- row geometry
def _collapse(sizes, strides):
    """(size, stride) of a group of dims walked as one, or None when they are not one arithmetic progression."""
    pairs = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    if not pairs:
        return 1, 0
    size, stride = pairs[-1]
    for n, s in reversed(pairs[:-1]):
        if s != stride * size:
            return None
        size *= n
    return size, stride


def _rows_layout(t: torch.Tensor, dim: int):
    """(n_inner, stride_o, stride_i, stride_n) of ``t`` seen as rows along ``dim``, or None."""
    outer = _collapse(t.shape[:dim], t.stride()[:dim])
    inner = _collapse(t.shape[dim + 1:], t.stride()[dim + 1:])
    return None if outer is None or inner is None else (inner[0], outer[1], inner[1], t.stride(dim))


def _as_rows(t: torch.Tensor, dim: int, n_cols: int, n_inner: int):
    """``t`` and its row strides; an explicit contiguous copy when its layout has no (outer, inner, col) form."""
    if t.is_contiguous():  # the common case (every output): no stride walk
        return t, (n_cols * n_inner, 1, n_inner)
    layout = _rows_layout(t, dim)
    if layout is None:
        t = t.contiguous()
        layout = _rows_layout(t, dim)
    return t, layout[1:]


# ----------------------------------------------------------------- launchers
_LAUNCHES: dict = {}  # (shape, dim, dtype, CUDA device, is_log, backward, cap, CLUSTERS) -> _launch's tuple


def _launch(shape, dim: int, dtype: torch.dtype, device, is_log: bool, backward: bool):
    """(grid, sizes, one contiguous operand's row strides, Kernel, branch name, constexprs): once per key."""
    n_cols, n_inner = shape[dim], math.prod(shape[dim + 1:])
    n_rows, cluster = math.prod(shape) // n_cols, clusters(dtype, device)
    plan = _plan(n_cols, row_cap(dtype, cluster), backward, cluster)
    consts, kernel = _constexprs(is_log, plan, backward, dtype), _kernel(backward, plan, dtype)
    variant = "_looped" if plan.looped else "_reread" if consts.get("REREAD_DY") else ""
    branch = ("bwd" if backward else "fwd") + variant + (f"_x{plan.ctas}" if plan.ctas > 1 else "")
    grid = (cdiv(n_rows, kernel.configs["default"][0].kwargs["BLOCK_M"]),)
    return grid, (n_rows, n_cols, n_inner), (n_cols * n_inner, 1, n_inner), kernel, branch, consts


def _run(inputs, dim: int, is_log: bool, backward: bool) -> torch.Tensor:
    """The forward or backward over ``inputs`` (a contiguous output): the plan's kernel over each operand's rows."""
    out = torch.empty_like(inputs[0], memory_format=torch.contiguous_format)  # torch.empty(shape, ...): slower
    shape = out.shape
    if not shape:
        return _run([t.reshape(1) for t in inputs], 0, is_log, backward).reshape(())
    if not out.numel():
        return out
    dim %= len(shape)
    key = shape, dim, out.dtype, out.device if out.is_cuda else None, is_log, backward, MAX_BLOCK_N, CLUSTERS
    launch = _LAUNCHES.get(key) or kept(_LAUNCHES, 4096, key, _launch, *key[:6])  # a hit without a call (host time)
    grid, sizes, strides, kernel, branch, consts = launch
    rows = inputs + [out]
    if all([t.is_contiguous() for t in inputs]):
        strides = strides * len(rows)
    else:  # each operand's own row strides (or a contiguous copy)
        laid = [_as_rows(t, dim, sizes[1], sizes[2]) for t in rows]
        rows, strides = [t for t, _ in laid], [s for _, st in laid for s in st]
    BRANCHES[branch] += 1
    kernel(grid, *rows, *sizes, *strides, **consts)
    return out


# The launchers take the reference's arguments (tests lower MAX_BLOCK_N to force the other kernels on short rows).
def softmax_fwd(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _run([x], dim, False, False)


def softmax_bwd(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    return _run([y, dy], dim, False, True)


def log_softmax_fwd(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _run([x], dim, True, False)


def log_softmax_bwd(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    return _run([y, dy], dim, True, True)


# ----------------------------------------------------------------- ahead-of-time compiles
_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def launch_plans():
    """Every (dtype name, backward, Plan, constexprs) the default plan launches (clusters where CLUSTERS)."""
    for t in FLOAT_TYPES:
        dtype = _TORCH_DTYPES[t]
        cluster = clusters(dtype)  # the sm_90 plan
        cap = row_cap(dtype, cluster)
        rungs, r = {cap}, MIN_BLOCK_N
        while r < cap:
            rungs.add(r)
            r *= BLOCK_N_STEP if r < FINE_LADDER else 2
        cols = {c for r in rungs for c in (r - 1, r)} | {cap + 1}  # each rung ragged and exact; a looped row
        plans = {(backward, _plan(n, cap, backward, cluster)) for backward in (False, True) for n in cols}
        for backward, plan in sorted(plans):
            for is_log in (False, True):
                yield t, backward, plan, _constexprs(is_log, plan, backward, dtype)


def aot_configs():
    """The compile of every launch plan, as a contiguous last-dim launch gets it (unit column strides specialised)."""
    for t, backward, plan, consts in launch_plans():
        units = ("stride_yn", "stride_dyn", "stride_dxn") if backward else ("stride_xn", "stride_yn")
        yield from _kernel(backward, plan, _TORCH_DTYPES[t]).aot(t, {**consts, **{u: 1 for u in units}})
