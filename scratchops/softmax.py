r"""Softmax and log-softmax along one dim.

Forward, over each row x (the slice along ``dim``), with m = max_j x_j:

    softmax       y_i = e^{x_i - m} / Σ_j e^{x_j - m}
    log_softmax   y_i = x_i - m - log Σ_j e^{x_j - m}

Subtracting m changes nothing mathematically and keeps every exponent ≤ 0. A row
that is -inf everywhere gives NaN (as torch), a NaN or +inf in a row makes the
row NaN (as torch).

Backward, written with the saved output Y only (the input is never kept):

    softmax       dX = Y ⊙ (dY - Σ dY⊙Y)      since ∂y_i/∂x_k = y_i (δ_ik - y_k)
    log_softmax   dX = dY - e^{Y} · Σ dY       since ∂y_i/∂x_k = δ_ik - softmax(x)_k

with the sums along ``dim``. ``dtype=`` casts the input before the op (the cast
is differentiable, so the gradient comes back in the input's dtype).
"""
import operator
import warnings

import torch

from scratchops._backend import backend_op, choose_backend
from scratchops._common import compute_dtype, type_name

KERNELS = "softmax"


# ----------------------------------------------------------------- reference math
def _shifted(x: torch.Tensor, dim: int):
    """(z, s): z = x - max(x) and s = Σ e^z along dim, in the compute dtype."""
    xc = x.to(compute_dtype(x.dtype))
    z = xc - xc.amax(dim, keepdim=True)
    return z, torch.exp(z).sum(dim, keepdim=True)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the canonical contiguous strides torch's outputs have (size-1 dims included)."""
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.insert(0, step)
        step *= max(size, 1)
    return t if t.stride() == tuple(strides) else torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def softmax_fwd(x: torch.Tensor, dim: int) -> torch.Tensor:
    if not x.numel():
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    z, s = _shifted(x, dim)
    return _dense((torch.exp(z) / s).to(x.dtype))


def log_softmax_fwd(x: torch.Tensor, dim: int) -> torch.Tensor:
    if not x.numel():
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    z, s = _shifted(x, dim)
    return _dense((z - torch.log(s)).to(x.dtype))


def softmax_bwd(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    if not y.numel():
        return torch.empty(y.shape, dtype=y.dtype, device=y.device)
    yc, dyc = y.to(compute_dtype(y.dtype)), dy.to(compute_dtype(y.dtype))
    # dX = Y ⊙ (dY - Σ dY⊙Y)
    return _dense((yc * (dyc - (dyc * yc).sum(dim, keepdim=True))).to(y.dtype))


def log_softmax_bwd(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    if not y.numel():
        return torch.empty(y.shape, dtype=y.dtype, device=y.device)
    yc, dyc = y.to(compute_dtype(y.dtype)), dy.to(compute_dtype(y.dtype))
    # dX = dY - e^Y · Σ dY
    return _dense((dyc - torch.exp(yc) * dyc.sum(dim, keepdim=True)).to(y.dtype))


# ----------------------------------------------------------------- backend ops
softmax_fwd_op = backend_op("softmax_fwd", softmax_fwd, KERNELS)
softmax_bwd_op = backend_op("softmax_bwd", softmax_bwd, KERNELS)
log_softmax_fwd_op = backend_op("log_softmax_fwd", log_softmax_fwd, KERNELS)
log_softmax_bwd_op = backend_op("log_softmax_bwd", log_softmax_bwd, KERNELS)


# ----------------------------------------------------------------- autograd
def _softmax_function(name: str, fwd_op, bwd_op, formula: str):
    """The autograd.Function of softmax or log-softmax: y = fwd(x, dim) saved, dx = bwd(y, dy, dim)."""

    def forward(x, dim, backend):
        return fwd_op(backend, x, dim)

    def setup_context(ctx, inputs, output):
        _, ctx.dim, ctx.backend = inputs
        ctx.save_for_backward(output)

    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dx = bwd_op(ctx.backend, y, dy, ctx.dim) if ctx.needs_input_grad[0] else None
        return dx, None, None  # x, dim, backend

    backward.__doc__ = formula
    return type(name, (torch.autograd.Function,), {
        "__doc__": f"{fwd_op.__name__[:-len('_fwd_op')]}(x, dim, backend); backward {formula}",
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward)})


SoftmaxFunction = _softmax_function("SoftmaxFunction", softmax_fwd_op, softmax_bwd_op, "dX = Y ⊙ (dY - Σ dY⊙Y)")
LogSoftmaxFunction = _softmax_function("LogSoftmaxFunction", log_softmax_fwd_op, log_softmax_bwd_op,
                                       "dX = dY - e^Y · Σ dY")


# ----------------------------------------------------------------- functional
def _implicit_dim(name: str, ndim: int, stacklevel: int) -> int:
    """torch's deprecated choice of dim when none is given: 0 for 0-, 1- and 3-d inputs, else 1."""
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. "
                  "Change the call to include dim=X as an argument.", stacklevel=stacklevel)
    return 0 if ndim in (0, 1, 3) else 1


def _prepare(name: str, input, dim, dtype):
    """Validate as torch does (same exception types) and return (x, dim) with dim in [0, ndim)."""
    if not isinstance(input, torch.Tensor):
        raise AttributeError(f"'{type(input).__name__}' object has no attribute '{name}'")
    if isinstance(dim, bool) or not hasattr(dim, "__index__"):
        raise TypeError(f"{name}(): argument 'dim' (position 1) must be int, not {type(dim).__name__}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name}(): argument 'dtype' must be torch.dtype, not {type(dtype).__name__}")
    dim, rank = operator.index(dim), max(input.dim(), 1)
    if not -rank <= dim < rank:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-rank}, {rank - 1}], but got {dim})")
    dim %= rank
    x = input if dtype is None else input.to(dtype)
    if not x.is_floating_point() and x.numel():
        kernel = "lastdim_kernel_impl" if dim == x.dim() - 1 or x.dim() == 0 else "kernel_impl"
        raise NotImplementedError(f'"{name}_{kernel}" not implemented for \'{type_name(x.dtype)}\'')
    return x, dim


def softmax(input: torch.Tensor, dim=None, _stacklevel: int = 3, dtype=None) -> torch.Tensor:
    if dim is None and isinstance(input, torch.Tensor):
        dim = _implicit_dim("softmax", input.dim(), _stacklevel)
    x, dim = _prepare("softmax", input, dim, dtype)
    if not x.is_floating_point():  # empty integer input: torch returns it unchanged (as a new tensor)
        return x.clone(memory_format=torch.contiguous_format)
    return SoftmaxFunction.apply(x, dim, choose_backend(x))


def log_softmax(input: torch.Tensor, dim=None, _stacklevel: int = 3, dtype=None) -> torch.Tensor:
    if dim is None and isinstance(input, torch.Tensor):
        dim = _implicit_dim("log_softmax", input.dim(), _stacklevel)
    x, dim = _prepare("log_softmax", input, dim, dtype)
    if not x.is_floating_point():  # empty integer input: torch returns it unchanged (as a new tensor)
        return x.clone(memory_format=torch.contiguous_format)
    return LogSoftmaxFunction.apply(x, dim, choose_backend(x))
