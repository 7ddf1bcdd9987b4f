"""Memory-traffic audit (issue 12): what each op moves, against what it must move.

    scratchops traffic [--ops relu softmax_8x32768 ...] [--json PATH|-]

Under Triton's interpreter (CPU tensors), through the public API, per op and pass (``fwd``: a
training forward, inputs requiring grad; ``fwd+bwd``: plus ``torch.autograd.grad``; ``nograd``: the
forward under ``torch.no_grad``; ``step``: an optimizer step in the steady state), it counts

* **kernel bytes**: every ``tl.load`` / ``tl.store`` (and atomic) of every Triton kernel, as unmasked
  lanes x element size, read at the interpreter's memory operations (``InterpreterBuilder``'s
  ``create_masked_load`` / ``create_masked_store`` / atomics, which every load and store reaches);
  re-reads count again, as DRAM would see them with no cache help;
* **launches** of Triton kernels;
* **glue**: the torch ops run around the launches (a ``TorchDispatchMode``, paused while a kernel
  runs, so the interpreter's own bookkeeping is not counted), with their bytes (tensors read and
  written, each view counted by its elements). Views and allocations move nothing and are not glue;
  allocations are counted apart. ``scratchops._backend``'s eager fast path is kept: the mode is
  hidden from its dispatch-mode check, so what is counted is what a plain eager call runs;
* **syncs**: host reads of device data (``aten._local_scalar_dense``: ``.item()``, ``bool(t)``);

and the op's **compulsory** bytes: each tensor the math needs read once and each result written
once (the ``CASES`` table), with the ratio (kernel + glue bytes) / compulsory.
Everything runs on the CPU: device transfers are invisible, and a launcher that branches on the
device takes its CPU branch (e.g. cross_entropy's target check, a host sync on CPU by design).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PASSES = ("fwd", "fwd+bwd", "nograd", "step")
_FREE = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
         "set_", "resize_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size")
_WRITE_ONLY = ("copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_")


@dataclasses.dataclass
class Tally:
    kernel_read: int = 0
    kernel_written: int = 0
    launches: int = 0
    glue: list = dataclasses.field(default_factory=list)  # [(aten op, bytes)]
    allocations: int = 0
    syncs: int = 0
    _paused: int = 0

    @contextlib.contextmanager
    def paused(self):
        """Torch ops in the block are not glue (a kernel's interpreter bookkeeping, the audit's own set-up)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @property
    def glue_bytes(self) -> int:
        return sum(b for _, b in self.glue)

    @property
    def total(self) -> int:
        return self.kernel_read + self.kernel_written + self.glue_bytes


