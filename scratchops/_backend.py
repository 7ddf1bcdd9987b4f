"""The one dispatch point: which implementation runs an op, and how it is called.

Every op of scratchops is split in backend ops, ``<op>_fwd`` / ``<op>_bwd`` (:func:`backend_op`).
Each takes the backend name as its first argument and runs either

* ``triton``: the launcher of the same name in ``scratchops._kernels.<family>`` (the repository's
  ``triton_kernels/<family>.py``), or
* ``reference``: the plain-torch formula of the same name in ``scratchops/<family>.py``.

The backend is chosen once per forward call by :func:`choose_backend`:

* ``reference`` when asked for (``use_backend("reference")`` or ``SCRATCHOPS_BACKEND=reference``);
* ``triton`` for CUDA tensors, or for CPU tensors when Triton runs in interpreter mode
  (``TRITON_INTERPRET=1``), when the op's kernels support the dtype;
* otherwise ``reference`` under ``auto`` (the default), and a ``RuntimeError`` under an explicit
  ``triton`` request that cannot be met.

``use_backend`` is thread-local, as torch's own context managers are. The autograd.Function
stores the forward's choice and hands it to the backward ops.

How a backend op is called. Each is also registered as ``torch.ops.scratchops.<name>``
(``torch.library.custom_op``, with a fake implementation), which is what ``torch.compile``,
``torch.export``, fake tensors, functionalization and tensor subclasses see. In plain eager mode
that dispatch is pure host cost, so :meth:`BackendOp.__call__` calls the implementation directly
whenever :func:`eager_plain` says nothing needs the custom op: one check, here and nowhere else.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import importlib.util
import inspect
import os
import threading

import torch
import torch.autograd.forward_ad as forward_ad

from scratchops._common import FLOAT_DTYPES

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "SCRATCHOPS_BACKEND"

# How many times each (op, backend) ran: tests read it to prove a kernel ran.
LAUNCHES: collections.Counter = collections.Counter()

# Every backend op, by name (the contract tests walk it).
REGISTRY: dict = {}


class _Recording(threading.local):
    calls: list | None = None


_recording = _Recording()


@contextlib.contextmanager
def record_calls():
    """Collect ``(name, backend, args)`` of every backend op called in this thread (for the contract tests)."""
    previous, _recording.calls = _recording.calls, []
    try:
        yield _recording.calls
    finally:
        _recording.calls = previous


class _Requests(threading.local):
    """Per thread: the stack of names pushed by use_backend(); the innermost request wins."""

    def __init__(self):
        self.stack: list[str] = []


_requests = _Requests()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"scratchops: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


# os.environ's own mapping, read without its per-call key encoding (about 1 µs a read on the hot path);
# os.environ[...] = ... and monkeypatch.setenv write it, so a change at run time is still seen.
_ENVIRON = os.environ
_FAST_ENV = isinstance(getattr(_ENVIRON, "_data", None), dict) and hasattr(_ENVIRON, "encodekey")


def _env_reader(name: str, value: str | None = None):
    """A function returning ``os.environ.get(name)``, or, given ``value``, whether that equals ``value``."""
    if not _FAST_ENV:
        return (lambda: _ENVIRON.get(name)) if value is None else (lambda: _ENVIRON.get(name) == value)
    get, key = _ENVIRON._data.get, _ENVIRON.encodekey(name)
    if value is not None:
        raw_value = _ENVIRON.encodevalue(value)
        return lambda: get(key) == raw_value
    decode = _ENVIRON.decodevalue

    def read():
        raw = get(key)
        return None if raw is None else decode(raw)
    return read


_backend_env = _env_reader(ENV_VAR)
_interpreting_env = _env_reader("TRITON_INTERPRET", "1")


def env_backend() -> str:
    """``$SCRATCHOPS_BACKEND`` (default ``auto``), checked."""
    value = _backend_env()
    if value is None or value == "auto":
        return "auto"
    return _check_name(value.strip().lower() or "auto")


def current_backend() -> str:
    """The backend requested in this thread: the innermost ``use_backend``, else ``$SCRATCHOPS_BACKEND``, else auto."""
    stack = _requests.stack
    return stack[-1] if stack else env_backend()


requested_backend = current_backend  # the name earlier releases exported


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed scratchops calls of this thread on ``name`` ("triton", "reference" or "auto")."""
    stack = _requests.stack
    stack.append(_check_name(name))
    try:
        yield
    finally:
        stack.pop()


