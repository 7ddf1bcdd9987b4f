"""conv2d: every test tier of DESIGN.md, on both backends.

The Triton kernels run in the interpreter here (about a second per launch at these
sizes), so shapes are tiny and the option grid is chosen to cover each option
(stride 1/2/3, padding 0/1/'same'/'valid'/asymmetric, dilation 1/2, groups
1/2/depthwise, 1×1/3×3/7×7, odd sizes, bias None, unbatched) with few cases.
"""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import scratchops
import scratchops.functional as SF
import scratchops.nn as SN
from tests.helpers import (DEVICE, PARITY_DTYPES, check_aot, check_gradcheck, check_parity, check_same_error,
                           check_sass, expect_ops, make, tolerances)

OPS = ["conv2d_fwd", "conv2d_bwd_input", "conv2d_bwd_weight", "conv2d_bwd_bias"]

# (N, C, H, W), (K, C/groups, R, S), bias, options
GRID = {
    "1x1": ((1, 2, 5, 5), (3, 2, 1, 1), True, {}),
    "3x3 s2 p1 odd": ((2, 2, 7, 5), (2, 2, 3, 3), True, {"stride": 2, "padding": 1}),
    "7x7 s3 p3": ((1, 1, 8, 7), (2, 1, 7, 7), True, {"stride": 3, "padding": 3}),
    "3x3 same dil2": ((1, 2, 6, 5), (2, 2, 3, 3), True, {"padding": "same", "dilation": 2}),
    "2x2 same asymmetric": ((1, 2, 5, 6), (2, 2, 2, 2), True, {"padding": "same"}),
    "3x4 same asymmetric dil (2,1)": ((1, 1, 5, 6), (2, 1, 3, 4), True, {"padding": "same", "dilation": (2, 1)}),
    "groups2 dil2 p1": ((1, 4, 7, 7), (4, 2, 3, 3), True, {"padding": 1, "dilation": 2, "groups": 2}),
    "depthwise s2 valid": ((1, 2, 7, 6), (2, 1, 3, 3), True, {"stride": 2, "padding": "valid", "groups": 2}),
    "depthwise x2 s1 no bias": ((1, 2, 5, 5), (4, 1, 3, 3), False, {"padding": 1, "groups": 2}),
    "tuples s(2,1) p(1,0) d(1,2)": ((1, 2, 6, 7), (2, 2, 3, 2), True, {"stride": (2, 1), "padding": (1, 0),
                                                                        "dilation": (1, 2)}),
    "stride > kernel s3 1x1": ((1, 2, 7, 8), (2, 2, 1, 1), False, {"stride": 3}),
}


def _conv(kwargs):
    return lambda x, w, b=None: SF.conv2d(x, w, b, **kwargs)


def _torch_conv(kwargs):
    return lambda x, w, b=None: TF.conv2d(x, w, b, **kwargs)


def _inputs(x_shape, w_shape, bias, dtype=torch.float64, requires_grad=False):
    x = make(x_shape, dtype, requires_grad=requires_grad, seed=1)
    w = make(w_shape, dtype, requires_grad=requires_grad, seed=2)
    b = make((w_shape[0],), dtype, requires_grad=requires_grad, seed=3) if bias else None
    return (x, w) + ((b,) if bias else ())


def _reduction(x_shape, w_shape):
    """Longest sum in the forward or backward: C/G·R·S (y), K·R·S (dx), N·P·Q ≤ N·H·W (dw)."""
    return max(w_shape[1] * w_shape[2] * w_shape[3], w_shape[0] * w_shape[2] * w_shape[3],
               x_shape[0] * x_shape[2] * x_shape[3])


