"""The demo: scratchops and torch.nn train the digits CNN to the same curve; the converted CNN compiles fullgraph."""
import os

import pytest
import torch

import scratchops
import scratchops.nn as SN
from tests.helpers import DEVICE, REPO, expect_ops

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (the demo extra)")
from scratchops import demo  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def test_short_demo_matches_torch(tmp_path, monkeypatch, capsys):
    runs = []
    real_run = demo.run
    monkeypatch.setattr(demo, "run", lambda **kw: runs.append(real_run(**kw)) or runs[-1])
    out = tmp_path / "curves.png"
    # dropout off: the two libraries draw different dropout masks, everything else must agree
    status = demo.main(["--epochs", "3", "--train-size", "480", "--batch-size", "16", "--dropout", "0",
                        "--out", str(out), "--min-accuracy", "0.8"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    (result,) = runs
    ours, theirs = result["scratchops"], result["torch"]
    assert len(ours["losses"]) == 3 * 30
    torch.testing.assert_close(ours["losses"], theirs["losses"], rtol=1e-4, atol=1e-5)
    assert ours["losses"][-1] < 0.5 * ours["losses"][0], "the loss did not go down"
    assert ours["accuracy"] > 0.8 and abs(ours["accuracy"] - theirs["accuracy"]) <= 2 / result["test_size"]
    assert result["backends"] == (["triton"] if torch.cuda.is_available() else ["reference"])
    assert {"conv2d_fwd", "linear_fwd", "sgd_step"} <= set(result["ops"]), result["ops"]
    assert "test accuracy: torch" in printed and "torch loss" in printed
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_demo_fails_below_min_accuracy(capsys):
    assert demo.main(["--epochs", "1", "--train-size", "32", "--no-plot", "--min-accuracy", "0.99"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_demo_has_no_accuracy_floor_unless_asked(monkeypatch, capsys):
    """A short run reports its (low) accuracy and exits 0: the floor is for `make demo`, which asks for it."""
    runs = []
    real_run = demo.run
    monkeypatch.setattr(demo, "run", lambda **kw: runs.append(real_run(**kw)) or runs[-1])
    assert demo.main(["--epochs", "1", "--train-size", "32", "--no-plot"]) == 0
    assert runs[0]["scratchops"]["accuracy"] < 0.95 and "FAIL" not in capsys.readouterr().out
    with open(os.path.join(REPO, "Makefile")) as f:
        assert "scratchops demo --min-accuracy 0.95" in f.read()


def test_demo_checks_its_output_folder_before_training(monkeypatch, capsys):
    monkeypatch.setattr(demo, "run", lambda **kw: pytest.fail("trained before checking --out"))
    assert demo.main(["--out", "/no/such/folder/curves.png"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_converted_cnn_compiles_fullgraph_and_trains_like_eager():
    """The demo's CNN converted and wrapped in torch.compile(fullgraph=True): no graph break, eager's losses."""
    x, y, _, _ = demo.load_data(seed=0, train_size=64, device=DEVICE)
    # On a CPU the kernels would run in Triton's interpreter (about 25 s of CPU for these 4 steps): reference there.
    backend = "triton" if DEVICE == "cuda" else "reference"
    torch._dynamo.reset()
    losses = {}
    for mode in ("eager", "compiled"):
        model = scratchops.convert(demo.build_cnn(dropout=0.25, seed=0)).to(DEVICE)
        forward = torch.compile(model, fullgraph=True, backend="aot_eager") if mode == "compiled" else model
        optimizer = scratchops.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        with scratchops.use_backend(backend), expect_ops(["conv2d_fwd", "linear_bwd_weight", "dropout_fwd"], backend):
            losses[mode] = demo.train(model, SN.CrossEntropyLoss(),
                                      lambda ws: scratchops.functional.l2_penalty(ws, weight_decay=1e-4), optimizer,
                                      x, y, epochs=1, batch_size=16, seed=0, forward=forward)
    assert len(losses["compiled"]) == 4
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-5, atol=1e-6)