def interpreter_mode() -> bool:
    """True when Triton kernels run on CPU tensors through Triton's interpreter."""
    return _interpreting_env()


# Looked up once, without importing triton (TRITON_INTERPRET must be set before that import).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype, dtypes=FLOAT_DTYPES) -> str | None:
    """Why the Triton kernels cannot run on this device and dtype, or None if they can."""
    if device.type == "cuda" and TRITON_INSTALLED and dtype in dtypes:  # the GPU's common case, first
        return None
    if not TRITON_INSTALLED:
        return "triton is not installed"
    if device.type == "cpu" and not interpreter_mode():
        return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)"
    if device.type not in ("cpu", "cuda"):
        return f"tensors on {device.type} are not supported by the Triton kernels"
    if dtype not in dtypes:
        return f"the Triton kernels of this op do not support {dtype}"
    if device.type == "cpu" and dtype == torch.bfloat16:
        return "Triton's interpreter does not support bfloat16"
    return None


def choose_backend(tensor: torch.Tensor, dtypes=FLOAT_DTYPES) -> str:
    """The backend that runs an op whose main operand is ``tensor`` (see the module docstring)."""
    stack = _requests.stack
    requested = stack[-1] if stack else env_backend()
    if requested == "reference":
        return "reference"
    dtype = tensor.dtype
    # the common cases first, without building a device object: exactly where the reason below is None
    if TRITON_INSTALLED and dtype in dtypes and (
            tensor.is_cuda or (tensor.is_cpu and dtype is not torch.bfloat16 and interpreter_mode())):
        return "triton"
    reason = triton_unavailable_reason(tensor.device, dtype, dtypes)
    if reason is None:
        return "triton"
    if requested == "triton":
        raise RuntimeError(f"scratchops: backend 'triton' was requested but cannot run: {reason}")
    return "reference"


# ----------------------------------------------------------------- the eager fast path
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_is_compiling = torch.compiler.is_compiling
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


# argument types that need no further look (plain tensors, None, the scalars ops take): a set lookup each
# (isinstance(x, torch.Tensor) is ~20x slower for a non-tensor than for a tensor)
_SCALAR_TYPES = frozenset((type(None), bool, int, float, str, torch.dtype))
_PLAIN_ARG_TYPES = _SCALAR_TYPES | {torch.Tensor, torch.nn.Parameter}


def eager_plain(args) -> bool:
    """True when a direct call gives what the custom op would: eager mode, no dispatch mode (fake
    tensors, functionalization, export), no functorch transform, and every tensor a plain one."""
    if _is_compiling() or _dispatch_modes() or _functorch_active():
        return False
    for a in args:
        kind = type(a)
        if kind in _PLAIN_ARG_TYPES:
            continue
        if kind is list or kind is tuple or isinstance(a, (list, tuple)):
            for t in a:
                if type(t) not in _PLAIN_ARG_TYPES and isinstance(t, torch.Tensor):
                    return False
        elif isinstance(a, torch.Tensor):
            return False
    return True


_grad_enabled = torch.is_grad_enabled
_FUNCTION_C_APPLY = torch._C._FunctionBase.__dict__["apply"]  # autograd's C++ apply (a classmethod descriptor)


class Function(torch.autograd.Function):
    """Base of every scratchops autograd.Function: ``apply`` without torch's Python toll in plain eager mode.

    torch's ``Function.apply`` binds default arguments through ``inspect.signature`` on every call (about half
    the host time of a small op) before autograd's C++ apply; scratchops' forwards take no defaults, so in
    eager mode with no torch.func transform the C++ apply is called directly (bound once per class). Under
    dynamo and functorch transforms ``apply`` is torch's own.

    ``fresh_outputs = True`` declares that ``forward`` returns only new tensors (never an input, nothing marked
    dirty): then, where autograd records nothing (grad mode off, eager, no torch.func transform, no forward-AD
    level; a backward run without ``create_graph``), ``apply`` calls ``forward`` itself, which gives the same
    tensors without autograd's per-call node (several µs of host time).
    """

    fresh_outputs = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._c_apply = _FUNCTION_C_APPLY.__get__(None, cls)

    @classmethod
    def apply(cls, *args):
        if _is_compiling() or _functorch_active():
            return super().apply(*args)
        # as torch's apply does outside transforms: a tensor a finished transform left wrapped is unwrapped
        args = [a if type(a) in _SCALAR_TYPES else _unwrap_if_dead(a) if isinstance(a, torch.Tensor) else a
                for a in args]
        if cls.fresh_outputs and forward_ad._current_level < 0 and not _grad_enabled():
            return cls.forward(*args)
        return cls._c_apply(*args)


