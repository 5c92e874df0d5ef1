"""What a run shows on the console while it trains: a tqdm bar on a terminal, plain lines in a redirected log.

A bar redraws itself with carriage returns, which fill a log file with one copy per update; where stderr is
not a terminal a stage prints one line every `every_steps` steps or `every_s` seconds instead (and at its end).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

logger = logging.getLogger(__name__)

PLAIN_LINE_SECONDS = 30.0  # at most this long between two plain progress lines
# `extra={PER_RANK: True}` marks a log line that differs between ranks (the samples this rank skipped): every rank
# logs it. Other lines say the same on every rank and are logged by rank 0 only (`RankFilter`).
PER_RANK = "per_rank"


class RankFilter(logging.Filter):
    """On ranks other than 0: only per-rank lines (the data reader's, or marked PER_RANK) and errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.ERROR or getattr(record, PER_RANK, False)
                or record.name.startswith("engine.data"))


class StageProgress:
    """Progress of one stage on the main rank (`enabled`); `update(step, values)` after every step."""

    def __init__(self, stage: str, *, total: int, initial: int, enabled: bool, every_steps: int,
                 every_s: float = PLAIN_LINE_SECONDS, stream: TextIO | None = None):
        self.stage, self.total, self.enabled = stage, total, enabled
        self.every_steps, self.every_s = max(1, every_steps), every_s
        stream = stream if stream is not None else sys.stderr
        terminal = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.bar = (tqdm(total=total, initial=initial, desc=stage, unit="step", dynamic_ncols=True, file=stream)
                    if terminal else None)
        self._last_line = time.monotonic()

    def update(self, step: int, values: dict[str, str]) -> None:
        """Step `step` of the stage is done; `values` (name -> formatted value) are shown beside it."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(values)
            return
        now = time.monotonic()
        if self.enabled and (step % self.every_steps == 0 or step == self.total
                             or now - self._last_line >= self.every_s):
            self._last_line = now
            logger.info("%s step %d/%d: %s", self.stage, step, self.total,
                        ", ".join(f"{name} {value}" for name, value in values.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
