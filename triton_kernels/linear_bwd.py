"""Triton kernels for the backward of linear: dX = dZ·W, dW = dZᵀ·X, db = Σ_rows dZ.

dZ = dY ⊙ act'(Z) is never materialized: each kernel forms its tiles of dZ from dY and the
saved output Y as they are loaded (``activations.activation_grad``: relu [y > 0], sigmoid
y(1 - y), tanh 1 - y²).

* ``_linear_bwd_input_kernel``: dX (M, K), output tiles BLOCK_M x BLOCK_K, reducing over N.
* ``_linear_bwd_weight_kernel``: dW (N, K), output tiles BLOCK_N x BLOCK_K, reducing over M;
  db = Σ_rows dZ is summed alongside by the programs of the first K tile.
* ``_linear_bwd_bias_kernel``: db alone (when W needs no gradient, or K = 0).
* ``_linear_bwd_input_tma_kernel``, ``_linear_bwd_weight_tma_kernel``: dX and dW (+ db) on sm_90's
  fast path (tensor descriptors, persistent grid; see ``linear``), where ``_gemm.tma_descriptors`` allows.

The GEMM core (tile order, mma, offsets, precision) is ``_gemm``'s; the configs and their dtype
classes are ``linear``'s (this module imports them; nothing imports this module but its launchers' users).
"""
import torch
import triton
import triton.language as tl

from .._common import ACTIVATION_CODES, Activation
from ._gemm import mma, persistent_grid, tile_count, tile_origin, tile_safe, tile_start, tma_descriptors
from ._launch import FLOAT_TYPES, Kernel, acc_dtype, cdiv, config, tiles
from .activations import NONE, activation_grad
from .linear import FP64, GEMM_FIELDS, gemm_aot, gemm_kernel, launch_class, tma_aot, tma_kernel, warp_specialized

# dX: output tile BLOCK_M x BLOCK_K, reduction over N in BLOCK_N steps.
INPUT_CONFIGS = {
    "half": tiles(GEMM_FIELDS, (128, 32, 128, 8, 8, 3)),
    "tf32": tiles(GEMM_FIELDS, (128, 32, 128, 8, 8, 3)),
    "ieee": tiles(GEMM_FIELDS, (64, 32, 64, 8, 8, 2)),  # 4 warps: 8 bytes of stack without an activation
    "fp64": FP64,
}
# dW: output tile BLOCK_N x BLOCK_K, reduction over M in BLOCK_M steps. fp64: the forward's tile with the
# reduction in steps of 8 (FP64's BLOCK_M = 32 here makes sigmoid + db spill 16 bytes on sm_90).
WEIGHT_CONFIGS = {
    "half": tiles(GEMM_FIELDS, (32, 128, 128, 8, 8, 3), (32, 64, 128, 8, 4, 3)),
    "tf32": tiles(GEMM_FIELDS, (32, 128, 64, 8, 8, 3)),
    "ieee": tiles(GEMM_FIELDS, (32, 64, 64, 8, 4, 2)),
    "fp64": tiles(GEMM_FIELDS, (8, 32, 32, 8, 4, 2)),
}
# The sm_90 TMA + persistent kernels (see linear.FWD_TMA_CONFIGS), in the same field order. With an activation
# a stage holds the dY and Y tiles.
_GRAD_Z_BLOCKS = {"dy_desc": ("BLOCK_M", "BLOCK_N"), "y_desc": ("BLOCK_M", "BLOCK_N")}
INPUT_TMA_BLOCKS = {**_GRAD_Z_BLOCKS, "w_desc": ("BLOCK_N", "BLOCK_K"), "dx_desc": ("BLOCK_M", "BLOCK_K")}
INPUT_TMA_CONFIGS = {
    "half": tiles(GEMM_FIELDS, (128, 64, 256, 8, 8, 3), (128, 64, 128, 8, 8, 4), (128, 64, 128, 8, 4, 4),
                  (64, 64, 256, 8, 4, 4), (128, 64, 64, 8, 4, 4), (64, 64, 128, 8, 4, 4)) +
    warp_specialized((64, 64, 128, 8, 4, 4)),  # (linear.WARP_SPECIALIZATION; none for tf32 or the wgrad)
    "tf32": tiles(GEMM_FIELDS, (128, 32, 128, 8, 8, 3), (64, 32, 128, 8, 4, 4), (128, 32, 64, 8, 4, 4)),
}
WEIGHT_TMA_BLOCKS = {**_GRAD_Z_BLOCKS, "x_desc": ("BLOCK_M", "BLOCK_K"), "dw_desc": ("BLOCK_N", "BLOCK_K")}
WEIGHT_TMA_CONFIGS = {
    "half": tiles(GEMM_FIELDS, (32, 128, 256, 8, 8, 4), (64, 128, 128, 8, 8, 4), (64, 128, 64, 8, 8, 4),
                  (64, 64, 256, 8, 4, 4), (64, 64, 128, 8, 4, 4)),
    "tf32": tiles(GEMM_FIELDS, (32, 128, 128, 8, 8, 3), (32, 64, 128, 8, 4, 4), (32, 128, 64, 8, 4, 4)),
}
BIAS_CONFIGS = [config(4, 3, BLOCK_M=16, BLOCK_N=128)]
BIAS_INTERPRETER = config(4, 1, BLOCK_M=32, BLOCK_N=32)


