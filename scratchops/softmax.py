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
is differentiable, so the gradient comes back in the input's dtype). Under autocast the ops follow torch's
lists: float32 on CUDA (a half/bfloat16 input without ``dtype=`` is cast), the input's dtype on CPU.

Double backward. The backward is itself an autograd.Function of (Y, G) (G = dY), so
``create_graph=True`` differentiates it. With H the gradient of its output dX,
L = <H, dX>, S1 and S2 row sums (along ``dim``, broadcast back):

    softmax       dX = Y ⊙ G - Y S1,  S1 = Σ Y⊙G,  S2 = Σ H⊙Y
                  ∂L/∂G = Y ⊙ (H - S2)                  (the first backward again, on H)
                  ∂L/∂Y = H ⊙ (G - S1) - S2 G
    log_softmax   dX = G - P S1,  P = e^Y,  S1 = Σ G,  S2 = Σ H⊙P
                  ∂L/∂G = H - S2
                  ∂L/∂Y = -S1 P ⊙ H

and ∂L/∂Y reaches X through the forward's own backward (Y is the forward's output).
Forward mode through the backward (``jacfwd`` of a gradient, so ``torch.func.hessian``), along
tangents (Ẏ, Ġ):

    softmax       d dX = Y ⊙ (Ġ - Σ Y⊙Ġ) + Ẏ ⊙ (G - S1) - Y Σ Ẏ⊙G
    log_softmax   d dX = Ġ - P Σ Ġ - S1 P ⊙ Ẏ
Both run as one backend op (``*_bwd2``), inside a Function whose backward raises: a third
derivative is not implemented, and differentiating the second derivative fails loudly instead
of returning a gradient without a graph.

Forward mode (``jvp``, so ``torch.func.jvp`` / ``jacfwd`` work): the Jacobian of softmax is
symmetric, so Ẏ = Y ⊙ (Ẋ - Σ Ẋ⊙Y) is the backward applied to Ẋ; for log_softmax
Ẏ = Ẋ - Σ P⊙Ẋ, which is ∂L/∂G above with H = Ẋ. Every backend op has a vmap rule (the batch
dim moved to the front, ``dim`` shifted past it), so the Functions use ``generate_vmap_rule``
and ``torch.func.vmap`` / ``vjp`` / ``jacrev`` / ``jacfwd`` work.
"""
import operator
import warnings

import torch

from scratchops._backend import Function, backend_op, choose_backend
from scratchops._common import compute_dtype, type_name

KERNELS, KERNELS_BWD2 = "softmax", "softmax_bwd2"
_functorch_active = torch._C._are_functorch_transforms_active


# ----------------------------------------------------------------- reference math
def _shifted(x: torch.Tensor, dim: int):
    """(z, s): z = x - max(x) and s = Σ e^z along dim, in the compute dtype."""
    xc = x.to(compute_dtype(x.dtype))
    z = xc - xc.amax(dim, keepdim=True)
    return z, torch.exp(z).sum(dim, keepdim=True)


def _empty(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


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


def softmax_bwd2(y: torch.Tensor, g: torch.Tensor, h: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂Y, ∂L/∂G) of L = <H, softmax_bwd(Y, G)> (module docstring)."""
    if not y.numel():
        return _empty(y), _empty(g)
    yc, gc, hc = (t.to(compute_dtype(y.dtype)) for t in (y, g, h))
    s1, s2 = (yc * gc).sum(dim, keepdim=True), (hc * yc).sum(dim, keepdim=True)
    return _dense((hc * (gc - s1) - s2 * gc).to(y.dtype)), _dense((yc * (hc - s2)).to(g.dtype))


