r"""Regularization: inverted dropout (seeded, mask regenerated in backward) and the L2 penalty.

Dropout, with keep probability 1 - p and a mask drawn from a seed s:

    mask_e = [u(s, e) >= p]           u(s, e) uniform in [0, 1), e the element's flat index
    y      = x · mask / (1 - p)       (p = 1: y = x · 0)
    dx     = dy · mask / (1 - p)      the same mask, regenerated from s: nothing of x's size is saved

The seed is one 63-bit draw per call from torch's default generator of the input's
device (``torch.manual_seed`` makes it reproducible; under activation checkpointing
the restored RNG state draws the same seed again, so the recomputed mask matches).
e is the index in the memory order of the output's dense layout (``stride``).
The Triton kernel turns (s, e) into u with Philox; the reference backend with a
``torch.Generator`` seeded with s (a different but equally deterministic mask).
As torch's ``x * noise``, dropped NaN/inf give NaN and dropped negatives -0.

L2 penalty over tensors w_1..w_T, with λ the weight decay:

    P      = λ · Σ_t Σ_i w_{t,i}²
    dw_t   = 2λ · g · w_t             g = ∂L/∂P

Second derivatives (double backward), each built from the same kernels:

    dropout   dx = D dy is linear in dy and free of x: its backward is D again (v ↦ D v), the same seed
    l2        dw_t = 2λ g w_t is bilinear; with v_t = ∂L'/∂dw_t:
              ∂L'/∂g = 2λ Σ_t <v_t, w_t>      (a dot product: the sum kernel with a partner tensor)
              ∂L'/∂w_t = 2λ g v_t             (the gradient kernel again, on v)
    dot       D = λ Σ_t <a_t, b_t>: ∂/∂a_t = λ h b_t, ∂/∂b_t = λ h a_t (h = ∂L/∂D): the gradient kernel

Sums of squares accumulate in fp32 (fp64 for fp64 tensors); the result has the
dtype of torch's ``weight_decay * sum(w.pow(2).sum() for w in tensors)``. The
gradients of one dtype group are written to one flat buffer (row-major per tensor, each
tensor's piece starting at a multiple of PIECE elements, the padding written 0: the kernels
store in 16-byte vectors) and returned as views; non-contiguous tensors are read through a
contiguous copy.
"""
import struct

import torch

from scratchops._backend import Function, backend_op, choose_backend, triton_unavailable_reason
from scratchops._common import FLOAT_DTYPES, check_inplace, check_tensor, compute_dtype, dtype_groups, type_name

KERNELS = "regularization"
SEED_HIGH = 2**63 - 1  # seeds are drawn uniformly from [0, 2^63 - 1)
PIECE = 16  # a tensor's piece of a flat gradient buffer starts at a multiple of PIECE elements (the kernels' too)


def _padded(numel: int) -> int:
    """The length of a tensor's piece of a flat gradient buffer: ``numel`` rounded up to a multiple of PIECE."""
    return -(-numel // PIECE) * PIECE


# ----------------------------------------------------------------- layouts
def _out_strides(x: torch.Tensor) -> list[int]:
    """The output's (dense) layout, as torch's ``x * empty_like(x)``: x's strides when x is dense, else the
    memory format empty_like suggests (asked of a meta tensor: it traces under compile); contiguous: its own."""
    if x.is_contiguous():
        return list(x.stride())
    return list(torch.empty_like(x, device="meta").stride())


# ----------------------------------------------------------------- reference math: dropout
def _dropout_scale(p: float, dtype: torch.dtype) -> float:
    """1/(1-p) rounded as torch rounds it (fp32 noise divided by fp32(1-p)); unused for p = 1."""
    if p >= 1:
        return 1.0
    if dtype == torch.float64:
        return 1.0 / (1.0 - p)
    f32 = lambda v: struct.unpack("<f", struct.pack("<f", v))[0]  # noqa: E731
    return f32(1.0 / f32(1.0 - p))


def _dropout_apply(x: torch.Tensor, seed: torch.Tensor, p: float, stride: list[int]) -> torch.Tensor:
    """x · mask / (1 - p) in the layout ``stride``, the mask from a generator seeded with the seed's value."""
    g = torch.Generator(device=x.device)
    g.manual_seed(int(seed.item()))
    u = torch.rand(x.numel(), generator=g, dtype=torch.float64, device=x.device)
    acc = x.dtype if x.is_complex() else compute_dtype(x.dtype)
    real = torch.float64 if acc in (torch.float64, torch.complex128) else torch.float32
    m = (u >= p).to(real) * _dropout_scale(p, x.dtype)  # scale is exact in ``real``
    out = torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device)
    out.copy_(x.to(acc) * torch.as_strided(m, x.shape, stride))
    return out


