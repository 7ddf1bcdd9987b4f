"""Triton kernels for softmax and log-softmax along one dim of a strided tensor.

The launchers see the tensor as a (rows, N) matrix with N the size of ``dim``. A row r splits into
(outer, inner) = (r // n_inner, r % n_inner), "outer" collapsing the dims before ``dim`` and "inner"
the dims after it; an element sits at ``outer * stride_<t>o + inner * stride_<t>i + col * stride_<t>n``.
Each operand has its own three strides, so a transposed, sliced or expanded (zero-stride) tensor
needs no copy as long as the dims before ``dim`` form one arithmetic progression and so do the dims
after it; otherwise the launcher copies that operand contiguous explicitly (``_as_rows``). Outputs
are contiguous, as torch's. ``IS_LOG`` picks log-softmax.

Kernels, chosen by the host (:func:`_plan`) from the row length and the dtype:

* single block (``_softmax_fwd_kernel`` / ``_softmax_bwd_kernel``): a program holds BLOCK_M whole rows
  in registers, BLOCK_N = the first of 64, 256, 1024, 4096, 16384 that holds N, or the cap: 32768
  columns (fp32, 16-bit: 32 values a thread at 32 warps), 8192 (fp64). Each operand is read once:

  - forward: x held, m = max, s = Σ e^{x-m}, then y written;
  - log-softmax backward: dY held, Σ dY taken, then Y streamed in, one half-row at a time:
    dX = dY - e^Y Σ dY;
  - softmax backward: dX = Y ⊙ (dY - Σ dY⊙Y) needs both operands after the sum: both held up to
    cap / 2 columns; above that (``REREAD_DY``) Y is held and dY read twice (for the sum, then for
    dX): two 128 KiB fp32 operands do not fit in an SM's 256 KiB register file beside the kernel's
    own registers, and Triton has no explicit shared memory.

  Above cap / 2 the backward holds so much that per-element column masks make it spill, so it runs
  a single block only for rows of exactly BLOCK_N columns (``EVEN_N``: no column mask); ragged rows
  there take the looped kernel. 65536 columns cannot be held: a 65536-column fp32 row is the whole
  register file, and 16-bit rows are widened to fp32 in registers (both spill on sm_90).

* looped (``_softmax_fwd_looped_kernel`` / ``_softmax_bwd_looped_kernel``): one row per program,
  LOOP_BLOCK_N columns a step, for longer rows. The forward keeps a running max m (from -inf) and a
  running sum s = Σ e^{x - m} (from 0), rescaled by e^{m_old - m_new} when the max grows (online
  softmax), then writes the row in a second sweep; the backward sums in a first sweep. They read
  their inputs twice.

Launch shapes come from one place, :func:`launch_config` (a ``triton.Config`` per BLOCK_N), wrapped
in one :class:`Kernel` per (kernel, BLOCK_N): the host picks the shape; the interpreter and a GPU run
the same one. ``aot_configs()`` lists exactly the shapes the default plan launches.

Special values, as torch: while the running max is -inf the shift is 0, so -inf entries add 0 (no
-inf - (-inf)); a row that is -inf everywhere ends with m = -inf and gives NaN (x - m = NaN), as
torch does; a NaN or +inf in a row makes the row NaN through the sum (inf - inf), as in torch.
"""
from __future__ import annotations

import collections
import functools
import math

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_TYPES, Kernel, acc_dtype, cdiv, config

ROW_ELEMENTS, ROW_ELEMENTS_FP64 = 32768, 8192  # the widest row a single-block program holds (module docstring)
MAX_BLOCK_N = ROW_ELEMENTS  # tests lower it to force the other kernels on short rows
MIN_BLOCK_N, BLOCK_N_STEP, LOOP_BLOCK_N = 64, 4, 4096  # the BLOCK_N ladder; the looped kernels' step
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
        IS_LOG: tl.constexpr, EVEN_N: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr):
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
        IS_LOG: tl.constexpr, REREAD_DY: tl.constexpr, EVEN_N: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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


@triton.jit
def _softmax_fwd_looped_kernel(
        x_ptr, y_ptr,  # pointers
        n_rows, n_cols, n_inner,  # sizes
        stride_xo, stride_xi, stride_xn, stride_yo, stride_yi, stride_yn,  # strides
        IS_LOG: tl.constexpr, EVEN_N: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr):
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


