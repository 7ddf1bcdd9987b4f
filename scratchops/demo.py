"""``scratchops demo``: a small CNN trained on real data twice, with scratchops and with torch.nn.

The data set is scikit-learn's 8×8 handwritten digits (1797 images, 10 classes),
which ships inside the scikit-learn package: nothing is downloaded. The CNN
(conv2d, relu, dropout, linear, cross-entropy, an L2 penalty on the weights and
SGD with momentum) is built once with ``torch.nn``; a deep copy converted with
``scratchops.convert`` is trained by scratchops ops (``scratchops.functional.l2_penalty``,
``scratchops.optim.SGD``), the original by torch's. Both start from the same
weights and see the same batches in the same order; dropout masks differ (each
library draws its own), so the curves agree closely but not exactly unless
``--dropout 0``.

On a CPU the scratchops side runs the reference backend unless ``--backend triton``
is given (Triton's interpreter is far too slow to train with); the backend that
actually ran is printed, counted from the backend-op calls.

Needs scikit-learn and matplotlib (the ``demo`` extra: ``pip install "scratchops[demo]"``).
``--min-accuracy`` makes the exit status 1 below a test accuracy (``make demo``
asks for 0.95); without it the run reports and exits 0.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

import scratchops
import scratchops.functional as SF
import scratchops.nn as SN
from scratchops._backend import LAUNCHES

CLASSES = 10
PIXEL_MAX = 16.0  # the digits' pixels are integers 0..16
TEST_FRACTION = 0.2
DEFAULTS = {"epochs": 12, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "dropout": 0.25,
            "seed": 0}


def load_data(seed: int = 0, train_size: int | None = None, device="cpu"):
    """(x_train, y_train, x_test, y_test): images as (N, 1, 8, 8) float32 in [0, 1], a fixed random split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("scratchops demo needs scikit-learn (and matplotlib for the plot): "
                         "pip install scikit-learn matplotlib") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / PIXEL_MAX
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    if train_size is not None:
        train = train[:train_size]
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


def build_cnn(dropout: float = DEFAULTS["dropout"], seed: int = 0) -> torch.nn.Sequential:
    """The demo's CNN in torch.nn, initialised from ``seed``: 8×8 → 16×8×8 → 32×4×4 → 64 → 10."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Dropout(dropout),
        torch.nn.Linear(32 * 4 * 4, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, CLASSES))


def weights_of(model: torch.nn.Module) -> list:
    """The tensors the L2 penalty applies to: every weight, no bias."""
    return [p for name, p in model.named_parameters() if name.endswith("weight")]


def sides(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float) -> dict:
    """The two trainings, name -> (model, loss module, penalty function, optimizer); scratchops trains a copy."""
    ours = scratchops.convert(copy.deepcopy(model))
    return {
        "torch": (model, torch.nn.CrossEntropyLoss(),
                  lambda ws: weight_decay * sum(w.pow(2).sum() for w in ws),
                  torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)),
        "scratchops": (ours, SN.CrossEntropyLoss(), lambda ws: SF.l2_penalty(ws, weight_decay=weight_decay),
                       scratchops.optim.SGD(ours.parameters(), lr=lr, momentum=momentum)),
    }


def train(model, loss_fn, penalty, optimizer, x, y, *, epochs: int, batch_size: int, seed: int, forward=None):
    """Minibatch training; returns the loss of every step (cross-entropy + penalty).

    The batch order depends on ``seed`` and the epoch only, so both sides see the
    same batches; ``forward`` (default: ``model``) may be a compiled module.
    """
    forward = forward or model
    torch.manual_seed(seed)  # dropout draws from torch's generator
    model.train()
    weights = weights_of(model)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).to(y.device)
        for start in range(0, len(y), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(forward(x[batch]), y[batch]) + penalty(weights)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def epoch_means(losses, steps_per_epoch):
    return [sum(losses[i:i + steps_per_epoch]) / len(losses[i:i + steps_per_epoch])
            for i in range(0, len(losses), steps_per_epoch)]


def run(epochs=DEFAULTS["epochs"], batch_size=DEFAULTS["batch_size"], lr=DEFAULTS["lr"],
        momentum=DEFAULTS["momentum"], weight_decay=DEFAULTS["weight_decay"], dropout=DEFAULTS["dropout"],
        seed=DEFAULTS["seed"], train_size=None, backend=None, device=None, verbose=True) -> dict:
    """Train both sides; return {"torch"|"scratchops": {"losses", "epoch_losses", "accuracy", "seconds"}, ...}."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device == "cpu":  # batches this small run faster on one thread than on several (less synchronisation)
        torch.set_num_threads(1)
    try:
        return _run(epochs, batch_size, lr, momentum, weight_decay, dropout, seed, train_size, backend, device,
                    print if verbose else (lambda *a, **k: None))
    finally:
        torch.set_num_threads(threads)


