"""Triton kernels for linear: Z = X·Wᵀ + b, Y = act(Z) (this file), and the GEMM configs its backward shares.

Shapes: X (M, K), W (N, K), b (N,) or (M, N), Y (M, N). Every operand is addressed through
its strides (a transposed W or a sliced X costs no copy; zero-stride gradients work).

* ``_linear_fwd_kernel`` (here): tiled Z = X·Wᵀ (``_gemm.mma``, grouped tile order), then the
  bias and the activation (``activations.activate``, its spill-free variant) in the epilogue.
* the backward kernels, in ``linear_bwd``: dX = dZ·W, dW = dZᵀ·X with db fused in, db alone,
  and the activation-derivative kernel of the double backward.

Configs: one ``triton.Config`` list per dtype class (``_gemm.dtype_class``: "half", "tf32",
"ieee", "fp64"), autotuned on a GPU where a class has several; one small config under the
interpreter. Each compiles for sm_90 without spills (``aot_configs``, checked by tests/test_linear.py).
"""
import enum

import torch
import triton
import triton.language as tl

from .._common import ACTIVATION_CODES, Activation
from ._gemm import CLASS_TYPES, dtype_class, input_precision, mma, tile_ids, tile_safe
from ._launch import Kernel, acc_dtype, cdiv, config, tiles
from .activations import activate


class Bias(enum.IntEnum):
    """The BIAS constexpr: no bias, one value per output feature (N,), or one per output element (M, N)."""

    NONE = 0
    VECTOR = 1
    MATRIX = 2


NO_BIAS = tl.constexpr(Bias.NONE.value)
BIAS_VECTOR = tl.constexpr(Bias.VECTOR.value)
BIAS_MATRIX = tl.constexpr(Bias.MATRIX.value)