def forward_mode() -> bool:
    """True where an autograd.Function's ``jvp`` may be needed: under a torch.func transform or inside a
    forward-AD dual level. Dynamo cannot trace Functions that define ``jvp``, so ops apply their
    jvp-carrying Function only then (see :func:`with_jvp`)."""
    return not _is_compiling() and (_functorch_active() or forward_ad._current_level >= 0)


def with_jvp(function, jvp):
    """``function`` subclassed with ``jvp`` added: apply it where :func:`forward_mode` holds."""
    return type(f"{function.__name__}WithJvp", (function,), {"jvp": staticmethod(jvp), "__doc__": function.__doc__})


def batch_first(info, t, d):
    """vmap rules: ``t`` with its batch dim ``d`` at the front (an unbatched ``t`` expanded to the batch; None kept)."""
    return t if t is None else t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)


def terminal_function(name: str, compute, message: str):
    """A Function that returns ``compute(*args)`` and whose own backward raises ``NotImplementedError(message)``.

    A derivative that is not implemented fails loudly where it is taken (also under create_graph=True and the
    torch.func transforms, which always build graphs), never a gradient without a graph. ``compute`` is plain
    torch, so the vmap rule is generated."""

    def backward(ctx, *grads):
        raise NotImplementedError(message)

    return type(name, (Function,), {"__doc__": compute.__doc__, "generate_vmap_rule": True,
                                    "forward": staticmethod(compute), "backward": staticmethod(backward),
                                    "setup_context": staticmethod(lambda ctx, inputs, output: None)})


def tangent_functions(op: str, **computes):
    """Terminal Functions (in the order given) that compute forward-mode tangents with plain torch: reverse mode
    through a tangent raises instead of differentiating those formulas with the statistics held constant."""
    message = (f"scratchops.{op}: reverse mode through a forward-mode derivative (jacrev of jacfwd, or a third "
               "derivative) is not implemented; torch.func.hessian (forward over reverse) is")
    return tuple(terminal_function(name, compute, message) for name, compute in computes.items())


def backend_op(name: str, reference, family: str, *, mutates_args=(), fake=None):
    """``scratchops::<name>``: the reference formula or the Triton launcher ``<family>.<name>``.

    Returns ``op(backend, *args)``. In plain eager mode (:func:`eager_plain`) the implementation
    runs directly; otherwise through the registered custom op (``op.custom``), whose schema is
    ``reference``'s signature with a leading ``str backend``. Its fake (meta) implementation runs
    ``reference`` on fake tensors unless ``fake`` is given (needed where the reference reads data,
    e.g. ``.item()``). The launcher is imported once, on first use.
    """
    impls = {"reference": reference}
    mutated = [i for i, arg in enumerate(inspect.signature(reference).parameters) if arg in mutates_args]

    def impl(backend: str):
        fn = impls.get(backend)
        if fn is None:
            fn = impls[backend] = getattr(importlib.import_module(f"scratchops._kernels.{family}"), name)
        return fn

    def run(backend: str, *args):
        LAUNCHES[name, backend] += 1
        return impl(backend)(*args)

    schema = torch.library.infer_schema(reference, mutates_args=mutates_args)
    schema = "(str backend" + (", " if schema[1] != ")" else "") + schema[1:]
    custom = torch.library.custom_op(f"scratchops::{name}", run, mutates_args=mutates_args, schema=schema)
    custom.register_fake(fake or (lambda backend, *args: reference(*args)))
    overload = getattr(torch.ops.scratchops, name).default

    def op(backend: str, *args):
        if _recording.calls is not None:
            _recording.calls.append((name, backend, args))
        if not eager_plain(args):
            return overload(backend, *args)
        LAUNCHES[name, backend] += 1  # run(backend, *args), inlined (host time)
        out = (impls.get(backend) or impl(backend))(*args)
        for i in mutated:  # as the custom op would: autograd must see the write
            torch.autograd.graph.increment_version(args[i])
        return out

    op.__name__ = op.__qualname__ = f"{name}_op"
    op.custom, op.impl, op.reference, op.family = custom, impl, reference, family
    REGISTRY[name] = op
    return op
