"""Benchmark helpers the package and the repository's ``benchmarks/`` both use.

The package never imports ``benchmarks`` (that folder is not installed); the
benchmark scripts import these from here. What lives here: the bytes autograd
saves for backward, the results-file name of a GPU, the results files
(``<gpu>.json`` merged per row, ``<gpu>.md`` rendered from it) and the git commit
a measurement was made on.
"""
from __future__ import annotations

import json
import os
import re
import subprocess

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A GPU results row is identified by these fields; a new run replaces the rows it measured again, keeps the others.
ROW_KEY = ("op", "case", "dtype", "impl", "pass")


def saved_tensor_bytes(fn, exclude=()):
    """Run ``fn()`` and count the bytes autograd saves for backward (each storage once).

    Returns ``({"total": bytes, "new": bytes}, fn())``. Storages of the tensors in
    ``exclude`` (typically the inputs, which exist anyway) are left out of ``new``;
    ``total`` counts everything.
    """
    seen, excluded = {}, {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(seen.values())
    new = sum(n for ptr, n in seen.items() if ptr not in excluded)
    return {"total": total, "new": new}, out


def gpu_slug(name: str) -> str:
    """The results-file stem of a GPU: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit(repo: str = REPO) -> str:
    """The checkout's short commit (``+dirty`` with uncommitted changes), else ``$SCRATCHOPS_COMMIT`` or unknown."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SCRATCHOPS_COMMIT", "unknown")


def merge_rows(old: list[dict], new: list[dict], key=ROW_KEY) -> list[dict]:
    """``old`` with every row that ``new`` measured again replaced in place; rows new to it appended."""
    fresh = {tuple(r.get(k) for k in key): r for r in new}
    merged = [fresh.pop(tuple(r.get(k) for k in key), r) for r in old]
    return merged + list(fresh.values())


def load_results(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"families": {}}


def merge_family(data: dict, family: str, env: dict, roofs: dict, rows: list[dict]) -> dict:
    """Merge one run of ``family`` into a results dict; each row keeps the commit and date it was measured on."""
    stamped = [dict(r, commit=env.get("commit"), date=env.get("date")) for r in rows]
    old = data["families"].get(family, {})
    data["families"][family] = {"environment": env, "roofs": roofs or old.get("roofs", {}),
                                "rows": merge_rows(old.get("rows", []), stamped)}
    return data


def _cells(r: dict) -> list[str]:
    if "error" in r:
        return ["", "", r["error"], ""]
    if r["pass"] == "memory":
        return ["", "", f"peak {r['peak_bytes'] / 2**20:.1f} MiB, saved {r['saved_bytes'] / 2**20:.1f} MiB", ""]
    rate = f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else (f"{r['gbps']:.0f} GB/s" if "gbps" in r else "")
    return [f"{r['ms']:.4f}", f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}", rate,
            f"{r['pct_roof']:.1f}" if "pct_roof" in r else ""]


def to_markdown(data: dict) -> str:
    """One table per family, with the environment and roofs of its latest run (older rows name their commit)."""
    lines = []
    for family, entry in sorted(data["families"].items()):
        env, roofs = entry["environment"], entry["roofs"]
        lines += [f"## {family}", "",
                  f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, "
                  f"commit {env['commit']}, {env['date']}."]
        if roofs:
            lines.append(f"Roofs in this run: copy {roofs['copy_gbps']:.0f} GB/s, "
                         f"cuBLAS bf16 matmul {roofs['matmul_bf16_tflops']:.0f} TFLOP/s.")
        older = any(r.get("commit", env["commit"]) != env["commit"] for r in entry["rows"])
        if older:
            lines.append("Rows measured by an earlier run name its commit in the last column.")
        lines += ["", "| op | case | dtype | impl | pass | median ms | p20-p80 ms | rate | % roof |"
                  + (" run |" if older else ""), "|---|---|---|---|---|---|---|---|---|" + ("---|" if older else "")]
        for r in entry["rows"]:
            cells = [r["op"], r["case"], r["dtype"], r["impl"], r["pass"], *_cells(r)]
            if older:
                cells.append("" if r.get("commit", env["commit"]) == env["commit"] else f"{r['commit']} {r['date']}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
