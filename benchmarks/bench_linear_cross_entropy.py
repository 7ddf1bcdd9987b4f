"""Fused linear + cross-entropy: time and peak memory of forward+backward, scratchops vs torch.

GPU (skipped without one): B·T = 16384 tokens, hidden 4096, vocabulary 128256, bf16, class-index targets:
  * scratchops     ``scratchops.functional.linear_cross_entropy`` (Triton: no logits tensor)
  * torch          ``F.linear_cross_entropy(..., options=None)`` (the reference path: full logits)
  * torch_chunked  ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
  * liger          ``liger_kernel``'s ``LigerFusedLinearCrossEntropyLoss``, when installed
  Time: median of CUDA-event timings of forward+backward; memory: peak allocated above the inputs.

CPU (always): small shapes, each implementation in a fresh process: the peak resident-set growth of one
forward+backward (``ru_maxrss``), and the largest tensor any op makes (a dispatch mode that also runs the
scratchops custom ops' launchers under itself). scratchops runs its reference backend on CPU (the Triton
interpreter costs about 1 ms per program) except at the smallest shape, where both backends run.

    python -m benchmarks.bench_linear_cross_entropy [--quick] [--json PATH]
(--quick: one iteration set on the GPU; on CPU the smallest shape only, without the Triton interpreter)
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as TF

GPU_SHAPE = (16384, 4096, 128256)
CPU_SHAPES = [(256, 16, 4096), (1024, 64, 32768)]
IMPLS = ("scratchops", "torch", "torch_chunked", "liger")


def _fn(name):
    """forward(x, w, t) -> loss for one implementation, or None when it is not installed."""
    if name == "scratchops":
        import scratchops.functional as SF

        return lambda x, w, t: SF.linear_cross_entropy(x, w, t)
    if name == "torch":
        return lambda x, w, t: TF.linear_cross_entropy(x, w, t)
    if name == "torch_chunked":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, t: TF.linear_cross_entropy(x, w, t, options=options)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: loss(w, x, t)


def _inputs(n, h, c, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(n, h, generator=g) * 0.5).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(c, h, generator=g) / h ** 0.5).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, c, (n,), generator=g).to(device)
    return x, w, t


# ----------------------------------------------------------------- GPU
def gpu_rows(quick: bool):
    n, h, c = GPU_SHAPE
    rows = []
    for name in IMPLS:
        fn = _fn(name)
        if fn is None:
            rows.append({"impl": name, "skipped": "not installed"})
            continue
        x, w, t = _inputs(n, h, c, torch.bfloat16, "cuda")
        try:
            fn(x, w, t).backward()  # warm-up (and Triton's autotuning)
            x.grad = w.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(2 if quick else 5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(x, w, t).backward()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
                x.grad = w.grad = None
            peak = torch.cuda.max_memory_allocated() - base
            rows.append({"impl": name, "shape": [n, h, c], "dtype": "bf16", "ms": statistics.median(times),
                         "peak_mib": peak / 2**20})
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"impl": name, "error": f"OOM: {str(e)[:80]}"})
        del x, w, t
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------- CPU memory (one process per measurement)
def _child(name, backend, n, h, c):
    import scratchops
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from scratchops._backend import REGISTRY

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "scratchops":  # run the launcher under this mode: its allocations count
                with self:
                    out = REGISTRY[func._opname].impl(args[0])(*args[1:], **(kwargs or {}))
            else:
                out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel() * t.element_size())
            return out

    fn = _fn(name)
    with scratchops.use_backend(backend):
        fn(*_inputs(2, h, 8, torch.float32, "cpu")).backward()  # first-call costs (imports...) before the baseline
        x, w, t = _inputs(n, h, c, torch.float32, "cpu")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn(x, w, t).backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        x.grad = w.grad = None
        with Largest() as mode:
            fn(x, w, t).backward()
    print(json.dumps({"rss_growth_mib": (after - before) / 1024, "largest_tensor_mib": mode.largest / 2**20}))


def cpu_rows(quick: bool):
    rows = []
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    for n, h, c in CPU_SHAPES[:1] if quick else CPU_SHAPES:
        runs = [("scratchops", "reference"), ("torch", "auto"), ("torch_chunked", "auto")]
        if (n, h, c) == CPU_SHAPES[0] and not quick:  # the interpreter: minutes
            runs.insert(1, ("scratchops", "triton"))
        for name, backend in runs:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_linear_cross_entropy", "--child", name,
                                   backend, str(n), str(h), str(c)], capture_output=True, text=True, env=env)
            row = {"impl": name, "backend": backend, "shape": [n, h, c], "dtype": "fp32",
                   "logits_mib": n * c * 4 / 2**20}
            if proc.returncode == 0:
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            else:
                row["error"] = proc.stderr.strip().splitlines()[-1][:120] if proc.stderr.strip() else "failed"
            rows.append(row)
    return rows


def _print(title, rows, keys):
    print(f"\n{title}")
    for r in rows:
        print("  " + "  ".join(f"{k}={r[k]:.1f}" if isinstance(r.get(k), float) else f"{k}={r.get(k)}"
                               for k in keys if k in r))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, backend, n, h, c = args.child
        _child(name, backend, int(n), int(h), int(c))
        return 0
    result = {"gpu": None, "cpu": cpu_rows(args.quick)}
    _print("CPU, fp32, one forward+backward (peak RSS growth; largest single tensor):", result["cpu"],
           ("impl", "backend", "shape", "logits_mib", "rss_growth_mib", "largest_tensor_mib", "error"))
    if torch.cuda.is_available():
        result["gpu"] = gpu_rows(args.quick)
        _print(f"GPU {torch.cuda.get_device_name()}, bf16, B·T={GPU_SHAPE[0]} H={GPU_SHAPE[1]} V={GPU_SHAPE[2]}:",
               result["gpu"], ("impl", "ms", "peak_mib", "skipped", "error"))
    else:
        print("\nno CUDA GPU: the GPU comparison is skipped")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
