"""conv2d's arguments as torch parses and checks them: torch's exception types and messages, raised before
anything runs (``scratchops.conv2d.conv2d`` calls these; the maths is in ``scratchops.conv2d``)."""
from __future__ import annotations

import operator

import torch

from scratchops._common import type_name

SPATIAL_DIMS = 2


def as_int(name: str, value) -> int:
    """An int argument as torch's parser takes it: any integer (numpy's, a 0-d int tensor), but no bool or
    float (TypeError)."""
    if type(value) is int:  # the common case, first
        return value
    if isinstance(value, (bool, float)) or not hasattr(type(value), "__index__"):
        raise TypeError(f"conv2d(): argument '{name}' must be int or tuple of ints, not {type(value).__name__}")
    return operator.index(value)


def pair(name: str, value) -> list[int]:
    """int or 1-/2-sequence → [h, w], with torch's error for a wrong length."""
    if type(value) is int:  # the common case, first
        return [value] * SPATIAL_DIMS
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    values = [as_int(name, v) for v in values]
    if len(values) == 1:
        values = values * SPATIAL_DIMS
    if len(values) != SPATIAL_DIMS:
        raise RuntimeError(f"expected {name} to be a single integer value or a list of {SPATIAL_DIMS} values to "
                           f"match the convolution dimensions, but got {name}={list(values)}")
    return values


def suggests_channels_last(t: torch.Tensor) -> bool:
    """torch's ``suggest_memory_format() == channels_last`` for a 4-D tensor: its strides order the
    dimensions C, W, H, N from the innermost out (sliced and size-1 dimensions included); a zero-size
    tensor, a zero channel stride, or an N111-like tie (N's stride equal to C's) stays contiguous."""
    smallest, shape, strides = 0, t.shape, t.stride()
    for d in (1, 3, 2, 0):
        if shape[d] == 0 or strides[d] < smallest or (d == 1 and strides[1] == 0):
            return False
        if d == 0 and smallest == strides[1]:
            return False
        smallest = strides[d] * max(shape[d], 1)
    return True


def resolve_padding(padding, stride, dilation, w) -> list[int]:
    """[top, bottom, left, right]; 'same' puts the odd one of dil·(R−1) at the bottom/right, as torch."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding != "same":
            raise RuntimeError(f"Invalid padding string: '{padding}'")
        if any(s != 1 for s in stride):
            raise RuntimeError("padding='same' is not supported for strided convolutions")
        out = []
        for i in range(SPATIAL_DIMS):
            total = dilation[i] * (w.shape[2 + i] - 1)
            out += [total // 2, total - total // 2]
        return out
    ph, pw = pair("padding", padding)
    if ph < 0 or pw < 0:
        raise RuntimeError("negative padding is not supported")
    return [ph, ph, pw, pw]


def check_operands(x, w, bias, stride, padding, dilation, groups):
    xs, ws = x.shape, w.shape  # read once: each .shape makes a torch.Size (host time on every call)
    if len(ws) != 4:
        raise RuntimeError(f"weight of conv2d should be 4-D (out_channels, in_channels/groups, kH, kW), "
                           f"but got weight of size {list(ws)}")
    if stride[0] <= 0 or stride[1] <= 0:
        raise RuntimeError("non-positive stride is not supported")
    if dilation[0] <= 0 or dilation[1] <= 0:
        raise RuntimeError(f"dilation should be greater than zero, but got {dilation}")
    if groups <= 0:
        raise RuntimeError("non-positive groups is not supported")
    if ws[0] == 0 or ws[0] % groups:
        kind = "at least" if ws[0] == 0 else "divisible by"
        raise RuntimeError(f"Given groups={groups}, expected weight to be {kind} {1 if ws[0] == 0 else groups} "
                           f"at dimension 0, but got weight of size [{list(ws)}] instead")
    if xs[1] != ws[1] * groups:
        raise RuntimeError(f"Given groups={groups}, weight of size {list(ws)}, expected input{list(xs)} to "
                           f"have {ws[1] * groups} channels, but got {xs[1]} channels instead")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != ws[0]):
        raise RuntimeError(f"Given weight of size {list(ws)}, expected bias to be 1-dimensional with "
                           f"{ws[0]} elements, but got bias of size {list(bias.shape)} instead")
    padded_h, padded_w = xs[2] + padding[0] + padding[1], xs[3] + padding[2] + padding[3]
    kernel_h, kernel_w = dilation[0] * (ws[2] - 1) + 1, dilation[1] * (ws[3] - 1) + 1
    if kernel_h > padded_h or kernel_w > padded_w:
        raise RuntimeError(f"Calculated padded input size per channel: ({padded_h} x {padded_w}). Kernel size: "
                           f"({kernel_h} x {kernel_w}). Kernel size can't be greater than actual input size")
    if xs[0] and xs[1] and not x.numel():
        raise RuntimeError(f"Only zero batch or zero channel inputs are supported, but got input shape: "
                           f"{list(xs)}")
    dtype = x.dtype
    if dtype == torch.bool:  # torch's kernels dispatch on the input's dtype first
        raise NotImplementedError(f"\"slow_conv2d_{x.device.type}\" not implemented for 'Bool'")
    if w.dtype != dtype:
        raise RuntimeError(f"Input type ({dtype}) and weight type ({w.dtype}) should be the same")
    if bias is not None and bias.dtype != dtype:
        raise RuntimeError(f"Input type ({dtype}) and bias type ({bias.dtype}) should be the same")
    if not (dtype.is_floating_point or dtype.is_complex) and not x.is_cpu:  # integers: torch's CPU op only
        raise NotImplementedError(f"\"slow_conv2d_{x.device.type}\" not implemented for '{type_name(dtype)}'")


def check_devices(x, w, bias) -> None:
    """torch's RuntimeError for operands on different devices, before anything runs."""
    for name, t in (("weight", w), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"Input type ({x.type()}) and {name} type ({t.type()}) should be the same")
