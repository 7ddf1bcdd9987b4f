"""dropout and l2_penalty: GB/s vs torch eager and torch.compile, and bytes saved for backward.

dropout moves 2n elements forward (read x, write y) and 2n backward (read dy,
write dx): the useful traffic, counted the same for every implementation (torch
also reads its stored mask in backward; scratchops regenerates it from the seed).
l2_penalty reads every parameter once forward and reads w / writes dw backward,
over many tensors of model-like sizes (the torch formula launches per tensor).
    python -m benchmarks.bench_regularization [--quick]
(The SGD step benchmark is benchmarks/bench_optim.py.)
"""

import torch
import torch.nn.functional as TF

import scratchops.functional as SF
from benchmarks.harness import Bench

LOG2_SIZES = range(20, 29, 2)
QUICK_LOG2_SIZES = (20, 24)
PROBS = (0.1, 0.5)
QUICK_PROBS = (0.5,)
DTYPES = (torch.float32, torch.bfloat16)
WEIGHT_DECAY = 1e-4
# l2_penalty: (number of tensors, elements per tensor pattern) ~ a model's parameters, 10^6..10^8 in all
L2_CASES = [(100, 10_000), (200, 100_000), (400, 250_000)]
QUICK_L2_CASES = [(200, 100_000)]


def _l2_tensors(count, size, dtype):
    """``count`` tensors alternating matrices of ~``size`` elements and small bias vectors."""
    out = []
    for i in range(count):
        shape = (size // 256, 256) if i % 2 == 0 else (max(size // 1000, 1),)
        out.append(torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True))
    return out


def _torch_l2(tensors, weight_decay):
    return weight_decay * sum(w.pow(2).sum() for w in tensors)


def bench_dropout(bench):
    for log2n in QUICK_LOG2_SIZES if bench.quick else LOG2_SIZES:
        n = 1 << log2n
        for dtype in DTYPES:
            x = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
            size = x.element_size() * n
            for p in QUICK_PROBS if bench.quick else PROBS:
                impls = {"scratchops": lambda: SF.dropout(x, p), "torch": lambda: TF.dropout(x, p)}
                case = f"n=2^{log2n} p={p}"
                bench.compare(op="dropout", case=case, dtype=dtype, impls=impls, inputs=[x],
                              bytes={"fwd": 2 * size, "bwd": 2 * size}, compile_torch=True)
                bench.memory(op="dropout", case=case, dtype=dtype, impls=impls, inputs=[x])
            del x


def bench_l2_penalty(bench):
    for count, size in QUICK_L2_CASES if bench.quick else L2_CASES:
        for dtype in (torch.float32,):
            ws = _l2_tensors(count, size, dtype)
            total = sum(w.numel() * w.element_size() for w in ws)
            numel = sum(w.numel() for w in ws)
            case = f"{count} tensors, {numel / 1e6:.0f}M"
            impls = {"scratchops": lambda: SF.l2_penalty(ws, WEIGHT_DECAY),
                     "torch": lambda: _torch_l2(ws, WEIGHT_DECAY)}
            bench.compare(op="l2_penalty", case=case, dtype=dtype, impls=impls, inputs=ws,
                          bytes={"fwd": total, "bwd": 2 * total}, compile_torch=True)
            del ws


def main(argv=None):
    bench = Bench("regularization", argv)
    if not bench.gpu:
        return 0
    # one compiled torch impl per (size, dtype, p): allow more recompiles than dynamo's default 8
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    bench_dropout(bench)
    bench_l2_penalty(bench)
    bench.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
