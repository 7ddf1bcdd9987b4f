"""How every kernel is launched, and how its ahead-of-time (sm_90) compiles are listed.

One launch policy for every family:

* :func:`interpreting` is the one test for Triton's interpreter (``TRITON_INTERPRET=1``, read once:
  Triton itself reads it when it is imported).
* A :class:`Kernel` wraps a ``@triton.jit`` function with its ``triton.Config`` lists, keyed by name
  (a dtype class such as ``"half"`` / ``"tf32"`` / ``"fp64"``, or ``"default"``), built with
  :func:`config` / :func:`tiles`. A launch picks the list by name; a list of one config launches it
  directly, a longer one is autotuned on a GPU (cached per name; once the Autotuner has chosen a config
  for a key, later launches go straight to that config's compiled kernel); under the interpreter, which
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


# Compiled launches past Triton's per-launch Python (Kernel._launch_compiled, and Kernel._launch_tuned for autotuned
# lists): only on the Triton versions whose JITFunction.run and Autotuner.run they mirror (3.6, 3.7 and 3.9: the
# same binder, cache key inputs and launcher call; the same autotuning key, config cache and pre_hook call), and
# not under the interpreter. Any other version takes Autotuner.run / JITFunction.run every launch.
_DIRECT_LAUNCH = not _INTERPRETING and tuple(int(v) for v in triton.__version__.split(".")[:2]) in ((3, 6), (3, 7),
                                                                                                   (3, 9))
if _DIRECT_LAUNCH:
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver


def _index_of_one_element_tensors() -> None:
    """Triton 3.6's interpreter turns a scalar (a kernel argument, ``tl.program_id``, a scalar ``tl.load``) used as
    an index, e.g. a ``range`` bound, into a Python int with ``int(array)`` of a 1-element array, which NumPy >= 2.4
    rejects (TypeError). Triton 3.7 squeezes the array first; on 3.6 the same ``__index__`` is set after Triton's
    own (the interpreter's patch scope restores both, last first). Nothing else of Triton is changed."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


if _INTERPRETING and triton.__version__.startswith("3.6."):
    _index_of_one_element_tensors()


def _knob_state() -> tuple:
    """The knobs JITFunction.run folds into every launch's options (so into its cache key)."""
    compilation = _knobs.compilation
    return _knobs.runtime.debug, compilation.instrumentation_mode, getattr(compilation, "fpsan_homomorphic_casts", None)


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


def kept(cache: dict, limit: int, key, build, *args):
    """``cache[key]``, made by ``build(*args)`` on first use: a launcher's host work kept per key (shapes, strides,
    dtype, ...). A cache holding ``limit`` entries starts over (many shapes: dynamic sizes)."""
    found = cache.get(key)
    if found is None:
        if len(cache) >= limit:
            cache.clear()
        found = cache[key] = build(*args)
    return found


class Kernel:
    """A ``@triton.jit`` function with the configs it launches with (see the module docstring)."""

    def __init__(self, fn, configs, *, interpreter: triton.Config | None = None, key=()):
        self.fn = fn
        self.configs = configs if isinstance(configs, dict) else {"default": list(configs)}
        self.interpreter = interpreter or next(iter(self.configs.values()))[0]
        self.key = list(key)
        self._tuned = {}
        # per launch, the keyword arguments that never change: the interpreter config's constexprs; a single
        # config's constexprs with its warps and stages
        self._interpreter_meta = dict(self.interpreter.kwargs)
        self._single = {name: {**c[0].kwargs, "num_warps": c[0].num_warps, "num_stages": c[0].num_stages,
                               "num_ctas": c[0].num_ctas}
                        for name, c in self.configs.items() if len(c) == 1}
        self._compiled = {}  # compiled launches: specialization key -> CompiledKernel (_launch_compiled)
        self._arg_names, self._arg_set = fn.arg_names, set(fn.arg_names)
        self._config_kwargs = {}  # autotuned launches: id(config) -> its all_kwargs() (_launch_tuned)

    def known_config(self, cls: str) -> triton.Config | None:
        """The config a launch of class ``cls`` runs when it is known before the launch (the interpreter's; a
        class of one config), else None (autotuned on a GPU)."""
        configs = self.configs[cls]
        return self.interpreter if _INTERPRETING else configs[0] if len(configs) == 1 else None

    def __call__(self, grid, *args, cls: str = "default", **consts):
        """Launch over ``grid`` (a tuple, or a function of the chosen config's constexprs)."""
        configs = self.configs[cls]
        if _INTERPRETING:
            meta = self._interpreter_meta
            # fn.run(..., grid=, warmup=False) is what fn[grid](...) calls (without its per-call proxy)
            with _INTERPRETER_LOCK:
                self.fn.run(*args, grid=grid(meta) if callable(grid) else grid, warmup=False, **consts, **meta)
            return
        if len(configs) == 1:
            meta = self._single[cls]
            grid = grid(meta) if callable(grid) else grid
            if _DIRECT_LAUNCH and not self.fn.pre_run_hooks:
                self._launch_compiled(cls, grid, args, {**consts, **meta})
            else:
                self.fn.run(*args, grid=grid, warmup=False, **consts, **meta)
            return
        tuned = self._tuned.get(cls)
        if tuned is None:
            tuned = self._tuned[cls] = triton.autotune(configs=configs, key=self.key)(self.fn)
        if _DIRECT_LAUNCH and not self.fn.pre_run_hooks:
            self._launch_tuned(tuned, cls, grid, args, consts)
        else:
            tuned[grid](*args, **consts)

    def _launch_tuned(self, tuned, cls: str, grid, args: tuple, consts: dict) -> None:
        """``tuned[grid](*args, **consts)`` with the Autotuner's per-launch Python trimmed (``Autotuner.run`` of
        Triton 3.6, 3.7 and 3.9, read for this: the same key, config cache, pre_hook call and launch).

        The Autotuner's own key (the ``key`` arguments' values, then ``str(dtype)`` of every argument that has a
        dtype) looks up the config it chose; none yet (a new key): the Autotuner's own path, which benchmarks
        and caches it. Else the config's pre_hook (the TMA kernels' :func:`set_blocks`) runs with the arguments
        the Autotuner gives it, and the config's kwargs launch as :meth:`_launch_compiled` (keyed by the
        config too: num_warps/num_stages are options, not part of the specialization).
        """
        positional = dict(zip(self._arg_names, args))
        nargs = positional if not consts else {**positional, **(
            consts if consts.keys() <= self._arg_set else {k: v for k, v in consts.items() if k in self._arg_set})}
        key = [nargs[k] for k in tuned.keys if k in nargs]
        for value in nargs.values():
            if hasattr(value, "dtype"):
                key.append(str(value.dtype))
        config = tuned.cache.get(tuple(key))
        if config is None:
            tuned[grid](*args, **consts)
            return
        tuned.best_config = config
        # by id: Triton 3.9's Config.__hash__ builds all_kwargs() each call (the configs live as long as the Kernel)
        kwargs = self._config_kwargs.get(id(config))
        if kwargs is None:
            kwargs = self._config_kwargs[id(config)] = config.all_kwargs()
        if config.pre_hook is not None:
            config.pre_hook({**positional, "grid": grid, "warmup": False, **consts, **kwargs})
        self._launch_compiled((cls, id(config)), grid, args, {**consts, **kwargs})

    def _launch_compiled(self, cls, grid, args: tuple, kwargs: dict) -> None:
        """``fn.run(*args, grid=grid, warmup=False, **kwargs)`` with its per-launch Python trimmed.

        The first launch of a specialization takes Triton's own path (binding, cache key, compile, launch) and
        keeps the CompiledKernel it returns, keyed by the specialization Triton's binder computes (argument
        types, alignments, values of 1, divisibility, constexprs) and by what else keys Triton's cache here
        (device, config class, debug and instrumentation knobs). A later launch with the same key binds the
        arguments with the same binder and calls the CompiledKernel's launcher as ``JITFunction.run`` does,
        skipping the string cache key, the options parsing and the globals check. ``cls`` is the config class,
        or (class, id(config)) for an autotuned launch; ``grid`` a tuple or a function of the bound arguments.
        """
        fn, active = self.fn, _driver.active
        device = active.get_current_device()
        bound, specialization, _ = fn.device_caches[device][4](*args, **kwargs)
        try:
            key = (device, cls, tuple(specialization), *_knob_state())
            kernel = self._compiled.get(key)
        except TypeError:  # an unhashable specialization value: Triton's path, uncached
            key = kernel = None
        if getattr(_knobs.runtime, "add_stages_inspection_hook", None) is not None:  # it keys compiles per call
            key = kernel = None
        if kernel is None:
            kernel = fn.run(*args, grid=grid, warmup=False, **kwargs)
            if key is not None and kernel is not None:
                self._compiled[key] = kernel
            return
        if callable(grid):  # as JITFunction.run: a function of the bound arguments (constexprs included)
            grid = grid(bound)
        stream = active.get_current_stream(device)
        values = bound.values()
        size = len(grid)
        kernel.run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream, kernel.function,
                   kernel.packed_metadata, kernel.launch_metadata(grid, stream, *values),
                   _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook, *values)

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
    if t.is_contiguous() and t.numel():  # the common case, without sorting strides
        return True
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
    if t.is_contiguous() and out.is_contiguous() and t.shape == out.shape:  # the common case: same flat order
        return t
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


# ----------------------------------------------------------------- device tables
ALIGN_BYTES = tl.constexpr(16)  # tables whose addresses are all multiples of this take the 128-bit kernel variants


def table_columns(n: int) -> tuple:
    """The column (or entry) indices 0..n-1 of a device-side table as constexprs, for kernels to read as globals:
    ``COL_ADDR, COL_NUMEL = table_columns(2)``."""
    return tuple(tl.constexpr(i) for i in range(n))