def _yardstick(kwargs, dtype):
    """torch's conv2d; for half types on the CPU computed in fp32 and rounded once, as scratchops and cuDNN do
    (torch's CPU half backward accumulates in half precision, several ulp off for sums this long)."""
    if DEVICE == "cuda" or dtype == torch.float32:
        return _torch_conv(kwargs)
    return lambda x, w, b=None: TF.conv2d(x.float(), w.float(), None if b is None else b.float(), **kwargs).to(dtype)


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 parity against torch in full fp32 (on a GPU both sides would otherwise use tf32)."""
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        yield


@pytest.mark.parametrize("case", sorted(GRID))
def test_gradcheck(backend, case):
    x_shape, w_shape, bias, kwargs = GRID[case]
    inputs = _inputs(x_shape, w_shape, bias, requires_grad=True)
    # fast_mode (gradcheck's random-projection mode: vᵀJu for random u, v, per input) keeps the grid within
    # budget (the interpreter costs about a second per launch); test_gradcheck_full checks every element.
    check_gradcheck(_conv(kwargs), *inputs, ops=OPS[:3] + (OPS[3:] if bias else []), fast_mode=True)


FULL = {"strided dilated grouped": ((1, 2, 3, 3), (2, 1, 2, 2),
                                    {"stride": 2, "padding": 1, "dilation": 2, "groups": 2}),
        "same asymmetric": ((1, 1, 3, 3), (1, 1, 2, 2), {"padding": "same"})}


@pytest.mark.parametrize("case", sorted(FULL))
def test_gradcheck_full(backend, case):
    """Every element of the Jacobians of input, weight and bias, on tiny cases with the awkward options."""
    x_shape, w_shape, kwargs = FULL[case]
    check_gradcheck(_conv(kwargs), *_inputs(x_shape, w_shape, True, requires_grad=True), ops=OPS)


def test_gradcheck_unbatched(backend):
    inputs = _inputs((2, 5, 6), (3, 2, 3, 3), True, requires_grad=True)
    check_gradcheck(_conv({"padding": 1}), *inputs, ops=OPS, fast_mode=True)


@pytest.mark.parametrize("dtype", PARITY_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "channels_last weight"])
def test_parity(backend, dtype, layout):
    x_shape, w_shape = (2, 5, 9, 7), (6, 5, 3, 3)
    base = make((2, 5, 9, 14) if layout == "sliced" else x_shape, dtype, seed=4)
    x = {"contiguous": base, "channels_last": base.to(memory_format=torch.channels_last),
         "sliced": base[..., ::2], "channels_last weight": base}[layout]
    w = make(w_shape, dtype, seed=5)
    if layout == "channels_last weight":
        w = w.to(memory_format=torch.channels_last)
    b = make((6,), dtype, seed=6)
    kwargs = {"padding": 1, "stride": (1, 2)}
    out = check_parity(_conv(kwargs), _yardstick(kwargs, dtype), x, w, b, reduction_size=_reduction(x_shape, w_shape))
    assert out.stride() == TF.conv2d(x, w, b, **kwargs).stride(), "output layout differs from torch's"


def test_channels_last_grad_layout(backend):
    x = make((2, 3, 6, 5)).to(memory_format=torch.channels_last).requires_grad_()
    w = make((4, 3, 3, 3), requires_grad=True)
    y = SF.conv2d(x, w, padding=1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["one channel", "1x1 image", "sliced"])
def test_ambiguous_channels_last_layout(backend, layout):
    # torch reads the layout from the strides (suggest_memory_format), also where size-1 dimensions make a
    # channels_last tensor contiguous too, or where a slice makes it contiguous in neither format.
    x_shape, sliced = {"one channel": ((2, 1, 5, 5), False), "1x1 image": ((2, 3, 1, 1), False),
                       "sliced": ((1, 3, 6, 6), True)}[layout]
    x = make(x_shape).to(memory_format=torch.channels_last)
    x = (x[:, :, ::2] if sliced else x).requires_grad_()
    w = make((2, x_shape[1], 1, 1))
    y, y_torch = SF.conv2d(x, w), TF.conv2d(x, w)
    assert y.stride() == y_torch.stride(), "output layout differs from torch's"
    (dx,), (dx_torch,) = (torch.autograd.grad(out, x, torch.ones_like(out)) for out in (y, y_torch))
    assert dx.stride() == dx_torch.stride(), "input gradient layout differs from torch's"


@pytest.mark.parametrize("case", ["unbatched", "no bias", "expanded grad", "scalar-expanded grad", "same 7x7",
                                  "blocks + 1"])
def test_parity_options(backend, case):
    x_shape, w_shape, kwargs = (2, 4, 8, 7), (4, 2, 3, 3), {"padding": 1, "groups": 2}
    if case == "unbatched":
        x_shape = x_shape[1:]
    if case == "same 7x7":
        w_shape, kwargs = (3, 4, 7, 7), {"padding": "same"}
    if case == "blocks + 1":  # 65 positions and 17 channels: one past the interpreter's 64-row and 16-wide tiles
        x_shape, w_shape, kwargs = (1, 17, 5, 13), (17, 17, 3, 3), {"padding": 1}
    x, w = make(x_shape, seed=7), make(w_shape, seed=8)
    args = (x, w) if case == "no bias" else (x, w, make((w_shape[0],), seed=9))
    y_shape = TF.conv2d(*args, **kwargs).shape
    grad_output = {"expanded grad": make(y_shape[-1:]).expand(y_shape),
                   "scalar-expanded grad": torch.ones((), device=DEVICE).expand(y_shape)}.get(case)
    check_parity(_conv(kwargs), _torch_conv(kwargs), *args, grad_output=grad_output,
                 reduction_size=_reduction((x_shape[0] if len(x_shape) == 4 else 1,) + x_shape[-3:], w_shape))


@pytest.mark.parametrize("bias_layout", ["strided", "expanded"])
def test_non_contiguous_bias(backend, bias_layout):
    # A sliced bias keeps its strides through check_parity; an expanded one is expanded inside the call.
    x, w = make((1, 2, 5, 5)), make((3, 2, 3, 3))
    if bias_layout == "strided":
        check_parity(_conv({}), _torch_conv({}), x, w, make((6,))[::2])
    else:
        check_parity(lambda x, w, b: SF.conv2d(x, w, b.expand(3)), lambda x, w, b: TF.conv2d(x, w, b.expand(3)),
                     x, w, make((1,)))


@pytest.mark.parametrize("shape", ["empty batch", "one channel", "output 1x1"])
def test_awkward_sizes(backend, shape):
    x_shape, w_shape = {"empty batch": ((0, 2, 5, 5), (3, 2, 3, 3)), "one channel": ((2, 1, 5, 5), (1, 1, 3, 3)),
                        "output 1x1": ((1, 3, 3, 3), (2, 3, 3, 3))}[shape]
    check_parity(_conv({}), _torch_conv({}), make(x_shape), make(w_shape), make((w_shape[0],)))


def test_special_values(backend):
    x, w = make((1, 2, 5, 5)), make((2, 2, 3, 3))
    x[0, 0, 2, 2], x[0, 1, 0, 0], w[1, 0, 0, 0] = float("nan"), float("inf"), -float("inf")
    # the yardstick: torch's conv2d where padding adds nothing (test_padding_adds_nothing; for this batch of one
    # torch's CPU conv2d takes its im2col path and multiplies the padding by the infinite weight instead)
    check_parity(_conv({"padding": 1}), lambda x, w: conv2d_by_taps(x, w, padding=1), x, w, grad=False,
                 equal_nan=True)


def conv2d_by_taps(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """torch's conv2d where a tap that reads padding adds nothing (torch's oneDNN path; scratchops' convention):
    each tap (r, s) is a 1×1 torch conv2d of the window of the image it reads, added into the outputs that read
    it (torch's im2col path multiplies the padding instead: 0·inf = NaN). Half types sum in float32. Arguments
    are checked, and the result computed, by torch's conv2d itself where no weight is infinite or NaN; always on
    contiguous copies: torch 2.13's CPU weight gradient is wrong for some strided operands (found by the fuzz:
    x (1, 4, 2, 1) with strides (4, 1, 4, 8), w (2, 2, 2, 3) channels_last, groups 2, padding (0, 1))."""
    x, w = x.contiguous(), w.contiguous()
    out = TF.conv2d(x, w, b, stride, padding, dilation, groups)
    if padding in (0, (0, 0), "valid") or bool(torch.isfinite(w).all()):
        return out
    two = (lambda v: [v, v] if isinstance(v, int) else list(v) * (3 - len(v)))
    step, dil, size = two(stride), two(dilation), w.shape[2:]
    total = [dil[i] * (size[i] - 1) for i in range(2)]
    before = [t // 2 for t in total] if padding == "same" else two(padding)
    ct = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xb, y = (x[None] if x.dim() == 3 else x).to(ct), torch.zeros(out.shape, dtype=ct, device=out.device)
    for r in range(size[0]):
        for s in range(size[1]):
            win = []  # per dim: the outputs o whose tap reads inside the image, and the inputs they read
            for i, tap in enumerate((r, s)):
                off, n_in, n_out = tap * dil[i] - before[i], xb.shape[2 + i], out.shape[-2 + i]
                lo, hi = max(0, -(off // step[i])), min(n_out, (n_in - 1 - off) // step[i] + 1)
                win.append((slice(lo, hi), slice(lo * step[i] + off, (hi - 1) * step[i] + off + 1, step[i])))
            if all(o.stop > o.start for o, _ in win):
                tap_y = TF.conv2d(xb[..., win[0][1], win[1][1]], w[:, :, r:r + 1, s:s + 1].to(ct), groups=groups)
                y[..., win[0][0], win[1][0]] += tap_y[0] if x.dim() == 3 else tap_y
    return (y if b is None else y + b.to(ct)[:, None, None]).to(out.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", [{"padding": 1}, {"padding": "same", "dilation": 2}, {"stride": 2, "padding": 1}])
def test_padding_adds_nothing(backend, dtype, kwargs):
    """Issue 16: where a tap reads padding it adds nothing, not 0·w: an infinite or NaN weight leaves the outputs
    where it meets only padding finite (torch's oneDNN path, e.g. float32 batches; its im2col path, e.g.
    float64, gives NaN there: torch is not consistent). Gradients too: dx, dw and db as the tap-by-tap twin."""
    x, b = make((2, 2, 4, 5), dtype, seed=1, requires_grad=True), make((3,), dtype, seed=3, requires_grad=True)
    w = make((3, 2, 3, 3), dtype, seed=2)
    w[0, 0, 0, 0], w[1, 1, 2, 1], w[2, 0, 1, 2] = float("inf"), float("nan"), -float("inf")
    w.requires_grad_()
    y, y_twin = SF.conv2d(x, w, b, **kwargs), conv2d_by_taps(x, w, b, **kwargs)
    assert y_twin.isfinite().any() and not y_twin.isfinite().all()
    torch.testing.assert_close(y, y_twin, equal_nan=True)
    dy = make(tuple(y.shape), dtype, seed=4)
    dy[0, 0, 0, 0] = float("inf")  # an infinite incoming gradient: dw adds it only where the tap reads the image
    for ours, twin in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(y_twin, (x, w, b), dy)):
        torch.testing.assert_close(ours, twin, equal_nan=True)


def test_strided_operands_weight_grad(backend):
    """A fuzz find: for these strides torch 2.13's CPU conv2d returns a wrong weight gradient (two pairs of
    elements swapped; right on contiguous copies). Ours is right on the strided operands themselves."""
    xb, wb = make((1, 2, 4), torch.float64, seed=1), make((2, 2, 3, 2), torch.float64, seed=2)
    kwargs = {"padding": (0, 1), "groups": 2}
    grads = []
    for conv, layout in ((SF.conv2d, lambda t, p: t.permute(*p)), (TF.conv2d, lambda t, p: t.permute(*p).contiguous())):
        x, w = xb.clone().requires_grad_(), wb.clone().requires_grad_()
        y = conv(layout(x, (2, 1, 0))[None], layout(w, (0, 3, 1, 2)), **kwargs)
        grads.append(torch.autograd.grad(y, (x, w), make(tuple(y.shape), torch.float64, seed=3)))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("kwargs", [{"padding": 1}, {"stride": 2, "padding": 1, "dilation": 2}])
def test_infinite_weight_input_grad(backend, kwargs):
    # dx sums dy·w over the taps that reach each input position only: an infinite tap must not turn the
    # positions it never reaches (borders, stride gaps) into NaN through 0·inf.
    x, w = make((1, 1, 5, 5), requires_grad=True), make((1, 1, 3, 3))
    w[0, 0, 0, 0] = float("inf")
    y_torch = TF.conv2d(x, w, **kwargs)
    grad_output = make(tuple(y_torch.shape), seed=11)
    (dx_torch,) = torch.autograd.grad(y_torch, x, grad_output)
    (dx,) = torch.autograd.grad(SF.conv2d(x, w, **kwargs), x, grad_output)
    assert not dx_torch.isnan().all()
    torch.testing.assert_close(dx, dx_torch, equal_nan=True)

BAD = {
    "channel mismatch": ((1, 4, 5, 5), (4, 3, 3, 3), {}, r"Given groups=1, weight of size \[4, 3, 3, 3\], expected "
                         r"input\[1, 4, 5, 5\] to have 3 channels, but got 4 channels instead"),
    "groups not dividing out channels": ((1, 4, 5, 5), (3, 2, 3, 3), {"groups": 2}, "expected weight to be divisible"),
    "zero groups": ((1, 4, 5, 5), (4, 4, 3, 3), {"groups": 0}, "non-positive groups"),
    "kernel larger than input": ((1, 4, 5, 5), (4, 4, 7, 7), {}, "Kernel size can't be greater"),
    "dilated kernel larger than padded input": ((1, 4, 5, 5), (4, 4, 3, 3), {"dilation": 3}, "Kernel size"),
    "2-D input": ((5, 5), (4, 4, 3, 3), {}, "Expected 3D"),
    "5-D input": ((1, 1, 4, 5, 5), (4, 4, 3, 3), {}, "Expected 3D"),
    "negative padding": ((1, 4, 5, 5), (4, 4, 3, 3), {"padding": -1}, "negative padding"),
    "zero stride": ((1, 4, 5, 5), (4, 4, 3, 3), {"stride": 0}, "non-positive stride"),
    "negative stride": ((1, 4, 5, 5), (4, 4, 3, 3), {"stride": (1, -1)}, "non-positive stride"),
    "zero dilation": ((1, 4, 5, 5), (4, 4, 3, 3), {"dilation": 0}, "dilation should be greater than zero"),
    "same with stride": ((1, 4, 5, 5), (4, 4, 3, 3), {"stride": 2, "padding": "same"}, "strided convolutions"),
    "bad padding string": ((1, 4, 5, 5), (4, 4, 3, 3), {"padding": "full"}, "Invalid padding string"),
    "3 strides": ((1, 4, 5, 5), (4, 4, 3, 3), {"stride": (1, 1, 1)}, "expected stride"),
    "3-D weight": ((1, 4, 5, 5), (4, 4, 3), {}, None),
    "float stride": ((1, 4, 5, 5), (4, 4, 3, 3), {"stride": (1, 1.5)}, "stride"),
    "bool padding": ((1, 4, 5, 5), (4, 4, 3, 3), {"padding": True}, "padding"),
    "float groups": ((1, 4, 5, 5), (4, 4, 3, 3), {"groups": 1.0}, "groups"),
    "empty image, padded": ((1, 4, 0, 5), (4, 4, 1, 1), {"padding": 1}, "Only zero batch or zero channel inputs"),
}


def test_integer_like_arguments(backend):
    # torch's parser takes any integer for an int argument: numpy's, a 0-d integer tensor.
    kwargs = {"stride": np.int64(2), "padding": (torch.tensor(1), 0), "dilation": 1, "groups": np.int32(2)}
    x, w = make((1, 4, 5, 5)), make((2, 2, 3, 3))
    torch.testing.assert_close(SF.conv2d(x, w, **kwargs), TF.conv2d(x, w, **kwargs))


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs(backend, case):
    x_shape, w_shape, kwargs, match = BAD[case]
    check_same_error(_conv(kwargs), _torch_conv(kwargs), make(x_shape), make(w_shape), match=match)


def test_bad_bias_and_dtypes(backend):
    x, w = make((1, 4, 5, 5)), make((4, 4, 3, 3))
    check_same_error(SF.conv2d, TF.conv2d, x, w, make((3,)), match="expected bias to be 1-dimensional with 4")
    check_same_error(SF.conv2d, TF.conv2d, x, w.double())
    check_same_error(SF.conv2d, TF.conv2d, x, w, make((4,), torch.float64))
    check_same_error(SF.conv2d, TF.conv2d, [1.0], w, match="must be Tensor")


def test_needs_input_grad(backend):
    from scratchops._backend import LAUNCHES

    x, w = make((1, 2, 4, 4), requires_grad=True), make((2, 2, 3, 3))
    before = {op: LAUNCHES[op, backend] for op in OPS}
    SF.conv2d(x, w, make((2,))).sum().backward()
    ran = {op for op in OPS if LAUNCHES[op, backend] > before[op]}
    assert ran == {"conv2d_fwd", "conv2d_bwd_input"}


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_module(backend, padding_mode):
    kwargs = dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=(1, 2), groups=2,
                  padding_mode=padding_mode)
    mine, ref = SN.Conv2d(**kwargs, device=DEVICE), torch.nn.Conv2d(**kwargs, device=DEVICE)
    mine.load_state_dict(ref.state_dict())
    assert isinstance(mine, torch.nn.Conv2d) and repr(mine) == repr(ref)
    x1, x2 = make((2, 4, 7, 6), requires_grad=True), make((2, 4, 7, 6), requires_grad=True)
    with expect_ops(OPS):
        y1 = mine(x1)
        y1.backward(torch.ones_like(y1))
    y2 = ref(x2)
    y2.backward(torch.ones_like(y2))
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad)
    torch.testing.assert_close(mine.bias.grad, ref.bias.grad)


def test_module_conv_forward_hook_point(backend):
    # A subclass that convolves with a transformed weight through _conv_forward (as torch's forward does).
    class Scaled(SN.Conv2d):
        def forward(self, input):
            return self._conv_forward(input, 2 * self.weight, self.bias)

    ours, theirs = Scaled(2, 3, 3, padding=1, padding_mode="reflect"), torch.nn.Conv2d(2, 3, 3, padding=1,
                                                                                        padding_mode="reflect")
    theirs.load_state_dict(ours.state_dict())
    x = make((1, 2, 5, 5))
    with expect_ops(["conv2d_fwd"]):
        y = ours(x)
    torch.testing.assert_close(y, theirs._conv_forward(x, 2 * theirs.weight, theirs.bias))


def test_module_same_padding_no_bias(backend):
    kwargs = dict(in_channels=3, out_channels=2, kernel_size=(2, 3), padding="same", bias=False)
    mine, ref = SN.Conv2d(**kwargs, device=DEVICE), torch.nn.Conv2d(**kwargs, device=DEVICE)
    mine.load_state_dict(ref.state_dict())
    x = make((3, 5, 5))
    torch.testing.assert_close(mine(x), ref(x))


def _cnn(conv, relu, linear):
    torch.manual_seed(0)
    return torch.nn.Sequential(conv(1, 4, 3, padding=1), relu(), conv(4, 4, 3, stride=2), relu(),
                               torch.nn.Flatten(), linear(4 * 2 * 2, 3)).to(DEVICE)


def test_small_cnn_trains_like_torch(backend):
    """conv-relu-conv-relu-linear of scratchops.nn modules (Conv2d, ReLU, Linear) against its torch.nn twin:
    same weights, same synthetic images (3 classes from image statistics), same SGD: the same losses."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 1, 5, 5, generator=g).to(DEVICE)
    labels = (images[:, 0, :2].mean((1, 2)) > images[:, 0, 3:].mean((1, 2))).long() + (images.mean((1, 2, 3)) > 0)
    mine = _cnn(SN.Conv2d, SN.ReLU, SN.Linear)
    ref = _cnn(torch.nn.Conv2d, torch.nn.ReLU, torch.nn.Linear)
    ref.load_state_dict(mine.state_dict())

    def sgd_step(model, opt):
        opt.zero_grad()
        loss = TF.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        return loss.item()

    losses = [[sgd_step(model, opt) for _ in range(10)]
              for model, opt in ((m, torch.optim.SGD(m.parameters(), lr=0.1)) for m in (mine, ref))]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    assert losses[0][-1] < losses[0][0]


