"""``python -m scratchops verify``: gradcheck and torch parity of every op, as a table.

Each case names an op, its scratchops function, its torch twin and how to make
its inputs. For every backend that can run here, the case is checked twice:

* gradcheck: ``torch.autograd.gradcheck`` in float64 on the inputs that require grad;
* parity: forward values and input gradients in float32 against the torch twin
  (max absolute error shown), with one shared random grad_output.

Exit status 1 when any check fails. This is a verification tool, the one place in
the package (besides tests) where torch's own ops are called: as the yardstick.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as TF

from scratchops import functional as SF
from scratchops._backend import triton_unavailable_reason, use_backend


@dataclasses.dataclass
class Case:
    op: str
    label: str
    ours: Callable
    theirs: Callable
    inputs: Callable[[torch.Generator], tuple]  # float64 CPU tensors; those with requires_grad are checked


def _randn(g, *shape, grad=True):
    return torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(grad)


CASES: list[Case] = [
    Case("sigmoid", "(7, 13)", SF.sigmoid, torch.sigmoid, lambda g: (_randn(g, 7, 13),)),
    Case("relu", "(7, 13)", SF.relu, TF.relu, lambda g: (_randn(g, 7, 13),)),
    Case("tanh", "(7, 13)", SF.tanh, torch.tanh, lambda g: (_randn(g, 7, 13),)),
    # Later op families add their cases here.
]


def _on(inputs, device, dtype):
    return [x.detach().to(device=device, dtype=dtype).requires_grad_(x.requires_grad)
            if isinstance(x, torch.Tensor) else x for x in inputs]


def _max_error(case: Case, inputs, device) -> float:
    """Max abs difference, forward and input gradients, float32, against the torch twin."""
    ours_in, theirs_in = _on(inputs, device, torch.float32), _on(inputs, device, torch.float32)
    a, b = case.ours(*ours_in), case.theirs(*theirs_in)
    err = (a.detach().double() - b.detach().double()).abs().nan_to_num().max().item() if a.numel() else 0.0
    if b.requires_grad:
        grad = torch.randn(b.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=b.dtype)
        a.backward(grad)
        b.backward(grad)
        for x, y in zip(ours_in, theirs_in):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                if x.grad is None:
                    return float("inf")
                err = max(err, (x.grad.double() - y.grad.double()).abs().max().item())
    return err


def run_case(case: Case, backend: str, device: str, tolerance: float = 1e-4) -> dict:
    g = torch.Generator().manual_seed(0)
    inputs = case.inputs(g)
    row = {"op": case.op, "case": case.label, "backend": backend, "device": device}
    with use_backend(backend):
        try:
            row["gradcheck"] = torch.autograd.gradcheck(case.ours, tuple(_on(inputs, device, torch.float64)))
        except Exception as e:  # a failed gradcheck raises GradcheckError; a broken op may raise anything
            row["gradcheck"], row["error"] = False, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        try:
            row["max_error"] = _max_error(case, inputs, device)
        except Exception as e:
            row["max_error"], row["error"] = float("inf"), f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    row["parity"] = row["max_error"] <= tolerance
    row["ok"] = row["gradcheck"] and row["parity"]
    return row


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def backends_here(device: str) -> list[str]:
    return ["reference"] + ([] if triton_unavailable_reason(torch.device(device), torch.float32) else ["triton"])


def main(argv=None) -> int:
    device = best_device()
    backends = backends_here(device)
    print(f"scratchops verify on {device} (backends: {', '.join(backends)}; "
          f"triton interpreter: {os.environ.get('TRITON_INTERPRET') == '1'})")
    rows = [run_case(case, backend, device) for case in CASES for backend in backends]
    header = f"{'op':14s} {'case':28s} {'backend':10s} {'gradcheck':10s} {'parity':7s} {'max err':>10s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['op']:14s} {r['case']:28s} {r['backend']:10s} {'pass' if r['gradcheck'] else 'FAIL':10s} "
              f"{'pass' if r['parity'] else 'FAIL':7s} {r['max_error']:10.2e}" + (f"  {r['error']}" if "error" in r else ""))
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
