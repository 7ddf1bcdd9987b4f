"""cross_entropy: time, GB/s and memory vs torch eager and torch.compile.

B·T = 16384 rows, V in 32000, 50257, 128256, 131072, 256000, logits in bf16 and fp32, mean
reduction over class-index targets. Forward reads the logits once (online log-sum-exp, per-row
statistics only); backward reads them once more and writes dlogits once. Also peak memory and
bytes saved for backward per implementation (the goal: no more than the logits plus their gradient).

    python -m benchmarks.bench_cross_entropy [--quick]
"""
import torch
import torch.nn.functional as TF

import scratchops.functional as SF
from benchmarks.harness import run_grid

ROWS = 16384
VOCABS = (32000, 50257, 128256, 131072, 256000)
QUICK_VOCABS = (32000, 131072)
DTYPES = (torch.bfloat16, torch.float32)


def bench_cross_entropy(bench, vocab, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(ROWS, vocab, device="cuda", dtype=dtype, generator=gen).requires_grad_(True)
    t = torch.randint(0, vocab, (ROWS,), device="cuda", generator=gen)
    size = x.numel() * x.element_size()
    case = f"BT={ROWS} V={vocab}"
    impls = {"scratchops": lambda: SF.cross_entropy(x, t), "torch": lambda: TF.cross_entropy(x, t)}
    # forward: 1 read of the logits; backward: 1 read + 1 write
    bench.compare(op="cross_entropy", case=case, dtype=dtype, impls=impls, inputs=[x],
                  bytes={"fwd": size, "bwd": 2 * size}, compile_torch=True)
    bench.memory(op="cross_entropy", case=case, dtype=dtype, impls=impls, inputs=[x])
    print(f"  (logits {size / 2**20:.1f} MiB; logits + gradient = {2 * size / 2**20:.1f} MiB)", flush=True)
    del x, t
    torch.cuda.empty_cache()


def main(argv=None):
    return run_grid("cross_entropy", argv, bench_cross_entropy, VOCABS, QUICK_VOCABS, DTYPES)


if __name__ == "__main__":
    raise SystemExit(main())