def test_split_k_and_batch_chunks(backend, monkeypatch):
    """The launchers' GPU-scale paths, forced at test size: wgrad's split reduction (partial planes summed)
    and the batch split that keeps int32 position indices below 2^31."""
    if backend != "triton":
        pytest.skip("launcher paths of the Triton backend")
    import scratchops._kernels.conv2d as K
    import scratchops._kernels.conv2d_bwd as KB

    monkeypatch.setattr(KB, "_split_k", lambda tiles, npq, device: 3)
    monkeypatch.setattr(K, "MAX_POSITIONS", 100)  # 81 positions per image: one image per launch
    kwargs = {"padding": 1, "groups": 2}
    check_parity(_conv(kwargs), _torch_conv(kwargs), make((3, 4, 9, 9)), make((4, 2, 3, 3)), make((4,)),
                 reduction_size=3 * 81)


def test_fp32_precision_follows_cudnn_tf32_flag():
    pytest.importorskip("triton")
    from scratchops._kernels._gemm import input_precision
    from scratchops._kernels.conv2d import precision_class

    for allowed, expected in ((True, "tf32"), (False, "ieee")):
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=allowed):
            assert precision_class(torch.float32) == expected and input_precision(expected) == expected
            assert precision_class(torch.float16) == "half" and precision_class(torch.float64) == "fp64"
            assert input_precision(precision_class(torch.float64)) == "ieee"


