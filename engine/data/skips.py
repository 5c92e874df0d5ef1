"""SkipReport: one rank's skipped samples, counted per shard and reason, logged and written to a skip file.

The one owner of skip reporting. While an epoch is read (`add`), the first SKIP_WARNINGS_PER_EPOCH
skipped samples are logged one by one and lost shard parts always; when the loader's epoch ends,
`log_epoch_totals` gives the totals if some were not logged one by one. A run's epoch end (`report`)
writes every skip not yet reported (epoch, shard, key, reason) to `<folder>/rank_<r>.jsonl` and logs
one line per shard with its counts by reason.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from engine.data.batching import Skip
from engine.data.samples import SkipRecord
from engine.run.log import JsonlLogger

logger = logging.getLogger(__name__)

# Skipped samples logged one by one per epoch and rank; the rest are counted, totalled at the epoch's end.
SKIP_WARNINGS_PER_EPOCH = 5


class SkipReport:
    """Skips of rank `rank`: `counts` (shard -> reason -> samples, every epoch), `records` (every skip, in order)."""

    def __init__(self, *, rank: int):
        self.rank = rank
        self.counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.records: list[SkipRecord] = []
        self._epoch: tuple[int, Counter[str]] = (-1, Counter())  # the epoch being read, its skips by reason
        self._num_reported = 0  # records already written by `report`
        self._file: JsonlLogger | None = None

    @property
    def num_skipped(self) -> int:
        return sum(sum(reasons.values()) for reasons in self.counts.values())

    def start_epoch(self, epoch: int) -> None:
        """Count the skips of `epoch` from zero for its log lines (the totals over epochs are kept)."""
        self._epoch = (epoch, Counter())

    def add(self, skips: Iterable[Skip], epoch: int) -> None:
        """Count skips of `epoch`; log lost shard parts always, skipped samples SKIP_WARNINGS_PER_EPOCH an epoch."""
        if self._epoch[0] != epoch:
            self.start_epoch(epoch)
        counts = self._epoch[1]
        for record, count, detail in skips:
            self.counts[record.shard][record.reason] += count
            self.records.append(record)
            if record.key is None:
                logger.error("rank %d: shard %s: %s, %d sample(s) lost%s", self.rank, record.shard, record.reason,
                             count, detail)
                continue
            num_logged = sum(counts.values())
            counts[record.reason] += count
            if num_logged < SKIP_WARNINGS_PER_EPOCH:
                logger.warning("skipping sample %s of shard %s: %s%s", record.key, record.shard, record.reason, detail)
                if num_logged + 1 == SKIP_WARNINGS_PER_EPOCH:
                    logger.warning("rank %d epoch %d: %d samples skipped; more are counted, not logged one by one "
                                   "(totals at the end of the epoch)", self.rank, epoch, SKIP_WARNINGS_PER_EPOCH)

    def log_epoch_totals(self, epoch: int) -> None:
        """At the end of reading `epoch`, the totals of its skipped samples if some were not logged one by one."""
        skip_epoch, counts = self._epoch
        num_skipped = sum(counts.values())
        if skip_epoch == epoch and num_skipped > SKIP_WARNINGS_PER_EPOCH:
            logger.warning("rank %d epoch %d: %d samples skipped (%d not logged one by one): %s", self.rank, epoch,
                           num_skipped, num_skipped - SKIP_WARNINGS_PER_EPOCH, dict(sorted(counts.items())))

    def report(self, epoch: int, folder: Path) -> None:
        """The skips since the last report, as epoch `epoch`'s: each (key, reason) in `folder/rank_<r>.jsonl`
        (created at the first skip), one warning per shard with its counts by reason."""
        records = self.records[self._num_reported:]
        self._num_reported = len(self.records)
        if not records:
            return
        if self._file is None:
            Path(folder).mkdir(exist_ok=True)
            self._file = JsonlLogger(Path(folder) / f"rank_{self.rank:05d}.jsonl")
        for record in records:
            self._file.write({"epoch": epoch, **record._asdict()})
        by_shard: dict[str, Counter[str]] = {}
        for record in records:
            by_shard.setdefault(record.shard, Counter())[record.reason] += 1
        for shard, reasons in sorted(by_shard.items()):
            logger.warning("epoch %d: shard %s: skipped %s (each sample in %s)", epoch, shard,
                           ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())), self._file.path)

    def close(self) -> None:
        """Close the skip file, if one was opened."""
        if self._file is not None:
            self._file.close()
            self._file = None
