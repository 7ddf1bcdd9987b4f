"""Triton kernels for linear: Z = X·Wᵀ + b, Y = act(Z), and the three gradients.

Shapes: X (M, K), W (N, K), b (N,), Y (M, N). Every operand is addressed through
its strides (a transposed W or a sliced X costs no copy; zero-stride gradients
work). Tiles are visited in grouped order (GROUP_M output-tile rows share the
same column tiles of the other operand, which keeps them in L2).

* ``_linear_fwd_kernel`` (here): tiled Z = X·Wᵀ, then b and the activation in the epilogue.
* the backward kernels, in ``triton_kernels.linear_bwd``: dX = dZ·W, dW = dZᵀ·X with db fused in,
  and db alone; this file also holds the helpers, configs and launch plumbing they share.

Products: fp16/bf16 on the tensor cores (``tl.dot``) with fp32 accumulation; fp32
through ``tl.dot`` with ``PRECISION`` "tf32" or "ieee"; fp64 by an exact
multiply-and-sum (``tl.dot`` has no fp64 form on NVIDIA GPUs). On a GPU a small
config list is autotuned per dtype class; under the interpreter one small config runs.
Offsets: each tile's origin is an int64 scalar, offsets within a tile are int32 (far fewer
registers; ``_tile_safe`` copies the rare operand whose strides would overflow them).
"""
import os

import torch
import triton
import triton.language as tl

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


# ----------------------------------------------------------------- ahead-of-time configs
_SIZES = {"M": "i32", "N": "i32", "K": "i32"}


def signature(pointers, dtype_name, sizes, strides, constexprs):
    sig = {p: f"*{dtype_name}" for p in pointers}
    sig.update({s: _SIZES[s] for s in sizes})
    sig.update({s: "i32" for s in strides})
    sig.update({c: "constexpr" for c in constexprs})  # a unit stride given as a constexpr overrides its i32
    return sig


def aot_entries(kinds):
    """(kernel, signature, constexprs, num_warps, num_stages) for every (config, dtype) of ``kinds``,
    with the heaviest epilogue (bias + tanh) and row-major unit strides (see KERNEL_ARGS)."""
    for kind in kinds:
        kernel, pointers, sizes, strides, units, scalars = KERNEL_ARGS[kind]
        plans = [(dt, cls, c) for cls, dts in (("half", ("fp16", "bf16")), ("tf32", ("fp32",)), ("ieee", ("fp32",)))
                 for dt in dts for c in CONFIGS[kind][cls]] + [("fp64", "fp64", FP64_CONFIG)]
        for dt, cls, config in plans:
            kw = _config_kwargs(config)
            consts = {**scalars, "PRECISION": _precision(cls), **{k: kw[k] for k in _FIELDS[:4]},
                      **{u: 1 for u in units}}
            yield kernel, signature(pointers, dt, sizes, strides, consts), consts, kw["num_warps"], kw["num_stages"]


# kind -> (kernel, pointers, sizes, strides, unit strides, scalar constexprs of the heaviest variant).
# The unit strides are those of row-major operands (an nn.Linear's x, W, y and dY): Triton specializes a
# stride of 1 into a constant at launch, so that is the variant a GPU compiles for them.
# triton_kernels.linear_bwd adds its kernels ("input", "weight").
KERNEL_ARGS = {
    "fwd": (_linear_fwd_kernel, ("x_ptr", "w_ptr", "b_ptr", "y_ptr"), "MNK",
            ("stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_b", "stride_ym", "stride_yn"),
            ("stride_xk", "stride_wk", "stride_b", "stride_yn"), {"HAS_BIAS": True, "ACTIVATION": _TANH.value}),
}
AOT_CONFIGS = list(aot_entries(["fwd"]))
