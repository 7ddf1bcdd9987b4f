"""``scratchops.nn``: modules that subclass their ``torch.nn`` twins and override ``forward`` only.

Constructors, parameters, buffers and ``state_dict`` keys are torch's, so a
``torch.nn`` checkpoint loads as is and ``isinstance(m, torch.nn.Linear)`` holds.
"""
import torch

from scratchops import functional as F


class ReLU(torch.nn.ReLU):
    def forward(self, input):
        return F.relu(input, inplace=self.inplace)


class Sigmoid(torch.nn.Sigmoid):
    def forward(self, input):
        return F.sigmoid(input)


class Tanh(torch.nn.Tanh):
    def forward(self, input):
        return F.tanh(input)


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` plus a keyword-only ``activation`` ("relu", "sigmoid", "tanh") fused into the matmul."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, activation=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, input):
        return F.linear(input, self.weight, self.bias, activation=self.activation)

    def extra_repr(self):
        fused = f", activation={self.activation!r}" if self.activation is not None else ""
        return super().extra_repr() + fused


class Softmax(torch.nn.Softmax):
    def forward(self, input):
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    def forward(self, input):
        return F.log_softmax(input, self.dim, _stacklevel=5)


class MSELoss(torch.nn.MSELoss):
    def forward(self, input, target):
        return F.mse_loss(input, target, reduction=self.reduction)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    def forward(self, input, target):
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


class LinearCrossEntropyLoss(torch.nn.LinearCrossEntropyLoss):
    """torch's module (same constructor, ``self.linear`` and state_dict); the logits are never made."""

    def forward(self, input, target):
        linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        linear_bias = (self.linear.bias.reshape((self.num_classes, *self.out_features))
                       if self.linear.bias is not None else None)
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                      reduction=self.reduction, ignore_index=self.ignore_index,
                                      label_smoothing=self.label_smoothing, options=self.options)


class Conv2d(torch.nn.Conv2d):
    # torch's forward calls _conv_forward(input, weight, bias); subclasses call or override it (standardized
    # weights, for instance), so scratchops replaces it, not only forward.
    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            # As torch: pad explicitly with the chosen mode, then convolve with no padding.
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, input):
        return self._conv_forward(input, self.weight, self.bias)


class Dropout(torch.nn.Dropout):
    def forward(self, input):
        return F.dropout(input, self.p, self.training, self.inplace)


class L2Penalty(torch.nn.Module):
    """``weight_decay · Σ w²`` over the tensors given to ``forward`` (say ``model.parameters()``).

    No torch twin: it equals ``weight_decay * sum(w.pow(2).sum() for w in parameters)``,
    computed by one multi-tensor reduction per dtype; the backward adds
    ``2 · weight_decay · w`` (times the incoming gradient) to each tensor's grad.
    Add it to the loss: ``loss = criterion(model(x), y) + L2Penalty(1e-4)(model.parameters())``.
    """

    def __init__(self, weight_decay=1.0):
        super().__init__()
        self.weight_decay = weight_decay

    def forward(self, parameters):
        return F.l2_penalty(list(parameters), self.weight_decay)

    def extra_repr(self):
        return f"weight_decay={self.weight_decay}"
