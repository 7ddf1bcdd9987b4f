"""scratchops.optim.SGD against torch.optim.SGD, on both backends.

The Triton interpreter costs a few ms per program and per step, so the long
(100-step) option sweep uses two small tensors; sizes around the kernel's
BLOCK and CHUNK, layouts and dtypes get their own shorter tests.
"""
import copy
import itertools

import pytest
import torch

import scratchops
from scratchops._backend import LAUNCHES
from scratchops.optim import SGD, sgd_step_op
from tests.helpers import DEVICE, check_aot, check_same_error, check_sass, make, tolerances

BLOCK = 1024  # triton_kernels.optim.BLOCK
CHUNK = 8 * BLOCK  # triton_kernels.optim.CHUNK: elements per program
STEPS = 100
HALF_ULPS = 4


def _options():
    """Every valid combination of the SGD options (nesterov needs momentum and no dampening)."""
    for momentum, dampening, nesterov, weight_decay, maximize in itertools.product(
            (0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 0.01), (False, True)):
        if momentum == 0 and (dampening or nesterov):
            continue  # dampening is unused and nesterov invalid without momentum
        if nesterov and dampening:
            continue
        yield dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                   maximize=maximize)


OPTIONS = list(_options())


def _id(options):
    return ",".join(f"{k}={v}" for k, v in options.items() if v)


def _params(shapes, dtype=torch.float32, seed=0):
    """Two identical lists of leaf tensors requiring grad: ours and torch's."""
    ours = [make(s, dtype, seed=seed + i).requires_grad_() for i, s in enumerate(shapes)]
    return ours, [p.detach().clone().requires_grad_() for p in ours]


def _set_grads(ours, theirs, step, skip=()):
    for i, (p, q) in enumerate(zip(ours, theirs)):
        if i in skip:
            p.grad = q.grad = None
            continue
        g = make(p.shape, p.dtype, seed=1000 * step + i)
        p.grad, q.grad = g.clone(), g.clone()


def _assert_same(ours, theirs, steps=1, dtype=None):
    """Parameters (and momentum buffers) agree to ``dtype`` rounding, accumulated over ``steps`` steps."""
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **tolerances(dtype or q.dtype, steps))


def _run(opt_ours, opt_theirs, ours, theirs, steps, skip=()):
    for step in range(steps):
        _set_grads(ours, theirs, step, skip)
        opt_ours.step()
        opt_theirs.step()


def _assert_same_state(opt_ours, opt_theirs, steps=1):
    a, b = opt_ours.state_dict(), opt_theirs.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in b["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        buf_a, buf_b = a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"]
        assert buf_a.dtype == buf_b.dtype and buf_a.shape == buf_b.shape
        torch.testing.assert_close(buf_a, buf_b, **tolerances(buf_b.dtype, steps))


@pytest.mark.parametrize("options", OPTIONS, ids=_id)
def test_parity_every_option_100_steps(backend, options):
    ours, theirs = _params([(0,), (BLOCK + 1,)])
    opt_a, opt_b = SGD(ours, lr=0.05, **options), torch.optim.SGD(theirs, lr=0.05, **options)
    with torch.no_grad():
        _run(opt_a, opt_b, ours, theirs, STEPS)
    _assert_same(ours, theirs, STEPS)
    _assert_same_state(opt_a, opt_b, STEPS)


@pytest.mark.parametrize("shapes", [[(BLOCK - 1,), (CHUNK - 1,)], [(CHUNK + 1,), (1,)], [(), (7, 13), (2, 3, 5, 7)],
                                    [(0,), (3, 0)]],
                         ids=["below", "above", "0d_primes", "empty"])
def test_sizes(backend, shapes):
    ours, theirs = _params(shapes)
    options = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    opt_a, opt_b = SGD(ours, **options), torch.optim.SGD(theirs, **options)
    _run(opt_a, opt_b, ours, theirs, 3)
    _assert_pair(ours, theirs, opt_a, opt_b, 3)


