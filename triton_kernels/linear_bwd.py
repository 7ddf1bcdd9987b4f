"""Triton kernels for the backward of linear: dX = dZ·W, dW = dZᵀ·X, db = Σ_rows dZ.

dZ = dY ⊙ act'(Z) is never materialized: each kernel forms its tiles of dZ from dY
and the saved output Y as they are loaded (relu [y > 0], sigmoid y(1 - y), tanh 1 - y²).

* ``_linear_bwd_input_kernel``: dX (M, K), output tiles BLOCK_M x BLOCK_K, reducing over N.
* ``_linear_bwd_weight_kernel``: dW (N, K), output tiles BLOCK_N x BLOCK_K, reducing over M;
  db = Σ_rows dZ is summed alongside by the programs of the first K tile.
* ``_linear_bwd_bias_kernel``: db alone (when W needs no gradient, or K = 0).

Helpers, configs, autotuning and the int32/int64 offset scheme are shared with the
forward in ``triton_kernels.linear``.
"""
import torch
import triton
import triton.language as tl

from ._launch import TRITON_DTYPE_NAMES
from .linear import (_NONE, _RELU, _SIGMOID, _TANH, ACTIVATIONS, BIAS_CONFIG, BIAS_NUM_WARPS,
                                   INTERPRETER_BIAS_CONFIG, KERNEL_ARGS, _launch, _mma, _tile_ids, _tile_safe,
                                   aot_entries, interpreting, signature)


@triton.jit
def _load_grad_z(dy_ptrs, y_ptrs, mask, ACTIVATION: tl.constexpr):
    """A tile of dZ = dY ⊙ act'(Z) in the compute dtype, act' written with the output Y:
    relu [y > 0], sigmoid y(1 - y), tanh 1 - y². (Inline, no nested helpers: each costs the interpreter.)"""
    dy = tl.load(dy_ptrs, mask=mask, other=0.0)
    cdt = tl.float64 if dy.dtype == tl.float64 else tl.float32
    dz = dy.to(cdt)
    if ACTIVATION != _NONE:
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(cdt)
        if ACTIVATION == _RELU:
            dz = tl.where(y <= 0, 0.0, dz)  # as torch's threshold_backward: only y <= 0 blocks (NaN passes)
        elif ACTIVATION == _SIGMOID:
            dz = dz * y * (1.0 - y)
        else:
            dz = dz * (1.0 - y * y)
    return dz


