"""Triton kernels for the second derivatives of softmax and log-softmax (derivatives of their backward).

For dX = backward(Y, G) (G the incoming gradient of the forward's output) and H the gradient of dX,
``_softmax_bwd2_kernel`` computes both (gY, gG) = (∂<H, dX>/∂Y, ∂<H, dX>/∂G) (reverse mode), and
``_softmax_bwd_jvp_kernel`` the derivative of dX along tangents (Ẏ, Ġ) (forward mode, for
``torch.func.jacfwd`` over a gradient: ``hessian``); the formulas are derived in scratchops/softmax.py.
Inputs are made contiguous (this path is not the hot one): a row is ``n_cols`` elements ``n_inner``
apart. One row per program, two sweeps of BLOCK_N columns (the sums, then the outputs); sums start
at 0 and masked lanes load 0 and add 0.
"""
import torch
import triton
import triton.language as tl

from ._launch import FLOAT_TYPES, Kernel, acc_dtype, config

_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


@triton.jit
def _row_origin(n_cols, n_inner):
    """This program's row (one row a program): the offset of its first element in a contiguous tensor."""
    row = tl.program_id(0).to(tl.int64)
    return (row // n_inner) * n_cols * n_inner + row % n_inner


@triton.jit
def _chunk(start, c0, n_cols, n_inner, BLOCK_N: tl.constexpr):
    """Offsets and in-row mask of columns c0 .. c0 + BLOCK_N - 1 of the row that begins at ``start``."""
    cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
    return start + cols * n_inner, cols < n_cols


@triton.jit
def _get(ptr, offs, mask, ACC: tl.constexpr):
    """Load in ACC; masked lanes are 0 (they add nothing to a sum)."""
    return tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _softmax_bwd2_kernel(
        y_ptr, g_ptr, h_ptr, gy_ptr, gg_ptr,  # pointers (contiguous, one shape)
        n_cols, n_inner,  # sizes
        IS_LOG: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """The gradients (gY, gG) of <H, dX> for dX = backward(Y, G) (formulas in scratchops/softmax.py):

    softmax      S1 = Σ Y⊙G, S2 = Σ H⊙Y:       gG = Y ⊙ (H - S2),  gY = H ⊙ (G - S1) - S2 G
    log-softmax  P = e^Y, S1 = Σ G, S2 = Σ H⊙P:  gG = H - S2,        gY = -S1 P ⊙ H
    One row per program, two sweeps (sums from 0; masked lanes load 0 and add 0)."""
    start = _row_origin(n_cols, n_inner)
    acc1 = tl.zeros([BLOCK_N], ACC)
    acc2 = tl.zeros([BLOCK_N], ACC)
    for c0 in range(0, n_cols, BLOCK_N):
        offs, mask = _chunk(start, c0, n_cols, n_inner, BLOCK_N)
        y, g, h = _get(y_ptr, offs, mask, ACC), _get(g_ptr, offs, mask, ACC), _get(h_ptr, offs, mask, ACC)
        if IS_LOG:
            acc1 += g
            acc2 += tl.where(mask, h * tl.exp(y), 0.0)
        else:
            acc1 += y * g
            acc2 += h * y
    s1 = tl.sum(acc1, axis=0)
    s2 = tl.sum(acc2, axis=0)
    for c0 in range(0, n_cols, BLOCK_N):
        offs, mask = _chunk(start, c0, n_cols, n_inner, BLOCK_N)
        y, g, h = _get(y_ptr, offs, mask, ACC), _get(g_ptr, offs, mask, ACC), _get(h_ptr, offs, mask, ACC)
        if IS_LOG:
            gg = h - s2
            gy = -s1 * tl.exp(y) * h
        else:
            gg = y * (h - s2)
            gy = h * (g - s1) - s2 * g
        tl.store(gy_ptr + offs, gy.to(gy_ptr.dtype.element_ty), mask=mask)
        tl.store(gg_ptr + offs, gg.to(gg_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_jvp_kernel(
        y_ptr, g_ptr, yt_ptr, gt_ptr, out_ptr,  # pointers (contiguous, one shape)
        n_cols, n_inner,  # sizes
        IS_LOG: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """The forward-mode derivative of dX = backward(Y, G) along tangents (Ẏ, Ġ):

    softmax      S1 = Σ Y⊙G, S3 = Σ Ẏ⊙G, S4 = Σ Y⊙Ġ:  out = Y ⊙ (Ġ - S4) + Ẏ ⊙ (G - S1) - S3 Y
    log-softmax  P = e^Y, S1 = Σ G, S4 = Σ Ġ:          out = Ġ - S4 P - S1 P ⊙ Ẏ"""
    start = _row_origin(n_cols, n_inner)
    acc1 = tl.zeros([BLOCK_N], ACC)
    acc3 = tl.zeros([BLOCK_N], ACC)
    acc4 = tl.zeros([BLOCK_N], ACC)
    for c0 in range(0, n_cols, BLOCK_N):
        offs, mask = _chunk(start, c0, n_cols, n_inner, BLOCK_N)
        g, gt = _get(g_ptr, offs, mask, ACC), _get(gt_ptr, offs, mask, ACC)
        if IS_LOG:
            acc1 += g
            acc4 += gt
        else:
            y = _get(y_ptr, offs, mask, ACC)
            acc1 += y * g
            acc3 += _get(yt_ptr, offs, mask, ACC) * g
            acc4 += y * gt
    s1 = tl.sum(acc1, axis=0)
    s3 = tl.sum(acc3, axis=0)
    s4 = tl.sum(acc4, axis=0)
    for c0 in range(0, n_cols, BLOCK_N):
        offs, mask = _chunk(start, c0, n_cols, n_inner, BLOCK_N)
        y, g = _get(y_ptr, offs, mask, ACC), _get(g_ptr, offs, mask, ACC)
        yt, gt = _get(yt_ptr, offs, mask, ACC), _get(gt_ptr, offs, mask, ACC)
        if IS_LOG:
            p = tl.exp(y)
            out = gt - s4 * p - s1 * p * yt
        else:
            out = y * (gt - s4) + yt * (g - s1) - s3 * y
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# 1024 columns a step on 128 threads: 8 elements a thread, so a row along the last dim (n_inner == 1, which a launch
# specializes) moves in 16-byte accesses in every dtype (at 256 columns a 16-bit thread moved 2 x 16 bits)
_bwd2 = Kernel(_softmax_bwd2_kernel, [config(4, 1, BLOCK_N=1024)])
_bwd_jvp = Kernel(_softmax_bwd_jvp_kernel, [config(4, 1, BLOCK_N=1024)])


def _rows(kernel, inputs, n_out: int, dim: int, is_log: bool):
    """Launch ``kernel`` one row a program over contiguous copies of ``inputs``; its ``n_out`` outputs."""
    if inputs[0].dim() == 0:
        outs = _rows(kernel, [t.reshape(1) for t in inputs], n_out, 0, is_log)
        return [o.reshape(()) for o in outs]
    inputs = [t.contiguous() for t in inputs]
    outs = [torch.empty_like(inputs[0]) for _ in range(n_out)]
    if inputs[0].numel():
        dim = dim % inputs[0].dim()
        n_cols, n_inner = inputs[0].shape[dim], inputs[0][(0,) * (dim + 1)].numel()
        kernel((inputs[0].numel() // n_cols,), *inputs, *outs, n_cols, n_inner, IS_LOG=is_log,
               ACC=acc_dtype(inputs[0].dtype))
    return outs


def softmax_bwd2(y: torch.Tensor, g: torch.Tensor, h: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_rows(_bwd2, [y, g, h], 2, dim, False))


def log_softmax_bwd2(y: torch.Tensor, g: torch.Tensor, h: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_rows(_bwd2, [y, g, h], 2, dim, True))


def softmax_bwd_jvp(y: torch.Tensor, g: torch.Tensor, y_t: torch.Tensor, g_t: torch.Tensor, dim: int) -> torch.Tensor:
    return _rows(_bwd_jvp, [y, g, y_t, g_t], 1, dim, False)[0]


def log_softmax_bwd_jvp(y: torch.Tensor, g: torch.Tensor, y_t: torch.Tensor, g_t: torch.Tensor,
                        dim: int) -> torch.Tensor:
    return _rows(_bwd_jvp, [y, g, y_t, g_t], 1, dim, True)[0]


def aot_configs():
    """The one launch shape, per dtype and op: along the last dim (``n_inner`` = 1, a launch's specialization of the
    value 1) and along an inner dim."""
    for t in FLOAT_TYPES:
        for is_log in (False, True):
            for last in ({"n_inner": 1}, {}):
                consts = {"IS_LOG": is_log, "ACC": acc_dtype(_TORCH_DTYPES[t]), **last}
                yield from _bwd2.aot(t, consts)
                yield from _bwd_jvp.aot(t, consts)