@pytest.mark.gpu
def test_tf32_parity_gpu(backend):
    """With tf32 allowed (torch's default for convolutions) both sides round the operands to tf32."""
    x, w = make((4, 32, 16, 16)), make((32, 32, 3, 3)) / 17
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        torch.testing.assert_close(SF.conv2d(x, w, padding=1), TF.conv2d(x, w, padding=1), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_resnet_layer_gpu(backend, dtype):
    """A ResNet-like layer at a size where the autotuned tiles and the split-K wgrad run (GPU only)."""
    x = make((8, 64, 28, 28), dtype).to(memory_format=torch.channels_last)
    w = make((128, 64, 3, 3), dtype).to(memory_format=torch.channels_last) / 24
    kwargs = {"padding": 1, "stride": 2}
    out = check_parity(_conv(kwargs), _yardstick(kwargs, dtype), x, w, make((128,), dtype),
                       reduction_size=8 * 28 * 28)
    assert out.is_contiguous(memory_format=torch.channels_last)


def _tensor_core_rows_use_wgmma(rows, kernels):
    """Every fp16/bf16 and tf32 GEMM compile issues wgmma (HGMMA in the SASS)."""
    gemm = [r for r in rows if r["kernel"] in kernels and (r["constexprs"]["INPUT_PRECISION"] == "tf32"
                                                           or r["dtypes"][0] in ("*fp16", "*bf16"))]
    assert gemm
    check_sass(gemm, hgmma=kernels)


def test_aot_compile_sm90():
    """Forward: every tile × dtype (fp32 with tf32 and ieee; fp64 multiply-and-sum) × bias or not × layout
    (unit stride along W or along channels, as launches specialize), no spills."""
    rows = check_aot("scratchops._kernels.conv2d")
    assert {r["kernel"] for r in rows} == {"_conv2d_fwd_kernel"}
    assert {r["dtypes"][0] for r in rows} == {"*fp16", "*bf16", "*fp32", "*fp64"}
    assert {r["constexprs"]["INPUT_PRECISION"] for r in rows if r["dtypes"] == ["*fp32"]} == {"tf32", "ieee"}
    assert {r["constexprs"]["HAS_BIAS"] for r in rows} == {"True", "False"}
    assert {(r["constexprs"].get("stride_xw"), r["constexprs"].get("stride_xc")) for r in rows} == \
        {("1", None), (None, "1")}
    _tensor_core_rows_use_wgmma(rows, ("_conv2d_fwd_kernel",))
    # NCHW 1×1, step 1, no padding (FLAT: a tile's rows are one aligned run of an image's h·w): both operands
    # through cp.async (LDGSTS), no 16-bit gathers, in every 16-bit and tf32 compile (issue 12 item 4)
    flat = [r for r in rows if r["constexprs"].get("FLAT") == "True"]
    assert {r["constexprs"].get("stride_xw") for r in flat} == {"1"}
    fast = [r for r in flat if r["dtypes"][0] in ("*fp16", "*bf16") or r["constexprs"]["INPUT_PRECISION"] == "tf32"]
    assert len(fast) == 18, len(fast)
    slow = [(r["dtypes"], r["constexprs"]["BLOCK_M"], r["ldg"], r["ldgsts"]) for r in fast
            if not r["ldgsts"] or r["ldg"].get("16")]
    assert not slow, slow


@pytest.mark.parametrize("case", ["1x1", "1x1 groups", "1x1 rows cross images", "1x1 sliced W", "1x1 padded",
                                  "1x1 fp32 ieee"])
def test_forward_1x1_image_runs(backend, case):
    """NCHW 1×1 convolutions with step 1, no padding and dense (h, w) take the image-run tile (FLAT): right values
    with bias, groups and runs that end inside an image; a view whose rows are not dense, padding, or fp32 without
    tf32 (the ieee class keeps the gather), does not."""
    x_shape, w_shape, kwargs, sliced, flat = {
        "1x1": ((2, 3, 5, 7), (4, 3, 1, 1), {}, False, True),
        "1x1 groups": ((2, 4, 3, 3), (6, 2, 1, 1), {"groups": 2}, False, True),
        "1x1 rows cross images": ((3, 2, 9, 9), (5, 2, 1, 1), {}, False, True),  # 81 = one run of 64 + 17
        "1x1 sliced W": ((2, 3, 5, 8), (4, 3, 1, 1), {}, True, False),
        "1x1 padded": ((2, 3, 5, 7), (4, 3, 1, 1), {"padding": 1}, False, False),
        "1x1 fp32 ieee": ((2, 3, 5, 7), (4, 3, 1, 1), {}, False, False)}[case]
    x, w, b = make(x_shape), make(w_shape, seed=1), make((w_shape[0],), seed=2)
    if sliced:
        x = x[..., 1:]
    fwd_kernels = importlib.import_module("scratchops._kernels.conv2d")
    fwd_kernels._PLANS.clear()
    with torch.backends.cudnn.flags(allow_tf32=case != "1x1 fp32 ieee"):
        y = SF.conv2d(x, w, b, **kwargs)
    torch.testing.assert_close(y, TF.conv2d(x, w, b, **kwargs), atol=1e-5, rtol=1e-5)
    if backend == "triton":
        launches = [launch for p in fwd_kernels._PLANS.values() for launch in p[3]]
        assert launches and all(bool(launch[2].get("FLAT")) == flat for launch in launches)


def test_aot_compile_sm90_backward():
    rows = check_aot("scratchops._kernels.conv2d_bwd")
    names = {"_conv2d_bwd_input_kernel", "_conv2d_bwd_weight_kernel", "_conv2d_sum_planes_kernel",
             "_conv2d_bwd_bias_kernel"}
    assert {r["kernel"] for r in rows} == names
    for name in names:
        assert {r["dtypes"][0] for r in rows if r["kernel"] == name} == {"*fp16", "*bf16", "*fp32", "*fp64"}
    _tensor_core_rows_use_wgmma(rows, ("_conv2d_bwd_input_kernel", "_conv2d_bwd_weight_kernel"))


# ----------------------------------------------------------------- dtypes, devices and autocast as torch (issue 16)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(backend, dtype):
    """conv2d is on torch's lower-precision autocast list (CPU and CUDA): operands cast to the autocast dtype,
    float64 left alone, gradients back in the operands' own dtype; values as torch's conv of the cast operands."""
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16 (the reference backend covers it)")
    kwargs = {"padding": 1, "stride": (1, 2)}
    outs = {}
    for name, fn in (("ours", SF.conv2d), ("torch", TF.conv2d)):
        x, w, b = make((2, 3, 6, 5), requires_grad=True), make((4, 3, 3, 3), requires_grad=True), make((4,))
        with torch.autocast(DEVICE, dtype=dtype):
            y = fn(x, w, b, **kwargs)
            y64 = fn(x.detach().double(), w.detach().double(), None, **kwargs)
        y.backward(make(tuple(y.shape), dtype, seed=12))
        outs[name] = (y, y64, x.grad, w.grad)
    (y, y64, dx, dw), (ty, ty64, tdx, tdw) = outs["ours"], outs["torch"]
    assert y.dtype == ty.dtype == dtype and y64.dtype == ty64.dtype == torch.float64
    assert dx.dtype == tdx.dtype == torch.float32 and dw.dtype == tdw.dtype == torch.float32
    torch.testing.assert_close(y64, ty64)
    # values: torch's conv of the cast operands (in fp32, rounded once, on the CPU: _yardstick)
    x, w, b = make((2, 3, 6, 5), requires_grad=True), make((4, 3, 3, 3), requires_grad=True), make((4,))
    ref = _yardstick(kwargs, dtype)(x.to(dtype), w.to(dtype), b.to(dtype))
    ref.backward(make(tuple(ref.shape), dtype, seed=12))
    tol = tolerances(dtype, _reduction((2, 3, 6, 5), (4, 3, 3, 3)))
    for ours, theirs in ((y, ref), (dx, x.grad), (dw, w.grad)):
        torch.testing.assert_close(ours, theirs.to(ours.dtype), **tol)


def test_bool_not_implemented(backend):
    x, w = make((1, 2, 5, 5)) > 0, make((3, 2, 3, 3)) > 0
    check_same_error(SF.conv2d, TF.conv2d, x, w, match="not implemented for 'Bool'")
    check_same_error(SF.conv2d, TF.conv2d, x, w.float(), match="not implemented for 'Bool'")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.complex64,
                                   torch.complex128])
