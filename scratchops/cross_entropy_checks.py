"""cross_entropy's class-index targets as torch checks them: torch's exception types and messages, raised before
anything runs (``scratchops.cross_entropy.cross_entropy`` calls this; the maths is in ``scratchops.cross_entropy``)."""
import torch

from scratchops._common import type_name


def check_index_targets(input, target, weight):
    """torch's shape and dtype checks for class-index targets (nll_loss / nll_loss2d)."""
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {type_name(target.dtype)}")
    if input.dim() == 1:
        if target.dim() == 1 and target.numel() != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.numel()}")
    elif input.dim() == 2:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if target.dim() == 0 or target.size(0) != input.size(0):
            raise ValueError(f"Expected input batch_size ({input.size(0)}) to match target batch_size "
                             f"({target.size(0) if target.dim() else 0}).")
    else:
        if target.dim() >= 1 and target.size(0) != input.size(0):
            raise ValueError(f"Expected input batch_size ({input.size(0)}) to match target batch_size "
                             f"({target.size(0)}).")
        expected = [input.size(0), *input.shape[2:]]
        if list(target.shape) != expected:
            raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")
        if target.dtype != torch.int64:
            raise RuntimeError("expected scalar type Long but found Byte")
    if weight is not None and weight.dtype != input.dtype:
        raise RuntimeError(f"expected scalar type {type_name(input.dtype)} but found {type_name(weight.dtype)}")
