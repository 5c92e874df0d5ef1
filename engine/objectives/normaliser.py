"""Normalisers: the u estimates a global contrastive objective divides by, chosen by `loss.normaliser`.

`Normaliser` is what an objective needs from one: given a batch's sample ids, the batch estimates
log Phi of its anchors and the features, the estimates log u the step's gradient divides by, held
until the optimizer step they served has been taken (`commit`) or skipped (`discard`). How u is kept
and updated is the normaliser's business: `TableNormaliser` (`table`, the default) keeps one
(log u_x, log u_z) row per training sample in the memory-mapped `UTable` and applies SogCLR's moving
average; a learned normaliser predicts u from the features and trains its own parameters with its own
optimizer (`neural`: NeuCLIP's prototype network, engine/objectives/neural_normaliser.py, updated in
`estimate` on the all-gathered batch and kept in `commit`; a plugin may instead step in `commit` with
`average_gradients` making its gradient the global batch's). `placement` says how its state is spread over ranks: `sharded` (each rank
updates only its own samples' rows) or `replicated` (every rank holds and updates the same state).
Everything that must survive a restart goes through `state_dict` (small, JSON) and, optionally,
`save`/`load` (files, into the checkpoint folder).

`register_normaliser(name, builder)` adds one from anywhere (a module named in `run.plugins`);
`build_normaliser` builds `loss.normaliser`.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from engine.distributed import DistContext, barrier, gather_no_grad, node_of_ranks
from engine.objectives.table import UTable
from engine.schedules import gamma_at_epoch

if TYPE_CHECKING:
    from engine.config import LossConfig
    from engine.objectives.contrastive import SurrogateSpec

logger = logging.getLogger(__name__)


class Prior(NamedTuple):
    """Estimates of a batch's anchors before this step: log u_x, log u_z and whether each was seen."""

    log_u_x: Tensor
    log_u_z: Tensor
    seen: Tensor