def test_integer_and_complex(backend, dtype):
    """torch's CPU conv2d computes integer (wrapping as the storage type does) and complex convolutions: so does
    the reference backend; an explicit Triton request refuses them (its kernels take real floating types)."""
    if DEVICE != "cpu" and not dtype.is_complex:
        pytest.skip("torch's CUDA conv2d refuses integers: test_integer_cuda_refused")
    kwargs = {"padding": 1, "stride": 2, "groups": 2}
    scale = 1 if dtype.is_complex else 40  # integers: products that wrap int8/uint8
    x = (make((2, 4, 5, 6), torch.float64) * scale).to(dtype)
    w = (make((4, 2, 3, 3), torch.float64, seed=3) * scale).to(dtype)
    b = (make((4,), torch.float64, seed=4) * scale).to(dtype)
    if dtype.is_complex:
        x, w, b = x + 1j * make(tuple(x.shape), dtype.to_real(), seed=5), w * (1 - 0.5j), b * 1j
    if backend == "triton":
        with pytest.raises(RuntimeError, match="backend 'triton' was requested but cannot run"):
            SF.conv2d(x, w, b, **kwargs)
    with scratchops.use_backend("auto" if backend == "triton" else backend):
        out = check_parity(_conv(kwargs), _torch_conv(kwargs), x, w, b, reduction_size=18)
    assert out.dtype == dtype


