r"""Linear: y = act(x Wᵀ + b), the bias and the activation (none, relu, sigmoid, tanh) fused into the matmul.

x (M, K) (an input's leading dims flattened into M), W (N, K), b (N,) or, broadcast as torch does, (M, N);
z = x Wᵀ + b and y = act(z) are (M, N). With s(y) = act'(z) written with the saved OUTPUT y (z is never
kept): none s = 1, relu s = [y > 0], sigmoid s = y (1 - y), tanh s = 1 - y²; dZ = dY ⊙ s(y) and

    dX = dZ · W (M, K)      dW = dZᵀ · X (N, K)      db = Σ_m dZ[m, :] (N,), or dZ itself for an (M, N) bias

Saved: x only when W needs a gradient, W only when x needs one, y only with an activation. dZ is formed
inside the backward kernels as dY and y are loaded (no separate elementwise pass). Double backward: each
backward piece is a Function with a hand-derived backward (LinearGradInputFunction, LinearGradWeightFunction,
LinearGradBiasFunction; the activations' ActivationGradFunction and ActivationGradYFunction for the elementwise
terms). dX and dW are linear in dY, W and X, so their derivatives are linear's own products (the same kernels).
With s' = ds/dy (relu 0, sigmoid 1 - 2y, tanh -2y) the chain through y = act(z) gives act'' = s' s:
sigmoid'' = y (1 - y)(1 - 2y), tanh'' = -2y (1 - y²), relu'' = 0. Third derivatives through a fused activation
raise (the activations' limit); without one any order works. Nothing more is saved for the first backward.
Forward mode: below. The reference formulas use ``torch.matmul`` for the plain products (the building block;
the linear op, its bias, activation and gradients are written out here).
"""
import functools

import torch

from scratchops._backend import Function, backend_op, choose_backend, forward_mode, with_jvp
from scratchops._common import autocast_lower, check_same_device, check_tensor, compute_dtype, no_autocast, type_name
from scratchops import activations
from scratchops.activations import (ActivationGradFunction, ActivationGradJvpFunction, ActivationGradYFunction,
                                    activate, activation_grad)

KERNELS = "linear"
KERNELS_BWD = "linear_bwd"
ACTIVATIONS = (None, "relu", "sigmoid", "tanh")
_functorch_active = torch._C._are_functorch_transforms_active


# ----------------------------------------------------------------- reference math
def _compute(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: fp32/fp64 for floating types, the dtype itself for integers and complex."""
    return compute_dtype(dtype) if dtype.is_floating_point else dtype


def _grad_z(dy: torch.Tensor, y: torch.Tensor | None, activation: str) -> torch.Tensor:
    """dZ = dY ⊙ act'(z) from the output y, in the compute dtype."""
    dz = dy.to(_compute(dy.dtype))
    return dz if activation == "none" else activation_grad(dz, y.to(dz.dtype), activation)


def linear_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, activation: str) -> torch.Tensor:
    cd = _compute(x.dtype)
    with no_autocast(x):
        z = torch.matmul(x.to(cd), w.to(cd).t())
        if b is not None:
            z = z + b.to(cd)
        # z is rounded to the output dtype before the activation, as torch's linear output is.
        return activate(z.to(x.dtype).to(cd), activation).to(x.dtype)


def linear_bwd_input(dy: torch.Tensor, w: torch.Tensor, y: torch.Tensor | None, activation: str) -> torch.Tensor:
    with no_autocast(dy):
        dz = _grad_z(dy, y, activation).to(w.dtype)  # rounded as torch's activation backward rounds it
        cd = _compute(w.dtype)
        return torch.matmul(dz.to(cd), w.to(cd).conj()).to(w.dtype)  # complex: dZ · conj(W), as torch


