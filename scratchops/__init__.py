"""scratchops: neural-network building blocks written from scratch.

Every op is a ``torch.autograd.Function`` with a hand-derived backward, run by a
hand-written Triton kernel (or by a plain-torch reference formula), and checked
against PyTorch. See ``scratchops.functional``, ``scratchops.nn`` and
``scratchops.optim``; ``scratchops.convert(model)`` switches an existing model's
torch.nn layers to the scratchops ones.
"""
from scratchops import functional, nn, optim
from scratchops._backend import requested_backend, use_backend
from scratchops.convert import convert  # the function (it shadows the submodule's name as an attribute)

__all__ = ["convert", "functional", "nn", "optim", "requested_backend", "use_backend"]
__version__ = "0.1.0"
