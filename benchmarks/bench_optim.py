"""SGD step time: scratchops.optim.SGD vs torch.optim.SGD(foreach=True) and (fused=True).

Momentum 0.9 and weight decay 1e-4, so a step reads w, g and b and writes w and b:
5 elements moved per parameter. The parameters (10^6..10^8 in all) are spread
over many tensors of uneven sizes, as in a model. Rows are the "fwd" pass of the
harness: one optimizer step (steady state: momentum buffers exist).
    python -m benchmarks.bench_optim [--quick]
"""

import torch

from benchmarks.harness import Bench
from scratchops.optim import SGD

OPTIONS = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}
ELEMENTS_MOVED = 5  # read w, g, b; write w, b
SIZE_PATTERN = 7  # tensor i gets a share proportional to (i % SIZE_PATTERN) + 1
CASES = [(10**6, 100), (10**6, 1000), (10**7, 100), (10**7, 1000), (10**8, 100), (10**8, 1000)]
QUICK_CASES = [(10**6, 100), (10**7, 1000)]
DTYPES = (torch.float32, torch.bfloat16)
QUICK_DTYPES = (torch.float32,)


def tensor_sizes(total: int, n_tensors: int) -> list[int]:
    """``n_tensors`` uneven sizes summing to ``total``."""
    weights = [(i % SIZE_PATTERN) + 1 for i in range(n_tensors)]
    sizes = [total * w // sum(weights) for w in weights]
    sizes[-1] += total - sum(sizes)
    return sizes


def make_params(sizes, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for n in sizes:
        p = torch.randn(n, device="cuda", dtype=dtype, generator=g).requires_grad_()
        p.grad = torch.randn(n, device="cuda", dtype=dtype, generator=g)
        params.append(p)
    return params


def main(argv=None):
    bench = Bench("optim", argv)
    if not bench.gpu:
        return 0
    for total, n_tensors in QUICK_CASES if bench.quick else CASES:
        sizes = tensor_sizes(total, n_tensors)
        for dtype in QUICK_DTYPES if bench.quick else DTYPES:
            optimizers = {"scratchops": lambda p: SGD(p, **OPTIONS),
                          "torch foreach": lambda p: torch.optim.SGD(p, foreach=True, **OPTIONS),
                          "torch fused": lambda p: torch.optim.SGD(p, fused=True, **OPTIONS)}
            impls = {}
            for name, build in optimizers.items():
                opt = build(make_params(sizes, dtype))
                opt.step()  # creates the momentum buffers: time the steady state
                impls[name] = opt.step
            element = torch.empty((), dtype=dtype).element_size()
            bench.compare(op="sgd_step", case=f"n=1e{len(str(total)) - 1} in {n_tensors} tensors", dtype=dtype,
                          impls=impls, bytes={"fwd": ELEMENTS_MOVED * element * total}, passes=("fwd",))
            del impls, optimizers
            torch.cuda.empty_cache()
    bench.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
