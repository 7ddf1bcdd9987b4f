r"""Stochastic gradient descent: ``scratchops.optim.SGD``, a drop-in for ``torch.optim.SGD``.

For each parameter w with gradient ∇ (parameters whose ``.grad`` is None are skipped), learning rate η, weight decay
λ, momentum μ, dampening τ and the momentum buffer b (``state[p]["momentum_buffer"]``, in w's dtype):

    g ← -∇ if maximize else ∇
    g ← g + λ w                                  (when λ ≠ 0)
    b ← g on the first step, else b ← μ b + (1 - τ) g      (when μ ≠ 0)
    g ← g + μ b if nesterov else b               (when μ ≠ 0)
    w ← w - η g

exactly torch.optim.SGD's update, written in place into w (its version counter is bumped). Math runs in fp32 (fp64
for fp64 parameters); w and b are stored in w's dtype and the update uses b as stored.

The optimizer subclasses ``torch.optim.SGD``: same constructor, validation, ``param_groups`` defaults and
``state_dict`` format (it round-trips with torch's both ways); only ``step`` differs. On the Triton backend a step
is one multi-tensor launch per parameter group and (device, dtype): see ``triton_kernels/optim.py``. The reference
backend runs the same formula with elementary torch ops, tensor by tensor.

Differences from torch.optim.SGD, by design:

* ``foreach`` and ``fused`` are accepted and stored (for ``state_dict`` compatibility) but do not change the step,
  which is always the fused multi-tensor kernel. With ``fused=True`` the optimizer does not take over AMP's gradient
  unscaling (``GradScaler`` unscales before ``step``).
* ``differentiable=True`` raises ``NotImplementedError``: the step is not recorded by autograd.
* Sparse gradients raise ``RuntimeError`` before anything is written, as ``torch.optim.SGD(fused=True)`` does (the
  kernel updates dense tensors); torch's default (for-loop and foreach) paths accept them when λ = 0.
* The backend is chosen (``choose_backend``) once per (device, dtype) bucket of a group, from its first parameter.
* A tensor ``lr`` is read on the device (no ``.item()``, no host sync); a tensor ``weight_decay``, ``momentum`` or
  ``dampening`` is read as a Python number.
* A gradient of another dtype than its parameter (``grad_dtype=None``) is cast to the parameter's dtype first; its
  momentum buffer has the parameter's dtype.
* DTensor parameters (FSDP2, tensor parallel) are stepped on each rank's shards; momentum buffers are DTensors.

Host cost. A step's Python work is per group, not per parameter: after a step, a group whose parameters run on the
Triton backend (plain, contiguous tensors in eager mode) keeps a plan (:class:`_GroupPlan`): its buckets, their
launch tables (``StepPlan``) and the objects the step read. The next step checks with C-level passes (``map``, no
Python loop per parameter) that it would read the same (parameters, state, gradients of the same dtypes and layouts,
buffer objects, addresses) and launches with the kept tables (uploaded again only if an address moved). Anything
else (a new group, a loaded state dict, another gradient layout, a lost gradient, a backend request,
``torch.compile``, DTensors) takes the general path through the ``sgd_step`` custom op, which builds a new plan.
``python -m benchmarks.bench_host --ops sgd_step`` measures it (1000 parameters of 8x8, momentum and weight decay,
CPU tensors, kernel executions stubbed, interleaved with ``torch.optim.SGD(fused=True)``): 0.82-0.84x torch's fused
step on a loaded 2-core machine (about 1300 µs against 1550 µs); about 1.05x with new gradient tensors at new
addresses every step (the gradients' table column is rebuilt).
"""
import collections
import functools
import importlib
import itertools
import operator

import torch

from scratchops._backend import LAUNCHES, backend_op, choose_backend, current_backend, eager_plain
from scratchops._common import compute_dtype

KERNELS = "optim"


# ----------------------------------------------------------------- reference math
def sgd_step(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
             fresh: list[bool], lr: torch.Tensor, weight_decay: float, momentum: float, dampening: float,
             nesterov: bool, maximize: bool) -> None:
    """One SGD update of ``params`` (and ``momentum_buffers`` when μ ≠ 0), in place, tensor by tensor.

    ``fresh[i]`` says that ``momentum_buffers[i]`` is new: it is set to g rather than decayed. ``lr`` is a
    0-d tensor on the parameters' device (read there: no host sync).
    """
    for i, p in enumerate(params):
        acc = p.dtype if p.is_complex() else compute_dtype(p.dtype)
        w, g = p.to(acc), (-grads[i] if maximize else grads[i]).to(acc)  # g ← ±∇
        if weight_decay != 0:
            g = g + weight_decay * w
        if momentum != 0:
            buf = momentum_buffers[i]
            b = g if fresh[i] else momentum * buf.to(acc) + (1 - dampening) * g
            buf.copy_(b)
            b = buf.to(acc)  # the update uses the buffer as stored, rounded to its dtype
            g = g + momentum * b if nesterov else b
        p.copy_(w - lr.to(acc) * g)


