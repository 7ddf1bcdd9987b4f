"""cross_entropy and mse_loss: time, GB/s and memory vs torch eager and torch.compile.

cross_entropy: B·T = 16384 rows, V in 32000, 50257, 128256, 131072, 256000, logits
in bf16 and fp32, mean reduction over class-index targets. Forward reads the logits
(twice: the lse sweep, then the gradient sweep) and writes the gradient; backward
reads the gradient and writes dlogits. Also peak memory and bytes saved for
backward per implementation (the goal: no more than the logits plus their gradient).
mse_loss: GB/s of forward (reads x and y) and backward (reads x, y, writes dx, dy).

    python benchmarks/bench_losses.py [--quick]
"""
import os
import sys

import torch
import torch.nn.functional as TF

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import scratchops.functional as SF  # noqa: E402
from benchmarks.harness import Bench  # noqa: E402

ROWS = 16384
VOCABS = (32000, 50257, 128256, 131072, 256000)
QUICK_VOCABS = (32000, 131072)
DTYPES = (torch.bfloat16, torch.float32)
MSE_LOG2_SIZES = (20, 24, 28)
QUICK_MSE_LOG2_SIZES = (24,)


def bench_cross_entropy(bench, vocab, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(ROWS, vocab, device="cuda", dtype=dtype, generator=gen).requires_grad_(True)
    t = torch.randint(0, vocab, (ROWS,), device="cuda", generator=gen)
    size = x.numel() * x.element_size()
    case = f"BT={ROWS} V={vocab}"
    impls = {"scratchops": lambda: SF.cross_entropy(x, t), "torch": lambda: TF.cross_entropy(x, t)}
    # forward: 2 reads of the logits + 1 write of the gradient; backward: 1 read + 1 write
    bench.compare(op="cross_entropy", case=case, dtype=dtype, impls=impls, inputs=[x],
                  bytes={"fwd": 3 * size, "bwd": 2 * size}, compile_torch=True)
    bench.memory(op="cross_entropy", case=case, dtype=dtype, impls=impls, inputs=[x])
    print(f"  (logits {size / 2**20:.1f} MiB; logits + gradient = {2 * size / 2**20:.1f} MiB)", flush=True)
    del x, t
    torch.cuda.empty_cache()


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
    bench = Bench("losses", argv)
    if not bench.gpu:
        return 0
    for vocab in QUICK_VOCABS if bench.quick else VOCABS:
        for dtype in DTYPES:
            bench_cross_entropy(bench, vocab, dtype)
    for log2n in QUICK_MSE_LOG2_SIZES if bench.quick else MSE_LOG2_SIZES:
        for dtype in DTYPES:
            bench_mse(bench, log2n, dtype)
    bench.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
