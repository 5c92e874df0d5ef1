"""JSON-lines run log: one record per step, evaluation and event."""

from __future__ import annotations

import json
import time
from pathlib import Path


class JsonlLogger:
    """Append JSON records (with wall time) to a file, flushed per record so a crash loses none."""

    def __init__(self, path: str | Path, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._fh = open(self.path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115 (kept open)

    def write(self, record: dict) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps({"time": round(time.time(), 3), **record}, default=_jsonable) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSON-lines log."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
