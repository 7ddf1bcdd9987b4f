"""Triton kernels for softmax and log-softmax along one dim of a strided tensor.

The launchers see the tensor as a (rows, N) matrix with N the size of ``dim``.
A row r splits into (outer, inner) = (r // n_inner, r % n_inner), where "outer"
collapses the dims before ``dim`` and "inner" the dims after it, and an element
sits at ``outer * s_outer + inner * s_inner + col * s_col``. Each operand has its
own three strides, so a transposed, sliced or expanded (zero-stride) tensor needs
no copy as long as the dims before ``dim`` form one arithmetic progression and so
do the dims after it; when they do not, the launcher copies that operand to a
contiguous tensor explicitly (``_as_rows``). Outputs are contiguous, as torch's.

Two kernels per direction, each doing softmax or log-softmax by its ``is_log`` argument:

* ``_softmax_fwd_kernel`` / ``_softmax_bwd_kernel``: the row fits one block
  (BLOCK_N = the first of 64, 256, 1024, 4096, 8192 that holds N; 8192 = ``MAX_BLOCK_N``);
  BLOCK_M rows per program; one read and one write per element.
* ``_softmax_fwd_looped_kernel`` / ``_softmax_bwd_looped_kernel``: one row per
  program, BLOCK_N columns at a time, for rows longer than ``MAX_BLOCK_N``. The
  forward keeps a running max m and a running sum s = Σ e^{x - m}, rescaled by
  e^{m_old - m_new} whenever the max grows (online softmax), then writes the row
  in a second sweep; the backward sums Σ dY⊙Y (or Σ dY) in a first sweep.

Costs: the single-block kernels move the minimum (forward: read x, write y;
backward: read y and dy, write dx). The looped kernels read their inputs twice,
so they can reach about 2/3 (forward) or 3/5 (backward) of the copy roof unless
the second read hits L2. The cap (8192 columns, 16 warps) compiles for sm_90
without spills for every dtype; the AOT list checks that.

Stability: e^{x - m} with m the row max. While the running max is still -inf
the shift is 0, so -inf entries add 0 instead of NaN; a row that is -inf
everywhere ends with m = -inf and gives NaN (x - m = NaN), as torch does. NaN
and +inf in a row make the row NaN through the sum, as in torch.
"""
from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPE_NAMES, acc_type

# Row lengths: the single-block kernels take BLOCK_N in MIN_BLOCK_N · 4^k (a coarse ladder keeps the number of
# compiled variants small; masked lanes cost no memory traffic), or MAX_BLOCK_N itself when the ladder's next
# step overshoots it; longer rows go to the looped kernels, LOOP_BLOCK_N columns per step.
MAX_BLOCK_N = 8192
LOOP_BLOCK_N = 4096
MIN_BLOCK_N = 64
BLOCK_N_STEP = 4
TILE = 2048  # elements per program in the single-block kernels: BLOCK_M = TILE // BLOCK_N rows
ELEMENTS_PER_WARP = 256  # num_warps = tile / ELEMENTS_PER_WARP, within [MIN_WARPS, MAX_WARPS]
MIN_WARPS, MAX_WARPS = 4, 16

# How many times each kernel was launched: tests read it to prove every branch ran.
BRANCHES: collections.Counter = collections.Counter()


