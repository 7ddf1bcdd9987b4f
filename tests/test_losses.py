"""mse_loss, cross_entropy: every test tier of DESIGN.md, on both backends."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as TF

import scratchops
import scratchops.functional as SF
import scratchops.nn as SN
from tests.helpers import (DEVICE, PARITY_DTYPES, check_aot, check_gradcheck, check_parity, check_same_error,
                           expect_ops, make)

BLOCK = 1024  # triton_kernels.losses.BLOCK (elementwise kernels)
CE_SMALL_BLOCK = 256  # triton_kernels.losses.CE_BLOCKS[0]: classes around it switch the row chunk
REDUCTIONS = ("none", "mean", "sum")
CE_OPS = ["cross_entropy_fwd", "cross_entropy_bwd"]
MSE_OPS = ["mse_fwd", "mse_bwd"]


def _targets(shape, classes, seed=0, ignore=None):
    """Class indices of ``shape`` in [0, C); every third one is ``ignore`` when given."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, max(classes, 1), shape, generator=g)
    if ignore is not None:
        t.view(-1)[::3] = ignore
    return t.to(DEVICE)


def _torch_exact(fn):
    """torch's op computed in float64 and rounded to the input's dtype: the yardstick for half precision.

    torch's CPU half cross_entropy rounds log_softmax to half before the loss and its
    gradient (p - ε/C cancels), so it sits several half ulps from the exact value; the
    fused kernels keep fp32 throughout and are compared with the exact result instead.
    """
    def run(x, target, **kw):
        if x.dtype not in (torch.float16, torch.bfloat16):
            return fn(x, target, **kw)
        kw = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        return fn(x.double(), target.double() if target.is_floating_point() else target, **kw).to(x.dtype)
    return run


def _probs(shape, seed=0, dtype=torch.float64, requires_grad=False):
    q = make(shape, torch.float64, seed=seed).softmax(1)
    return q.to(dtype).requires_grad_(requires_grad)


# ----------------------------------------------------------------- gradcheck
CLASS_COMBOS = list(itertools.product((False, True), (None, 1), (0.0, 0.2), REDUCTIONS))
PROB_COMBOS = list(itertools.product((False, True), (0.0, 0.2), REDUCTIONS))


@pytest.mark.parametrize("weighted,ignore,smoothing,reduction", CLASS_COMBOS)
def test_ce_gradcheck_class_targets(backend, weighted, ignore, smoothing, reduction):
    x = make((3, 4), torch.float64, requires_grad=True)
    t = _targets((3,), 4, ignore=ignore)
    kw = dict(weight=make((4,), torch.float64, low=0.2, high=2.0) if weighted else None,
              ignore_index=-100 if ignore is None else ignore, label_smoothing=smoothing, reduction=reduction)
    check_gradcheck(lambda x: SF.cross_entropy(x, t, **kw), x, ops=CE_OPS, fast_mode=True)
    check_parity(SF.cross_entropy, TF.cross_entropy, x.detach(), t, **kw)


@pytest.mark.parametrize("weighted,smoothing,reduction", PROB_COMBOS)
def test_ce_gradcheck_prob_targets(backend, weighted, smoothing, reduction):
    x = make((2, 5), torch.float64, requires_grad=True)
    q = _probs((2, 5), requires_grad=True)
    kw = dict(weight=make((5,), torch.float64, low=0.2, high=2.0) if weighted else None, label_smoothing=smoothing,
              reduction=reduction)
    check_gradcheck(lambda x, q: SF.cross_entropy(x, q, **kw), x, q, ops=CE_OPS + ["cross_entropy_target_bwd"],
                    fast_mode=True)
    check_parity(SF.cross_entropy, TF.cross_entropy, x.detach(), q.detach(), **kw)


