"""Hand-written Triton kernels and their launchers, one file per op family.

Each ``<family>.py`` imports only torch and triton: ``@triton.jit`` kernels named
``_<op>_fwd_kernel`` / ``_<op>_bwd_kernel`` and launchers ``<op>_fwd`` / ``<op>_bwd``
that validate layouts, allocate outputs, pick block sizes, build the grid and
launch. ``AOT_CONFIGS`` in each file lists every (kernel, dtype, constexprs)
the launchers use, so the tests can compile them ahead of time for sm_90.
"""