@triton.jit
def _softmax_bwd_looped_kernel(
        y_ptr, dy_ptr, dx_ptr,  # pointers
        n_rows, n_cols, n_inner,  # sizes
        stride_yo, stride_yi, stride_yn, stride_dyo, stride_dyi, stride_dyn, stride_dxo, stride_dxi,
        stride_dxn,  # strides
        IS_LOG: tl.constexpr, REREAD_DY: tl.constexpr, EVEN_N: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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


# ----------------------------------------------------------------- launch policy (one place)
def launch_config(block_n: int, looped: bool) -> triton.Config:
    """The launch shape of a BLOCK_N: rows per program (TILE elements a program on short rows, one row
    from 4096 columns on and in the looped kernels) and warps (one per 256 elements, 4 to 32)."""
    block_m = 1 if looped else max(1, TILE // block_n)
    warps = max(MIN_WARPS, min(MAX_WARPS, block_m * block_n // ELEMENTS_PER_WARP))
    return config(warps, 1, BLOCK_M=block_m, BLOCK_N=block_n)


_KERNELS: dict = {}


def _kernel(fn, block_n: int) -> Kernel:
    """The Kernel of ``fn`` at this BLOCK_N (one config: the host has chosen the shape)."""
    key = fn, block_n
    if key not in _KERNELS:
        looped = fn in (_softmax_fwd_looped_kernel, _softmax_bwd_looped_kernel)
        _KERNELS[key] = Kernel(fn, [launch_config(block_n, looped)])
    return _KERNELS[key]


def row_cap(dtype: torch.dtype) -> int:
    """The widest row the single-block kernels take for ``dtype`` (at most MAX_BLOCK_N)."""
    return min(MAX_BLOCK_N, ROW_ELEMENTS_FP64 if dtype == torch.float64 else ROW_ELEMENTS)


@functools.lru_cache(maxsize=1024)
def _plan(n_cols: int, cap: int, backward: bool):
    """(looped, BLOCK_N, EVEN_N) for rows of ``n_cols`` under the single-block cap ``cap``.

    BLOCK_N is the first of 64, 256, 1024, ... that holds the row, or ``cap`` itself. The backward holds
    more (two operands, or one and a stream): above cap / 2 it takes a single block only for rows of
    exactly BLOCK_N columns (no per-element masks, which would make it spill); other rows loop."""
    block_n = MIN_BLOCK_N
    while block_n < n_cols:
        block_n *= BLOCK_N_STEP
    if block_n > cap and triton.next_power_of_2(n_cols) <= cap:
        block_n = cap
    even = n_cols == block_n
    if block_n > cap or (backward and 2 * block_n > cap and not even):
        return True, min(cap, LOOP_BLOCK_N), False
    return False, block_n, even


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
    if outer is None or inner is None:
        return None
    return inner[0], outer[1], inner[1], t.stride(dim)


def _as_rows(t: torch.Tensor, dim: int, n_cols: int, n_inner: int):
    """``t`` and its row strides; an explicit contiguous copy when its layout has no (outer, inner, col) form."""
    if t.is_contiguous():  # the common case (every output): no stride walk
        return t, (n_cols * n_inner, 1, n_inner)
    layout = _rows_layout(t, dim)
    if layout is None:
        t = t.contiguous()
        layout = _rows_layout(t, dim)
    return t, layout[1:]


def _geometry(t: torch.Tensor, dim: int):
    """(n_rows, n_cols, n_inner) of ``t`` seen as rows along ``dim``."""
    n_cols, n_inner = t.shape[dim], 1 if dim == t.dim() - 1 else math.prod(t.shape[dim + 1:])
    return t.numel() // n_cols, n_cols, n_inner


# ----------------------------------------------------------------- launchers
def _launch(tensors, outputs, dim: int, is_log: bool, backward: bool):
    """Run the kernel the plan picks over ``tensors`` (inputs then outputs, all of one shape)."""
    n_rows, n_cols, n_inner = _geometry(outputs[0], dim)
    rows, strides = tensors + outputs, (n_cols * n_inner, 1, n_inner) * (len(tensors) + len(outputs))  # contiguous
    if not all([t.is_contiguous() for t in rows]):  # else each operand's own row strides (or a contiguous copy)
        laid = [_as_rows(t, dim, n_cols, n_inner) for t in rows]
        rows, strides = [t for t, _ in laid], [s for _, st in laid for s in st]
    kernel, block_m, branch, consts = _launch_plan(n_cols, row_cap(rows[-1].dtype), rows[-1].dtype, is_log, backward)
    BRANCHES[branch] += 1
    kernel((cdiv(n_rows, block_m),), *rows, n_rows, n_cols, n_inner, *strides, **consts)


@functools.lru_cache(maxsize=1024)
def _launch_plan(n_cols: int, cap: int, dtype: torch.dtype, is_log: bool, backward: bool):
    """(Kernel, BLOCK_M, branch name, constexprs) of a launch: built once per row length, cap, dtype and kind."""
    looped, block_n, even = _plan(n_cols, cap, backward)
    consts = {"IS_LOG": is_log, "EVEN_N": even, "ACC": acc_dtype(dtype)}
    if backward:
        consts["REREAD_DY"] = reread = not (is_log or looped or 2 * block_n <= cap)
        fn, branch = (_softmax_bwd_looped_kernel, "bwd_looped") if looped else (_softmax_bwd_kernel, "bwd_reread"
                                                                                 if reread else "bwd")
    else:
        fn, branch = (_softmax_fwd_looped_kernel, "fwd_looped") if looped else (_softmax_fwd_kernel, "fwd")
    kernel = _kernel(fn, block_n)
    return kernel, kernel.configs["default"][0].kwargs["BLOCK_M"], branch, consts


def _forward(x: torch.Tensor, dim: int, is_log: bool) -> torch.Tensor:
    if x.dim() == 0:
        return _forward(x.reshape(1), 0, is_log).reshape(())
    y = torch.empty_like(x, memory_format=torch.contiguous_format)  # torch.empty(x.shape, ...): slower host path
    if y.numel():
        _launch([x], [y], dim % x.dim(), is_log, backward=False)
    return y


def _backward(y: torch.Tensor, dy: torch.Tensor, dim: int, is_log: bool) -> torch.Tensor:
    if y.dim() == 0:
        return _backward(y.reshape(1), dy.reshape(1), 0, is_log).reshape(())
    dx = torch.empty_like(y, memory_format=torch.contiguous_format)
    if dx.numel():
        _launch([y, dy], [dx], dim % y.dim(), is_log, backward=True)
    return dx


# The launchers take the reference's arguments (tests lower MAX_BLOCK_N to force the other kernels on short rows).
def softmax_fwd(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _forward(x, dim, False)


def softmax_bwd(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    return _backward(y, dy, dim, False)


def log_softmax_fwd(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _forward(x, dim, True)


def log_softmax_bwd(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    return _backward(y, dy, dim, True)


# ----------------------------------------------------------------- ahead-of-time compiles
_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def aot_configs():
    """Every (kernel, BLOCK_N, IS_LOG, EVEN_N, REREAD_DY) the default plan launches, per dtype, as a contiguous
    last-dim launch gets it (unit column strides specialised)."""
    for t in FLOAT_TYPES:
        dtype = _TORCH_DTYPES[t]
        cap = row_cap(dtype)
        rungs, r = [cap], MIN_BLOCK_N
        while r < cap:
            rungs.append(r)
            r *= BLOCK_N_STEP
        cols = {c for r in rungs for c in (r - 1, r)} | {cap + 1}  # each rung ragged and exact; a looped row
        plans = {(backward, *_plan(n, cap, backward)) for backward in (False, True) for n in cols}
        for backward, looped, block_n, even in sorted(plans):
            for is_log in (False, True):
                consts = {"IS_LOG": is_log, "EVEN_N": even, "ACC": acc_dtype(dtype)}
                if backward:
                    consts["REREAD_DY"] = not (is_log or looped or 2 * block_n <= cap)
                    fn = _softmax_bwd_looped_kernel if looped else _softmax_bwd_kernel
                    units = ("stride_yn", "stride_dyn", "stride_dxn")
                else:
                    fn = _softmax_fwd_looped_kernel if looped else _softmax_fwd_kernel
                    units = ("stride_xn", "stride_yn")
                yield from _kernel(fn, block_n).aot(t, {**consts, **{u: 1 for u in units}})