def test_layouts(backend):
    """Non-contiguous leaves (transposed; sliced, with gaps; offset) and gradients laid out unlike their parameter."""
    base = make((6, 10))
    ours = [base.detach().clone().t().requires_grad_(), base.detach().clone()[:, ::3].requires_grad_(),
            base.detach().clone()[1:].requires_grad_()]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    assert not ours[0].is_contiguous() and not ours[1].is_contiguous() and ours[2].storage_offset()
    opt_a = SGD(ours, lr=0.1, momentum=0.9, dampening=0.1)
    opt_b = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, dampening=0.1)
    for step in range(3):
        grads = [make(ours[0].shape, seed=step),  # contiguous, unlike its transposed parameter
                 make(ours[1].shape[::-1], seed=step + 10).t(),  # transposed, unlike its gappy parameter
                 make(ours[2].shape[1:], seed=step + 20).expand(ours[2].shape)]  # expanded (zero strides)
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(memory_format=torch.preserve_format), g.clone(memory_format=torch.preserve_format)
            if g.stride()[0] == 0:
                p.grad = q.grad = g
        opt_a.step()
        opt_b.step()
    _assert_pair(ours, theirs, opt_a, opt_b, 3)


def test_fp64(backend):
    ours, theirs = _params([(3, 5), (BLOCK + 1,)], torch.float64)
    options = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True)
    opt_a, opt_b = SGD(ours, **options), torch.optim.SGD(theirs, **options)
    _run(opt_a, opt_b, ours, theirs, 30)
    _assert_pair(ours, theirs, opt_a, opt_b, 30)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_half(backend, dtype):
    """Half types: torch rounds after every op, scratchops once from fp32: a few ulp apart per step."""
    ours, theirs = _params([(5, 7), (BLOCK + 1,)], dtype)
    options = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    opt_a, opt_b = SGD(ours, **options), torch.optim.SGD(theirs, **options)
    steps = 5
    _run(opt_a, opt_b, ours, theirs, steps)
    bufs = [(opt_a.state[p]["momentum_buffer"], opt_b.state[q]["momentum_buffer"]) for p, q in zip(ours, theirs)]
    for a, b in list(zip(ours, theirs)) + bufs:
        assert a.dtype == b.dtype == dtype
        # HALF_ULPS ulp of the largest magnitude: torch's intermediate roundings move values near 0 relatively far
        tol = HALF_ULPS * torch.finfo(dtype).eps
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item())


