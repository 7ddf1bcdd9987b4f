"""Host helpers that both layers need: the functional layer (``scratchops/<family>.py``) and the
launchers (``scratchops._kernels.<family>``, the repository's ``triton_kernels/``).

Torch only, no Triton: importing it never starts Triton. One owner per fact:

* dtype names as torch spells them in error messages, and as Triton spells them in signatures;
* the compute dtype of a storage dtype;
* the named codes shared by a functional and its kernels (reductions, activations);
* the shape arithmetic both sides repeat (conv output size, dtype groups of a tensor list);
* the host-side checks both sides run (class-index targets in range).
"""
from __future__ import annotations

import contextlib
import enum
import warnings

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)

# torch's names for dtypes in its error messages ("expected ... Long, but got Float").
TORCH_TYPE_NAMES = {
    torch.bool: "Bool", torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int",
    torch.int64: "Long", torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float",
    torch.float64: "Double", torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}

# Triton's names for a pointer's element type in a kernel signature ("*fp32").
TRITON_TYPE_NAMES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
}


def type_name(dtype: torch.dtype) -> str:
    """``dtype`` as torch's error messages spell it (``torch.float32`` -> ``Float``)."""
    return TORCH_TYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype math runs in: float64 for float64, float32 for the other floating types."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Reduction(enum.IntEnum):
    """A loss's ``reduction``, as the REDUCTION constexpr of its kernels."""

    NONE = 0
    MEAN = 1
    SUM = 2


REDUCTIONS = {"none": Reduction.NONE, "mean": Reduction.MEAN, "sum": Reduction.SUM}
LEGACY_REDUCTION_WARNING = "size_average and reduce args will be deprecated, please use reduction='{}' instead."


def legacy_reduction(size_average, reduce, stacklevel: int = 4) -> str:
    """torch's rule for the deprecated size_average/reduce flags (each defaults to True), with its warning."""
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    reduction = "mean" if (size_average and reduce) else ("sum" if reduce else "none")
    warnings.warn(LEGACY_REDUCTION_WARNING.format(reduction), stacklevel=stacklevel)
    return reduction


def reduction_code(reduction: str, stacklevel: int = 4) -> Reduction:
    """A loss's ``reduction`` string as its code: torch's ValueError for an unknown one, and its warning for
    the deprecated "elementwise_mean"."""
    if reduction == "elementwise_mean":
        warnings.warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.",
                      stacklevel=stacklevel)
        return Reduction.MEAN
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return REDUCTIONS[reduction]


class Activation(enum.IntEnum):
    """An activation fused into another op (linear's epilogue), as the ACTIVATION constexpr."""

    NONE = 0
    RELU = 1
    SIGMOID = 2
    TANH = 3


ACTIVATIONS = {"none": Activation.NONE, "relu": Activation.RELU, "sigmoid": Activation.SIGMOID,
               "tanh": Activation.TANH}
# the same as plain ints, for launchers (an enum member's .value is a Python property: host time per launch)
ACTIVATION_CODES = {name: int(code) for name, code in ACTIVATIONS.items()}


def dtype_groups(tensors) -> dict[torch.dtype, list[torch.Tensor]]:
    """Tensors by dtype, in order of first appearance (multi-tensor ops run one launch per group)."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return groups


def conv_output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int, dilation: int) -> int:
    """Output length of a convolution along one spatial dim."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def check_class_targets(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """torch's IndexError for a class index outside [0, classes) that is not ``ignore_index``."""
    numel = target.numel()
    if not numel:
        return
    if numel <= 64:  # a few indices: one read-back as a list, no kernel (~0.5 µs instead of ~2.4 µs)
        values = target.tolist() if target.dim() == 1 else target.reshape(-1).tolist()
        low, high = min(values), max(values)
    else:  # common case (all in range): two kernels, one read-back
        low, high = torch.stack(torch.aminmax(target)).tolist()
    if low >= 0 and high < classes:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


def class_loss_denominator(x, target, weight, ignore_index: int, reduction: int, cd) -> list[torch.Tensor]:
    """A class loss's mean denominator: [D for the forward, D for the backward] for logits x (N, C, S) and
    targets (N, S) indices or (N, C, S) probabilities. D = Σ w_t over active rows (indices), N·S (probabilities),
    1 (sum, none); the backward's is 1 when every row is ignored (every dZ row is 0 then, as torch's gradient)."""
    one = torch.ones((), dtype=cd, device=x.device)
    if reduction != Reduction.MEAN:
        return [one, one]
    if target.is_floating_point():
        c = target.shape[1]
        d = torch.full((), target.shape[0] * target.shape[2] if c else float("nan"), dtype=cd, device=x.device)
        return [d, d]
    active = target != ignore_index
    tc = torch.where(active, target, torch.zeros_like(target))
    wt = weight.to(cd)[tc] if weight is not None and weight.numel() else torch.ones(target.shape, dtype=cd,
                                                                                   device=x.device)
    d = (wt * active).sum()
    return [d, torch.where(active.any(), d, one)]


def reduce_rows(loss: torch.Tensor, denom: torch.Tensor, reduction: int) -> torch.Tensor:
    """Per-row losses reduced: as they are (none), their sum over ``denom`` (mean), their sum."""
    return loss if reduction == Reduction.NONE else (loss.sum() / denom if reduction == Reduction.MEAN
                                                     else loss.sum())


def no_autocast(t: torch.Tensor):
    """A context where autocast is off for ``t``'s device: reference formulas run in the dtypes they name."""
    on = t.device.type in ("cpu", "cuda")
    return torch.autocast(t.device.type, enabled=False) if on else contextlib.nullcontext()


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)  # one cheap check: no autocast on anywhere


def autocast_enabled(t: torch.Tensor) -> bool:
    """``torch.is_autocast_enabled(t.device.type)``, answered without the device when no autocast is on."""
    if _any_autocast is not None and not _any_autocast():
        return False
    return torch.is_autocast_enabled(t.device.type)


def autocast_lower(*tensors) -> tuple:
    """As torch's autocast for its lower-precision ops (linear, conv2d, ...): where autocast is on for the first
    operand's device, floating operands other than float64 go to its dtype (a differentiable cast); None stays."""
    if _any_autocast is not None and not _any_autocast():
        return tensors
    device_type = tensors[0].device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def check_tensor(fn: str, value, arg: str = "input", position: int = 1) -> None:
    """torch's TypeError when ``value`` is not a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}(): argument '{arg}' (position {position}) must be Tensor, not {type(value).__name__}")


def check_same_device(*tensors) -> None:
    """torch's RuntimeError when the operands (None skipped) live on more than one device."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, {names}!")


def check_inplace(x: torch.Tensor) -> None:
    """torch's RuntimeError, before anything is written, for an in-place op autograd would reject."""
    if not torch.compiler.is_compiling() and x.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError("Inplace update to inference tensor outside InferenceMode is not allowed.You can make a "
                           "clone to get a normal tensor before doing inplace update.See "
                           "https://github.com/pytorch/rfcs/pull/17 for more details.")
    if not (torch.is_grad_enabled() and x.requires_grad):
        return
    if x.is_leaf:
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")
    if x._base is not None and x._base.is_leaf:
        raise RuntimeError("a view of a leaf Variable that requires grad is being used in an in-place operation.")
