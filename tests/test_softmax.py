"""softmax, log_softmax: every test tier of DESIGN.md, on both backends."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as TF

import scratchops
import scratchops.functional as SF
import scratchops.nn as SN
import scratchops.softmax as S
import scratchops._kernels.softmax as K
import scratchops._kernels.softmax_bwd2 as K2
from tests.helpers import (DEVICE, PARITY_DTYPES, check_aot, check_gradcheck, check_parity, check_same_error,
                           check_sass, expect_ops, make, tolerances)

OPS = {"softmax": (SF.softmax, TF.softmax), "log_softmax": (SF.log_softmax, TF.log_softmax)}
NAMES = sorted(OPS)
INF, NAN = float("inf"), float("nan")
# Single-block BLOCK_N ladder is 64, 256, 1024, 4096, 16384, 32768, 65536 up to the cap (one CTA: 32768, a cluster
# on sm_90: 65536; fp64 8192); longer rows take the looped kernels, and on one CTA so does the backward of a ragged
# row above half the cap.
AWKWARD = [((), 0), ((0,), 0), ((3, 0), 1), ((0, 3), 1), ((0, 3), 0), ((1,), 0), ((4, 1), 1), ((1, 5), 0),
           ((3, 63), 1), ((3, 65), -1), ((3, 255), 1), ((2, 1025), 1), ((2, 4095), 1), ((2, 4097), 1), ((2, 8193), 1),
           ((2, 16385), 1), ((1, 32768), 1), ((1, 32769), 1), ((1, 65536), 1), ((1, 65537), 1),
           ((7, 13), 0), ((3, 5, 7), 1), ((2, 3, 5, 7), 2), ((2, 3, 5, 7), -3)]
SMALL_CAP = 64  # a cap (K.MAX_BLOCK_N) that forces short rows onto the re-read and looped kernels


def _clusters(monkeypatch, on: bool):
    """Plan for one CTA (``on=False``: the re-read and ragged-row branches) or a cluster, whatever Triton is here
    (the interpreter runs a cluster's program as one); a GPU must be able to compile and run clusters."""
    if on and not os.environ.get("TRITON_INTERPRET") == "1" and not (
            K.CLUSTERS and torch.cuda.get_device_capability()[0] >= 9):
        pytest.skip("thread-block clusters need Triton >= 3.9 and an sm_90+ GPU")
    monkeypatch.setattr(K, "CLUSTERS", on)


def _ops(name):
    return [f"{name}_fwd", f"{name}_bwd"]


def _partial(fn, dim, **kwargs):
    return lambda x: fn(x, dim, **kwargs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape,dim", [((2, 3, 4), 1), ((2, 3, 4), -1), ((4, 3), 0), ((), 0)])
def test_gradcheck(backend, name, shape, dim):
    x = make(shape, torch.float64, requires_grad=True)
    check_gradcheck(_partial(OPS[name][0], dim), x, ops=_ops(name))


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_non_contiguous_and_looped(backend, name, monkeypatch):
    monkeypatch.setattr(K, "MAX_BLOCK_N", 16)  # every row takes the looped kernels, 16 columns per step
    x = make((2, 20), torch.float64).t().requires_grad_()  # 2 rows of 20 with column stride 2: 2 steps each
    check_gradcheck(_partial(OPS[name][0], -2), x, ops=_ops(name))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", PARITY_DTYPES)
@pytest.mark.parametrize("shape,dim", AWKWARD)
def test_parity(backend, name, dtype, shape, dim):
    n = shape[dim] if shape else 1
    half = dtype in (torch.float16, torch.bfloat16)
    x = make(shape, dtype)
    out = check_parity(*OPS[name], x, grad=not half, reduction_size=n, dim=dim)
    assert out.is_contiguous()
    if half:
        # In half precision both outputs may sit an ulp apart, and the backward amplifies that (dX is a
        # difference of nearly equal terms), so the backward is checked on torch's own output Y.
        y, dy = OPS[name][1](x, dim), make(shape, dtype, seed=1)
        ours = getattr(S, f"{name}_bwd_op")(backend, y, dy, dim)
        theirs = (torch.ops.aten._softmax_backward_data if name == "softmax"
                  else torch.ops.aten._log_softmax_backward_data)(dy, y, dim % max(1, len(shape)), dtype)
        torch.testing.assert_close(ours, theirs, **tolerances(dtype, n))


@pytest.mark.parametrize("name", NAMES)
def test_long_row_looped(backend, name):
    n = 262144
    x = make((1, n), low=-30.0, high=30.0)
    before = K.BRANCHES["fwd_looped"], K.BRANCHES["bwd_looped"]
    check_parity(*OPS[name], x, reduction_size=n, dim=1)
    if backend == "triton":
        assert (K.BRANCHES["fwd_looped"], K.BRANCHES["bwd_looped"]) == (before[0] + 1, before[1] + 1)


# (one CTA or a cluster, cap, N) -> the kernel each direction runs. One CTA: single block (rows of N ≤ cap / 2 hold
# every operand); a row of exactly N = cap columns (softmax's backward holds Y and reads dY twice); a ragged row
# above cap / 2 (backward loops); a row longer than the cap (both loop). A cluster (fp32 here; fp64 never takes
# one): every row up to the cap in one read, on 2 CTAs (forward of 65536, backward of 32768) or 4 (backward of 65536).
BRANCH_CASES = [(False, None, 50, "fwd", "bwd", "bwd"), (False, SMALL_CAP, 64, "fwd", "bwd_reread", "bwd"),
                (False, SMALL_CAP, 50, "fwd", "bwd_looped", "bwd_looped"),
                (False, SMALL_CAP, 150, "fwd_looped", "bwd_looped", "bwd_looped"),
                (True, SMALL_CAP, 64, "fwd", "bwd", "bwd"), (True, SMALL_CAP, 50, "fwd", "bwd", "bwd"),
                (True, None, 20000, "fwd", "bwd_x2", "bwd_x2"), (True, None, 40000, "fwd_x2", "bwd_x4", "bwd_x4"),
                (True, None, 65537, "fwd_looped", "bwd_looped", "bwd_looped")]


@pytest.mark.parametrize("cluster,cap,n,fwd,softmax_bwd,log_softmax_bwd", BRANCH_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_kernel_branch(backend, monkeypatch, cluster, cap, n, fwd, softmax_bwd, log_softmax_bwd, dtype):
    if backend != "triton":
        pytest.skip("kernel branches exist on the triton backend only")
    if dtype == torch.float64 and (cluster or n > K.ROW_ELEMENTS_FP64):
        pytest.skip("fp64 rows run on one CTA (their own cases)")
    _clusters(monkeypatch, cluster)
    if cap is not None:
        monkeypatch.setattr(K, "MAX_BLOCK_N", cap)
    for name, bwd in (("softmax", softmax_bwd), ("log_softmax", log_softmax_bwd)):
        before = dict(K.BRANCHES)
        check_parity(*OPS[name], make((3, n), dtype), reduction_size=n, dim=1)
        ran = sorted(k for k in K.BRANCHES if K.BRANCHES[k] > before.get(k, 0))
        assert ran == sorted({fwd, bwd}), f"{name} N={n} cap={cap}: {ran} ran, expected {fwd}, {bwd}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("looped", [False, True])
def test_special_values(backend, name, dtype, looped, monkeypatch):
    if looped:
        monkeypatch.setattr(K, "MAX_BLOCK_N", 16)  # blocks of 16 columns: rows 3 and 6 start with all -inf blocks
    rows = [[1e4, -1e4, 0.0, 1e4 - 1] * 10, [-1e4, 1e4] * 20, [-INF] * 40,
            [-INF] * 30 + [1.0, 2.0, -INF, 3.0] + [0.0] * 6, [NAN] + [1.0] * 39, [1.0] * 20 + [INF] + [1.0] * 19,
            [-INF] * 39 + [5.0], [0.0] * 40]
    x = torch.tensor(rows, dtype=dtype, device=DEVICE)
    check_parity(*OPS[name], x, equal_nan=True, reduction_size=40, dim=1)
    check_parity(*OPS[name], x.t(), equal_nan=True, reduction_size=40, dim=0)


def _special_rows(dtype, n):
    """Issue 17's rows of ``n`` columns: shifted far up and down, fully masked (-inf everywhere) among normal
    rows, and -inf / +inf / NaN at the row's max and elsewhere."""
    huge = 1e30 if dtype == torch.float32 else 1e300
    base = make((n,), torch.float64, seed=3)
    top, other = int(base.argmax()), int(base.argmin())

    def put(value, at):
        row = base.clone()
        row[at] = value
        return row

    rows = [base + 1e4, base - 1e4, torch.full_like(base, -INF), base, base + huge, base - huge, base * huge,
            torch.full_like(base, -INF), put(-INF, top), put(-INF, other), put(INF, top), put(INF, other),
            put(NAN, top), put(NAN, other), base * 1e4, torch.full_like(base, huge)]
    return torch.stack(rows).to(device=DEVICE, dtype=dtype)


# branch -> (cap, N): the single-block kernels on a ragged row and on a row of exactly BLOCK_N columns (softmax's
# backward re-reads dY), the backward's looped kernel under a single-block forward, and both looped (3 steps of 16).
SPECIAL_BRANCHES = {"single": (None, 40), "even": (SMALL_CAP, SMALL_CAP), "ragged": (SMALL_CAP, 40),
                    "looped": (16, 40), "cluster": (None, 40000)}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("branch", sorted(SPECIAL_BRANCHES))
def test_special_value_rows(backend, name, dtype, branch, monkeypatch):
    cap, n = SPECIAL_BRANCHES[branch]
    if backend != "triton" and branch != "single":
        pytest.skip("kernel branches exist on the triton backend only")
    if branch == "cluster" and dtype == torch.float64:
        pytest.skip("fp64 rows run on one CTA")
    if cap is not None:
        monkeypatch.setattr(K, "MAX_BLOCK_N", cap)
    if backend == "triton":
        _clusters(monkeypatch, branch == "cluster")
    x = _special_rows(dtype, n)
    before = dict(K.BRANCHES)
    check_parity(*OPS[name], x, equal_nan=True, reduction_size=n, dim=1)
    if backend == "triton":
        ran = sorted(k for k in K.BRANCHES if K.BRANCHES[k] > before.get(k, 0))
        fwd, bwd = {"single": ("fwd", "bwd"), "even": ("fwd", "bwd_reread" if name == "softmax" else "bwd"),
                    "ragged": ("fwd", "bwd_looped"), "looped": ("fwd_looped", "bwd_looped"),
                    "cluster": ("fwd_x2", "bwd_x4")}[branch]
        assert ran == sorted([fwd, bwd]), ran
    check_parity(*OPS[name], x.t(), equal_nan=True, reduction_size=n, dim=0)  # strided rows
    # rows of a single column: 1 (softmax) or 0 (log_softmax), NaN where the entry is -inf, +inf or NaN
    column = x[:, :1]
    check_parity(*OPS[name], column, equal_nan=True, dim=1)
    check_parity(*OPS[name], column.t(), equal_nan=True, dim=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_dtype,dtype", [(torch.float16, torch.float32), (torch.float32, torch.float64),
                                             (torch.float64, torch.float16), (torch.int64, torch.float32)])
def test_dtype_argument(backend, name, in_dtype, dtype):
    x = (make((4, 9)) * 3).to(in_dtype)
    out = check_parity(*OPS[name], x, grad=in_dtype.is_floating_point, reduction_size=9, dim=1, dtype=dtype)
    assert out.dtype == dtype


LAYOUTS = {"transposed": lambda b: b.transpose(1, 3), "sliced": lambda b: b[:, ::2, 1:, :],
           "channels_last": lambda b: b.to(memory_format=torch.channels_last), "storage_offset": lambda b: b[1:],
           "expanded": lambda b: b[:1, :, :1].expand(4, 6, 5, 3),
           "needs_copy": lambda b: b.transpose(2, 3),  # dims after dim 1 are no single progression: copied
           # "contiguous" to torch but with an odd size-1 stride: the output still gets torch's canonical strides
           "size1_odd_stride": lambda b: b.as_strided((4, 6, 1, 3), (18, 3, 100, 1))}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dim", [1, -1])
def test_non_contiguous_input(backend, name, layout, dim):
    # The view is taken inside the op under test, so the op (not a clone of the leaf) sees the strided input.
    base, view = make((4, 6, 5, 3)), LAYOUTS[layout]
    ours, theirs = OPS[name]
    out = check_parity(lambda b: ours(view(b), dim), lambda b: theirs(view(b), dim), base, reduction_size=6)
    assert out.stride() == theirs(view(base), dim).stride(), "output layout differs from torch's"


def test_rows_layout_copy_rule():
    base = torch.empty(4, 6, 5, 3)
    assert K._rows_layout(base, 1) == (15, 90, 1, 15)
    assert K._rows_layout(base.to(memory_format=torch.channels_last), 1) == (15, 90, 6, 1)
    assert K._rows_layout(base[:, :, 1:], 1) == (12, 90, 1, 15)
    assert K._rows_layout(base.view(24, 15).t(), 0) == (24, 0, 15, 1)
    assert K._rows_layout(base.transpose(2, 3), 1) is None  # dims after dim 1 are no single progression
    assert K._rows_layout(torch.ones(()).expand(4, 6, 5), 1) == (5, 0, 0, 0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dim", [0, 1])
def test_expanded_grad_output(backend, name, dim):
    x = make((5, 9))
    check_parity(*OPS[name], x, grad_output=torch.ones((), device=DEVICE).expand(5, 9), reduction_size=9, dim=dim)
    check_parity(*OPS[name], x, grad_output=make((9,)).expand(5, 9), reduction_size=9, dim=dim)
    check_parity(*OPS[name], x, grad_output=make((5, 1)).expand(5, 9), reduction_size=9, dim=dim)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ndim", [0, 1, 2, 3, 4])
def test_implicit_dim_warns_as_torch(backend, name, ndim):
    x = make((2, 3, 4, 5)[:ndim])
    with pytest.warns(UserWarning, match=f"Implicit dimension choice for {name} has been deprecated") as record:
        ours = OPS[name][0](x)
    assert record[0].filename == __file__, "the warning points at the caller, as torch's does"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours, OPS[name][1](x))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["list", "dim_bool", "dim_float", "dim_str", "dim_high", "dim_low", "scalar_dim1",
                                  "dtype_str", "long", "int", "bool", "uint8", "complex", "dtype_long", "scalar_long"])
def test_bad_inputs(name, case):
    x = make((2, 3))
    args, kwargs = {
        "list": (([1.0, 2.0], 0), {}), "dim_bool": ((x, True), {}), "dim_float": ((x, 1.5), {}),
        "dim_str": ((x, "a"), {}), "dim_high": ((x, 2), {}), "dim_low": ((x, -3), {}),
        "scalar_dim1": ((make(()), 1), {}), "dtype_str": ((x, 0), {"dtype": "float"}),
        "long": ((torch.arange(6, device=DEVICE).view(2, 3), 1), {}),
        "int": ((torch.arange(6, device=DEVICE, dtype=torch.int32).view(2, 3), 0), {}),
        "bool": ((x > 0, 1), {}), "uint8": ((torch.arange(3, device=DEVICE, dtype=torch.uint8), 0), {}),
        "complex": ((x.to(torch.complex64), 1), {}), "dtype_long": ((x, 1), {"dtype": torch.int64}),
        "scalar_long": ((torch.tensor(3, device=DEVICE), 0), {}),
    }[case]
    check_same_error(*OPS[name], *args, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_empty_integer_input_as_torch(name):
    x = torch.empty(0, 3, dtype=torch.int64, device=DEVICE)
    check_parity(*OPS[name], x, grad=False, dim=1)


@pytest.mark.parametrize("ours,theirs", [(SN.Softmax, torch.nn.Softmax), (SN.LogSoftmax, torch.nn.LogSoftmax)])
@pytest.mark.parametrize("dim", [None, 0, -1, 2])
def test_modules(backend, ours, theirs, dim):
    mine, ref = ours(dim), theirs(dim)
    assert isinstance(mine, theirs) and repr(mine) == repr(ref)
    assert mine.state_dict().keys() == ref.state_dict().keys()
    mine.load_state_dict(ref.state_dict())
    x = make((3, 4, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dim=None: the implicit-dim warning, as torch's
        torch.testing.assert_close(mine(x), ref(x))


def test_model_trains_like_torch(backend):
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LogSoftmax(dim=1)).to(DEVICE)
    ours = torch.nn.Sequential(torch.nn.Linear(6, 5), SN.LogSoftmax(dim=1)).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x, target = make((16, 6)), torch.arange(16, device=DEVICE) % 5
    losses = []
    for model in (ours, theirs):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(5):
            opt.zero_grad()
            loss = -model(x).gather(1, target[:, None]).mean()
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5, losses


def test_aot_configs_list_every_launch():
    """The sm_90 compiles (aot_configs, compiled by test_contract) are the launches: every column count's plan, per
    dtype, forward and backward, on the sm_90 plan (clusters where Triton has them), is listed, with its CTAs; both
    kernels with both bodies and every dtype are there."""
    def key(t, backward, plan, consts):
        return t, backward, plan, tuple(sorted((k, str(v)) for k, v in consts.items()))

    plans = {key(*p) for p in K.launch_plans()}
    types = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
    for dtype, t in types.items():
        cluster = K.clusters(dtype, torch.device("cpu"))
        cap = K.row_cap(dtype, cluster)
        for n in sorted({1, 2, 3, 63, 64, 65, 100, 1000, 3000, 5000, 9000, 20000, 40000, cap // 2 + 1, cap - 1, cap,
                         cap + 1, cap + 7, 100000} | {2 ** k + d for k in range(18) for d in (-1, 0, 1)}):
            for backward in (False, True):
                plan = K._plan(n, cap, backward, cluster)
                for is_log in (False, True):
                    assert key(t, backward, plan, K._constexprs(is_log, plan, backward, dtype)) in plans, (n, plan)
                assert K._kernel(backward, plan, dtype).configs["default"][0].num_ctas == plan.ctas
    assert {(backward, plan.looped) for _, backward, plan, _ in plans} == {(b, lp) for b in (0, 1) for lp in (0, 1)}
    assert {p[0] for p in plans} == set(types.values())
    assert K.CLUSTERS == any(p[2].ctas > 1 for p in plans)


def test_aot_vector_accesses_sm90():
    """As launched for sm_90 (the compiles test_contract's AOT check makes, read from the same cache): every launch
    plan of a contiguous row (unit column stride) moves data in 16-byte accesses, forward and backward, every dtype;
    so does the double backward along the last dim (n_inner = 1; rows along an inner dim are strided)."""
    rows = check_aot("scratchops._kernels.softmax")
    check_sass(rows, vector128=("_softmax_fwd_kernel", "_softmax_bwd_kernel"))
    second = check_aot("scratchops._kernels.softmax_bwd2")
    last_dim = [r for r in second if r["constexprs"].get("n_inner") == "1"]
    assert len(last_dim) == len(second) // 2 == 16, second  # 2 kernels x 2 ops x 4 dtypes
    check_sass(last_dim, vector128=("_softmax_bwd2_kernel", "_softmax_bwd_jvp_kernel"))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_dtypes_as_torch(backend, name, autocast_dtype):
    """Under autocast on the test device, output and gradient dtypes are torch's (CPU: the input's dtype, softmax
    is on no CPU list; CUDA: float32, softmax/log_softmax are on its fp32 list, unless dtype= is given)."""
    device_type = torch.device(DEVICE).type
    dtypes = [torch.float32, torch.float16, torch.float64] + ([torch.bfloat16] if device_type == "cuda" else [])
    for dtype in dtypes:
        for kwargs in ({}, {"dtype": torch.float64}):
            x = make((4, 6), dtype=dtype, requires_grad=True)
            with torch.autocast(device_type, dtype=autocast_dtype):
                ours, theirs = OPS[name][0](x, 1, **kwargs), OPS[name][1](x, 1, **kwargs)
            assert ours.dtype == theirs.dtype, (dtype, kwargs, ours.dtype, theirs.dtype)
            tol = tolerances(dtype if torch.finfo(dtype).bits < torch.finfo(ours.dtype).bits else ours.dtype, 6)
            torch.testing.assert_close(ours, theirs, **tol)
            (g,) = torch.autograd.grad(ours.sum() + ours[:, 0].sum(), x)
            (g_ref,) = torch.autograd.grad(theirs.sum() + theirs[:, 0].sum(), x)
            assert g.dtype == g_ref.dtype == dtype
            torch.testing.assert_close(g, g_ref, **tol)


# (fwd, fwd+bwd) bytes / compulsory (read x, write y | read y, read dY, write dX), fp32, through scratchops.traffic
# (the interpreter's loads and stores, glue kernels), on the plan this Triton launches on sm_90. One CTA holds 32768
# values (its 256 KiB register file): softmax's backward above 16384 columns holds Y and reads dY twice (6 / 5), and
# rows above 32768 columns loop (the forward reads x twice: 3 / 2; the backward reads Y and dY twice, log-softmax's
# dY once: 8 / 5, 7 / 5). A cluster (Triton >= 3.9) reads every operand once up to 65536 columns.
ONE_READ = (1.0, 1.0)
TRAFFIC_BOUNDS = {("softmax", 4096): ONE_READ, ("log_softmax", 4096): ONE_READ, ("softmax", 16384): ONE_READ,
                  ("log_softmax", 16384): ONE_READ, ("softmax", 32768): ONE_READ if K.CLUSTERS else (1.0, 1.2),
                  ("log_softmax", 32768): ONE_READ, ("softmax", 65536): ONE_READ if K.CLUSTERS else (1.5, 1.6),
                  ("log_softmax", 65536): ONE_READ if K.CLUSTERS else (1.5, 1.4)}


@pytest.mark.parametrize("name,n", sorted(TRAFFIC_BOUNDS))
def test_traffic_one_read(name, n):
    from scratchops import traffic

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the traffic audit counts loads and stores in Triton's interpreter")
    size = 8 * n * 4
    case = traffic.Case(lambda: ([make((8, n), requires_grad=True)], lambda x: OPS[name][0](x, 1)),
                        {"fwd": 2 * size, "fwd+bwd": 5 * size})
    with scratchops.use_backend("triton"):
        rows = {r["pass"]: r for r in traffic.measure(f"{name}_8x{n}", case)}
    assert rows["fwd"]["ratio"] == TRAFFIC_BOUNDS[name, n][0], rows["fwd"]
    assert rows["fwd+bwd"]["ratio"] <= TRAFFIC_BOUNDS[name, n][1], rows["fwd+bwd"]
    assert rows["fwd+bwd"]["launches"] == 2 and rows["fwd+bwd"]["glue_kernels"] == 0, rows["fwd+bwd"]


# ----------------------------------------------------------------- higher-order autodiff (issue 13)
TORCH_OPS = {"softmax": torch.softmax, "log_softmax": torch.log_softmax}


BWD2_STEP = K2._bwd2.configs["default"][0].kwargs["BLOCK_N"]  # the second-derivative kernels' columns a step


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape,dim", [((3, 5), 1), ((2, 3, 4), 0), ((2, BWD2_STEP + 76), 1), ((4, 3), -2), ((), 0)])
def test_gradgradcheck(backend, name, shape, dim):
    x = make(shape, torch.float64, requires_grad=True)
    fast = x.numel() > 100  # rows longer than the second-derivative kernel's column step: a random direction
    with expect_ops([f"{name}_bwd2"]):
        assert torch.autograd.gradgradcheck(_partial(OPS[name][0], dim), (x,), fast_mode=fast)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape,dim", [((3, 5), 1), ((4, 3), 0), ((), 0)])
def test_forward_mode_gradcheck(backend, name, shape, dim):
    # jvp of the op (forward AD) and of its backward (forward over reverse: what hessian = jacfwd(jacrev) runs)
    x = make(shape, torch.float64, requires_grad=True)
    fn = _partial(OPS[name][0], dim)
    assert torch.autograd.gradcheck(fn, (x,), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)
    with expect_ops([f"{name}_bwd_jvp"]):
        assert torch.autograd.gradgradcheck(fn, (x,), check_fwd_over_rev=True, check_rev_over_rev=False,
                                            check_undefined_grad=False)


@pytest.mark.parametrize("name", NAMES)
def test_gradgradcheck_strided_and_looped(backend, name, monkeypatch):
    monkeypatch.setattr(K, "MAX_BLOCK_N", 16)  # the first backward on the looped kernels (2 steps)
    x = make((2, 20), torch.float64).t().requires_grad_()
    with expect_ops([f"{name}_bwd2"]):
        assert torch.autograd.gradgradcheck(_partial(OPS[name][0], 0), (x,))


@pytest.mark.parametrize("name", NAMES)
def test_gradient_penalty_as_torch(backend, name):
    # loss = <w, f(x)> + ‖∂<w, f(x)>/∂x‖²: the penalty's gradient needs the second derivative.
    x, w = make((5, 7), torch.float64), make((5, 7), torch.float64, seed=2)
    grads = []
    for fn in (OPS[name][0], TORCH_OPS[name]):
        leaf = x.clone().requires_grad_()
        y = fn(leaf, 1)
        (g,) = torch.autograd.grad((y * w).sum(), leaf, create_graph=True)
        assert g.requires_grad, "the first derivative came back without a graph"
        ((y * w).sum() + (g * g).sum()).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", NAMES)
def test_third_derivative_raises(backend, name):
    x = make((3, 4), torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(OPS[name][0](x, 1).pow(2).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), x, create_graph=True)
    assert gg.requires_grad
    with pytest.raises(RuntimeError, match="third derivative is not implemented"):
        torch.autograd.grad((gg * make((3, 4), torch.float64, seed=1)).sum(), x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dim", [1, 0])
def test_torch_func(backend, name, dim):
    ours, theirs = (lambda t: OPS[name][0](t, dim)), (lambda t: TORCH_OPS[name](t, dim))
    x, v, u = make((4, 6), torch.float64), make((4, 6), torch.float64, seed=1), make((4, 6), torch.float64, seed=2)
    out, vjp = torch.func.vjp(ours, x)
    torch.testing.assert_close(out, theirs(x))
    torch.testing.assert_close(vjp(v)[0], torch.func.vjp(theirs, x)[1](v)[0])
    torch.testing.assert_close(torch.func.jacrev(ours)(x), torch.func.jacrev(theirs)(x))
    torch.testing.assert_close(torch.func.jvp(ours, (x,), (u,)), torch.func.jvp(theirs, (x,), (u,)))
    torch.testing.assert_close(torch.func.jacfwd(ours)(x), torch.func.jacfwd(theirs)(x))
    batch = make((3, 4, 6), torch.float64, seed=3)
    torch.testing.assert_close(torch.func.vmap(ours)(batch), torch.func.vmap(theirs)(batch))
    torch.testing.assert_close(torch.func.vmap(ours, in_dims=1)(batch), torch.func.vmap(theirs, in_dims=1)(batch))
    scalars = make((5,), torch.float64, seed=4)  # vmap over 0-d samples
    torch.testing.assert_close(torch.func.vmap(lambda t: OPS[name][0](t, 0))(scalars),
                               torch.func.vmap(lambda t: TORCH_OPS[name](t, 0))(scalars))

    def penalty(f):  # ‖∇<v, f>‖² through torch.func: the second derivative under functorch
        return lambda t: torch.func.grad(lambda s: (f(s) * v).sum())(t).pow(2).sum()

    torch.testing.assert_close(torch.func.grad(penalty(ours))(x), torch.func.grad(penalty(theirs))(x))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dim", [1, 0])
def test_hessian(backend, name, dim):
    x, w = make((3, 5), torch.float64), make((3, 5), torch.float64, seed=1)

    def scalar(f):
        return lambda t: (f(t, dim).sin() * w).sum()

    with expect_ops([f"{name}_bwd_jvp"]):
        ours = torch.func.hessian(scalar(OPS[name][0]))(x)
    torch.testing.assert_close(ours, torch.func.hessian(scalar(TORCH_OPS[name]))(x))


@pytest.mark.parametrize("name", NAMES)
def test_opcheck_second_derivative(backend, name):
    y = OPS[name][1](make((5, 6, 3)), 1)
    g, h = make((5, 6, 3), seed=1), make((5, 6, 3), seed=2)
    torch.library.opcheck(getattr(S, f"{name}_bwd2_op").custom, (backend, y, g, h, 1))
    torch.library.opcheck(getattr(S, f"{name}_bwd_jvp_op").custom, (backend, y, g, h, make((5, 6, 3), seed=3), 1))
