"""What the wheel and the sdist carry, built from a copy of this checkout (a few seconds, no network).

The wheel's only top-level name is ``scratchops`` (``triton_kernels`` is the Triton project's import name;
the kernels install as ``scratchops._kernels``), with every kernel module, ``py.typed`` and the license.
The sdist ships the whole ``tests/`` folder (a test file without ``conftest.py``/``helpers.py`` cannot run).
"""
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from tests.helpers import REPO

setuptools = pytest.importorskip("setuptools", reason="building the wheel needs setuptools in this environment")
if int(setuptools.__version__.split(".")[0]) < 77:  # the build is not isolated: pyproject's requirement must hold here
    pytest.skip(f"setuptools {setuptools.__version__} here; the build needs >= 77 (pyproject.toml [build-system])",
                allow_module_level=True)

SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              "bench_results", "results", "*.png")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel names, sdist names, metadata text), from a copy of the checkout (the repository is not touched)."""
    root = tmp_path_factory.mktemp("pkg")
    src, dist = root / "src", root / "dist"
    shutil.copytree(REPO, src, ignore=SKIP)
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    run = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=src, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = glob.glob(str(dist / "*.whl"))
    (sdist,) = glob.glob(str(dist / "*.tar.gz"))
    with zipfile.ZipFile(wheel) as z:
        wheel_names = z.namelist()
        (meta,) = [n for n in wheel_names if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta).decode()
    with tarfile.open(sdist) as t:
        sdist_names = [n.split("/", 1)[1] for n in t.getnames() if "/" in n]
    return wheel_names, sdist_names, metadata


def test_wheel_top_level_is_scratchops_alone(built):
    wheel_names, _, _ = built
    top = {name.split("/")[0] for name in wheel_names if ".dist-info" not in name.split("/")[0]}
    assert top == {"scratchops"}, top
    assert not any(name.startswith("triton_kernels") for name in wheel_names)


def test_wheel_carries_every_kernel_module_and_py_typed(built):
    wheel_names, _, _ = built
    kernels = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "triton_kernels", "*.py"))}
    assert kernels and {n.split("/")[-1] for n in wheel_names if n.startswith("scratchops/_kernels/")} >= kernels
    package = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "scratchops", "*.py"))}
    assert {n.split("/")[-1] for n in wheel_names if n.count("/") == 1 and n.startswith("scratchops/")} >= package
    assert "scratchops/py.typed" in wheel_names


def test_wheel_metadata_has_the_license(built):
    wheel_names, _, metadata = built
    assert "License-Expression: BSD-3-Clause" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel_names), wheel_names
    assert "Classifier: Typing :: Typed" in metadata and "Author: The scratchops maintainers" in metadata


def test_sdist_ships_the_whole_tests_folder(built):
    _, sdist_names, _ = built
    shipped = {n for n in sdist_names if n.startswith("tests/")}
    assert shipped, "the sdist ships no tests at all"
    here = {os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "tests", "*.py"))}
    assert {"tests/conftest.py", "tests/helpers.py", "tests/aot.py"} <= here
    assert here <= shipped, sorted(here - shipped)
    # and what the tests import besides the package: the benchmark harness and scripts, the license
    assert "benchmarks/harness.py" in sdist_names and "LICENSE" in sdist_names
    assert not any("__pycache__" in n for n in sdist_names)