def test_groups_dtypes_and_missing_grads(backend, monkeypatch):
    """Groups with their own options; a group mixing dtypes; parameters without gradients are left alone."""
    import scratchops._kernels.optim as K

    ours, theirs = _params([(4, 3), (5,), (), (6,), (2, 2)])
    ours64, theirs64 = _params([(3,), (9,)], torch.float64, seed=7)

    def groups(p, p64):
        return [{"params": [p[0], p[1], p64[0], p64[1]]},
                {"params": [p[2], p[3]], "lr": 0.2, "momentum": 0.5, "nesterov": True, "weight_decay": 0.1},
                {"params": [p[4]], "momentum": 0.9, "dampening": 0.3, "maximize": True}]

    opt_a = SGD(groups(ours, ours64), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(groups(theirs, theirs64), lr=0.05, momentum=0.9)
    launches = []
    if backend == "triton":
        def counting(grid, *args, _real=K._step, **kwargs):  # counts kernel launches
            launches.append(grid)
            return _real(grid, *args, **kwargs)
        monkeypatch.setattr(K, "_step", counting)
    all_a, all_b = ours + ours64, theirs + theirs64
    untouched = all_a[3].detach().clone()
    before = LAUNCHES["sgd_step", backend]
    _run(opt_a, opt_b, all_a, all_b, 2, skip=(3,))
    torch.testing.assert_close(all_a[3], untouched, rtol=0, atol=0)
    assert all_a[3] not in opt_a.state
    _assert_pair(all_a, all_b, opt_a, opt_b, 2)
    # one op call (and launch) per group and dtype: group 0 holds two dtypes, the others one
    assert LAUNCHES["sgd_step", backend] - before == 2 * 4
    if backend == "triton":
        assert len(launches) == 2 * 4, launches
    # now all_a[3] gets a gradient: its new buffer starts as g while its neighbour's decays, in one launch
    _run(opt_a, opt_b, all_a, all_b, 2)
    _assert_pair(all_a, all_b, opt_a, opt_b, 4)


def test_state_dict_round_trip(backend):
    options = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    ours, theirs = _params([(4, 3), (7,)])
    opt_a, opt_b = SGD(ours, **options), torch.optim.SGD(theirs, **options)
    _run(opt_a, opt_b, ours, theirs, 3)
    # swap: torch continues from our state, we continue from torch's
    ours2, theirs2 = [p.detach().clone().requires_grad_() for p in ours], [q.detach().clone().requires_grad_()
                                                                           for q in theirs]
    opt_b2, opt_a2 = torch.optim.SGD(ours2, **options), SGD(theirs2, **options)
    # deep copies: load_state_dict keeps the very buffer tensors it is given when dtype and device match
    opt_b2.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    opt_a2.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    _assert_same_state(opt_a2, opt_b2, 3)
    for step in range(3, 6):
        _set_grads(ours, theirs, step)
        _set_grads(ours2, theirs2, step)
        for opt in (opt_a, opt_b, opt_a2, opt_b2):
            opt.step()
    for group in (ours2, theirs, theirs2):
        _assert_pair(ours, group, opt_a, opt_b2, 6)
    _assert_same_state(opt_a2, opt_b, 6)
    assert type(opt_a2.state_dict()["state"][0]["momentum_buffer"]) is torch.Tensor


def test_model_trains_as_torch(backend):
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(DEVICE)
    model_b = copy.deepcopy(model_a)
    x = make((32, 6), seed=1)
    y = x @ make((6, 3), seed=2)  # a target the model can fit
    options = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    opt_a, opt_b = SGD(model_a.parameters(), **options), torch.optim.SGD(model_b.parameters(), **options)
    losses = {"a": [], "b": []}
    for _ in range(30):
        for key, model, opt in (("a", model_a, opt_a), ("b", model_b, opt_b)):
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            losses[key].append(opt.step(closure).item())
    torch.testing.assert_close(losses["a"], losses["b"], rtol=1e-4, atol=1e-6)
    assert losses["a"][-1] < 0.5 * losses["a"][0], "the model did not train"


def test_in_place_and_version_counter(backend):
    p = make((5,), requires_grad=True)
    p.grad = make((5,), seed=3)
    opt = SGD([p], lr=0.1, momentum=0.9)
    ptr, version = p.data_ptr(), p._version
    opt.step()
    buf = opt.state[p]["momentum_buffer"]
    buf_version = buf._version
    opt.step()
    assert p.data_ptr() == ptr and p._version >= version + 2
    assert opt.state[p]["momentum_buffer"] is buf and buf._version > buf_version


def test_tensor_lr(backend):
    ours, theirs = _params([(6,)])
    opt_a = SGD(ours, lr=torch.tensor(0.1), momentum=0.9)
    opt_b = torch.optim.SGD(theirs, lr=torch.tensor(0.1), momentum=0.9)
    _run(opt_a, opt_b, ours, theirs, 3)
    _assert_same(ours, theirs, 3)


def _sparse_step(cls, **options):
    def run(p):
        p.grad = torch.eye(3, device=p.device).to_sparse()
        cls([p], lr=0.1, **options).step()
    return run


def test_sparse_grad_raises(backend):
    p = make((3, 3), requires_grad=True)
    check_same_error(_sparse_step(SGD), _sparse_step(torch.optim.SGD, fused=True), p,
                     match="does not support sparse gradients")
    check_same_error(_sparse_step(SGD, weight_decay=0.1), _sparse_step(torch.optim.SGD, weight_decay=0.1), p)


@pytest.mark.parametrize("options", [dict(lr=-1.0), dict(lr=torch.tensor([0.1, 0.2])), dict(momentum=-0.5),
                                     dict(weight_decay=-1e-4), dict(nesterov=True),
                                     dict(nesterov=True, momentum=0.9, dampening=0.1),
                                     dict(fused=True, foreach=True), dict(fused=True, differentiable=True)],
                         ids=["lr", "tensor_lr", "momentum", "weight_decay", "nesterov", "nesterov_dampening",
                              "fused_foreach", "fused_differentiable"])
def test_bad_hyperparameters(options):
    def build(cls):
        return lambda p: cls([p], **options)

    check_same_error(build(SGD), build(torch.optim.SGD), make((3,), requires_grad=True))


def test_grad_scaler_with_fused_flag(backend):
    """fused=True is only a flag here: GradScaler unscales the gradients before the step, as for foreach."""
    ours, theirs = _params([(4, 3)])
    opt_a, opt_b = SGD(ours, lr=0.1, momentum=0.9, fused=True), torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=1024.0)
    g = make((4, 3), seed=5)
    scaler.scale((ours[0] * g).sum()).backward()  # ours[0].grad = 1024 g
    (theirs[0] * g).sum().backward()
    scaler.step(opt_a)
    opt_b.step()
    _assert_same(ours, theirs)


