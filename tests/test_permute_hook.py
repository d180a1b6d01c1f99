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


def test_head_dim_norm_is_allowed():
    layer = FakeSelfAttn([1, 0, 2, 3], extra=D)  # a q_norm / k_norm over head_dim, shared by every head
    assert compat.permute_attention_heads(nn.ModuleList([layer])) == 1
