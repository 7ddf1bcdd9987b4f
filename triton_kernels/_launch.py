"""How every kernel is launched, and how its ahead-of-time (sm_90) compiles are listed.

One launch policy for every family:

* :func:`interpreting` is the one test for Triton's interpreter (``TRITON_INTERPRET=1``, read once:
  Triton itself reads it when it is imported).
* A :class:`Kernel` wraps a ``@triton.jit`` function with its ``triton.Config`` lists, keyed by name
  (a dtype class such as ``"half"`` / ``"tf32"`` / ``"fp64"``, or ``"default"``), built with
  :func:`config` / :func:`tiles`. A launch picks the list by name; a list of one config launches it
  directly, a longer one is autotuned on a GPU (cached per name); under the interpreter, which
  cannot autotune and pays per program, the kernel's one ``interpreter`` config runs.
* ``Kernel.aot(...)`` lists the sm_90 compiles of exactly those configs: the signature is derived
  from the kernel's own parameters (:func:`signature`), so no family types argument names twice.

Kernel-side conventions live here too: the ``ACC`` constexpr (:func:`acc_dtype`: fp64 for fp64
tensors, fp32 otherwise) is the compute dtype every kernel accumulates in.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import threading

import torch
import triton
import triton.language as tl

from .._common import TRITON_TYPE_NAMES

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_TYPES = ("fp16", "bf16", "fp32", "fp64")
INT_TYPES = ("i8", "u8", "i16", "i32", "i64")


# The interpreter patches module state (triton.language) while a kernel runs: two threads interpreting at once
# can crash the process. Interpreted launches are serialised; compiled launches need no lock.
_INTERPRETER_LOCK = threading.RLock() if _INTERPRETING else contextlib.nullcontext()


def interpreting() -> bool:
    """True when kernels run on CPU tensors in Triton's interpreter."""
    return _INTERPRETING


def acc_dtype(dtype: torch.dtype):
    """The ACC constexpr for tensors of ``dtype``: tl.float64 for float64, tl.float32 for the rest."""
    return tl.float64 if dtype == torch.float64 else tl.float32


# ----------------------------------------------------------------- configs
def config(num_warps: int = 4, num_stages: int = 3, num_ctas: int = 1, **meta) -> triton.Config:
    """One launch configuration: constexpr values (``BLOCK=1024``) plus warps, pipeline stages and CTAs per
    program (``num_ctas`` > 1: a thread-block cluster shares each program's tensors, sm_90+)."""
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages, num_ctas=num_ctas)


def tiles(fields: tuple[str, ...], *rows: tuple) -> list[triton.Config]:
    """Configs from rows of ``(*values of fields, num_warps, num_stages)``: a readable table of GEMM tiles."""
    n = len(fields)
    return [config(row[n], row[n + 1], **dict(zip(fields, row[:n]))) for row in rows]


class Kernel:
    """A ``@triton.jit`` function with the configs it launches with (see the module docstring)."""

    def __init__(self, fn, configs, *, interpreter: triton.Config | None = None, key=()):
        self.fn = fn
        self.configs = configs if isinstance(configs, dict) else {"default": list(configs)}
        self.interpreter = interpreter or next(iter(self.configs.values()))[0]
        self.key = list(key)
        self._tuned = {}

    def __call__(self, grid, *args, cls: str = "default", **consts):
        """Launch over ``grid`` (a tuple, or a function of the chosen config's constexprs)."""
        configs = self.configs[cls]
        if _INTERPRETING:
            meta = self.interpreter.kwargs
            with _INTERPRETER_LOCK:
                self.fn[grid(meta) if callable(grid) else grid](*args, **consts, **meta)
            return
        if len(configs) == 1:
            chosen = configs[0]
            meta = chosen.kwargs
            self.fn[grid(meta) if callable(grid) else grid](*args, **consts, **meta, num_warps=chosen.num_warps,
                                                             num_stages=chosen.num_stages, num_ctas=chosen.num_ctas)
            return
        tuned = self._tuned.get(cls)
        if tuned is None:
            tuned = self._tuned[cls] = triton.autotune(configs=configs, key=self.key)(self.fn)
        tuned[grid](*args, **consts)

    def aot(self, types, constexprs: dict | None = None, *, cls: str = "default", ints: dict | None = None,
            pointers: dict | None = None):
        """One :class:`AotEntry` per (element type in ``types``) x (config of ``cls``)."""
        for dtype in ([types] if isinstance(types, str) else types):
            for c in self.configs[cls]:
                yield aot_entry(self.fn, dtype, {**c.kwargs, **(constexprs or {})}, num_warps=c.num_warps,
                                num_stages=c.num_stages, ints=ints, pointers=pointers, num_ctas=c.num_ctas)


# ----------------------------------------------------------------- ahead-of-time compiles
@dataclasses.dataclass
class AotEntry:
    """One sm_90 compile: what ``triton.compile(ASTSource(fn, signature, constexprs), options)`` gets."""

    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int | None = None
    num_ctas: int = 1


def signature(fn, dtype: str, constexprs: dict, *, ints: dict | None = None, pointers: dict | None = None) -> dict:
    """A kernel's AOT signature, derived from its parameters.

    ``*_ptr`` parameters point at ``dtype`` (``pointers`` overrides some); constexpr parameters, and
    any parameter given a value in ``constexprs`` (a unit stride, as a launch specializes it), are
    ``constexpr``; the other scalars are ``i32`` unless ``ints`` says otherwise (``{"n": "i64"}``).
    """
    sig = {}
    for p in fn.params:
        if p.is_constexpr or p.name in constexprs:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*" + (pointers or {}).get(p.name, dtype)
        else:
            sig[p.name] = (ints or {}).get(p.name, "i32")
    return sig


def aot_entry(fn, dtype: str, constexprs: dict, *, num_warps: int = 4, num_stages: int | None = None,
              ints: dict | None = None, pointers: dict | None = None, num_ctas: int = 1) -> AotEntry:
    """The compile of ``fn`` for pointers to ``dtype`` with these constexprs (defaults filled in)."""
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.default is not inspect.Parameter.empty}
    consts = {**defaults, **constexprs}
    return AotEntry(fn, signature(fn, dtype, consts, ints=ints, pointers=pointers), consts, num_warps, num_stages,
                    num_ctas)


def type_name(dtype: torch.dtype) -> str:
    """Triton's name of a torch dtype in a signature (``torch.float32`` -> ``fp32``)."""
    return TRITON_TYPE_NAMES[dtype]


# ----------------------------------------------------------------- elementwise layouts
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


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host's grids: plain integer arithmetic (``triton.cdiv`` costs microseconds a call)."""
    return -(-a // b)


def grid_1d(n: int, block: int) -> tuple[int]:
    return (cdiv(n, block),)


# ----------------------------------------------------------------- device helpers
@triton.jit
def flat_offsets(n, BLOCK: tl.constexpr):
    """This program's BLOCK offsets into a flat tensor of n elements (int64), and their in-bounds mask."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n
