"""``scratchops.functional``: the ops, with the names and signatures of ``torch.nn.functional``.

Each function validates its arguments on the host (raising what torch raises),
chooses the backend once (``scratchops._backend.choose_backend``) and calls its
``autograd.Function``. They are defined next to their math in the family files;
this module is the public list.
"""
from scratchops.activations import relu, relu_, sigmoid, tanh
from scratchops.conv2d import conv2d
from scratchops.cross_entropy import cross_entropy
from scratchops.linear import linear
from scratchops.linear_cross_entropy import linear_cross_entropy
from scratchops.mse import mse_loss
from scratchops.regularization import dropout, l2_penalty
from scratchops.softmax import log_softmax, softmax

__all__ = ["conv2d", "cross_entropy", "dropout", "l2_penalty", "linear", "linear_cross_entropy",
           "log_softmax", "mse_loss", "relu", "relu_",
           "sigmoid", "softmax", "tanh"]
