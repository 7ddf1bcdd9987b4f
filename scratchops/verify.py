"""``scratchops verify``: gradcheck and torch parity of every op, as a table.

Each case names an op, its scratchops function, its torch twin and how to make
its inputs. For every backend that can run here (CUDA tensors on a GPU, else CPU
tensors with Triton in interpreter mode, plus the reference formulas), a case is
checked three ways:

* gradcheck: ``torch.autograd.gradcheck`` in float64 on the inputs that require grad;
* gradgradcheck: ``torch.autograd.gradgradcheck`` in float64 (second derivatives);
* parity: forward values and input gradients in float32 against the torch twin
  (max absolute error shown, against the case's tolerance), with one shared
  random grad_output;
* ran: at least one scratchops backend op ran on that backend (a case that
  silently ran something else does not pass).

Exit status: 0 when every check passes, 1 when any fails, 2 on a usage error.
This is a verification tool, the one place in the package (besides tests) where
torch's own ops are called: as the yardstick.

Adding a case (at the marked line below): ``Case(op, label, ours, theirs, inputs)``
with ``inputs(generator) -> tuple`` of float64 CPU tensors (integer tensors, such
as class indices, are passed through unchanged). Keyword options: ``kwargs``
(passed to both functions), ``tolerance`` (float32 parity bound), ``reseed``
(``torch.manual_seed(reseed)`` before every call, for random ops such as dropout),
``gradcheck_kwargs``, ``gradcheck=False``/``parity=False`` where a check
cannot apply (say why in the label), and ``batched`` (the positions of the inputs
whose dim 0 is the batch: the contract test exports and compiles with it dynamic).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from typing import Callable

import torch
import torch.nn.functional as TF

from scratchops import functional as SF
from scratchops._backend import LAUNCHES, env_backend, triton_unavailable_reason, use_backend

DEFAULT_TOLERANCE = 1e-4  # float32 parity: max abs error of values and gradients
CHECKS = ("gradcheck", "gradgradcheck", "parity", "ran")


@dataclasses.dataclass
class Case:
    op: str
    label: str
    ours: Callable
    theirs: Callable
    inputs: Callable[[torch.Generator], tuple]  # float64 CPU tensors; those with requires_grad are checked
    # Options (keyword; the five fields above keep their order):
    kwargs: dict = dataclasses.field(default_factory=dict)  # passed to ours and theirs
    tolerance: float = DEFAULT_TOLERANCE
    reseed: int | None = None  # torch.manual_seed(reseed) before every call (random ops)
    gradcheck: bool = True
    gradgradcheck: bool = True  # second derivatives (torch.autograd.gradgradcheck, float64)
    parity: bool = True
    gradcheck_kwargs: dict = dataclasses.field(default_factory=dict)
    batched: tuple = (0,)  # the inputs whose dim 0 is the batch (the contract test makes it dynamic)

    def call(self, fn, *inputs):
        if self.reseed is not None:
            torch.manual_seed(self.reseed)
        return fn(*inputs, **self.kwargs)


def _randn(g, *shape, grad=True):
    return torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(grad)


CASES: list[Case] = [
    Case("sigmoid", "(7, 13)", SF.sigmoid, torch.sigmoid, lambda g: (_randn(g, 7, 13),)),
    Case("relu", "(7, 13)", SF.relu, TF.relu, lambda g: (_randn(g, 7, 13),)),
    Case("tanh", "(7, 13)", SF.tanh, torch.tanh, lambda g: (_randn(g, 7, 13),)),
    # dropout's mask is random: with one seed (reseed), torch's x * m is the yardstick, m = dropout(ones) (same seed)
    Case("dropout", "(7, 13) p=0.5, torch x*m", lambda x: SF.dropout(x, 0.5),
         lambda x: x * SF.dropout(torch.ones_like(x.detach()), 0.5), lambda g: (_randn(g, 7, 13),), reseed=0),
    Case("dropout", "(7, 13) p=1", lambda x: SF.dropout(x, 1.0), lambda x: TF.dropout(x, 1.0),
         lambda g: (_randn(g, 7, 13),)),
    Case("l2_penalty", "(7, 13), (5,), () λ=0.1", lambda *w: SF.l2_penalty(w, 0.1),
         lambda *w: 0.1 * sum(t.pow(2).sum() for t in w), lambda g: (_randn(g, 7, 13), _randn(g, 5), _randn(g))),
    *[Case("linear", f"(5, 11)·(7, 11)ᵀ + b, {act}",
           (lambda a: lambda x, w, b: SF.linear(x, w, b, activation=a))(None if act == "none" else act),
           (lambda f: lambda x, w, b: f(TF.linear(x, w, b)))(
               {"none": lambda z: z, "relu": TF.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[act]),
           lambda g: (_randn(g, 5, 11), _randn(g, 7, 11), _randn(g, 7)), gradcheck_kwargs={"fast_mode": True})
      for act in ("none", "relu", "sigmoid", "tanh")],
    Case("linear", "(5, 11)·(7, 11)ᵀ + b, W frozen, tanh", lambda x, w, b: SF.linear(x, w, b, activation="tanh"),
         lambda x, w, b: torch.tanh(TF.linear(x, w, b)),
         lambda g: (_randn(g, 5, 11), _randn(g, 7, 11, grad=False), _randn(g, 7)), gradcheck_kwargs={"fast_mode": True}),
    Case("mse_loss", "(7, 13) mean", SF.mse_loss, TF.mse_loss, lambda g: (_randn(g, 7, 13), _randn(g, 7, 13)),
         batched=(0, 1)),
    Case("mse_loss", "(7, 13) weighted sum", lambda x, y, w: SF.mse_loss(x, y, reduction="sum", weight=w),
         lambda x, y, w: TF.mse_loss(x, y, reduction="sum", weight=w),
         lambda g: (_randn(g, 7, 13), _randn(g, 7, 13), _randn(g, 7, 13).detach().abs().requires_grad_()),
         batched=(0, 1, 2)),
    Case("cross_entropy", "(6, 9) w, ignore 2, smooth 0.1", lambda x, t, w: SF.cross_entropy(
         x, t, weight=w, ignore_index=2, label_smoothing=0.1), lambda x, t, w: TF.cross_entropy(
         x, t, weight=w, ignore_index=2, label_smoothing=0.1),
         lambda g: (_randn(g, 6, 9), torch.tensor([2, 0, 8, 2, 5, 1]), _randn(g, 9, grad=False).abs()),
         batched=(0, 1)),
    Case("cross_entropy", "(2, 5, 3) K-dim, none", lambda x, t: SF.cross_entropy(x, t, reduction="none"),
         lambda x, t: TF.cross_entropy(x, t, reduction="none"),
         lambda g: (_randn(g, 2, 5, 3), torch.tensor([[0, 4, 1], [3, 3, 2]])), batched=(0, 1)),
    Case("cross_entropy", "(4, 6) probabilities", lambda x, q: SF.cross_entropy(x, q, label_smoothing=0.2),
         lambda x, q: TF.cross_entropy(x, q, label_smoothing=0.2),
         lambda g: (_randn(g, 4, 6), _randn(g, 4, 6, grad=False).softmax(1).requires_grad_()), batched=(0, 1)),
    Case("cross_entropy", "(3, 5) probabilities, learned w, mean", lambda x, q, w: SF.cross_entropy(x, q, weight=w),
         lambda x, q, w: TF.cross_entropy(x, q, weight=w),
         lambda g: (_randn(g, 3, 5), _randn(g, 3, 5, grad=False).softmax(1),
                    _randn(g, 5, grad=False).abs().requires_grad_()),
         batched=(0, 1),
         gradgradcheck=False),  # double backward through a learned class weight raises (tested in its test file)
    Case("conv2d", "(2,4,7,6)*(6,2,3,3) s2 p1 d2 g2", SF.conv2d, TF.conv2d,
         lambda g: (_randn(g, 2, 4, 7, 6), _randn(g, 6, 2, 3, 3), _randn(g, 6)),
         kwargs={"stride": 2, "padding": 1, "dilation": 2, "groups": 2}, gradcheck_kwargs={"fast_mode": True}),
    Case("conv2d", "(1,3,6,5)*(3,1,2,3) same depthwise", SF.conv2d, TF.conv2d,
         lambda g: (_randn(g, 1, 3, 6, 5), _randn(g, 3, 1, 2, 3), _randn(g, 3)),
         kwargs={"padding": "same", "groups": 3}, gradcheck_kwargs={"fast_mode": True}),
    Case("softmax", "(3, 5, 7) dim=1", lambda x: SF.softmax(x, 1), lambda x: TF.softmax(x, 1),
         lambda g: (_randn(g, 3, 5, 7),)),
    Case("log_softmax", "(7, 13)ᵀ dim=-1", lambda x: SF.log_softmax(x.t(), -1), lambda x: TF.log_softmax(x.t(), -1),
         lambda g: (_randn(g, 7, 13),)),
    Case("linear_cross_entropy", "(6, 5)·(9, 5)ᵀ + b, w, ignore 2, smooth 0.1",
         lambda x, w, b, t, cw: SF.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, ignore_index=2,
                                                        label_smoothing=0.1),
         lambda x, w, b, t, cw: TF.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, ignore_index=2,
                                                        label_smoothing=0.1),
         lambda g: (_randn(g, 6, 5), _randn(g, 9, 5), _randn(g, 9), torch.tensor([2, 0, 8, 2, 5, 1]),
                    _randn(g, 9, grad=False).abs()),
         batched=(0, 3)),
    Case("linear_cross_entropy", "(4, 5)·(7, 5)ᵀ probabilities, w, smooth 0.2, sum",
         lambda x, w, q, cw: SF.linear_cross_entropy(x, w, q, weight=cw, label_smoothing=0.2, reduction="sum"),
         lambda x, w, q, cw: TF.linear_cross_entropy(x, w, q, weight=cw, label_smoothing=0.2, reduction="sum"),
         lambda g: (_randn(g, 4, 5), _randn(g, 7, 5), _randn(g, 4, 7, grad=False).softmax(1).requires_grad_(),
                    _randn(g, 7, grad=False).abs().requires_grad_()),
         batched=(0, 2)),
    # Later op families add their cases here.
]


def _on(inputs, device, dtype):
    """Floating tensors moved to ``device`` and cast to ``dtype`` (requires_grad kept); others moved only."""
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            x = (x.detach().to(device=device, dtype=dtype).requires_grad_(x.requires_grad) if x.is_floating_point()
                 else x.to(device))
        out.append(x)
    return out


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _max_error(case: Case, inputs, device) -> float:
    """Max abs difference, forward and input gradients, float32, against the torch twin."""
    ours_in, theirs_in = _on(inputs, device, torch.float32), _on(inputs, device, torch.float32)
    a = _first(case.call(case.ours, *ours_in))
    with warnings.catch_warnings():  # the yardstick's own warnings (e.g. torch's conv2d 'same' note) are noise here
        warnings.simplefilter("ignore")
        b = _first(case.call(case.theirs, *theirs_in))
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} differs from torch's {tuple(b.shape)}")
    err = (a.detach().double() - b.detach().double()).abs().nan_to_num().max().item() if a.numel() else 0.0
    if b.requires_grad:
        grad = torch.randn(b.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=b.dtype)
        a.backward(grad)
        b.backward(grad)
        for x, y in zip(ours_in, theirs_in):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                if x.grad is None:
                    return float("inf")
                if x.grad.numel():
                    err = max(err, (x.grad.double() - y.grad.double()).abs().max().item())
    return err


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:90]}"


def _launches(backend: str) -> int:
    return sum(n for (_, b), n in LAUNCHES.items() if b == backend)


def run_case(case: Case, backend: str, device: str, tolerance: float | None = None) -> dict:
    """Check one case on one backend; the row has a bool (or None: not applicable) per check in CHECKS."""
    tolerance = case.tolerance if tolerance is None else tolerance
    g = torch.Generator().manual_seed(0)
    inputs = case.inputs(g)
    row = {"op": case.op, "case": case.label, "backend": backend, "device": device, "tolerance": tolerance,
           "gradcheck": None, "gradgradcheck": None, "parity": None, "max_error": None, "errors": []}
    before = _launches(backend)
    with use_backend(backend):
        if case.gradcheck:
            try:
                row["gradcheck"] = torch.autograd.gradcheck(lambda *x: case.call(case.ours, *x),
                                                            tuple(_on(inputs, device, torch.float64)),
                                                            **case.gradcheck_kwargs)
            except Exception as e:  # a failed gradcheck raises GradcheckError; a broken op may raise anything
                row["gradcheck"] = False
                row["errors"].append("gradcheck " + _short(e))
        if case.gradcheck and case.gradgradcheck:
            try:
                row["gradgradcheck"] = torch.autograd.gradgradcheck(lambda *x: case.call(case.ours, *x),
                                                                    tuple(_on(inputs, device, torch.float64)),
                                                                    **case.gradcheck_kwargs)
            except Exception as e:
                row["gradgradcheck"] = False
                row["errors"].append("gradgradcheck " + _short(e))
        if case.parity:
            try:
                row["max_error"] = _max_error(case, inputs, device)
            except Exception as e:
                row["max_error"] = float("inf")
                row["errors"].append("parity " + _short(e))
            row["parity"] = row["max_error"] <= tolerance
    row["ran"] = _launches(backend) > before
    if not row["ran"]:
        row["errors"].append(f"no scratchops backend op ran on {backend!r}")
    row["ok"] = all(row[c] is not False for c in CHECKS)
    if row["errors"]:
        row["error"] = "; ".join(row["errors"])
    return row


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def backends_here(device: str) -> list[str]:
    return ["reference"] + ([] if triton_unavailable_reason(torch.device(device), torch.float32) else ["triton"])


def select(cases: list[Case], ops) -> list[Case]:
    """The cases whose op is in ``ops`` (names, comma-separated or not); all of them for None.

    Raises ValueError for an unknown name, and for ``ops`` that names nothing (``--ops ""``): a run that
    checks nothing must not pass."""
    if ops is None:
        return list(cases)
    wanted = {name.strip() for item in ops for name in item.split(",") if name.strip()}
    if not wanted:
        raise ValueError(f"--ops names no op; known: {', '.join(sorted({c.op for c in cases}))}")
    unknown = wanted - {c.op for c in cases}
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(sorted({c.op for c in cases}))}")
    return [c for c in cases if c.op in wanted]


def _mark(value) -> str:
    return "-" if value is None else ("pass" if value else "FAIL")


def table_header(width: int) -> str:
    return (f"{'op':16s} {'case':{width}s} {'backend':10s} {'gradcheck':9s} {'gradgrad':8s} {'parity':6s} {'ran':4s} "
            f"{'max err':>9s} {'tol':>7s}")


def format_row(r: dict, width: int) -> str:
    err = "-" if r["max_error"] is None else f"{r['max_error']:.2e}"
    return (f"{r['op']:16s} {r['case']:{width}s} {r['backend']:10s} {_mark(r['gradcheck']):9s} "
            f"{_mark(r['gradgradcheck']):8s} "
            f"{_mark(r['parity']):6s} {_mark(r['ran']):4s} {err:>9s} {r['tolerance']:7.0e}"
            + (f"  {r['error']}" if "error" in r else ""))


def format_table(rows: list[dict]) -> str:
    width = max([len("case")] + [len(r["case"]) for r in rows])
    header = table_header(width)
    return "\n".join([header, "-" * len(header)] + [format_row(r, width) for r in rows])


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def format_summary(rows: list[dict]) -> str:
    """One line per op: each check passes only where it passes in every case and on every backend."""
    header = f"{'op':16s} " + " ".join(f"{c:13s}" for c in CHECKS) + f" {'worst err':>9s}  backends"
    lines = [header, "-" * len(header)]
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op]
        marks = [_mark(None if all(r[c] is None for r in mine) else all(r[c] is not False for r in mine))
                 for c in CHECKS]
        errors = [r["max_error"] for r in mine if r["max_error"] is not None]
        worst = f"{max(errors):.2e}" if errors else "-"
        lines.append(f"{op:16s} " + " ".join(f"{m:13s}" for m in marks) + f" {worst:>9s}  "
                     + ", ".join(dict.fromkeys(r["backend"] for r in mine)))
    return "\n".join(lines)


DESCRIPTION = ("Check every scratchops op on every backend that runs here: gradcheck in float64, float32 parity of "
               "values and gradients against torch, and that a scratchops backend op really ran. "
               "Exit status: 0 all pass, 1 any failure, 2 usage error.")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="scratchops verify", description=DESCRIPTION)
    parser.add_argument("--ops", nargs="+", metavar="OP", help="only these ops (names or comma-separated lists)")
    parser.add_argument("--backend", choices=("all", "triton", "reference"), default="all",
                        help="which backends to check (default: every one that runs here)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON (its folder must exist)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    return parser.parse_args(argv)


def usage_error(message: str) -> int:
    print(f"scratchops verify: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse: --help exits 0, a usage error 2
        return int(e.code or 0)
    try:
        cases = select(CASES, args.ops)
        env_backend()  # a bad $SCRATCHOPS_BACKEND would make every library call raise: say so now
    except ValueError as e:
        return usage_error(str(e))
    if args.list:
        for c in cases:
            print(f"{c.op:16s} {c.label}")
        return 0
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        return usage_error(f"--json {args.json}: the folder {os.path.dirname(os.path.abspath(args.json))} "
                           "does not exist")
    device = best_device()
    backends = backends_here(device)
    if args.backend != "all":
        if args.backend not in backends:
            return usage_error(f"backend {args.backend!r} cannot run here: "
                               f"{triton_unavailable_reason(torch.device(device), torch.float32)}")
        backends = [args.backend]
    total = len(cases) * len(backends)
    print(f"scratchops verify on {device} (backends: {', '.join(backends)}; "
          f"triton interpreter: {os.environ.get('TRITON_INTERPRET') == '1'}); {plural(len(cases), 'case')}, "
          f"{plural(total, 'check row')}", flush=True)
    width = max([len("case")] + [len(c.label) for c in cases])
    counter = len(f"[{total}/{total}] ")
    header = " " * counter + table_header(width)
    print(header + "\n" + "-" * len(header), flush=True)
    rows = []
    for case in cases:
        for backend in backends:
            rows.append(run_case(case, backend, device))
            print(f"{f'[{len(rows)}/{total}]':{counter}s}{format_row(rows[-1], width)}", flush=True)
    print(f"\nop x check ({plural(len(cases), 'case')} on {plural(len(backends), 'backend')}):")
    print(format_summary(rows))
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "backends": backends, "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
