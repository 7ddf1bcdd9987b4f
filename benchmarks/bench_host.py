"""Host overhead per op: scratchops' eager path against its torch.nn.functional twin (issue 11).

    python -m benchmarks.bench_host [--mode cpu|launch|gpu] [--reps N] [--ops relu linear ...] [--json PATH|-] [--tf32]

``cpu`` (the default without a GPU; issue 11's measure): CPU tensors, Triton in interpreter mode,
kernel executions stubbed out (the launchers' own work still runs). ``launch``: CPU tensors, the
kernels compiled for sm_90 and launched through Triton's real launch path down to a stand-in
driver (no GPU needed; the first run compiles). ``gpu`` (the default with one): real launches on
small shapes. Prints per op the median µs of each side and the ratio, for a training forward and
for forward+backward, and the SGD step against torch's fused one (see ``scratchops._hostbench``).
``--tf32`` sets ``torch.backends.cuda.matmul.allow_tf32`` (both sides): linear's fp32 GEMMs then launch their
autotuned "tf32" config lists, as conv2d's fp32 ones do by default (``cudnn.allow_tf32`` is True).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from scratchops import _hostbench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3000, help="interleaved repetitions (default: %(default)s)")
    parser.add_argument("--ops", nargs="*", default=list(_hostbench.OPS), choices=_hostbench.OPS)
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON ('-' for stdout)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)")
    parser.add_argument("--mode", choices=_hostbench.MODES, default=_hostbench.default_mode())
    parser.add_argument("--tf32", action="store_true", help="fp32 matmuls in TF32 (linear's autotuned configs)")
    args = parser.parse_args(argv)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.mode == "gpu" and not torch.cuda.is_available():
        parser.error("--mode gpu needs a CUDA device")
    _hostbench.prepare(args.mode)
    torch.set_num_threads(args.threads)
    rows = _hostbench.measure(tuple(args.ops), reps=args.reps, mode=args.mode)
    if args.json:
        import triton

        text = json.dumps({"mode": args.mode, "torch": torch.__version__, "triton": triton.__version__,
                           "threads": args.threads, "reps": args.reps, "tf32": args.tf32, "rows": rows}, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    if args.json != "-":
        where = {"cpu": "CPU tensors, interpreter, kernel executions stubbed",
                 "launch": "CPU tensors, sm_90 compiled kernels, Triton's launch path to a stand-in driver",
                 "gpu": f"{torch.cuda.get_device_name() if args.mode == 'gpu' else ''}, real launches"}[args.mode]
        print(f"host time per call, median of {args.reps} interleaved repetitions ({where}); "
              f"fwd = training forward, fwd+bwd adds autograd.grad; sgd_step vs torch fused=True")
        print(_hostbench.table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
