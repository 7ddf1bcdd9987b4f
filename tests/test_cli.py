"""The command line: verify's table and exit status (a broken op makes it fail), bench, the entry points."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import scratchops.activations
import scratchops.functional as SF
from scratchops import __main__ as cli
from scratchops import bench, verify
from scratchops._backend import LAUNCHES
from tests.helpers import REPO


def _rows(path):
    return json.loads(path.read_text())["rows"]


def test_verify_passes_and_prints_the_table(capsys, tmp_path):
    assert verify.main(["--ops", "relu", "--json", str(tmp_path / "v.json")]) == 0
    out = capsys.readouterr().out
    assert "gradcheck" in out and "parity" in out and "max err" in out and "0 failed" in out
    rows = _rows(tmp_path / "v.json")
    assert [r["backend"] for r in rows] == verify.backends_here(verify.best_device())
    assert all(r["ok"] and r["gradcheck"] and r["parity"] and r["ran"] for r in rows), rows
    n = len(verify.backends_here(verify.best_device()))
    lines = [" ".join(line.split()) for line in out.splitlines() if re.match(r"\[\d+/\d+\] +relu ", line)]
    assert [line.split()[0] for line in lines] == [f"[{i}/{n}]" for i in range(1, n + 1)], out  # streamed, counted
    for backend in verify.backends_here(verify.best_device()):
        assert any(f" {backend} pass pass pass " in line for line in lines), out
    assert "1 case," in out and "1 cases" not in out


def test_verify_fails_when_a_backward_is_broken(monkeypatch, capsys, tmp_path):
    fn = scratchops.activations.ActivationFunction
    real = fn.backward

    def doubled(ctx, dy):
        dx, *nones = real(ctx, dy)
        return (2 * dx if ctx.activation == "relu" else dx), *nones

    monkeypatch.setattr(fn, "backward", staticmethod(doubled))
    assert verify.main(["--ops", "relu", "tanh", "--backend", "reference", "--json", str(tmp_path / "v.json")]) == 1
    relu, tanh = _rows(tmp_path / "v.json")
    assert relu["gradcheck"] is False and relu["parity"] is False and not relu["ok"], relu
    assert tanh["ok"], tanh
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 passed, 1 failed" in out


def test_verify_fails_when_a_forward_is_wrong(monkeypatch, capsys, tmp_path):
    cases = [dataclasses.replace(c, ours=lambda x: SF.tanh(x) * 1.001) if c.op == "tanh" else c for c in verify.CASES]
    monkeypatch.setattr(verify, "CASES", cases)
    assert verify.main(["--ops", "tanh", "--backend", "reference", "--json", str(tmp_path / "v.json")]) == 1
    (row,) = json.loads((tmp_path / "v.json").read_text())["rows"]
    assert row["op"] == "tanh" and row["parity"] is False and row["max_error"] > row["tolerance"]


def test_verify_fails_when_no_scratchops_op_runs(monkeypatch, capsys):
    cases = [dataclasses.replace(c, ours=torch.sigmoid) if c.op == "sigmoid" else c for c in verify.CASES]
    monkeypatch.setattr(verify, "CASES", cases)
    assert verify.main(["--ops", "sigmoid", "--backend", "reference"]) == 1
    assert "no scratchops backend op ran" in capsys.readouterr().out


def test_verify_keeps_integer_inputs(capsys):
    """Class indices (a long tensor) reach the op as integers, not cast to floating point."""
    seen = []

    def ours(x, target):
        seen.append(target.dtype)
        return SF.relu(x) * target

    case = verify.Case("relu", "int target", ours, lambda x, t: torch.relu(x) * t,
                       lambda g: (verify._randn(g, 3), torch.tensor([1, 2, 3])))
    row = verify.run_case(case, "reference", "cpu")
    assert row["ok"], row
    assert set(seen) == {torch.int64}


def test_verify_usage_errors(capsys):
    assert verify.main(["--ops", "no_such_op"]) == 2
    assert "unknown op" in capsys.readouterr().err
    assert cli.main(["no_such_command"]) == 2
    assert cli.main(["--help"]) == 0
    assert "verify" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--ops", ""], "names no op"),
    (["--ops", ",", " "], "names no op"),
    (["--ops", "relu", "--json", "/no/such/folder/rows.json"], "does not exist"),
])
def test_verify_usage_errors_come_before_any_work(argv, message, capsys):
    before = sum(LAUNCHES.values())
    assert verify.main(argv) == 2
    assert message in capsys.readouterr().err
    assert sum(LAUNCHES.values()) == before, "work was done before the usage error"


def test_bad_backend_environment_variable_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("SCRATCHOPS_BACKEND", "bogus")
    before = sum(LAUNCHES.values())
    for argv in (["verify", "--ops", "relu"], ["demo", "--epochs", "1"], ["bench", "--cpu"], []):
        assert cli.main(argv) == 2, argv
        assert "SCRATCHOPS_BACKEND='bogus' names no backend" in capsys.readouterr().err
    assert verify.main(["--ops", "relu"]) == 2  # called directly too
    assert sum(LAUNCHES.values()) == before


def test_version(capsys):
    import tomllib

    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert out.startswith(f"scratchops {version} (torch {torch.__version__}") and scratchops.__version__ == version


@pytest.mark.parametrize("command", ["verify", "bench", "demo"])
def test_help_is_plain_text(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: scratchops {command}") and "``" not in out and ":func:" not in out
    assert "pip install -e" not in out


def test_python_m_scratchops_runs_verify():
    run = subprocess.run([sys.executable, "-m", "scratchops", "verify", "--ops", "tanh", "--backend", "reference"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tanh" in run.stdout and "1 passed, 0 failed" in run.stdout


def test_console_script_is_declared():
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"].get("scripts", {})
    assert scripts.get("scratchops") == "scratchops.__main__:main", "pyproject.toml lacks [project.scripts] scratchops"


def test_bench_cpu_reference_comparison(tmp_path, capsys):
    assert bench.main(["--cpu", "--ops", "relu", "tanh", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "CPU reference comparison" in out and "2/2" in out
    if not torch.cuda.is_available():
        assert "timings need one" in out
    rows = json.loads((tmp_path / "cpu-reference.json").read_text())["rows"]
    assert [r["op"] for r in rows] == ["relu", "tanh"]
    assert all(r["reference_fwd+bwd_ms"] > 0 and r["torch_fwd_ms"] > 0 for r in rows)
    assert "| activations | relu |" in (tmp_path / "cpu-reference.md").read_text()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "cpu-reference.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_partial_run_merges_into_the_results(tmp_path, capsys):
    assert bench.main(["--cpu", "--ops", "relu,tanh", "--quick", "--no-plot", "--out", str(tmp_path)]) == 0
    first = {r["op"]: r for r in _rows(tmp_path / "cpu-reference.json")}
    assert bench.main(["--cpu", "--ops", "sigmoid", "relu", "--quick", "--no-plot", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "cpu-reference.json")
    assert [r["op"] for r in rows] == ["relu", "tanh", "sigmoid"]  # relu re-measured in place, tanh kept
    assert rows[1] == first["tanh"]
    md = (tmp_path / "cpu-reference.md").read_text()
    assert "| activations | tanh |" in md and "| activations | sigmoid |" in md


def test_bench_usage_errors_come_before_any_work(tmp_path, capsys):
    before = sum(LAUNCHES.values())
    assert bench.main(["--cpu", "--ops", ""]) == 2
    assert "names no op" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert bench.main(["--cpu", "--ops", "relu", "--out", str(blocker / "results")]) == 2
    assert "cannot create the results folder" in capsys.readouterr().err
    assert sum(LAUNCHES.values()) == before


def test_bench_plot_uses_a_log_axis(tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    scales = []
    real = plt.Axes.set_yscale
    monkeypatch.setattr(plt.Axes, "set_yscale", lambda self, value, **kw: scales.append(value) or real(self, value))
    assert bench.plot_bars(str(tmp_path / "p.png"), "t", ["relu", "conv2d"], {"a": [0.01, 100.0]}, "ms")
    assert scales == ["log"]


def test_bench_says_when_scripts_are_absent(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "SCRIPTS", str(tmp_path / "nowhere"))
    args = bench.argparse.Namespace(ops=[], out=str(tmp_path), quick=True, no_plot=True)
    assert bench.run_gpu(args) == 2
    assert "not in the installed package" in capsys.readouterr().out


def test_bench_finds_the_repository_scripts():
    assert "activations" in bench.scripts(None)
    assert list(bench.scripts(["relu"])) == ["activations"]
    assert bench.main(["--ops", "nonsense"]) == 2


def test_bench_gpu_path_runs_the_scripts_and_plots(tmp_path, monkeypatch, capsys):
    """The GPU path, exercised here: each selected script's main() runs (without CUDA it measures nothing and
    exits 0), then the results file is printed and plotted (a results file in the harness's format is planted)."""
    pytest.importorskip("matplotlib")
    if torch.cuda.is_available():
        pytest.skip("with CUDA the scripts would time the real kernels (run `scratchops bench --quick` for that)")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU 80GB")
    row = {"family": "activations", "op": "relu", "case": "n=2^20", "dtype": "float32", "pass": "fwd+bwd",
           "ms": 0.01, "p20_ms": 0.009, "p80_ms": 0.011, "gbps": 900.0, "pct_roof": 30.0}
    env = {"gpu": "Fake GPU 80GB", "torch": "x", "triton": "y", "cuda": "z", "commit": "c", "date": "d"}
    results = {"families": {"activations": {"environment": env, "roofs": {},
                                            "rows": [dict(row, impl="scratchops"), dict(row, impl="torch", ms=0.02)]}}}
    (tmp_path / "fake-gpu-80gb.json").write_text(json.dumps(results))
    args = bench.argparse.Namespace(ops=["relu"], out=str(tmp_path), quick=True, no_plot=False)
    assert bench.run_gpu(args) == 0
    out = capsys.readouterr().out
    assert "1/1 done" in out and "| relu | n=2^20 | float32 | scratchops | fwd+bwd | 0.0100 |" in out
    assert (tmp_path / "fake-gpu-80gb-activations.png").read_bytes()[:4] == b"\x89PNG"