# ----------------------------------------------------------------- configs (shared with linear_bwd)
# Tile sizes along the M, N and K dims of the problem: each kernel's output tile is two of them, the
# third is its reduction. Rows: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages).
GEMM_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
INTERPRETER = config(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
FP64 = tiles(GEMM_FIELDS, (32, 32, 8, 8, 4, 2))
AUTOTUNE_KEY = ["M", "N", "K"]
FWD_CONFIGS = {
    "half": tiles(GEMM_FIELDS, (128, 128, 64, 8, 8, 4), (64, 128, 32, 8, 4, 4)),
    "tf32": tiles(GEMM_FIELDS, (128, 128, 32, 8, 8, 3), (64, 128, 32, 8, 4, 3)),
    "ieee": tiles(GEMM_FIELDS, (64, 64, 32, 8, 4, 2)),
    "fp64": FP64,
}


def gemm_kernel(fn, configs) -> Kernel:
    """A GEMM kernel of this family: its class-keyed configs, the interpreter's tile, autotuned on M, N, K."""
    return Kernel(fn, configs, interpreter=INTERPRETER, key=AUTOTUNE_KEY)


_LAUNCH_CLASSES: dict = {}


def launch_class(dtype: torch.dtype) -> tuple[str, dict]:
    """The config list (dtype class) of a GEMM on ``dtype`` and the constexprs that go with it (built once per
    dtype and TF32 setting; callers unpack the dict, never change it)."""
    key = dtype, torch.backends.cuda.matmul.allow_tf32
    hit = _LAUNCH_CLASSES.get(key)
    if hit is None:
        cls = dtype_class(*key)
        hit = _LAUNCH_CLASSES[key] = cls, {"INPUT_PRECISION": input_precision(cls), "ACC": acc_dtype(dtype)}
    return hit


def gemm_aot(kernel: Kernel, constexprs: dict, unit_strides=()):
    """The sm_90 compiles of ``kernel``: every config of every dtype class, each element type of the class,
    with ``constexprs`` and the unit strides of row-major operands (Triton specializes a stride of 1)."""
    for cls, types in CLASS_TYPES.items():
        consts = {**constexprs, "INPUT_PRECISION": input_precision(cls),
                  "ACC": tl.float64 if cls == "fp64" else tl.float32, **{s: 1 for s in unit_strides}}
        yield from kernel.aot(types, consts, cls=cls)


# ----------------------------------------------------------------- kernel
@triton.jit
def _linear_fwd_kernel(
        # pointers
        x_ptr, w_ptr, b_ptr, y_ptr,
        # sizes
        M, N, K,
        # strides
        stride_xm, stride_xk, stride_wn, stride_wk, stride_bm, stride_bn, stride_ym, stride_yn,
        # constexprs
        BIAS: tl.constexpr, ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # int64 scalar tile origins move the pointers; tile-local offsets stay int32 (cheap in registers).
    m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
    m0_64, n0_64 = m0.to(tl.int64), n0.to(tl.int64)
    ar_m, ar_n, ar_k = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    # Rows/columns past the edge re-read valid ones (their results are never stored): no M/N load masks.
    lm = (m0 + ar_m) % M - m0
    ln = (n0 + ar_n) % N - n0
    x_ptrs = (x_ptr + m0_64 * stride_xm) + (lm[:, None] * stride_xm + ar_k[None, :] * stride_xk)
    w_ptrs = (w_ptr + n0_64 * stride_wn) + (ar_k[:, None] * stride_wk + ln[None, :] * stride_wn)  # (k, n) of Wᵀ
    x_step = stride_xk * tl.full((), BLOCK_K, tl.int64)  # int64 whether or not the stride is specialized to 1
    w_step = stride_wk * tl.full((), BLOCK_K, tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=ar_k[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=ar_k[:, None] < k_left, other=0.0)
        acc = mma(acc, a, b, INPUT_PRECISION)
        x_ptrs += x_step
        w_ptrs += w_step
    # Epilogue: z = acc + b, rounded to the output dtype as torch's linear output is, then y = act(z).
    if BIAS == BIAS_VECTOR:
        acc += tl.load((b_ptr + n0_64 * stride_bn) + ln * stride_bn).to(ACC)[None, :]
    elif BIAS == BIAS_MATRIX:
        acc += tl.load((b_ptr + m0_64 * stride_bm + n0_64 * stride_bn) +
                       (lm[:, None] * stride_bm + ln[None, :] * stride_bn)).to(ACC)
    out_ty = y_ptr.dtype.element_ty
    y = activate(acc.to(out_ty).to(ACC), ACTIVATION, False)
    mask = (ar_m < M - m0)[:, None] & (ar_n < N - n0)[None, :]
    y_ptrs = (y_ptr + m0_64 * stride_ym + n0_64 * stride_yn) + (ar_m[:, None] * stride_ym + ar_n[None, :] * stride_yn)
    tl.store(y_ptrs, y.to(out_ty), mask=mask)


_fwd = gemm_kernel(_linear_fwd_kernel, FWD_CONFIGS)


# ----------------------------------------------------------------- launcher
def linear_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, activation: str) -> torch.Tensor:
    """y = act(x Wᵀ + b); b is None, (N,) or (M, N) (any strides, zero included)."""
    (M, K), N = x.shape, w.shape[0]
    y = x.new_empty((M, N))  # x's dtype and device (cheaper on the host than torch.empty(..., dtype, device))
    if M == 0 or N == 0:
        return y
    x, w = tile_safe(x), tile_safe(w)
    if b is None:
        bias, stride_bm, stride_bn, mode = y, 0, 0, Bias.NONE
    else:
        bias = tile_safe(b)
        mode = Bias.VECTOR if b.dim() == 1 else Bias.MATRIX
        stride_bm, stride_bn = (0, bias.stride(0)) if b.dim() == 1 else bias.stride()
    cls, consts = launch_class(x.dtype)
    _fwd(lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),),
         x, w, bias, y, M, N, K, *x.stride(), *w.stride(), stride_bm, stride_bn, *y.stride(),
         cls=cls, BIAS=mode.value, ACTIVATION=ACTIVATION_CODES[activation], **consts)
    return y


# ----------------------------------------------------------------- ahead-of-time compiles
def aot_configs():
    """Every compile ``linear_fwd`` gets on a GPU for row-major operands (an nn.Linear's x, W, y): each
    config x element type x bias mode x activation (read by tests/aot.py, outside the interpreter)."""
    for mode in Bias:
        units = ("stride_xk", "stride_wk", "stride_yn") + (("stride_bn",) if mode != Bias.NONE else ())
        for act in Activation:
            yield from gemm_aot(_fwd, {"BIAS": mode.value, "ACTIVATION": act.value}, units)
