"""The benchmark harness: results files from synthetic rows, every script's no-GPU exit, and the folder's
independence (the package never imports it; the scripts run as modules, with no sys.path patching)."""
import glob
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from benchmarks import harness
from scratchops import _bench_utils
from tests.helpers import DEVICE, REPO

# The scripts built on the shared harness (others, such as the host-overhead bench, have their own command line).
SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "benchmarks", "bench_*.py"))
                 if "benchmarks.harness" in open(p).read())


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
    saved, out = _bench_utils.saved_tensor_bytes(lambda: (x * x).sum(), exclude=[x])
    assert saved == {"total": 64 * 4, "new": 0}
    saved, _ = _bench_utils.saved_tensor_bytes(lambda: torch.exp(x).sum(), exclude=[x])
    assert saved["new"] == 64 * 4


def test_a_partial_run_replaces_its_rows_and_keeps_the_others(tmp_path):
    env = {"gpu": "Fake GPU", "torch": "t", "triton": "tr", "cuda": "c", "commit": "old1", "date": "d1"}
    row = {"op": "relu", "case": "n=2^20", "dtype": "float32", "impl": "scratchops", "pass": "fwd", "ms": 1.0,
           "p20_ms": 0.9, "p80_ms": 1.1}
    b = _bench(tmp_path, "activations")
    b.rows = [row, dict(row, case="n=2^24", ms=2.0), dict(row, impl="torch", ms=3.0)]
    b.save(env)
    b = _bench(tmp_path, "activations")
    b.rows = [dict(row, ms=0.5), dict(row, case="n=2^26", ms=4.0)]  # a --quick rerun: one row again, one new
    b.save(dict(env, commit="new2", date="d2"))
    rows = json.loads((tmp_path / "fake-gpu.json").read_text())["families"]["activations"]["rows"]
    assert [(r["case"], r["impl"], r["ms"], r["commit"]) for r in rows] == [
        ("n=2^20", "scratchops", 0.5, "new2"), ("n=2^24", "scratchops", 2.0, "old1"),
        ("n=2^20", "torch", 3.0, "old1"), ("n=2^26", "scratchops", 4.0, "new2")]
    md = (tmp_path / "fake-gpu.md").read_text()
    assert "commit new2" in md and "| old1 d1 |" in md and "earlier run" in md


def test_the_package_does_not_import_benchmarks():
    """Neither the sources nor an import of every public module pulls in the (unpackaged) benchmarks folder."""
    for path in glob.glob(os.path.join(REPO, "scratchops", "*.py")):
        text = open(path).read()
        assert "import benchmarks" not in text and "from benchmarks" not in text, path
    code = ("import sys, scratchops, scratchops.bench, scratchops.verify, scratchops.demo, scratchops.__main__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'benchmarks'))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "benchmarks", "*.py"))),
                         ids=os.path.basename)
def test_no_script_patches_sys_path(path):
    assert "sys.path" not in open(path).read()


@pytest.mark.skipif(DEVICE == "cuda", reason="the no-GPU path (on a GPU this would time the kernels)")
def test_a_script_runs_as_a_module_from_the_repository_root():
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_activations", "--quick"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no CUDA GPU found; timings need one" in run.stdout


def test_gpu_recipe_parses_and_names_existing_files():
    script = os.path.join(REPO, "benchmarks", "run_gpu.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    run = subprocess.run(["bash", script, "--bogus"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "usage" in run.stderr
    for path in re.findall(r"tests/test_\w+\.py", open(script).read()):
        assert os.path.exists(os.path.join(REPO, path)), f"run_gpu.sh runs {path}, which does not exist"
