"""Higher-order autodiff through whole converted models, against torch (issue 13's worked cases).

Each case builds a small torch model, converts a deep copy with ``scratchops.convert``, and compares
the loss values and every parameter gradient in float64 on both backends:

* a WGAN-GP gradient penalty on a CNN (conv2d + relu + sigmoid + linear): ‖∂D(x̂)/∂x̂‖ enters the loss;
* a PINN residual on a tanh MLP: the Laplacian Σ ∂²u/∂x_i² enters the loss, so the parameter
  gradient takes third derivatives through every tanh;
* ``torch.func.hessian`` of a tanh MLP's output with respect to its input.
"""
import copy

import pytest
import torch
from torch import nn

import scratchops
from tests.helpers import DEVICE, expect_ops


def _pair(model):
    model = model.to(device=DEVICE, dtype=torch.float64)
    return model, scratchops.convert(copy.deepcopy(model), fuse=False)


def _assert_same_grads(ours, theirs):
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        if b.grad is None:  # the loss does not depend on it (a Laplacian ignores the last bias)
            assert a.grad is None or not a.grad.any(), f"{name}: torch gives no gradient"
            continue
        assert a.grad is not None, f"{name}: scratchops gave no gradient"
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"{name}: {m}")


def _wgan_gp(critic, real, fake, mix):
    """E[D(fake)] - E[D(real)] + 10 (‖∇_x̂ D(x̂)‖ - 1)², x̂ on the line between them."""
    x_hat = (mix * real + (1 - mix) * fake).requires_grad_()
    (g,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    penalty = (g.flatten(1).norm(dim=1) - 1).pow(2).mean()
    return critic(fake).mean() - critic(real).mean() + 10 * penalty


def test_wgan_gp_penalty_on_a_cnn(backend):
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.Sigmoid(),
                           nn.Flatten(), nn.Linear(2 * 2 * 2, 1))
    theirs, ours = _pair(critic)
    g = torch.Generator().manual_seed(1)
    real, fake = (torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    mix = torch.rand(2, 1, 1, 1, generator=g, dtype=torch.float64).to(DEVICE)
    with expect_ops(["conv2d_fwd", "conv2d_bwd_input", "relu_bwd", "sigmoid_bwd_y", "linear_fwd"]):
        loss = _wgan_gp(ours, real, fake, mix)
        loss.backward()
    expected = _wgan_gp(theirs, real, fake, mix)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    _assert_same_grads(ours, theirs)


def _pinn_residual(u, x):
    """mean (Δu(x) + sin(x₀))²: Δu = Σ_i ∂²u/∂x_i², taken by autograd through the network."""
    x = x.clone().requires_grad_()
    (du,) = torch.autograd.grad(u(x).sum(), x, create_graph=True)
    laplacian = sum(torch.autograd.grad(du[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(x.shape[1]))
    return (laplacian + torch.sin(x[:, 0])).pow(2).mean()


def test_pinn_laplacian_on_a_tanh_mlp(backend):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    theirs, ours = _pair(mlp)
    x = torch.rand(5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    with expect_ops(["linear_fwd", "tanh_bwd", "tanh_bwd_y"]):
        loss = _pinn_residual(ours, x)
        loss.backward()
    expected = _pinn_residual(theirs, x)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    _assert_same_grads(ours, theirs)


@pytest.mark.parametrize("fuse", [False, True])
def test_hessian_of_a_tanh_mlp(backend, fuse):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1), nn.Tanh()).to(DEVICE, torch.float64)
    ours = scratchops.convert(copy.deepcopy(mlp), fuse=fuse)
    x = torch.randn(3, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    with expect_ops(["linear_fwd"]):
        h = torch.func.hessian(lambda v: ours(v).sum())(x)
    torch.testing.assert_close(h, torch.func.hessian(lambda v: mlp(v).sum())(x))