# ----------------------------------------------------------------- backend op
sgd_step_op = backend_op("sgd_step", sgd_step, KERNELS, mutates_args=("params", "momentum_buffers"))


# ----------------------------------------------------------------- optimizer
def _number(value) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)


_LR_CACHE: dict = {}  # (device, η) -> its 0-d device tensor: a training loop reuses a few values


def _lr(value, device: torch.device) -> torch.Tensor:
    """η as a 0-d float64 tensor on ``device``: a tensor η converted there (no sync), a number uploaded once."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float64, non_blocking=True).reshape(())
    key = (device, float(value))
    hit = _LR_CACHE.get(key)
    if hit is None:
        if len(_LR_CACHE) >= 16:
            try:  # oldest first; another thread may be evicting too
                _LR_CACHE.pop(next(iter(_LR_CACHE)), None)
            except (StopIteration, RuntimeError):
                pass
        hit = _LR_CACHE[key] = torch.tensor(float(value), dtype=torch.float64).to(device)
    return hit


@functools.cache
def _kernels():
    """The Triton launcher module (the plans live there), imported on first use."""
    return importlib.import_module(f"scratchops._kernels.{KERNELS}")


_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_BUFFER = operator.methodcaller("get", "momentum_buffer")
_DATA_PTR = torch.Tensor.data_ptr
_NUMEL = torch.Tensor.numel
_CONTIGUOUS = torch.Tensor.is_contiguous
_DETACH = torch.Tensor.detach
_PLAIN = {torch.Tensor, torch.nn.Parameter}

_CHANGES = [0]  # bumped by every change to an optimizer's state or to one of its entries


def _counted(method):
    def change(self, *args, **kwargs):
        _CHANGES[0] += 1
        return method(self, *args, **kwargs)
    return change


_MUTATORS = ("__setitem__", "__delitem__", "pop", "popitem", "clear", "update", "setdefault")


class _Entry(dict):
    """One parameter's state (``{"momentum_buffer": b}``) that counts its changes in ``_CHANGES``."""


class _State(collections.defaultdict):
    """The optimizer's ``state``, torch's ``defaultdict(dict)`` with :class:`_Entry` entries, counting its
    changes (``__missing__`` inserts through ``__setitem__``): a kept plan knows that no entry was added,
    replaced, removed or edited (a buffer assigned) by comparing one number, without looking each parameter up."""

    def __init__(self, entries=()):
        super().__init__(_Entry)
        for key, value in dict(entries).items():
            self[key] = value if isinstance(value, _Entry) else _Entry(value)

    def __reduce__(self):
        return _State, (dict(self),)


for _name in _MUTATORS:
    setattr(_Entry, _name, _counted(getattr(dict, _name)))
    setattr(_State, _name, _counted(getattr(collections.defaultdict, _name)))


@functools.cache
def _dtensor_type():
    """torch's DTensor class (FSDP2's sharded parameters), or () where torch.distributed is not built."""
    try:
        return importlib.import_module("torch.distributed.tensor").DTensor
    except (ImportError, AttributeError):
        return ()


def _local_shards(params, grads, buffers):
    """What a step updates: for a DTensor parameter (FSDP2, tensor parallel) this rank's shards of it, its
    gradient and its momentum buffer (the update is elementwise: stepping the shards steps the tensor).
    A gradient placed otherwise is redistributed first, as DTensor arithmetic would; a buffer must match."""
    dtensor = _dtensor_type()
    if not any(isinstance(p, dtensor) for p in params):
        return params, grads, buffers

    def local(t, p, what):
        if not isinstance(p, dtensor):
            return t
        layout = (p.device_mesh, p.placements)
        if what == "gradient" and isinstance(t, dtensor) and (t.device_mesh, t.placements) != layout:
            t = t.redistribute(*layout)
        if not isinstance(t, dtensor) or (t.device_mesh, t.placements) != layout:
            raise RuntimeError(f"scratchops.optim.SGD: the {what} of a DTensor parameter must be a DTensor on its "
                               f"mesh with its placements {p.placements}, got {type(t).__name__}")
        return t.to_local()

    return ([local(p, p, "parameter") for p in params], [local(g, p, "gradient") for g, p in zip(grads, params)],
            [local(b, p, "momentum buffer") for b, p in zip(buffers, params)])


