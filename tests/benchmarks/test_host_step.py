"""benchmarks/host_step.py: the slot path's host work per step, on this machine (a few iterations)."""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))

import host_step  # noqa: E402


def test_reuse_is_cheaper_than_a_rebuild_and_the_file_says_what_ran(tmp_path, capsys) -> None:
    out = tmp_path / "host.json"
    assert host_step.main(["--batches", "8", "512", "--iters", "30", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["study"] == "host-step" and d["cases"] == list(host_step.CASES) and d["vllm"]
    big = d["rows"][1]
    assert big["batch"] == 512
    # same rows: one list comparison; rebuilt: 512 slot lookups, a tensor and a copy
    assert big["same rows"]["median_us"] < big["always rebuilt"]["median_us"], big
    assert host_step.main(["--iters", "3"]) == 2
    assert "--iters = 3" in capsys.readouterr().out


def test_every_case_leaves_the_right_slots_in_the_buffer() -> None:
    import torch

    for case in host_step.CASES:
        rt = host_step.slot_runtime(6, torch.device("cpu"))
        ids = ["a", "b", "c"]
        with host_step._batch(ids):
            rt.slot_ids_on_device(3)
        if case == "one new row":
            rt.on_step(None, type("O", (), dict(finished_req_ids={"a"}, preempted_req_ids=set()))())
            ids = ["b", "c", "d"]
        with host_step._batch(ids):
            got = rt.slot_ids_on_device(3).tolist()
        assert got == [rt.slots.slot_of(r) for r in ids], (case, got)
