"""The benchmark harness: results files from synthetic rows, and every script's no-GPU exit."""
import glob
import importlib
import json
import os

import pytest
import torch

from benchmarks import harness
from tests.helpers import DEVICE, REPO

SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "benchmarks", "bench_*.py")))


@pytest.mark.skipif(DEVICE == "cuda", reason="the no-GPU path")
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_without_gpu_says_so_and_exits_0(script, capsys):
    module = importlib.import_module(f"benchmarks.{script}")
    assert module.main(["--quick"]) == 0
    assert "no CUDA GPU found; timings need one" in capsys.readouterr().out


def _bench(tmp_path, family):
    b = harness.Bench.__new__(harness.Bench)
    b.args = type("A", (), {"out": str(tmp_path)})()
    b.family, b.quick, b.rows, b.gpu = family, False, [], True
    b._roofs = {"copy_gbps": 3000.0, "matmul_bf16_tflops": 800.0}
    return b


def test_rates_and_results_files_merge(tmp_path):
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6", "cuda": "12.8", "commit": "abc",
           "date": "2026-11-25"}
    b = _bench(tmp_path, "activations")
    row = {"op": "relu", "case": "n=2^20", "dtype": "float32", "impl": "scratchops", "pass": "fwd+bwd",
           "ms": 0.01, "p20_ms": 0.009, "p80_ms": 0.011}
    b._rate(row, None, {"fwd": 8e6, "bwd": 12e6})
    assert row["gbps"] == pytest.approx(2000.0) and row["pct_roof"] == pytest.approx(200 / 3)
    b.rows.append(row)
    b.save(env)
    b2 = _bench(tmp_path, "linear")
    row2 = {"op": "linear", "case": "4096^3", "dtype": "bfloat16", "impl": "torch", "pass": "fwd", "ms": 0.2,
            "p20_ms": 0.19, "p80_ms": 0.21}
    b2._rate(row2, {"fwd": 2 * 4096**3}, None)
    assert row2["tflops"] == pytest.approx(2 * 4096**3 / 0.2e-3 / 1e12)
    b2.rows.append(row2)
    b2.save(env)
    with open(tmp_path / "nvidia-h100-80gb-hbm3.json") as f:
        data = json.load(f)
    assert set(data["families"]) == {"activations", "linear"}
    md = (tmp_path / "nvidia-h100-80gb-hbm3.md").read_text()
    assert "## activations" in md and "## linear" in md and "2000 GB/s" in md and "NVIDIA H100" in md


def test_saved_tensor_bytes_counts_each_storage_once():
    x = torch.randn(64, requires_grad=True)
    saved, out = harness.saved_tensor_bytes(lambda: (x * x).sum(), exclude=[x])
    assert saved == {"total": 64 * 4, "new": 0}
    saved, _ = harness.saved_tensor_bytes(lambda: torch.exp(x).sum(), exclude=[x])
    assert saved["new"] == 64 * 4
