"""The GEMM core shared by linear and conv2d (forward, dgrad, wgrad): tile order, the product step,
the int32/int64 offset guard and the precision choice.

* :func:`tile_ids` / :func:`tile_coords`: grouped tile order, GROUP consecutive tile rows sweep the tile
  columns together (they share the other operand's tiles while those sit in L2); :func:`tile_start`: a
  pointer kernel's prologue (tile origin, wrapped in-tile rows and columns).
* the sm_90 fast path (:func:`tma_ok`, :func:`descriptors`, :func:`set_blocks`, :func:`persistent_grid`):
  operands as TMA tensor descriptors (``triton.tools.tensor_descriptor.TensorDescriptor``, made on the host:
  3.6, 3.7 and 3.9 take them, the interpreter too, and no device allocator is needed as it is for
  ``tl.make_tensor_descriptor``) and a persistent grid, one program per SM looping over the output tiles.
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
from triton.tools.tensor_descriptor import TensorDescriptor

from ._launch import interpreting

MAX_TILE = 128  # the largest tile side of any GEMM config
_INT32_LIMIT = 2**31


@triton.jit
def tile_ids(n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """(tile row, tile column) of this program in grouped order."""
    return tile_coords(tl.program_id(0), n_rows, n_cols, BLOCK_R, BLOCK_C, GROUP)


@triton.jit
def tile_start(n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """This program's output tile: origin (r0, c0), the same as int64 scalars (they move the pointers; offsets
    inside a tile stay int32), and the in-tile rows/columns wrapped at the edge (lanes past it re-read valid
    rows/columns, never stored: no load masks along them)."""
    pid_r, pid_c = tile_ids(n_rows, n_cols, BLOCK_R, BLOCK_C, GROUP)
    r0, c0 = pid_r * BLOCK_R, pid_c * BLOCK_C
    lr = (r0 + tl.arange(0, BLOCK_R)) % n_rows - r0
    lc = (c0 + tl.arange(0, BLOCK_C)) % n_cols - c0
    return r0, c0, r0.to(tl.int64), c0.to(tl.int64), lr, lc


@triton.jit
def tile_count(n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """How many BLOCK_R x BLOCK_C tiles cover an n_rows x n_cols output (a persistent kernel's loop bound)."""
    return tl.cdiv(n_rows, BLOCK_R) * tl.cdiv(n_cols, BLOCK_C)


@triton.jit
def tile_origin(tile, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """(first row, first column) of tile number ``tile`` in grouped order."""
    pid_r, pid_c = tile_coords(tile, n_rows, n_cols, BLOCK_R, BLOCK_C, GROUP)
    return pid_r * BLOCK_R, pid_c * BLOCK_C


@triton.jit
def tile_coords(pid, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """(tile row, tile column) of tile number ``pid`` in grouped order."""
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


# ----------------------------------------------------------------- the sm_90 fast path (TMA, persistent)
_SM90: dict = {}  # device index -> (is sm_90, number of SMs)
INTERPRETER_PROGRAMS = 3  # the interpreter's "SMs": fewer programs than tiles, so the tile loop runs


def _sm90(device: torch.device) -> tuple[bool, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM90:
        props = torch.cuda.get_device_properties(index)
        _SM90[index] = ((props.major, props.minor) == (9, 0), props.multi_processor_count)
    return _SM90[index]


def tma_ok(cls: str, *tensors: torch.Tensor) -> bool:
    """Whether a GEMM of dtype class ``cls`` on these 2-D operands takes the TMA + persistent path: on sm_90 for
    the tensor-core classes ("half", "tf32"); under the interpreter for every class (so CPU CI runs it). The
    operands must be what a tensor descriptor addresses: one dtype, unit last stride, 16-byte aligned base
    and row stride."""
    first = tensors[0]
    if not interpreting() and (cls not in ("half", "tf32") or not first.is_cuda or not _sm90(first.device)[0]):
        return False
    dtype, size = first.dtype, first.element_size()
    for t in tensors:
        stride = t.stride()
        if t.dtype != dtype or stride[1] != 1 or (stride[0] * size) % 16 or t.data_ptr() % 16:
            return False
    return True


def descriptors(kernel, cls: str, blocks: dict, *tensors: torch.Tensor) -> dict:
    """{descriptor argument: host tensor descriptor} of each 2-D operand (``blocks``: argument -> the constexpr
    names of its block shape, in the kernel's order).

    The block shape is the launched config's: set here where the config is known (the interpreter's, a list of
    one), else by the autotuner through each config's pre_hook (:func:`set_blocks`). The descriptors are built
    without ``TensorDescriptor.__init__``'s checks (µs each, per launch): :func:`tma_ok` made them already.
    """
    configs = kernel.configs[cls]
    fixed = kernel.interpreter if interpreting() else configs[0] if len(configs) == 1 else None
    descs = {}
    for (name, dims), t in zip(blocks.items(), tensors):
        desc = descs[name] = object.__new__(TensorDescriptor)  # padding (and 3.7's tf32 rounding): class defaults
        desc.base, desc.shape, desc.strides = t, t.shape, t.stride()
        desc.block_shape = [fixed.kwargs[d] for d in dims] if fixed is not None else None
    return descs


def set_blocks(shapes: dict):
    """A config ``pre_hook``: sets each named descriptor's block shape from the config's constexprs (``shapes``
    as :func:`descriptors`' ``blocks``). The autotuner calls it with the launch's arguments and the config's
    constexprs before each launch."""
    def hook(nargs):
        for name, dims in shapes.items():
            nargs[name].block_shape = [nargs[d] for d in dims]
    return hook


def persistent_grid(device: torch.device, tiles: int) -> tuple[int]:
    """One program per SM (fewer when there are fewer tiles); each loops over its share of the tiles."""
    return (max(1, min(INTERPRETER_PROGRAMS if interpreting() else _sm90(device)[1], tiles)),)


# The element types each dtype class runs (for the AOT lists).
CLASS_TYPES = {"half": ("fp16", "bf16"), "tf32": ("fp32",), "ieee": ("fp32",), "fp64": ("fp64",)}
