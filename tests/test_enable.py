"""scratchops.enable(): torch.nn.functional / torch / Tensor calls routed to scratchops, everything else torch's.

Models: one written with functional calls, torch's own layers, Hugging Face BERT and GPT-2 (random init from a
config), timm models (tests/helpers.import_timm). Each routed model is compared with the same model run by torch
alone (values and gradients), and the autograd graph is read to prove scratchops ran: under enable() no torch
backward node of a routed op is left, and the scratchops Functions' nodes are there; the backend-op counters show
the kernels (or reference formulas) ran.
"""
import functools
import os
import re
import threading

import pytest
import torch
import torch.nn.functional as F

import scratchops
from scratchops._backend import LAUNCHES
from tests.helpers import DEVICE, expect_ops, import_timm, tolerances

# torch's own backward nodes of the ops enable() routes (none may be left in a routed graph)
TORCH_NODES = {"AddmmBackward0", "MmBackward0", "ConvolutionBackward0", "ReluBackward0", "SigmoidBackward0",
               "TanhBackward0", "SoftmaxBackward0", "LogSoftmaxBackward0", "NllLossBackward0", "MseLossBackward0",
               "NativeDropoutBackward0", "LinearCrossEntropyBackward0"}


def graph_nodes(*outputs) -> set:
    """The autograd graph of ``outputs``: torch's nodes by type name, scratchops Functions' nodes as
    ``"scratchops:<Function>"`` (a custom Function's node knows its class: ``_forward_cls``)."""
    seen, names, stack = set(), set(), [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        cls = getattr(node, "_forward_cls", None)
        names.add(f"scratchops:{cls.__name__}" if cls is not None and cls.__module__.startswith("scratchops.")
                  else type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


def scratchops_nodes(names) -> set:
    return {n for n in names if n.startswith("scratchops:")}


class FunctionalNet(torch.nn.Module):
    """A model written the way HF/timm code is: functional calls inside forward, every routed spelling."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Parameter(torch.randn(4, 2, 3, 3, generator=g) * 0.3)
        self.conv_b = torch.nn.Parameter(torch.randn(4, generator=g) * 0.1)
        self.q = torch.nn.Linear(16, 16)
        self.k = torch.nn.Linear(16, 16)
        self.head = torch.nn.Parameter(torch.randn(5, 16, generator=g) * 0.2)

    def forward(self, image, target):
        h = F.relu(F.conv2d(image, self.conv, self.conv_b, padding=1))            # (B, 4, 4, 4)
        h = h.flatten(2).transpose(1, 2).reshape(image.shape[0], 4, 16)             # 4 tokens of 16
        q, k = torch.tanh(self.q(h)), self.k(h).sigmoid()
        attn = (q @ k.transpose(1, 2) / 4).softmax(-1)                              # Tensor.softmax
        h = F.dropout(attn @ h, p=0.0, training=self.training) + torch.relu(h)
        h = h.relu()                                                                # Tensor.relu
        logits = F.linear(h.mean(1), self.head)
        ce = F.cross_entropy(logits, target, label_smoothing=0.1)
        aux = F.mse_loss(torch.softmax(logits, 1), F.log_softmax(logits, dim=1).exp())
        return ce + aux + torch.log_softmax(logits, 1).mean() * 0.01


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(3, 2, 4, 4, generator=g, dtype=dtype).to(DEVICE)
    return image, torch.tensor([0, 3, 4], device=DEVICE)


def _run(model, enabled, *inputs):
    model.zero_grad()
    if enabled:
        with scratchops.enable():
            loss = model(*inputs)
    else:
        loss = model(*inputs)
    nodes = graph_nodes(loss)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], nodes


def test_functional_model_gives_torch_values_and_gradients_and_runs_scratchops(backend):
    model = FunctionalNet().to(DEVICE)
    inputs = _inputs()
    ref_loss, ref_grads, ref_nodes = _run(model, False, *inputs)
    assert not scratchops_nodes(ref_nodes) and {"ConvolutionBackward0", "SoftmaxBackward0"} <= ref_nodes
    with expect_ops(["conv2d_fwd", "linear_fwd"], backend):
        loss, grads, nodes = _run(model, True, *inputs)
    assert not nodes & TORCH_NODES, nodes & TORCH_NODES
    assert len(scratchops_nodes(nodes)) >= 6, nodes
    tol = tolerances(torch.float32, reduction_size=64)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)
    assert not scratchops.enabled()  # left: off again


def test_nn_modules_are_reached_through_their_functional_calls():
    """Unconverted torch.nn layers call F.linear / F.conv2d / F.relu / F.dropout: those run scratchops."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Dropout(0.0), torch.nn.Linear(12, 4), torch.nn.Tanh()).to(DEVICE)
    x = torch.randn(2, 1, 4, 4, device=DEVICE)
    with scratchops.use_backend("reference"), scratchops.enable():
        y = model(x)
    assert not graph_nodes(y) & TORCH_NODES and scratchops_nodes(graph_nodes(y))
    torch.testing.assert_close(y, model(x))


def test_torch_transformer_layer_matches_torch():
    """torch's own TransformerEncoderLayer and MultiheadAttention (with weights). Its feed-forward (F.linear,
    F.relu, F.dropout) runs scratchops; the calls inside F.multi_head_attention_forward stay torch's (a Python
    functional that enable() does not route runs with the mode off), and the values are torch's either way."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True).to(DEVICE)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).to(DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)

    def run(enabled):
        x.grad = None
        for p in [*layer.parameters(), *mha.parameters()]:
            p.grad = None
        with scratchops.use_backend("reference"), (scratchops.enable() if enabled else torch.enable_grad()):
            h = layer(x)
            out, weights = mha(h, h, h, need_weights=True)
            loss = out.square().mean() + weights.mean()
        nodes = graph_nodes(loss)
        loss.backward()
        return loss.detach(), [x.grad.clone()] + [p.grad.clone() for p in [*layer.parameters(), *mha.parameters()]], \
            nodes

    ref, ref_grads, _ = run(False)
    loss, grads, nodes = run(True)
    assert len(scratchops_nodes(nodes)) >= 2 and "ReluBackward0" not in nodes, nodes
    tol = tolerances(torch.float32, reduction_size=64)
    torch.testing.assert_close(loss, ref, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


# timm models, random init, 32x32 inputs: timm's own small test architectures (a ResNet, a ViT, a ConvNeXt) and an
# MLP-Mixer (timm's MlpMixer, patch 16, 2 blocks of width 64, at 32x32: 4 tokens). img_size shrinks the token
# grids; attention is timm's unfused form (q·kᵀ, softmax: a routed call), as set_fused_attn(False) asks.
TIMM_MODELS = {"test_resnet": {}, "test_vit": {"img_size": 32}, "test_convnext": {},
               "mixer": {"img_size": 32, "patch_size": 16, "num_blocks": 2, "embed_dim": 64}}
TIMM_ROUTED = {"ConvolutionBackward0", "AddmmBackward0", "MmBackward0", "SoftmaxBackward0", "NllLossBackward0",
               "LogSoftmaxBackward0", "ReluBackward0"}


@pytest.mark.parametrize("name,how", [("test_resnet", "convert"), *[(n, "enable") for n in TIMM_MODELS]])
def test_timm_model_matches_torch(name, how):
    """A real timm model run by torch, then with scratchops (enable(), or convert() and enable() for the
    functional calls convert cannot reach): torch's loss and parameter gradients, and the graph shows the
    routed ops ran as scratchops Functions (none of torch's nodes for them is left). Reference backend: the
    Triton interpreter takes minutes for these models on CPU."""
    timm = import_timm()
    timm.layers.set_fused_attn(False)
    torch.manual_seed(0)
    create = timm.models.MlpMixer if name == "mixer" else functools.partial(timm.create_model, name, pretrained=False)
    model = create(num_classes=10, **TIMM_MODELS[name]).to(DEVICE).train()
    for m in model.modules():  # dropout masks differ between the libraries by design
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    target = torch.tensor([1, 7], device=DEVICE)
    results = []
    for routed in (False, True):
        if routed and how == "convert":
            scratchops.convert(model)
        model.zero_grad()
        with scratchops.use_backend("reference"), (scratchops.enable() if routed else torch.enable_grad()):
            loss = F.cross_entropy(model(x), target)
        nodes = graph_nodes(loss)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], nodes))
    (ref, ref_grads, ref_nodes), (loss, grads, nodes) = results
    assert ref_nodes & TIMM_ROUTED and not scratchops_nodes(ref_nodes)
    assert not nodes & TIMM_ROUTED, nodes & TIMM_ROUTED
    assert len(scratchops_nodes(nodes)) >= 2, nodes
    assert len(grads) == len(ref_grads)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs: never reach the hub
    try:
        import transformers
    except Exception as e:  # not installed (the dev extra has it), or broken next to this torch
        pytest.skip(f"transformers is not usable here: {type(e).__name__}: {e}")
    return transformers


def _hf_model(kind):
    """A tiny randomly initialised Hugging Face model (built from a config: nothing is downloaded), dropout 0,
    eager attention (its softmax is a torch call; the fused SDPA kernel is not an op scratchops has)."""
    tf = _transformers()
    torch.manual_seed(0)
    if kind == "bert":
        config = tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=16, num_labels=3,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        config._attn_implementation = "eager"
        return tf.BertForSequenceClassification(config), torch.tensor([0, 2])
    config = tf.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "eager"
    return tf.GPT2LMHeadModel(config), None


# torch nodes that must be gone per model (GPT-2's Conv1D projections call torch.addmm, which is not routed)
HF_ROUTED = {"bert": {"AddmmBackward0", "SoftmaxBackward0", "TanhBackward0", "NllLossBackward0",
                      "LogSoftmaxBackward0"},
             "gpt2": {"SoftmaxBackward0", "TanhBackward0", "NllLossBackward0", "LogSoftmaxBackward0"}}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hugging_face_model_matches_torch(kind):
    """BERT (nn.Linear, F.softmax in attention, tanh pooler, cross-entropy head) and GPT-2 (torch.tanh in its
    GELU, softmax, the LM loss's F.cross_entropy): torch's loss and gradients, scratchops' graph."""
    model, labels = _hf_model(kind)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    labels = ids if labels is None else labels
    results = []
    for enabled in (False, True):
        model.zero_grad()
        with scratchops.use_backend("reference"), (scratchops.enable() if enabled else torch.enable_grad()):
            loss = model(input_ids=ids, labels=labels).loss
        nodes = graph_nodes(loss)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], nodes))
    (ref, ref_grads, ref_nodes), (loss, grads, nodes) = results
    assert HF_ROUTED[kind] & ref_nodes and not scratchops_nodes(ref_nodes)
    assert not nodes & HF_ROUTED[kind], nodes & HF_ROUTED[kind]
    assert len(scratchops_nodes(nodes)) >= 3, nodes
    assert len(grads) == len(ref_grads)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ fallbacks: torch's op, torch's result


@pytest.mark.parametrize("call", [
    pytest.param(lambda: torch.relu(torch.arange(-3, 3)), id="int relu"),
    pytest.param(lambda: torch.tanh(torch.randn(4, dtype=torch.complex64)), id="complex tanh"),
    pytest.param(lambda: torch.sigmoid(torch.randn(4), out=torch.empty(4)), id="out="),
    pytest.param(lambda: F.linear(torch.arange(6).view(2, 3), torch.arange(3).view(1, 3)), id="int linear"),
    pytest.param(lambda: torch.softmax(torch.randn(2, 3).refine_names("a", "b"), "b"), id="named dim"),
    pytest.param(lambda: torch.relu(torch.randn(4, device="meta")), id="meta device"),
    pytest.param(lambda: F.cross_entropy(torch.randn(3, 4).to_sparse(), torch.tensor([0, 1, 2])),
                 id="sparse (torch raises)"),
])
def test_unsupported_calls_fall_back_to_torch(call):
    before = sum(LAUNCHES.values())
    torch.manual_seed(0)
    try:
        expected, expected_error = call(), None
    except Exception as e:
        expected, expected_error = None, e
    torch.manual_seed(0)  # the same inputs again
    with scratchops.enable():
        if expected_error is not None:
            with pytest.raises(type(expected_error), match=re.escape(str(expected_error)[:40])):
                call()
        else:
            got = call()
    assert sum(LAUNCHES.values()) == before, "a scratchops op ran for a call it does not take"
    if expected_error is None and got.device.type != "meta":
        torch.testing.assert_close(got, expected)


def test_softmax_dtype_argument_is_honoured():
    x = torch.randn(3, 5, requires_grad=True)
    with scratchops.use_backend("reference"), scratchops.enable():
        y = torch.softmax(x, 1, torch.float64)
        z = F.log_softmax(x, dim=0, dtype=torch.float64)
    assert y.dtype == z.dtype == torch.float64 and scratchops_nodes(graph_nodes(y, z))
    torch.testing.assert_close(y, torch.softmax(x, 1, torch.float64))
    torch.testing.assert_close(z, F.log_softmax(x, dim=0, dtype=torch.float64))


def test_inplace_spellings_modify_the_input():
    for spell in (lambda t: t.relu_(), torch.relu_, lambda t: F.relu(t, inplace=True)):
        x = torch.randn(8)
        expected = x.clamp(min=0)
        with scratchops.use_backend("reference"), scratchops.enable():
            before = LAUNCHES["relu_fwd", "reference"] + LAUNCHES.get(("relu__fwd", "reference"), 0)
            out = spell(x)
        assert out is x
        torch.testing.assert_close(x, expected)
        assert sum(n for (op, b), n in LAUNCHES.items() if op.startswith("relu") and b == "reference") > before


def test_linear_cross_entropy_is_routed():
    import scratchops.functional as SF

    if not hasattr(F, "linear_cross_entropy") or not hasattr(SF, "linear_cross_entropy"):
        pytest.skip("this torch or this scratchops has no linear_cross_entropy")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(5, 8, generator=g, requires_grad=True)
    t = torch.tensor([0, 4, 2, 1, 3, 0])
    expected = F.linear_cross_entropy(x, w, t, label_smoothing=0.1)
    ex, ew = torch.autograd.grad(expected, (x, w))
    with scratchops.use_backend("reference"), scratchops.enable():
        loss = F.linear_cross_entropy(x, w, t, label_smoothing=0.1)
    nodes = graph_nodes(loss)
    assert scratchops_nodes(nodes) and not nodes & TORCH_NODES, nodes
    gx, gw = torch.autograd.grad(loss, (x, w))
    for a, b in ((loss, expected), (gx, ex), (gw, ew)):
        torch.testing.assert_close(a, b, **tolerances(torch.float32, reduction_size=8))


def test_dropout_is_routed():
    x = torch.ones(64, 64, requires_grad=True)
    with scratchops.use_backend("reference"), scratchops.enable():
        y = F.dropout(x, 0.5)
        z = torch.dropout(x, 0.5, True)
    for t in (y, z):
        assert "NativeDropoutBackward0" not in graph_nodes(t) and scratchops_nodes(graph_nodes(t))
        assert set(t.detach().unique().tolist()) <= {0.0, 2.0}


# ------------------------------------------------------------------ state: on/off, nesting, threads, backward


def test_call_and_context_manager_forms_nest_and_disable():
    x = torch.randn(4, requires_grad=True)
    assert not scratchops.enabled()
    handle = scratchops.enable()
    try:
        assert scratchops.enabled() and scratchops_nodes(graph_nodes(torch.tanh(x)))
        with scratchops.enable():
            with scratchops.enable():
                assert scratchops.enabled()
            assert scratchops.enabled()
        assert scratchops.enabled()  # the outer call's enable() is still in effect
    finally:
        scratchops.disable()
    assert not scratchops.enabled() and graph_nodes(torch.tanh(x)) == {"TanhBackward0", "AccumulateGrad"}
    handle.__exit__(None, None, None)  # after disable(): harmless
    with scratchops.enable():
        scratchops.disable()
        assert not scratchops.enabled()
    assert not scratchops.enabled()
    scratchops.disable()  # when off: harmless


def test_state_is_per_thread():
    x = torch.randn(4, requires_grad=True)
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait(10)
        seen["enabled"] = scratchops.enabled()
        seen["nodes"] = graph_nodes(torch.tanh(x))
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with scratchops.enable():
        inside.set()
        done.wait(10)
        mine = graph_nodes(torch.tanh(x))
    thread.join(10)
    assert seen == {"enabled": False, "nodes": {"TanhBackward0", "AccumulateGrad"}}
    assert scratchops_nodes(mine)


def test_calls_during_backward_are_not_routed():
    """A hook's torch calls during backward stay torch's (and scratchops' own backward formulas too)."""
    x = torch.randn(5, requires_grad=True)
    hooked = {}

    def hook(grad):
        before = dict(LAUNCHES)
        hooked["value"] = torch.sigmoid(grad)
        hooked["launches"] = sum(LAUNCHES.values()) - sum(before.values())
        return grad

    with scratchops.use_backend("reference"), scratchops.enable():
        y = torch.tanh(x)
        y.register_hook(hook)
        y.sum().backward()
    assert hooked["launches"] == 0
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()) ** 2)


