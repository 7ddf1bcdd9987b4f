r"""Linear: y = act(x Wᵀ + b), with the bias and the activation fused into the matmul.

Shapes: x (M, K) (leading dims of the input are flattened into M), W (N, K),
b (N,), z = x Wᵀ + b and y = act(z), both (M, N); act is none, relu, sigmoid or tanh.

Forward:

    z[m, n] = Σ_k x[m, k] W[n, k] + b[n]          y = act(z)

Backward, with dZ = dY ⊙ act'(z) written with the saved OUTPUT y (z is never kept):

    none      dZ = dY
    relu      dZ = dY ⊙ [y > 0]
    sigmoid   dZ = dY ⊙ y (1 - y)
    tanh      dZ = dY ⊙ (1 - y²)

    dX = dZ · W        (M, K)
    dW = dZᵀ · X       (N, K)
    db = Σ_m dZ[m, :]  (N,)

Saved for backward: x only when W needs a gradient, W only when x needs one, and
y only when there is an activation. dZ is formed inside the backward kernels as
dY and y are loaded: there is no separate elementwise pass. A bias that varies along
the rows too ((M, N), (M, 1): broadcast as torch does) gets db = dZ itself.

Double backward. Each piece of the backward is itself a Function with a hand-derived
backward (LinearGradInputFunction, LinearGradWeightFunction, LinearGradBiasFunction; the
activations' ActivationGradFunction / ActivationGradYFunction for the elementwise terms).
dX and dW are linear in dY, W and X, so their derivatives are linear's own products again
(the same kernels); with s(y) = act'(z) written with y, and s' its derivative in y:

    relu      s = [y > 0]       s' = 0          act'' = 0
    sigmoid   s = y (1 - y)     s' = 1 - 2y     act'' = s' s = y (1 - y)(1 - 2y)
    tanh      s = 1 - y²        s' = -2y        act'' = s' s = -2y (1 - y²)

Third derivatives through a fused activation raise (the activations' limit); without one,
any order works. Nothing more is saved for the first backward.

The reference formulas below use ``torch.matmul`` for the plain products (the
building block; the linear op itself, its bias, activation and gradients are
written out here).
"""
import contextlib

import torch

from scratchops._backend import Function, backend_op, choose_backend
from scratchops._common import check_same_device, check_tensor, compute_dtype, type_name
from scratchops.activations import ActivationGradFunction, ActivationGradYFunction, activate, activation_grad

KERNELS = "linear"
KERNELS_BWD = "linear_bwd"
ACTIVATIONS = (None, "relu", "sigmoid", "tanh")


# ----------------------------------------------------------------- reference math
def _no_autocast(t: torch.Tensor):
    """The reference formulas run in the dtypes they name, even when called under autocast."""
    if t.device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)


def _compute(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: fp32/fp64 for floating types, the dtype itself for integers and complex."""
    return compute_dtype(dtype) if dtype.is_floating_point else dtype


def _grad_z(dy: torch.Tensor, y: torch.Tensor | None, activation: str) -> torch.Tensor:
    """dZ = dY ⊙ act'(z) from the output y, in the compute dtype."""
    dz = dy.to(_compute(dy.dtype))
    return dz if activation == "none" else activation_grad(dz, y.to(dz.dtype), activation)


def linear_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, activation: str) -> torch.Tensor:
    cd = _compute(x.dtype)
    with _no_autocast(x):
        z = torch.matmul(x.to(cd), w.to(cd).t())
        if b is not None:
            z = z + b.to(cd)
        # z is rounded to the output dtype before the activation, as torch's linear output is.
        return activate(z.to(x.dtype).to(cd), activation).to(x.dtype)


def linear_bwd_input(dy: torch.Tensor, w: torch.Tensor, y: torch.Tensor | None, activation: str) -> torch.Tensor:
    with _no_autocast(dy):
        dz = _grad_z(dy, y, activation).to(w.dtype)  # rounded as torch's activation backward rounds it
        cd = _compute(w.dtype)
        return torch.matmul(dz.to(cd), w.to(cd).conj()).to(w.dtype)  # complex: dZ · conj(W), as torch