def test_differentiable_not_supported():
    with pytest.raises(NotImplementedError, match="differentiable"):
        SGD([make((3,), requires_grad=True)], differentiable=True)


def test_signature_and_defaults():
    import inspect

    ours = inspect.signature(SGD.__init__).parameters
    theirs = inspect.signature(torch.optim.SGD.__init__).parameters
    assert [(n, p.kind, p.default) for n, p in ours.items()] == [(n, p.kind, p.default) for n, p in theirs.items()]
    p = make((2,), requires_grad=True)
    assert SGD([p]).param_groups[0].keys() == torch.optim.SGD([p]).param_groups[0].keys()
    assert isinstance(SGD([p]), torch.optim.SGD)


def test_opcheck(backend):
    for momentum, fresh in ((0.0, []), (0.9, [True, False])):
        params = [make((5,)), make((BLOCK + 1,))]
        grads = [make((5,), seed=1), make((BLOCK + 1,), seed=2)]
        bufs = [make((5,), seed=3), make((BLOCK + 1,), seed=4)] if momentum else []
        lr = torch.tensor(0.1, dtype=torch.float64, device=DEVICE)
        torch.library.opcheck(sgd_step_op.custom, (backend, params, grads, bufs, fresh, lr, 0.01, momentum, 0.0,
                                                   False, False))


def test_aot_compile_sm90():
    rows = check_aot("scratchops._kernels.optim")
    assert {r["kernel"] for r in rows} == {"_sgd_step_kernel"}
    assert {r["constexprs"]["DTYPE"] for r in rows} == {"fp16", "bf16", "fp32", "fp64"}
    assert {r["constexprs"]["ALIGNED"] for r in rows} == {"True", "False"}
    # parameters, gradients and buffers at 16-byte aligned addresses (allocations): full blocks in 128-bit accesses
    aligned = [r for r in rows if r["constexprs"]["ALIGNED"] == "True"]
    check_sass(aligned, vector128=("_sgd_step_kernel",))
    assert all("128" in r["ldg"] and "128" in r["stg"] for r in aligned), aligned


def test_backend_per_bucket():
    """A request for Triton that cannot be met raises before anything is written (here: complex parameters)."""
    p = torch.zeros(3, dtype=torch.complex64, device=DEVICE, requires_grad=True)
    p.grad = torch.ones(3, dtype=torch.complex64, device=DEVICE)
    opt = SGD([p], lr=0.5, momentum=0.9)
    with scratchops.use_backend("triton"), pytest.raises(RuntimeError, match="cannot run"):
        opt.step()
    assert not opt.state and not p.detach().abs().any()
    q = p.detach().clone().requires_grad_()
    q.grad = p.grad.clone()
    ref = torch.optim.SGD([q], lr=0.5, momentum=0.9)
    with scratchops.use_backend("auto"):  # auto runs complex parameters on the reference formulas
        opt.step()
        ref.step()
    torch.testing.assert_close(p, q)


def test_grad_of_another_dtype(backend):
    """A parameter with grad_dtype=None may hold a float64 gradient: it is read as a float64 value, not reinterpreted."""
    ours, theirs = _params([(5,)])
    for p in ours + theirs:
        p.grad_dtype = None
        p.grad = make((5,), torch.float64, seed=7)
    opt_a, opt_b = SGD(ours, lr=0.1, momentum=0.9), torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    opt_a.step()
    opt_b.step()
    _assert_same(ours, theirs, 1, torch.float32)


