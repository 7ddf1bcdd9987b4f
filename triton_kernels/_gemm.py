"""The GEMM core shared by linear and conv2d (forward, dgrad, wgrad): tile order, the product step,
the int32/int64 offset guard and the precision choice.

* :func:`tile_ids`: grouped tile order, GROUP consecutive tile rows sweep the tile columns together
  (they share the other operand's tiles while those sit in L2).
* :func:`mma`: ``acc + a·b``: ``tl.dot`` with fp32 accumulation for fp16/bf16/fp32 (tf32 or ieee as
  the INPUT_PRECISION constexpr says), an exact multiply-and-sum for fp64 (``tl.dot`` has no fp64
  form on NVIDIA GPUs: the interpreter would accept it, sm_90 does not).
* :func:`tile_safe`: tile origins are int64 scalars and offsets inside a tile int32 (far fewer
  registers); an operand whose strides could overflow those is copied.
* :func:`dtype_class` / :func:`input_precision`: the config-list name and INPUT_PRECISION of a launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TILE = 128  # the largest tile side of any GEMM config
_INT32_LIMIT = 2**31


@triton.jit
def tile_ids(n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """(tile row, tile column) of this program in grouped order."""
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
def mma(acc, a, b, INPUT_PRECISION: tl.constexpr):
    """acc + a·b: tl.dot (fp32 accumulation) or, for fp64, an exact multiply-and-sum."""
    if a.dtype == tl.float64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


def tile_safe(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy when its strides could overflow the int32 offsets inside a tile.

    That holds while every stride is below 2³¹ / MAX_TILE (16M elements): only huge column-major
    operands need the copy.
    """
    return t.contiguous() if max(t.stride(), default=0) * MAX_TILE >= _INT32_LIMIT else t


def dtype_class(dtype: torch.dtype, allow_tf32: bool) -> str:
    """The config list a GEMM of ``dtype`` launches with: "half", "tf32", "ieee" or "fp64"."""
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "tf32" if allow_tf32 else "ieee"
    return "half"


def input_precision(cls: str) -> str:
    """tl.dot's input_precision for a dtype class ("tf32" is its default; fp16/bf16 ignore it)."""
    return "ieee" if cls in ("ieee", "fp64") else "tf32"


# The element types each dtype class runs (for the AOT lists).
CLASS_TYPES = {"half": ("fp16", "bf16"), "tf32": ("fp32",), "ieee": ("fp32",), "fp64": ("fp64",)}
