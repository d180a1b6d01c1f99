"""rlkv_trainer: learn RLKV's per-(layer, KV head) gates with RL, rolling out with vLLM in gated mode.

Installed as ``rlkv_trainer`` from the top-level ``trainer/`` folder (``pip install rlkv-vllm[train]``).
It imports ``rlkv_vllm.core`` (settings, patterns, the plan, the oracle and its batched form) and talks to
vLLM only through the public ``LLM`` API, the attention-backend flag and the worker extension's RPCs.

It also holds ``rlkv eval`` (``eval_cli``, ``evaluate``, ``eval_tasks``, ``eval_client``, ``eval_stats``), which
talks to any OpenAI-compatible server through the openai client and grades with the same ``grading`` module
(MBPP through ``sandbox``) as the trainer's rewards.
"""