@pytest.mark.parametrize("case", ["class", "prob", "unbatched", "kdim"])
def test_ce_gradcheck_full(backend, case):
    """Full (not fast-mode) Jacobians on the richest settings."""
    w = make((5,), torch.float64, low=0.2, high=2.0)
    if case == "prob":
        w = w[:3]
        x, q = make((1, 3, 2), torch.float64, requires_grad=True), _probs((1, 3, 2), requires_grad=True)
        check_gradcheck(lambda x, q: SF.cross_entropy(x, q, weight=w, label_smoothing=0.1), x, q, ops=CE_OPS)
        check_parity(SF.cross_entropy, TF.cross_entropy, x.detach(), q.detach(), weight=w, label_smoothing=0.1)
        return
    shape, tshape = {"class": ((3, 5), (3,)), "unbatched": ((5,), ()), "kdim": ((1, 5, 2, 1), (1, 2, 1))}[case]
    x, t = make(shape, torch.float64, requires_grad=True), _targets(tshape, 5, ignore=3 if len(tshape) == 1 else None)
    kw = dict(weight=w, ignore_index=3, label_smoothing=0.3)
    check_gradcheck(lambda x: SF.cross_entropy(x, t, reduction="none", **kw), x, ops=CE_OPS)
    check_parity(SF.cross_entropy, TF.cross_entropy, x.detach(), t, **kw)


@pytest.mark.parametrize("weighted,broadcast,reduction",
                         list(itertools.product((False, True), (False, True), REDUCTIONS)))
def test_mse_gradcheck(backend, weighted, broadcast, reduction):
    x = make((2, 1) if broadcast else (2, 3), torch.float64, requires_grad=True)
    y = make((3,) if broadcast else (2, 3), torch.float64, requires_grad=True, seed=1)
    w = make(x.shape, torch.float64, low=0.5, high=2.0, requires_grad=True, seed=2) if weighted else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        inputs = (x, y) + ((w,) if weighted else ())
        check_gradcheck(lambda *a: SF.mse_loss(a[0], a[1], reduction=reduction, weight=a[2] if weighted else None),
                        *inputs, ops=MSE_OPS)
        check_parity(SF.mse_loss, TF.mse_loss, x.detach(), y.detach(), reduction=reduction,
                     weight=None if w is None else w.detach())


# ----------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", PARITY_DTYPES)
@pytest.mark.parametrize("kw", [{}, {"reduction": "sum", "label_smoothing": 0.1}, {"reduction": "none"},
                                {"ignore_index": 2, "weight": True}, {"label_smoothing": 0.25, "weight": True}])
@pytest.mark.parametrize("shape,tshape", [((5, 7), (5,)), ((2, 7, 3, 2), (2, 3, 2))])
def test_ce_parity(backend, dtype, kw, shape, tshape):
    kw = dict(kw)
    if kw.get("weight"):
        kw["weight"] = make((7,), dtype, low=0.1, high=3.0)
    x, t = make(shape, dtype), _targets(tshape, 7, ignore=kw.get("ignore_index"))
    theirs = _torch_exact(TF.cross_entropy)
    check_parity(SF.cross_entropy, theirs, x, t, reduction_size=7, **kw)
    check_parity(SF.cross_entropy, theirs, x, _probs(shape, dtype=dtype), reduction_size=7,
                 **{k: v for k, v in kw.items() if k != "ignore_index"})


@pytest.mark.parametrize("vocab,rows", [(1, 3), (3, 3), (CE_SMALL_BLOCK, 2), (CE_SMALL_BLOCK + 1, 2), (1000, 3),
                                        (50257, 2)])
def test_ce_vocab_sizes(backend, vocab, rows):
    x, t = make((rows, vocab)) * 3, _targets((rows,), vocab)
    with expect_ops(CE_OPS):
        check_parity(SF.cross_entropy, TF.cross_entropy, x, t, reduction_size=vocab, label_smoothing=0.1)
    if vocab <= 1000:
        check_parity(SF.cross_entropy, TF.cross_entropy, x, _probs((rows, vocab), dtype=torch.float32),
                     reduction_size=vocab)


