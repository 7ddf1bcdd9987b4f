"""Triton kernels for linear: Z = X·Wᵀ + b, Y = act(Z) (this file), and the GEMM configs its backward shares.

Shapes: X (M, K), W (N, K), b (N,) or (M, N), Y (M, N). Every operand is addressed through
its strides (a transposed W or a sliced X costs no copy; zero-stride gradients work).

* ``_linear_fwd_kernel`` (here): tiled Z = X·Wᵀ (``_gemm.mma``, grouped tile order), then the
  bias and the activation (``activations.activate``, its spill-free variant) in the epilogue.
* ``_linear_fwd_tma_kernel`` (here): the same product and epilogue on sm_90's fast path: x, W and y
  as TMA tensor descriptors (``_gemm.tma_descriptors``), a persistent grid (one program per SM looping
  over the output tiles in grouped order). Launched where ``_gemm.tma_descriptors`` allows: on sm_90 for the
  tensor-core classes, and under the interpreter for every dtype, so CPU CI runs these kernels.
* the backward kernels, in ``linear_bwd``: dX = dZ·W, dW = dZᵀ·X with db fused in, db alone,
  and the activation-derivative kernel of the double backward.

Configs: one ``triton.Config`` list per dtype class (``_gemm.dtype_class``: "half", "tf32",
"ieee", "fp64"), autotuned on a GPU where a class has several; one small config under the
interpreter. The TMA kernels have their own, wider lists (``*_TMA_CONFIGS``; a config's pre_hook
sets the descriptors' block shapes). Each compiles for sm_90 without spills (``aot_configs``,
checked by tests/test_linear.py and tests/test_aot_audit.py).
"""
import enum

import torch
import triton
import triton.language as tl

from .._common import ACTIVATION_CODES, Activation
from ._gemm import (CLASS_TYPES, block_shapes, dtype_class, input_precision, mma, persistent_grid, set_blocks,
                    tile_count, tile_origin, tile_safe, tile_start, tma_descriptors)
from ._launch import Kernel, acc_dtype, aot_entry, cdiv, config, tiles
from .activations import activate


class Bias(enum.IntEnum):
    """The BIAS constexpr: no bias, one value per output feature (N,), or one per output element (M, N)."""

    NONE = 0
    VECTOR = 1
    MATRIX = 2


NO_BIAS = tl.constexpr(Bias.NONE.value)
BIAS_VECTOR = tl.constexpr(Bias.VECTOR.value)
BIAS_MATRIX = tl.constexpr(Bias.MATRIX.value)
NO_BIAS_CODE, VECTOR_CODE, MATRIX_CODE = Bias.NONE.value, Bias.VECTOR.value, Bias.MATRIX.value  # host: plain ints

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

# The sm_90 TMA + persistent kernels' lists (16-bit and tf32 only: other classes never take that path on a
# GPU; under the interpreter INTERPRETER runs). Each config's pre_hook sets the descriptors' block shapes.
FWD_TMA_BLOCKS = {"x_desc": ("BLOCK_M", "BLOCK_K"), "w_desc": ("BLOCK_N", "BLOCK_K"), "y_desc": ("BLOCK_M", "BLOCK_N")}
# Warp specialization (WARP_SPECIALIZE: the persistent tile loop as tl.range(..., warp_specialize=True), unflattened):
# Triton's Hopper pass splits such a kernel into a TMA-load warp group and two wgmma warp groups (4 warps become
# 12, registers rebalanced by setmaxnreg). Checked by compiling for sm_90 on triton 3.6, 3.7.1 and 3.9 (the notes of
# issue 12): it applies with 4 warps and 64-row tiles (BLOCK_N <= 128); 8 warps or 128-row tiles are left
# unspecialized or fail to compile; the tf32 dgrad fails and the wgrad is never specialized. Other versions: none.
WARP_SPECIALIZATION = tuple(int(v) for v in triton.__version__.split(".")[:2]) in ((3, 6), (3, 7), (3, 9))


def warp_specialized(*rows) -> list[triton.Config]:
    """``tiles`` rows as warp-specialized configs (WARP_SPECIALIZE=True), or none where Triton is not known to
    specialize them (WARP_SPECIALIZATION)."""
    configs = tiles(GEMM_FIELDS, *rows) if WARP_SPECIALIZATION else []
    for c in configs:
        c.kwargs["WARP_SPECIALIZE"] = True
    return configs


FWD_TMA_CONFIGS = {
    "half": tiles(GEMM_FIELDS, (128, 256, 32, 8, 8, 4), (128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 4, 4),
                  (64, 256, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4)) +
    warp_specialized((64, 128, 64, 8, 4, 4), (64, 64, 128, 8, 4, 4)),
    "tf32": tiles(GEMM_FIELDS, (128, 128, 32, 8, 8, 3), (64, 128, 32, 8, 4, 4), (128, 64, 32, 8, 4, 4)) +
    warp_specialized((64, 128, 32, 8, 4, 4)),
}


