"""The learner's policy: a frozen transformers model whose only trainable part is alpha [L, H_kv].

Every attention layer computes the oracle's gated semantics (``rlkv_vllm.core.hf_reference``, which
runs ``core.batched.gated_attention`` on the whole padded batch, or with ``attention="flex"`` its fused
equal ``core.fused.fused_gated_attention``: FlexAttention, memory linear in the sequence length), the
same function vLLM's gated mode computes in the rollout workers, so the sampler and the learner run one
policy. alpha starts at 1
(every head full) and is clamped to [0, 1] before every forward, as the reference does.

Sequences are scored right-padded: prompt then completion, positions 0 .. n-1, so the positions and
the Lambda window are those vLLM used. The vocabulary projection runs over the completion tokens
only, in blocks (``LOGIT_BLOCK``), so a 7K-token rollout never materialises [T, V] logits at once.
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from typing import Any

import torch

from rlkv_vllm.core.hf_reference import install_oracle

from .sampling import SamplingSpec, token_logprobs

# completion tokens per block of the vocabulary projection
LOGIT_BLOCK = 1024


@dataclass(frozen=True)
class Sequence:
    """One rollout: token ids of the prompt and of the sampled completion."""

    prompt: list[int]
    completion: list[int]


def checkpointed_layers(model: Any) -> list[Any]:
    """The modules transformers recomputes in the backward pass when gradient checkpointing is on."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


class GatedPolicy:
    """The frozen model plus ``alpha``.

    model: a transformers causal LM (its parameters are frozen here); sink/recent: the training
    window; compute_dtype: the attention's dtype (None: "batched" float32, float64 for a float64
    model; "flex" the model's dtype, kernels accumulating in float32).
    attention: "batched" (the PyTorch oracle's batched form), "flex" (the fused FlexAttention
    path: CUDA; on the CPU forward only, torch has no CPU backward for it) or "auto" (flex on
    CUDA, batched elsewhere).
    """

    def __init__(self, model: Any, *, sink: int, recent: int, compute_dtype: torch.dtype | None = None,
                 gradient_checkpointing: bool = False, attention: str = "batched") -> None:
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = model.config
        shape = (int(cfg.num_hidden_layers), int(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)))
        device = next(model.parameters()).device
        self.alpha = torch.nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device))
        self.sink, self.recent = sink, recent
        if attention not in ("auto", "batched", "flex"):
            raise ValueError(f"attention must be 'auto', 'batched' or 'flex', got {attention!r}")
        if attention == "auto":
            attention = "flex" if device.type == "cuda" else "batched"
        self.attention = attention
        install_oracle(model, alpha=self.alpha, sink=sink, recent=recent, compute_dtype=compute_dtype,
                       attention="fused" if attention == "flex" else "batched")
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.model.eval()  # no dropout: the sampler ran without it
        if gradient_checkpointing:
            # transformers checkpoints a layer only while it is in training mode: flag the decoder layers
            # alone (not their children, so attention dropout stays off) or eval() silently keeps every
            # layer's activations (an 8B model's 7K-token rollouts then do not fit a GPU)
            for layer in checkpointed_layers(model):
                layer.training = True

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        dummy_weights: bool = False, seed: int = 0, **kwargs: Any) -> "GatedPolicy":
        """dummy_weights: random weights of the folder's config (a speed run of a shape without its
        weights, as vLLM's load_format "dummy"), built on ``device`` directly."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if dummy_weights:
            torch.manual_seed(seed)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        return cls(model, **kwargs)

    def export_weights(self, out_dir: str, source_dir: str) -> str:
        """Write the model's weights (safetensors) with ``source_dir``'s config and tokenizer files into
        ``out_dir``: a dummy-weights run's rollout engines load these, so the sampler and the learner
        run one model (vLLM's own dummy initialiser draws different random weights)."""
        import shutil

        os.makedirs(out_dir, exist_ok=True)
        self.model.save_pretrained(out_dir, safe_serialization=True)
        for name in os.listdir(source_dir):  # config.json too: the saved one names our attention
            src = os.path.join(source_dir, name)
            if os.path.isfile(src) and not name.endswith((".safetensors", ".bin", ".pt")) \
                    and not name.endswith(".index.json"):
                shutil.copyfile(src, os.path.join(out_dir, name))
        return out_dir

    @property
    def device(self) -> torch.device:
        return self.alpha.device

    def clamp_(self) -> None:
        """alpha into [0, 1] in place (before every forward; the optimiser step may leave it outside)."""
        with torch.no_grad():
            self.alpha.clamp_(0.0, 1.0)

    def gates(self) -> torch.Tensor:
        """float32 [L, H_kv] clamped copy: what the rollout workers get."""
        return self.alpha.detach().clamp(0.0, 1.0).float().cpu()

    def completion_logprobs(self, seqs: list[Sequence], spec: SamplingSpec) -> list[torch.Tensor]:
        """Each completion token's log-prob under the sampled distribution (with grad to alpha).

        Returns one float32 [len(completion)] tensor per sequence. The caller bounds the batch's
        tokens (micro-batches); this runs one forward over the padded batch.
        """
        if not seqs:
            return []
        dev = self.device
        lengths = [len(s.prompt) + len(s.completion) for s in seqs]
        width = max(lengths)
        ids = torch.zeros(len(seqs), width, dtype=torch.long, device=dev)
        mask = torch.zeros(len(seqs), width, dtype=torch.long, device=dev)
        for i, s in enumerate(seqs):
            ids[i, : lengths[i]] = torch.tensor(s.prompt + s.completion, dtype=torch.long, device=dev)
            mask[i, : lengths[i]] = 1
        positions = torch.arange(width, device=dev).expand(len(seqs), width)
        hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                          use_cache=False).last_hidden_state  # [B, T, hidden]
        # the hidden state at position t predicts token t + 1
        rows, cols, targets = [], [], []
        for i, s in enumerate(seqs):
            start = len(s.prompt) - 1
            n = len(s.completion)
            rows.append(torch.full((n,), i, dtype=torch.long))
            cols.append(torch.arange(start, start + n, dtype=torch.long))
            targets.append(torch.tensor(s.completion, dtype=torch.long))
        rows_t, cols_t, targets_t = (torch.cat(x).to(dev) for x in (rows, cols, targets))
        picked = hidden[rows_t, cols_t]  # [N, hidden]
        head = self.model.get_output_embeddings()
        out = torch.cat([token_logprobs(head(picked[s:s + LOGIT_BLOCK]), targets_t[s:s + LOGIT_BLOCK], spec)
                         for s in range(0, picked.shape[0], LOGIT_BLOCK)])
        return list(out.split([len(s.completion) for s in seqs]))