def dropout_fwd(x: torch.Tensor, seed: torch.Tensor, p: float, stride: list[int]) -> torch.Tensor:
    return _dropout_apply(x, seed, p, stride)


def dropout_fwd_(x: torch.Tensor, seed: torch.Tensor, p: float, stride: list[int]) -> None:
    x.copy_(_dropout_apply(x, seed, p, stride))


def dropout_bwd(dy: torch.Tensor, seed: torch.Tensor, p: float, stride: list[int]) -> torch.Tensor:
    return _dropout_apply(dy, seed, p, stride)


# ----------------------------------------------------------------- reference math: l2_penalty
def l2_penalty_dot(tensors: list[torch.Tensor], others: list[torch.Tensor], weight_decay: float,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """λ · Σ_t <a_t, b_t>, per dtype group in its compute dtype (the forward passes ``others`` = ``tensors``)."""
    groups = dtype_groups(tensors)
    total_dtype = torch.float64 if torch.float64 in groups else torch.float32
    total = torch.zeros((), dtype=total_dtype, device=tensors[0].device)
    for dtype in groups:  # group by group, as the kernels (one launch per dtype)
        acc = compute_dtype(dtype)
        for a, b in zip(tensors, others):
            if a.dtype == dtype:
                total = total + (a.to(acc) * b.to(acc)).sum().to(total_dtype)
    return (total * weight_decay).to(out_dtype)


def l2_penalty_fwd(tensors: list[torch.Tensor], weight_decay: float, out_dtype: torch.dtype) -> torch.Tensor:
    return l2_penalty_dot(tensors, tensors, weight_decay, out_dtype)  # λ Σ_t <w_t, w_t>


def l2_penalty_bwd(tensors: list[torch.Tensor], grad: torch.Tensor, weight_decay: float) -> list[torch.Tensor]:
    coef = grad.to(torch.float64) * (2.0 * weight_decay)
    out = []
    for dtype, group in dtype_groups(tensors).items():
        acc = compute_dtype(dtype)
        pieces = []
        for w in group:  # row-major, each piece padded with zeros to a multiple of PIECE, as the kernels
            pieces.append((coef.to(acc) * w.reshape(-1).to(acc)).to(dtype))
            pieces.append(torch.zeros(_padded(w.numel()) - w.numel(), dtype=dtype, device=grad.device))
        out.append(torch.cat(pieces))
    return out


def _l2_penalty_bwd_fake(backend, tensors, grad, weight_decay):
    return [torch.empty(sum(_padded(t.numel()) for t in group), dtype=dtype, device=grad.device)
            for dtype, group in dtype_groups(tensors).items()]


# ----------------------------------------------------------------- backend ops
def _strided_fake(backend, x, seed, p, stride):
    return torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device)


dropout_fwd_op = backend_op("dropout_fwd", dropout_fwd, KERNELS, fake=_strided_fake)
dropout_fwd__op = backend_op("dropout_fwd_", dropout_fwd_, KERNELS, mutates_args=("x",),
                             fake=lambda backend, x, seed, p, stride: None)