def test_torch_func_transforms_run_torch():
    """Under vmap/grad the calls are torch's (it carries every transform rule); results as without enable()."""
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    f = lambda t: F.linear(t, w).tanh().softmax(-1).sum()  # noqa: E731
    expected = (torch.func.vmap(lambda t: F.linear(t, w).tanh())(x), torch.func.grad(f)(x[0]))
    before = sum(LAUNCHES.values())
    with scratchops.enable():
        got = (torch.func.vmap(lambda t: F.linear(t, w).tanh())(x), torch.func.grad(f)(x[0]))
        assert scratchops_nodes(graph_nodes(torch.tanh(x.requires_grad_())))  # routed again after the transforms
    assert sum(LAUNCHES.values()) - before == 1  # only the last tanh
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_another_mode_above_blocks_disable():
    from torch.overrides import TorchFunctionMode

    scratchops.enable()
    other = TorchFunctionMode()
    other.__enter__()
    try:
        with pytest.raises(RuntimeError, match="still active"):
            scratchops.disable()
    finally:
        other.__exit__(None, None, None)
        scratchops.disable()
    assert not scratchops.enabled()


# ------------------------------------------------------------------ torch.compile


def test_under_torch_compile():
    model = FunctionalNet().to(DEVICE)
    inputs = _inputs()
    ref_loss, ref_grads, _ = _run(model, False, *inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    before = LAUNCHES["linear_fwd", "reference"]
    model.zero_grad()
    with scratchops.use_backend("reference"), scratchops.enable():
        loss = compiled(*inputs)
    loss.backward()
    assert LAUNCHES["linear_fwd", "reference"] > before, "the compiled graph did not run scratchops' linear"
    tol = tolerances(torch.float32, reduction_size=64)
    torch.testing.assert_close(loss.detach(), ref_loss, **tol)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, **tol)