# ----------------------------------------------------------------- kept plans (issue 11): every change is seen
def _pair(shapes=((4, 3), (7,), (BLOCK + 1,)), steps=0, **options):
    """Our parameters and torch's, our optimizer and torch's, after ``steps`` steps of both."""
    ours, theirs = _params(list(shapes))
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, **options}
    opt_a, opt_b = SGD(ours, **options), torch.optim.SGD(theirs, **options)
    for seed in range(steps):
        _step_both(opt_a, opt_b, ours, theirs, seed)
    return ours, theirs, opt_a, opt_b


def _step_both(opt_a, opt_b, ours, theirs, seed, skip=()):
    _set_grads(ours, theirs, seed, skip)
    opt_a.step()
    opt_b.step()


def _assert_pair(ours, theirs, opt_a, opt_b, steps):
    """Parameters and optimizer states agree after ``steps`` steps."""
    _assert_same(ours, theirs, steps)
    _assert_same_state(opt_a, opt_b, steps)


def test_plan_kept_in_the_steady_state(backend, monkeypatch):
    """After the first step, a Triton step reuses its plan: the general path (custom op) does not run again."""
    ours, theirs, opt_a, opt_b = _pair()
    general = []
    real = SGD._step_group
    monkeypatch.setattr(SGD, "_step_group", lambda self, *a: (general.append(1), real(self, *a)))
    for seed in range(5):
        _step_both(opt_a, opt_b, ours, theirs, seed)
    assert len(general) == (1 if backend == "triton" else 5), general  # step 1 creates the buffers and the plan
    _assert_pair(ours, theirs, opt_a, opt_b, 5)


def test_swapped_grad_tensors(backend):
    ours, theirs, opt_a, opt_b = _pair(steps=3)
    # another tensor, at another address
    g = make(ours[1].shape, seed=50)
    ours[1].grad, theirs[1].grad = g.clone(), g.clone()
    opt_a.step(), opt_b.step()
    # a transposed (non-contiguous) gradient, then a gradient whose storage is replaced in place (set_)
    g = make(ours[0].shape[::-1], seed=51).t()
    ours[0].grad, theirs[0].grad = g.clone(memory_format=torch.preserve_format), g.clone()
    opt_a.step(), opt_b.step()
    g = make(ours[2].shape, seed=52)
    ours[2].grad.set_(g.clone())
    theirs[2].grad.set_(g.clone())
    opt_a.step(), opt_b.step()
    _assert_pair(ours, theirs, opt_a, opt_b, 6)


def test_zero_grad_then_new_grads(backend):
    """zero_grad(set_to_none=True) then backward: new gradient objects every step; a parameter left out of one
    loss has no gradient for that step (skipped, buffer untouched) and comes back the next."""
    ours, theirs, opt_a, opt_b = _pair()
    x = make((3,), seed=7)
    for step in range(6):
        for params, opt in ((ours, opt_a), (theirs, opt_b)):
            opt.zero_grad(set_to_none=True)
            used = params if step != 3 else params[1:]  # step 3: params[0] gets no gradient
            loss = sum((p * (i + 1 + step)).sum() for i, p in enumerate(used)) + (params[0].sum(0) * x).sum()
            if step == 3:
                loss = sum((p * (i + 2 + step)).sum() for i, p in enumerate(used))
            loss.backward()
            opt.step()
        assert (ours[0].grad is None) == (step == 3)
    _assert_pair(ours, theirs, opt_a, opt_b, 6)


def test_add_param_group(backend):
    ours, theirs, opt_a, opt_b = _pair(steps=3)
    more_a, more_b = _params([(5,), (2, 3)], seed=20)
    opt_a.add_param_group({"params": more_a, "lr": 0.3, "momentum": 0.5})
    opt_b.add_param_group({"params": more_b, "lr": 0.3, "momentum": 0.5})
    all_a, all_b = ours + more_a, theirs + more_b
    for seed in range(3, 7):
        _step_both(opt_a, opt_b, all_a, all_b, seed)
    _assert_pair(all_a, all_b, opt_a, opt_b, 7)


