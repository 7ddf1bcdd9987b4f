"""The README: every ```python block runs as pasted, and every link stays inside the repository.

Each block runs in a fresh interpreter the way a user would paste it: from an empty folder, with the
checkout on PYTHONPATH, and without TRITON_INTERPRET (CPU ops then run the reference formulas).
"""
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
LINKS = re.findall(r"\]\(([^)\s]+)\)", README)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_python_block_runs_as_pasted(code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SCRATCHOPS_BACKEND")}
    env["PYTHONPATH"] = REPO
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("link", LINKS)
def test_links_stay_in_the_repository_and_exist(link):
    assert not re.match(r"[a-z]+:", link) and not link.startswith(("/", "..")), f"{link}: outside the repository"
    path = os.path.normpath(os.path.join(REPO, link.split("#")[0]))
    assert path.startswith(REPO + os.sep) and os.path.exists(path), f"{link}: no such file in the repository"


def test_no_link_to_the_shared_folder():
    assert "../shared" not in README
