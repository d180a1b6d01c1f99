"""A reward plug-in for speed studies and tests: varied, deterministic rewards on a random model's text
(the tiny model's answers are noise, so correctness and agreement are always 0 and nothing would train)."""

from __future__ import annotations

import zlib
from typing import Any


def by_text_hash(batch: Any) -> list[list[float]]:
    """1 for completions whose text hashes even, else 0: about half of each group, stable across runs."""
    return [[float(zlib.crc32(text.encode()) % 2 == 0) for text in completions] for _, completions in batch]