def _run(epochs, batch_size, lr, momentum, weight_decay, dropout, seed, train_size, backend, device, say) -> dict:
    backend = backend or ("auto" if device == "cuda" else "reference")
    x, y, x_test, y_test = load_data(seed, train_size, device)
    say(f"digits: {len(y)} training and {len(y_test)} test images of 8x8 pixels, 10 classes; device {device}")
    model = build_cnn(dropout, seed).to(device)
    steps_per_epoch = -(-len(y) // batch_size)
    result = {"device": device, "train_size": len(y), "test_size": len(y_test), "steps_per_epoch": steps_per_epoch}
    for name, (net, loss_fn, penalty, optimizer) in sides(model, lr, momentum, weight_decay).items():
        before = LAUNCHES.copy()
        start = time.perf_counter()
        with scratchops.use_backend(backend if name == "scratchops" else "auto"):
            losses = train(net, loss_fn, penalty, optimizer, x, y, epochs=epochs, batch_size=batch_size, seed=seed)
            acc = accuracy(net, x_test, y_test)
        seconds = time.perf_counter() - start
        result[name] = {"losses": losses, "epoch_losses": epoch_means(losses, steps_per_epoch), "accuracy": acc,
                        "seconds": seconds}
        if name == "scratchops":
            ran = LAUNCHES - before
            result["backends"] = sorted({b for (_, b) in ran})
            result["ops"] = sorted({op for (op, _) in ran})
        say(f"trained {name:10s} {epochs} epochs in {seconds:6.1f} s, test accuracy {acc:.2%}")
    say(f"scratchops ops ran on backend(s): {', '.join(result['backends']) or 'none'} "
        f"({', '.join(result['ops'])})")
    say(f"\n{'epoch':>5s} {'torch loss':>11s} {'scratchops loss':>16s} {'|diff|':>9s}")
    for i, (a, b) in enumerate(zip(result["torch"]["epoch_losses"], result["scratchops"]["epoch_losses"])):
        say(f"{i + 1:5d} {a:11.4f} {b:16.4f} {abs(a - b):9.2e}")
    say(f"\ntest accuracy: torch {result['torch']['accuracy']:.2%}, scratchops {result['scratchops']['accuracy']:.2%}")
    return result


def plot(result: dict, path: str) -> None:
    """Both loss curves (every step, and the epoch means) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style, color in (("torch", "-", "tab:blue"), ("scratchops", "--", "tab:orange")):
        ax.plot(result[name]["losses"], style, color=color, alpha=0.35, linewidth=0.8)
        means = result[name]["epoch_losses"]
        ax.plot([(i + 0.5) * result["steps_per_epoch"] for i in range(len(means))], means, style + "o", color=color,
                label=f"{name}: epoch means, test accuracy {result[name]['accuracy']:.1%}")
    ax.set(xlabel="step", ylabel="loss (cross-entropy + L2)", yscale="log",
           title=f"digits CNN: scratchops vs torch.nn ({result['device']}, scratchops backend "
                 f"{'/'.join(result['backends'])})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


DESCRIPTION = ("Train a small CNN on scikit-learn's 8x8 digits twice from the same weights, with scratchops and with "
               "torch.nn, and print both loss curves and test accuracies.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scratchops demo", description=DESCRIPTION)
    for name, value in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help="default: %(default)s")
    p.add_argument("--train-size", type=int, help="train on the first N training images only")
    p.add_argument("--backend", choices=("auto", "reference", "triton"),
                   help="scratchops backend (default: auto on CUDA, reference on CPU)")
    p.add_argument("--out", default="demo_loss.png", help="PNG of the loss curves (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--min-accuracy", type=float, default=None,
                   help="exit 1 when scratchops' test accuracy is below this fraction (default: no floor; "
                        "make demo asks for 0.95)")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return int(e.code or 0)
    folder = os.path.dirname(os.path.abspath(args.out))
    if not args.no_plot and not os.path.isdir(folder):  # before training, not a traceback after it
        print(f"scratchops demo: --out {args.out}: the folder {folder} does not exist", file=sys.stderr)
        return 2
    if args.backend == "triton" and not torch.cuda.is_available():
        print("note: --backend triton on CPU runs every kernel in Triton's interpreter: expect a long run")
    result = run(**{k: getattr(args, k) for k in (*DEFAULTS, "train_size", "backend")})
    if not args.no_plot:
        try:
            plot(result, args.out)
            print(f"wrote {args.out}")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)")
    if args.min_accuracy is not None and result["scratchops"]["accuracy"] < args.min_accuracy:
        print(f"FAIL: scratchops test accuracy {result['scratchops']['accuracy']:.2%} < {args.min_accuracy:.0%}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