def test_ce_special_values(backend):
    inf = float("inf")
    x = torch.tensor([[0.0, -inf, 1.0, 2.0], [1e4, -1e4, 0.0, 5.0], [-inf, -inf, -inf, -inf], [-1e4, 1e4, 1e4, 3.0],
                      [2.0, 1.0, 0.0, -inf], [1.0, float("nan"), 0.0, 2.0]], device=DEVICE)
    t = torch.tensor([0, 1, 2, 2, 3, 0], device=DEVICE)  # row 4's target has logit -inf: loss inf; row 5 has NaN
    for kw in [{}, {"label_smoothing": 0.1}, {"weight": torch.tensor([1.0, 2.0, 0.5, 1.0], device=DEVICE)}]:
        check_parity(SF.cross_entropy, TF.cross_entropy, x, t, reduction="none", equal_nan=True, **kw)
    check_parity(SF.cross_entropy, TF.cross_entropy, x[:2], t[:2], reduction="mean", label_smoothing=0.2)


def test_ce_prob_special_values(backend):
    # a -inf logit with probability 0 (its target gradient is +inf, not nan); a nan target stays in its own row
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[-inf, 0.0, 1.0], [1.0, 2.0, 3.0]], device=DEVICE, requires_grad=True)
    q = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]], device=DEVICE, requires_grad=True)
    q_nan = torch.tensor([[nan, 0.5, 0.5], [0.2, 0.3, 0.5]], device=DEVICE, requires_grad=True)
    for reduction in REDUCTIONS:
        check_parity(SF.cross_entropy, TF.cross_entropy, x, q, reduction=reduction, equal_nan=True)
        check_parity(SF.cross_entropy, TF.cross_entropy, x.detach().nan_to_num(-1.0).requires_grad_(), q_nan,
                     reduction=reduction, equal_nan=True)


def test_ce_all_ignored_and_empty(backend):
    x = make((3, 4), requires_grad=True)
    t = torch.full((3,), -100, device=DEVICE)
    for reduction in REDUCTIONS:
        check_parity(SF.cross_entropy, TF.cross_entropy, x, t, reduction=reduction, equal_nan=True)
    assert torch.isnan(SF.cross_entropy(x, t))
    empty = make((0, 4))
    for target in (torch.zeros(0, dtype=torch.long, device=DEVICE), make((0, 4))):
        for reduction in REDUCTIONS:
            check_parity(SF.cross_entropy, TF.cross_entropy, empty, target, reduction=reduction, equal_nan=True)


def test_ce_zero_weight_sum_and_no_classes(backend):
    # D = Σ w_t = 0 over active rows: torch's gradient is nan (0 · g / 0), not the all-ignored case's 0
    x, t = make((3, 5), requires_grad=True), _targets((3,), 5)
    zero = torch.zeros(5, device=DEVICE)
    SF.cross_entropy(x, t, weight=zero).backward()
    assert torch.isnan(x.grad).all()
    check_parity(SF.cross_entropy, TF.cross_entropy, x, t, weight=zero, reduction="sum")
    # a nan weight only reaches the rows whose target has it (without smoothing)
    w_nan = torch.tensor([float("nan"), 1.0, 1.0, 1.0, 1.0], device=DEVICE)
    check_parity(SF.cross_entropy, TF.cross_entropy, x, torch.tensor([0, 1, 2], device=DEVICE), weight=w_nan,
                 reduction="none", equal_nan=True)
    # no classes: every loss is 0, the mean over probabilities is 0 / 0
    for reduction, smoothing in itertools.product(REDUCTIONS, (0.0, 0.2)):
        kw = {"reduction": reduction, "label_smoothing": smoothing, "equal_nan": True}
        check_parity(SF.cross_entropy, TF.cross_entropy, make((3, 0, 2), requires_grad=True), make((3, 0, 2)), **kw)
        check_parity(SF.cross_entropy, TF.cross_entropy, make((3, 0), requires_grad=True),
                     torch.full((3,), -100, device=DEVICE), **kw)


