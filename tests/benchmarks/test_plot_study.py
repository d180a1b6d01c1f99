"""benchmarks/plot_study.py: every committed study file plots; bad input gets one line."""

from __future__ import annotations

import glob
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
pytest.importorskip("matplotlib")
import plot_study  # noqa: E402

STUDIES = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json")))


def _kind(path: str) -> str:
    return os.path.basename(path).split("-")[0]


@pytest.mark.parametrize("path", [p for p in STUDIES if _kind(p) in ("engine", "steady", "latency")],
                         ids=os.path.basename)
def test_committed_studies_plot(path: str, tmp_path) -> None:
    out = tmp_path / "x.png"
    assert plot_study.main([path, "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_unknown_study_kind_is_one_line(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"study": "nope", "results": []}')
    assert plot_study.main([str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "study = 'nope' is not allowed: must be one of engine, steady" in err
