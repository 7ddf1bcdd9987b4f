"""conv2d on the ResNet-50 layers: scratchops' implicit-GEMM Triton kernels vs cuDNN.

Batch 32, bf16 channels_last and fp32 NCHW (both sides follow
torch.backends.cudnn.allow_tf32, left at torch's default: tf32), cudnn.benchmark on. Three passes per layer, each timed alone:

* forward:  scratchops.functional.conv2d vs torch.nn.functional.conv2d;
* dgrad:    the Triton launcher scratchops._kernels.conv2d_bwd.conv2d_bwd_input vs
            torch.ops.aten.convolution_backward(output_mask=[True, False, False]);
* wgrad:    scratchops._kernels.conv2d_bwd.conv2d_bwd_weight vs convolution_backward([False, True, False]).

Each does 2·N·K·P·Q·C·R·S flops. Rows carry TFLOP/s and % of the bf16 cuBLAS roof
(harness); the scratchops rows also get ``pct_cudnn`` (cuDNN time / ours), and a
geomean per pass and dtype is printed (the goal: ≥ 80% for bf16 channels_last).
    python -m benchmarks.bench_conv2d [--quick]
"""
import math

import torch

from benchmarks.harness import Bench

BATCH = 32
# name: (C, K, H=W, R=S, stride, padding)
LAYERS = {
    "conv1 7x7/2 3->64 @224": (3, 64, 224, 7, 2, 3),
    "1x1 64->256 @56": (64, 256, 56, 1, 1, 0),
    "1x1 256->64 @56": (256, 64, 56, 1, 1, 0),
    "3x3 64 @56": (64, 64, 56, 3, 1, 1),
    "3x3 128 @28": (128, 128, 28, 3, 1, 1),
    "3x3 256 @14": (256, 256, 14, 3, 1, 1),
    "3x3 512 @7": (512, 512, 7, 3, 1, 1),
    "1x1 512->2048 @7": (512, 2048, 7, 1, 1, 0),
}
QUICK_LAYERS = ["conv1 7x7/2 3->64 @224", "3x3 64 @56", "1x1 512->2048 @7"]
DTYPES = [(torch.bfloat16, True), (torch.float32, False)]  # (dtype, channels_last)
QUICK_DTYPES = DTYPES[:1]
PASSES = ("forward", "dgrad", "wgrad")


def layer_tensors(C, K, H, R, stride, padding, dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(BATCH, C, H, H, device="cuda", dtype=dtype).to(memory_format=fmt)
    w = (torch.randn(K, C, R, R, device="cuda", dtype=dtype) / math.sqrt(C * R * R)).to(memory_format=fmt)
    P = (H + 2 * padding - R) // stride + 1
    dy = torch.randn(BATCH, K, P, P, device="cuda", dtype=dtype).to(memory_format=fmt)
    return x, w, dy, P


def impls_for(pass_name, x, w, dy, stride, padding, channels_last):
    import torch.nn.functional as TF

    import scratchops.functional as SF
    import scratchops._kernels.conv2d_bwd as KB

    s, pads, d = [stride, stride], [padding] * 4, [1, 1]
    aten_args = (dy, x, w, None, s, [padding, padding], d, False, [0, 0], 1)
    if pass_name == "forward":
        return {"scratchops": lambda: SF.conv2d(x, w, None, stride, padding),
                "torch": lambda: TF.conv2d(x, w, None, stride, padding)}
    if pass_name == "dgrad":
        return {"scratchops": lambda: KB.conv2d_bwd_input(dy, w, list(x.shape), s, pads, d, 1, channels_last),
                "torch": lambda: torch.ops.aten.convolution_backward(*aten_args, [True, False, False])[0]}
    return {"scratchops": lambda: KB.conv2d_bwd_weight(dy, x, list(w.shape), s, pads, d, 1, channels_last),
            "torch": lambda: torch.ops.aten.convolution_backward(*aten_args, [False, True, False])[1]}


def add_pct_cudnn(rows):
    """pct_cudnn = cuDNN's time / ours, on each scratchops row; returns {(op, dtype): [pcts]}."""
    torch_ms = {(r["op"], r["case"], r["dtype"]): r["ms"] for r in rows if r["impl"] == "torch" and "ms" in r}
    pcts = {}
    for r in rows:
        key = (r["op"], r["case"], r["dtype"])
        if r["impl"] == "scratchops" and "ms" in r and key in torch_ms:
            r["pct_cudnn"] = 100 * torch_ms[key] / r["ms"]
            pcts.setdefault((r["op"], r["dtype"]), []).append(r["pct_cudnn"])
    return pcts


def main(argv=None):
    bench = Bench("conv2d", argv)
    if not bench.gpu:
        return 0
    torch.backends.cudnn.benchmark = True
    for name in QUICK_LAYERS if bench.quick else LAYERS:
        C, K, H, R, stride, padding = LAYERS[name]
        for dtype, channels_last in QUICK_DTYPES if bench.quick else DTYPES:
            x, w, dy, P = layer_tensors(C, K, H, R, stride, padding, dtype, channels_last)
            flops = 2 * BATCH * K * P * P * C * R * R
            case = name + (" NHWC" if channels_last else " NCHW")
            for pass_name in PASSES:
                with torch.no_grad():
                    bench.compare(op=f"conv2d {pass_name}", case=case, dtype=dtype,
                                  impls=impls_for(pass_name, x, w, dy, stride, padding, channels_last),
                                  flops={"fwd": flops}, passes=("fwd",))
    print("\n% of cuDNN (geomean over the layers):")
    for (op, dtype), values in sorted(add_pct_cudnn(bench.rows).items()):
        geomean = math.exp(sum(math.log(v) for v in values) / len(values))
        print(f"  {op:18s} {dtype:9s} {geomean:6.1f}%  ({len(values)} layers)")
    bench.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