def log_softmax_bwd2(y: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                     dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂Y, ∂L/∂G) of L = <H, log_softmax_bwd(Y, G)> (module docstring)."""
    if not y.numel():
        return _empty(y), _empty(g)
    yc, gc, hc = (t.to(compute_dtype(y.dtype)) for t in (y, g, h))
    p = torch.exp(yc)
    s1, s2 = gc.sum(dim, keepdim=True), (hc * p).sum(dim, keepdim=True)
    return _dense((-s1 * p * hc).to(y.dtype)), _dense((hc - s2).to(g.dtype))


def softmax_bwd_jvp(y: torch.Tensor, g: torch.Tensor, y_t: torch.Tensor, g_t: torch.Tensor,
                    dim: int) -> torch.Tensor:
    """The derivative of softmax_bwd(Y, G) along tangents (Ẏ, Ġ) (module docstring)."""
    if not y.numel():
        return _empty(g)
    yc, gc, ytc, gtc = (t.to(compute_dtype(y.dtype)) for t in (y, g, y_t, g_t))
    s1, s3, s4 = ((a * b).sum(dim, keepdim=True) for a, b in ((yc, gc), (ytc, gc), (yc, gtc)))
    return _dense((yc * (gtc - s4) + ytc * (gc - s1) - s3 * yc).to(g.dtype))


def log_softmax_bwd_jvp(y: torch.Tensor, g: torch.Tensor, y_t: torch.Tensor, g_t: torch.Tensor,
                        dim: int) -> torch.Tensor:
    """The derivative of log_softmax_bwd(Y, G) along tangents (Ẏ, Ġ) (module docstring)."""
    if not y.numel():
        return _empty(g)
    yc, gc, ytc, gtc = (t.to(compute_dtype(y.dtype)) for t in (y, g, y_t, g_t))
    p = torch.exp(yc)
    return _dense((gtc - gtc.sum(dim, keepdim=True) * p - gc.sum(dim, keepdim=True) * p * ytc).to(g.dtype))


# ----------------------------------------------------------------- backend ops
def _vmap_rule(op, n_tensors: int):
    """vmap of a row op ``op(backend, *tensors, dim)``: the batch dim moved to the front (an unbatched operand
    expanded), ``dim`` shifted past it; a 0-d (per sample) operand gets a row of one."""

    def rule(info, in_dims, backend, *args):
        tensors, dim = args[:n_tensors], args[n_tensors]
        tensors = [t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
                   for t, d in zip(tensors, in_dims[1:1 + n_tensors])]
        scalar = tensors[0].dim() == 1
        if scalar:
            tensors = [t.unsqueeze(1) for t in tensors]
        out = op(backend, *tensors, dim + 1)
        if isinstance(out, tuple):
            return tuple(o.squeeze(1) if scalar else o for o in out), (0,) * len(out)
        return (out.squeeze(1) if scalar else out), 0

    return rule


def _row_op(name: str, reference, family: str, n_tensors: int):
    op = backend_op(name, reference, family)
    op.custom.register_vmap(_vmap_rule(op, n_tensors))
    return op


softmax_fwd_op = _row_op("softmax_fwd", softmax_fwd, KERNELS, 1)
softmax_bwd_op = _row_op("softmax_bwd", softmax_bwd, KERNELS, 2)
softmax_bwd2_op = _row_op("softmax_bwd2", softmax_bwd2, KERNELS_BWD2, 3)
log_softmax_fwd_op = _row_op("log_softmax_fwd", log_softmax_fwd, KERNELS, 1)
log_softmax_bwd_op = _row_op("log_softmax_bwd", log_softmax_bwd, KERNELS, 2)
log_softmax_bwd2_op = _row_op("log_softmax_bwd2", log_softmax_bwd2, KERNELS_BWD2, 3)
softmax_bwd_jvp_op = _row_op("softmax_bwd_jvp", softmax_bwd_jvp, KERNELS_BWD2, 4)
log_softmax_bwd_jvp_op = _row_op("log_softmax_bwd_jvp", log_softmax_bwd_jvp, KERNELS_BWD2, 4)


# ----------------------------------------------------------------- autograd
def _function(name: str, forward, setup_context, backward, jvp=None, doc: str = ""):
    """An autograd.Function (setup_context form, vmap rule generated) from these staticmethods."""
    methods = {"__doc__": doc, "generate_vmap_rule": True, "forward": staticmethod(forward),
               "setup_context": staticmethod(setup_context), "backward": staticmethod(backward)}
    if jvp is not None:
        methods["jvp"] = staticmethod(jvp)
    return type(name, (Function,), methods)


def _second_function(name: str, bwd2_op):
    """(∂L/∂Y, ∂L/∂G) = bwd2(Y, G, H) as a Function whose own backward (a third derivative) raises: with
    create_graph=True its outputs hang off Y, G and H, so differentiating them again fails loudly."""

    def forward(y, g, h, dim, backend):
        return bwd2_op(backend, y, g, h, dim)

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"scratchops: {name[:-len('SecondFunction')]}: a third derivative is not implemented "
                           "(its second derivative cannot be differentiated again)")

    return _function(name, forward, setup_context, backward, doc="The second derivative (scratchops/softmax.py)")


def _backward_function(name: str, bwd_op, second_function, jvp_op, formula: str):
    """dX = bwd(Y, G, dim) as a Function of (Y, G), so that the first derivative can be differentiated
    (reverse mode: ``second_function``; forward mode: ``jvp_op``)."""

    def forward(y, g, dim, backend):
        return bwd_op(backend, y, g, dim)

    def setup_context(ctx, inputs, output):
        y, g, ctx.dim, ctx.backend = inputs
        ctx.save_for_backward(y, g)
        ctx.save_for_forward(y, g)

    def jvp(ctx, y_t, g_t, dim_t, backend_t):
        y, g = ctx.saved_tensors
        y_t = torch.zeros_like(y) if y_t is None else y_t
        g_t = torch.zeros_like(g) if g_t is None else g_t
        return jvp_op(ctx.backend, y, g, y_t, g_t, ctx.dim)

    def backward(ctx, h):
        y, g = ctx.saved_tensors
        gy, gg = second_function.apply(y, g, h, ctx.dim, ctx.backend)
        needs = ctx.needs_input_grad
        return (gy if needs[0] else None), (gg if needs[1] else None), None, None  # y, g, dim, backend

    function = _function(name, forward, setup_context, backward, jvp, doc=f"dX = {formula} of (Y, G=dY); its "
                         "derivatives are the second derivative (scratchops/softmax.py)")
    function.bwd_op = bwd_op
    return function


def _softmax_function(name: str, fwd_op, backward_function, jvp, traced: bool = False):
    """The autograd.Function of softmax or log-softmax: Y = fwd(X, dim) saved; dX = ``backward_function``(Y, dY).

    ``traced``: the twin torch.compile runs (Dynamo traces neither a jvp nor a Function applied inside a backward,
    and a compiled graph has no double backward): no jvp, and dX from the backward op directly."""

    def forward(x, dim, backend):
        return fwd_op(backend, x, dim)

    def setup_context(ctx, inputs, output):
        _, ctx.dim, ctx.backend = inputs
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None  # x, dim, backend
        if traced or not (torch.is_grad_enabled() or _functorch_active()):
            # nothing will differentiate dX (no create_graph, no transform): the op itself, without a Function
            return backward_function.bwd_op(ctx.backend, y, dy, ctx.dim), None, None  # x, dim, backend
        return backward_function.apply(y, dy, ctx.dim, ctx.backend), None, None  # x, dim, backend

    return _function(name, forward, setup_context, backward, None if traced else jvp,
                     doc=f"{fwd_op.__name__[:-len('_fwd_op')]}(x, dim, backend); backward {backward_function.__doc__}")


SoftmaxSecondFunction = _second_function("SoftmaxSecondFunction", softmax_bwd2_op)
LogSoftmaxSecondFunction = _second_function("LogSoftmaxSecondFunction", log_softmax_bwd2_op)
SoftmaxBackwardFunction = _backward_function("SoftmaxBackwardFunction", softmax_bwd_op, SoftmaxSecondFunction,
                                             softmax_bwd_jvp_op, "Y ⊙ (G - Σ G⊙Y)")
LogSoftmaxBackwardFunction = _backward_function("LogSoftmaxBackwardFunction", log_softmax_bwd_op,
                                                LogSoftmaxSecondFunction, log_softmax_bwd_jvp_op, "G - e^Y · Σ G")


def _softmax_jvp(ctx, x_t, dim_t, backend_t):
    """Ẏ = Y ⊙ (Ẋ - Σ Ẋ⊙Y): the Jacobian is symmetric, so the backward op computes it."""
    (y,) = ctx.saved_tensors
    return softmax_bwd_op(ctx.backend, y, x_t, ctx.dim)


def _log_softmax_jvp(ctx, x_t, dim_t, backend_t):
    """Ẏ = Ẋ - Σ e^Y⊙Ẋ: ∂L/∂G of the double backward with H = Ẋ."""
    (y,) = ctx.saved_tensors
    return log_softmax_bwd2_op(ctx.backend, y, x_t, x_t, ctx.dim)[1]


SoftmaxFunction = _softmax_function("SoftmaxFunction", softmax_fwd_op, SoftmaxBackwardFunction, _softmax_jvp)
LogSoftmaxFunction = _softmax_function("LogSoftmaxFunction", log_softmax_fwd_op, LogSoftmaxBackwardFunction,
                                       _log_softmax_jvp)
# Dynamo cannot trace a Function that defines jvp: under torch.compile the same Functions without it run.
_SoftmaxTraced = _softmax_function("SoftmaxFunction", softmax_fwd_op, SoftmaxBackwardFunction, None, traced=True)
_LogSoftmaxTraced = _softmax_function("LogSoftmaxFunction", log_softmax_fwd_op, LogSoftmaxBackwardFunction, None,
                                      traced=True)


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


def _autocast_dtype(input, dtype):
    """torch's autocast policy: CUDA autocast runs softmax and log_softmax in float32 (its "fp32, unless dtype= is
    given" list), so a float16/bfloat16 CUDA input without ``dtype=`` is cast to float32 (differentiably: the
    gradient comes back in the input's dtype). CPU autocast has no rule for them: the input's dtype is kept."""
    if dtype is None and isinstance(input, torch.Tensor) and input.dtype in (torch.float16, torch.bfloat16) \
            and input.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.float32
    return dtype


def _entry(name: str, input, dim, stacklevel: int, dtype, function, traced):
    """The functional op ``name``: torch's validation, then ``function`` (``traced`` under torch.compile)."""
    if dim is None and isinstance(input, torch.Tensor):
        dim = _implicit_dim(name, input.dim(), stacklevel + 1)
    dtype = _autocast_dtype(input, dtype)
    x, dim = _prepare(name, input, dim, dtype)
    if not x.is_floating_point():  # empty integer input: torch returns it unchanged (as a new tensor)
        return x.clone(memory_format=torch.contiguous_format)
    return (traced if torch.compiler.is_compiling() else function).apply(x, dim, choose_backend(x))


def softmax(input: torch.Tensor, dim=None, _stacklevel: int = 3, dtype=None) -> torch.Tensor:
    return _entry("softmax", input, dim, _stacklevel, dtype, SoftmaxFunction, _SoftmaxTraced)


def log_softmax(input: torch.Tensor, dim=None, _stacklevel: int = 3, dtype=None) -> torch.Tensor:
    return _entry("log_softmax", input, dim, _stacklevel, dtype, LogSoftmaxFunction, _LogSoftmaxTraced)