def tma_kernel(fn, configs, blocks) -> Kernel:
    """A TMA GEMM kernel: ``gemm_kernel``, each GPU config given the pre_hook that sets the descriptors' block
    shapes (``blocks``: descriptor -> constexpr names), and ``block_shapes``, the shapes fixed in advance
    (``_gemm.block_shapes``: the interpreter's, a single config's) that ``_gemm.tma_descriptors`` sets."""
    for c in (c for cfgs in configs.values() for c in cfgs):
        c.pre_hook = set_blocks(blocks)
    # "ieee"/"fp64" launch it only under the interpreter (tma_descriptors): no GPU configs.
    kernel = Kernel(fn, {**dict.fromkeys(CLASS_TYPES, []), **configs}, interpreter=INTERPRETER, key=AUTOTUNE_KEY)
    kernel.block_shapes = block_shapes(kernel, blocks)
    return kernel


def gemm_kernel(fn, configs) -> Kernel:
    """A GEMM kernel of this family: its class-keyed configs, the interpreter's tile, autotuned on M, N, K."""
    return Kernel(fn, configs, interpreter=INTERPRETER, key=AUTOTUNE_KEY)


_LAUNCH_CLASSES: dict = {}
_allow_tf32 = torch._C._get_cublas_allow_tf32  # torch.backends.cuda.matmul.allow_tf32, without its module __getattr__


def launch_class(dtype: torch.dtype, *consts) -> tuple[str, dict]:
    """The config list (dtype class) of a GEMM on ``dtype`` and its constexprs: INPUT_PRECISION, ACC and the
    launcher's own ``consts`` (name, value, name, value, ...). Built once per (dtype, TF32 setting, consts);
    callers unpack the dict, never change it."""
    key = dtype, _allow_tf32(), consts
    hit = _LAUNCH_CLASSES.get(key)
    if hit is None:
        cls = dtype_class(dtype, key[1])
        hit = _LAUNCH_CLASSES[key] = cls, {"INPUT_PRECISION": input_precision(cls), "ACC": acc_dtype(dtype),
                                           **dict(zip(consts[::2], consts[1::2]))}
    return hit


def gemm_aot(kernel: Kernel, constexprs: dict, unit_strides=()):
    """The sm_90 compiles of ``kernel``: every config of every dtype class, each element type of the class,
    with ``constexprs`` and the unit strides of row-major operands (Triton specializes a stride of 1)."""
    for cls, types in CLASS_TYPES.items():
        consts = {**constexprs, "INPUT_PRECISION": input_precision(cls),
                  "ACC": tl.float64 if cls == "fp64" else tl.float32, **{s: 1 for s in unit_strides}}
        yield from kernel.aot(types, consts, cls=cls)


def tma_aot(kernel: Kernel, blocks: dict, constexprs: dict, unit_strides=()):
    """The sm_90 compiles of a TMA kernel: every config of the tensor-core classes x each element type, the
    descriptors typed as a launch types them (``tensordesc<fp16[128, 64]>``: element type and block shape)."""
    for cls in ("half", "tf32"):
        for dtype in CLASS_TYPES[cls]:
            for c in kernel.configs[cls]:
                descs = {d: f"tensordesc<{dtype}[{c.kwargs[r]}, {c.kwargs[k]}]>" for d, (r, k) in blocks.items()}
                consts = {**c.kwargs, **constexprs, "INPUT_PRECISION": input_precision(cls), "ACC": tl.float32,
                          **{s: 1 for s in unit_strides}}
                yield aot_entry(kernel.fn, dtype, consts, num_warps=c.num_warps, num_stages=c.num_stages,
                                ints=descs)