_active: list[Tally] = []


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class _GlueMode(TorchDispatchMode):
    """Counts the torch ops run outside kernels: glue kernels (bytes), allocations, host syncs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tally = _active[-1] if _active else None
        if tally is None or tally._paused:
            return out
        name = func.__name__.split(".")[0]
        schema = func._schema
        if name == "_local_scalar_dense":
            tally.syncs += 1
            return out
        if name in ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"):
            tally.allocations += 1
            return out
        returns_alias = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        written_args = [a for a, arg in zip(args, schema.arguments) if arg.alias_info is not None
                        and arg.alias_info.is_write]
        if name in _FREE or returns_alias or not (written_args or any(True for _ in _tensors(out))):
            return out  # a view, or no tensor made or written (promote_types, profiler records)
        written_ids = {id(t) for t in _tensors(written_args)}
        read = sum(_nbytes(t) for t in _tensors((args, kwargs))
                   if id(t) not in written_ids or name not in _WRITE_ONLY)
        written = sum(_nbytes(t) for t in _tensors(written_args)) if written_args else \
            sum(_nbytes(t) for t in _tensors(out))
        tally.glue.append((name, read + written))
        return out


def _lanes(mask, ptrs) -> int:
    import numpy as np

    return int(np.count_nonzero(np.broadcast_to(mask, ptrs.shape)))


def _element_bytes(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


@contextlib.contextmanager
def counting():
    """Count within the block: yields a :class:`Tally` (needs ``TRITON_INTERPRET=1``)."""
    from triton.runtime import interpreter

    import scratchops._backend as backend

    builder_cls = interpreter.InterpreterBuilder
    saved = {name: getattr(builder_cls, name) for name in
             ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}
    run = interpreter.InterpretedFunction.run
    tally = Tally()

    def load(self, ptrs, mask, *args, **kwargs):
        tally.kernel_read += _lanes(mask.data, ptrs.data) * _element_bytes(ptrs)
        return saved["create_masked_load"](self, ptrs, mask, *args, **kwargs)

    def store(self, ptrs, value, mask, *args, **kwargs):
        tally.kernel_written += _lanes(mask.data, ptrs.data) * _element_bytes(ptrs)
        return saved["create_masked_store"](self, ptrs, value, mask, *args, **kwargs)

    def atomic_rmw(self, op, ptrs, val, mask, *args, **kwargs):
        n = _lanes(mask.data, ptrs.data) * _element_bytes(ptrs)
        tally.kernel_read, tally.kernel_written = tally.kernel_read + n, tally.kernel_written + n
        return saved["create_atomic_rmw"](self, op, ptrs, val, mask, *args, **kwargs)

    def atomic_cas(self, ptrs, cmp, val, *args, **kwargs):
        n = ptrs.data.size * _element_bytes(ptrs)
        tally.kernel_read, tally.kernel_written = tally.kernel_read + n, tally.kernel_written + n
        return saved["create_atomic_cas"](self, ptrs, cmp, val, *args, **kwargs)

    def launch(self, *args, grid, warmup, **kwargs):
        if not warmup:
            tally.launches += 1
        with tally.paused():
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    modes = backend._dispatch_modes
    for name, fn in (("create_masked_load", load), ("create_masked_store", store), ("create_atomic_rmw", atomic_rmw),
                     ("create_atomic_cas", atomic_cas)):
        setattr(builder_cls, name, fn)
    interpreter.InterpretedFunction.run = launch
    # The eager fast path stays on: the counting mode is not one that needs the custom op.
    backend._dispatch_modes = lambda: modes() - 1
    _active.append(tally)
    try:
        with _GlueMode():
            yield tally
    finally:
        _active.pop()
        backend._dispatch_modes = modes
        interpreter.InterpretedFunction.run = run
        for name, fn in saved.items():
            setattr(builder_cls, name, fn)


# ----------------------------------------------------------------- the cases
def _rand(*shape, grad=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)


@dataclasses.dataclass
class Case:
    """One audited call: ``build()`` -> (inputs, fn); ``compulsory[pass]`` in bytes; the passes it runs."""

    build: object
    compulsory: dict
    passes: tuple = ("fwd", "fwd+bwd")


def _cases() -> dict:
    import scratchops.functional as F

    R, C, e = 16, 4096, 4  # elementwise ratios do not depend on the shape: a small one keeps the audit quick
    n = R * C * e
    x1 = lambda fn: (lambda: ([_rand(R, C)], fn))  # noqa: E731
    unary = {"fwd": 2 * n, "fwd+bwd": 5 * n}  # x, y | y, dy, dx
    cases = {
        "relu": Case(x1(F.relu), unary),
        "sigmoid": Case(x1(F.sigmoid), unary),
        "tanh": Case(x1(F.tanh), unary),
        "dropout": Case(x1(lambda x: F.dropout(x, 0.5)), {"fwd": 2 * n, "fwd+bwd": 4 * n}),  # mask from the seed
        "mse_loss": Case(lambda: ([_rand(R, C), _rand(R, C, grad=False, seed=1)], F.mse_loss),
                         {"fwd": 2 * n + e, "fwd+bwd": 5 * n + 2 * e}),  # x, t | x, t, dx (+ loss, its grad)
    }
    for name, fn in (("softmax", F.softmax), ("log_softmax", F.log_softmax)):
        for r, c in ((64, 4096), (8, 32768), (8, 65536)):
            m = r * c * e
            cases[f"{name}_{r}x{c}"] = Case(lambda r=r, c=c, fn=fn: ([_rand(r, c)], lambda x: fn(x, -1)),
                                            {"fwd": 2 * m, "fwd+bwd": 5 * m})
    r, c = 64, 8192
    target = torch.randint(0, c, (r,), generator=torch.Generator().manual_seed(0))
    logits = r * c * e
    cases["cross_entropy_64x8192"] = Case(
        lambda: ([_rand(r, c)], lambda x: F.cross_entropy(x, target)),
        # issue 12: read the logits once + write dlogits once (targets read, the loss written, once per pass)
        {"fwd": logits + r * 8 + e, "nograd": logits + r * 8 + e, "fwd+bwd": 2 * logits + 2 * r * 8 + 2 * e},
        ("fwd", "fwd+bwd", "nograd"))
    m_, k_, n_ = 64, 256, 128
    cases["linear_64x256x128"] = Case(
        lambda: ([_rand(m_, k_), _rand(n_, k_, seed=1), _rand(n_, seed=2)], F.linear),
        {"fwd": (m_ * k_ + n_ * k_ + n_ + m_ * n_) * e,
         # + backward: dy, x, w read; dx, dw, db written
         "fwd+bwd": (m_ * k_ + n_ * k_ + n_ + m_ * n_) * e + (m_ * n_ + 2 * m_ * k_ + 2 * n_ * k_ + n_) * e})
    xs, ws, ys = 1 * 8 * 16 * 16, 16 * 8 * 3 * 3, 1 * 16 * 16 * 16
    cases["conv2d_1x8x16x16_k16r3"] = Case(
        lambda: ([_rand(1, 8, 16, 16), _rand(16, 8, 3, 3, seed=1), _rand(16, seed=2)],
                 lambda x, w, b: F.conv2d(x, w, b, padding=1)),
        {"fwd": (xs + ws + 16 + ys) * e, "fwd+bwd": (xs + ws + 16 + ys) * e + (ys + xs + ws + xs + ws + 16) * e})
    p = 16 * 1024
    cases["l2_penalty"] = Case(lambda: ([_rand(16, 1024)], lambda w: F.l2_penalty([w], 1e-4)),
                               {"fwd": p * e + e, "fwd+bwd": 3 * p * e + 2 * e})  # w | w, dw (+ out, its grad)
    cases["sgd_step"] = Case(_sgd, {"step": 5 * 16 * 64 * 64 * e}, ("step",))  # w, g, buf read; w, buf written
    cases.update(_linear_cross_entropy_case(e))
    return cases


def _linear_cross_entropy_case(e: int) -> dict:
    """Fused linear + cross-entropy (issue 14), N tokens, H features, C classes, bias, index targets, mean.

    Compulsory, per pass: read X (N·H), W (C·H), b (C), the targets (N·8) once; write the loss (fwd) /
    also read g and write dX, dW, db (bwd): fwd = (NH + CH + C)e + 8N + e; bwd = that + e + (NH + CH + C)e.
    What the design re-reads on top (BN, BV: the row kernels' row and class tile; a GEMM's tiles): the forward
    reads W once per row block and X once per class tile (W·N/BN + X·C/BV); the backward recomputes the logits
    the same way, writes dZ (N·C, in N·V_c chunks) and reads it back for dX += dZ W_c, dW_c = dZᵀX and db
    (each GEMM re-reading its operands per output tile). The N·C logits are never held, but dZ goes through
    memory: the fused backward's floor is about 3·N·C·e (write dZ, read it for dX and dW), not the
    compulsory figure; the ratio is dominated by it and by the interpreter's small tiles (BN 16, BV 32)."""
    import scratchops.functional as F

    n, h, c = 32, 32, 512
    target = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(0))
    once = (n * h + c * h + c) * e + n * 8
    return {f"linear_cross_entropy_{n}x{h}x{c}": Case(
        lambda: ([_rand(n, h), _rand(c, h, seed=1), _rand(c, seed=2)],
                 lambda x, w, b: F.linear_cross_entropy(x, w, target, linear_bias=b)),
        {"fwd": once + e, "fwd+bwd": 2 * once + 2 * e + (n * h + c * h + c) * e, "nograd": once + e},
        ("fwd", "fwd+bwd", "nograd"))}