def _num_warps(tile: int) -> int:
    return max(MIN_WARPS, min(MAX_WARPS, tile // ELEMENTS_PER_WARP))


@triton.jit
def _row_start(rows, n_inner, s_outer, s_inner):
    """Offset of each row's first element: rows split into (outer, inner) indices."""
    return (rows // n_inner) * s_outer + (rows % n_inner) * s_inner


@triton.jit
def _softmax_fwd_kernel(x_ptr, y_ptr, n_rows, n_cols, n_inner, sx_outer, sx_inner, sx_col, sy_outer, sy_inner,
                        sy_col, is_log, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    x_offs = _row_start(rows, n_inner, sx_outer, sx_inner)[:, None] + cols[None, :] * sx_col
    x = acc_type(tl.load(x_ptr + x_offs, mask=mask, other=-float("inf")))
    # z = x - max(x); s = Σ e^z; softmax y = e^z / s, log-softmax y = z - log s
    # (rows past the end get m = 0 and s = 1: nothing is stored for them, and no 0/0 or log 0 is computed)
    z = x - tl.where(row_mask, tl.max(x, axis=1), 0.0)[:, None]
    e = tl.where(mask, tl.exp(z), 0.0)
    s = tl.where(row_mask, tl.sum(e, axis=1), 1.0)
    if is_log:
        y = z - tl.log(s)[:, None]
    else:
        y = e * (1.0 / s)[:, None]
    y_offs = _row_start(rows, n_inner, sy_outer, sy_inner)[:, None] + cols[None, :] * sy_col
    tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(y_ptr, dy_ptr, dx_ptr, n_rows, n_cols, n_inner, sy_outer, sy_inner, sy_col, sdy_outer,
                        sdy_inner, sdy_col, sdx_outer, sdx_inner, sdx_col,
                        is_log, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    y_offs = _row_start(rows, n_inner, sy_outer, sy_inner)[:, None] + cols[None, :] * sy_col
    dy_offs = _row_start(rows, n_inner, sdy_outer, sdy_inner)[:, None] + cols[None, :] * sdy_col
    y = acc_type(tl.load(y_ptr + y_offs, mask=mask, other=0.0))
    dy = acc_type(tl.load(dy_ptr + dy_offs, mask=mask, other=0.0))
    if is_log:
        # dX = dY - e^Y · Σ dY
        dx = dy - tl.exp(y) * tl.sum(dy, axis=1)[:, None]
    else:
        # dX = Y ⊙ (dY - Σ dY⊙Y)
        dx = y * (dy - tl.sum(dy * y, axis=1)[:, None])
    dx_offs = _row_start(rows, n_inner, sdx_outer, sdx_inner)[:, None] + cols[None, :] * sdx_col
    tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_fwd_looped_kernel(x_ptr, y_ptr, n_cols, n_inner, sx_outer, sx_inner, sx_col, sy_outer, sy_inner,
                               sy_col, is_log, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + _row_start(row, n_inner, sx_outer, sx_inner)
    y_row = y_ptr + _row_start(row, n_inner, sy_outer, sy_inner)
    # Running max m and running sum s = Σ e^{x - m}, in the compute type of x.
    s = tl.sum(acc_type(tl.zeros([BLOCK_N], dtype=x_ptr.dtype.element_ty)), axis=0)
    m = s - float("inf")
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        x = acc_type(tl.load(x_row + cols * sx_col, mask=cols < n_cols, other=-float("inf")))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)  # no -inf - (-inf) while the row is all -inf so far
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    log_s = tl.log(s)
    inv_s = 1.0 / s
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = cols < n_cols
        z = acc_type(tl.load(x_row + cols * sx_col, mask=mask, other=0.0)) - m
        if is_log:
            y = z - log_s
        else:
            y = tl.exp(z) * inv_s
        tl.store(y_row + cols * sy_col, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_looped_kernel(y_ptr, dy_ptr, dx_ptr, n_cols, n_inner, sy_outer, sy_inner, sy_col, sdy_outer,
                               sdy_inner, sdy_col, sdx_outer, sdx_inner, sdx_col,
                               is_log, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y_row = y_ptr + _row_start(row, n_inner, sy_outer, sy_inner)
    dy_row = dy_ptr + _row_start(row, n_inner, sdy_outer, sdy_inner)
    dx_row = dx_ptr + _row_start(row, n_inner, sdx_outer, sdx_inner)
    # First sweep: per-lane partial sums of Σ dY⊙Y (softmax) or Σ dY (log-softmax).
    acc = acc_type(tl.zeros([BLOCK_N], dtype=y_ptr.dtype.element_ty))
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = cols < n_cols
        dy = acc_type(tl.load(dy_row + cols * sdy_col, mask=mask, other=0.0))
        if is_log:
            acc += dy
        else:
            acc += dy * acc_type(tl.load(y_row + cols * sy_col, mask=mask, other=0.0))
    total = tl.sum(acc, axis=0)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = cols < n_cols
        y = acc_type(tl.load(y_row + cols * sy_col, mask=mask, other=0.0))
        dy = acc_type(tl.load(dy_row + cols * sdy_col, mask=mask, other=0.0))
        if is_log:
            # dX = dY - e^Y · Σ dY
            dx = dy - tl.exp(y) * total
        else:
            # dX = Y ⊙ (dY - Σ dY⊙Y)
            dx = y * (dy - total)
        tl.store(dx_row + cols * sdx_col, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------- launchers
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
    """(n_inner, s_outer, s_inner, s_col) of ``t`` seen as rows along ``dim``, or None."""
    outer = _collapse(t.shape[:dim], t.stride()[:dim])
    inner = _collapse(t.shape[dim + 1:], t.stride()[dim + 1:])
    if outer is None or inner is None:
        return None
    return inner[0], outer[1], inner[1], t.stride(dim)


def _as_rows(t: torch.Tensor, dim: int):
    """``t`` and its row strides; an explicit contiguous copy when its layout has no (outer, inner, col) form."""
    layout = _rows_layout(t, dim)
    if layout is None:
        t = t.contiguous()
        layout = _rows_layout(t, dim)
    return t, layout[1:]


def _numel(sizes) -> int:
    n = 1
    for size in sizes:
        n *= size
    return n


def _plan(n_cols: int, cap: int):
    """(looped, BLOCK_M, BLOCK_N, num_warps) for rows of ``n_cols`` under the single-block cap ``cap``."""
    block_n = MIN_BLOCK_N
    while block_n < n_cols:
        block_n *= BLOCK_N_STEP
    if block_n > cap and triton.next_power_of_2(n_cols) <= cap:
        block_n = cap
    if block_n > cap:
        block_n = min(cap, LOOP_BLOCK_N)
        return True, 1, block_n, _num_warps(block_n)
    block_m = max(1, TILE // block_n)
    return False, block_m, block_n, _num_warps(block_m * block_n)


def _rows(t: torch.Tensor, dim: int):
    """(n_rows, n_cols, n_inner) of ``t`` seen as rows along ``dim``."""
    n_cols, n_inner = t.shape[dim], _numel(t.shape[dim + 1:])
    return _numel(t.shape) // n_cols, n_cols, n_inner


def _forward(x: torch.Tensor, dim: int, is_log: bool, max_block_n: int | None) -> torch.Tensor:
    if x.dim() == 0:
        return _forward(x.reshape(1), 0, is_log, max_block_n).reshape(())
    dim = dim % x.dim()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if not y.numel():
        return y
    n_rows, n_cols, n_inner = _rows(y, dim)
    x, x_strides = _as_rows(x, dim)
    _, y_strides = _as_rows(y, dim)
    looped, block_m, block_n, warps = _plan(n_cols, MAX_BLOCK_N if max_block_n is None else max_block_n)
    if looped:
        BRANCHES["fwd_looped"] += 1
        _softmax_fwd_looped_kernel[(n_rows,)](x, y, n_cols, n_inner, *x_strides, *y_strides, int(is_log),
                                             BLOCK_N=block_n, num_warps=warps)
    else:
        BRANCHES["fwd"] += 1
        _softmax_fwd_kernel[(triton.cdiv(n_rows, block_m),)](x, y, n_rows, n_cols, n_inner, *x_strides, *y_strides,
                                                             int(is_log), BLOCK_M=block_m, BLOCK_N=block_n,
                                                             num_warps=warps)
    return y


def _backward(y: torch.Tensor, dy: torch.Tensor, dim: int, is_log: bool, max_block_n: int | None) -> torch.Tensor:
    if y.dim() == 0:
        return _backward(y.reshape(1), dy.reshape(1), 0, is_log, max_block_n).reshape(())
    dim = dim % y.dim()
    dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if not dx.numel():
        return dx
    n_rows, n_cols, n_inner = _rows(dx, dim)
    y, y_strides = _as_rows(y, dim)
    dy, dy_strides = _as_rows(dy, dim)
    _, dx_strides = _as_rows(dx, dim)
    looped, block_m, block_n, warps = _plan(n_cols, MAX_BLOCK_N if max_block_n is None else max_block_n)
    if looped:
        BRANCHES["bwd_looped"] += 1
        _softmax_bwd_looped_kernel[(n_rows,)](y, dy, dx, n_cols, n_inner, *y_strides, *dy_strides, *dx_strides,
                                             int(is_log), BLOCK_N=block_n, num_warps=warps)
    else:
        BRANCHES["bwd"] += 1
        _softmax_bwd_kernel[(triton.cdiv(n_rows, block_m),)](y, dy, dx, n_rows, n_cols, n_inner, *y_strides,
                                                             *dy_strides, *dx_strides, int(is_log), BLOCK_M=block_m,
                                                             BLOCK_N=block_n, num_warps=warps)
    return dx


# The launchers take the reference's arguments; ``max_block_n`` (default MAX_BLOCK_N) is for tests and
# benchmarks that want to force the looped kernels on short rows.
def softmax_fwd(x: torch.Tensor, dim: int, max_block_n: int | None = None) -> torch.Tensor:
    return _forward(x, dim, False, max_block_n)


def softmax_bwd(y: torch.Tensor, dy: torch.Tensor, dim: int, max_block_n: int | None = None) -> torch.Tensor:
    return _backward(y, dy, dim, False, max_block_n)


def log_softmax_fwd(x: torch.Tensor, dim: int, max_block_n: int | None = None) -> torch.Tensor:
    return _forward(x, dim, True, max_block_n)


def log_softmax_bwd(y: torch.Tensor, dy: torch.Tensor, dim: int, max_block_n: int | None = None) -> torch.Tensor:
    return _backward(y, dy, dim, True, max_block_n)


# ----------------------------------------------------------------- ahead-of-time configs
FWD_ARGS = ("x_ptr", "y_ptr", "n_rows", "n_cols", "n_inner", "sx_outer", "sx_inner", "sx_col", "sy_outer",
            "sy_inner", "sy_col", "is_log")
BWD_ARGS = ("y_ptr", "dy_ptr", "dx_ptr", "n_rows", "n_cols", "n_inner", "sy_outer", "sy_inner", "sy_col",
            "sdy_outer", "sdy_inner", "sdy_col", "sdx_outer", "sdx_inner", "sdx_col", "is_log")


def _signature(args, dtype, constexprs):
    """Pointers in ``dtype``, sizes and strides as i64, ``is_log`` as i32, then the constexprs."""
    sig = {a: f"*{dtype}" if a.endswith("_ptr") else "i32" if a == "is_log" else "i64" for a in args}
    return {**sig, **{c: "constexpr" for c in constexprs}}


def _aot_configs():
    """Every (kernel, signature, constexprs, num_warps) the launchers launch with by default."""
    plans, n_cols = [], 1
    while True:
        plans.append(_plan(n_cols, MAX_BLOCK_N))
        if plans[-1][0]:
            break
        n_cols = plans[-1][2] + 1
    for dt in FLOAT_DTYPE_NAMES:
        for looped, block_m, block_n, warps in plans:
            if looped:
                consts = {"BLOCK_N": block_n}
                no_rows = [a for a in FWD_ARGS if a != "n_rows"], [a for a in BWD_ARGS if a != "n_rows"]
                yield _softmax_fwd_looped_kernel, _signature(no_rows[0], dt, consts), consts, warps
                yield _softmax_bwd_looped_kernel, _signature(no_rows[1], dt, consts), consts, warps
            else:
                consts = {"BLOCK_M": block_m, "BLOCK_N": block_n}
                yield _softmax_fwd_kernel, _signature(FWD_ARGS, dt, consts), consts, warps
                yield _softmax_bwd_kernel, _signature(BWD_ARGS, dt, consts), consts, warps


AOT_CONFIGS = list(_aot_configs())
