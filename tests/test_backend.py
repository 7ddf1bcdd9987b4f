"""The one dispatch point: use_backend, SCRATCHOPS_BACKEND, and what an unmeetable request does."""
import pytest
import torch

import scratchops
import scratchops.functional as SF
from scratchops._backend import LAUNCHES, choose_backend, requested_backend
from tests.helpers import DEVICE, backend_skip_reason, make


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("SCRATCHOPS_BACKEND", raising=False)
    assert requested_backend() == "auto"


def test_env_var_and_context_manager(monkeypatch):
    monkeypatch.setenv("SCRATCHOPS_BACKEND", "reference")
    assert requested_backend() == "reference"
    x = make((4,))
    before = LAUNCHES["relu_fwd", "reference"]
    SF.relu(x)
    assert LAUNCHES["relu_fwd", "reference"] == before + 1
    with scratchops.use_backend("auto"):  # the innermost request wins over the environment
        assert requested_backend() == "auto"
        with scratchops.use_backend("triton"):
            assert requested_backend() == "triton"
        assert requested_backend() == "auto"
    assert requested_backend() == "reference"


def test_unknown_backend_names_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        with scratchops.use_backend("cuda"):
            pass
    monkeypatch.setenv("SCRATCHOPS_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        SF.relu(make((3,)))


def test_auto_prefers_triton_where_it_runs():
    x = make((3,))
    expected = "reference" if backend_skip_reason("triton") else "triton"
    with scratchops.use_backend("auto"):
        assert choose_backend(x) == expected


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors only")
def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = make((3,))
    with scratchops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="backend 'triton' was requested but cannot run: CPU tensors need"):
            SF.sigmoid(x)
    with scratchops.use_backend("auto"):  # auto falls back to the reference
        assert choose_backend(x) == "reference"
        torch.testing.assert_close(SF.sigmoid(x), torch.sigmoid(x))


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's bfloat16 gap only")
def test_bfloat16_under_interpreter():
    x = make((3,), torch.bfloat16)
    with scratchops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="does not support bfloat16"):
            SF.tanh(x)
    with scratchops.use_backend("auto"):
        torch.testing.assert_close(SF.tanh(x), torch.tanh(x))


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter only")
def test_interpreter_takes_loop_bounds_from_kernel_arguments():
    """A loop bound that is a kernel argument (the linear kernel's reduction over K, several BLOCK_K steps) runs in
    the interpreter on every supported Triton: 3.6's interpreter converted it with ``int()`` of a 1-element array,
    a TypeError with NumPy >= 2.4, in every kernel with such a loop (``_launch`` sets 3.7's conversion there)."""
    x, w = make((3, 200)), make((5, 200))
    with scratchops.use_backend("triton"):
        y = SF.linear(x, w)
    torch.testing.assert_close(y, x @ w.T)


def test_fresh_outputs_function_called_directly_only_without_a_graph(monkeypatch):
    """A Function declaring fresh_outputs runs its forward directly where autograd records nothing (a plain
    backward) and through autograd's apply where a graph is built (create_graph=True): the same gradients."""
    from scratchops.activations import ActivationGradFunction

    applied = []
    c_apply = ActivationGradFunction._c_apply
    monkeypatch.setattr(ActivationGradFunction, "_c_apply", lambda *args: applied.append(1) or c_apply(*args))
    x = make((5, 3), torch.float64, requires_grad=True)
    g = make((5, 3), torch.float64, seed=1)
    (plain,) = torch.autograd.grad(SF.sigmoid(x), x, g)
    assert applied == [] and plain.grad_fn is None
    (graphed,) = torch.autograd.grad(SF.sigmoid(x), x, g, create_graph=True)
    assert applied == [1] and graphed.grad_fn is not None
    torch.testing.assert_close(plain, graphed.detach())
    torch.testing.assert_close(plain, g * torch.sigmoid(x) * (1 - torch.sigmoid(x)))
    with torch.no_grad():  # grad mode off in the forward too: direct, no autograd node
        y = x.detach().sigmoid()
        assert ActivationGradFunction.apply(y, g, "sigmoid", choose_backend(y)).grad_fn is None
    assert applied == [1]
