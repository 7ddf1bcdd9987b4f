"""The one dispatch point: which implementation runs an op.

Every op of scratchops is split in two registered backend ops, ``<op>_fwd`` and
``<op>_bwd`` (``torch.library.custom_op`` in the ``scratchops`` namespace). Each
takes the backend name as its first argument and runs either

* ``triton``: the launcher of the same name in ``triton_kernels/<family>.py``, or
* ``reference``: the plain-torch formula of the same name in ``scratchops/<family>.py``.

The backend is chosen here, once per forward call, by :func:`choose_backend`:

* ``reference`` when asked for (``use_backend("reference")`` or
  ``SCRATCHOPS_BACKEND=reference``);
* ``triton`` for CUDA tensors, or for CPU tensors when Triton runs in interpreter
  mode (``TRITON_INTERPRET=1``), when the op's kernels support the dtype;
* otherwise ``reference`` under ``auto`` (the default), and a ``RuntimeError``
  under an explicit ``triton`` request that cannot be met.

The autograd.Function stores the forward's choice and hands it to the backward op.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "SCRATCHOPS_BACKEND"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Stack of names pushed by use_backend(); the innermost request wins.
_requests: list[str] = []

# How many times each (op, backend) ran: tests read it to prove a kernel ran.
LAUNCHES: collections.Counter = collections.Counter()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"scratchops: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def requested_backend() -> str:
    """The backend asked for: the innermost ``use_backend``, else ``$SCRATCHOPS_BACKEND``, else auto."""
    if _requests:
        return _requests[-1]
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed scratchops calls on ``name`` ("triton", "reference" or "auto")."""
    _requests.append(_check_name(name))
    try:
        yield
    finally:
        _requests.pop()


def interpreter_mode() -> bool:
    """True when Triton kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once, without importing triton (TRITON_INTERPRET must be set before that import).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype, dtypes=FLOAT_DTYPES) -> str | None:
    """Why the Triton kernels cannot run on this device and dtype, or None if they can."""
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
    requested = requested_backend()
    if requested == "reference":
        return "reference"
    reason = triton_unavailable_reason(tensor.device, tensor.dtype, dtypes)
    if reason is None:
        return "triton"
    if requested == "triton":
        raise RuntimeError(f"scratchops: backend 'triton' was requested but cannot run: {reason}")
    return "reference"


def backend_op(name: str, reference, kernels: str, *, mutates_args=(), fake=None):
    """Register ``scratchops::<name>`` running ``reference`` or the Triton launcher ``<kernels>.<name>``.

    The op's schema is ``reference``'s signature with a leading ``str backend``.
    Its fake (meta) implementation runs ``reference`` on fake tensors unless
    ``fake`` is given (needed where the reference reads data, e.g. ``.item()``).
    """
    schema = torch.library.infer_schema(reference, mutates_args=mutates_args)
    schema = "(str backend" + (", " if schema[1] != ")" else "") + schema[1:]

    def run(backend: str, *args):
        LAUNCHES[name, backend] += 1
        if backend == "triton":
            return getattr(importlib.import_module(kernels), name)(*args)
        return reference(*args)

    op = torch.library.custom_op(f"scratchops::{name}", run, mutates_args=mutates_args, schema=schema)
    op.register_fake(fake or (lambda backend, *args: reference(*args)))
    return op


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype math runs in: float64 for float64, float32 for the other floating types."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(fn: str, value, arg: str = "input", position: int = 1) -> None:
    """Raise torch's TypeError when ``value`` is not a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}(): argument '{arg}' (position {position}) must be Tensor, not {type(value).__name__}")


def check_inplace(x: torch.Tensor) -> None:
    """Raise torch's RuntimeError, before anything is written, for an in-place op autograd would reject."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return
    if x.is_leaf:
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")
    if x._base is not None and x._base.is_leaf:
        raise RuntimeError("a view of a leaf Variable that requires grad is being used in an in-place operation.")
