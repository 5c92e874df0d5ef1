"""Per-sample normalisers: the u estimates a global contrastive objective divides by.

`Normaliser` is what an objective needs from them: the prior estimates of a batch's samples, the
moving-average weight gamma_t, and a place to put the updated estimates once the optimizer step
they served has been taken. `TableNormaliser` keeps one (log u_x, log u_z) row per training sample
in the memory-mapped `UTable` (SogCLR); a learned normaliser (NeuCLIP) is the next implementation.
Everything that must survive a restart goes through `state_dict` (small, JSON) and `save`/`load`
(the rows, into a checkpoint folder).
"""

from __future__ import annotations

import logging
import shutil
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import Tensor

from engine.distributed import DistContext, barrier, gather_no_grad, node_of_ranks
from engine.objectives.table import UTable
from engine.schedules import gamma_at_epoch

if TYPE_CHECKING:
    from engine.config import LossConfig

logger = logging.getLogger(__name__)


class Prior(NamedTuple):
    """Estimates of a batch's anchors before this step: log u_x, log u_z and whether each was seen."""

    log_u_x: Tensor
    log_u_z: Tensor
    seen: Tensor


class Normaliser(Protocol):
    """What a global contrastive objective reads and updates, and what a checkpoint keeps."""

    def prior(self, rows: Tensor, *, device: torch.device) -> Prior:
        """The current estimates of samples `rows` ([b] int64, global sample ids)."""

    def gamma(self) -> float:
        """The moving-average weight gamma_t of this epoch (paper eq. 3)."""

    def stage(self, rows: Tensor, log_u_x: Tensor, log_u_z: Tensor) -> None:
        """Hold this step's updated estimates until `commit` (a skipped step discards them)."""

    def commit(self) -> None:
        """Store the staged estimates: the optimizer step they belong to was taken."""

    def discard(self) -> None:
        """Drop the staged estimates: the step was skipped."""

    def end_epoch(self) -> None:
        """One more epoch of updates (advances gamma_t's schedule)."""

    def reset(self) -> None:
        """Forget every estimate and restart gamma_t (the 'no seeding of u' ablation). Collective."""

    def set_provenance(self, provenance: dict) -> None:
        """Record what computed the estimates (loss, margin, tau, eps, OSR steps). Collective."""

    def summary(self) -> dict:
        """Diagnostics for the run log (e.g. how many samples have an estimate)."""

    def state_dict(self) -> dict:
        """Small JSON state (schedule position)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`."""

    def save(self, directory: Path) -> None:
        """Write the estimates into checkpoint folder `directory` (collective)."""

    def load(self, directory: Path, *, reshard: bool = False) -> None:
        """Replace the live estimates by those `save` wrote, by any number of ranks (collective)."""

    def close(self) -> None:
        """Flush and release files."""