@triton.jit
def _grad_z(dy_ptrs, y_ptrs, mask, ACTIVATION: tl.constexpr, ACC: tl.constexpr):
    """A tile of dZ = dY ⊙ act'(Z) in the ACC dtype (Y is read only when there is an activation)."""
    dz = tl.load(dy_ptrs, mask=mask, other=0.0).to(ACC)
    if ACTIVATION != NONE:
        dz = activation_grad(dz, tl.load(y_ptrs, mask=mask, other=0.0).to(ACC), ACTIVATION)
    return dz


# ----------------------------------------------------------------- kernels
@triton.jit
def _linear_bwd_input_kernel(
        # pointers
        dy_ptr, y_ptr, w_ptr, dx_ptr,
        # sizes
        M, N, K,
        # strides
        stride_dym, stride_dyn, stride_ym, stride_yn, stride_wn, stride_wk, stride_dxm, stride_dxk,
        # constexprs
        ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # dX = dZ·W with dZ = dY ⊙ act'(Y), formed tile by tile as dY (and Y) are loaded.
    m0, k0, m0_64, k0_64, lm, lk = tile_start(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    ar_m, ar_n, ar_k = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    dy_ptrs = (dy_ptr + m0_64 * stride_dym) + (lm[:, None] * stride_dym + ar_n[None, :] * stride_dyn)
    y_ptrs = (y_ptr + m0_64 * stride_ym) + (lm[:, None] * stride_ym + ar_n[None, :] * stride_yn)
    w_ptrs = (w_ptr + k0_64 * stride_wk) + (ar_n[:, None] * stride_wn + lk[None, :] * stride_wk)
    block = tl.full((), BLOCK_N, tl.int64)
    dy_step, y_step, w_step = stride_dyn * block, stride_yn * block, stride_wn * block
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        n_ok = ar_n < N - n * BLOCK_N
        dz = _grad_z(dy_ptrs, y_ptrs, n_ok[None, :], ACTIVATION, ACC)
        w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
        acc = mma(acc, dz.to(w.dtype), w, INPUT_PRECISION)
        dy_ptrs += dy_step
        y_ptrs += y_step
        w_ptrs += w_step
    mask = (ar_m < M - m0)[:, None] & (ar_k < K - k0)[None, :]
    dx_ptrs = (dx_ptr + m0_64 * stride_dxm + k0_64 * stride_dxk) + (ar_m[:, None] * stride_dxm +
                                                                     ar_k[None, :] * stride_dxk)
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_bwd_weight_kernel(
        # pointers
        dy_ptr, y_ptr, x_ptr, dw_ptr, db_ptr,
        # sizes
        M, N, K,
        # strides (db is contiguous)
        stride_dym, stride_dyn, stride_ym, stride_yn, stride_xm, stride_xk, stride_dwn, stride_dwk,
        # constexprs
        ACTIVATION: tl.constexpr, WITH_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # dW = dZᵀ·X and db = Σ_rows dZ (summed by the programs of the first K tile only).
    n0, k0, n0_64, k0_64, ln, lk = tile_start(N, K, BLOCK_N, BLOCK_K, GROUP_M)
    ar_m, ar_n, ar_k = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    dyt_ptrs = (dy_ptr + n0_64 * stride_dyn) + (ln[:, None] * stride_dyn + ar_m[None, :] * stride_dym)  # (n, m)
    yt_ptrs = (y_ptr + n0_64 * stride_yn) + (ln[:, None] * stride_yn + ar_m[None, :] * stride_ym)
    x_ptrs = (x_ptr + k0_64 * stride_xk) + (ar_m[:, None] * stride_xm + lk[None, :] * stride_xk)
    block = tl.full((), BLOCK_M, tl.int64)
    dy_step, y_step, x_step = stride_dym * block, stride_ym * block, stride_xm * block
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    db = tl.zeros((BLOCK_N,), dtype=ACC)
    for m in range(0, tl.cdiv(M, BLOCK_M)):
        m_ok = ar_m < M - m * BLOCK_M
        dzt = _grad_z(dyt_ptrs, yt_ptrs, m_ok[None, :], ACTIVATION, ACC)
        x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        acc = mma(acc, dzt.to(x.dtype), x, INPUT_PRECISION)
        if WITH_BIAS:
            if k0 == 0:
                db += tl.sum(dzt, axis=1)
        dyt_ptrs += dy_step
        yt_ptrs += y_step
        x_ptrs += x_step
    n_ok = ar_n < N - n0
    mask = n_ok[:, None] & (ar_k < K - k0)[None, :]
    dw_ptrs = (dw_ptr + n0_64 * stride_dwn + k0_64 * stride_dwk) + (ar_n[:, None] * stride_dwn +
                                                                     ar_k[None, :] * stride_dwk)
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask)
    if WITH_BIAS:
        if k0 == 0:
            tl.store(db_ptr + n0_64 + ar_n, db.to(db_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _linear_bwd_bias_kernel(
        # pointers
        dy_ptr, y_ptr, db_ptr,
        # sizes
        M, N,
        # strides (db is contiguous)
        stride_dym, stride_dyn, stride_ym, stride_yn,
        # constexprs
        ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # db = Σ_rows dZ, dZ = dY ⊙ act'(Y).
    n0 = tl.program_id(0) * BLOCK_N
    n0_64 = n0.to(tl.int64)
    ar_m, ar_n = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    n_ok = ar_n < N - n0
    # Scalar row pointers move down the rows; the int32 tile offsets stay fixed (few registers).
    dy_row, y_row = dy_ptr + n0_64 * stride_dyn, y_ptr + n0_64 * stride_yn
    dy_tile = ar_m[:, None] * stride_dym + ar_n[None, :] * stride_dyn
    y_tile = ar_m[:, None] * stride_ym + ar_n[None, :] * stride_yn
    block = tl.full((), BLOCK_M, tl.int64)
    dy_step, y_step = stride_dym * block, stride_ym * block
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for m in range(0, tl.cdiv(M, BLOCK_M)):
        mask = (ar_m < M - m * BLOCK_M)[:, None] & n_ok[None, :]
        acc += _grad_z(dy_row + dy_tile, y_row + y_tile, mask, ACTIVATION, ACC)
        dy_row += dy_step
        y_row += y_step
    tl.store(db_ptr + n0_64 + ar_n, tl.sum(acc, axis=0).to(db_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _grad_z_tma(dy_desc, y_desc, r0, c0, ACTIVATION: tl.constexpr, ACC: tl.constexpr):
    """The TMA-loaded tile of dZ = dY ⊙ act'(Y) at (r0, c0): dY as loaded without an activation (it may feed the
    tensor cores straight from shared memory), else computed in ACC."""
    dz = dy_desc.load([r0, c0])
    if ACTIVATION != NONE:
        dz = activation_grad(dz.to(ACC), y_desc.load([r0, c0]).to(ACC), ACTIVATION)
    return dz


@triton.jit
def _linear_bwd_input_tma_kernel(
        # tensor descriptors: dY, Y (M, N), W (N, K), dX (M, K) (blocks set per config by INPUT_TMA_BLOCKS)
        dy_desc, y_desc, w_desc, dx_desc,
        # sizes
        M, N, K,
        # constexprs
        ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr = False):
    # dX = dZ·W on the sm_90 path: persistent over the BLOCK_M x BLOCK_K output tiles, TMA loads (zero past
    # the edges) and stores (clipped); the tile loop flattened or warp-specialized (as linear's forward).
    for tile in tl.range(tl.program_id(0), tile_count(M, K, BLOCK_M, BLOCK_K), tl.num_programs(0),
                         flatten=not WARP_SPECIALIZE, warp_specialize=WARP_SPECIALIZE):
        m0, k0 = tile_origin(tile, M, K, BLOCK_M, BLOCK_K, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
        for n in range(tl.cdiv(N, BLOCK_N)):
            dz = _grad_z_tma(dy_desc, y_desc, m0, n * BLOCK_N, ACTIVATION, ACC)
            w = w_desc.load([n * BLOCK_N, k0])
            acc = mma(acc, dz.to(w.dtype), w, INPUT_PRECISION)
        dx_desc.store([m0, k0], acc.to(dx_desc.dtype))


@triton.jit
def _linear_bwd_weight_tma_kernel(
        # tensor descriptors: dY, Y (M, N), X (M, K), dW (N, K) (blocks set per config by WEIGHT_TMA_BLOCKS); db
        dy_desc, y_desc, x_desc, dw_desc, db_ptr,
        # sizes
        M, N, K,
        # constexprs
        ACTIVATION: tl.constexpr, WITH_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # dW = dZᵀ·X (and db = Σ_rows dZ in the tiles of the first K columns) on the sm_90 path, as above (Triton's
    # Hopper pass leaves this loop unspecialized: no WARP_SPECIALIZE).
    for tile in tl.range(tl.program_id(0), tile_count(N, K, BLOCK_N, BLOCK_K), tl.num_programs(0), flatten=True):
        n0, k0 = tile_origin(tile, N, K, BLOCK_N, BLOCK_K, GROUP_M)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
        db = tl.zeros((BLOCK_N,), dtype=ACC)
        for m in range(tl.cdiv(M, BLOCK_M)):
            dz = _grad_z_tma(dy_desc, y_desc, m * BLOCK_M, n0, ACTIVATION, ACC)
            x = x_desc.load([m * BLOCK_M, k0])
            acc = mma(acc, dz.to(x.dtype).T, x, INPUT_PRECISION)
            if WITH_BIAS:
                if k0 == 0:
                    db += tl.sum(dz.to(ACC), axis=0)
        dw_desc.store([n0, k0], acc.to(dw_desc.dtype))
        if WITH_BIAS:
            if k0 == 0:
                ar_n = tl.arange(0, BLOCK_N)
                tl.store(db_ptr + n0.to(tl.int64) + ar_n, db.to(db_ptr.dtype.element_ty), mask=ar_n < N - n0)


_input = gemm_kernel(_linear_bwd_input_kernel, INPUT_CONFIGS)
_weight = gemm_kernel(_linear_bwd_weight_kernel, WEIGHT_CONFIGS)
_input_tma = tma_kernel(_linear_bwd_input_tma_kernel, INPUT_TMA_CONFIGS, INPUT_TMA_BLOCKS)
_weight_tma = tma_kernel(_linear_bwd_weight_tma_kernel, WEIGHT_TMA_CONFIGS, WEIGHT_TMA_BLOCKS)
_bias = Kernel(_linear_bwd_bias_kernel, BIAS_CONFIGS, interpreter=BIAS_INTERPRETER)


# ----------------------------------------------------------------- launchers
def _grad_z_args(dy, y, activation):
    """dY and Y (Y stands in for itself only with an activation; else dY is passed, unread)."""
    return dy, y if activation != "none" else dy


def _safe_grad_z_args(dy, y):
    """dY and Y for the pointer kernels (:func:`_gemm.tile_safe`), and their strides."""
    dy = tile_safe(dy)
    y = tile_safe(y) if y is not dy else dy
    return (dy, y), (*dy.stride(), *y.stride())


def linear_bwd_input(dy: torch.Tensor, w: torch.Tensor, y: torch.Tensor | None, activation: str) -> torch.Tensor:
    (M, N), K = dy.shape, w.shape[1]
    dx = w.new_empty(M, K)
    if M == 0 or K == 0:
        return dx
    dy, y = _grad_z_args(dy, y, activation)
    cls, consts = launch_class(w.dtype, "ACTIVATION", ACTIVATION_CODES[activation])
    descs = tma_descriptors(_input_tma.block_shapes, cls, dy, y, w, dx) if N else None
    if descs is not None:
        _input_tma(lambda meta: persistent_grid(dx, cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"])),
                   *descs, M, N, K, cls=cls, **consts)
        return dx
    (dy, y), strides = _safe_grad_z_args(dy, y)
    w = tile_safe(w)
    _input(lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]),),
           dy, y, w, dx, M, N, K, *strides, *w.stride(), *dx.stride(), cls=cls, **consts)
    return dx


def linear_bwd_bias(dy: torch.Tensor, y: torch.Tensor | None, activation: str) -> torch.Tensor:
    M, N = dy.shape
    db = dy.new_empty(N)
    if N == 0:
        return db
    (dy, y), strides = _safe_grad_z_args(*_grad_z_args(dy, y, activation))
    _bias(lambda meta: (cdiv(N, meta["BLOCK_N"]),), dy, y, db, M, N, *strides,
          ACTIVATION=ACTIVATION_CODES[activation], ACC=acc_dtype(dy.dtype))
    return db


def linear_bwd_weight(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, activation: str,
                      with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW, db); db is empty (shape (0,)) unless ``with_bias``."""
    (M, N), K = dy.shape, x.shape[1]
    dw = x.new_empty(N, K)
    db = dy.new_empty(N if with_bias else 0)
    if N == 0:
        return dw, db
    if M == 0 or K == 0:  # no products to take: dW is all zeros; db needs its own reduction
        return dw.zero_(), linear_bwd_bias(dy, y, activation) if with_bias else db
    dy, y = _grad_z_args(dy, y, activation)
    cls, consts = launch_class(x.dtype, "ACTIVATION", ACTIVATION_CODES[activation], "WITH_BIAS", with_bias)
    descs = tma_descriptors(_weight_tma.block_shapes, cls, dy, y, x, dw)
    if descs is not None:
        _weight_tma(lambda meta: persistent_grid(dw, cdiv(N, meta["BLOCK_N"]) * cdiv(K, meta["BLOCK_K"])),
                    *descs, db if with_bias else dw, M, N, K, cls=cls, **consts)
        return dw, db
    (dy, y), strides = _safe_grad_z_args(dy, y)
    x = tile_safe(x)
    _weight(lambda meta: (cdiv(N, meta["BLOCK_N"]) * cdiv(K, meta["BLOCK_K"]),),
            dy, y, x, dw, db if with_bias else dw, M, N, K, *strides, *x.stride(), *dw.stride(), cls=cls, **consts)
    return dw, db


# ----------------------------------------------------------------- ahead-of-time compiles
def aot_configs():
    """Every compile the launchers above get on a GPU for row-major operands (dY, Y, W, X and the gradients):
    each config x element type x activation (x WITH_BIAS for dW) (read by tests/aot.py)."""
    grad_z_units = ("stride_dyn", "stride_yn")
    # The sm_90 TMA kernels: each config x element type, with the costliest epilogue/prologue (linear.aot_configs).
    sigmoid = Activation.SIGMOID.value
    yield from tma_aot(_input_tma, INPUT_TMA_BLOCKS, {"ACTIVATION": sigmoid})
    yield from tma_aot(_weight_tma, WEIGHT_TMA_BLOCKS, {"ACTIVATION": sigmoid, "WITH_BIAS": True})
    for act in Activation:
        yield from gemm_aot(_input, {"ACTIVATION": act.value}, grad_z_units + ("stride_wk", "stride_dxk"))
        for with_bias in (False, True):
            yield from gemm_aot(_weight, {"ACTIVATION": act.value, "WITH_BIAS": with_bias},
                                grad_z_units + ("stride_xk", "stride_dwk"))
        for t in FLOAT_TYPES:
            yield from _bias.aot(t, {"ACTIVATION": act.value, "ACC": tl.float64 if t == "fp64" else tl.float32,
                                     **{s: 1 for s in grad_z_units}})
