"""Triton kernels for mse_loss (formulas in scratchops/mse.py).

* ``_mse_fwd_kernel``: a 1-D elementwise kernel that writes w e² (reduction none) or one partial
  sum per program (mean/sum; without y it sums x itself: the D = Σ w of a weighted mean);
* ``_mse_finish_kernel``: one program, L = Σ partials (/ D for mean), and D;
* ``_mse_bwd_kernel``: elementwise dx = e (2 g / D) w (and dw = e² g / D).

Offsets are int64; math in the ACC dtype (fp64 for fp64 tensors, fp32 otherwise).
"""
import torch
import triton
import triton.language as tl

from .._common import FLOAT_DTYPES, Reduction, compute_dtype
from ._launch import FLOAT_TYPES, Kernel, acc_dtype, cdiv, config, elementwise_out, flat_offsets, same_layout

NONE = tl.constexpr(Reduction.NONE.value)
MEAN = tl.constexpr(Reduction.MEAN.value)
SUM = tl.constexpr(Reduction.SUM.value)


@triton.jit
def _mse_fwd_kernel(x_ptr, y_ptr, w_ptr, out_ptr,  # pointers (y, w unused unless HAS_Y, HAS_W)
                    n,  # sizes
                    HAS_Y: tl.constexpr, HAS_W: tl.constexpr, REDUCE: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs, mask = flat_offsets(n, BLOCK)
    v = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
    if HAS_Y:  # e² = (x - y)²; without y the kernel sums x itself (used for D = Σ w)
        e = v - tl.load(y_ptr + offs, mask=mask, other=0).to(ACC)
        v = e * e
    if HAS_W:
        v = v * tl.load(w_ptr + offs, mask=mask, other=0).to(ACC)
    if REDUCE:
        tl.store(out_ptr + tl.program_id(0), tl.sum(tl.where(mask, v, 0.0), 0).to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mse_finish_kernel(part_ptr, wpart_ptr, out_ptr, denom_ptr,  # pointers
                       n_part, n_wpart, n,  # sizes: partial sums of w e², of w; elements
                       REDUCTION: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, n_part, BLOCK):
        total += tl.load(part_ptr + start + cols, mask=start + cols < n_part, other=0)
    loss = tl.sum(total, 0)
    denom = tl.full((), 1.0, ACC)
    if REDUCTION == MEAN:
        if HAS_W:  # D = Σ w
            wsum = tl.zeros([BLOCK], dtype=ACC)
            for start in range(0, n_wpart, BLOCK):
                wsum += tl.load(wpart_ptr + start + cols, mask=start + cols < n_wpart, other=0)
            denom = tl.sum(wsum, 0)
        else:  # D = n (0/0 = nan for an empty input, as torch)
            denom = tl.full((), 0.0, ACC) + n
        loss = loss / denom
    tl.store(out_ptr, loss.to(out_ptr.dtype.element_ty))
    tl.store(denom_ptr, denom.to(denom_ptr.dtype.element_ty))


@triton.jit
def _mse_bwd_kernel(x_ptr, y_ptr, w_ptr, g_ptr, denom_ptr, d_ptr, dw_ptr,  # pointers
                    n,  # sizes
                    G_SCALAR: tl.constexpr, HAS_W: tl.constexpr, NEED_W: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs, mask = flat_offsets(n, BLOCK)
    e = tl.load(x_ptr + offs, mask=mask).to(ACC) - tl.load(y_ptr + offs, mask=mask).to(ACC)
    if G_SCALAR:
        g = tl.load(g_ptr).to(ACC)
    else:
        g = tl.load(g_ptr + offs, mask=mask).to(ACC)
    scale = g / tl.load(denom_ptr)
    # d = e · (2 g / D) · w (dx = d, dy = -d), the small factors first (no overflow in 2 e);  dw = e² g / D
    factor = 2.0 * scale
    if HAS_W:
        factor = factor * tl.load(w_ptr + offs, mask=mask).to(ACC)
    tl.store(d_ptr + offs, (e * factor).to(d_ptr.dtype.element_ty), mask=mask)
    if NEED_W:
        tl.store(dw_ptr + offs, (e * e * scale).to(dw_ptr.dtype.element_ty), mask=mask)


BLOCK = 1024  # one partial sum per BLOCK elements
ELEMENTWISE = [config(BLOCK=BLOCK, num_warps=4)]
_fwd = Kernel(_mse_fwd_kernel, ELEMENTWISE)
# the finish kernel: 8 warps (4 fp64 accumulators a thread): with 4, ptxas 3.6/3.7.1 spill one in its unrolled loop
_finish = Kernel(_mse_finish_kernel, [config(BLOCK=BLOCK, num_warps=8)])
_bwd = Kernel(_mse_bwd_kernel, ELEMENTWISE)


# ----------------------------------------------------------------- launchers
def _sum_parts(x, y, w, acc, cd):
    """Per-program partial sums of w (x - y)² (or of x alone when y is None), in the compute dtype ``cd``."""
    n = x.numel()
    parts = x.new_empty(cdiv(n, BLOCK), dtype=cd)
    if n:
        _fwd((cdiv(n, BLOCK),), x, x if y is None else y, x if w is None else w, parts, n, HAS_Y=y is not None,
             HAS_W=w is not None, REDUCE=True, ACC=acc)
    return parts


_ACC = {dtype: (acc_dtype(dtype), compute_dtype(dtype)) for dtype in FLOAT_DTYPES}  # per dtype: (ACC, compute dtype)


def mse_fwd(x, y, w, w_den, reduction):
    acc, cd = _ACC[x.dtype]
    if reduction == Reduction.NONE:
        out_like = elementwise_out(x)
    else:  # only the operands' common flat order matters: x's own when it is contiguous (no output of its size)
        out_like = x if x.is_contiguous() else elementwise_out(x)
    x, y = same_layout(x, out_like), same_layout(y, out_like)
    w = None if w is None else same_layout(w, out_like)
    if reduction == Reduction.NONE:
        if x.numel():
            _fwd((cdiv(x.numel(), BLOCK),), x, y, x if w is None else w, out_like, x.numel(), HAS_Y=True,
                 HAS_W=w is not None, REDUCE=False, ACC=acc)
        return [out_like, x.new_ones((), dtype=cd)]
    parts = _sum_parts(x, y, w, acc, cd)
    has_w = reduction == Reduction.MEAN and w_den is not None
    wparts = _sum_parts(w_den.contiguous(), None, None, acc, cd) if has_w else parts
    out, denom = x.new_empty(()), x.new_empty((), dtype=cd)  # new_empty: cheaper than torch.empty(dtype=, device=)
    _finish((1,), parts, wparts, out, denom, parts.numel(), wparts.numel(), x.numel(), REDUCTION=int(reduction),
            HAS_W=has_w, ACC=acc)
    return [out, denom]


def mse_bwd(x, y, w, denom, g, need_w):
    d = elementwise_out(x)
    x, y = same_layout(x, d), same_layout(y, d)
    w = None if w is None else same_layout(w, d)
    g_scalar = g.dim() == 0
    g = g if g_scalar else same_layout(g, d)
    need_w = bool(need_w and w is not None)
    dw = torch.empty_like(d) if need_w else x.new_empty(0)
    n = d.numel()
    if n:
        _bwd((cdiv(n, BLOCK),), x, y, x if w is None else w, g, denom, d, dw if need_w else d, n, G_SCALAR=g_scalar,
             HAS_W=w is not None, NEED_W=need_w, ACC=_ACC[x.dtype][0])
    return [d, dw]


# ----------------------------------------------------------------- ahead-of-time compiles
def aot_configs():
    """Every compile the launchers above get on a GPU (read by tests/aot.py, outside the interpreter)."""
    i64 = {"n": "i64", "n_part": "i64", "n_wpart": "i64"}
    for t in FLOAT_TYPES:
        acc = "fp64" if t == "fp64" else "fp32"
        ACC = tl.float64 if t == "fp64" else tl.float32
        for has_y, has_w, reduce in ((1, 0, 1), (1, 1, 1), (1, 0, 0), (1, 1, 0), (0, 0, 1)):
            yield from _fwd.aot(t, {"HAS_Y": has_y, "HAS_W": has_w, "REDUCE": reduce, "ACC": ACC}, ints=i64,
                                pointers={"out_ptr": acc if reduce else t})
        for reduction, has_w in ((Reduction.SUM, 0), (Reduction.MEAN, 0), (Reduction.MEAN, 1)):
            yield from _finish.aot(acc, {"REDUCTION": reduction.value, "HAS_W": has_w, "ACC": ACC}, ints=i64,
                                   pointers={"out_ptr": t})
        for g_scalar in (0, 1):
            for has_w, need_w in ((0, 0), (1, 0), (1, 1)):
                yield from _bwd.aot(t, {"G_SCALAR": g_scalar, "HAS_W": has_w, "NEED_W": need_w, "ACC": ACC},
                                    ints=i64, pointers={"denom_ptr": acc})