def linear_bwd_weight(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, activation: str,
                      with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW, db); db is empty (shape (0,)) unless ``with_bias``."""
    with _no_autocast(dy):
        dz = _grad_z(dy, y, activation)
        cd = _compute(x.dtype)
        dw = torch.matmul(dz.to(x.dtype).to(cd).t(), x.to(cd).conj()).to(x.dtype)  # complex: dZᵀ · conj(X)
        db = dz.sum(0).to(dy.dtype) if with_bias else dy.new_empty((0,))
        return dw, db


def linear_bwd_bias(dy: torch.Tensor, y: torch.Tensor | None, activation: str) -> torch.Tensor:
    with _no_autocast(dy):
        return _grad_z(dy, y, activation).sum(0).to(dy.dtype)


# ----------------------------------------------------------------- backend ops
linear_fwd_op = backend_op("linear_fwd", linear_fwd, KERNELS)
linear_bwd_input_op = backend_op("linear_bwd_input", linear_bwd_input, KERNELS_BWD)
linear_bwd_weight_op = backend_op("linear_bwd_weight", linear_bwd_weight, KERNELS_BWD)
linear_bwd_bias_op = backend_op("linear_bwd_bias", linear_bwd_bias, KERNELS_BWD)


# ----------------------------------------------------------------- autograd
# Each backward is built from differentiable Functions (their own backward hand-derived, running the same
# kernels), so gradients of gradients work. Without create_graph (grad mode off in the backward) the ops
# run directly: no graph to record, no Function overhead.
#
# torch.func's vjp runs a backward after its transform level has exited, on "dead" wrapper tensors; torch's
# Function.apply unwraps those, scratchops' fast apply does not, so the backward pieces unwrap them here.
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _live(args):
    return [_unwrap_if_dead(a) if isinstance(a, torch.Tensor) else a for a in args]


def _call(function, *args):
    args = _live(args)
    return function.apply(*args) if torch.is_grad_enabled() else function.forward(*args)


def _times_s(g, y, activation, backend):
    """g ⊙ s(y) with s(y) = act'(z) written with the output (dZ from dY): the activations' own Function."""
    if activation == "none":
        return g
    return ActivationGradFunction.apply(*_live((y, g)), activation, backend)


def _times_ds(g, dy, y, activation, backend):
    """g ⊙ dY ⊙ s'(y), s' the derivative of s in y; None where it is 0 (no activation, relu)."""
    if activation in ("none", "relu"):
        return None
    return ActivationGradYFunction.apply(*_live((y, dy, g)), activation, backend)


def _vmap_by_rows(function, info, in_dims, *args):
    """vmap rule: the Function applied to each batch entry, stacked (correct for any operand batched)."""
    outs = [function.apply(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)))
            for i in range(info.batch_size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


class LinearFunction(Function):
    """x (M, K), W (N, K), b (N,), (M, N) or None -> y = act(x Wᵀ + b) (M, N).

    Backward (module docstring): dX, dW and a vector db from the fused kernels; a matrix db is dZ itself.
    Saved: x if W needs a gradient, W if x does, y if there is an activation (never z).
    """

    @staticmethod
    def forward(x, w, b, activation, backend):
        return linear_fwd_op(backend, x, w, b, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, ctx.activation, ctx.backend = inputs
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        keep_y = ctx.activation != "none" and (need_x or need_w or need_b)
        # Only what the backward reads: x for dW, W for dX, y for act'(z).
        ctx.save_for_backward(x if need_w else None, w if need_x else None, output if keep_y else None)
        ctx.bias_dim = None if b is None else b.dim()

    @staticmethod
    def backward(ctx, dy):
        x, w, y = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        backend, act = ctx.backend, ctx.activation
        vector_b = need_b and ctx.bias_dim == 1
        dx = dw = db = None
        # dX = dZ · W,  dZ = dY ⊙ act'(z) (formed inside the kernel from dY and y)
        if need_x:
            dx = _call(LinearGradInputFunction, dy, w, y, act, backend)
        # dW = dZᵀ · X, with db = Σ_m dZ[m, :] fused in when b needs a gradient too
        if need_w:
            dw, db_fused = _call(LinearGradWeightFunction, dy, x, y, act, vector_b, backend)
            db = db_fused if vector_b else None
        elif vector_b:
            db = _call(LinearGradBiasFunction, dy, y, act, backend)  # db = Σ_m dZ[m, :]
        if need_b and ctx.bias_dim == 2:
            db = _times_s(dy, y, act, backend)  # a bias per output element: db = dZ
        return dx, dw, db, None, None  # activation, backend

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_by_rows(LinearFunction, info, in_dims, *args)


class LinearGradInputFunction(Function):
    """dX = (dY ⊙ s(y)) · W, the first backward's dX, s(y) = act'(z) written with y.

    Backward, for an incoming gX (M, K), with G = gX · Wᵀ (M, N) (a linear forward):
        d(dY) = G ⊙ s(y)
        d(W)  = (dY ⊙ s(y))ᵀ · gX       the dW kernel with X := gX
        d(y)  = G ⊙ dY ⊙ s'(y)          chained through y = act(z): act''(z) = s'(y) s(y), i.e.
                                        sigmoid'' = y(1 - y)(1 - 2y), tanh'' = -2y(1 - y²), relu'' = 0
    """

    @staticmethod
    def forward(dy, w, y, activation, backend):
        return linear_bwd_input_op(backend, dy, w, y, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, w, y, ctx.activation, ctx.backend = inputs
        ctx.save_for_backward(dy, w, y)

    @staticmethod
    def backward(ctx, gx):
        dy, w, y = ctx.saved_tensors
        need_dy, need_w, need_y = ctx.needs_input_grad[:3]
        backend, act = ctx.backend, ctx.activation
        g_dy = g_w = g_y = None
        if need_dy or need_y:
            g = _call(LinearFunction, gx, w, None, "none", backend)
            g_dy = _times_s(g, y, act, backend) if need_dy else None
            g_y = _times_ds(g, dy, y, act, backend) if need_y else None
        if need_w:
            g_w = _call(LinearGradWeightFunction, dy, gx, y, act, False, backend)[0]
        return g_dy, g_w, g_y, None, None  # activation, backend

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_by_rows(LinearGradInputFunction, info, in_dims, *args)


class LinearGradWeightFunction(Function):
    """(dW, db) = ((dY ⊙ s(y))ᵀ · X, Σ_m dY ⊙ s(y)) (db empty unless ``with_bias``).

    Backward, for incoming gW (N, K) and gb (N,), with G = X · gWᵀ + gb (M, N) (a linear forward, gb its bias):
        d(dY) = G ⊙ s(y)        d(y) = G ⊙ dY ⊙ s'(y)        d(X) = (dY ⊙ s(y)) · gW   (the dX kernel)
    """

    @staticmethod
    def forward(dy, x, y, activation, with_bias, backend):
        return linear_bwd_weight_op(backend, dy, x, y, activation, with_bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, x, y, ctx.activation, ctx.with_bias, ctx.backend = inputs
        ctx.set_materialize_grads(False)
        if not ctx.with_bias:
            ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(dy, x, y)

    @staticmethod
    def backward(ctx, gw, gb):
        dy, x, y = ctx.saved_tensors
        need_dy, need_x, need_y = ctx.needs_input_grad[:3]
        backend, act = ctx.backend, ctx.activation
        gb = gb if ctx.with_bias else None
        g_dy = g_x = g_y = None
        if (need_dy or need_y) and (gw is not None or gb is not None):
            g = _call(LinearFunction, x, gw, gb, "none", backend) if gw is not None else gb.expand(dy.shape)
            g_dy = _times_s(g, y, act, backend) if need_dy else None
            g_y = _times_ds(g, dy, y, act, backend) if need_y else None
        if need_x and gw is not None:
            g_x = _call(LinearGradInputFunction, dy, gw, y, act, backend)
        return g_dy, g_x, g_y, None, None, None  # activation, with_bias, backend

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_by_rows(LinearGradWeightFunction, info, in_dims, *args)


class LinearGradBiasFunction(Function):
    """db = Σ_m dY ⊙ s(y). Backward, for gb (N,), with G = gb broadcast over the rows:
    d(dY) = G ⊙ s(y), d(y) = G ⊙ dY ⊙ s'(y)."""

    @staticmethod
    def forward(dy, y, activation, backend):
        return linear_bwd_bias_op(backend, dy, y, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, y, ctx.activation, ctx.backend = inputs
        ctx.save_for_backward(dy, y)

    @staticmethod
    def backward(ctx, gb):
        dy, y = ctx.saved_tensors
        need_dy, need_y = ctx.needs_input_grad[:2]
        g = gb.expand(dy.shape)
        g_dy = _times_s(g, y, ctx.activation, ctx.backend) if need_dy else None
        g_y = _times_ds(g, dy, y, ctx.activation, ctx.backend) if need_y else None
        return g_dy, g_y, None, None  # activation, backend

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_by_rows(LinearGradBiasFunction, info, in_dims, *args)


# ----------------------------------------------------------------- functional
def _autocast(input, weight, bias):
    """As torch's autocast: where it is on for the input's device, floating operands other than float64
    (autocast leaves those alone) go to its dtype."""
    device_type = input.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

    return cast(input), cast(weight), cast(bias)


def _check(input, weight, bias) -> None:
    """Torch's errors, raised before anything runs (the bias's shape is checked by :func:`_bias_rows`)."""
    if input.dim() == 0 or weight.dim() == 0:
        raise RuntimeError(f"both arguments to linear need to be at least 1D, but they are {input.dim()}D and "
                           f"{weight.dim()}D")
    if weight.dim() > 2:
        raise RuntimeError(f"t() expects a tensor with <= 2 dimensions, but self is {weight.dim()}D")
    if weight.dim() == 1 and bias is not None and (input.dim() == 2 or bias.dim() != 0):
        # torch adds a 0-d bias to the product with a 1-D weight, except for a 2-D input (its addmm path)
        raise RuntimeError("mat2 must be a matrix, got 1-D tensor")
    check_same_device(input, weight, bias)
    if input.dtype != weight.dtype:
        raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {type_name(input.dtype)} and "
                           f"{type_name(weight.dtype)}")
    if bias is not None and bias.dtype != input.dtype:
        raise RuntimeError(f"self and mat2 must have the same dtype, but got {type_name(bias.dtype)} and "
                           f"{type_name(input.dtype)}")
    if input.dtype == torch.bool:  # torch's CPU op computes every other dtype (integers and complex included)
        raise NotImplementedError(f"\"addmm_impl_cpu_\" not implemented for '{type_name(input.dtype)}'")
    k_in, k_w = input.shape[-1], weight.shape[-1]
    if k_in != k_w:
        n = weight.shape[0] if weight.dim() == 2 else 1
        m = input.numel() // k_in if k_in else input.shape[:-1].numel()
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({m}x{k_in} and {k_w}x{n})")


