"""RLKV's semantics without vLLM: settings, head patterns and selection, the plan, the oracle.

Nothing under ``rlkv_vllm.core`` imports vLLM (a test checks it in a process where vLLM
cannot be imported). The trainer, the CLI tools and the tests import from here; the
plugin side (compat, runtime, backends, ops, metrics) depends on the core, never the
reverse.

- ``settings``: ``RLKVSettings``, ``parse_settings``, ``RLKVConfigError``, ``ModelShape``;
- ``patterns``: pattern files, full/streaming selection, the tensor-parallel split;
- ``plan``: ``RLKVPlan`` (per-layer split, ring geometry and bytes) and ``build_plan``;
- ``reference``: the oracle (one sequence, per-row loop over a ragged batch);
- ``batched``: the batched, padding-aware gated attention (the trainer's learner);
- ``hf_reference``: a transformers model whose attention is the oracle's semantics.
"""
