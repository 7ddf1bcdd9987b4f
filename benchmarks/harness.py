"""The shared benchmark runner: timings, roofs, memory, and the results files.

Every ``bench_<family>.py`` builds a :class:`Bench`, calls :meth:`Bench.compare`
(and :meth:`Bench.memory`) per case, then :meth:`Bench.save`. Timings are
``triton.testing.do_bench`` medians with p20/p80. Memory-bound rows report GB/s,
compute-bound rows TFLOP/s, each with its percentage of a roof measured in the
same run: a large device-to-device copy (GB/s) and a large cuBLAS bf16 matmul
(TFLOP/s). Results merge into ``benchmarks/results/<gpu>.json`` and ``.md``, with
the GPU name, torch/triton versions and the git commit.

Without a CUDA device there is nothing to time: ``Bench.gpu`` is False and the
script says so and exits 0.

The scripts run as modules from the repository root (nothing edits the import
path): ``python -m benchmarks.bench_<family> [--quick]`` (or
``scratchops bench``, which starts them that way). The helpers the package
shares with them (saved-tensor bytes, the GPU slug, the results files) live in
``scratchops._bench_utils``; the package never imports this folder.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

import torch

from scratchops._bench_utils import (gpu_slug, git_commit, load_results, merge_family, saved_tensor_bytes,
                                     to_markdown)

__all__ = ["Bench", "gpu_slug", "git_commit", "run_grid", "saved_tensor_bytes", "to_markdown"]

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
QUANTILES = (0.5, 0.2, 0.8)
COPY_ROOF_BYTES = 1 << 30        # 1 GiB source, 1 GiB destination
MATMUL_ROOF_SIZE = 8192          # bf16 8192^3 through cuBLAS
PASSES = ("fwd", "bwd", "fwd+bwd")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else str(dtype)


class Bench:
    def __init__(self, family: str, argv=None, description: str = ""):
        parser = argparse.ArgumentParser(description=description or f"scratchops {family} benchmarks")
        parser.add_argument("--quick", action="store_true", help="a small subset of the cases")
        parser.add_argument("--out", default=RESULTS_DIR, help="folder for <gpu>.json/.md (default: %(default)s)")
        self.args = parser.parse_args(argv)
        self.family, self.quick, self.rows = family, self.args.quick, []
        self.gpu = torch.cuda.is_available()
        self._roofs = None
        if not self.gpu:
            print(f"bench_{family}: no CUDA GPU found; timings need one (nothing measured).")

    # ------------------------------------------------------------------ roofs
    @property
    def roofs(self) -> dict:
        """The copy roof (GB/s) and the bf16 cuBLAS matmul roof (TFLOP/s), measured once per run."""
        if self._roofs is None:
            import triton.testing

            src = torch.empty(COPY_ROOF_BYTES, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=QUANTILES)[0]
            copy_gbps = 2 * COPY_ROOF_BYTES / ms / 1e6
            del src, dst
            n = MATMUL_ROOF_SIZE
            a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            ms = triton.testing.do_bench(lambda: a @ b, quantiles=QUANTILES)[0]
            self._roofs = {"copy_gbps": copy_gbps, "matmul_bf16_tflops": 2 * n**3 / ms / 1e9}
            print(f"roofs: copy {copy_gbps:.0f} GB/s, cuBLAS bf16 {self._roofs['matmul_bf16_tflops']:.0f} TFLOP/s")
        return self._roofs

    # ------------------------------------------------------------------ timing
    def _time(self, fn, grad_to_none):
        import triton.testing

        return triton.testing.do_bench(fn, quantiles=QUANTILES, grad_to_none=grad_to_none or None)

    def compare(self, op, case, dtype, impls, inputs=(), *, flops=None, bytes=None, passes=PASSES,
                compile_torch=False, grad_output=None):
        """Time each implementation's passes and record a row per (impl, pass).

        ``impls`` maps a name to a zero-argument callable returning the forward
        output. ``flops``/``bytes`` map "fwd"/"bwd" (and optionally "fwd+bwd") to
        the work of that pass; rows get TFLOP/s or GB/s and % of the roof.
        """
        impls = dict(impls)
        if compile_torch and "torch" in impls:
            impls["torch.compile"] = torch.compile(impls["torch"])
        grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        for impl, fn in impls.items():
            for p in passes:
                row = {"family": self.family, "op": op, "case": case, "dtype": _dtype_name(dtype), "impl": impl,
                       "pass": p}
                try:
                    row.update(self._measure(fn, p, grads, grad_output))
                    self._rate(row, flops, bytes)
                except Exception as e:  # an impl that fails (OOM, compile error) is reported, not fatal
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                self.rows.append(row)
                self._print(row)

    def _measure(self, fn, p, grads, grad_output):
        if p == "fwd":
            ms, p20, p80 = self._time(fn, grads)
        else:
            out = fn()
            g = grad_output if grad_output is not None else torch.ones_like(out)
            if p == "bwd":
                ms, p20, p80 = self._time(lambda: out.backward(g, retain_graph=True), grads)
            else:
                ms, p20, p80 = self._time(lambda: fn().backward(g), grads)
        return {"ms": ms, "p20_ms": p20, "p80_ms": p80}

    def _rate(self, row, flops, bytes):
        p, seconds = row["pass"], row["ms"] / 1e3
        if flops:
            work = flops.get(p, flops.get("fwd", 0) + flops.get("bwd", 0) if p == "fwd+bwd" else None)
            if work:
                row["tflops"] = work / seconds / 1e12
                row["pct_roof"] = 100 * row["tflops"] / self.roofs["matmul_bf16_tflops"]
        if bytes:
            work = bytes.get(p, bytes.get("fwd", 0) + bytes.get("bwd", 0) if p == "fwd+bwd" else None)
            if work:
                row["gbps"] = work / seconds / 1e9
                row["pct_roof"] = 100 * row["gbps"] / self.roofs["copy_gbps"]

    def memory(self, op, case, dtype, impls, inputs=()):
        """Peak memory of forward+backward and bytes saved for backward, per implementation."""
        for impl, fn in impls.items():
            row = {"family": self.family, "op": op, "case": case, "dtype": _dtype_name(dtype), "impl": impl,
                   "pass": "memory"}
            try:
                for t in inputs:
                    if isinstance(t, torch.Tensor):
                        t.grad = None
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                saved, out = saved_tensor_bytes(fn, exclude=[t for t in inputs if isinstance(t, torch.Tensor)])
                out.backward(torch.ones_like(out))
                torch.cuda.synchronize()
                row.update(peak_bytes=torch.cuda.max_memory_allocated() - base, saved_bytes=saved["total"],
                           saved_new_bytes=saved["new"])
                del out
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            self.rows.append(row)
            self._print(row)

    @staticmethod
    def _print(row):
        if "error" in row:
            what = row["error"]
        elif row["pass"] == "memory":
            what = (f"peak {row['peak_bytes'] / 2**20:9.1f} MiB  saved {row['saved_bytes'] / 2**20:9.1f} MiB "
                    f"(new {row['saved_new_bytes'] / 2**20:.1f} MiB)")
        else:
            rate = f"{row['tflops']:7.1f} TFLOP/s" if "tflops" in row else (
                f"{row['gbps']:7.0f} GB/s" if "gbps" in row else "")
            pct = f" ({row['pct_roof']:5.1f}% roof)" if "pct_roof" in row else ""
            what = f"{row['ms']:9.4f} ms  {rate}{pct}"
        print(f"{row['op']:14s} {row['case']:28s} {row['dtype']:9s} {row['impl']:14s} {row['pass']:8s} {what}",
              flush=True)

    # ------------------------------------------------------------------ results
    def environment(self) -> dict:
        import triton

        return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "cuda": torch.version.cuda, "commit": git_commit(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def save(self, env=None):
        """Merge this run's rows into ``<out>/<gpu>.json`` (rows measured again are replaced, the others kept)
        and rewrite ``<gpu>.md``."""
        env = env or self.environment()
        os.makedirs(self.args.out, exist_ok=True)
        stem = os.path.join(self.args.out, gpu_slug(env["gpu"]))
        data = merge_family(load_results(stem + ".json"), self.family, env, self._roofs or {}, self.rows)
        with open(stem + ".json", "w") as f:
            json.dump(data, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(to_markdown(data))
        print(f"wrote {stem}.json and {stem}.md")


def gpu_inputs(log2_sizes, shape, dtypes=(torch.float32, torch.bfloat16)):
    """The inputs of a size sweep: for each 2^k in ``log2_sizes`` and each dtype, ``(k, dtype, x, bytes of x)``
    with ``x = randn(shape(2^k))`` on the GPU, requiring grad. The cache is emptied between turns (the caller's
    previous ``x`` lives until the next one is made: two inputs at a time at most)."""
    for log2n in log2_sizes:
        for dtype in dtypes:
            x = torch.randn(shape(1 << log2n), device="cuda", dtype=dtype, requires_grad=True)
            yield log2n, dtype, x, x.element_size() * x.numel()
            del x
            torch.cuda.empty_cache()


def run_grid(family: str, argv, bench_one, sizes, quick_sizes, dtypes) -> int:
    """A bench script's ``main``: ``bench_one(bench, size, dtype)`` for every size (``quick_sizes`` with --quick)
    and dtype, then the results saved; 0 without a GPU (nothing to time)."""
    bench = Bench(family, argv)
    if not bench.gpu:
        return 0
    for size in quick_sizes if bench.quick else sizes:
        for dtype in dtypes:
            bench_one(bench, size, dtype)
    bench.save()
    return 0
