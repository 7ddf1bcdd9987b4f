"""``scratchops.convert(model)``: run an existing ``torch.nn`` model on scratchops ops.

What is converted: modules whose type is EXACTLY one of ``torch.nn.Linear,
Conv2d, ReLU, Sigmoid, Tanh, Softmax, LogSoftmax, Dropout, MSELoss,
CrossEntropyLoss, LinearCrossEntropyLoss``, anywhere in the module tree (children of ``Sequential``,
``ModuleList``, ``ModuleDict`` and any other module), the root included: a bare
``torch.nn.Linear`` passed in comes back as a ``scratchops.nn.Linear``.

How: each module's ``__class__`` is switched, in place, to its ``scratchops.nn``
twin. The twins subclass the torch classes and override ``forward`` only, so the
module keeps everything it had: the same parameter and buffer objects (an
optimizer built before the conversion still updates them), ``training`` flag,
hooks, ``state_dict`` keys, device and dtype, and ``isinstance(m, torch.nn.Linear)``
stays true. A converted ``Linear`` gets ``activation=None``.

Fusion (``fuse=True``): inside an ``nn.Sequential`` (exactly that type: a subclass
may have its own ``forward``), a ``Linear`` directly followed by a ``ReLU``,
``Sigmoid`` or ``Tanh`` becomes one ``Linear(..., activation=...)`` (matmul, bias
and activation in one kernel), and the activation's slot holds an
``nn.Identity``: indices and ``state_dict`` keys do not move. A pair is left
unfused when either module has hooks or appears more than once in the model
(a shared module would change its other uses).

Not converted: subclasses of those layers (``nn.LazyLinear``,
``NonDynamicallyQuantizableLinear`` inside ``nn.MultiheadAttention``, user
subclasses with their own ``forward``), since their behaviour may differ from the
class the scratchops twin replaces; modules already converted are left as they
are, so converting twice is harmless.
"""
from __future__ import annotations

import collections

import torch

from scratchops import nn as SN

# The torch classes converted, each with its scratchops twin.
TWINS: dict[type, type] = {
    torch.nn.Linear: SN.Linear, torch.nn.Conv2d: SN.Conv2d, torch.nn.ReLU: SN.ReLU, torch.nn.Sigmoid: SN.Sigmoid,
    torch.nn.Tanh: SN.Tanh, torch.nn.Softmax: SN.Softmax, torch.nn.LogSoftmax: SN.LogSoftmax,
    torch.nn.Dropout: SN.Dropout, torch.nn.MSELoss: SN.MSELoss, torch.nn.CrossEntropyLoss: SN.CrossEntropyLoss,
    torch.nn.LinearCrossEntropyLoss: SN.LinearCrossEntropyLoss,
}
# Activations a Linear can absorb, by the name its ``activation`` argument takes.
FUSABLE = {torch.nn.ReLU: "relu", SN.ReLU: "relu", torch.nn.Sigmoid: "sigmoid", SN.Sigmoid: "sigmoid",
           torch.nn.Tanh: "tanh", SN.Tanh: "tanh"}


def convert_module(module: torch.nn.Module) -> torch.nn.Module:
    """Switch one module to its scratchops twin in place (when its type is exactly a converted one)."""
    twin = TWINS.get(type(module))
    if twin is not None:
        module.__class__ = twin
        if twin is SN.Linear:
            module.activation = None
    return module


def _has_hooks(module: torch.nn.Module) -> bool:
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _fuse(model: torch.nn.Module) -> int:
    """Fuse Linear + activation pairs in every exact nn.Sequential; return how many were fused."""
    uses = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    fused = 0
    for seq in list(model.modules()):
        if type(seq) is not torch.nn.Sequential:
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            lin, act = seq._modules[first], seq._modules[second]
            if (type(lin) is SN.Linear and lin.activation is None and type(act) in FUSABLE
                    and uses[id(lin)] == 1 and uses[id(act)] == 1 and not _has_hooks(lin) and not _has_hooks(act)):
                lin.activation = FUSABLE[type(act)]
                seq._modules[second] = torch.nn.Identity().train(act.training)  # the model's mode is kept
                fused += 1
    return fused


def convert(model: torch.nn.Module, *, fuse: bool = True) -> torch.nn.Module:
    """Swap the supported ``torch.nn`` layers of ``model`` for scratchops ones, in place; return ``model``.

    See the module docstring for exactly what is converted, what is kept
    (parameters are the same objects) and when ``Linear`` + activation are fused.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert() expects a torch.nn.Module, not {type(model).__name__}")
    for module in model.modules():
        convert_module(module)
    if fuse:
        _fuse(model)
    return model