class Normaliser(Protocol):
    """What a global contrastive objective reads and updates, and what a checkpoint keeps."""

    placement: Literal["sharded", "replicated"]  # per-sample rows of each rank's samples | one state on every rank

    def estimate(self, rows: Tensor, log_phi_x: Tensor, log_phi_z: Tensor, *, image_features: Tensor,
                 text_features: Tensor, surrogate: SurrogateSpec,
                 gather: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """log u_x, log u_z ([b]) this step divides by, for this rank's samples `rows` ([b] int64, global sample
        ids) with batch estimates log Phi1, log Phi2 ([b]) of the loss `surrogate` (kind, margin, tau, eps) and
        this rank's features; held until `commit`. `gather` concatenates this rank's rows of a tensor over ranks
        into the step's global batch of real samples, without gradient (ranks may hold different numbers of real
        rows in an epoch's last batch: use it, not an equal-shape all-gather)."""

    def commit(self) -> None:
        """The optimizer step was taken: keep this step's update (a learned normaliser steps its optimizer)."""

    def discard(self) -> None:
        """The step was skipped: forget this step's update."""

    def metrics(self) -> dict[str, float]:
        """Scalars for this step's log record (the table: gamma_t)."""

    def end_epoch(self) -> None:
        """One more epoch of updates (advances schedules such as gamma_t)."""

    def reset(self) -> None:
        """Forget every estimate and restart schedules (the 'no seeding of u' ablation). Collective."""

    def set_provenance(self, provenance: dict) -> None:
        """Record what computed the estimates (loss, margin, tau, eps, OSR steps). Collective."""

    def summary(self) -> dict:
        """Diagnostics for the run log (e.g. how many samples have an estimate)."""

    def state_dict(self) -> dict:
        """Small JSON state (schedule position, small parameters)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`."""

    def close(self) -> None:
        """Flush and release files."""

    # Optional, for state too large for JSON (found by the checkpoint manager):
    # save(directory) / load(directory, *, reshard=False), both collective.


def _upcast(*tensors: Tensor) -> list[Tensor]:
    """Estimates are computed in float32 at least, float64 when given."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]


def update_log_estimate(log_u_prev: Tensor, seen: Tensor, log_phi: Tensor, gamma: float) -> Tensor:
    """SogCLR moving average in log space: log((1-gamma) u + gamma Phi) (paper eq. 3).

    Samples not `seen` before take the batch estimate (first-visit rule), whatever gamma is.
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    log_u_prev, log_phi = _upcast(log_u_prev, log_phi)
    if gamma == 1.0:
        return log_phi.clone()
    mixed = torch.logaddexp(log_u_prev + math.log1p(-gamma), log_phi + math.log(gamma))
    return torch.where(seen, mixed, log_phi)


def average_gradients(params) -> None:
    """Average the gradients of replicated parameters over ranks (in place; nothing to do on one process):
    each rank's gradient of its local batch becomes the global batch's, as backends do for the model."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(world)


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
    placement = "sharded"

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
        """The stored estimates of samples `rows` before this step."""
        return Prior(*self.table.read(rows, device=device))

    def estimate(self, rows: Tensor, log_phi_x: Tensor, log_phi_z: Tensor, *, image_features: Tensor,
                 text_features: Tensor, surrogate: SurrogateSpec | None = None,
                 gather: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """SogCLR: the moving average of the stored rows and this batch's Phi (first visit: Phi), staged."""
        prior = self.prior(rows, device=image_features.device)
        gamma = self.gamma()
        log_u_x = update_log_estimate(prior.log_u_x, prior.seen, log_phi_x, gamma)
        log_u_z = update_log_estimate(prior.log_u_z, prior.seen, log_phi_z, gamma)
        self.stage(rows, log_u_x, log_u_z)
        return log_u_x, log_u_z

    def metrics(self) -> dict[str, float]:
        return {"gamma": self.gamma()}

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
            # A padded batch's ranks stage different numbers of real rows: pad to the largest (row id -1).
            most = int(gather_no_grad(torch.tensor([len(packed)], device=packed.device)).max())
            packed = torch.cat([packed, packed.new_full((most - len(packed), 3), -1.0)])
            packed = gather_no_grad(packed).cpu()
            packed = packed[packed[:, 0] >= 0]
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


def _table(loss_cfg: LossConfig, *, out_dir: Path, num_rows: int, dataset_fingerprint: str, ctx: DistContext,
           fresh: bool, node_local_dir: str | Path | None = None, **_) -> TableNormaliser:
    """SogCLR's u table, live under `<out_dir>/u_table` on one node.

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


def _neural(loss_cfg: LossConfig, **kwargs) -> Normaliser:
    """NeuCLIP's normaliser-prediction network (engine/objectives/neural_normaliser.py), replicated on every rank."""
    # Imported here: it imports the losses, which import this module.
    from engine.objectives.neural_normaliser import build_neural_normaliser

    return build_neural_normaliser(loss_cfg, **kwargs)


NormaliserBuilder = Callable[..., Normaliser]
_NORMALISERS: dict[str, NormaliserBuilder] = {"table": _table, "neural": _neural}


def register_normaliser(name: str, builder: NormaliserBuilder) -> None:
    """Make `builder` selectable as loss.normaliser=name. It is called as `builder(loss_cfg, *, out_dir,
    num_rows, dataset_fingerprint, ctx, fresh, node_local_dir, device)` (take `**_` for what it does not use)."""
    _NORMALISERS[name] = builder


def normaliser_names() -> tuple[str, ...]:
    """Every selectable loss.normaliser value."""
    return tuple(sorted(_NORMALISERS))


def build_normaliser(loss_cfg: LossConfig, *, out_dir: Path, num_rows: int, dataset_fingerprint: str,
                     ctx: DistContext, fresh: bool, node_local_dir: str | Path | None = None,
                     device: torch.device | None = None) -> Normaliser:
    """This job's normaliser, the one registered as `loss.normaliser` (default `table`: SogCLR's u table)."""
    name = getattr(loss_cfg, "normaliser", "table")
    if name not in _NORMALISERS:
        raise ValueError(f"loss.normaliser: unknown normaliser {name!r}; use one of {', '.join(normaliser_names())} "
                         "(or register one in a module named in run.plugins)")
    return _NORMALISERS[name](loss_cfg, out_dir=Path(out_dir), num_rows=num_rows,
                              dataset_fingerprint=dataset_fingerprint, ctx=ctx, fresh=fresh,
                              node_local_dir=node_local_dir, device=device)
