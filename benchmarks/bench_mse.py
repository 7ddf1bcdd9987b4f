"""mse_loss: GB/s of forward (reads x and y) and backward (reads x, y, writes dx, dy) vs torch.

    python -m benchmarks.bench_mse [--quick]
"""
import torch
import torch.nn.functional as TF

import scratchops.functional as SF
from benchmarks.harness import run_grid

LOG2_SIZES = (20, 24, 28)
QUICK_LOG2_SIZES = (24,)
DTYPES = (torch.bfloat16, torch.float32)


def bench_mse(bench, log2n, dtype):
    n = 1 << log2n
    x = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
    y = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
    size = n * x.element_size()
    bench.compare(op="mse_loss", case=f"n=2^{log2n}", dtype=dtype,
                  impls={"scratchops": lambda: SF.mse_loss(x, y), "torch": lambda: TF.mse_loss(x, y)},
                  inputs=[x, y], bytes={"fwd": 2 * size, "bwd": 4 * size}, compile_torch=True)
    del x, y


def main(argv=None):
    return run_grid("mse", argv, bench_mse, LOG2_SIZES, QUICK_LOG2_SIZES, DTYPES)


if __name__ == "__main__":
    raise SystemExit(main())