@pytest.mark.gpu
def test_integer_cuda_refused(backend):
    x, w = make((1, 2, 5, 5)).long(), make((3, 2, 3, 3)).long()
    check_same_error(SF.conv2d, TF.conv2d, x, w)


def test_operands_on_other_devices(backend):
    """Operands on two devices: a RuntimeError before anything runs (CUDA + CPU as torch: test_devices_gpu)."""
    from scratchops._backend import LAUNCHES

    x, w, b = make((1, 2, 5, 5)), make((3, 2, 3, 3)), make((3,))
    before = LAUNCHES.copy()
    for args in ((x, w.to("meta"), b), (x, w, b.to("meta")), (x.to("meta"), w, None)):
        with pytest.raises(RuntimeError, match="should be the same"):
            SF.conv2d(*args)
    assert LAUNCHES == before


@pytest.mark.gpu
def test_devices_gpu(backend):
    x, w, b = make((1, 2, 5, 5)), make((3, 2, 3, 3)), make((3,))
    check_same_error(SF.conv2d, TF.conv2d, x.cpu(), w, b)
    check_same_error(SF.conv2d, TF.conv2d, x, w.cpu(), b)
    check_same_error(SF.conv2d, TF.conv2d, x, w, b.cpu())


# ----------------------------------------------------------------- outputs in their final layout (issue 12)
@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_in_final_layout(backend, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = make((2, 3, 6, 5)).to(memory_format=fmt).requires_grad_()
    w = make((4, 3, 3, 3)).to(memory_format=fmt).requires_grad_()
    b = make((4,), requires_grad=True)
    y = SF.conv2d(x, w, b, padding=1)
    assert y.is_contiguous(memory_format=fmt)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), make(tuple(y.shape)).to(memory_format=fmt))
    assert dx.is_contiguous(memory_format=fmt) and dw.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("split", [1, 3])