def test_load_state_dict_mid_training(backend):
    ours, theirs, opt_a, opt_b = _pair(steps=3)
    saved = copy.deepcopy(opt_b.state_dict())
    for entry in saved["state"].values():
        entry["momentum_buffer"].mul_(-2)  # buffers unlike the ones the plan holds
    saved["param_groups"][0]["lr"] = 0.05
    opt_a.load_state_dict(copy.deepcopy(saved))
    opt_b.load_state_dict(copy.deepcopy(saved))
    for seed in range(3, 6):
        _step_both(opt_a, opt_b, ours, theirs, seed)
    _assert_pair(ours, theirs, opt_a, opt_b, 6)


def test_replaced_data_buffers_and_state(backend):
    """Parameter memory replaced (.data =, transposed too), a momentum buffer replaced, the state cleared."""
    ours, theirs, opt_a, opt_b = _pair(steps=3)
    for a, b in zip(ours, theirs):
        a.data = a.data.clone()
        b.data = b.data.clone()
    new = make(ours[0].shape[::-1], seed=60).t()
    ours[0].data, theirs[0].data = new.clone(memory_format=torch.preserve_format), new.clone()
    _step_both(opt_a, opt_b, ours, theirs, 3)
    for opt, p in ((opt_a, ours[1]), (opt_b, theirs[1])):
        opt.state[p]["momentum_buffer"] = opt.state[p]["momentum_buffer"] * 0.5
    _step_both(opt_a, opt_b, ours, theirs, 4)
    opt_a.state.clear()
    opt_b.state.clear()
    for seed in range(5, 7):
        _step_both(opt_a, opt_b, ours, theirs, seed)
    _assert_pair(ours, theirs, opt_a, opt_b, 7)


def test_options_changed_between_steps(backend):
    ours, theirs, opt_a, opt_b = _pair(steps=3)
    for changes in ({"lr": 0.02}, {"weight_decay": 0.0}, {"nesterov": True, "dampening": 0.0}, {"momentum": 0.0},
                    {"momentum": 0.5, "maximize": True}):
        for opt in (opt_a, opt_b):
            opt.param_groups[0].update(changes)
        _step_both(opt_a, opt_b, ours, theirs, 10 + len(changes))
    _assert_pair(ours, theirs, opt_a, opt_b, 8)


def test_tensor_lr_read_on_device(backend, monkeypatch):
    """A tensor learning rate is never turned into a Python number, and an in-place change reaches the step."""
    ours, theirs = _params([(6,), (BLOCK + 1,)])
    lr_a, lr_b = torch.tensor(0.1, device=DEVICE), torch.tensor(0.1, device=DEVICE)
    opt_a, opt_b = SGD(ours, lr=lr_a, momentum=0.9), torch.optim.SGD(theirs, lr=lr_b, momentum=0.9)

    def no_item(self):
        raise AssertionError("the step read a tensor with .item()")

    for seed in range(4):
        _set_grads(ours, theirs, seed)
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", no_item)
            opt_a.step()
        opt_b.step()
        lr_a.mul_(0.5)
        lr_b.mul_(0.5)
    _assert_same(ours, theirs, 4)


def test_two_optimizers_in_two_threads(backend):
    """Two optimizers stepping at once, on parameters of identical shapes (the launcher's shared, cached plans:
    each launch uses its own table) and transposed ones (the general path, dense copies every step)."""
    import threading

    errors = []

    def train(seed):
        try:
            with scratchops.use_backend(backend):
                ours, theirs = _params([(BLOCK + 3,), (7, 5)], seed=seed)
                ours.append(make((5, 9), seed=seed + 5).t().requires_grad_())
                theirs.append(ours[-1].detach().clone().requires_grad_())
                opt_a = SGD(ours, lr=0.1, momentum=0.9, weight_decay=0.01)
                opt_b = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, weight_decay=0.01)
                for step in range(15):
                    _set_grads(ours, theirs, 100 * seed + step)
                    opt_a.step()
                    opt_b.step()
                _assert_same(ours, theirs, 15)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=train, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
