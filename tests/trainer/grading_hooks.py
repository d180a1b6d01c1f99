"""Worker functions for the Grader tests (``Grader(worker_fn="tests.trainer.grading_hooks:...")``).

They run inside the grading workers, so they can misbehave in ways a monkeypatch in the test process cannot
reach: ignore the worker's soft-timeout alarm, or kill the worker outright.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from rlkv_trainer.grading import GradeItem, Verdict, grade_one


def misbehave(item: GradeItem, think_end: str | None) -> Verdict:
    """``"HANG"``: sleep with SIGALRM blocked (like C code the alarm cannot interrupt); ``"CRASH"``: exit the
    worker at once; ``"RAISE"``: raise; ``"ALLOC"``: allocate 3 GiB; anything else: grade normally."""
    if item.completion == "HANG":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(600)
    if item.completion == "CRASH":
        os._exit(3)
    if item.completion == "RAISE":
        raise RuntimeError("boom")
    if item.completion == "ALLOC":
        bytearray(3 << 30)  # 3 GiB
    return grade_one(item, think_end)


# defined in the test process only, not in a grading worker (workers run as ``python -c``): the parent's
# check of the path passes, and every worker then fails to start
if sys.argv[0] != "-c":
    broken_in_worker = misbehave
