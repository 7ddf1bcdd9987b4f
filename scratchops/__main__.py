"""``python -m scratchops <command>``: verify (gradcheck + parity table)."""
import os
import sys
import warnings


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import torch

    if not torch.cuda.is_available():  # before triton is imported: run the kernels in its interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # The interpreter runs masked-off lanes through numpy too (e.g. log(0) in an unused branch).
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    command = argv[0] if argv else "verify"
    if command == "verify":
        from scratchops.verify import main as verify

        return verify(argv[1:])
    print(f"usage: python -m scratchops verify   (unknown command {command!r})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
