"""Triton kernels for linear: Z = X·Wᵀ + b, Y = act(Z), and the three gradients.

Shapes: X (M, K), W (N, K), b (N,), Y (M, N). Every operand is addressed through
its strides (a transposed W or a sliced X costs no copy; zero-stride gradients
work). Tiles are visited in grouped order (GROUP_M output-tile rows share the
same column tiles of the other operand, which keeps them in L2).

* ``_linear_fwd_kernel``: tiled Z = X·Wᵀ, then b and the activation in the epilogue.
* ``_linear_bwd_input_kernel``: dX = dZ·W, dZ = dY ⊙ act'(Y) formed as tiles are loaded.
* ``_linear_bwd_weight_kernel``: dW = dZᵀ·X, and db = Σ_rows dZ fused in (column-0 programs).
* ``_linear_bwd_bias_kernel``: db alone (when W needs no gradient, or K = 0).

Products: fp16/bf16 on the tensor cores (``tl.dot``) with fp32 accumulation; fp32
through ``tl.dot`` with ``PRECISION`` "tf32" or "ieee"; fp64 by an exact
multiply-and-sum (``tl.dot`` has no fp64 form on NVIDIA GPUs). On a GPU a small
config list is autotuned per dtype class; under the interpreter one small config runs.
"""
import os

import torch
import triton
import triton.language as tl

from triton_kernels._launch import TRITON_DTYPE_NAMES

# Activation codes (the ACTIVATION constexpr).
_NONE = tl.constexpr(0)
_RELU = tl.constexpr(1)
_SIGMOID = tl.constexpr(2)
_TANH = tl.constexpr(3)
ACTIVATIONS = {"none": _NONE.value, "relu": _RELU.value, "sigmoid": _SIGMOID.value, "tanh": _TANH.value}

