r"""Stochastic gradient descent: ``scratchops.optim.SGD``, a drop-in for ``torch.optim.SGD``.

For each parameter w with gradient ∇ (parameters whose ``.grad`` is None are
skipped), learning rate η, weight decay λ, momentum μ, dampening τ and the
momentum buffer b (``state[p]["momentum_buffer"]``, in w's dtype):

    g ← -∇ if maximize else ∇
    g ← g + λ w                                  (when λ ≠ 0)
    b ← g on the first step, else b ← μ b + (1 - τ) g      (when μ ≠ 0)
    g ← g + μ b if nesterov else b               (when μ ≠ 0)
    w ← w - η g

exactly torch.optim.SGD's update, written in place into w (its version counter
is bumped). Math runs in fp32 (fp64 for fp64 parameters); w and b are stored in
w's dtype and the update uses b as stored.

The optimizer subclasses ``torch.optim.SGD``: same constructor, validation,
``param_groups`` defaults and ``state_dict`` format (it round-trips with
torch's both ways); only ``step`` differs. On the Triton backend a step is one
multi-tensor launch per parameter group and (device, dtype): see
``triton_kernels/optim.py``. The reference backend runs the same formula with
elementary torch ops, tensor by tensor.

Differences from torch.optim.SGD, by design:

* ``foreach`` and ``fused`` are accepted and stored (for ``state_dict``
  compatibility) but do not change the step, which is always the fused
  multi-tensor kernel. With ``fused=True`` the optimizer does not take over
  AMP's gradient unscaling (``GradScaler`` unscales before ``step``).
* ``differentiable=True`` raises ``NotImplementedError``: the step is not
  recorded by autograd.
* Sparse gradients raise ``RuntimeError`` before anything is written, as
  ``torch.optim.SGD(fused=True)`` does (the kernel updates dense tensors);
  torch's default (for-loop and foreach) paths accept them when λ = 0.
* The backend is chosen (``choose_backend``) once per (device, dtype) bucket of
  a group, from its first parameter.
* A tensor ``lr`` or ``weight_decay`` is read as a Python number at each step.
* A gradient of another dtype than its parameter (``grad_dtype=None``) is cast to
  the parameter's dtype first; its momentum buffer has the parameter's dtype.
"""
import torch

from scratchops._backend import backend_op, choose_backend
from scratchops._common import compute_dtype

KERNELS = "optim"


# ----------------------------------------------------------------- reference math
def sgd_step(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
             fresh: list[bool], lr: float, weight_decay: float, momentum: float, dampening: float,
             nesterov: bool, maximize: bool) -> None:
    """One SGD update of ``params`` (and ``momentum_buffers`` when μ ≠ 0), in place, tensor by tensor.

    ``fresh[i]`` says that ``momentum_buffers[i]`` is new: it is set to g rather than decayed.
    """
    for i, p in enumerate(params):
        acc = p.dtype if p.is_complex() else compute_dtype(p.dtype)
        w = p.to(acc)
        g = grads[i].to(acc)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + weight_decay * w
        if momentum != 0:
            buf = momentum_buffers[i]
            b = g if fresh[i] else momentum * buf.to(acc) + (1 - dampening) * g
            buf.copy_(b)
            b = buf.to(acc)  # the update uses the buffer as stored, rounded to its dtype
            g = g + momentum * b if nesterov else b
        p.copy_(w - lr * g)


# ----------------------------------------------------------------- backend op
sgd_step_op = backend_op("sgd_step", sgd_step, KERNELS, mutates_args=("params", "momentum_buffers"))


# ----------------------------------------------------------------- optimizer
def _number(value) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)


class SGD(torch.optim.SGD):
    __doc__ = __doc__

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                         fused=fused)
        self._check_not_differentiable()
        # The step never reads grad_scale/found_inf: let GradScaler unscale the gradients itself.
        self._step_supports_amp_scaling = False

    def _check_not_differentiable(self):
        if any(group.get("differentiable", False) for group in self.param_groups):
            raise NotImplementedError("scratchops.optim.SGD does not support differentiable=True: its step "
                                      "runs outside autograd (use torch.optim.SGD(differentiable=True))")

    def _gather(self):
        """Per group, buckets of (params, grads) by (device, dtype), for the parameters that have a gradient.

        Raises, before anything is updated, on what the step cannot do.
        """
        self._check_not_differentiable()
        plan = []
        for group in self.param_groups:
            buckets: dict = {}
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("scratchops.optim.SGD does not support sparse gradients (as "
                                       "torch.optim.SGD(fused=True)); use torch.optim.SGD")
                if g.dtype != p.dtype:  # a grad_dtype=None parameter: the kernels read the gradient as w's dtype
                    g = g.to(p.dtype)
                bucket = buckets.get((p.device, p.dtype))
                if bucket is None:
                    bucket = buckets[p.device, p.dtype] = ([], [])
                bucket[0].append(p)
                bucket[1].append(g)
            plan.append((group, buckets.values()))
        return plan

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, buckets in self._gather():
            momentum = _number(group["momentum"])
            for params, grads in buckets:
                bufs, fresh = [], []
                if momentum != 0:
                    state = self.state
                    for p, g in zip(params, grads):
                        buf = state[p].get("momentum_buffer") if p in state else None
                        fresh.append(buf is None)
                        # a new buffer is laid out as torch's (a clone of the gradient) and filled by the step
                        bufs.append(torch.empty_like(g) if buf is None else buf)
                sgd_step_op(choose_backend(params[0]), params, grads, bufs, fresh, _number(group["lr"]),
                            _number(group["weight_decay"]), momentum, _number(group["dampening"]),
                            bool(group["nesterov"]), bool(group["maximize"]))
                if any(fresh):
                    for p, buf, new in zip(params, bufs, fresh):
                        if new:
                            self.state[p]["momentum_buffer"] = buf
        return loss
