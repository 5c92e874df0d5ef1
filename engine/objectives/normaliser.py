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

import json
import logging
import math
import shutil
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from engine.distributed import DistContext, barrier, gather_no_grad, gather_objects, node_of_ranks
from engine.io import write_json_atomic
from engine.objectives.table import PAGE_ROWS, ROW_DTYPE, UTable, read_delta_header
from engine.schedules import gamma_at_epoch

# A save writes a full base instead of a delta whose pages would exceed this share of the table's allocated bytes
# (rows written all over the table, e.g. in random order): the base costs at most 1.11x the delta to write, and a
# resume then copies one base instead of applying deltas as large. Not lower: in a sparse table's first epoch the
# second save's delta is about half of what is allocated, and a base there would write twice the touched rows.
# Tables smaller than SMALL_TABLE_BYTES always take the delta (their copies are cheap anyway).
DELTA_AT_MOST = 0.9
SMALL_TABLE_BYTES = 64 << 20

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
                 node_leader: bool | None = None, publish_dir: Path | None = None, full_every: int = 8):
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
        # Checkpoints as base + deltas (rank 0's bookkeeping; see `save`): a full base every `full_every` saves.
        self.full_every = max(1, int(full_every))
        self._parent: dict | None = None  # the last checkpoint that counts: path, save_id, chain, since_base
        self._inflight: dict | None = None  # the save being written, until `checkpoint_saved` names it
        self._unsaved: np.ndarray | None = None  # pages written on any rank since the parent (rank 0)
        self._force_base = False  # the next save writes a full base (after `reset`)
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
        self._force_base = True  # emptied pages are holes, not written rows: the next save is a full base

    def set_provenance(self, provenance: dict) -> None:
        self.table.set_provenance(provenance, write=self.owner)

    @property
    def provenance(self) -> dict:
        return self.table.provenance

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.epochs = int(state["epochs"])

    # ----- checkpoints: a full base every `full_every` saves, deltas (the pages written since) between -----
    def _plan(self, directory: Path) -> np.ndarray | None:
        """Collective (after every rank's flush): gather the pages written on every rank since the last save; on
        rank 0 decide what this save writes: None for a full base, else the page ids of a delta on the parent.

        A delta needs a parent that counts (`checkpoint_saved`), in the same checkpoint folder, under another
        name (the same step saved again replaces its folder) and still there as it was saved, fewer than
        `full_every` saves since its base and no `reset` since."""
        local = self.table.dirty_pages()
        self.table.clear_dirty()
        gathered = gather_objects(local)
        if not self.ctx.is_main:
            return None
        if self._unsaved is None:
            self._unsaved = np.zeros(self.table.num_pages, dtype=bool)
        for pages in gathered:
            self._unsaved[pages] = True
        final = _checkpoint_of(directory)
        parent = self._parent
        delta = (not self._force_base and parent is not None and parent["path"].parent == final.parent
                 and parent["path"].name != final.name and parent["since_base"] + 1 < self.full_every
                 and _save_id(parent["path"] / Path(directory).name) == parent["save_id"])  # still there
        pages = np.flatnonzero(self._unsaved).astype(np.int64)
        save_id = uuid.uuid4().hex
        if not delta or self._delta_costs_a_base(pages):
            self._inflight = {"path": final, "save_id": save_id, "chain": [], "since_base": 0}
            return None
        self._inflight = {"path": final, "save_id": save_id, "chain": [*parent["chain"], parent["path"].name],
                          "since_base": parent["since_base"] + 1}
        return pages

    def _delta_costs_a_base(self, pages: np.ndarray) -> bool:
        """Whether a delta of `pages` would hold more than DELTA_AT_MOST of the table's allocated bytes (rows
        written all over the table, e.g. in random order): then a base costs about as much to write and is
        faster to resume from. Tables under SMALL_TABLE_BYTES always take the delta (their copies are cheap)."""
        if self.table.num_rows * ROW_DTYPE.itemsize < SMALL_TABLE_BYTES:
            return False
        delta_bytes = pages.size * PAGE_ROWS * ROW_DTYPE.itemsize
        return delta_bytes > DELTA_AT_MOST * self.table.allocated_bytes()

    def _chain_record(self) -> dict:
        inflight = self._inflight
        record = {"save_id": inflight["save_id"], "since_base": inflight["since_base"]}
        if inflight["chain"]:
            record["parent"] = {"checkpoint": self._parent["path"].name, "save_id": self._parent["save_id"]}
        return record

    def required_checkpoints(self) -> list[str]:
        """Rank 0, right after `save`/`save_async`: the checkpoint folders (names, oldest first) this save's
        delta applies on, base first; a checkpoint purge keeps them while a kept checkpoint needs them."""
        return list(self._inflight["chain"]) if self._inflight else []

    def checkpoint_saved(self, final: Path) -> None:
        """Rank 0: the checkpoint `final` holding this part's last save counts now; later deltas apply on it."""
        inflight = self._inflight
        if inflight is None or Path(final) != inflight["path"]:
            return
        self._parent, self._inflight, self._force_base = inflight, None, False
        if self._unsaved is not None:  # merged only in `_plan`: exactly the pages this save holds
            self._unsaved[:] = False

    def save(self, directory: Path) -> None:
        self.table.flush()
        barrier()  # every rank's rows are on disk before the copy
        pages = self._plan(directory)
        if self.ctx.is_main:
            if pages is None:
                self.table.copy_to(directory).close()
                write_json_atomic(Path(directory) / CHAIN_FILE, self._chain_record())
            else:
                self.table.read_pages(pages).write_to(directory, self._chain_record())
        barrier()

    def save_async(self, directory: Path) -> Future:
        """`save` with the write in the background (collective): every rank's rows are flushed, rank 0 reads
        what this save holds (a full base: the table's allocated regions; a delta: the pages written since the
        parent) into host memory before any rank writes rows again, and a thread writes them; the future says
        when (and whether) the copy is on disk. A base on a filesystem that clones (reflink) is cloned at once
        instead: nothing staged in memory."""
        self.table.flush()
        barrier()
        pages = self._plan(directory)
        written: Future = Future()
        if self.ctx.is_main:
            record = self._chain_record()
            if pages is None and self.table.clone_to(directory):  # a reflink: nothing to stage in memory

                def write_files() -> None:
                    write_json_atomic(Path(directory) / CHAIN_FILE, record)
            elif pages is None:
                snapshot = self.table.snapshot()

                def write_files() -> None:
                    snapshot.write_to(directory)
                    write_json_atomic(Path(directory) / CHAIN_FILE, record)
            else:
                delta = self.table.read_pages(pages)

                def write_files() -> None:
                    delta.write_to(directory, record)

            def write() -> None:
                try:
                    write_files()
                except BaseException as exc:  # noqa: BLE001 (reported through the future)
                    written.set_exception(exc)
                else:
                    written.set_result(None)

            threading.Thread(target=write, name="u-table-checkpoint").start()
        else:
            written.set_result(None)
        barrier()
        return written

    def _chain(self, directory: Path) -> list[Path]:
        """The folders to read for the table saved in `directory`: its full base, then each delta up to it."""
        chain = [Path(directory)]
        meta = read_delta_header(directory)
        while meta is not None:
            here = chain[-1]
            link = meta.get("parent")
            name = link.get("checkpoint") if isinstance(link, dict) else None
            if not isinstance(name, str) or not name.startswith("step_") or Path(name).name != name:
                raise ValueError(
                    f"{here / 'u_delta.json'} names no parent checkpoint folder (step_N); use another checkpoint")
            parent = here.parent.parent / name / here.name
            if _save_id(parent) != link.get("save_id"):
                raise ValueError(f"{here} is a u table delta on {parent}, which is missing or was saved again "
                                 "since; use another checkpoint")
            if len(chain) > 100_000:
                raise ValueError(f"{directory}: the u table's chain of deltas loops")
            chain.append(parent)
            meta = read_delta_header(parent)
        return chain[::-1]

    def load(self, directory: Path, *, reshard: bool = False) -> None:
        # Rows are keyed by sample, not by rank: nothing to reshard. Every rank checks the snapshot
        # (another dataset, truncated, a delta's chain) before the live table is touched.
        directory = Path(directory)
        chain = self._chain(directory)
        snapshot = UTable.open(chain[0], dataset_fingerprint=self.fingerprint, readonly=True)
        header = json.loads((directory / "u_table.json").read_text())  # the newest provenance
        if header.get("dataset_fingerprint") != self.fingerprint or header.get("num_rows") != self.num_rows:
            raise ValueError(f"{directory / 'u_table.json'} is the u table of another dataset; use a checkpoint "
                             "of this run")
        self.table.close()
        if self.owner:  # one rank per live table (per node when replicated) reseeds it: the base, then deltas
            shutil.rmtree(self.live_dir, ignore_errors=True)
            live = snapshot.copy_to(self.live_dir)
            for delta in chain[1:]:
                live.apply_delta(delta)
            live.set_provenance(header.get("provenance", {}))
            live.close()
        snapshot.close()
        barrier()
        self.table = UTable.open(self.live_dir, dataset_fingerprint=self.fingerprint)
        # Later saves may be deltas on this checkpoint (if they go to the same checkpoint folder).
        save_id = _save_id(directory)
        self._parent = None if save_id is None else {
            "path": directory.parent, "save_id": save_id, "chain": [p.parent.name for p in chain[:-1]],
            "since_base": len(chain) - 1}
        self._inflight, self._unsaved, self._force_base = None, None, False

    def close(self) -> None:
        self.table.flush()
        if self.replicated and self.ctx.is_main and self.publish_dir is not None:
            # Rank 0 is the only writer of its replica: the copy needs no other rank.
            shutil.rmtree(self.publish_dir, ignore_errors=True)
            self.table.copy_to(self.publish_dir).close()
        self.table.close()


