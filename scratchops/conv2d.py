"""Placeholder: this family is being written (see its issue)."""


def conv2d(*args, **kwargs):
    raise NotImplementedError("scratchops.conv2d is not written yet")
