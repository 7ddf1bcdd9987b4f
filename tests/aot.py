"""Compile a kernel family ahead of time for sm_90 as it is launched, and report what the code does.

Run as ``python -m tests.aot scratchops._kernels.<family>`` with TRITON_INTERPRET unset
(the interpreter replaces ``@triton.jit`` functions, so it needs a process of its
own). It compiles every entry of the module's ``aot_configs()`` with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` (no GPU
needed: ptxas ships in the triton wheel) and prints one JSON line per config.

As launched: a launch specializes every pointer 16-byte aligned and every integer argument
divisible by 16 when it is (a torch allocation is aligned; the shapes that matter are multiples
of 16), and an integer equal to 1 (a unit stride) becomes a constant. The compile gets the same:
``tt.divisibility = 16`` on every pointer and integer parameter (integers listed in an entry's
``unaligned`` attribute, if any, are left out), unit strides through the entry's constexprs.

Each row: registers, stack/local (spills), shared memory (``shared``: static, from cuobjdump; ``smem``: what a
launch allocates, dynamic included, from the compile's metadata), and from the SASS (``cuobjdump -sass``):
global loads/stores by width (``ldg`` / ``stg``: {"128": n, "64": n, "32": n, "16": n, "8": n}),
``vector128`` (some global access is 128-bit), ``hgmma`` (wgmma instructions), ``utmaldg`` (TMA
loads) and ``ldgsts`` (cp.async copies).
"""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
CUOBJDUMP = os.path.join(BIN, "cuobjdump")
RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
# A global load/store and its width: LDG.E.128, STG.E.64, LDG.E.U16, LDG.E.EL.128.CONSTANT, LDG.E (32-bit)...
GLOBAL_ACCESS = re.compile(r"\b(LDG|STG)\.E((?:\.[A-Z0-9_]+)*)")
WIDTHS = {"128": "128", "64": "64", "U16": "16", "S16": "16", "U8": "8", "S8": "8"}
INT_TYPES = ("i1", "i8", "i16", "i32", "i64", "u1", "u8", "u16", "u32", "u64")


def launch_attrs(entry):
    """The ``attrs`` a launch gets: ``tt.divisibility`` 16 on pointers and integers (see the module docstring).

    triton >= 3.3 (3.6, 3.7, 3.9): ``{(index,): [["tt.divisibility", 16]]}``, the spelling of
    ``BaseBackend.parse_attr("D")``; older: an ``AttrsDescriptor``.
    """
    unaligned = set(getattr(entry, "unaligned", ()))
    divisible = [i for i, (name, ty) in enumerate(entry.signature.items())
                 if name not in unaligned and (ty.startswith("*") or ty in INT_TYPES)]
    try:
        from triton.backends.compiler import BaseBackend

        spec = BaseBackend.parse_attr("D")
    except (ImportError, AttributeError):
        from triton.backends.compiler import AttrsDescriptor

        return AttrsDescriptor.from_dict({"tt.divisibility": divisible})
    return {(i,): spec for i in divisible}


def sass_summary(sass: str) -> dict:
    """Global accesses by width, and the instructions that say how a kernel moves and multiplies data."""
    counts = {"ldg": {}, "stg": {}}
    for op, mods in GLOBAL_ACCESS.findall(sass):
        width = next((WIDTHS[m] for m in mods.split(".") if m in WIDTHS), "32")
        bucket = counts[op.lower()]
        bucket[width] = bucket.get(width, 0) + 1
    return {**counts, "vector128": bool(counts["ldg"].get("128") or counts["stg"].get("128")),
            "hgmma": len(re.findall(r"\bHGMMA\.", sass)), "utmaldg": len(re.findall(r"\bUTMALDG\b", sass)),
            "ldgsts": len(re.findall(r"\bLDGSTS\b", sass))}


def compile_config(entry, as_launched: bool = True):
    """Compile one ``AotEntry`` (``scratchops._kernels._launch``) as launched (or, ``as_launched=False``, with
    no alignment or divisibility known); read its resources and SASS."""
    kernel, signature, constexprs, num_warps = entry.fn, entry.signature, entry.constexprs, entry.num_warps
    options = {"num_warps": num_warps}
    if entry.num_stages is not None:
        options["num_stages"] = entry.num_stages
    if getattr(entry, "num_ctas", 1) > 1:  # a thread-block cluster (sm_90+)
        options["num_ctas"] = entry.num_ctas
    attrs = launch_attrs(entry) if as_launched else None
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=TARGET, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack, shared, local = map(int, RESOURCE.search(dump).groups())
    # Element types of the pointers and of the tensor descriptors (``tensordesc<fp16[64, 64]>`` counts as *fp16).
    dtypes = sorted({v if v.startswith("*") else "*" + v.split("<")[1].split("[")[0] for v in signature.values()
                     if v.startswith(("*", "tensordesc"))})
    return {"kernel": kernel.__name__, "dtypes": dtypes, "constexprs": {k: str(v) for k, v in constexprs.items()},
            "num_warps": num_warps, "num_stages": entry.num_stages, "num_ctas": options.get("num_ctas", 1),
            "registers": regs, "stack": stack, "local": local, "shared": shared, "smem": compiled.metadata.shared,
            "as_launched": as_launched, **sass_summary(sass)}


def table(rows) -> str:
    """Per kernel and dtype group: compiles, max registers, spilled compiles, and how many compiles make
    128-bit global accesses / use HGMMA / cp.async (LDGSTS) / TMA (UTMALDG)."""
    groups: dict = {}
    for r in rows:
        # a kernel that takes its element type as a DTYPE constexpr (its tensors' addresses read from a table)
        types = {"*" + r["constexprs"]["DTYPE"]} if "DTYPE" in r["constexprs"] else set(r["dtypes"])
        kind = "16-bit" if {"*fp16", "*bf16"} & types else ",".join(
            d for d in sorted(types) if d in ("*fp32", "*fp64")) or ",".join(r["dtypes"])
        groups.setdefault((r["kernel"], kind), []).append(r)
    lines = ["| kernel | dtypes | compiles | max regs | spilled | 128-bit | HGMMA | LDGSTS | UTMALDG |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (kernel, kind), rs in sorted(groups.items()):
        n = len(rs)
        count = lambda f: sum(bool(f(r)) for r in rs)  # noqa: E731
        lines.append(f"| {kernel} | {kind} | {n} | {max(r['registers'] for r in rs)} | "
                     f"{count(lambda r: r['stack'] or r['local'])} | {count(lambda r: r['vector128'])}/{n} | "
                     f"{count(lambda r: r['hgmma'])}/{n} | {count(lambda r: r['ldgsts'])}/{n} | "
                     f"{count(lambda r: r['utmaldg'])}/{n} |")
    return "\n".join(lines)


def main(module_name: str, as_launched: bool = True, as_table: bool = False) -> None:
    module = importlib.import_module(module_name)
    rows = []
    for config in module.aot_configs():
        rows.append(compile_config(config, as_launched))
        if not as_table:
            print(json.dumps(rows[-1]), flush=True)
    if as_table:
        print(table(rows))


if __name__ == "__main__":  # python -m tests.aot MODULE [--plain] [--table]  (--plain: no launch specializations)
    main(sys.argv[1], as_launched="--plain" not in sys.argv[2:], as_table="--table" in sys.argv[2:])
