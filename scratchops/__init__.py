"""scratchops: neural-network building blocks written from scratch.

Every op is a ``torch.autograd.Function`` with a hand-derived backward, run by a
hand-written Triton kernel (or by a plain-torch reference formula), and checked
against PyTorch. See ``scratchops.functional``, ``scratchops.nn`` and
``scratchops.optim``; ``scratchops.convert(model)`` switches an existing model's
torch.nn layers to the scratchops ones.
"""
import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _kernels_from_checkout() -> None:
    """Installed, the kernels are the package ``scratchops._kernels``. In a checkout (this package beside
    ``pyproject.toml`` and ``triton_kernels/``, run from PYTHONPATH or an editable install) they are that
    folder, loaded under the same name: the checkout's own kernels, whatever else is installed."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    folder = _os.path.join(root, "triton_kernels")
    checkout = _os.path.exists(_os.path.join(root, "pyproject.toml")) and \
        _os.path.exists(_os.path.join(folder, "_launch.py"))
    if "scratchops._kernels" in _sys.modules or not checkout:
        return
    spec = _importlib_util.spec_from_file_location("scratchops._kernels", _os.path.join(folder, "__init__.py"),
                                                   submodule_search_locations=[folder])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["scratchops._kernels"] = module
    spec.loader.exec_module(module)


_kernels_from_checkout()

from scratchops import functional, nn, optim  # noqa: E402
from scratchops._backend import current_backend, requested_backend, use_backend  # noqa: E402
from scratchops.convert import convert  # noqa: E402 - the function (it shadows the submodule's name as an attribute)
from scratchops.enable import disable, enable, enabled  # noqa: E402 - enable shadows its submodule's name too

__all__ = ["convert", "current_backend", "disable", "enable", "enabled", "functional", "nn", "optim",
           "requested_backend", "use_backend"]
__version__ = "0.1.0"
