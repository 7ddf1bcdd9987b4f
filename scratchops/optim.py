"""Placeholder: scratchops.optim.SGD is being written (see its issue)."""
import torch


class SGD(torch.optim.SGD):
    def step(self, closure=None):
        raise NotImplementedError("scratchops.optim.SGD is not written yet")
