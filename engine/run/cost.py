"""What a run cost, per stage and launch: steps, samples, wall-clock seconds and ranks.

A Stateful part of every checkpoint: a resumed run continues the cost of the checkpoint it resumed
from, so the launches before it count once each (a launch stopped by SIGTERM included: its
checkpoint carries its part), and steps redone after resuming an earlier checkpoint are not counted
twice. Work done after a job's last checkpoint and lost with it (SIGKILL) is not counted.
"""

from __future__ import annotations

import copy
import time


class RunCost:
    """Per stage, one entry per launch: {world_size, steps, num_samples, seconds}; `start`/`stop` time a stage."""

    def __init__(self, *, world_size: int):
        self.world_size = world_size
        self.stages: dict[str, list[dict]] = {}
        self._mine: dict[str, dict] = {}  # stage -> this launch's entry
        self._open: tuple[str, float] | None = None  # the stage being timed, since when

    def start(self, stage: str) -> None:
        """Time `stage` in this launch from now."""
        self.stop()
        if stage not in self._mine:
            self._mine[stage] = {"world_size": self.world_size, "steps": 0, "num_samples": 0, "seconds": 0.0}
            self.stages.setdefault(stage, []).append(self._mine[stage])
        self._open = (stage, time.perf_counter())

    def step(self, stage: str, *, num_samples: int) -> None:
        """Count one step of `stage` over `num_samples` samples (all ranks together)."""
        entry = self._mine[stage]
        entry["steps"] += 1
        entry["num_samples"] += num_samples

    def stop(self) -> None:
        """End the timing of the current stage (no-op if none)."""
        if self._open is not None:
            stage, since = self._open
            self._mine[stage]["seconds"] += time.perf_counter() - since
            self._open = None

    def state_dict(self) -> dict:
        """Every launch so far, the running stage's seconds up to now included."""
        stages = copy.deepcopy(self.stages)
        if self._open is not None:
            stage, since = self._open
            stages[stage][-1]["seconds"] += time.perf_counter() - since
        for entries in stages.values():
            for entry in entries:
                entry["seconds"] = round(entry["seconds"], 3)
        return {"stages": stages}

    def load_state_dict(self, state: dict) -> None:
        """Continue the cost of a checkpoint: its launches are earlier ones, this launch starts anew."""
        self.stages = copy.deepcopy(state["stages"])
        self._mine, self._open = {}, None

    def totals(self) -> dict:
        """Per stage: steps, num_samples, seconds, device_hours (ranks x hours), world_size (of the last
        launch) and every launch's entry."""
        out = {}
        for stage, entries in self.state_dict()["stages"].items():
            out[stage] = {"steps": sum(e["steps"] for e in entries),
                          "num_samples": sum(e["num_samples"] for e in entries),
                          "seconds": round(sum(e["seconds"] for e in entries), 3),
                          "device_hours": round(sum(e["seconds"] * e["world_size"] for e in entries) / 3600, 6),
                          "world_size": entries[-1]["world_size"], "launches": entries}
        return out
