"""A loader's part in a change of world size: the epoch interrupted on other ranks, continued here.

`ShardLoader` inherits `WorldSizeChange`: every old rank's saved state goes to `load_rank_states`, which
deals the rest of their epoch to this run's ranks (see `continuation.py` for how the rest is found);
`plan_state_dict` / `LoaderPlan` carry what a continued epoch continues in the checkpoint (once, in
state.json), so a chain of changes inside one epoch replays exactly.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from engine.data.continuation import EpochPlan

logger = logging.getLogger("engine.data.loader")

LOADER_PLAN_FORMAT = "tuneclip-loader-plan"


class WorldSizeChange:
    """The world-size part of `ShardLoader` (uses its settings, position and skip counts)."""

    STATE_VERSION: int
    _continuation: tuple[EpochPlan, dict[str, Any]] | None

    def _plan(
        self, epoch: int, *, world_size: int, batch_size: int, continuation: tuple[EpochPlan, dict] | None
    ) -> EpochPlan:
        """The plan of `epoch` on `world_size` ranks, continued by `continuation` when it is that epoch's."""
        if continuation is not None and continuation[0].epoch == epoch:
            plan = continuation[0]
            assert (plan.world_size, plan.batch_size) == (world_size, batch_size)
            return plan
        return EpochPlan(
            self.manifest,
            epoch,
            world_size,
            self.workers_per_rank,
            batch_size,
            self.seed,
            self.shuffle,
            self.shuffle_buffer,
        )

    def plan_state_dict(self) -> dict[str, Any]:
        """What every rank shares about the epochs (JSON): the epoch continued from another world size and
        what it continues, while that epoch is being read. Saved once per checkpoint."""
        record = None
        if self._continuation is not None and self._position.epoch <= self._continuation[0].epoch:
            record = self._continuation[1]
        return {"format": LOADER_PLAN_FORMAT, "continuation": record}

    def load_plan_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `plan_state_dict()` (before `load_state_dict` or `load_rank_states`)."""
        if not isinstance(state, dict) or state.get("format") != LOADER_PLAN_FORMAT:
            raise ValueError("not a ShardLoader plan state (missing format 'tuneclip-loader-plan')")
        self._continuation = self._continuation_from(state["continuation"])

    def _continuation_from(self, record: dict[str, Any] | None) -> tuple[EpochPlan, dict[str, Any]] | None:
        """Rebuild a continuation from its record: replay what the old ranks used (recursively). The plan is
        that of the ranks it was dealt `to`, which read the rest (this loader's, unless `load_rank_states` follows)."""
        if record is None:
            return None
        base = self._continuation_from(record["base"])
        old = self._plan(record["epoch"], **record["from"], continuation=base)
        left = old.left_after(record["positions"])
        plan = EpochPlan(
            self.manifest,
            record["epoch"],
            record["to"]["world_size"],
            self.workers_per_rank,
            record["to"]["batch_size"],
            self.seed,
            self.shuffle,
            self.shuffle_buffer,
            left=left,
            first_batch=record["batches_done"],
        )
        return plan, record

    def load_rank_states(self, states: list[dict[str, Any]]) -> int:
        """Continue from the `state_dict()`s of every rank of a run on another number of ranks.

        The rest of their epoch (what no old rank used) is dealt to this run's ranks, each sample once (see
        `continuation.py`); later epochs follow this world size's plan. Rank 0 takes over the old ranks'
        skip and padding counts. Call `load_plan_state_dict` with the same checkpoint's plan first. Returns
        the number of samples left in the epoch (0 at an epoch's clean end). ValueError names what does
        not fit (other data, workers, seed or batching).
        """
        if not states:
            raise ValueError("no loader states to continue from")
        identity = self._identity()
        problems = []
        for key, value in identity.items():
            if key in ("world_size", "rank", "batch_size"):  # the batch per rank follows the world size
                continue
            if key == "max_member_bytes" and all(key not in state for state in states):
                continue  # saved before members were capped
            saved = {json.dumps(state.get(key)) for state in states}
            if saved != {json.dumps(value)}:
                problems.append(f"{key}: saved {sorted(saved)}, this loader {value!r}")
        positions = {(s.get("epoch"), s.get("batches_done")) for s in states}
        if len(positions) != 1:
            problems.append(f"the ranks' positions differ: {sorted(positions)}")
        if len({s.get("batch_size") for s in states}) != 1:
            problems.append("the ranks' batch sizes differ")
        if sorted(s.get("rank") for s in states) != list(range(len(states))):
            problems.append("the states are not those of ranks 0..N-1")
        if any(s.get("version") != self.STATE_VERSION for s in states):
            problems.append(f"loader state version is not {self.STATE_VERSION}")
        if problems:
            raise ValueError("loader states do not fit this loader (" + "; ".join(problems) + ")")
        states = sorted(states, key=lambda s: s["rank"])
        epoch, batches_done = states[0]["epoch"], states[0]["batches_done"]
        if self.rank == 0:
            for state in states:
                for shard, reasons in state["skipped"].items():
                    self.skipped[shard].update(reasons)
                self.num_padding += int(state.get("num_padding", state.get("num_repeated", 0)))
        if self.resampled:
            # Resampled epochs are draws, not a partition: this world size's streams start where the old one stopped.
            self._position = self._position_at(epoch, min(batches_done, self.num_batches()))
            return 0
        old_ranks = {"world_size": len(states), "batch_size": states[0]["batch_size"]}
        old = self._plan(epoch, **old_ranks, continuation=self._continuation)
        record = {
            "epoch": epoch,
            "batches_done": batches_done,
            "from": old_ranks,
            "to": {"world_size": self.world_size, "batch_size": self.batch_size},
            "positions": [
                {k: state[k] for k in ("batches_done", "workers", "straddle", "straddle_rest") if k in state}
                for state in states
            ],
            "base": self._continuation[1] if self._continuation and self._continuation[0].epoch == epoch else None,
        }
        self._continuation = self._continuation_from(record)
        self._position = self._epoch_start(epoch)
        self.skips.start_epoch(epoch)
        assert self._continuation is not None
        num_left = len(self._continuation[0].positions)
        logger.info(
            "rank %d: epoch %d continues from %d rank(s) at batch %d: %d of its %d samples are left, dealt to "
            "%d rank(s) (%d batch(es) each)",
            self.rank,
            epoch,
            len(states),
            batches_done,
            num_left,
            len(old.positions),
            self.world_size,
            self.num_batches(epoch) - batches_done,
        )
        return num_left


class LoaderPlan:
    """The checkpoint part every rank shares: a loader's plan state (`plan_state_dict`)."""

    def __init__(self, loader: WorldSizeChange):
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        return self.loader.plan_state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_plan_state_dict(state)
