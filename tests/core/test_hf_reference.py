"""The transformers model with the oracle's attention: a padded batch equals each row alone."""

from __future__ import annotations

import torch

from rlkv_vllm.core.hf_reference import load_reference_model


def _logits_alone(model, rows):
    return [model(input_ids=torch.tensor([r])).logits[0] for r in rows]


def test_padded_batch_equals_rows_alone(tiny_model):
    alpha = torch.tensor([[0.1, 0.9, 0.5, 0.0]] * 4)
    # float64 end to end: batch shapes change float32 GEMM rounding elsewhere in the model
    model = load_reference_model(tiny_model, alpha=alpha, sink=2, recent=5).double()
    rows = [[11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [30, 31, 32], [40, 41, 42, 43, 44, 45, 46]]
    alone = _logits_alone(model, rows)
    tk = max(map(len, rows))
    for side in ("left", "right"):
        ids = torch.full((len(rows), tk), 2, dtype=torch.long)
        mask = torch.zeros(len(rows), tk, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(tk - len(r), tk) if side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r)
            mask[i, sl] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        for i, r in enumerate(rows):
            sl = slice(tk - len(r), tk) if side == "left" else slice(0, len(r))
            torch.testing.assert_close(logits[i, sl], alone[i], rtol=1e-9, atol=1e-9)


def test_alpha_parameter_gets_gradients(tiny_model):
    alpha = torch.nn.Parameter(torch.full((4, 4), 0.5))
    model = load_reference_model(tiny_model, alpha=alpha, sink=2, recent=3)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.arange(7, 40).view(1, -1)
    out = model(input_ids=ids).logits
    assert out.dtype == torch.float32
    out.logsumexp(-1).sum().backward()
    assert alpha.grad is not None and alpha.grad.abs().sum() > 0
