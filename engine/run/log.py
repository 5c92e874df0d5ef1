"""JSON-lines run log: one record per step, evaluation and event (also handed to live sinks: TensorBoard, W&B)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path


class JsonlLogger:
    """Append JSON records (with wall time) to a file, flushed per record so a crash loses none."""

    def __init__(self, path: str | Path, *, enabled: bool = True, sinks: Iterable = ()):
        self.path = Path(path)
        self.enabled = enabled
        self._fh = open(self.path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115 (kept open)
        self.sinks = list(sinks)  # objects with write(record) and close(), e.g. engine.run.live's

    def write(self, record: dict) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps({"time": round(time.time(), 3), **record}, default=_jsonable) + "\n")
        self._fh.flush()
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSON-lines log."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
