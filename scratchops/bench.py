"""``scratchops bench``: the benchmark suite, or (without a GPU) a CPU reference comparison.

With a CUDA GPU it runs the repository's ``benchmarks/bench_<family>.py`` scripts
(``--ops`` picks families), each as ``python -m benchmarks.bench_<family>`` from
the repository root; they time the Triton kernels against torch eager and
``torch.compile`` and merge their rows into ``<out>/<gpu>.json`` and ``.md``; then
it prints the table and draws one PNG per family. The scripts live in the
repository, not in the installed wheel: they are found next to the package in a
checkout; elsewhere the command says they are absent.

Without a GPU nothing about the kernels can be timed. It says so and runs the CPU
reference comparison instead: the plain-torch reference formulas of scratchops
against torch's own CPU ops, forward and forward+backward, on a few small shapes.
Those numbers describe the reference backend on this CPU, not the kernels. A run
of some ops (``--ops relu``) replaces those rows in ``cpu-reference.json`` and
keeps the others.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as TF

import scratchops
import scratchops.functional as SF
from scratchops._bench_utils import REPO, gpu_slug, load_results, merge_rows, to_markdown
SCRIPTS = os.path.join(REPO, "benchmarks")
CPU_STEM = "cpu-reference"
BAR_WIDTH = 30
FAMILY_OF = {"sgd": "optim", "SGD": "optim"}  # op names with no CPU case, for --ops


def _t(*shape, grad=True):
    return torch.randn(shape, generator=_t.g).requires_grad_(grad)


_t.g = torch.Generator().manual_seed(0)


def cpu_cases():
    """(family, op, case, inputs, ours, theirs): small CPU problems, built lazily (callables)."""
    def targets(n, c):
        return torch.randint(0, c, (n,), generator=_t.g)

    act = lambda: (_t(256, 1024),)  # noqa: E731
    return [
        ("activations", "relu", "256x1024", act, SF.relu, TF.relu),
        ("activations", "sigmoid", "256x1024", act, SF.sigmoid, torch.sigmoid),
        ("activations", "tanh", "256x1024", act, SF.tanh, torch.tanh),
        ("linear", "linear", "M=256 N=512 K=512", lambda: (_t(256, 512), _t(512, 512), _t(512)), SF.linear, TF.linear),
        ("softmax", "softmax", "256x1024 dim=-1", act, lambda x: SF.softmax(x, dim=-1), lambda x: TF.softmax(x, -1)),
        ("softmax", "log_softmax", "256x1024 dim=-1", act, lambda x: SF.log_softmax(x, dim=-1),
         lambda x: TF.log_softmax(x, -1)),
        ("mse", "mse_loss", "256x1024", lambda: (_t(256, 1024), _t(256, 1024, grad=False)), SF.mse_loss,
         TF.mse_loss),
        ("cross_entropy", "cross_entropy", "N=256 C=1000", lambda: (_t(256, 1000), targets(256, 1000)), SF.cross_entropy,
         TF.cross_entropy),
        ("conv2d", "conv2d", "N=8 C=16->32 32x32 k3 p1", lambda: (_t(8, 16, 32, 32), _t(32, 16, 3, 3), _t(32)),
         lambda x, w, b: SF.conv2d(x, w, b, padding=1), lambda x, w, b: TF.conv2d(x, w, b, padding=1)),
        ("regularization", "dropout", "256x1024 p=0.5", act, lambda x: SF.dropout(x, 0.5),
         lambda x: TF.dropout(x, 0.5)),
        ("regularization", "l2_penalty", "4 x 256x256", lambda: tuple(_t(256, 256) for _ in range(4)),
         lambda *ws: SF.l2_penalty(list(ws), weight_decay=0.1),
         lambda *ws: 0.1 * sum(w.pow(2).sum() for w in ws)),
    ]


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _fwd_bwd(fn, inputs):
    def run():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        for x in inputs:
            x.grad = None
    return run


def progress(i: int, n: int, what: str) -> None:
    done = BAR_WIDTH * i // max(n, 1)
    print(f"[{'#' * done}{'.' * (BAR_WIDTH - done)}] {i}/{n} {what}", flush=True)


def matches(filters, *names) -> bool:
    return not filters or any(n in filters for n in names)


def cpu_comparison(filters, repeats: int) -> list[dict]:
    cases = [c for c in cpu_cases() if matches(filters, c[0], c[1])]
    rows = []
    for i, (family, op, case, make, ours, theirs) in enumerate(cases):
        progress(i, len(cases), f"{family}/{op}")
        inputs = make()
        row = {"family": family, "op": op, "case": case, "device": "cpu", "dtype": "float32"}
        try:
            with scratchops.use_backend("reference"):
                for p, wrap in (("fwd", lambda f: (lambda: f(*inputs))), ("fwd+bwd", lambda f: _fwd_bwd(f, inputs))):
                    row[f"reference_{p}_ms"] = _median_ms(wrap(ours), repeats)
                    row[f"torch_{p}_ms"] = _median_ms(wrap(theirs), repeats)
        except NotImplementedError as e:
            row["error"] = f"not written yet ({e})"
        except Exception as e:  # one failing op is reported, the others still run
            row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
        rows.append(row)
    progress(len(cases), len(cases), "done")
    return rows


def cpu_markdown(rows) -> str:
    lines = ["## CPU reference comparison", "",
             f"scratchops reference backend (plain torch formulas) vs torch on CPU, float32, median of repeats; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads. Not a kernel measurement.", "",
             "| family | op | case | reference fwd ms | torch fwd ms | reference fwd+bwd ms | torch fwd+bwd ms | "
             "fwd+bwd ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            cells = [r["error"], "", "", "", ""]
        else:
            cells = [f"{r['reference_fwd_ms']:.3f}", f"{r['torch_fwd_ms']:.3f}", f"{r['reference_fwd+bwd_ms']:.3f}",
                     f"{r['torch_fwd+bwd_ms']:.3f}", f"{r['reference_fwd+bwd_ms'] / r['torch_fwd+bwd_ms']:.2f}x"]
        lines.append("| " + " | ".join([r["family"], r["op"], r["case"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(path: str, title: str, labels, series: dict, ylabel: str, log: bool = True) -> bool:
    """Grouped bars: one group per label, one bar per series (name -> values, None for missing).

    The value axis is logarithmic by default: ops that differ by orders of magnitude stay readable."""
    plt = _pyplot()
    if plt is None or not labels:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        xs = [i + k * width for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=ylabel + (" (log scale)" if log else ""), title=title)
    if log:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run_cpu(args) -> int:
    print("no CUDA GPU found: kernel timings need one. Running the CPU reference comparison only "
          "(scratchops' reference formulas vs torch on CPU, small shapes; this says nothing about the kernels).")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # one thread by default: steadier numbers on a shared machine
    try:
        rows = cpu_comparison(args.ops, repeats=3 if args.quick else 10)
        md = cpu_markdown(rows)
    finally:
        torch.set_num_threads(threads)
    print(md)
    broken = [r["op"] for r in rows if "error" in r and not r["error"].startswith("not written")]
    stem = os.path.join(args.out, CPU_STEM)
    previous = load_results(stem + ".json").get("rows", [])
    if previous and args.ops:  # a partial run replaces its rows and keeps the others
        rows = merge_rows(previous, rows, key=("family", "op", "case"))
    with open(stem + ".json", "w") as f:
        json.dump({"kind": "cpu-reference", "torch": torch.__version__, "threads": args.threads,
                   "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(cpu_markdown(rows))
    done = [r for r in rows if "error" not in r]
    labels = [r["op"] for r in done]
    series = {"scratchops reference": [r["reference_fwd+bwd_ms"] for r in done],
              "torch": [r["torch_fwd+bwd_ms"] for r in done]}
    if not args.no_plot and plot_bars(stem + ".png", "CPU, float32, forward+backward (reference backend, not kernels)",
                                      labels, series, "median ms"):
        print(f"wrote {stem}.png")
    print(f"wrote {stem}.json and {stem}.md")
    if broken:
        print(f"failed: {', '.join(broken)}")
    return 1 if broken else 0


def scripts(filters) -> dict:
    found = {}
    if os.path.isdir(SCRIPTS):
        for name in sorted(os.listdir(SCRIPTS)):
            # the scripts built on the harness (they take --out and --quick); others have their own command line
            if (name.startswith("bench_") and name.endswith(".py")
                    and "benchmarks.harness" in open(os.path.join(SCRIPTS, name)).read()):
                found[name[len("bench_"):-len(".py")]] = os.path.join(SCRIPTS, name)
    ops = {**FAMILY_OF, **{c[1]: c[0] for c in cpu_cases()}}
    wanted = {ops.get(f, f) for f in filters} if filters else set(found)
    return {family: path for family, path in found.items() if family in wanted}


def run_script(family: str, args) -> int:
    """``python -m benchmarks.bench_<family>`` in its own process, from the repository root (the package never
    imports the benchmarks folder: it is not installed)."""
    cmd = [sys.executable, "-m", f"benchmarks.bench_{family}", "--out", os.path.abspath(args.out)]
    return subprocess.run(cmd + (["--quick"] if args.quick else []), cwd=REPO).returncode


def run_gpu(args) -> int:
    if not os.path.isdir(SCRIPTS):
        print(f"the benchmark scripts are not here ({SCRIPTS} is absent): they live in the repository's "
              "benchmarks/ folder, not in the installed package. Clone the repository and run "
              "`scratchops bench` (or `make bench`) from the checkout.")
        return 2
    selected = scripts(args.ops)
    if not selected:
        print(f"no benchmark script matches {args.ops}", file=sys.stderr)
        return 2
    failed = []
    for i, family in enumerate(selected):
        progress(i, len(selected), f"bench_{family}")
        if run_script(family, args):  # one broken script is reported, the others still run
            failed.append(family)
    progress(len(selected), len(selected), "done")
    stem = os.path.join(args.out, gpu_slug(torch.cuda.get_device_name()))
    if os.path.exists(stem + ".json"):
        data = load_results(stem + ".json")
        print(to_markdown(data))
        if not args.no_plot:
            for family, entry in data["families"].items():
                if family in selected:
                    plot_family(stem, family, entry)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def plot_family(stem: str, family: str, entry: dict) -> None:
    rows = [r for r in entry["rows"] if r.get("pass") == "fwd+bwd" and "ms" in r]
    labels = sorted({(r["op"], r["case"], r["dtype"]) for r in rows})
    impls = sorted({r["impl"] for r in rows})
    ms = {(r["op"], r["case"], r["dtype"], r["impl"]): r["ms"] for r in rows}
    series = {impl: [ms.get((*label, impl)) for label in labels] for impl in impls}
    path = f"{stem}-{family}.png"
    if plot_bars(path, f"{family}: forward+backward, {entry['environment']['gpu']}",
                 [" ".join(label) for label in labels], series, "median ms"):
        print(f"wrote {path}")


DESCRIPTION = ("Benchmark the Triton kernels against torch eager and torch.compile on a CUDA GPU (the scripts in the "
               "repository's benchmarks/ folder). Without a GPU: a CPU comparison of scratchops' reference formulas "
               "with torch's CPU ops, which says nothing about the kernels.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scratchops bench", description=DESCRIPTION)
    p.add_argument("--ops", nargs="+", metavar="NAME", help="families (bench_<family>.py) or op names; default all")
    p.add_argument("--quick", action="store_true", help="a small subset of the cases")
    p.add_argument("--out", help="results folder, created if missing (default: benchmarks/results on a GPU, "
                                 "bench_results on a CPU)")
    p.add_argument("--no-plot", action="store_true", help="draw no PNG")
    p.add_argument("--cpu", action="store_true", help="run the CPU reference comparison even with a GPU")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the CPU comparison (default: 1)")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.ops is not None:
        args.ops = [name.strip() for item in args.ops for name in item.split(",") if name.strip()]
        if not args.ops:
            print("scratchops bench: --ops names no op (give family or op names, or leave --ops out for all)",
                  file=sys.stderr)
            return 2
    args.ops = args.ops or []
    known = {c[0] for c in cpu_cases()} | {c[1] for c in cpu_cases()} | set(scripts(None)) | set(FAMILY_OF)
    unknown = [name for name in args.ops if name not in known]
    if unknown:
        print(f"scratchops bench: unknown family or op {', '.join(unknown)}; known: {', '.join(sorted(known))}",
              file=sys.stderr)
        return 2
    gpu = torch.cuda.is_available() and not args.cpu
    args.out = args.out or (os.path.join(SCRIPTS, "results") if gpu else "bench_results")
    try:  # before any work: a results folder that cannot be made is a usage error, not a traceback at the end
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        print(f"scratchops bench: cannot create the results folder {args.out!r}: {e.strerror}", file=sys.stderr)
        return 2
    return run_gpu(args) if gpu else run_cpu(args)


if __name__ == "__main__":
    sys.exit(main())