def _bias_rows(bias, lead, n):
    """The bias as the kernels read it: (N,) when it varies along the output features only (the usual
    case), else (M, N), broadcast as torch broadcasts it against the output (*lead, N); torch's
    RuntimeError for one that does not broadcast. Only the bias's own shape is inspected, so a
    dynamic batch size is never specialized."""
    if bias is None:
        return None
    rows = tuple(lead) if len(lead) else (1,)  # a 1-D input is one row
    if bias.dim() <= len(rows) + 1 and all(s == 1 for s in bias.shape[:-1]):
        last = bias.shape[-1] if bias.dim() else 1
        if last not in (1, n):
            bias.expand(*rows, n)  # raises torch's message
        return bias.reshape(last).expand(n)
    return bias.expand(*rows, n).reshape(-1, n)


def _flatten(input, k):
    """input (*lead, K) as (M, K): reshape(-1, K) keeps a dynamic batch symbolic; K = 0 needs explicit sizes."""
    return input.reshape(-1, k) if k != 0 else input.reshape(input.shape[:-1].numel(), 0)


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           activation: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear`` with an optional fused ``activation`` ("relu", "sigmoid", "tanh").

    The bias broadcasts against the output as torch's does ((N,), (1, N), (M, N), ...). Integer and
    complex operands compute as torch's CPU op does, on the reference backend; their activation, if any,
    is scratchops' own op applied after (it has torch's promotion and complex rules).
    """
    check_tensor("linear", input, "input", 1)
    check_tensor("linear", weight, "weight", 2)
    if bias is not None:
        check_tensor("linear", bias, "bias", 3)
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    input, weight, bias = _autocast(input, weight, bias)
    _check(input, weight, bias)
    if activation is not None and not input.is_floating_point():
        from scratchops import activations

        return getattr(activations, activation)(linear(input, weight, bias))
    w2 = weight if weight.dim() == 2 else weight.unsqueeze(0)  # a 1-D weight is one output feature, dropped after
    n, k = w2.shape
    lead = input.shape[:-1]
    b = _bias_rows(bias, lead, n)
    x2 = _flatten(input, k)
    y = LinearFunction.apply(x2, w2, b, activation or "none", choose_backend(x2))
    return y.reshape(*lead, n) if weight.dim() == 2 else y.reshape(lead)