def test_ce_target_dtypes_and_layouts(backend):
    x = make((6, 9))
    check_parity(SF.cross_entropy, TF.cross_entropy, x, _targets((6,), 9).to(torch.uint8), ignore_index=4)
    base = make((9, 6))  # transposed logits: the class stride is 6
    check_parity(SF.cross_entropy, TF.cross_entropy, base.t(), _targets((6,), 9))
    xs = make((4, 9, 6))[:, 1:, ::2]  # sliced K-dim logits and a non-contiguous target
    check_parity(SF.cross_entropy, TF.cross_entropy, xs, _targets((3, 4), 8).t(), reduction="none")
    check_parity(SF.cross_entropy, TF.cross_entropy, make((7,)), torch.tensor(3, device=DEVICE), label_smoothing=0.3)
    check_parity(SF.cross_entropy, TF.cross_entropy, make((1, 9)).expand(4, 9), _targets((4,), 9))  # zero stride


def test_ce_expanded_grad_output(backend):
    x, t = make((5, 6)), _targets((5,), 6)
    check_parity(SF.cross_entropy, TF.cross_entropy, x, t, reduction="none",
                 grad_output=torch.ones((), device=DEVICE).expand(5))
    x3, t3 = make((2, 6, 3)), _targets((2, 3), 6)
    check_parity(SF.cross_entropy, TF.cross_entropy, x3, t3, reduction="none", grad_output=make((3,)).expand(2, 3))
    check_parity(SF.cross_entropy, TF.cross_entropy, x3, _probs((2, 6, 3), dtype=torch.float32), reduction="none",
                 grad_output=make((2, 1)).expand(2, 3))


def test_ce_never_writes_logits(backend):
    x = make((4, 300), requires_grad=True)
    before = x.detach().clone()
    out = SF.cross_entropy(x, _targets((4,), 300), label_smoothing=0.1)
    out.backward()
    out2 = SF.cross_entropy(x, _probs((4, 300), dtype=torch.float32))
    out2.backward()
    assert torch.equal(x.detach(), before)


def _saved_bytes(fn):
    """Bytes autograd saves for backward while running fn (each storage counted once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ce_saved_bytes(backend, dtype, capsys):
    x = make((8, 1000), dtype, requires_grad=True)
    t = _targets((8,), 1000)
    ours = _saved_bytes(lambda: SF.cross_entropy(x, t, label_smoothing=0.1))
    theirs = _saved_bytes(lambda: TF.cross_entropy(x, t, label_smoothing=0.1))
    with capsys.disabled():
        print(f"\ncross_entropy saved for backward ({backend}, {dtype}, logits {x.nbytes} B): "
              f"scratchops {ours} B, torch {theirs} B")
    scalar = 8  # the 0-d denominator D
    assert ours <= x.nbytes + scalar


def _torch_cpu(fn):
    """torch's op on CPU copies: on CUDA an out-of-range target is a device-side assert, not an IndexError."""
    return lambda x, t, **kw: fn(x.cpu(), t.cpu(), **kw)


def test_ce_out_of_range_targets(backend):
    x = make((3, 5))
    for t, bad in [([1, 2, 7], 7), ([1, -100, -3], -3), ([9, -100, 7], 9)]:
        target = torch.tensor(t, device=DEVICE)
        check_same_error(SF.cross_entropy, _torch_cpu(TF.cross_entropy), x, target,
                         match=f"^Target {bad} is out of bounds.$")
    check_same_error(SF.cross_entropy, _torch_cpu(TF.cross_entropy), x,
                     torch.tensor([1, 2, 200], device=DEVICE).byte(), match="Target 200 is out of bounds")
    check_same_error(SF.cross_entropy, _torch_cpu(TF.cross_entropy), make((2, 5, 3)),
                     torch.tensor([[1, 9, 3], [0, 0, 8]], device=DEVICE), match="Target 9 is out of bounds")


