"""The contract every op keeps, checked once for all ops from one registry (``scratchops.verify.CASES``,
plus ``scratchops._backend.REGISTRY`` for the backend ops themselves).

* every backend op has a Triton launcher with exactly the reference formula's signature;
* every backend op a case calls, forward and backward, passes ``torch.library.opcheck`` on both backends;
* every case traces under ``torch.compile(fullgraph=True)`` and gives eager's values and gradients;
* the backward runs on the backend the forward chose, whatever is requested when it runs;
* every kernel family compiles ahead of time for sm_90 without spills (``tests/aot.py``).

Family test files keep only their own edge cases.
"""
import importlib
import inspect
import os

import pytest
import torch

from scratchops import verify
from scratchops._backend import REGISTRY, record_calls, use_backend
from tests.helpers import DEVICE, backend_skip_reason, check_aot, tolerances

CASES = {f"{c.op}: {c.label}": c for c in verify.CASES}
KERNEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_kernels")
FAMILIES = sorted(f[:-3] for f in os.listdir(KERNEL_DIR) if f.endswith(".py") and not f.startswith("_"))


def _inputs(case, dtype=torch.float64):
    """The case's inputs on the test device (floating ones as ``dtype``, requires_grad kept)."""
    return verify._on(case.inputs(torch.Generator().manual_seed(0)), DEVICE, dtype)


def _run(case, inputs):
    """Forward and backward of one case: (output, gradients of the inputs that require grad)."""
    out = verify._first(case.call(case.ours, *inputs))
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not out.requires_grad:
        return out, []
    grad = torch.ones_like(out) if out.dim() == 0 else \
        torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    return out, list(torch.autograd.grad(out, leaves, grad, allow_unused=True))


def _detached(args):
    """Recorded arguments without their autograd history (lists of tensors included)."""
    return [_detached(a) if isinstance(a, (list, tuple)) else a.detach() if isinstance(a, torch.Tensor) else a
            for a in args]


@pytest.fixture(params=("reference", "triton"))
def on_backend(request):
    reason = backend_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    with use_backend(request.param):
        yield request.param


def _parameters(fn):
    """A function's parameters as names, kinds and defaults (annotations may be strings on one side)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_launcher_has_the_reference_signature(name):
    op = REGISTRY[name]
    launcher = getattr(importlib.import_module(f"scratchops._kernels.{op.family}"), name)
    assert _parameters(launcher) == _parameters(op.reference), (
        f"{op.family}.{name}{inspect.signature(launcher)} differs from the reference's {inspect.signature(op.reference)}")


def _second_order(case, inputs):
    """A gradient of the case's gradients (create_graph), where the case has second derivatives."""
    out = verify._first(case.call(case.ours, *inputs))
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not case.gradgradcheck or not out.requires_grad:
        return
    v = torch.ones_like(out, requires_grad=True)  # a grad_output that is itself differentiated
    grads = [g for g in torch.autograd.grad(out, leaves, v, create_graph=True, allow_unused=True)
             if g is not None and g.requires_grad]
    if grads:
        torch.autograd.grad(sum(g.sum() for g in grads), leaves + [v], allow_unused=True)


