"""sigmoid, relu, tanh: GB/s of forward, backward and both, vs torch eager and torch.compile.

Forward moves 2n elements (read x, write y), backward 3n (read y and dy, write dx).
    python -m benchmarks.bench_activations [--quick]
"""

import torch
import torch.nn.functional as TF

import scratchops.functional as SF
from benchmarks.harness import Bench, gpu_inputs

OPS = {"relu": (SF.relu, TF.relu), "sigmoid": (SF.sigmoid, torch.sigmoid), "tanh": (SF.tanh, torch.tanh)}
LOG2_SIZES = range(20, 29, 2)
QUICK_LOG2_SIZES = (20, 24)


def main(argv=None):
    bench = Bench("activations", argv)
    if not bench.gpu:
        return 0
    for log2n, dtype, x, size in gpu_inputs(QUICK_LOG2_SIZES if bench.quick else LOG2_SIZES, lambda n: (n,)):
        for name, (ours, theirs) in OPS.items():
            bench.compare(op=name, case=f"n=2^{log2n}", dtype=dtype,
                          impls={"scratchops": lambda: ours(x), "torch": lambda: theirs(x)}, inputs=[x],
                          bytes={"fwd": 2 * size, "bwd": 3 * size}, compile_torch=True)
    bench.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
