"""The child's progress events, as the supervisor reads them back.

The child's stdout and stderr go to one log file (vLLM writes there too); an event is one
line of it, ``@bench-event`` and a JSON object with its ``event`` kind. The supervisor
reads the file as it grows and prints the events, so a user sees each engine start and
generate without vLLM's own log lines.
"""

from __future__ import annotations

import json
from typing import Any

MARK = "@bench-event "
# how often a generating child reports; the supervisor polls more often than this
PROGRESS_EVERY_S = 10.0


def event_line(event: str, **fields: Any) -> str:
    """The log line of one event."""
    return MARK + json.dumps(dict(event=event, **fields))


def emit(event: str, **fields: Any) -> None:
    """Write one event to stdout (child side); flushed, since the parent reads the file live."""
    print(event_line(event, **fields), flush=True)


def parse_events(text: str) -> list[dict[str, Any]]:
    """The events in a chunk of log text (other lines are vLLM's and pass by)."""
    out = []
    for line in text.splitlines():
        i = line.find(MARK)
        if i < 0:
            continue
        try:
            ev = json.loads(line[i + len(MARK):])
        except ValueError:  # a line torn by another writer: lose the event, not the run
            continue
        if isinstance(ev, dict) and "event" in ev:
            out.append(ev)
    return out


class EventReader:
    """Reads the events a child appended to its log since the last call."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def new_events(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        # a line still being written waits for its newline
        complete, _, self._partial = (self._partial + chunk).rpartition(b"\n")
        return parse_events(complete.decode(errors="replace"))
