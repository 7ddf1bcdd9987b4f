"""Placeholder: this family is being written (see its issue)."""


def linear(*args, **kwargs):
    raise NotImplementedError("scratchops.linear is not written yet")