def linear_bwd_weight(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, activation: str,
                      with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW, db); db is empty (shape (0,)) unless ``with_bias``."""
    with no_autocast(dy):
        dz = _grad_z(dy, y, activation)
        cd = _compute(x.dtype)
        dw = torch.matmul(dz.to(x.dtype).to(cd).t(), x.to(cd).conj()).to(x.dtype)  # complex: dZᵀ · conj(X)
        db = dz.sum(0).to(dy.dtype) if with_bias else dy.new_empty((0,))
        return dw, db


def linear_bwd_bias(dy: torch.Tensor, y: torch.Tensor | None, activation: str) -> torch.Tensor:
    with no_autocast(dy):
        return _grad_z(dy, y, activation).sum(0).to(dy.dtype)


# ----------------------------------------------------------------- backend ops
linear_fwd_op = backend_op("linear_fwd", linear_fwd, KERNELS)
linear_bwd_input_op = backend_op("linear_bwd_input", linear_bwd_input, KERNELS_BWD)
linear_bwd_weight_op = backend_op("linear_bwd_weight", linear_bwd_weight, KERNELS_BWD)
linear_bwd_bias_op = backend_op("linear_bwd_bias", linear_bwd_bias, KERNELS_BWD)


# ----------------------------------------------------------------- autograd
# Backward pieces are differentiable Functions; without create_graph (grad mode off) their ops run directly.
# torch.func's vjp runs a backward after its level has exited, on "dead" wrappers: torch's Function.apply
# unwraps those, scratchops' fast apply does not, so the pieces unwrap them here.
def _live(args):
    return [torch._C._functorch.unwrap_if_dead(a) if isinstance(a, torch.Tensor) else a for a in args]


def _call(function, *args, live=False):
    """``function`` on ``args`` (``live``: no argument can be a dead wrapper, so none is unwrapped: host time)."""
    if not live:
        args = _live(args)
    if forward_mode():
        return _JVP[function].apply(*args)
    return function.apply(*args) if torch.is_grad_enabled() else function.forward(*args)


def _save(ctx, *tensors):
    """A backward piece saves its inputs for its backward (and, in forward mode, for its jvp)."""
    ctx.save_for_backward(*tensors)
    if forward_mode():
        ctx.save_for_forward(*tensors)


def _times_s(g, y, activation, backend):
    """g ⊙ s(y) with s(y) = act'(z) written with the output (dZ from dY): the activations' own Function."""
    function = ActivationGradJvpFunction if forward_mode() else ActivationGradFunction
    return g if activation == "none" else function.apply(*_live((y, g)), activation, backend)


def _times_ds(g, dy, y, activation, backend):
    """g ⊙ dY ⊙ s'(y), s' the derivative of s in y; None where it is 0 (no activation, relu)."""
    zero = activation in ("none", "relu")
    return None if zero else ActivationGradYFunction.apply(*_live((y, dy, g)), activation, backend)


def _vmap_by_rows(function, info, in_dims, *args):
    """vmap rule. Only the row operand batched (x of y, dY (and y) of dX): the batch folds into the rows, one
    launch. Otherwise the Function runs per batch entry, stacked (correct for any operand batched)."""
    n, third = info.batch_size, args[2]
    if function in (LinearFunction, LinearGradInputFunction) and in_dims[0] is not None and in_dims[1] is None and \
            (function is LinearGradInputFunction or third is None or (third.dim() == 1 and in_dims[2] is None)):
        rows = args[0].movedim(in_dims[0], 0)
        if function is LinearGradInputFunction and third is not None:  # y, batched like dY
            third = third.movedim(in_dims[2], 0) if in_dims[2] is not None else third.expand(n, *third.shape)
            third = third.reshape(n * rows.shape[1], third.shape[-1])
        out = _call(function, rows.reshape(n * rows.shape[1], rows.shape[-1]), args[1], third, *args[3:])
        return out.reshape(n, rows.shape[1], out.shape[-1]), 0
    outs = [_call(function, *(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)))
            for i in range(info.batch_size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


class LinearFunction(Function):
    """x (M, K), W (N, K), b (N,), (M, N) or None -> y = act(x Wᵀ + b) (M, N); backward: module docstring."""

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
        # dead wrappers reach a backward only through tensors made under a torch.func transform (vjp)
        ctx.live = not _functorch_active()
        if forward_mode():
            ctx.save_for_forward(x, w, output)

    @staticmethod
    def backward(ctx, dy):
        x, w, y = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        backend, act = ctx.backend, ctx.activation
        vector_b = need_b and ctx.bias_dim == 1
        dx = dw = db = None
        # dX = dZ · W,  dZ = dY ⊙ act'(z) (formed inside the kernel from dY and y)
        if need_x:
            dx = _call(LinearGradInputFunction, dy, w, y, act, backend, live=ctx.live)
        # dW = dZᵀ · X, with db = Σ_m dZ[m, :] fused in when b needs a gradient too
        if need_w:
            dw, db_fused = _call(LinearGradWeightFunction, dy, x, y, act, vector_b, backend, live=ctx.live)
            db = db_fused if vector_b else None
        elif vector_b:
            db = _call(LinearGradBiasFunction, dy, y, act, backend, live=ctx.live)  # db = Σ_m dZ[m, :]
        if need_b and ctx.bias_dim == 2:
            db = _times_s(dy, y, act, backend)  # a bias per output element: db = dZ
        return dx, dw, db, None, None  # activation, backend


class LinearGradInputFunction(Function):
    """dX = (dY ⊙ s(y)) · W. Backward, for gX (M, K), with G = gX · Wᵀ (M, N) (a linear forward): d(dY) = G ⊙ s(y);
    d(W) = (dY ⊙ s(y))ᵀ · gX (the dW kernel, X := gX); d(y) = G ⊙ dY ⊙ s'(y) (through y: act'' = s' s)."""

    @staticmethod
    def forward(dy, w, y, activation, backend):
        return linear_bwd_input_op(backend, dy, w, y, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, w, y, ctx.activation, ctx.backend = inputs
        _save(ctx, dy, w, y)

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


class LinearGradWeightFunction(Function):
    """(dW, db) = ((dY ⊙ s(y))ᵀ · X, Σ_m dY ⊙ s(y)) (db empty without a bias). Backward, for gW, gb, with
    G = X · gWᵀ + gb (a linear forward): d(dY) = G ⊙ s(y), d(y) = G ⊙ dY ⊙ s'(y), d(X) = (dY ⊙ s(y)) · gW."""

    @staticmethod
    def forward(dy, x, y, activation, with_bias, backend):
        return linear_bwd_weight_op(backend, dy, x, y, activation, with_bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, x, y, ctx.activation, ctx.with_bias, ctx.backend = inputs
        ctx.set_materialize_grads(False)
        if not ctx.with_bias:
            ctx.mark_non_differentiable(output[1])
        _save(ctx, dy, x, y)

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


class LinearGradBiasFunction(Function):
    """db = Σ_m dY ⊙ s(y). Backward, for gb (N,), with G = gb broadcast over the rows:
    d(dY) = G ⊙ s(y), d(y) = G ⊙ dY ⊙ s'(y)."""

    @staticmethod
    def forward(dy, y, activation, backend):
        return linear_bwd_bias_op(backend, dy, y, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, y, ctx.activation, ctx.backend = inputs
        _save(ctx, dy, y)

    @staticmethod
    def backward(ctx, gb):
        dy, y = ctx.saved_tensors
        need_dy, need_y = ctx.needs_input_grad[:2]
        g = gb.expand(dy.shape)
        g_dy = _times_s(g, y, ctx.activation, ctx.backend) if need_dy else None
        g_y = _times_ds(g, dy, y, ctx.activation, ctx.backend) if need_y else None
        return g_dy, g_y, None, None  # activation, backend


# ----------------------------------------------------------------- forward mode (torch.func.jvp, jacfwd, hessian)
# Each piece is linear in each matrix operand and depends on y through s(y) only:
#   y = act(x Wᵀ + b)            y_t = s(y) ⊙ (x_t Wᵀ + x W_tᵀ + b_t)
#   F(dY, M, y) = (dY ⊙ s(y))∘M  F_t = F(dY_t, M, y) + F(dY, M_t, y) + F(y_t ⊙ dY ⊙ s'(y), M, none)
# (F: the dX, dW/db and db pieces; the jvp-carrying Functions are applied only in forward mode: dynamo
# cannot trace a Function with jvp.)
def _sum(terms):
    """Σ of the terms given (None skipped; tuples item by item)."""
    terms = [t for t in terms if t is not None]
    if terms and isinstance(terms[0], tuple):
        return tuple(_sum(items) for items in zip(*terms))
    return functools.reduce(torch.add, terms) if terms else None


def _linear_jvp(ctx, x_t, w_t, b_t, _activation, _backend):
    x, w, y = ctx.saved_tensors
    parts = [(a, m) for a, m in ((x_t, w), (x, w_t)) if a is not None and m is not None]
    z_t = _sum(_call(LinearFunction, a, m, b_t if i == 0 else None, "none", ctx.backend)
               for i, (a, m) in enumerate(parts)) if parts else b_t.expand(y.shape)
    return _times_s(z_t, y, ctx.activation, ctx.backend)


def _piece_jvp(piece, ctx, dy, y, dy_t, y_t, operand_term):
    """F_t of a backward piece ``piece(dy, y, activation)`` (matrix operand bound); operand_term: F(dY, M_t, y)."""
    act, backend = ctx.activation, ctx.backend
    s_term = piece(_times_ds(y_t, dy, y, act, backend), None, "none") if y_t is not None and \
        act in ("sigmoid", "tanh") else None
    return _sum([piece(dy_t, y, act) if dy_t is not None else None, s_term, operand_term])


def _grad_input_jvp(ctx, dy_t, w_t, y_t, _activation, _backend):
    dy, w, y = ctx.saved_tensors
    piece = (lambda d, yy, a, m=w: _call(LinearGradInputFunction, d, m, yy, a, ctx.backend))
    return _piece_jvp(piece, ctx, dy, y, dy_t, y_t, piece(dy, y, ctx.activation, w_t) if w_t is not None else None)


def _grad_weight_jvp(ctx, dy_t, x_t, y_t, _activation, _with_bias, _backend):
    dy, x, y = ctx.saved_tensors
    piece = (lambda d, yy, a, m=x, wb=ctx.with_bias: _call(LinearGradWeightFunction, d, m, yy, a, wb, ctx.backend))
    x_term = (piece(dy, y, ctx.activation, x_t, False)[0], None) if x_t is not None else None  # db has no X
    dw_t, db_t = _piece_jvp(piece, ctx, dy, y, dy_t, y_t, x_term)
    return dw_t, db_t if ctx.with_bias else None  # without a bias, db is a non-differentiable empty output


def _grad_bias_jvp(ctx, dy_t, y_t, _activation, _backend):
    dy, y = ctx.saved_tensors
    piece = (lambda d, yy, a: _call(LinearGradBiasFunction, d, yy, a, ctx.backend))
    return _piece_jvp(piece, ctx, dy, y, dy_t, y_t, None)


_JVP = {f: with_jvp(f, jvp) for f, jvp in ((LinearFunction, _linear_jvp), (LinearGradInputFunction, _grad_input_jvp),
                                           (LinearGradWeightFunction, _grad_weight_jvp),
                                           (LinearGradBiasFunction, _grad_bias_jvp))}
for _f, _fj in _JVP.items():
    _f.vmap = _fj.vmap = staticmethod(functools.partial(_vmap_by_rows, _f))


# ----------------------------------------------------------------- functional
def _check(input, weight, bias) -> None:
    """Torch's errors, raised before anything runs (the bias's shape is checked by :func:`_bias_rows`)."""
    if input.dim() == 0 or weight.dim() == 0:
        dims = f"{input.dim()}D and {weight.dim()}D"
        raise RuntimeError(f"both arguments to linear need to be at least 1D, but they are {dims}")
    if weight.dim() > 2:
        raise RuntimeError(f"t() expects a tensor with <= 2 dimensions, but self is {weight.dim()}D")
    if weight.dim() == 1 and bias is not None and (input.dim() == 2 or bias.dim() != 0):
        # torch adds a 0-d bias to the product with a 1-D weight, except for a 2-D input (its addmm path)
        raise RuntimeError("mat2 must be a matrix, got 1-D tensor")
    if weight.device != input.device or bias is not None and bias.device != input.device:  # (no set per call)
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


def _bias_rows(bias, lead, n, input_contiguous=True):
    """The bias as the kernels read it: (N,) if it varies along the features only, else (M, N), broadcast as
    torch does against the output (*lead, N) (torch's error if it cannot). A dynamic batch stays symbolic."""
    if bias.dim() == 1 and bias.shape[0] == n:  # the common (N,) bias, as it is (no view nodes in the graph)
        return bias
    # A 1-D input: torch adds the bias in place to the (N,) product (a 2-D bias does not fit), except on its
    # fused path (contiguous input and bias of shape (1, N), N > 1), which broadcasts the bias as one row
    fused = input_contiguous and bias.is_contiguous() and tuple(bias.shape) == (1, n) and n != 1
    if not len(lead) and bias.dim() > 1 and not fused:
        shape = torch.broadcast_shapes(bias.shape, (n,))  # torch's error when they do not broadcast at all
        raise RuntimeError(f"output with shape [{n}] doesn't match the broadcast shape {list(shape)}")
    rows = tuple(lead) if len(lead) else (1,)  # a 1-D input is one row
    if bias.dim() <= len(rows) + 1 and all(s == 1 for s in bias.shape[:-1]):
        last = bias.shape[-1] if bias.dim() else 1
        if last not in (1, n):
            bias.expand(*rows, n)  # raises torch's message
        return bias.reshape(last).expand(n)
    return bias.expand(*rows, n).reshape(-1, n)


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           activation: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear`` with an optional fused ``activation`` ("relu", "sigmoid", "tanh").

    Integer and complex operands compute as torch's CPU op does, on the reference backend; their activation
    is scratchops' own op applied after (torch's promotion and complex rules)."""
    check_tensor("linear", input, "input", 1)
    check_tensor("linear", weight, "weight", 2)
    if bias is not None:
        check_tensor("linear", bias, "bias", 3)
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    input, weight, bias = autocast_lower(input, weight, bias)
    _check(input, weight, bias)
    if activation is not None and not input.is_floating_point():
        return getattr(activations, activation)(linear(input, weight, bias))
    w2 = weight if weight.dim() == 2 else weight.unsqueeze(0)  # a 1-D weight is one output feature, dropped after
    n, k = w2.shape
    lead = input.shape[:-1]
    b = None if bias is None else _bias_rows(bias, lead, n, input.is_contiguous())
    # (M, K): reshape(-1, K) keeps a dynamic batch symbolic; K = 0 needs explicit sizes
    # a 2-D input and weight as they are: no view nodes in the autograd graph (host time in the backward)
    plain = input.dim() == 2 and weight.dim() == 2
    x2 = input if plain else input.reshape(-1, k) if k != 0 else input.reshape(input.shape[:-1].numel(), 0)
    y = (_JVP[LinearFunction] if forward_mode() else LinearFunction).apply(x2, w2, b, activation or "none",
                                                                          choose_backend(x2))
    if plain:
        return y
    return y.reshape(*lead, n) if weight.dim() == 2 else y.reshape(lead)
