"""compat.permute_attention_heads on stand-in modules: which layers it permutes, what it refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlkv_vllm import compat
from rlkv_vllm.core.head_order import o_col_order, qkv_row_order

HQ, HKV, D, HIDDEN = 8, 4, 4, 16


class FakeImpl:
    num_heads, num_kv_heads, head_size = HQ, HKV, D

    def __init__(self, order):
        self.order, self.told = order, 0

    def rlkv_head_order(self, layer):
        return self.order

    def rlkv_heads_permuted(self, layer):
        self.told += 1


class FakeAttention(nn.Module):
    def __init__(self, order):
        super().__init__()
        self.impl = FakeImpl(order)


def _linear(out_f: int, in_f: int, bias: bool, quantized: bool = False) -> nn.Linear:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    lin = nn.Linear(in_f, out_f, bias=bias)
    lin.quant_method = object() if quantized else UnquantizedLinearMethod()
    return lin


class FakeSelfAttn(nn.Module):
    def __init__(self, order, quantized=False, extra=None):
        super().__init__()
        self.qkv_proj = _linear((HQ + 2 * HKV) * D, HIDDEN, True, quantized)
        self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, self.qkv_proj.head_size = HQ, HKV, D
        self.o_proj = _linear(HIDDEN, HQ * D, False)
        self.attn = FakeAttention(order)
        if extra is not None:
            self.extra = nn.Parameter(torch.ones(extra))


@pytest.fixture(autouse=True)
def fake_attention(monkeypatch):
    monkeypatch.setattr(compat, "attention_layer_cls", lambda: FakeAttention)
    compat._permute_refusals.clear()


def test_permutes_rows_and_columns_once():
    order = [3, 0, 1, 2]
    layer = FakeSelfAttn(order)
    w, b, ow = layer.qkv_proj.weight.clone(), layer.qkv_proj.bias.clone(), layer.o_proj.weight.clone()
    assert compat.permute_attention_heads(nn.ModuleList([layer])) == 1
    rows, cols = qkv_row_order(order, HQ, HKV, D), o_col_order(order, HQ // HKV, D)
    assert torch.equal(layer.qkv_proj.weight, w[rows]) and torch.equal(layer.qkv_proj.bias, b[rows])
    assert torch.equal(layer.o_proj.weight, ow[:, cols]) and layer.attn.impl.told == 1


def test_identity_and_unasked_layers_move_nothing():
    same, off = FakeSelfAttn([0, 1, 2, 3], quantized=True), FakeSelfAttn(None)
    w = (same.qkv_proj.weight.clone(), off.qkv_proj.weight.clone())
    assert compat.permute_attention_heads(nn.ModuleList([same, off])) == 1
    assert torch.equal(same.qkv_proj.weight, w[0]) and torch.equal(off.qkv_proj.weight, w[1])
    assert (same.attn.impl.told, off.attn.impl.told) == (1, 0)


@pytest.mark.parametrize("kw,reason", [({"quantized": True}, "quantized"),
                                       ({"extra": HQ * D}, "per-head parameter extra")])
def test_unsafe_layers_keep_the_gather_path(kw, reason, monkeypatch):
    said = []

    class Logger:
        def warning(self, msg, *args):
            said.append(msg % args)

    monkeypatch.setattr(compat, "plugin_logger", lambda: Logger())
    layers = nn.ModuleList([FakeSelfAttn([1, 0, 2, 3], **kw), FakeSelfAttn([1, 0, 2, 3], **kw)])
    w = layers[0].qkv_proj.weight.clone()
    assert compat.permute_attention_heads(layers) == 0
    assert torch.equal(layers[0].qkv_proj.weight, w) and layers[0].attn.impl.told == 0
    assert len(said) == 1 and reason in said[0], said  # once per reason


def test_per_head_attention_scales_keep_the_model_order(monkeypatch):
    """Per-KV-head q/k/v scales (fp8 checkpoints) are indexed by the model's heads: such a layer is not
    reordered; per-tensor scales are fine."""
    said = []

    class Logger:
        def warning(self, msg, *args):
            said.append(msg % args)

    monkeypatch.setattr(compat, "plugin_logger", lambda: Logger())
    per_head, per_tensor = FakeSelfAttn([1, 0, 2, 3]), FakeSelfAttn([1, 0, 2, 3])
    per_head.attn._k_scale = torch.ones(HKV)
    per_tensor.attn._q_scale, per_tensor.attn._k_scale = torch.tensor(0.5), torch.tensor(1.0)
    w = per_head.qkv_proj.weight.clone()
    assert compat.permute_attention_heads(nn.ModuleList([per_head, per_tensor])) == 1
    assert torch.equal(per_head.qkv_proj.weight, w) and per_head.attn.impl.told == 0
    assert per_tensor.attn.impl.told == 1
    assert len(said) == 1 and "per-head k_scale (4 values)" in said[0], said


def test_head_dim_norm_is_allowed():
    layer = FakeSelfAttn([1, 0, 2, 3], extra=D)  # a q_norm / k_norm over head_dim, shared by every head
    assert compat.permute_attention_heads(nn.ModuleList([layer])) == 1


class FakeModel(nn.Module):
    """A model of stand-in layers whose ``load_weights`` copies named tensors in the model's own head
    order (as vLLM's loaders do), recording what each parameter held when the load began."""

    def __init__(self, orders):
        super().__init__()
        self.layers = nn.ModuleList([FakeSelfAttn(o) for o in orders])
        self.seen: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        self.seen = {n: p.detach().clone() for n, p in params.items()}
        loaded = set()
        with torch.no_grad():
            for name, value in weights:
                if name == "fail":
                    raise RuntimeError("a load that fails half way")
                params[name].copy_(value)
                loaded.add(name)
        return loaded


class FakeRunner:
    def __init__(self, model):
        self.model = model

    def get_model(self):
        return self.model

    def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
        if is_checkpoint_format:
            return self.model.load_weights(weights_iterator)
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for name, value in weights_iterator:
                params[name].copy_(value)


ORDERS = ([3, 0, 1, 2], [0, 1, 2, 3], [2, 3, 0, 1])  # the middle one needs no reordering


def _permuted(orders, state):
    """``state`` (model-order tensors by name) as permute_attention_heads would leave it."""
    out = dict(state)
    for i, order in enumerate(orders):
        p = f"layers.{i}."
        rows, cols = qkv_row_order(order, HQ, HKV, D), o_col_order(order, HQ // HKV, D)
        out[p + "qkv_proj.weight"] = state[p + "qkv_proj.weight"][rows]
        out[p + "qkv_proj.bias"] = state[p + "qkv_proj.bias"][rows]
        out[p + "o_proj.weight"] = state[p + "o_proj.weight"][:, cols]
    return out


def _model_and_update():
    torch.manual_seed(0)
    model = FakeModel(ORDERS)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert compat.permute_attention_heads(model) == 3
    # a partial update in the model's order: layer 0's qkv weight and layer 2's o_proj
    update = {"layers.0.qkv_proj.weight": torch.randn((HQ + 2 * HKV) * D, HIDDEN),
              "layers.2.o_proj.weight": torch.randn(HIDDEN, HQ * D)}
    return model, original, update


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_later_load_weights_runs_in_the_model_order_and_is_reordered_after():
    model, original, update = _model_and_update()
    model.load_weights(iter(update.items()))
    for name, value in original.items():  # the loader saw the model's order
        assert torch.equal(model.seen[name], value), name
    want = _permuted(ORDERS, {**original, **update})
    for name, value in _state(model).items():
        assert torch.equal(value, want[name]), name
    with pytest.raises(RuntimeError, match="half way"):  # a failed load leaves the layout consistent
        model.load_weights(iter([("layers.0.o_proj.weight", torch.zeros(HIDDEN, HQ * D)), ("fail", None)]))
    want["layers.0.o_proj.weight"] = torch.zeros(HIDDEN, HQ * D)
    for name, value in _state(model).items():
        assert torch.equal(value, want[name]), name


def test_the_runner_reload_is_guarded_once_and_kernel_format_copied_as_given():
    model, original, update = _model_and_update()

    class Runner(FakeRunner):
        pass

    compat._guard_runner_reload(Runner)
    compat._guard_runner_reload(Runner)  # idempotent
    runner = Runner(model)
    runner.reload_weights(iter(update.items()))  # checkpoint format: through model.load_weights, reordered once
    want = _permuted(ORDERS, {**original, **update})
    for name, value in _state(model).items():
        assert torch.equal(value, want[name]), name
    own = _state(model)
    own["layers.0.qkv_proj.bias"] = torch.ones_like(own["layers.0.qkv_proj.bias"])
    runner.reload_weights(iter(own.items()), None, False)  # kernel format: the engine's own layout
    for name, value in _state(model).items():
        assert torch.equal(value, own[name]), name


def test_a_load_into_packed_weights_is_refused_before_anything_moves():
    """vLLM's CPU platform packs unquantized weights for its GEMM and frees them: one line, no change."""
    model, _, update = _model_and_update()
    with torch.no_grad():
        model.layers[2].qkv_proj.weight = nn.Parameter(torch.empty(0), requires_grad=False)
    before = _state(model)
    with pytest.raises(compat.WeightReloadError) as err:
        model.load_weights(iter(update.items()))
    msg = str(err.value)
    assert "\n" not in msg and "layers.2" in msg and "rlkv.permute_heads = false" in msg, msg
    for name, value in _state(model).items():
        assert torch.equal(value, before[name]), name