BAD_CE = {
    "int32 target": lambda: (make((3, 5)), torch.tensor([1, 2, 3], dtype=torch.int32)),
    "int8 target": lambda: (make((3, 5)), torch.tensor([1, 2, 3], dtype=torch.int8)),
    "bool target": lambda: (make((3, 5)), torch.tensor([True, False, True])),
    "float target wrong shape": lambda: (make((3, 5)), make((3, 4))),
    "long probabilities": lambda: (make((3, 5)), torch.zeros(3, 5, dtype=torch.long)),
    "batch mismatch": lambda: (make((3, 5)), torch.tensor([1, 2])),
    "kdim mismatch": lambda: (make((2, 5, 3)), torch.zeros(2, 4, dtype=torch.long)),
    "kdim batch mismatch": lambda: (make((3, 5, 2)), torch.zeros(4, 2, dtype=torch.long)),
    "kdim byte target": lambda: (make((2, 5, 3)), torch.zeros(2, 3, dtype=torch.uint8)),
    "unbatched 2 targets": lambda: (make((5,)), torch.tensor([1, 2])),
    "0-d logits, 0-d probabilities": lambda: (make(()), make((), seed=1)),
    "0-d logits, 1-D probabilities": lambda: (make(()), make((3,), seed=1)),
    "integer logits": lambda: (torch.zeros(3, 5, dtype=torch.long), torch.tensor([1, 2, 3])),
    "not a tensor": lambda: ([1.0, 2.0], torch.tensor([1])),
}
BAD_CE_KW = {
    "weight size": ({"weight": torch.ones(4)}, False),
    "weight 2-D": ({"weight": torch.ones(5, 1)}, False),
    "weight dtype": ({"weight": torch.ones(5, dtype=torch.float64)}, False),
    "prob weight size": ({"weight": torch.ones(4)}, True),
    "smoothing > 1": ({"label_smoothing": 1.5}, False),
    "prob smoothing > 1": ({"label_smoothing": 1.5}, True),
    "prob ignore_index": ({"ignore_index": 2}, True),
    "bad reduction": ({"reduction": "bad"}, False),
    "float ignore_index": ({"ignore_index": 1.0}, False),
    "list weight": ({"weight": [1.0] * 5}, False),
}


@pytest.mark.parametrize("name", sorted(BAD_CE))
def test_ce_bad_inputs(backend, name):
    x, t = (v.to(DEVICE) if isinstance(v, torch.Tensor) else v for v in BAD_CE[name]())
    check_same_error(SF.cross_entropy, TF.cross_entropy, x, t)


@pytest.mark.parametrize("name", sorted(BAD_CE_KW))
def test_ce_bad_options(backend, name):
    kw, prob = BAD_CE_KW[name]
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    t = make((3, 5), seed=3) if prob else _targets((3,), 5)
    check_same_error(SF.cross_entropy, TF.cross_entropy, make((3, 5)), t, **kw)


def test_ce_weight_requiring_grad(backend):
    x, t, w = make((3, 5)), _targets((3,), 5), make((5,), requires_grad=True)
    with pytest.raises(RuntimeError):
        TF.cross_entropy(x, t, weight=w)
    with pytest.raises(RuntimeError, match="with respect to 'weight' is not implemented"):
        SF.cross_entropy(x, t, weight=w)
    check_parity(SF.cross_entropy, TF.cross_entropy, x, t, weight=w.detach())