# ----------------------------------------------------------------- kernels
@triton.jit
def _linear_bwd_input_kernel(dy_ptr, y_ptr, w_ptr, dx_ptr, M, N, K,
                             stride_dym, stride_dyn, stride_ym, stride_yn, stride_wn, stride_wk,
                             stride_dxm, stride_dxk,
                             ACTIVATION: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr):
    # dX = dZ·W with dZ = dY ⊙ act'(Y), formed tile by tile as dY (and Y) are loaded.
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    m0, k0 = pid_m * BLOCK_M, pid_k * BLOCK_K
    m0_64, k0_64 = m0.to(tl.int64), k0.to(tl.int64)
    ar_m, ar_n, ar_k = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    lm = (m0 + ar_m) % M - m0  # past the edge: re-read valid rows/columns, never stored
    lk = (k0 + ar_k) % K - k0
    dy_ptrs = (dy_ptr + m0_64 * stride_dym) + (lm[:, None] * stride_dym + ar_n[None, :] * stride_dyn)
    y_ptrs = (y_ptr + m0_64 * stride_ym) + (lm[:, None] * stride_ym + ar_n[None, :] * stride_yn)
    w_ptrs = (w_ptr + k0_64 * stride_wk) + (ar_n[:, None] * stride_wn + lk[None, :] * stride_wk)
    block = tl.full((), BLOCK_N, tl.int64)
    dy_step, y_step, w_step = stride_dyn * block, stride_yn * block, stride_wn * block
    acc_dtype = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=acc_dtype)
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        n_ok = ar_n < N - n * BLOCK_N
        dz = _load_grad_z(dy_ptrs, y_ptrs, n_ok[None, :], ACTIVATION)
        w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
        acc = _mma(acc, dz.to(w.dtype), w, PRECISION)
        dy_ptrs += dy_step
        y_ptrs += y_step
        w_ptrs += w_step
    mask = (ar_m < M - m0)[:, None] & (ar_k < K - k0)[None, :]
    dx_ptrs = (dx_ptr + m0_64 * stride_dxm + k0_64 * stride_dxk) + (ar_m[:, None] * stride_dxm +
                                                                     ar_k[None, :] * stride_dxk)
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_bwd_weight_kernel(dy_ptr, y_ptr, x_ptr, dw_ptr, db_ptr, M, N, K,
                              stride_dym, stride_dyn, stride_ym, stride_yn, stride_xm, stride_xk,
                              stride_dwn, stride_dwk,
                              ACTIVATION: tl.constexpr, WITH_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr):
    # dW = dZᵀ·X and db = Σ_rows dZ (summed by the programs of the first K tile only); db is contiguous.
    pid_n, pid_k = _tile_ids(N, K, BLOCK_N, BLOCK_K, GROUP_M)
    n0, k0 = pid_n * BLOCK_N, pid_k * BLOCK_K
    n0_64, k0_64 = n0.to(tl.int64), k0.to(tl.int64)
    ar_m, ar_n, ar_k = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    ln = (n0 + ar_n) % N - n0
    lk = (k0 + ar_k) % K - k0
    dyt_ptrs = (dy_ptr + n0_64 * stride_dyn) + (ln[:, None] * stride_dyn + ar_m[None, :] * stride_dym)  # (n, m)
    yt_ptrs = (y_ptr + n0_64 * stride_yn) + (ln[:, None] * stride_yn + ar_m[None, :] * stride_ym)
    x_ptrs = (x_ptr + k0_64 * stride_xk) + (ar_m[:, None] * stride_xm + lk[None, :] * stride_xk)
    block = tl.full((), BLOCK_M, tl.int64)
    dy_step, y_step, x_step = stride_dym * block, stride_ym * block, stride_xm * block
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=acc_dtype)
    db = tl.zeros((BLOCK_N,), dtype=acc_dtype)
    for m in range(0, tl.cdiv(M, BLOCK_M)):
        m_ok = ar_m < M - m * BLOCK_M
        dzt = _load_grad_z(dyt_ptrs, yt_ptrs, m_ok[None, :], ACTIVATION)
        x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        acc = _mma(acc, dzt.to(x.dtype), x, PRECISION)
        if WITH_BIAS:
            if pid_k == 0:
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
        if pid_k == 0:
            tl.store(db_ptr + n0_64 + ar_n, db.to(db_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _linear_bwd_bias_kernel(dy_ptr, y_ptr, db_ptr, M, N, stride_dym, stride_dyn, stride_ym, stride_yn,
                            ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # db = Σ_rows dZ, dZ = dY ⊙ act'(Y); db is contiguous.
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
    acc_dtype = tl.float64 if dy_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for m in range(0, tl.cdiv(M, BLOCK_M)):
        mask = (ar_m < M - m * BLOCK_M)[:, None] & n_ok[None, :]
        acc += _load_grad_z(dy_row + dy_tile, y_row + y_tile, mask, ACTIVATION)
        dy_row += dy_step
        y_row += y_step
    tl.store(db_ptr + n0_64 + ar_n, tl.sum(acc, axis=0).to(db_ptr.dtype.element_ty), mask=n_ok)


# ----------------------------------------------------------------- launchers
def _grad_z_args(dy, y, activation):
    """dY and Y (Y stands in for itself only with an activation; else dY is passed, unread)."""
    dy = _tile_safe(dy)
    y = _tile_safe(y) if activation != "none" else dy
    return (dy, y), (*dy.stride(), *y.stride())


def linear_bwd_input(dy: torch.Tensor, w: torch.Tensor, y: torch.Tensor | None, activation: str) -> torch.Tensor:
    (M, N), K = dy.shape, w.shape[1]
    dx = torch.empty((M, K), dtype=w.dtype, device=w.device)
    if M == 0 or K == 0:
        return dx
    (dy, y), strides = _grad_z_args(dy, y, activation)
    w = _tile_safe(w)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)

    _launch(_linear_bwd_input_kernel, "input", w.dtype, grid,
            (dy, y, w, dx, M, N, K, *strides, *w.stride(), *dx.stride()), {"ACTIVATION": ACTIVATIONS[activation]})
    return dx


def linear_bwd_bias(dy: torch.Tensor, y: torch.Tensor | None, activation: str) -> torch.Tensor:
    M, N = dy.shape
    db = torch.empty((N,), dtype=dy.dtype, device=dy.device)
    if N == 0:
        return db
    (dy, y), strides = _grad_z_args(dy, y, activation)
    meta = INTERPRETER_BIAS_CONFIG if interpreting() else BIAS_CONFIG
    _linear_bwd_bias_kernel[(triton.cdiv(N, meta["BLOCK_N"]),)](
        dy, y, db, M, N, *strides, ACTIVATION=ACTIVATIONS[activation], **meta, num_warps=BIAS_NUM_WARPS)
    return db


def linear_bwd_weight(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, activation: str,
                      with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW, db); db is empty (shape (0,)) unless ``with_bias``."""
    (M, N), K = dy.shape, x.shape[1]
    dw = torch.empty((N, K), dtype=x.dtype, device=x.device)
    db = torch.empty((N if with_bias else 0,), dtype=dy.dtype, device=dy.device)
    if N == 0:
        return dw, db
    if M == 0 or K == 0:  # no products to take: dW is all zeros; db needs its own reduction
        return dw.zero_(), linear_bwd_bias(dy, y, activation) if with_bias else db
    (dy, y), strides = _grad_z_args(dy, y, activation)
    x = _tile_safe(x)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)

    _launch(_linear_bwd_weight_kernel, "weight", x.dtype, grid,
            (dy, y, x, dw, db if with_bias else dw, M, N, K, *strides, *x.stride(), *dw.stride()),
            {"ACTIVATION": ACTIVATIONS[activation], "WITH_BIAS": with_bias})
    return dw, db


# ----------------------------------------------------------------- ahead-of-time configs
KERNEL_ARGS.update({
    "input": (_linear_bwd_input_kernel, ("dy_ptr", "y_ptr", "w_ptr", "dx_ptr"), "MNK",
              ("stride_dym", "stride_dyn", "stride_ym", "stride_yn", "stride_wn", "stride_wk", "stride_dxm",
               "stride_dxk"), ("stride_dyn", "stride_yn", "stride_wk", "stride_dxk"), {"ACTIVATION": _TANH.value}),
    "weight": (_linear_bwd_weight_kernel, ("dy_ptr", "y_ptr", "x_ptr", "dw_ptr", "db_ptr"), "MNK",
               ("stride_dym", "stride_dyn", "stride_ym", "stride_yn", "stride_xm", "stride_xk", "stride_dwn",
                "stride_dwk"), ("stride_dyn", "stride_yn", "stride_xk", "stride_dwk"),
               {"ACTIVATION": _TANH.value, "WITH_BIAS": True}),
})


def _bias_entries():
    strides = ("stride_dym", "stride_dyn", "stride_ym", "stride_yn")
    for dt in (TRITON_DTYPE_NAMES[d] for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)):
        consts = {"ACTIVATION": _TANH.value, **BIAS_CONFIG, "stride_dyn": 1, "stride_yn": 1}
        yield _linear_bwd_bias_kernel, signature(("dy_ptr", "y_ptr", "db_ptr"), dt, "MN", strides, consts), consts, \
            BIAS_NUM_WARPS


# Every (kernel, signature, constexprs, num_warps[, num_stages]) the backward launchers run with on a GPU.
AOT_CONFIGS = [*aot_entries(["input", "weight"]), *_bias_entries()]
