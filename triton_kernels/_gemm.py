"""The GEMM core shared by linear and conv2d (forward, dgrad, wgrad): tile order, the product step,
the int32/int64 offset guard and the precision choice.

* :func:`tile_ids` / :func:`tile_coords`: grouped tile order, GROUP consecutive tile rows sweep the tile
  columns together (they share the other operand's tiles while those sit in L2); :func:`tile_start`: a
  pointer kernel's prologue (tile origin, wrapped in-tile rows and columns).
* the sm_90 fast path (:func:`tma_descriptors`, :func:`block_shapes`, :func:`set_blocks`, :func:`persistent_grid`):
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
_SAFE_NUMEL = _INT32_LIMIT // MAX_TILE


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
    operands need the copy. (A contiguous tensor of fewer elements has no larger stride: no stride walk.)
    """
    if t.is_contiguous() and t.numel() < _SAFE_NUMEL:
        return t
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
_TENSOR_CORE_CLASSES = ("half", "tf32")
_new_descriptor = object.__new__


def _sm90(index: int) -> tuple[bool, int]:
    """(whether CUDA device ``index`` (-1 or None: the current one) is sm_90, its number of SMs), read once."""
    hit = _SM90.get(index)
    if hit is None:
        props = torch.cuda.get_device_properties(index if index is not None and index >= 0 else
                                                 torch.cuda.current_device())
        hit = _SM90[index] = ((props.major, props.minor) == (9, 0), props.multi_processor_count)
    return hit


def block_shapes(kernel, blocks: dict) -> dict:
    """{dtype class: [block shape of each descriptor of ``blocks``]} of a TMA kernel's launches: the launched
    config's where it is known in advance (``Kernel.known_config``), else the constexpr names, which the
    autotuner's pre_hook (:func:`set_blocks`) replaces. One object per distinct shape (:func:`tma_descriptors`
    shares a descriptor between consecutive arguments given the same tensor and shape). Built once per kernel."""
    shapes = {}
    for cls in kernel.configs:
        fixed = kernel.known_config(cls)
        by_dims = {dims: dims if fixed is None else [fixed.kwargs[d] for d in dims] for dims in blocks.values()}
        shapes[cls] = [by_dims[dims] for dims in blocks.values()]
    return shapes


def tma_descriptors(shapes: dict, cls: str, *tensors: torch.Tensor) -> list | None:
    """The 2-D operands of a GEMM of dtype class ``cls`` as host tensor descriptors (``shapes``: the kernel's
    :func:`block_shapes`), or None where the TMA + persistent path does not apply: it does on sm_90 for the
    tensor-core classes ("half", "tf32"), and under the interpreter for every class (so CPU CI runs it), when
    a descriptor can address every operand (one dtype, unit last stride, 16-byte aligned base and row stride).

    One pass per launch (host time: 3-4 descriptors per GEMM): each operand's strides are read once, a tensor
    passed again with the same block shape (dY standing in for Y) shares the previous descriptor, and the
    descriptors are made without ``TensorDescriptor.__init__``, whose checks are the ones made here (its
    ``padding`` and, in 3.7+, ``round_f32_to_tf32`` stay the class defaults). TMA addresses with 64-bit
    offsets, so the operands need no :func:`tile_safe` copy."""
    first = tensors[0]
    if not interpreting() and (cls not in _TENSOR_CORE_CLASSES or not first.is_cuda or
                               not _sm90(first.get_device())[0]):
        return None
    dtype, size = first.dtype, first.element_size()
    descs, previous, previous_block, desc = [], None, None, None
    for t, block in zip(tensors, shapes[cls]):
        if t is previous and block is previous_block:
            descs.append(desc)
            continue
        stride = t.stride()
        if t.dtype != dtype or stride[1] != 1 or (stride[0] * size) % 16 or t.data_ptr() % 16:
            return None
        desc = _new_descriptor(TensorDescriptor)
        desc.base, desc.shape, desc.strides, desc.block_shape = t, t.shape, stride, block
        descs.append(desc)
        previous, previous_block = t, block
    return descs


def set_blocks(shapes: dict):
    """A config ``pre_hook``: sets each named descriptor's block shape from the config's constexprs (``shapes``
    as :func:`block_shapes`' ``blocks``). The autotuner calls it with the launch's arguments and the config's
    constexprs before each launch."""
    def hook(nargs):
        for name, dims in shapes.items():
            nargs[name].block_shape = [nargs[d] for d in dims]
    return hook


def persistent_grid(t: torch.Tensor, tiles: int) -> tuple[int]:
    """One program per SM of ``t``'s device (fewer when there are fewer tiles); each loops over its share of the
    tiles."""
    return (max(1, min(INTERPRETER_PROGRAMS if interpreting() else _sm90(t.get_device())[1], tiles)),)


# The element types each dtype class runs (for the AOT lists).
CLASS_TYPES = {"half": ("fp16", "bf16"), "tf32": ("fp32",), "ieee": ("fp32",), "fp64": ("fp64",)}