def test_legacy_reduction_flags(backend):
    x, t, y = make((4, 6)), _targets((4,), 6), make((4, 6), seed=7)
    for size_average, reduce in [(None, False), (False, None), (True, True), (False, True)]:
        with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
            a = SF.cross_entropy(x, t, size_average=size_average, reduce=reduce)
        with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
            b = TF.cross_entropy(x, t, size_average=size_average, reduce=reduce)
        torch.testing.assert_close(a, b)
        with pytest.warns(UserWarning, match="size_average and reduce"):
            a = SF.mse_loss(x, y, size_average=size_average, reduce=reduce)
        with pytest.warns(UserWarning, match="size_average and reduce"):
            b = TF.mse_loss(x, y, size_average=size_average, reduce=reduce)
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------- mse
@pytest.mark.parametrize("dtype", PARITY_DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (BLOCK - 1,), (BLOCK + 1,), (3 * BLOCK + 7,), (7, 13), (2, 3, 5, 7)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_parity(backend, dtype, shape, reduction):
    n = max(1, torch.Size(shape).numel())
    check_parity(SF.mse_loss, TF.mse_loss, make(shape, dtype), make(shape, dtype, seed=5), reduction=reduction,
                 reduction_size=n)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_broadcast_weight_layouts(backend, reduction):
    x, y = make((4, 1, 3)), make((5, 3), seed=1)
    msg = r"Using a target size \(torch.Size\(\[5, 3\]\)\) that is different to the input size"
    with pytest.warns(UserWarning, match=msg):
        check_parity(SF.mse_loss, TF.mse_loss, x, y, reduction=reduction)
    base = make((6, 8))
    check_parity(SF.mse_loss, TF.mse_loss, base.t(), make((6, 8), seed=2)[:, ::1].t(), reduction=reduction,
                 weight=make((8, 6), low=0.0, high=2.0))
    check_parity(SF.mse_loss, TF.mse_loss, base[:, ::2], make((6, 4), seed=2), reduction=reduction,
                 weight=make((6, 4), low=0.0, high=2.0), grad_output=None if reduction != "none" else
                 make((4,)).expand(6, 4))
    check_parity(SF.mse_loss, TF.mse_loss, make((5,)), make((5,), seed=1).double(), reduction=reduction)


def test_mse_empty_and_special(backend):
    for reduction in REDUCTIONS:
        check_parity(SF.mse_loss, TF.mse_loss, make((0, 3)), make((0, 3)), reduction=reduction, equal_nan=True)
    assert torch.isnan(SF.mse_loss(make((0,)), make((0,))))
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, 0.0], device=DEVICE)
    y = torch.tensor([0.0, 1.0, -float("inf"), -1e30, -0.0], device=DEVICE)
    for reduction in REDUCTIONS:
        check_parity(SF.mse_loss, TF.mse_loss, x, y, reduction=reduction, equal_nan=True)


BAD_MSE = {
    "not broadcastable": lambda: ((make((3,)), make((4,))), {}),
    "weight size": lambda: ((make((3, 1)), make((4,))), {"weight": make((3, 4))}),
    "bad reduction": lambda: ((make((3,)), make((3,))), {"reduction": "bad"}),
    "bad reduction with weight": lambda: ((make((3,)), make((3,))), {"reduction": "bad", "weight": make((3,))}),
    "integer input": lambda: ((torch.ones(3, dtype=torch.long, device=DEVICE),
                               torch.ones(3, dtype=torch.long, device=DEVICE)), {}),
    "not a tensor": lambda: (([1.0], make((1,))), {}),
}


@pytest.mark.parametrize("name", sorted(BAD_MSE))
def test_mse_bad_inputs(backend, name):
    args, kw = BAD_MSE[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check_same_error(SF.mse_loss, TF.mse_loss, *args, **kw)


# ----------------------------------------------------------------- modules, compile, registration
def test_modules(backend):
    w = make((6,), low=0.5, high=2.0)
    ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1, reduction="sum")
    mine = SN.CrossEntropyLoss(weight=torch.ones(6), ignore_index=2, label_smoothing=0.1, reduction="sum").to(DEVICE)
    mine.load_state_dict(ref.state_dict())
    assert isinstance(mine, torch.nn.CrossEntropyLoss) and mine.state_dict().keys() == ref.state_dict().keys()
    x, t = make((5, 6)), _targets((5,), 6, ignore=2)
    check_parity(mine, ref, x, t)
    for reduction in REDUCTIONS:
        check_parity(SN.MSELoss(reduction=reduction), torch.nn.MSELoss(reduction=reduction), x, make((5, 6), seed=9))


