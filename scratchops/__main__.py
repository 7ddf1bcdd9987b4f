"""The ``scratchops`` command (also ``python -m scratchops``).

    scratchops verify [--ops OP ...]   gradcheck + torch parity of every op, as a table (exit 1 on any fail)
    scratchops bench  [--ops FAMILY ...] benchmark scripts on a GPU; without one, a CPU reference comparison
    scratchops demo   [--epochs N ...]  a CNN on the 8x8 digits, trained with scratchops and with torch.nn
    scratchops --version

With no command, ``verify`` runs. Without a CUDA device, Triton's kernels run in
its interpreter on CPU tensors: ``TRITON_INTERPRET=1`` is set here, before
anything imports triton. A ``$SCRATCHOPS_BACKEND`` that names no backend is a
usage error (exit 2) before any command runs.
"""
import os
import sys
import warnings

COMMANDS = {
    "verify": ("scratchops.verify", "gradcheck and torch parity of every op, as a table"),
    "bench": ("scratchops.bench", "kernel benchmarks (GPU), or a CPU reference comparison"),
    "demo": ("scratchops.demo", "train a CNN on the 8x8 digits with scratchops and with torch.nn"),
    "traffic": ("scratchops.traffic", "bytes each op moves (kernels, glue, syncs) against its compulsory bytes"),
}


def usage() -> str:
    lines = ["usage: scratchops {" + ",".join(COMMANDS) + "} [options]   (scratchops COMMAND --help for options)",
             "       scratchops --version", ""]
    lines += [f"  {name:7s} {help}" for name, (_, help) in COMMANDS.items()]
    lines += ["", "With no command, verify runs. Environment: SCRATCHOPS_BACKEND=auto|triton|reference."]
    return "\n".join(lines)


def version() -> str:
    import torch

    from scratchops import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return f"scratchops {__version__} (torch {torch.__version__}, triton {triton_version})"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    import torch

    if not torch.cuda.is_available():  # before triton is imported: run the kernels in its interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # The interpreter runs masked-off lanes through numpy too (e.g. log(0) in an unused branch).
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    command = argv[0] if argv else "verify"
    if command in ("-h", "--help", "help"):
        print(usage())
        return 0
    if command in ("-V", "--version"):
        print(version())
        return 0
    if command not in COMMANDS:
        print(f"scratchops: unknown command {command!r}\n{usage()}", file=sys.stderr)
        return 2
    from scratchops._backend import BACKENDS, ENV_VAR, env_backend

    try:
        env_backend()
    except ValueError:  # every library call would raise it: a usage error, before any work
        print(f"scratchops: {ENV_VAR}={os.environ[ENV_VAR]!r} names no backend; expected one of "
              f"{', '.join(BACKENDS)}", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[command][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