def test_launchers_run_no_torch_kernels(backend, channels_last, split, monkeypatch):
    """Outside the Triton launches the launchers only allocate (each output once, directly in its final layout)
    and take views: no torch kernel converts, copies, zero-fills or sums (wgrad's split reduction included)."""
    if backend != "triton":
        pytest.skip("launchers of the Triton backend")
    from torch.utils._python_dispatch import TorchDispatchMode

    import scratchops._kernels.conv2d as K
    import scratchops._kernels.conv2d_bwd as KB
    from scratchops._kernels._launch import Kernel

    launching = []
    launch = Kernel.__call__

    def counted(self, *args, **kwargs):  # the interpreter's own host copies inside a launch are not glue
        launching.append(self)
        try:
            return launch(self, *args, **kwargs)
        finally:
            launching.pop()

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.launches = [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not launching:
                self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(Kernel, "__call__", counted)
    monkeypatch.setattr(KB, "_split_k", lambda tiles, npq, device: split)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, w, b = make((2, 3, 6, 5)).to(memory_format=fmt), make((4, 3, 3, 3)).to(memory_format=fmt), make((4,))
    dy = make((2, 4, 6, 5)).to(memory_format=fmt)
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], 1, channels_last)
    with Ops() as mode:
        outs = (K.conv2d_fwd(x, w, b, *geometry), KB.conv2d_bwd_input(dy, w, list(x.shape), *geometry),
                KB.conv2d_bwd_weight(dy, x, list(w.shape), *geometry), KB.conv2d_bwd_bias(dy))
    allocations = ("aten.empty", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided")
    glue = [op for op in mode.ops if op not in (*allocations, "aten.slice", "aten.unsqueeze")]
    assert not glue, f"torch kernels around the Triton launches: {glue}"
    assert sum(map(mode.ops.count, allocations)) == 4 + (split > 1)  # y, dx, dw, db (+ wgrad's partial planes)
    expected = (TF.conv2d(x, w, b, padding=1),
                *torch.ops.aten.convolution_backward(dy, x, w, [4], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                     [True, True, True]))
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref)
    for out in outs[:3]:
        assert out.is_contiguous(memory_format=fmt)


def test_launch_plans_follow_layout_and_tf32_flag(backend, monkeypatch):
    """The launchers keep one launch plan per (shapes, strides, dtype, geometry, policy): the same shapes in
    another layout, or with cudnn.allow_tf32 flipped, get a plan of their own, never a stale one."""
    if backend != "triton":
        pytest.skip("launchers of the Triton backend")
    import scratchops._kernels.conv2d as K
    from scratchops._kernels._launch import Kernel

    classes = []
    launch = Kernel.__call__

    def recorded(self, grid, *args, cls="default", **consts):
        classes.append(cls)
        return launch(self, grid, *args, cls=cls, **consts)

    monkeypatch.setattr(Kernel, "__call__", recorded)
    x, w, b = make((2, 3, 6, 5)), make((4, 3, 3, 3)), make((4,))
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], 1, False)
    expected = TF.conv2d(x, w, b, padding=1)
    for layout in (x, x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        torch.testing.assert_close(K.conv2d_fwd(layout, w, b, *geometry), expected, rtol=1e-3, atol=1e-3)
    for allowed in (False, True):
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=allowed):
            classes.clear()
            K.conv2d_fwd(x, w, b, *geometry)
            assert classes == ["tf32" if allowed else "ieee"]


# ----------------------------------------------------------------- double backward (issue 13)
# (N, C, H, W), (K, C/groups, R, S), bias, options: tiny (gradgradcheck runs the backward once per input element)
GRADGRAD = {
    "s2 p1 d2 g2 bias": ((1, 2, 4, 4), (2, 1, 2, 2), True, {"stride": 2, "padding": 1, "dilation": 2, "groups": 2}),
    "1x1 no bias": ((2, 2, 2, 2), (3, 2, 1, 1), False, {}),
    "same asymmetric": ((1, 1, 3, 3), (2, 1, 2, 2), True, {"padding": "same"}),
    "s(2,1) p(1,0) d(1,2)": ((1, 2, 3, 4), (1, 2, 2, 2), True, {"stride": (2, 1), "padding": (1, 0),
                                                                 "dilation": (1, 2)}),
}


