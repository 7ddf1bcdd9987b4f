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
dY and y are loaded: there is no separate elementwise pass.

The reference formulas below use ``torch.matmul`` for the plain products (the
building block; the linear op itself, its bias, activation and gradients are
written out here).
"""
import contextlib

import torch

from scratchops._backend import backend_op, choose_backend
from scratchops._common import check_same_device, check_tensor, compute_dtype, type_name
from scratchops.activations import activate, activation_grad

KERNELS = "linear"
KERNELS_BWD = "linear_bwd"
ACTIVATIONS = (None, "relu", "sigmoid", "tanh")


# ----------------------------------------------------------------- reference math
def _no_autocast(t: torch.Tensor):
    """The reference formulas run in the dtypes they name, even when called under autocast."""
    if t.device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)


def _grad_z(dy: torch.Tensor, y: torch.Tensor | None, activation: str) -> torch.Tensor:
    """dZ = dY ⊙ act'(z) from the output y, in the compute dtype."""
    dz = dy.to(compute_dtype(dy.dtype))
    return dz if activation == "none" else activation_grad(dz, y.to(dz.dtype), activation)


def linear_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, activation: str) -> torch.Tensor:
    cd = compute_dtype(x.dtype)
    with _no_autocast(x):
        z = torch.matmul(x.to(cd), w.to(cd).t())
        if b is not None:
            z = z + b.to(cd)
        # z is rounded to the output dtype before the activation, as torch's linear output is.
        return activate(z.to(x.dtype).to(cd), activation).to(x.dtype)


def linear_bwd_input(dy: torch.Tensor, w: torch.Tensor, y: torch.Tensor | None, activation: str) -> torch.Tensor:
    with _no_autocast(dy):
        dz = _grad_z(dy, y, activation).to(w.dtype)  # rounded as torch's activation backward rounds it
        cd = compute_dtype(w.dtype)
        return torch.matmul(dz.to(cd), w.to(cd)).to(w.dtype)


def linear_bwd_weight(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, activation: str,
                      with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW, db); db is empty (shape (0,)) unless ``with_bias``."""
    with _no_autocast(dy):
        dz = _grad_z(dy, y, activation)
        cd = compute_dtype(x.dtype)
        dw = torch.matmul(dz.to(x.dtype).to(cd).t(), x.to(cd)).to(x.dtype)
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
class LinearFunction(torch.autograd.Function):
    """x (M, K), W (N, K), b (N,) or None -> y = act(x Wᵀ + b) (M, N)."""

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
        ctx.has_bias = b is not None

    @staticmethod
    def backward(ctx, dy):
        x, w, y = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        backend, act = ctx.backend, ctx.activation
        dx = dw = db = None
        # dX = dZ · W,  dZ = dY ⊙ act'(z) (formed inside the kernel from dY and y)
        if need_x:
            dx = linear_bwd_input_op(backend, dy, w, y, act)
        # dW = dZᵀ · X, with db = Σ_m dZ[m, :] fused in when b needs a gradient too
        if need_w:
            dw, db_fused = linear_bwd_weight_op(backend, dy, x, y, act, need_b)
            db = db_fused if need_b else None
        elif need_b:
            # db = Σ_m dZ[m, :]
            db = linear_bwd_bias_op(backend, dy, y, act)
        return dx, dw, db, None, None  # activation, backend


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
    """Torch's errors, raised before anything runs."""
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
    if not input.is_floating_point():  # NotImplementedError, as torch's matmul for a dtype it lacks (bool)
        raise NotImplementedError(f"scratchops linear supports floating dtypes only, got {input.dtype}")
    k_in, k_w = input.shape[-1], weight.shape[-1]
    n = weight.shape[0] if weight.dim() == 2 else 1
    if k_in != k_w:
        m = input.numel() // k_in if k_in else input.shape[:-1].numel()
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({m}x{k_in} and {k_w}x{n})")
    if bias is not None and not (bias.dim() <= 1 and bias.numel() in (1, n)):
        raise RuntimeError(f"scratchops linear: bias of shape {tuple(bias.shape)} cannot be added to outputs with "
                           f"{n} features (expected shape ({n},))")


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           activation: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear`` with an optional fused ``activation`` ("relu", "sigmoid", "tanh")."""
    check_tensor("linear", input, "input", 1)
    check_tensor("linear", weight, "weight", 2)
    if bias is not None:
        check_tensor("linear", bias, "bias", 3)
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    input, weight, bias = _autocast(input, weight, bias)
    _check(input, weight, bias)
    w2 = weight if weight.dim() == 2 else weight.unsqueeze(0)  # a 1-D weight is one output feature, dropped after
    n, k = w2.shape
    b1 = None if bias is None else bias.reshape(-1).expand(n)
    x2 = input.reshape(input.shape[:-1].numel(), k)  # explicit sizes: K = 0 works too
    y = LinearFunction.apply(x2, w2, b1, activation or "none", choose_backend(x2))
    lead = input.shape[:-1]
    return y.reshape(*lead, n) if weight.dim() == 2 else y.reshape(lead)
