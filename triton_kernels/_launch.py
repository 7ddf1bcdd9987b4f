"""Launcher helpers shared by the kernel families (layouts, grids, dtypes)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# The Triton element type a kernel argument gets for each torch dtype (for AOT configs).
TRITON_DTYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
}
FLOAT_DTYPE_NAMES = ("fp16", "bf16", "fp32", "fp64")


@triton.jit
def acc_type(x):
    """Compute type for a loaded block: fp64 stays fp64, other floats go to fp32."""
    return x.to(tl.float64) if x.dtype == tl.float64 else x.to(tl.float32)


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t``'s elements fill one block of memory exactly (any dim order, no gaps or overlaps)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def elementwise_out(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor shaped like ``like`` in its dense layout (contiguous if ``like`` is not dense)."""
    out = torch.empty_like(like, dtype=dtype)
    return out if is_dense(out) else torch.empty(like.shape, dtype=out.dtype, device=like.device)


def same_layout(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its memory lines up element for element with ``out``, else a copy that does.

    This is how non-contiguous, sliced and expanded (zero-stride) operands reach
    the flat 1-D elementwise kernels.
    """
    if t.stride() == out.stride() and is_dense(t):
        return t
    return torch.empty_strided(out.shape, out.stride(), dtype=t.dtype, device=t.device).copy_(t)


def grid_1d(n: int, block: int) -> tuple[int]:
    return (triton.cdiv(n, block),)