dropout_bwd_op = backend_op("dropout_bwd", dropout_bwd, KERNELS, fake=_strided_fake)
l2_penalty_fwd_op = backend_op("l2_penalty_fwd", l2_penalty_fwd, KERNELS)
l2_penalty_dot_op = backend_op("l2_penalty_dot", l2_penalty_dot, KERNELS)
l2_penalty_bwd_op = backend_op("l2_penalty_bwd", l2_penalty_bwd, KERNELS, fake=_l2_penalty_bwd_fake)


# ----------------------------------------------------------------- torch.func
def _per_sample(info, in_dims, args, apply):
    """A vmap rule by a loop over the batch: ``apply`` on sample i of every batched argument (the others as
    they are), the results stacked at dim 0. Exact for these ops (a sample's result depends on that sample
    only), one launch per sample; a batched seed (vmap's randomness="different") gives each sample its own."""
    outs = [apply(*[a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims)])
            for i in range(info.batch_size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*outs)), tuple(0 for _ in outs[0])
    return torch.stack(outs), 0


# ----------------------------------------------------------------- autograd: dropout
def _masked(v, seed, p, stride, backend):
    """D v (the mask of ``seed``, scaled): differentiable (again D) when a graph is being built (create_graph)."""
    if torch.is_grad_enabled():
        return DropoutBackwardFunction.apply(v, seed, p, stride, backend)
    return dropout_bwd_op(backend, v, seed, p, stride)


class DropoutFunction(Function):
    """y = D x with D = diag(mask) / (1 - p), the mask drawn from ``seed``; backward dx = D dy (the mask
    regenerated from the seed: nothing of x's size is saved). Linear: every higher derivative is D again."""

    @staticmethod
    def forward(x, seed, p, stride, backend):
        return dropout_fwd_op(backend, x, seed, p, stride)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, seed, ctx.p, ctx.stride, ctx.backend = inputs
        ctx.save_for_backward(seed)  # 8 bytes

    @staticmethod
    def backward(ctx, dy):
        (seed,) = ctx.saved_tensors
        dx = _masked(dy, seed, ctx.p, ctx.stride, ctx.backend) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None  # x, seed, p, stride, backend

    @classmethod
    def vmap(cls, info, in_dims, x, seed, p, stride, backend):
        return _per_sample(info, in_dims, (x, seed, p, stride, backend), cls.apply)


class DropoutBackwardFunction(DropoutFunction):
    """dx = D dy, dropout's backward as a Function of dy: its backward is D again (DropoutFunction's)."""

    @staticmethod
    def forward(dy, seed, p, stride, backend):
        return dropout_bwd_op(backend, dy, seed, p, stride)


class DropoutInplaceFunction(DropoutFunction):
    """dropout(x, inplace=True): x is overwritten by y and marked dirty; only the seed is saved."""

    @staticmethod
    def forward(x, seed, p, stride, backend):
        dropout_fwd__op(backend, x, seed, p, stride)
        return x

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, seed, ctx.p, ctx.stride, ctx.backend = inputs
        ctx.mark_dirty(x)
        ctx.save_for_backward(seed)

    @staticmethod
    def vmap(info, in_dims, *args):
        raise NotImplementedError("scratchops: dropout(inplace=True) under torch.func.vmap is not supported; "
                                  "use inplace=False")


# ----------------------------------------------------------------- autograd: l2_penalty
def _carve(tensors, flats):
    """Per tensor, in the caller's order, its row-major piece of its dtype group's flat buffer (a view); walked by
    position, never keyed by ``id(w)`` (torch.compile guards on an id taken: it recompiled per call)."""
    slots = {dtype: [flat, 0] for dtype, flat in zip(dtype_groups(tensors), flats)}
    out = []
    for w in tensors:
        slot = slots[w.dtype]
        out.append(slot[0][slot[1]:slot[1] + w.numel()].view(w.shape))
        slot[1] += _padded(w.numel())  # each piece starts 16-byte aligned
    return out


