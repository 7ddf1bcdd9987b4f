"""``scratchops.enable()``: run code that calls ``torch.nn.functional`` (or ``torch`` / ``Tensor``) on scratchops.

``convert(model)`` swaps modules; models that call the functional ops inside their
own ``forward`` (attention's ``F.softmax``, a classifier head's ``F.cross_entropy``,
``torch.tanh`` in a GELU approximation) are reached by this instead::

    with scratchops.enable():          # or scratchops.enable() ... scratchops.disable()
        loss = model(x)                # F.linear, x.softmax(-1), torch.tanh, ... run scratchops
        loss.backward()

It is a :class:`torch.overrides.TorchFunctionMode`: torch hands every torch-level
call made in this thread to it, and it routes these to their ``scratchops.functional``
twin (same names, signatures and errors):

* ``linear`` (``F.linear``; so ``nn.Linear`` too), ``conv2d`` (``F.conv2d``, ``torch.conv2d``);
* ``relu`` / ``relu_`` (``F.relu`` with ``inplace``, ``torch.relu``, ``Tensor.relu``, and the ``_`` forms),
  ``sigmoid`` and ``tanh`` (``torch.*``, ``Tensor.*``, and ``F.sigmoid`` / ``F.tanh`` through them);
* ``softmax`` / ``log_softmax`` (``F.*``, ``torch.*``, ``Tensor.*``);
* ``mse_loss``, ``cross_entropy``, ``linear_cross_entropy`` (``F.*``); ``dropout`` (``F.dropout``,
  ``torch.dropout`` / ``torch.dropout_``).

Everything else, and any call scratchops does not take, runs torch's own op, unchanged:
tensors that are not plain dense tensors (subclasses such as ``DTensor``, sparse
layouts), devices other than CPU and CUDA, a main operand that is not float16/bfloat16/float32/float64,
``out=`` or other keywords the twin lacks, names for dims. Calls made while an
autograd backward runs are never routed (a hook's or a double-backward's torch
calls stay torch's), and neither are the torch calls scratchops itself makes: the
mode is off while its handler runs.

The state is per thread, like ``use_backend``: ``enable()`` in one thread changes
nothing in another. It is re-entrant: nested ``enable()`` calls count, each
context exit undoes its own; ``disable()`` turns it off in this thread at once.
Under ``torch.compile`` the routed calls are traced as the scratchops custom ops.
"""
from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from scratchops import functional as SF
from scratchops._common import FLOAT_DTYPES

__all__ = ["disable", "enable", "enabled"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_DEVICES = ("cpu", "cuda")
FALLBACK = object()  # an adapter's answer: torch's own op runs


def _plain(*tensors) -> bool:
    """Every tensor a plain, strided (dense) CPU/CUDA one (None allowed)."""
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.layout != torch.strided or t.device.type not in _DEVICES):
            return False
    return True


def _float(t) -> bool:
    """``t`` is a plain dense CPU/CUDA tensor of a floating dtype scratchops computes in."""
    return _plain(t) and t.dtype in FLOAT_DTYPES


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------ adapters: torch's signature -> scratchops
# Each takes the routed function's exact arguments; extra keywords (out=, ...) mean torch's op runs.

def _linear(input, weight, bias=None, **extra):
    if extra or not (_float(input) and _plain(weight, bias)):
        return FALLBACK
    return SF.linear(input, weight, bias)


def _conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, **extra):
    if extra or not (_float(input) and _plain(weight, bias)):
        return FALLBACK
    return SF.conv2d(input, weight, bias, stride, padding, dilation, groups)


def _unary(fn):
    def adapter(input, **extra):
        return FALLBACK if extra or not _float(input) else fn(input)
    return adapter


def _f_relu(input, inplace=False, **extra):
    if extra or not _float(input) or not isinstance(inplace, bool):
        return FALLBACK
    return SF.relu(input, inplace)


def _softmax_of(fn, functional: bool):
    """``F.softmax(input, dim=None, _stacklevel=3, dtype=None)`` or ``torch/Tensor.softmax(input, dim, dtype=None)``."""
    def f_adapter(input, dim=None, _stacklevel=3, dtype=None, **extra):
        if extra or not _float(input) or not (dim is None or _int(dim)):
            return FALLBACK
        return fn(input, dim, _stacklevel, dtype=dtype)

    def t_adapter(input, dim, dtype=None, **extra):
        if extra or not _float(input) or not _int(dim):
            return FALLBACK
        return fn(input, dim, dtype=dtype)
    return f_adapter if functional else t_adapter


def _mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None, **extra):
    if extra or not (_float(input) and _plain(target, weight)):
        return FALLBACK
    return SF.mse_loss(input, target, size_average, reduce, reduction, weight=weight)