def _sgd():
    import scratchops.optim

    params = [_rand(64, 64, seed=i) for i in range(16)]
    for i, w in enumerate(params):
        w.grad = _rand(64, 64, grad=False, seed=100 + i)
    opt = scratchops.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    opt.step()  # momentum buffers exist: the steady state is audited
    return [], opt.step


def measure(name: str, case: Case | None = None, passes=None) -> list[dict]:
    """One row per pass of the case ``name``."""
    case = case or _cases()[name]
    rows = []
    for p in passes or case.passes:
        inputs, fn = case.build()
        grads = [t for t in inputs if t.requires_grad]
        if p == "fwd+bwd":
            with counting() as tally:
                out = fn(*inputs)
                with tally.paused():
                    g = torch.ones_like(out)
                torch.autograd.grad(out, grads, g)
        elif p == "nograd":
            with torch.no_grad(), counting() as tally:
                fn(*inputs)
        else:
            with counting() as tally:
                fn(*inputs)
        glue: dict = {}
        for op, b in tally.glue:
            count, total = glue.get(op, (0, 0))
            glue[op] = (count + 1, total + b)
        rows.append({"op": name, "pass": p, "kernel_read": tally.kernel_read, "kernel_written": tally.kernel_written,
                     "launches": tally.launches, "glue_kernels": len(tally.glue), "glue_bytes": tally.glue_bytes,
                     "glue": {k: list(v) for k, v in sorted(glue.items())}, "allocations": tally.allocations,
                     "syncs": tally.syncs, "compulsory": case.compulsory[p],
                     "ratio": round(tally.total / case.compulsory[p], 3)})
    return rows


def table(rows) -> str:
    lines = ["| op | pass | kernel MB read / written | launches | glue kernels (MB) | syncs | compulsory MB | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        glue = ", ".join(f"{k}x{v[0]}" for k, v in r["glue"].items())
        lines.append(f"| {r['op']} | {r['pass']} | {r['kernel_read'] / 1e6:.3f} / {r['kernel_written'] / 1e6:.3f} | "
                     f"{r['launches']} | {r['glue_kernels']} ({r['glue_bytes'] / 1e6:.3f}){': ' + glue if glue else ''}"
                     f" | {r['syncs']} | {r['compulsory'] / 1e6:.3f} | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scratchops traffic", description=__doc__.splitlines()[0])
    names = list(_cases())
    parser.add_argument("--ops", nargs="*", default=names, choices=names)
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON ('-' for stdout)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            print("scratchops traffic: needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    import warnings

    import scratchops

    # The interpreter runs masked-off lanes through numpy too (e.g. log(0) in an unused branch).
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    rows = []
    cases = _cases()
    with scratchops.use_backend("triton"):
        for name in args.ops:
            rows += measure(name, cases[name])
            if args.json != "-":
                print(f"  measured {name}", file=sys.stderr, flush=True)
    if args.json:
        text = json.dumps(rows, indent=1)
        if args.json == "-":
            print(text)
            return 0
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print("fp32, Triton interpreter, public API; ratio = (kernel + glue bytes) / compulsory bytes")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