# One config: tile sizes along the M, N and K dims of the problem, grouping, warps, stages.
# The output tile of each kernel is two of the three dims; the third is the reduction.
_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
INTERPRETER_CONFIG = (32, 32, 32, 4, 4, 1)
FP64_CONFIG = (32, 32, 8, 8, 4, 2)
CONFIGS = {  # kernel kind -> dtype class -> configs (each compiles for sm_90 without spills: see AOT_CONFIGS)
    "fwd": {"half": [(128, 128, 64, 8, 8, 4), (64, 128, 32, 8, 4, 4)],
            "tf32": [(128, 128, 32, 8, 8, 3), (64, 128, 32, 8, 4, 3)],
            "ieee": [(64, 64, 32, 8, 4, 2)]},
    # dX: output tile BLOCK_M x BLOCK_K, reduction over N in BLOCK_N steps.
    "input": {"half": [(128, 32, 128, 8, 8, 3)],
              "tf32": [(128, 32, 128, 8, 8, 3)],
              "ieee": [(64, 32, 64, 8, 4, 2)]},
    # dW: output tile BLOCK_N x BLOCK_K, reduction over M in BLOCK_M steps.
    "weight": {"half": [(32, 128, 128, 8, 8, 3), (32, 64, 128, 8, 4, 3)],
               "tf32": [(32, 128, 64, 8, 8, 3)],
               "ieee": [(32, 64, 64, 8, 4, 2)]},
}
BIAS_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 128}
INTERPRETER_BIAS_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}
BIAS_NUM_WARPS = 4
AUTOTUNE_KEY = ["M", "N", "K"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------- device helpers
@triton.jit
def _tile_ids(n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """Grouped order: GROUP consecutive tile rows sweep the tile columns together."""
    pid = tl.program_id(0)
    num_r = tl.cdiv(n_rows, BLOCK_R)
    num_c = tl.cdiv(n_cols, BLOCK_C)
    per_group = GROUP * num_c
    first_r = (pid // per_group) * GROUP
    group_rows = tl.minimum(num_r - first_r, GROUP)
    pid_r = first_r + (pid % per_group) % group_rows
    pid_c = (pid % per_group) // group_rows
    return pid_r, pid_c


@triton.jit
def _mma(acc, a, b, PRECISION: tl.constexpr):
    """acc + a·b: tl.dot (fp32 accumulation) or, for fp64, an exact multiply-and-sum."""
    if a.dtype == tl.float64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    """y = act(z), in z's (compute) dtype."""
    if ACTIVATION == _RELU:
        z = tl.where(z < 0, 0.0, z)  # NaN passes, as torch's relu
    elif ACTIVATION == _SIGMOID:
        z = 1.0 / (1.0 + tl.exp(-z))
    elif ACTIVATION == _TANH:
        # tanh(|z|) = (1 - e) / (1 + e), e = e^{-2|z|} in (0, 1]: no overflow. Near 0 its error is about
        # one ulp of 1 in absolute terms, the size of the matmul's own rounding of z; an exact expm1 here
        # makes the big-tile epilogues spill registers on sm_90.
        e = tl.exp(-2.0 * tl.abs(z))
        y = (1.0 - e) / (1.0 + e)
        z = tl.where(z < 0, -y, y)
    return z


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
def _linear_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
                       stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_ym, stride_yn,
                       HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
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
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=ar_k[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=ar_k[:, None] < k_left, other=0.0)
        acc = _mma(acc, a, b, PRECISION)
        x_ptrs += x_step
        w_ptrs += w_step
    # Epilogue: z = acc + b, rounded to the output dtype as torch's linear output is, then y = act(z).
    if HAS_BIAS:
        acc += tl.load((b_ptr + n0_64 * stride_b) + ln * stride_b).to(acc_dtype)[None, :]
    out_ty = y_ptr.dtype.element_ty
    y = _activate(acc.to(out_ty).to(acc_dtype), ACTIVATION)
    mask = (ar_m < M - m0)[:, None] & (ar_n < N - n0)[None, :]
    y_ptrs = (y_ptr + m0_64 * stride_ym + n0_64 * stride_yn) + (ar_m[:, None] * stride_ym + ar_n[None, :] * stride_yn)
    tl.store(y_ptrs, y.to(out_ty), mask=mask)


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


# ----------------------------------------------------------------- launch plumbing
def _dtype_class(dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "half"


def _precision(dtype_class: str) -> str:
    return "ieee" if dtype_class == "ieee" else "tf32"  # fp16/bf16 ignore it; "tf32" is tl.dot's default


def _config_kwargs(config) -> dict:
    return dict(zip(_FIELDS, config))


_TUNED = {}


def _tuned(kernel, kind: str, dtype_class: str):
    key = (kind, dtype_class)
    if key not in _TUNED:
        configs = []
        for c in CONFIGS[kind][dtype_class]:
            kw = _config_kwargs(c)
            configs.append(triton.Config({k: kw[k] for k in _FIELDS[:4]}, num_warps=kw["num_warps"],
                                         num_stages=kw["num_stages"]))
        _TUNED[key] = triton.autotune(configs=configs, key=AUTOTUNE_KEY)(kernel)
    return _TUNED[key]


def _launch(kernel, kind, dtype, grid, args, consts):
    """Run ``kernel``: one config under the interpreter and for fp64, else the autotuned configs."""
    dtype_class = _dtype_class(dtype)
    consts = {**consts, "PRECISION": _precision(dtype_class)}
    if interpreting() or dtype_class == "fp64":
        kw = _config_kwargs(INTERPRETER_CONFIG if interpreting() else FP64_CONFIG)
        kernel[grid(kw)](*args, **consts, **kw)
    else:
        _tuned(kernel, kind, dtype_class)[grid](*args, **consts)


_MAX_TILE = 128  # the largest tile side in any config
_INT32_LIMIT = 2**31


def _tile_safe(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy when its strides could overflow the int32 offsets inside a tile.

    Tile origins are int64; offsets within a tile are int32 (fewer registers), which holds while
    every stride is below 2³¹ / 128 (16M elements): only huge column-major operands need the copy.
    """
    return t.contiguous() if max(t.stride(), default=0) * _MAX_TILE >= _INT32_LIMIT else t


def _grad_z_args(dy, y, activation):
    """dY and Y (Y stands in for itself only with an activation; else dY is passed, unread)."""
    dy = _tile_safe(dy)
    y = _tile_safe(y) if activation != "none" else dy
    return (dy, y), (*dy.stride(), *y.stride())


def linear_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, activation: str) -> torch.Tensor:
    (M, K), N = x.shape, w.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    x, w = _tile_safe(x), _tile_safe(w)
    bias = _tile_safe(b) if b is not None else y
    stride_b = bias.stride(0) if b is not None else 0

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _launch(_linear_fwd_kernel, "fwd", x.dtype, grid,
            (x, w, bias, y, M, N, K, *x.stride(), *w.stride(), stride_b, *y.stride()),
            {"HAS_BIAS": b is not None, "ACTIVATION": ACTIVATIONS[activation]})
    return y


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
_SIZES = {"M": "i32", "N": "i32", "K": "i32"}


def _signature(pointers, dtype_name, sizes, strides, constexprs):
    sig = {p: f"*{dtype_name}" for p in pointers}
    sig.update({s: _SIZES[s] for s in sizes})
    sig.update({s: "i32" for s in strides})
    sig.update({c: "constexpr" for c in constexprs})  # a unit stride given as a constexpr overrides its i32
    return sig


# kind -> (kernel, pointers, sizes, strides, unit strides, scalar constexprs of the heaviest variant).
# The unit strides are those of row-major operands (an nn.Linear's x, W, y and dY): Triton specializes a
# stride of 1 into a constant at launch, so that is the variant a GPU compiles for them.
_KERNEL_ARGS = {
    "fwd": (_linear_fwd_kernel, ("x_ptr", "w_ptr", "b_ptr", "y_ptr"), "MNK",
            ("stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_b", "stride_ym", "stride_yn"),
            ("stride_xk", "stride_wk", "stride_b", "stride_yn"), {"HAS_BIAS": True, "ACTIVATION": _TANH.value}),
    "input": (_linear_bwd_input_kernel, ("dy_ptr", "y_ptr", "w_ptr", "dx_ptr"), "MNK",
              ("stride_dym", "stride_dyn", "stride_ym", "stride_yn", "stride_wn", "stride_wk", "stride_dxm",
               "stride_dxk"), ("stride_dyn", "stride_yn", "stride_wk", "stride_dxk"), {"ACTIVATION": _TANH.value}),
    "weight": (_linear_bwd_weight_kernel, ("dy_ptr", "y_ptr", "x_ptr", "dw_ptr", "db_ptr"), "MNK",
               ("stride_dym", "stride_dyn", "stride_ym", "stride_yn", "stride_xm", "stride_xk", "stride_dwn",
                "stride_dwk"), ("stride_dyn", "stride_yn", "stride_xk", "stride_dwk"),
               {"ACTIVATION": _TANH.value, "WITH_BIAS": True}),
}


def _aot_configs():
    """Every (config, dtype) the launchers run on a GPU, with the heaviest epilogue (bias + tanh)."""
    for kind, (kernel, pointers, sizes, strides, units, scalars) in _KERNEL_ARGS.items():
        plans = [(dt, cls, c) for cls, dts in (("half", ("fp16", "bf16")), ("tf32", ("fp32",)), ("ieee", ("fp32",)))
                 for dt in dts for c in CONFIGS[kind][cls]] + [("fp64", "fp64", FP64_CONFIG)]
        for dt, cls, config in plans:
            kw = _config_kwargs(config)
            consts = {**scalars, "PRECISION": _precision(cls), **{k: kw[k] for k in _FIELDS[:4]},
                      **{u: 1 for u in units}}
            sig = _signature(pointers, dt, sizes, strides, consts)
            yield kernel, sig, consts, kw["num_warps"], kw["num_stages"]
    bias_strides = ("stride_dym", "stride_dyn", "stride_ym", "stride_yn")
    for dt in (TRITON_DTYPE_NAMES[d] for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)):
        consts = {"ACTIVATION": _TANH.value, **BIAS_CONFIG, "stride_dyn": 1, "stride_yn": 1}
        yield (_linear_bwd_bias_kernel, _signature(("dy_ptr", "y_ptr", "db_ptr"), dt, "MN", bias_strides, consts),
               consts, BIAS_NUM_WARPS)


AOT_CONFIGS = list(_aot_configs())