CHAIN_FILE = "u_chain.json"  # a full base's save id (a delta's is in its u_delta.json)


def _checkpoint_of(directory: Path) -> Path:
    """The checkpoint folder a part folder `directory` will be in once its staging folder is renamed."""
    folder = Path(directory).parent
    return folder.with_name(folder.name.removeprefix(".partial-"))


def _save_id(directory: Path) -> str | None:
    """The save id of the table saved in `directory` (None: a table saved before deltas existed, or none)."""
    meta = read_delta_header(directory)
    if meta is not None:
        return meta.get("save_id")
    try:
        return json.loads((Path(directory) / CHAIN_FILE).read_text()).get("save_id")
    except (OSError, ValueError, AttributeError):
        return None


def _table(loss_cfg: LossConfig, *, out_dir: Path, num_rows: int, dataset_fingerprint: str, ctx: DistContext,
           fresh: bool, node_local_dir: str | Path | None = None, u_table_full_every: int = 8,
           **_) -> TableNormaliser:
    """SogCLR's u table, live under `<out_dir>/u_table` on one node.

    On several nodes every node keeps its own replica, in `<node_local_dir>/u_table_node<k>` (a local
    disk) or by default `<out_dir>/u_table_nodes/node<k>` (one folder per node on the shared
    filesystem, each opened by one node only); `<out_dir>/u_table` receives rank 0's at the end.
    """
    out_dir = Path(out_dir)
    common = {"num_rows": num_rows, "dataset_fingerprint": dataset_fingerprint, "ctx": ctx,
              "gamma_min": loss_cfg.gamma_min, "gamma_decay_epochs": loss_cfg.gamma_decay_epochs, "fresh": fresh,
              "full_every": u_table_full_every}
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
    num_rows, dataset_fingerprint, ctx, fresh, node_local_dir, device, u_table_full_every)` (take `**_` for what it
    does not use)."""
    _NORMALISERS[name] = builder


def normaliser_names() -> tuple[str, ...]:
    """Every selectable loss.normaliser value."""
    return tuple(sorted(_NORMALISERS))


def build_normaliser(loss_cfg: LossConfig, *, out_dir: Path, num_rows: int, dataset_fingerprint: str,
                     ctx: DistContext, fresh: bool, node_local_dir: str | Path | None = None,
                     device: torch.device | None = None, u_table_full_every: int = 8) -> Normaliser:
    """This job's normaliser, the one registered as `loss.normaliser` (default `table`: SogCLR's u table)."""
    name = getattr(loss_cfg, "normaliser", "table")
    if name not in _NORMALISERS:
        raise ValueError(f"loss.normaliser: unknown normaliser {name!r}; use one of {', '.join(normaliser_names())} "
                         "(or register one in a module named in run.plugins)")
    return _NORMALISERS[name](loss_cfg, out_dir=Path(out_dir), num_rows=num_rows,
                              dataset_fingerprint=dataset_fingerprint, ctx=ctx, fresh=fresh,
                              node_local_dir=node_local_dir, device=device, u_table_full_every=u_table_full_every)
