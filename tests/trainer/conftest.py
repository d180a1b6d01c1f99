"""Fixtures for the trainer tests."""

from __future__ import annotations

from typing import Iterator

import pytest

from rlkv_trainer.grading import Grader


@pytest.fixture(scope="session")
def grader() -> Iterator[Grader]:
    """One two-worker pool for every test that only grades (starting one costs about a second)."""
    with Grader(2) as g:
        yield g
