"""Engine benchmark: stock vLLM vs RLKV on the same workload, in the same run.

Shared by ``rlkv bench`` and ``benchmarks/engine_study.py``. Each engine config runs in its
own subprocess (one engine per process, so device memory is freed between configs).

  config.py        what a run measures: the config grammar (stock:FLASH_ATTN, rlkv:0.5, gated),
                   BenchSettings and their validation, the shared command-line options
  study.py         options -> settings -> supervised run -> study file -> table
  supervise.py     the parent: one child process per config, deadlines, relaying progress
  driver.py        the child: builds one engine and steps it (the only module importing vLLM/torch)
  progress.py      the child's progress events on its stdout, read back by the parent
  results.py       ratios against stock, merging runs into a study file, its path
  report.py        the table and the progress lines
  step_profile.py  --profile-steps: device time per kernel category over a window of steps
  __main__.py      ``python -m rlkv_vllm.bench --child ...``: the child's entry point

Everything but the driver (and step_profile, which it uses) is pure Python and imports neither
vLLM nor torch.
"""