def _scaled(needed, tensors, grad, weight_decay, backend):
    """2λ · g · w_t for the tensors ``needed`` flags (None for the others); differentiable under create_graph."""
    chosen = [w for w, need in zip(tensors, needed) if need]
    if not chosen:
        return [None] * len(needed)
    if torch.is_grad_enabled():
        flats = L2PenaltyBackwardFunction.apply(grad, weight_decay, backend, *chosen)
    else:
        flats = l2_penalty_bwd_op(backend, chosen, grad, weight_decay)
    grads = iter(_carve(chosen, flats))
    return [next(grads) if need else None for need in needed]


def _dot(tensors, others, weight_decay, out_dtype, backend):
    """λ · Σ_t <a_t, b_t>; differentiable under create_graph."""
    if torch.is_grad_enabled():
        return L2DotFunction.apply(weight_decay, out_dtype, backend, len(tensors), *tensors, *others)
    return l2_penalty_dot_op(backend, list(tensors), list(others), weight_decay, out_dtype)


class L2PenaltyFunction(Function):
    """P = λ Σ_t Σ w_t²; backward dw_t = 2λ g w_t (L2PenaltyBackwardFunction under create_graph)."""

    @staticmethod
    def forward(weight_decay, out_dtype, backend, *tensors):
        return l2_penalty_fwd_op(backend, list(tensors), weight_decay, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.weight_decay, _, ctx.backend = inputs[:3]
        # the tensors themselves (no new memory), only those whose gradient is asked for: an inference
        # tensor that needs none is never saved (autograd cannot save one)
        ctx.save_for_backward(*[w for w, need in zip(inputs[3:], ctx.needs_input_grad[3:]) if need])

    @staticmethod
    def backward(ctx, g):
        needed = ctx.needs_input_grad[3:]
        saved = iter(ctx.saved_tensors)
        tensors = [next(saved) if need else None for need in needed]
        return (None, None, None,  # weight_decay, out_dtype, backend
                *_scaled(needed, tensors, g, ctx.weight_decay, ctx.backend))

    @staticmethod
    def vmap(info, in_dims, *args):
        return _per_sample(info, in_dims, args, L2PenaltyFunction.apply)


class L2PenaltyBackwardFunction(Function):
    """The flat gradient buffers of 2λ g w_t (one per dtype group); backward, with v_t its incoming gradient:
    ∂/∂g = 2λ Σ_t <v_t, w_t> (L2DotFunction), ∂/∂w_t = 2λ g v_t (this Function again)."""

    @staticmethod
    def forward(grad, weight_decay, backend, *tensors):
        return tuple(l2_penalty_bwd_op(backend, list(tensors), grad, weight_decay))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.weight_decay, ctx.backend = inputs[1:3]
        ctx.save_for_backward(inputs[0], *inputs[3:])

    @staticmethod
    def backward(ctx, *dflats):
        grad, *tensors = ctx.saved_tensors
        v = _carve(tensors, dflats)
        dgrad = _dot(v, tensors, 2.0 * ctx.weight_decay, grad.dtype, ctx.backend) if ctx.needs_input_grad[0] else None
        return (dgrad, None, None,  # grad, weight_decay, backend
                *_scaled(ctx.needs_input_grad[3:], v, grad, ctx.weight_decay, ctx.backend))

    @staticmethod
    def vmap(info, in_dims, *args):
        return _per_sample(info, in_dims, args, L2PenaltyBackwardFunction.apply)


class L2DotFunction(Function):
    """D = λ Σ_t <a_t, b_t> (inputs: λ, out_dtype, backend, T, a_1..a_T, b_1..b_T); backward
    ∂/∂a_t = λ h b_t and ∂/∂b_t = λ h a_t, the gradient kernel with λ/2 (it computes 2·(λ/2)·h·x)."""

    @staticmethod
    def forward(weight_decay, out_dtype, backend, count, *tensors):
        return l2_penalty_dot_op(backend, list(tensors[:count]), list(tensors[count:]), weight_decay, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.weight_decay, _, ctx.backend, ctx.count = inputs[:4]
        ctx.save_for_backward(*inputs[4:])

    @staticmethod
    def backward(ctx, h):
        tensors, needed, half = ctx.saved_tensors, ctx.needs_input_grad[4:], ctx.weight_decay / 2
        a, b = tensors[:ctx.count], tensors[ctx.count:]
        return (None, None, None, None,  # weight_decay, out_dtype, backend, count
                *_scaled(needed[:ctx.count], b, h, half, ctx.backend),
                *_scaled(needed[ctx.count:], a, h, half, ctx.backend))

    @staticmethod
    def vmap(info, in_dims, *args):
        return _per_sample(info, in_dims, args, L2DotFunction.apply)


# ----------------------------------------------------------------- functional
def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    check_tensor("dropout", input)
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p != p:  # NaN passes torch's Python check and fails its C++ one
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p == 0 or not training or input.numel() == 0:
        return input  # as torch: the input itself, no kernel, no RNG draw
    if inplace:
        check_inplace(input)  # before any write: an inference tensor, a leaf requiring grad
    if not (input.is_floating_point() or input.is_complex()):
        if p < 1:
            raise RuntimeError(f"result type Float can't be cast to the desired output type {type_name(input.dtype)}")
        return input.zero_() if inplace else torch.zeros_like(input)  # x · 0 for integers and bools
    if input.is_complex() and p < 1:
        raise NotImplementedError(f"dropout: no Bernoulli mask for {input.dtype} (as torch's bernoulli_)")
    p = float(p)
    backend = choose_backend(input)
    if p < 1:  # one draw from the input device's default generator: manual_seed reproduces it
        seed = torch.randint(SEED_HIGH, (), dtype=torch.int64, device=input.device)
    else:  # p = 1 keeps nothing and, as torch, draws nothing
        seed = torch.zeros((), dtype=torch.int64, device=input.device)
    stride = _out_strides(input)
    if inplace and not (torch.is_grad_enabled() and input.requires_grad):
        # no graph to record: write x directly and return x itself, as torch (a Function would return an alias)
        dropout_fwd__op(backend, input, seed, p, stride)
        return input
    if inplace:
        return DropoutInplaceFunction.apply(input, seed, p, stride, backend)
    return DropoutFunction.apply(input, seed, p, stride, backend)

def l2_penalty(tensors, weight_decay: float = 1.0) -> torch.Tensor:
    """``weight_decay * Σ_t Σ w_t²`` over an iterable of floating tensors (one tensor is also accepted).

    An empty iterable gives ``0 * weight_decay`` (a Python number), as the formula would.
    """
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    try:
        tensors = list(tensors)
    except TypeError:
        raise TypeError(f"l2_penalty(): argument 'tensors' must be an iterable of Tensors, "
                        f"not {type(tensors).__name__}") from None
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise TypeError(f"l2_penalty(): argument 'weight_decay' must be a number, not {type(weight_decay).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"l2_penalty(): element {i} of 'tensors' must be a Tensor, not {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"l2_penalty(): element {i} of 'tensors' must be floating point, not {t.dtype}")
        if t.device != tensors[0].device:
            raise RuntimeError(f"l2_penalty(): expected all tensors on one device, got {tensors[0].device} "
                               f"and {t.device} (element {i})")
    if not tensors:
        return 0 * weight_decay
    out_dtype = tensors[0].dtype
    for t in tensors[1:]:
        out_dtype = torch.promote_types(out_dtype, t.dtype)
    # One backend for all: the first tensor the kernels cannot take decides (an explicit request then raises).
    blocker = next((t for t in tensors if triton_unavailable_reason(t.device, t.dtype, FLOAT_DTYPES)), tensors[0])
    backend = choose_backend(blocker)
    if torch.compiler.is_compiling() and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        # dynamo passes ctx to a *args forward when nothing needs a gradient: the forward op itself, as apply would
        return l2_penalty_fwd_op(backend, tensors, float(weight_decay), out_dtype)
    return L2PenaltyFunction.apply(float(weight_decay), out_dtype, backend, *tensors)

