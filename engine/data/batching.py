"""Pieces, their merge order, exact batch cutting and the position after any batch.

Each worker (reader slot) sends "pieces": its next batch_size decoded samples, with the skip records
made while collecting them, numbered 0, 1, ... and ending with a final piece. The main process takes
the pieces in (number, worker) order and cuts them into batches of exactly batch_size. The position
after any batch is therefore a few counters per worker (pieces taken, raw samples they spanned) plus
how much of a partly used piece went out; once every worker is done, only fill batches remain.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor

from engine.data.samples import SkipRecord


@dataclass
class Batch:
    """images [B,3,H,W] float, texts [B,ctx] long, rows [B] long (global sample rows: the manifest's
    numbering, also the u table's), tar keys.

    The last `num_padding` entries are padding slots (`valid` False): they complete a rank's last batch(es)
    when its share holds fewer usable samples than its batches take, keep the batch's shape and hold copies
    of the rank's first samples of the epoch, so the model sees ordinary inputs; the objective masks them
    (no anchor, no negative, no estimate update, not counted as seen: `engine.objectives.padding`).
    """

    images: Tensor
    texts: Tensor
    rows: Tensor
    keys: list[str]
    num_padding: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def valid(self) -> Tensor:
        """[B] bool: True for the real samples, False for the padding slots at the end."""
        return torch.arange(len(self.keys)) < len(self.keys) - self.num_padding

    @property
    def num_real(self) -> int:
        return len(self.keys) - self.num_padding


class Skip(NamedTuple):
    """`count` samples skipped for `record`'s reason, with a detail for the log (the error, the counts)."""

    record: SkipRecord
    count: int
    detail: str = ""


@dataclass
class Piece:
    """Piece `index` of a worker: its next decoded samples (up to batch_size) and the skips made meanwhile.

    It spans raw samples raw_start..raw_end of the worker's (shuffled) stream; `final` marks the last
    piece; `offset` counts samples already cut off into earlier batches. Planning uses pieces without
    tensors (images and texts None).
    """

    worker: int
    index: int
    raw_start: int
    raw_end: int
    final: bool
    images: Tensor | None
    texts: Tensor | None
    rows: list[int]
    keys: list[str]
    skips: list[Skip] = field(default_factory=list)
    offset: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Piece:
        """Called by DataLoader's pinning thread."""
        if self.images is not None:
            self.images = self.images.pin_memory()
            self.texts = self.texts.pin_memory()
        return self

    def cut(self, n: int) -> Piece:
        """This piece without its first `n` samples."""
        return replace(
            self,
            images=self.images[n:] if self.images is not None else None,
            texts=self.texts[n:] if self.texts is not None else None,
            rows=self.rows[n:],
            keys=self.keys[n:],
            skips=[],
            offset=self.offset + n,
        )


def as_piece(batch: Batch) -> Piece:
    """A batch's samples as a piece of no worker, to queue again (fill batches)."""
    return Piece(-1, -1, 0, 0, True, batch.images, batch.texts, batch.rows.tolist(), list(batch.keys))


def keep_piece(piece: Piece) -> Piece:
    """DataLoader collate function: pieces arrive whole."""
    return piece


@dataclass(frozen=True)
class WorkerStart:
    """Where a worker (re)starts: its next piece number, the raw samples before it; `done`: nothing left."""

    next_piece: int = 0
    raw: int = 0
    done: bool = False


@dataclass(frozen=True)
class Position:
    """A rank's place in an epoch: after `batches_done` batches.

    `straddle` = (worker, n): that worker's next piece went partly into the last batch, its first n samples;
    `straddle_rest`: the rows of that piece not yet delivered. With every worker done, the rest of the
    epoch are fill batches.
    """

    epoch: int
    batches_done: int
    workers: tuple[WorkerStart, ...]
    straddle: tuple[int, int] | None = None
    straddle_rest: tuple[int, ...] | None = None

    @classmethod
    def start(cls, epoch: int, num_workers: int, *, batches_done: int = 0) -> Position:
        """Every worker from its first sample (with `batches_done` > 0: the clean end of an epoch)."""
        return cls(epoch, batches_done, (WorkerStart(),) * num_workers)

    @property
    def all_read(self) -> bool:
        """Every worker has delivered all its pieces."""
        return all(w.done for w in self.workers)


class PieceMerger:
    """Hands on pieces in (piece number, worker) order, whatever order the workers deliver them in."""

    def __init__(self, starts: tuple[WorkerStart, ...]):
        self.next_piece = [start.next_piece for start in starts]
        self.raw = [start.raw for start in starts]
        self.done = [start.done for start in starts]

    def progress(self) -> list[WorkerStart]:
        """Where each worker would restart after the pieces handed on so far."""
        return [WorkerStart(n, raw, done) for n, raw, done in zip(self.next_piece, self.raw, self.done)]

    def merge(self, pieces: Iterable[Piece]) -> Iterator[Piece]:
        pending: dict[tuple[int, int], Piece] = {}
        for piece in pieces:
            pending[(piece.worker, piece.index)] = piece
            while not all(self.done):
                worker = min(
                    (w for w, done in enumerate(self.done) if not done), key=lambda w: (self.next_piece[w], w)
                )
                ready = pending.pop((worker, self.next_piece[worker]), None)
                if ready is None:
                    break
                self.next_piece[worker] += 1
                self.raw[worker] = ready.raw_end
                self.done[worker] = ready.final
                yield ready
        if not all(self.done):
            raise RuntimeError(
                f"data workers {self.done} ended without their final piece (pending: {list(pending)})"
            )


def position_after(epoch: int, batches_done: int, merger: PieceMerger, queue: deque[Piece]) -> Position:
    """The position once `batches_done` batches are out; `queue` holds the rest of the last piece taken."""
    workers = merger.progress()
    straddle = None
    if queue:
        assert len(queue) == 1, "a batch is cut as soon as the queue can fill one"
        rest = queue[0]
        # The worker must produce that piece again; its first `offset` samples are then dropped.
        workers[rest.worker] = WorkerStart(rest.index, rest.raw_start, False)
        straddle = (rest.worker, rest.offset)
        return Position(epoch, batches_done, tuple(workers), straddle, tuple(rest.rows))
    return Position(epoch, batches_done, tuple(workers))


def planned_position(epoch: int, batches_done: int, *, slot_sizes: list[float], batch_size: int) -> Position:
    """The position after `batches_done` batches if worker w reads `slot_sizes[w]` samples, all usable.

    Past the batches those samples fill, every worker is done (the rest are fill batches).
    """
    merger = PieceMerger((WorkerStart(),) * len(slot_sizes))
    queue: deque[Piece] = deque()
    num_queued = num_yielded = 0

    def planned_pieces() -> Iterator[Piece]:
        # Same numbering as the workers: full pieces, then a final one with the rest (maybe empty).
        for index in itertools.count():
            for worker, size in enumerate(slot_sizes):
                start = index * batch_size
                if start > size:
                    continue
                n = min(batch_size, size - start)
                final = start + batch_size > size
                yield Piece(worker, index, start, start + n, final, None, None, [0] * n, [""] * n)
            if all(index * batch_size > size for size in slot_sizes):
                return

    for piece in merger.merge(planned_pieces()):
        if not len(piece):
            continue
        queue.append(piece)
        num_queued += len(piece)
        while num_queued >= batch_size:
            take_counts(queue, batch_size)
            num_queued -= batch_size
            num_yielded += 1
            if num_yielded == batches_done:
                return position_after(epoch, num_yielded, merger, queue)
    return Position(epoch, batches_done, tuple(merger.progress()))


def take_counts(queue: deque[Piece], batch_size: int) -> None:
    """`take_batch` for pieces without tensors (planning)."""
    needed = batch_size
    while needed:
        piece = queue.popleft()
        n = min(needed, len(piece))
        if n < len(piece):
            queue.appendleft(piece.cut(n))
        needed -= n


def take_batch(queue: deque[Piece], batch_size: int, *, pin: bool = False) -> Batch:
    """Cut the first `batch_size` samples off the queued pieces."""
    images, texts, rows, keys = [], [], [], []
    needed = batch_size
    while needed:
        piece = queue.popleft()
        n = min(needed, len(piece))
        assert piece.images is not None and piece.texts is not None
        images.append(piece.images[:n])
        texts.append(piece.texts[:n])
        rows.extend(piece.rows[:n])
        keys.extend(piece.keys[:n])
        if n < len(piece):
            queue.appendleft(piece.cut(n))
        needed -= n
    batch = Batch(
        images=_concat(images, pin),
        texts=_concat(texts, pin),
        rows=torch.tensor(rows, dtype=torch.long),
        keys=keys,
    )
    if pin:
        batch.rows = batch.rows.pin_memory()
    return batch


def _concat(parts: list[Tensor], pin: bool) -> Tensor:
    if len(parts) == 1:
        return parts[0].pin_memory() if pin and not parts[0].is_pinned() else parts[0]
    if not pin:
        return torch.cat(parts)
    out = torch.empty(
        (sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=True
    )
    return torch.cat(parts, out=out)
