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

Sums of squares accumulate in fp32 (fp64 for fp64 tensors); the result has the
dtype of torch's ``weight_decay * sum(w.pow(2).sum() for w in tensors)``. The
gradients of one dtype group are written to one flat buffer (row-major per tensor) and
returned as views; non-contiguous tensors are read through a contiguous copy.
"""
import struct

import torch

from scratchops._backend import backend_op, choose_backend, triton_unavailable_reason
from scratchops._common import FLOAT_DTYPES, check_inplace, check_tensor, compute_dtype

KERNELS = "regularization"
SEED_HIGH = 2**63 - 1  # seeds are drawn uniformly from [0, 2^63 - 1)
TORCH_INT_NAMES = {torch.bool: "Bool", torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short",
                   torch.int32: "Int", torch.int64: "Long"}


# ----------------------------------------------------------------- layouts
def _out_strides(x: torch.Tensor) -> list[int]:
    """The output's (dense) layout, as torch's ``x * empty_like(x)``: x's strides when x is dense, else the
    memory format empty_like suggests. Asked of a meta tensor: no memory, and it traces under torch.compile."""
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
def _groups(tensors):
    """Tensors by dtype, in order of first appearance (the Triton launcher uses the same rule)."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return groups


def l2_penalty_fwd(tensors: list[torch.Tensor], weight_decay: float, out_dtype: torch.dtype) -> torch.Tensor:
    groups = _groups(tensors)
    total_dtype = torch.float64 if torch.float64 in groups else torch.float32
    total = torch.zeros((), dtype=total_dtype, device=tensors[0].device)
    for dtype, group in groups.items():
        for w in group:
            wc = w.to(compute_dtype(dtype))
            total = total + (wc * wc).sum().to(total_dtype)
    return (total * weight_decay).to(out_dtype)


def l2_penalty_bwd(tensors: list[torch.Tensor], grad: torch.Tensor, weight_decay: float) -> list[torch.Tensor]:
    coef = grad.to(torch.float64) * (2.0 * weight_decay)
    out = []
    for dtype, group in _groups(tensors).items():
        acc = compute_dtype(dtype)
        pieces = [(coef.to(acc) * w.reshape(-1).to(acc)).to(dtype) for w in group]  # row-major, as the kernels
        out.append(torch.cat(pieces))
    return out


def _l2_penalty_bwd_fake(backend, tensors, grad, weight_decay):
    return [torch.empty(sum(t.numel() for t in group), dtype=dtype, device=grad.device)
            for dtype, group in _groups(tensors).items()]


# ----------------------------------------------------------------- backend ops
def _strided_fake(backend, x, seed, p, stride):
    return torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device)


dropout_fwd_op = backend_op("dropout_fwd", dropout_fwd, KERNELS, fake=_strided_fake)
dropout_fwd__op = backend_op("dropout_fwd_", dropout_fwd_, KERNELS, mutates_args=("x",),
                             fake=lambda backend, x, seed, p, stride: None)
dropout_bwd_op = backend_op("dropout_bwd", dropout_bwd, KERNELS, fake=_strided_fake)
l2_penalty_fwd_op = backend_op("l2_penalty_fwd", l2_penalty_fwd, KERNELS)
l2_penalty_bwd_op = backend_op("l2_penalty_bwd", l2_penalty_bwd, KERNELS, fake=_l2_penalty_bwd_fake)


# ----------------------------------------------------------------- autograd
class Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed, p, stride, backend):
        y = dropout_fwd_op(backend, x, seed, p, stride)
        ctx.save_for_backward(seed)  # 8 bytes: the mask is regenerated from it
        ctx.p, ctx.stride, ctx.backend = p, stride, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        (seed,) = ctx.saved_tensors
        # dx = dy · mask / (1 - p), mask regenerated from the seed
        dx = dropout_bwd_op(ctx.backend, dy, seed, ctx.p, ctx.stride) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None  # x, seed, p, stride, backend


class DropoutInplace(Dropout):
    """dropout(x, inplace=True): x is overwritten by y and marked dirty; only the seed is saved; Dropout's backward."""

    @staticmethod
    def forward(ctx, x, seed, p, stride, backend):
        dropout_fwd__op(backend, x, seed, p, stride)
        ctx.mark_dirty(x)
        ctx.save_for_backward(seed)
        ctx.p, ctx.stride, ctx.backend = p, stride, backend
        return x


def _carve(tensors, flats):
    """Views of the flat per-dtype gradient buffers, one per tensor (row-major, as the kernels wrote them)."""
    views = []
    for (dtype, group), flat in zip(_groups(tensors).items(), flats):
        offset = 0
        for w in group:
            views.append((w, flat[offset:offset + w.numel()].view(w.shape)))
            offset += w.numel()
    # back in the caller's order (the grouping reordered them); ids are unique per list entry
    by_id = {}
    for w, v in views:
        by_id.setdefault(id(w), []).append(v)
    return [by_id[id(w)].pop(0) for w in tensors]


class L2Penalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight_decay, out_dtype, backend, *tensors):
        ctx.save_for_backward(*tensors)  # the tensors themselves: no new memory
        ctx.weight_decay, ctx.backend = weight_decay, backend
        return l2_penalty_fwd_op(backend, list(tensors), weight_decay, out_dtype)

    @staticmethod
    def backward(ctx, g):
        tensors = ctx.saved_tensors
        needed = ctx.needs_input_grad[3:]
        chosen = [w for w, need in zip(tensors, needed) if need]
        # dw_t = 2λ · g · w_t
        grads = iter(_carve(chosen, l2_penalty_bwd_op(ctx.backend, chosen, g, ctx.weight_decay)) if chosen else [])
        return (None, None, None,  # weight_decay, out_dtype, backend
                *[next(grads) if need else None for need in needed])


# ----------------------------------------------------------------- functional
def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    check_tensor("dropout", input)
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p != p:  # NaN passes torch's Python check and fails its C++ one
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p == 0 or not training or input.numel() == 0:
        return input  # as torch: the input itself, no kernel, no RNG draw
    if not (input.is_floating_point() or input.is_complex()):
        if p < 1:
            raise RuntimeError(f"result type Float can't be cast to the desired output type "
                               f"{TORCH_INT_NAMES.get(input.dtype, input.dtype)}")
        return input.zero_() if inplace else torch.zeros_like(input)  # x · 0 for integers and bools
    if input.is_complex() and p < 1:
        raise NotImplementedError(f"dropout: no Bernoulli mask for {input.dtype} (as torch's bernoulli_)")
    p = float(p)
    backend = choose_backend(input)
    if inplace:
        check_inplace(input)
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
        return DropoutInplace.apply(input, seed, p, stride, backend)
    return Dropout.apply(input, seed, p, stride, backend)


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
    return L2Penalty.apply(float(weight_decay), out_dtype, backend, *tensors)

