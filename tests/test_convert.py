"""scratchops.convert(model): what is converted, what is kept, fusion, and same outputs and gradients."""
import copy

import pytest
import torch

import scratchops
import scratchops.nn as SN
from scratchops.convert import TWINS
from tests.helpers import DEVICE, expect_ops, make, tolerances


class Custom(torch.nn.Module):
    """Layers held in a ModuleList, a ModuleDict and a plain attribute, with a forward of its own."""

    def __init__(self):
        super().__init__()
        self.acts = torch.nn.ModuleList([torch.nn.Sigmoid(), torch.nn.Tanh()])
        self.table = torch.nn.ModuleDict({"relu": torch.nn.ReLU(), "soft": torch.nn.Softmax(dim=-1)})
        self.log_soft = torch.nn.LogSoftmax(dim=1)

    def forward(self, x):
        return self.table["relu"](self.acts[1](self.acts[0](x)) - 0.6)


def every_layer():
    losses = {"mse": torch.nn.MSELoss(), "ce": torch.nn.CrossEntropyLoss(weight=torch.rand(5))}
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):  # torch >= 2.13
        losses["lce"] = torch.nn.LinearCrossEntropyLoss(5, 4, bias=True)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Flatten(),
        torch.nn.Linear(3 * 4 * 4, 5), torch.nn.Sigmoid(), Custom(), torch.nn.ModuleDict(losses))


def test_every_supported_layer_is_converted_in_place():
    model = every_layer()
    model[6].acts[1].eval()
    hook_calls = []
    model[6].acts[0].register_forward_hook(lambda *args: hook_calls.append(1))
    before = dict(model.named_modules())
    before_types = {name: type(m) for name, m in before.items()}
    params = {k: v for k, v in model.named_parameters()}
    buffers = {k: v for k, v in model.named_buffers()}
    keys = list(model.state_dict())
    out = scratchops.convert(model, fuse=False)  # fusion (Linear + Sigmoid here) has a test of its own
    assert out is model
    after = dict(model.named_modules())
    assert list(after) == list(before)
    converted = set()
    for name, module in after.items():
        assert module is before[name], f"{name} was replaced, not converted in place"
        assert isinstance(module, before_types[name])  # isinstance checks against the torch class still hold
        if type(module) in TWINS.values():
            converted.add(type(module))
            assert TWINS[before_types[name]] is type(module)
        assert type(module) not in TWINS, f"{name} ({type(module).__name__}) was not converted"
    assert converted == set(TWINS.values())
    assert model[4].activation is None
    assert all(p is params[k] for k, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert all(b is buffers[k] for k, b in model.named_buffers()) and "7.ce.weight" in buffers
    assert list(model.state_dict()) == keys
    assert model[6].acts[1].training is False and model[6].acts[0].training is True
    model[6].acts[0](torch.zeros(2))
    assert hook_calls == [1], "the forward hook was lost"


def test_root_module_is_converted():
    for layer in (torch.nn.ReLU(), torch.nn.Linear(2, 3), torch.nn.CrossEntropyLoss()):
        weight = getattr(layer, "weight", None)
        assert scratchops.convert(layer) is layer
        assert type(layer) is TWINS[type(layer).__bases__[0]]
        assert getattr(layer, "weight", None) is weight


def test_subclasses_and_other_layers_are_left_alone():
    class MyLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    attention = torch.nn.MultiheadAttention(4, 2)
    model = torch.nn.Sequential(MyLinear(2, 2), torch.nn.LazyLinear(3), torch.nn.Dropout2d(), torch.nn.GELU(),
                                torch.nn.Conv1d(1, 1, 1), attention)
    types = [type(m) for m in model.modules()]
    scratchops.convert(model)
    assert [type(m) for m in model.modules()] == types


def test_converting_twice_is_harmless():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    scratchops.convert(scratchops.convert(model))
    assert [type(m) for m in model] == [SN.Linear, torch.nn.Identity, SN.Linear]
    assert model[0].activation == "relu" and model[2].activation is None


def test_linear_activation_fusion():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3), torch.nn.Tanh(),
                                torch.nn.Linear(3, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 3), torch.nn.Dropout(),
                                torch.nn.ReLU(), torch.nn.Linear(3, 1))
    keys = list(model.state_dict())
    scratchops.convert(model)
    assert [getattr(m, "activation", "-") for m in model] == [
        "relu", "-", "tanh", "-", "sigmoid", "-", None, "-", "-", None]
    assert [type(m) for m in model][1:6:2] == [torch.nn.Identity] * 3
    assert type(model[8]) is SN.ReLU, "an activation after a Dropout must not be fused"
    assert list(model.state_dict()) == keys and len(model) == 10
    assert "activation='relu'" in repr(model)


