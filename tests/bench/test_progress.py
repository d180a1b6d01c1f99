"""rlkv_vllm.bench.progress: the child's events, found among vLLM's log lines and read as the log grows."""

from __future__ import annotations

from pathlib import Path

from rlkv_vllm.bench.progress import EventReader, event_line, parse_events


def test_events_are_found_among_other_lines() -> None:
    text = "\n".join([
        "INFO 12-02 10:00:00 [core.py:90] Initializing a V1 LLM engine",
        event_line("engine_start", engine_start_s=12.5, capacity_tokens=4096),
        "(EngineCore pid=7) " + event_line("progress", done=1, total=4, tokens=10, elapsed_s=10.0, running=3),
        "@bench-event {torn",
        event_line("cell", batch=1, context=64, tpot_mean_s=None),
    ])
    assert [e["event"] for e in parse_events(text)] == ["engine_start", "progress", "cell"]
    assert parse_events(text)[1]["running"] == 3


def test_reader_returns_each_event_once_and_waits_for_whole_lines(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    reader = EventReader(str(log))
    assert reader.new_events() == []  # the child has not opened its log yet
    first = event_line("progress", done=1, total=2, tokens=5, elapsed_s=10.0, running=2)
    log.write_text("vllm noise\n" + first + "\n" + first[:20])
    assert [e["done"] for e in reader.new_events()] == [1]
    with log.open("a") as f:
        f.write(first[20:].replace('"done": 1', '"done": 2') + "\n")
    assert [e["done"] for e in reader.new_events()] == [2]
    assert reader.new_events() == []