@pytest.mark.parametrize("case", sorted(GRADGRAD))
def test_gradgradcheck(backend, case, one_thread):
    """Second derivatives of x, w, b and of the incoming gradient, on the same kernels. Every element on the
    reference backend; on Triton (about 0.1 s per interpreted launch) fast_mode, random projections: the
    second-order formulas are the same Functions on both backends, and test_gradcheck_full checks every
    element of each kernel's first derivatives."""
    x_shape, w_shape, bias, kwargs = GRADGRAD[case]
    inputs = _inputs(x_shape, w_shape, bias, requires_grad=True)
    with expect_ops(OPS[:3] + (OPS[3:] if bias else [])):
        assert torch.autograd.gradgradcheck(_conv(kwargs), inputs, fast_mode=backend == "triton")


def test_third_derivative_matches_torch(backend):
    """Every gradient is built from differentiable Functions: a third derivative matches torch's."""
    kwargs = {"stride": 2, "padding": 1, "groups": 2}
    results = []
    for conv in (SF.conv2d, TF.conv2d):
        x, w, b = _inputs((1, 2, 4, 4), (2, 1, 2, 2), True, requires_grad=True)
        y = conv(x, w, b, **kwargs)
        gx, gw, gb = torch.autograd.grad((y ** 2).sum(), (x, w, b), create_graph=True)
        hx, hw = torch.autograd.grad((gx ** 2).sum() + (gw ** 3).sum() + gb.sum() * gw.sum(), (x, w),
                                     create_graph=True)
        results.append((gx, gw, gb, hx, hw, *torch.autograd.grad((hx * hw.sum()).sum(), (x, w, b))))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs)


def test_double_backward_saves_nothing_more(backend):
    """The first backward keeps what it always kept: x (for dw) and w (for dx), nothing else."""
    x, w, b = _inputs((1, 2, 4, 4), (2, 2, 3, 3), True, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        SF.conv2d(x, w, b, padding=1)
    assert sorted(t.data_ptr() for t in saved) == sorted([x.data_ptr(), w.data_ptr()])


def test_create_graph_gradients_carry_a_graph(backend):
    x, w, b = _inputs((1, 2, 4, 4), (2, 2, 3, 3), True, requires_grad=True)
    grads = torch.autograd.grad((SF.conv2d(x, w, b, padding=1) ** 2).sum(), (x, w, b), create_graph=True)
    assert all(g.requires_grad and g.grad_fn is not None for g in grads)
    x = make((1, 2, 4, 4), torch.complex128, requires_grad=True)
    w = make((2, 2, 3, 3), torch.complex128, requires_grad=True)
    with scratchops.use_backend("auto" if backend == "triton" else backend):
        y = SF.conv2d(x, w, padding=1)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(y.abs().sum(), (x, w), create_graph=True)


# ----------------------------------------------------------------- torch.func (issue 13)
FUNC_KWARGS = {"stride": 2, "padding": 1, "groups": 2}  # y (1, 2, 2, 2) from x (1, 2, 3, 3), w (2, 1, 2, 2)


def test_vmap(backend):
    """A batch of images folds into N and a batch of weights (and biases) into more groups: one launch each,
    values as a loop over the batch with torch's conv2d; per-sample weight gradients (vmap of grad) too."""
    from scratchops._backend import LAUNCHES
    from torch.func import grad, vmap

    xs, ws, bs = make((3, 1, 2, 3, 3), seed=1), make((3, 2, 1, 2, 2), seed=2), make((3, 2), seed=3)
    for dims in ((1, None, None), (None, 0, 0), (0, 2, None)):
        args = [t.movedim(0, d) if d is not None else t[0] for t, d in zip((xs, ws, bs), dims)]
        before = LAUNCHES["conv2d_fwd", backend]
        out = vmap(_conv(FUNC_KWARGS), dims)(*args)
        assert LAUNCHES["conv2d_fwd", backend] == before + 1
        pick = [(lambda i, t=t: t[i]) if d is not None else (lambda i, t=t: t[0]) for t, d in zip((xs, ws, bs), dims)]
        expected = [TF.conv2d(*(f(i) for f in pick), **FUNC_KWARGS) for i in range(3)]
        torch.testing.assert_close(out, torch.stack(expected))
    loss = (lambda conv: lambda x, w: (conv(x, w) ** 2).sum())
    w = ws[0].clone().requires_grad_()
    per_sample = vmap(grad(loss(_conv(FUNC_KWARGS)), argnums=1), (0, None))(xs, w)
    expected = [torch.autograd.grad(loss(_torch_conv(FUNC_KWARGS))(x, w), w)[0] for x in xs]
    torch.testing.assert_close(per_sample, torch.stack(expected))


def test_jacobians(backend):
    """jacrev (vmap of the backward Functions) and jacfwd (vmap of their jvp) of x, w and b, in float64, as
    torch's conv2d Jacobians."""
    from torch.func import jacfwd, jacrev

    args = _inputs((1, 2, 3, 3), (2, 1, 2, 2), True)
    for transform in (jacrev, jacfwd):
        ours = transform(_conv(FUNC_KWARGS), argnums=(0, 1, 2))(*args)
        theirs = transform(_torch_conv(FUNC_KWARGS), argnums=(0, 1, 2))(*args)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)


def test_hessian(backend):
    """torch.func.hessian (jacfwd of jacrev: the jvp of every backward Function) of a small conv scalar
    function in x and w, float64, as torch's."""
    from torch.func import hessian

    x, w = _inputs((1, 1, 2, 2), (1, 1, 2, 2), False)
    b = make((1,), torch.float64, seed=3)
    loss = (lambda conv: lambda x, w: (conv(x, w, b).tanh() * conv(x, w)).sum())
    ours = hessian(loss(_conv({"padding": 1})), argnums=(0, 1))(x, w)
    theirs = hessian(loss(_torch_conv({"padding": 1})), argnums=(0, 1))(x, w)
    for row_ours, row_theirs in zip(ours, theirs):
        for a, b in zip(row_ours, row_theirs):
            torch.testing.assert_close(a, b)
