"""linear: TFLOP/s of forward and forward+backward vs cuBLAS (torch eager) and torch.compile.

Cases: square M = N = K in 256..8192 and the M = 8192 LLM shapes (N x K = 4096 x 4096,
11008 x 4096, 4096 x 11008), in bf16 and in fp32 with TF32 allowed; then linear+relu
fused (one scratchops kernel) against torch's linear followed by relu, eager and compiled.
Forward is 2MNK flops, backward 4MNK (dX and dW). Each row's % roof is against the
harness's cuBLAS bf16 8192³; "% of cuBLAS" lines compare with torch on the same shape.
Each case prints which kernels it runs: on sm_90 the TMA + persistent ones (``_gemm.tma_descriptors``).
    python -m benchmarks.bench_linear [--quick]
"""

import torch
import torch.nn.functional as TF

import scratchops.functional as SF
from benchmarks.harness import Bench
from scratchops._kernels._gemm import dtype_class, tma_descriptors
from scratchops._kernels.linear import _fwd_tma

SQUARE = (256, 512, 1024, 2048, 4096, 8192)
LLM = ((8192, 4096, 4096), (8192, 11008, 4096), (8192, 4096, 11008))  # (M, N, K)
QUICK_CASES = ((1024, 1024, 1024), (4096, 4096, 4096), (8192, 11008, 4096))
DTYPES = (("bfloat16", torch.bfloat16, False), ("tf32", torch.float32, True))
PASSES = ("fwd", "fwd+bwd")
MEMORY_CASE = (4096, 4096, 4096)


def _inputs(m, n, k, dtype):
    x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5).requires_grad_()
    b = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
    return x, w, b


def _pct_of_torch(bench, start, op, case, label):
    """Print scratchops' TFLOP/s as a % of torch's (cuBLAS) for each pass of the rows added since ``start``."""
    rows = [r for r in bench.rows[start:] if r["op"] == op and r["case"] == case and "tflops" in r]
    for p in PASSES:
        ours = [r["tflops"] for r in rows if r["pass"] == p and r["impl"].startswith("scratchops")]
        theirs = [r["tflops"] for r in rows if r["pass"] == p and r["impl"] == "torch"]
        if ours and theirs:
            print(f"  {op} {case} {label} {p}: scratchops at {100 * ours[0] / theirs[0]:.1f}% of cuBLAS (torch eager)")


def main(argv=None):
    bench = Bench("linear", argv)
    if not bench.gpu:
        return 0
    cases = QUICK_CASES if bench.quick else tuple((s, s, s) for s in SQUARE) + LLM
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    try:
        for label, dtype, tf32 in DTYPES:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for m, n, k in cases:
                case = f"M={m} N={n} K={k}"
                x, w, b = _inputs(m, n, k, dtype)
                y = x.new_empty(m, n)
                tma = tma_descriptors(_fwd_tma.block_shapes, dtype_class(dtype, tf32), x, w, y) is not None
                path = "TMA + persistent" if tma else "pointer"
                print(f"  linear {case} {label}: {path} kernels")
                flops = {"fwd": 2 * m * n * k, "bwd": 4 * m * n * k}
                start = len(bench.rows)
                bench.compare(op="linear", case=case, dtype=label, inputs=[x, w, b], flops=flops, passes=PASSES,
                              impls={"scratchops": lambda: SF.linear(x, w, b), "torch": lambda: TF.linear(x, w, b)})
                _pct_of_torch(bench, start, "linear", case, label)
                start = len(bench.rows)
                bench.compare(op="linear+relu", case=case, dtype=label, inputs=[x, w, b], flops=flops, passes=PASSES,
                              impls={"scratchops fused": lambda: SF.linear(x, w, b, activation="relu"),
                                     "torch": lambda: TF.relu(TF.linear(x, w, b))}, compile_torch=True)
                _pct_of_torch(bench, start, "linear+relu", case, label)
                if (m, n, k) == MEMORY_CASE:
                    bench.memory("linear+relu", case, label, inputs=[x, w, b],
                                 impls={"scratchops fused": lambda: SF.linear(x, w, b, activation="relu"),
                                        "torch": lambda: TF.relu(TF.linear(x, w, b))})
                del x, w, b
                torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
    bench.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