def test_fusion_keeps_eval_mode():
    """The Identity taking a fused activation's slot has the mode the activation had (model.eval() holds)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()).eval()
    scratchops.convert(model)
    assert type(model[1]) is torch.nn.Identity
    assert not any(m.training for m in model.modules())


def test_no_fusion_when_unsafe():
    shared = torch.nn.Linear(3, 3)
    hooked = torch.nn.Linear(3, 3)
    hooked.register_forward_hook(lambda *args: None)

    class MySequential(torch.nn.Sequential):
        pass

    model = torch.nn.Sequential(shared, torch.nn.ReLU(), hooked, torch.nn.ReLU(), shared,
                                MySequential(torch.nn.Linear(3, 3), torch.nn.Tanh()))
    scratchops.convert(model)
    assert model[0].activation is None and model[2].activation is None and model[5][0].activation is None
    assert [type(m) for m in model][1:4:2] == [SN.ReLU, SN.ReLU] and type(model[5][1]) is SN.Tanh
    plain = scratchops.convert(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()), fuse=False)
    assert plain[0].activation is None and type(plain[1]) is SN.ReLU


def test_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        scratchops.convert(lambda x: x)


def _same_outputs_and_grads(model, inputs, ops, loss=None, target=None, reduction_size=1):
    """The converted copy of ``model`` gives the same outputs, input gradients and parameter gradients."""
    ours = scratchops.convert(copy.deepcopy(model))
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    ys = [x.detach().clone().requires_grad_() for x in inputs]
    with expect_ops(ops):
        a = ours(*xs)
        a = scratchops.convert(copy.deepcopy(loss))(a, target) if loss is not None else a
        b = model(*ys)
        b = loss(b, target) if loss is not None else b
        tol = tolerances(b.dtype, reduction_size)
        torch.testing.assert_close(a, b, **tol)
        grad = make(b.shape, b.dtype, seed=3)
        a.backward(grad)
        b.backward(grad)
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x.grad, y.grad, **tol)
    for (name, p), q in zip(ours.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"{name}: {m}")


def test_activation_model_same_outputs_and_grads(backend):
    model = torch.nn.Sequential(torch.nn.Tanh(), Custom(), torch.nn.Sigmoid()).to(DEVICE)
    _same_outputs_and_grads(model, [make((4, 7))], ["sigmoid_fwd", "sigmoid_bwd", "tanh_fwd", "relu_bwd"])


def test_mlp_same_outputs_and_grads(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 5)).to(DEVICE)
    target = torch.tensor([0, 3, 4, 1], device=DEVICE)
    _same_outputs_and_grads(model, [make((4, 6))], [], torch.nn.CrossEntropyLoss(),
                            target, reduction_size=8)


def test_cnn_same_outputs_and_grads(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 5, 4), torch.nn.LogSoftmax(dim=1))
    model.to(DEVICE).eval()  # dropout is the identity in eval mode: both sides see the same function
    _same_outputs_and_grads(model, [make((2, 2, 5, 5))], ["relu_bwd"], torch.nn.MSELoss(), make((2, 4), seed=5),
                            reduction_size=75)


def test_optimizer_built_before_conversion_still_trains_the_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    scratchops.convert(model)
    x, y = make((8, 3)), make((8, 1), seed=2)
    with scratchops.use_backend("reference"):
        torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