def _picker(idx: list[int]):
    """A C-level getter of the items at ``idx`` of a list, as a list."""
    if len(idx) == 1:
        return lambda seq, i=idx[0]: [seq[i]]
    get = operator.itemgetter(*idx)
    return lambda seq: list(get(seq))


class _GroupPlan:
    """What one group's step reads (see the module docstring), and a launch per (device, dtype) bucket.

    It pins the memory the parameters had (``detach()`` aliases: while the plan lives no other tensor can
    be allocated at their addresses, so an unchanged address, size, dtype and contiguity mean unchanged
    memory), and holds the state entries and buffers. It holds no gradient: after
    ``zero_grad(set_to_none=True)`` the old ones are freed as usual.
    """

    def __init__(self, group, state, request, present, entries, buckets):
        self.group, self.state, self.changes, self.request = group, state, _CHANGES[0], request
        self.params = list(group["params"])
        self.present, self.all_present = present, all(present)
        self.present_params = list(itertools.compress(self.params, present))
        self.pinned = list(map(_DETACH, self.present_params))
        self.addresses = list(map(_DATA_PTR, self.present_params))
        self.dtypes = list(map(_DTYPE, self.present_params))
        self.numels = list(map(_NUMEL, self.present_params))
        self.has_momentum = entries is not None
        self.entries = entries  # the state dicts of the present parameters
        self.buffers = list(map(_BUFFER, entries)) if entries is not None else None
        self.buffer_addresses = list(map(_DATA_PTR, self.buffers)) if entries is not None else None
        self.buckets = buckets  # [(StepPlan, picker or None for the whole group)]

    def current(self, group, state, request):
        """The present (params, grads, buffers) when this plan still describes the group, else None.
        C-level passes over the group only (no Python loop per parameter)."""
        params = group["params"]
        if (group is not self.group or state is not self.state or _CHANGES[0] != self.changes
                or request != self.request or (_number(group["momentum"]) != 0) != self.has_momentum
                or len(params) != len(self.params) or not all(map(operator.is_, params, self.params))):
            return None
        grads = list(map(_GRAD, params))
        if list(map(operator.is_not, grads, itertools.repeat(None))) != self.present:
            return None  # a parameter gained or lost its gradient
        if not self.all_present:
            grads = list(itertools.compress(grads, self.present))
        present = self.present_params
        # .data assigned: a new tensor is at a new address (the old memory is pinned); a view of the old
        # memory (same address) with another size or layout is seen here; one with another dtype of the same
        # size (fp16 <-> bf16) is not checked for
        if (list(map(_DATA_PTR, present)) != self.addresses or list(map(_NUMEL, present)) != self.numels
                or not all(map(_CONTIGUOUS, present))):
            return None
        # a gradient of another kind (its shape is the parameter's: torch checks it when it is assigned)
        if (not set(map(type, grads)) <= _PLAIN or list(map(_DTYPE, grads)) != self.dtypes
                or not all(map(_CONTIGUOUS, grads))):
            return None
        # the buffers: the same objects (no entry changed), at the same addresses (no .data or set_)
        buffers = self.buffers
        if buffers is not None and list(map(_DATA_PTR, buffers)) != self.buffer_addresses:
            return None
        return present, grads, buffers

    def run(self, operands, group) -> None:
        """The step: one launch per bucket (the gradients' addresses read now), then the version counters."""
        params, grads, buffers = operands
        weight_decay, momentum = _number(group["weight_decay"]), _number(group["momentum"])
        dampening, nesterov, maximize = _number(group["dampening"]), bool(group["nesterov"]), bool(group["maximize"])
        kernels = _kernels()
        grad_addresses = list(map(_DATA_PTR, grads))
        for plan, pick in self.buckets:
            g = grad_addresses if pick is None else pick(grad_addresses)
            hyper = kernels.hyper_tensor(weight_decay, momentum, dampening, maximize, plan.device)
            plan.launch(g, _lr(group["lr"], plan.device), hyper, weight_decay, nesterov)
            LAUNCHES["sgd_step", "triton"] += 1
        # as the custom op would: autograd sees the writes
        torch.autograd.graph.increment_version(params if buffers is None else params + buffers)


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
        self.state = _State(self.state)
        self._plans: dict = {}  # id(group) -> _GroupPlan

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
                bucket = buckets.get((p.device, p.dtype))
                if bucket is None:
                    bucket = buckets[p.device, p.dtype] = ([], [])
                bucket[0].append(p)
                bucket[1].append(g)
            plan.append((group, list(buckets.values())))
        return plan

    def _step_group(self, group, buckets, eager: bool) -> None:
        """The general path: one ``sgd_step`` op per bucket; then, where it can, a plan for the next step."""
        momentum = _number(group["momentum"])
        backends = []
        for params, grads in buckets:
            bufs, fresh = [], []
            if momentum != 0:
                state = self.state
                for p, g in zip(params, grads):
                    buf = state[p].get("momentum_buffer") if p in state else None
                    fresh.append(buf is None)
                    # a new buffer is laid out as torch's (a clone of the gradient) and filled by the step
                    bufs.append(torch.empty_like(g, dtype=p.dtype) if buf is None else buf)
            local = _local_shards(params, grads, bufs)  # DTensors' shards: the tensors the step writes
            backend = choose_backend(local[0][0])
            backends.append(backend)
            sgd_step_op(backend, *local, fresh, _lr(group["lr"], local[0][0].device),
                        _number(group["weight_decay"]), momentum, _number(group["dampening"]),
                        bool(group["nesterov"]), bool(group["maximize"]))
            if any(fresh):
                for p, buf, new in zip(params, bufs, fresh):
                    if new:
                        self.state[p]["momentum_buffer"] = buf
        self._plans.pop(id(group), None)
        if eager and buckets and all(b == "triton" for b in backends):
            self._plans[id(group)] = self._plan(group, buckets, momentum != 0)

    def _plan(self, group, buckets, has_momentum):
        """A plan for the group's next step, or None when some operand needs the general path."""
        state = self.state
        if not isinstance(state, _State) or not all(isinstance(entry, _Entry) for entry in state.values()):
            self.state = state = _State(state)  # the state counts its changes from now on
        params = group["params"]
        grads = list(map(_GRAD, params))
        present = list(map(operator.is_not, grads, itertools.repeat(None)))
        present_params = list(itertools.compress(params, present))
        present_grads = list(itertools.compress(grads, present))
        entries = [state[p] for p in present_params] if has_momentum else None
        buffers = list(map(_BUFFER, entries)) if has_momentum else present_params
        operands = present_params + present_grads + buffers
        if not (all(b is not None for b in buffers) and set(map(type, operands)) <= _PLAIN and all(map(_CONTIGUOUS, operands))
                and all(g.dtype == p.dtype == b.dtype for p, g, b in zip(present_params, present_grads, buffers))):
            return None
        position = {id(p): i for i, p in enumerate(present_params)}
        plans = []
        for bucket_params, _ in buckets:
            p0 = bucket_params[0]
            pick = None if len(buckets) == 1 else _picker([position[id(p)] for p in bucket_params])
            p, b = (present_params, buffers) if pick is None else (pick(present_params), pick(buffers))
            plans.append((_kernels().StepPlan([t.numel() for t in p], [False] * len(p), p0.dtype, p0.device,
                                              has_momentum, list(map(_DATA_PTR, p)), list(map(_DATA_PTR, b))), pick))
        return _GroupPlan(group, self.state, current_backend(), present, entries, plans)

    def __setstate__(self, state):  # load_state_dict, unpickling and deepcopy come through here
        super().__setstate__(state)
        self.state = _State(self.state)
        self._plans = {}

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_not_differentiable()
        plans = self._plans
        if len(plans) > len(self.param_groups):  # groups were removed: forget their plans
            live = {id(group) for group in self.param_groups}
            for key in [key for key in plans if key not in live]:
                del plans[key]
        eager = eager_plain(())  # no compile, dispatch mode or transform (the tensors' types: per plan)
        request = current_backend()
        pending = []
        for group in self.param_groups:
            kept = plans.get(id(group)) if eager else None
            pending.append((group, kept, kept.current(group, self.state, request) if kept is not None else None))
        # the general path validates every group it runs before anything is written
        gathered = {id(g): b for g, b in self._gather()} if any(op is None for _, _, op in pending) else {}
        for group, kept, operands in pending:
            if operands is not None:
                kept.run(operands, group)
            else:
                self._step_group(group, gathered[id(group)], eager)
        return loss
