"""softmax, log_softmax over the last dim of (M, N): GB/s of forward, backward and both, vs torch eager and
torch.compile, as a percentage of the copy roof measured in the same run.

Forward moves 2·M·N elements (read x, write y), backward 3·M·N (read y and dy, write dx): the bytes a
perfect kernel must move. Rows up to 65536 columns (fp32 and 16-bit) take the single-block kernels, which
read each operand once: on sm_90 with Triton >= 3.9 a row above 32768 columns (forward) or 16384 (backward)
is spread over a thread-block cluster of 2 or 4 CTAs; without clusters (Triton 3.6/3.7, or before sm_90) one
CTA holds up to 32768 columns and softmax's backward above 16384 reads dY twice. Longer rows take the looped
online kernels, which read the row twice (the second read mostly from L2 while rows are short enough to
stay there). The GPU, Triton version and plan decide which: read them beside the figures.
    python -m benchmarks.bench_softmax [--quick]
"""

import torch
import torch.nn.functional as TF

import scratchops.functional as SF
from benchmarks.harness import Bench

M = 4096
LOG2_N = range(8, 19)  # N = 256 ... 262144
QUICK_LOG2_N = (10, 14, 18)
OPS = {"softmax": (SF.softmax, TF.softmax), "log_softmax": (SF.log_softmax, TF.log_softmax)}
QUICK_OPS = ("softmax",)
MEMORY_LOG2_N = 14  # one size where peak memory and saved bytes are recorded


def main(argv=None):
    bench = Bench("softmax", argv)
    if not bench.gpu:
        return 0
    for log2n in QUICK_LOG2_N if bench.quick else LOG2_N:
        n = 1 << log2n
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(M, n, device="cuda", dtype=dtype, requires_grad=True)
            size = x.element_size() * M * n
            for name in QUICK_OPS if bench.quick else OPS:
                ours, theirs = OPS[name]
                impls = {"scratchops": lambda: ours(x, -1), "torch": lambda: theirs(x, -1)}
                case = f"M={M} N={n}"
                bench.compare(op=name, case=case, dtype=dtype, impls=impls, inputs=[x],
                              bytes={"fwd": 2 * size, "bwd": 3 * size}, compile_torch=True)
                if log2n == MEMORY_LOG2_N:
                    bench.memory(name, case, dtype, impls, [x])
            del x
            torch.cuda.empty_cache()
    bench.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