class TableNormaliser:
    """SogCLR's per-sample estimators, one memory-mapped row per training sample.

    One node (`replicated=False`): the live table is `<live_dir>`, shared by the ranks through the
    page cache; rank 0 creates, copies and resets it, every rank reads and writes the rows of its
    own samples. Several nodes (`replicated=True`): `<live_dir>` is this node's own complete
    replica, which no other node opens (page caches of different machines are not coherent on
    NFS); each step the updated rows of the whole global batch are gathered and the node's first
    rank writes them all, so every replica receives the same bytes. `publish_dir` then gets a copy
    of rank 0's replica at `close`.
    """

    supports_async_save = True  # `save_async`: rows copied to host memory, written by a thread

    def __init__(self, live_dir: Path, *, num_rows: int, dataset_fingerprint: str, ctx: DistContext,
                 gamma_min: float, gamma_decay_epochs: int, fresh: bool, replicated: bool = False,
                 node_leader: bool | None = None, publish_dir: Path | None = None):
        self.live_dir = Path(live_dir)
        self.num_rows = num_rows
        self.fingerprint = dataset_fingerprint
        self.ctx = ctx
        self.gamma_min = gamma_min
        self.gamma_decay_epochs = gamma_decay_epochs
        self.replicated = replicated
        # The one rank that creates, writes, resets and reseeds the live table of this node.
        self.owner = ctx.is_main if node_leader is None else node_leader
        self.publish_dir = Path(publish_dir) if publish_dir is not None else None
        self.epochs = 0  # epochs the estimates have been updated for (drives gamma_t)
        self._staged: tuple[Tensor, Tensor, Tensor] | None = None
        # A fresh run starts from an empty table, even over the leftovers of a run killed before
        # its first checkpoint.
        if self.owner and (fresh or not (self.live_dir / "u_table.json").exists()):
            UTable.create(self.live_dir, num_rows=num_rows, dataset_fingerprint=dataset_fingerprint).close()
        barrier()
        self.table = UTable.open(self.live_dir, dataset_fingerprint=dataset_fingerprint)

    def prior(self, rows: Tensor, *, device: torch.device) -> Prior:
        return Prior(*self.table.read(rows, device=device))

    def gamma(self) -> float:
        return gamma_at_epoch(self.epochs, gamma_min=self.gamma_min, decay_epochs=self.gamma_decay_epochs)

    def stage(self, rows: Tensor, log_u_x: Tensor, log_u_z: Tensor) -> None:
        self._staged = (rows, log_u_x, log_u_z)

    def commit(self) -> None:
        if self._staged is None:
            return
        if self.replicated:  # collective: every rank commits the same steps
            rows, log_u_x, log_u_z = self._staged
            # float64 holds int64 row ids below 2**53 and float32 values exactly: one gather per step.
            packed = torch.stack([rows.to(log_u_x.device, torch.float64), log_u_x.detach().double(),
                                  log_u_z.detach().double()], dim=1)
            packed = gather_no_grad(packed).cpu()
            if self.owner:
                self.table.write(packed[:, 0].long(), packed[:, 1].float(), packed[:, 2].float())
        else:
            self.table.write(*self._staged)
        self._staged = None

    def discard(self) -> None:
        self._staged = None

    def end_epoch(self) -> None:
        self.epochs += 1

    def flush(self) -> None:
        """Write this rank's dirty rows to the file."""
        self.table.flush()

    def num_seen(self) -> int:
        """Samples with an estimate."""
        return self.table.num_seen()

    def summary(self) -> dict:
        return {"u_seen": self.num_seen()}

    def reset(self) -> None:
        barrier()
        if self.owner:  # the file is shared by the node's ranks: one empties it, the others see zeros
            self.table.reset()
        barrier()
        self.epochs = 0

    def set_provenance(self, provenance: dict) -> None:
        self.table.set_provenance(provenance, write=self.owner)

    @property
    def provenance(self) -> dict:
        return self.table.provenance

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.epochs = int(state["epochs"])

    def save(self, directory: Path) -> None:
        self.table.flush()
        barrier()  # every rank's rows are on disk before the copy
        if self.ctx.is_main:
            self.table.copy_to(directory).close()
        barrier()

    def save_async(self, directory: Path) -> Future:
        """`save` with the write in the background (collective): every rank's rows are flushed, rank 0 reads
        the table's allocated regions into host memory before any rank writes rows again, and a thread
        writes them; the future says when (and whether) the copy is on disk."""
        self.table.flush()
        barrier()
        written: Future = Future()
        if self.ctx.is_main:
            snapshot = self.table.snapshot()

            def write() -> None:
                try:
                    snapshot.write_to(directory)
                except BaseException as exc:  # noqa: BLE001 (reported through the future)
                    written.set_exception(exc)
                else:
                    written.set_result(None)

            threading.Thread(target=write, name="u-table-checkpoint").start()
        else:
            written.set_result(None)
        barrier()
        return written

    def load(self, directory: Path, *, reshard: bool = False) -> None:
        # Rows are keyed by sample, not by rank: nothing to reshard. Every rank checks the snapshot
        # (another dataset, truncated) before the live table is touched.
        snapshot = UTable.open(directory, dataset_fingerprint=self.fingerprint, readonly=True)
        self.table.close()
        if self.owner:  # one rank per live table (per node when replicated) reseeds it
            shutil.rmtree(self.live_dir, ignore_errors=True)
            snapshot.copy_to(self.live_dir).close()
        snapshot.close()
        barrier()
        self.table = UTable.open(self.live_dir, dataset_fingerprint=self.fingerprint)

    def close(self) -> None:
        self.table.flush()
        if self.replicated and self.ctx.is_main and self.publish_dir is not None:
            # Rank 0 is the only writer of its replica: the copy needs no other rank.
            shutil.rmtree(self.publish_dir, ignore_errors=True)
            self.table.copy_to(self.publish_dir).close()
        self.table.close()


def build_normaliser(loss_cfg: LossConfig, *, out_dir: Path, num_rows: int, dataset_fingerprint: str,
                     ctx: DistContext, fresh: bool, node_local_dir: str | Path | None = None) -> Normaliser:
    """This job's per-sample normaliser: SogCLR's u table, live under `<out_dir>/u_table` on one node.

    On several nodes every node keeps its own replica, in `<node_local_dir>/u_table_node<k>` (a local
    disk) or by default `<out_dir>/u_table_nodes/node<k>` (one folder per node on the shared
    filesystem, each opened by one node only); `<out_dir>/u_table` receives rank 0's at the end.
    """
    out_dir = Path(out_dir)
    common = {"num_rows": num_rows, "dataset_fingerprint": dataset_fingerprint, "ctx": ctx,
              "gamma_min": loss_cfg.gamma_min, "gamma_decay_epochs": loss_cfg.gamma_decay_epochs, "fresh": fresh}
    nodes = node_of_ranks(ctx)
    if len(set(nodes)) == 1:
        if node_local_dir and ctx.is_main:
            logger.warning("run.node_local_dir is ignored: the job runs on one node, whose ranks share %s",
                           out_dir / "u_table")
        return TableNormaliser(out_dir / "u_table", **common)
    node = nodes[ctx.rank]
    live_dir = (Path(node_local_dir) / f"u_table_node{node}" if node_local_dir
                else out_dir / "u_table_nodes" / f"node{node}")
    return TableNormaliser(live_dir, replicated=True, node_leader=nodes.index(node) == ctx.rank,
                           publish_dir=out_dir / "u_table", **common)