# ----------------------------------------------------------------- kernels
@triton.jit
def _epilogue(acc, b_ptr, m0_64, n0_64, lm, ln, stride_bm, stride_bn, out_ty: tl.constexpr, BIAS: tl.constexpr,
              ACTIVATION: tl.constexpr, ACC: tl.constexpr):
    """z = acc + b, rounded to the output dtype as torch's linear output is, then y = act(z) (in ACC).
    ``lm``/``ln``: in-tile rows/columns that stay inside the bias (wrapped at the edge)."""
    if BIAS == BIAS_VECTOR:
        acc += tl.load((b_ptr + n0_64 * stride_bn) + ln * stride_bn).to(ACC)[None, :]
    elif BIAS == BIAS_MATRIX:
        acc += tl.load((b_ptr + m0_64 * stride_bm + n0_64 * stride_bn) +
                       (lm[:, None] * stride_bm + ln[None, :] * stride_bn)).to(ACC)
    return activate(acc.to(out_ty).to(ACC), ACTIVATION, False)


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
    m0, n0, m0_64, n0_64, lm, ln = tile_start(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    ar_m, ar_n, ar_k = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
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
    out_ty = y_ptr.dtype.element_ty
    y = _epilogue(acc, b_ptr, m0_64, n0_64, lm, ln, stride_bm, stride_bn, out_ty, BIAS, ACTIVATION, ACC)
    mask = (ar_m < M - m0)[:, None] & (ar_n < N - n0)[None, :]
    y_ptrs = (y_ptr + m0_64 * stride_ym + n0_64 * stride_yn) + (ar_m[:, None] * stride_ym + ar_n[None, :] * stride_yn)
    tl.store(y_ptrs, y.to(out_ty), mask=mask)


@triton.jit
def _linear_fwd_tma_kernel(
        # tensor descriptors (x (M, K), W (N, K), y (M, N); blocks set per config by FWD_TMA_BLOCKS) and the bias
        x_desc, w_desc, y_desc, b_ptr,
        # sizes
        M, N, K,
        # strides of the bias
        stride_bm, stride_bn,
        # constexprs
        BIAS: tl.constexpr, ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr = False):
    # The sm_90 path: persistent (each program loops over output tiles, in grouped order), operand tiles
    # loaded by TMA (zero-filled past the edges: no masks), output stored by TMA (clipped at the edges); the tile
    # loop flattened with the K loop, or warp-specialized (WARP_SPECIALIZE; the interpreter ignores both).
    for tile in tl.range(tl.program_id(0), tile_count(M, N, BLOCK_M, BLOCK_N), tl.num_programs(0),
                         flatten=not WARP_SPECIALIZE, warp_specialize=WARP_SPECIALIZE):
        m0, n0 = tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for k in range(tl.cdiv(K, BLOCK_K)):
            a = x_desc.load([m0, k * BLOCK_K])
            b = w_desc.load([n0, k * BLOCK_K])
            acc = mma(acc, a, b.T, INPUT_PRECISION)
        lm = (m0 + tl.arange(0, BLOCK_M)) % M - m0
        ln = (n0 + tl.arange(0, BLOCK_N)) % N - n0
        y = _epilogue(acc, b_ptr, m0.to(tl.int64), n0.to(tl.int64), lm, ln, stride_bm, stride_bn,
                      y_desc.dtype, BIAS, ACTIVATION, ACC)
        y_desc.store([m0, n0], y.to(y_desc.dtype))


_fwd = gemm_kernel(_linear_fwd_kernel, FWD_CONFIGS)
_fwd_tma = tma_kernel(_linear_fwd_tma_kernel, FWD_TMA_CONFIGS, FWD_TMA_BLOCKS)


# ----------------------------------------------------------------- launcher
def linear_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, activation: str) -> torch.Tensor:
    """y = act(x Wᵀ + b); b is None, (N,) or (M, N) (any strides, zero included)."""
    (M, K), N = x.shape, w.shape[0]
    y = x.new_empty(M, N)  # x's dtype and device (sizes as arguments: the cheapest allocation on the host)
    if M == 0 or N == 0:
        return y
    if b is None:
        bias, stride_bm, stride_bn, mode = y, 0, 0, NO_BIAS_CODE
    else:
        bias = tile_safe(b)
        mode = VECTOR_CODE if b.dim() == 1 else MATRIX_CODE
        stride_bm, stride_bn = (0, bias.stride(0)) if mode == VECTOR_CODE else bias.stride()
    cls, consts = launch_class(x.dtype, "BIAS", mode, "ACTIVATION", ACTIVATION_CODES[activation])
    descs = tma_descriptors(_fwd_tma.block_shapes, cls, x, w, y) if K else None
    if descs is not None:
        _fwd_tma(lambda meta: persistent_grid(y, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),
                 *descs, bias, M, N, K, stride_bm, stride_bn, cls=cls, **consts)
        return y
    x, w = tile_safe(x), tile_safe(w)
    _fwd(lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),),
         x, w, bias, y, M, N, K, *x.stride(), *w.stride(), stride_bm, stride_bn, *y.stride(), cls=cls, **consts)
    return y


# ----------------------------------------------------------------- ahead-of-time compiles
def aot_configs():
    """Every compile ``linear_fwd`` gets on a GPU for row-major operands (an nn.Linear's x, W, y) (read by
    tests/aot.py, outside the interpreter). The pointer kernel (GPUs other than sm_90, and operands no tensor
    descriptor can address): each config x element type x bias mode x activation. The sm_90 TMA kernel: each
    config x element type, with the epilogue that costs the most registers (an (M, N) bias and sigmoid: the
    others load less and compute a subset; the main loop is the same)."""
    for mode in Bias:
        units = ("stride_xk", "stride_wk", "stride_yn") + (("stride_bn",) if mode != Bias.NONE else ())
        for act in Activation:
            yield from gemm_aot(_fwd, {"BIAS": mode.value, "ACTIVATION": act.value}, units)
    yield from tma_aot(_fwd_tma, FWD_TMA_BLOCKS, {"BIAS": Bias.MATRIX.value, "ACTIVATION": Activation.SIGMOID.value},
                       ("stride_bn",))