def test_every_op_is_in_the_registry():
    """Each op a case exercises has a row; every registered op is reached by some case's first or second
    derivative, or is named here with the test file that covers it."""
    with record_calls() as calls:
        for case in CASES.values():
            _run(case, _inputs(case))
            _second_order(case, _inputs(case))
    exercised = {name for name, _, _ in calls}
    covered_elsewhere = {
        "relu_fwd_": "test_activations (in place)", "dropout_fwd_": "test_regularization (in place)",
        "sgd_step": "test_optim", "softmax_bwd_jvp": "test_softmax (forward mode)",
        "log_softmax_bwd_jvp": "test_softmax (forward mode)"}
    missing = set(REGISTRY) - exercised - set(covered_elsewhere)
    assert not missing, f"backend ops no verify case reaches: {sorted(missing)}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_opcheck(on_backend, case):
    case = CASES[case]
    with record_calls() as calls:
        _run(case, _inputs(case))
    assert calls, "the case called no backend op"
    seen = set()
    for name, backend, args in calls:
        assert backend == on_backend
        if name in seen:
            continue
        seen.add(name)
        torch.library.opcheck(REGISTRY[name].custom, (backend, *_detached(args)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_compile_fullgraph(on_backend, case):
    case = CASES[case]
    if case.reseed is not None:
        pytest.skip("random op: compiled and eager draw their seeds at different points")
    torch._dynamo.reset()
    eager_out, eager_grads = _run(case, _inputs(case))

    def compiled_fn(*inputs):
        return case.ours(*inputs, **case.kwargs)

    compiled = torch.compile(compiled_fn, fullgraph=True, backend="aot_eager")
    inputs = _inputs(case)
    out = verify._first(compiled(*inputs))
    torch.testing.assert_close(out, eager_out)
    if eager_grads:
        leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        grad = torch.ones_like(out) if out.dim() == 0 else \
            torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
        for a, b in zip(torch.autograd.grad(out, leaves, grad, allow_unused=True), eager_grads):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_uses_the_forward_backend(on_backend, case):
    case = CASES[case]
    other = "reference" if on_backend == "triton" else "triton"
    inputs = _inputs(case)
    out = verify._first(case.call(case.ours, *inputs))
    if not out.requires_grad:
        pytest.skip("no gradient")
    with use_backend(other), record_calls() as calls:
        out.backward(torch.ones_like(out))
    assert calls and {backend for _, backend, _ in calls} == {on_backend}


@pytest.mark.parametrize("family", FAMILIES)
def test_aot_compile_sm90(family):
    rows = check_aot(f"scratchops._kernels.{family}")
    assert all(r["registers"] > 0 for r in rows)


# ----------------------------------------------------------------- dynamic leading dims (export, compile)
def _one_case_per_op():
    """The first case of every op (its batch positions are ``Case.batched``)."""
    return sorted({c.op: name for name, c in reversed(list(CASES.items()))}.values())


def _at_batch(case, n, grad=False):
    """The case's float32 inputs with every batched input tiled (then cut) to ``n`` rows along dim 0: integer
    targets stay in range, probability rows stay normalised. Fresh tensors (no view of a larger base)."""
    out = []
    for i, x in enumerate(verify._on(case.inputs(torch.Generator().manual_seed(0)), DEVICE, torch.float32)):
        if isinstance(x, torch.Tensor):
            need = grad and x.requires_grad
            x = x.detach()
            if i in case.batched:
                x = torch.cat([x] * -(-n // x.shape[0]))[:n].clone()
            x.requires_grad_(need)
        out.append(x)
    return out


class _CaseModule(torch.nn.Module):
    """A module whose forward calls the case's scratchops function (seeding stays outside, as a user's would)."""

    def __init__(self, case):
        super().__init__()
        self.case = case

    def forward(self, *inputs):
        return verify._first(self.case.ours(*inputs, **self.case.kwargs))


# batch sizes that equal no fixed dim of any case (duck sizing would tie them to it) and are not 0 or 1
EXPORT_BATCH, RUN_BATCHES = 8, (10, 12)


@pytest.mark.parametrize("case", _one_case_per_op())
def test_export_with_a_dynamic_batch(case):
    """torch.export with torch.export.Dim on every batched input's dim 0; the program at two other batch sizes
    gives eager's values (random ops: the same seed)."""
    case = CASES[case]
    module = _CaseModule(case)
    batch = torch.export.Dim("batch")
    example = _at_batch(case, EXPORT_BATCH)
    spec = tuple({0: batch} if i in case.batched else None for i in range(len(example)))
    with use_backend("reference"):
        program = torch.export.export(module, tuple(example), dynamic_shapes=(spec,))
        for n in RUN_BATCHES:
            inputs = _at_batch(case, n)
            torch.manual_seed(0)
            out = program.module()(*inputs)
            torch.manual_seed(0)
            torch.testing.assert_close(out, module(*inputs))
            assert out.shape == module(*inputs).shape


@pytest.mark.parametrize("case", _one_case_per_op())
def test_compile_dynamic_compiles_once(case):
    """torch.compile(dynamic=True): three batch sizes, with gradients and under no_grad, compile once per grad
    mode; values and gradients equal eager's (random ops: only the shapes, their seeds are drawn elsewhere)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    case = CASES[case]
    module = _CaseModule(case)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, backend=counter, dynamic=True, fullgraph=True)
    first = None
    with use_backend("reference"):
        for n in (EXPORT_BATCH, *RUN_BATCHES):
            a_in, b_in = _at_batch(case, n, grad=True), _at_batch(case, n, grad=True)
            a, b = compiled(*a_in), module(*b_in)
            with torch.no_grad():
                c = compiled(*_at_batch(case, n))
            first = counter.frame_count if first is None else first
            assert a.shape == b.shape == c.shape
            if case.reseed is not None:
                continue
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(c, b.detach())
            leaves = [(x, y) for x, y in zip(a_in, b_in) if isinstance(x, torch.Tensor) and x.requires_grad]
            if a.requires_grad:
                grad = torch.ones_like(a)
                for ga, gb in zip(torch.autograd.grad(a, [x for x, _ in leaves], grad),
                                  torch.autograd.grad(b, [y for _, y in leaves], grad)):
                    torch.testing.assert_close(ga, gb)
    assert counter.frame_count == first, f"recompiled: {first} frames after the first batch size, " \
                                         f"{counter.frame_count} after three"


# ----------------------------------------------------------------- autocast (CPU, bfloat16) as torch's
# The dtype torch's CPU autocast runs each op in: "lower" (its lower-precision list: operands cast to bfloat16),
# "fp32" (its fp32 list: 16-bit operands cast up), "input" (on no list: the operands' own dtype), "linear+fp32"
# (linear_cross_entropy: a lower-precision linear, then cross_entropy's fp32; the class weight and probabilities
# are cast up). Checked against torch itself below, wherever one policy covers the whole op.
AUTOCAST_CPU = {"linear": "lower", "conv2d": "lower", "relu": "input", "sigmoid": "input", "tanh": "input",
                "softmax": "input", "log_softmax": "input", "dropout": "input", "l2_penalty": "input",
                "mse_loss": "fp32", "cross_entropy": "fp32", "linear_cross_entropy": "linear+fp32"}
# torch's weighted mse_loss is elementwise torch ops (pow, mul, sum), none on the CPU lists
AUTOCAST_CPU_CASES = {"mse_loss: (7, 13) weighted sum": "input"}


def test_autocast_table_names_every_op():
    assert set(AUTOCAST_CPU) == {c.op for c in CASES.values()}


def _policy_dtypes(policy, dtype):
    return {"lower": {torch.bfloat16}, "fp32": {torch.float32}, "input": {dtype},
            "linear+fp32": {torch.bfloat16, torch.float32}}[policy]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_autocast_cpu_bfloat16_as_torch(case, dtype):
    """Under CPU autocast(bfloat16), float32 and bfloat16 inputs: scratchops returns torch's dtype, and the
    operands its backend ops receive are in the dtype torch's autocast policy runs the op in (the table,
    itself checked: torch's autocast result equals torch on inputs cast to that dtype, autocast off)."""
    name, case = case, CASES[case]
    policy = AUTOCAST_CPU_CASES.get(name, AUTOCAST_CPU[case.op])

    def inputs(cast=None):
        out = verify._on(case.inputs(torch.Generator().manual_seed(0)), "cpu", dtype)
        return [x.detach().to(cast) if cast and isinstance(x, torch.Tensor) and x.is_floating_point() else x
                for x in out]

    with use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        with record_calls() as calls:
            ours = verify._first(case.call(case.ours, *inputs()))
        theirs = verify._first(case.call(case.theirs, *inputs()))
    assert ours.dtype == theirs.dtype, f"scratchops returns {ours.dtype}, torch {theirs.dtype}"
    computes = {t.dtype for _, _, args in calls for t in _flat(args) if t.is_floating_point()}
    assert computes == _policy_dtypes(policy, dtype), f"scratchops computes in {computes}, torch's policy: {policy}"
    if policy != "linear+fp32":
        (cast,) = _policy_dtypes(policy, dtype)
        with use_backend("reference"):  # the yardstick of dropout is scratchops' own mask (the same seed)
            plain = verify._first(case.call(case.theirs, *inputs(cast)))
        torch.testing.assert_close(plain.to(theirs.dtype), theirs, rtol=0, atol=0)
        torch.testing.assert_close(ours, theirs, **tolerances(cast, 16))


def _flat(args):
    """The tensors among recorded backend-op arguments (lists of tensors included)."""
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        elif isinstance(a, torch.Tensor):
            yield a