def test_small_model_trains_like_torch(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).to(DEVICE)
    twin = torch.nn.Sequential(*[torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)]).to(DEVICE)
    twin.load_state_dict(model.state_dict())
    x, t, y = make((8, 8)), _targets((8,), 5), make((8, 5), seed=4)
    losses, first = [], []
    for net, ce, mse in [(model, SN.CrossEntropyLoss(label_smoothing=0.05), SN.MSELoss()),
                         (twin, torch.nn.CrossEntropyLoss(label_smoothing=0.05), torch.nn.MSELoss())]:
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(10):
            opt.zero_grad()
            out = net(x)
            loss = ce(out, t) + 0.1 * mse(out, y)
            loss.backward()
            opt.step()
            if len(first) < len(losses) + 1:
                first.append(loss.item())
        losses.append(loss.item())
    assert losses[0] < 0.9 * first[0], (first, losses)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph(backend):
    w = make((7,), low=0.5, high=2.0)

    def f(x, y, t):
        return (SF.cross_entropy(x, t, weight=w, label_smoothing=0.1) + SF.mse_loss(x, y, reduction="sum")
                + SF.cross_entropy(x, y.softmax(1), reduction="sum"))

    def g(x, y, t):
        return (TF.cross_entropy(x, t, weight=w, label_smoothing=0.1) + TF.mse_loss(x, y, reduction="sum")
                + TF.cross_entropy(x, y.softmax(1), reduction="sum"))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1, y1, t = make((4, 7), requires_grad=True), make((4, 7), seed=1, requires_grad=True), _targets((4,), 7)
    x2, y2 = x1.detach().clone().requires_grad_(), y1.detach().clone().requires_grad_()
    a, b = compiled(x1, y1, t), g(x2, y2, t)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(y1.grad, y2.grad)  # through mse's target and the probability targets


def test_opcheck(backend):
    from scratchops import losses as L

    x, y, w = make((5, 6)), make((5, 6), seed=1), make((5, 6), low=0.5, high=1.0)
    for reduction in (L.NONE, L.MEAN):
        torch.library.opcheck(L.mse_fwd_op, (backend, x, y, w, w, reduction))
    out, denom = L.mse_fwd(x, y, w, w, L.MEAN)
    torch.library.opcheck(L.mse_bwd_op, (backend, x, y, w, denom, torch.ones((), device=DEVICE), True))
    torch.library.opcheck(L.mse_bwd_op, (backend, x, y, None, denom, make((5, 6)), False))
    x3, t, q = make((1, 6, 2)), _targets((1, 2), 6, ignore=1), _probs((1, 6, 2), dtype=torch.float32)
    for target, weight, reduction in [(t, make((6,)), L.NONE), (q, make((6,)), L.SUM)]:
        torch.library.opcheck(L.cross_entropy_fwd_op, (backend, x3, target, weight, 1 if target is t else -100,
                                                      0.1, reduction))
    _, grad, denom, stats = L.cross_entropy_fwd(x3, q, None, -100, 0.1, L.NONE)
    torch.library.opcheck(L.cross_entropy_bwd_op, (backend, grad, denom, make((2,))))
    torch.library.opcheck(L.cross_entropy_bwd_op, (backend, grad, denom, torch.ones((), device=DEVICE)))
    torch.library.opcheck(L.cross_entropy_target_bwd_op, (backend, x3, stats, make((6,)), denom, make((2,)), 0.1))


def test_backward_uses_forward_backend(backend):
    from scratchops._backend import LAUNCHES

    other = {"triton": "reference", "reference": "triton"}[backend]
    x = make((3, 4), requires_grad=True)
    loss = SF.cross_entropy(x, _targets((3,), 4))
    before = LAUNCHES["cross_entropy_bwd", backend]
    with scratchops.use_backend(other):
        loss.backward()
    assert LAUNCHES["cross_entropy_bwd", backend] == before + 1


def test_aot_compile_sm90():
    rows = check_aot("scratchops._kernels.losses")
    names = {r["kernel"] for r in rows}
    assert names == {"_mse_fwd_kernel", "_mse_finish_kernel", "_mse_bwd_kernel", "_cross_entropy_fwd_kernel",
                     "_cross_entropy_reduce_kernel", "_cross_entropy_bwd_kernel", "_cross_entropy_target_bwd_kernel"}
