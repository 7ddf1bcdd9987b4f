"""Compile a kernel family ahead of time for sm_90 and report registers and spills.

Run as ``python -m tests.aot scratchops._kernels.<family>`` with TRITON_INTERPRET unset
(the interpreter replaces ``@triton.jit`` functions, so it needs a process of its
own). It compiles every entry of the module's ``aot_configs()`` with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` (no GPU
needed: ptxas ships in the triton wheel), reads the cubin's resource usage with
``cuobjdump --dump-resource-usage`` and prints one JSON line per config.
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
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def compile_config(entry):
    """Compile one ``AotEntry`` (``scratchops._kernels._launch``) and read its resource usage."""
    kernel, signature, constexprs, num_warps = entry.fn, entry.signature, entry.constexprs, entry.num_warps
    options = {"num_warps": num_warps}
    if entry.num_stages is not None:
        options["num_stages"] = entry.num_stages
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=TARGET, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs, stack, shared, local = map(int, RESOURCE.search(dump).groups())
    dtypes = sorted({v for v in signature.values() if v.startswith("*")})
    return {"kernel": kernel.__name__, "dtypes": dtypes, "constexprs": {k: str(v) for k, v in constexprs.items()},
            "num_warps": num_warps, "registers": regs, "stack": stack, "local": local, "shared": shared}


def main(module_name: str) -> None:
    module = importlib.import_module(module_name)
    for config in module.aot_configs():
        print(json.dumps(compile_config(config)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