def _cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                   reduction="mean", label_smoothing=0.0, **extra):
    if extra or not (_float(input) and _plain(target, weight)):
        return FALLBACK
    return SF.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)


def _linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                          ignore_index=None, label_smoothing=0.0, options=None, **extra):
    if extra or options is not None or not (_float(input) and _plain(linear_weight, target, linear_bias, weight)):
        return FALLBACK  # options asks torch's chunked path for a particular behaviour: torch's op honours it
    return SF.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                   reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing)


def _f_dropout(input, p=0.5, training=True, inplace=False, **extra):
    if extra or not _float(input):
        return FALLBACK
    return SF.dropout(input, p, training, inplace)


def _torch_dropout(inplace: bool):
    def adapter(input, p, train, **extra):
        if extra or not _float(input):
            return FALLBACK
        return SF.dropout(input, p, train, inplace)
    return adapter


def routes() -> dict:
    """torch function -> adapter, for the ops this scratchops has."""
    F, T = torch.nn.functional, torch.Tensor
    table = {
        F.linear: _linear, torch.conv2d: _conv2d,
        F.relu: _f_relu, torch.relu: _unary(SF.relu), T.relu: _unary(SF.relu),
        torch.relu_: _unary(SF.relu_), T.relu_: _unary(SF.relu_),
        torch.sigmoid: _unary(SF.sigmoid), T.sigmoid: _unary(SF.sigmoid),
        torch.tanh: _unary(SF.tanh), T.tanh: _unary(SF.tanh),
        F.softmax: _softmax_of(SF.softmax, True), torch.softmax: _softmax_of(SF.softmax, False),
        T.softmax: _softmax_of(SF.softmax, False),
        F.log_softmax: _softmax_of(SF.log_softmax, True), torch.log_softmax: _softmax_of(SF.log_softmax, False),
        T.log_softmax: _softmax_of(SF.log_softmax, False),
        F.mse_loss: _mse_loss, F.cross_entropy: _cross_entropy,
        F.dropout: _f_dropout, torch.dropout: _torch_dropout(False), torch.dropout_: _torch_dropout(True),
    }
    if hasattr(F, "linear_cross_entropy") and hasattr(SF, "linear_cross_entropy"):
        table[F.linear_cross_entropy] = _linear_cross_entropy
    return table


ROUTES: dict = routes()


def routable() -> bool:
    """Eager calls are routed except during a backward pass (a hook's calls, double backward) and under a
    torch.func transform (vmap, grad, jvp: torch's ops carry every rule those need)."""
    return torch._C._current_autograd_node() is None and not torch._C._are_functorch_transforms_active()


class ScratchopsMode(TorchFunctionMode):
    """The mode ``enable()`` pushes: routes the calls in :data:`ROUTES`, hands every other call to torch."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        adapter = ROUTES.get(func)
        if adapter is not None and (torch.compiler.is_compiling() or routable()):
            out = adapter(*args, **kwargs)
            if out is not FALLBACK:
                return out
        return func(*args, **kwargs)


class _State(threading.local):
    def __init__(self):
        self.depth = 0
        self.mode: ScratchopsMode | None = None


_state = _State()


def enabled() -> bool:
    """Whether ``enable()`` is in effect in this thread."""
    return _state.depth > 0


def _push() -> None:
    if _state.depth == 0:
        mode = ScratchopsMode()
        mode.__enter__()
        _state.mode = mode
    _state.depth += 1


def _pop_mode() -> None:
    mode, stack = _state.mode, _get_current_function_mode_stack()
    if not stack or stack[-1] is not mode:
        raise RuntimeError("scratchops.disable(): a TorchFunctionMode entered after scratchops.enable() is still "
                           "active; exit it first")
    mode.__exit__(None, None, None)
    _state.mode, _state.depth = None, 0


class enable:  # noqa: N801 - a function to its callers: scratchops.enable() / with scratchops.enable():
    """Route this thread's torch calls of scratchops' ops to scratchops (see the module docstring).

    Takes effect at once; as a context manager, its exit undoes this one call
    (the routing stays on while an outer ``enable()`` is in effect).
    """

    def __init__(self):
        _push()
        self._open = True

    def __enter__(self) -> enable:
        return self

    def __exit__(self, *exc) -> None:
        if self._open:
            self._open = False
            if _state.depth == 1:
                _pop_mode()
            elif _state.depth > 1:
                _state.depth -= 1
            # depth 0: disable() already turned it off

    def __repr__(self) -> str:
        return f"scratchops.enable() (in effect in this thread: {enabled()})"


def disable() -> None:
    """Turn ``enable()`` off in this thread, however many times it was entered; torch's ops run again."""
    if _state.depth:
        _pop_mode()
