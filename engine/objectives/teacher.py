"""The moving-average teacher's weights (TRACER): an average of the student's weights along fine-tuning.

WMA (`kind="wma"`): theta_T = sum_k w_k theta_k / sum_k w_k over the teacher updates k = 0..K, theta_0 the
student at the start of fine-tuning, theta_k the student after the k-th update (one every `every_steps` taken
optimizer steps), w_k = BetaPDF((k + 0.5) / (K + 1); beta, beta). Kept incrementally: W_k = W_{k-1} + w_k and
theta_T <- theta_T + (w_k / W_k) (theta_S - theta_T) (one fused lerp over all tensors). EMA (`kind="ema"`):
theta_T <- m theta_T + (1 - m) theta_S, the same lerp with fraction 1 - m.

The teacher holds a float32 copy of this rank's parameter shards (the student's layout, `Backend.parameter_shards`:
a whole copy where the student is replicated (one process, ZeRO-1/2), this rank's shard where it is sharded (FSDP2's
local shards, ZeRO-3's partitions)), so small updates are not lost to bf16 rounding; the backend puts them in
place of the student's for the teacher's forward (`Backend.shards_replaced`, cast to the module's dtype) and the
student's back, bit-exact. Checkpoints: one file of the whole float32 parameters, whatever the number of ranks
(`engine.objectives.teacher_checkpoint`); the small state (weight sum, update count, K) is JSON.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from engine.objectives.teacher_checkpoint import TEACHER_FILE, Span, read_parts, write_whole

KINDS = ("wma", "ema")


def beta_weight(k: int, num_updates: int, beta: float) -> float:
    """w_k = BetaPDF((k + 0.5) / (K + 1); beta, beta) for update k of K (k = 0..K)."""
    assert 0 <= k <= num_updates, (k, num_updates)
    x = (k + 0.5) / (num_updates + 1)
    log_norm = 2 * math.lgamma(beta) - math.lgamma(2 * beta)  # log B(beta, beta)
    return math.exp((beta - 1) * (math.log(x) + math.log1p(-x)) - log_norm)


class MovingAverageTeacher:
    """Float32 teacher shards averaged over the student's (`start` at theta_0, `update` after each teacher update)."""

    def __init__(self, *, kind: str = "wma", beta: float = 0.5, ema_momentum: float = 0.999):
        assert kind in KINDS, kind
        self.kind, self.beta, self.ema_momentum = kind, beta, ema_momentum
        self.shards: dict[str, Tensor] | None = None  # None until `start`
        self.num_updates = 0  # K: the last update's index (wma weights)
        self.update_index = 0  # k of the last update (0: theta_0 only)
        self.weight_sum = 0.0  # W_k

    @property
    def started(self) -> bool:
        return self.shards is not None

    def start(self, student: dict[str, Tensor], *, num_updates: int) -> None:
        """theta_T = theta_0 = the student's current values; updates 1..`num_updates` (K) will follow."""
        self.shards = {name: value.detach().float().clone() for name, value in student.items()}
        self.num_updates, self.update_index = num_updates, 0
        self.weight_sum = beta_weight(0, num_updates, self.beta) if self.kind == "wma" else 1.0

    def update(self, student: dict[str, Tensor]) -> None:
        """Fold the student's current values in as the next update."""
        assert self.shards is not None, "update before start"
        self.update_index += 1
        if self.kind == "ema":
            fraction = 1.0 - self.ema_momentum
        else:
            self.num_updates = max(self.num_updates, self.update_index)
            weight = beta_weight(self.update_index, self.num_updates, self.beta)
            self.weight_sum += weight
            fraction = weight / self.weight_sum  # w_k / W_k
        # theta_T + fraction (theta_S - theta_T), fused over all tensors (float32: bf16 students are cast)
        torch._foreach_lerp_(list(self.shards.values()),
                             [student[name].detach().float() for name in self.shards], fraction)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "beta": self.beta, "ema_momentum": self.ema_momentum, "started": self.started,
                "num_updates": self.num_updates, "update_index": self.update_index, "weight_sum": self.weight_sum}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates, self.update_index = int(state["num_updates"]), int(state["update_index"])
        self.weight_sum = float(state["weight_sum"])

    def save(self, directory: Path, *, spans: dict[str, Span], gather: Callable[[Tensor], Tensor],
             is_main: bool) -> None:
        """Collective: the whole float32 teacher into `directory/teacher.safetensors` (rank 0 writes; `spans`: the
        part of each parameter this rank's shards hold). Nothing before `start`."""
        if self.shards is None:
            return
        write_whole(directory / TEACHER_FILE, self.shards, spans, gather=gather, is_main=is_main,
                    metadata={"kind": self.kind, "format": "pt"})

    def load(self, directory: Path, *, spans: dict[str, Span], like: dict[str, Tensor]) -> bool:
        """Read this rank's parts (`spans`) of the teacher `save` wrote, on any number of ranks, shaped and placed
        like `like` (the student's shards); False when the checkpoint holds none (written before the teacher
        started)."""
        if not (directory / TEACHER_FILE).is_file():
            return False
        self.shards = read_parts(directory / TEACHER_FILE, spans, like)
        return True
