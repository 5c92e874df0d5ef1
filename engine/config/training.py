"""The sections of what the two stages optimise and how: `loss`, `optim`, `teacher`, `osr`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from engine.config.choices import OSRSurrogate, Surrogate, TeacherKind
from engine.config.fields import choice_errors, setting


@dataclass
class LossConfig:
    """Surrogate and SogCLR estimator settings (temperature is fixed from the checkpoint)."""

    surrogate: Surrogate = setting("auto", "auto = the method's (tuneclip: hgcl, fastclip: gcl, openclip: mbcl, "
                                   "siglip: siglip)", osr="surrogate")
    margin: float | str = setting(0.1, "HGCL margin m, or auto: the margin_inside_share rule at w0 (engine/objectives/margin.py)",
                                  osr=True)
    margin_inside_share: float = setting(0.5, "margin=auto: m puts this share of the pairs inside the hinge "
                                         "(d > -m) at w0", osr=True)
    margin_probe_batches: int = setting(8, "margin=auto: batches at w0 whose d the rule reads", osr=True)
    eps: float = setting(1e-14, "eps of log(eps + u) (keeps the weights of tiny u finite)", osr=True)
    chunk_size: int = setting(0, "columns of the global batch per block; 0 = whole batch")
    gamma_min: float = setting(0.9, "SogCLR moving-average weight gamma_t: its final value", osr=True)
    gamma_decay_epochs: int = setting(4, "epochs of gamma_t's cosine from 1 down to gamma_min", osr=True)
    terms: dict[str, float] = setting({"contrastive": 1.0}, "loss terms by name (engine.objectives.terms registry) "
                                      "and their weights; contrastive = the method's loss", osr=True)
    normaliser: str = setting("table", "the u estimates GCL/HGCL divide by (engine.objectives.normaliser registry): "
                              "table = SogCLR's per-sample rows, neural = NeuCLIP's prototype network", osr=True)
    neural_prototypes: int = setting(4096, "normaliser=neural: prototypes m of each side (W1, W2: m x embed_dim; "
                                     "a global batch B < m fills them with repeats, held as B rows with counts)", osr=True)
    neural_restart_every: int = setting(500, "normaliser=neural: restart W1, W2 from the global batch's embeddings "
                                        "every T_r steps (OSR and fine-tuning counted together)", osr=True)
    neural_updates: int = setting(10, "normaliser=neural: AdaGrad updates T_u of the network per step, on the "
                                  "step's batch", osr=True)
    neural_lr: float = setting(1.0, "normaliser=neural: the network's AdaGrad learning rate", osr=True)

    def errors(self) -> list[str]:
        out = choice_errors(self, "loss")
        if (not isinstance(self.terms, dict) or not self.terms
                or not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) for k, v in self.terms.items())):
            out.append(f"loss.terms must map term names to finite weights, e.g. {{contrastive: 1.0}}, "
                       f"got {self.terms!r}")
        if isinstance(self.margin, str) and self.margin != "auto":
            out.append(f"loss.margin must be a number >= 0 or 'auto', got {self.margin!r}")
        elif not isinstance(self.margin, str) and self.margin < 0:
            out.append(f"loss.margin must be >= 0 (or 'auto'), got {self.margin}")
        if not 0 < self.margin_inside_share < 1:
            out.append(f"loss.margin_inside_share must be in (0, 1), got {self.margin_inside_share}")
        if self.margin_probe_batches < 1:
            out.append(f"loss.margin_probe_batches must be >= 1, got {self.margin_probe_batches}")
        if not self.eps > 0:
            out.append(f"loss.eps must be > 0 (e.g. 1e-14), got {self.eps}")
        if self.chunk_size < 0:
            out.append(f"loss.chunk_size must be >= 0 (0 = no chunking), got {self.chunk_size}")
        if not 0 < self.gamma_min <= 1:
            out.append(f"loss.gamma_min must be in (0, 1], got {self.gamma_min}")
        if self.gamma_decay_epochs < 0:
            out.append(f"loss.gamma_decay_epochs must be >= 0, got {self.gamma_decay_epochs}")
        for key in ("neural_prototypes", "neural_restart_every", "neural_updates"):
            if isinstance(getattr(self, key), bool) or getattr(self, key) < 1:
                out.append(f"loss.{key} must be an integer >= 1, got {getattr(self, key)!r}")
        if not (math.isfinite(self.neural_lr) and self.neural_lr > 0):
            out.append(f"loss.neural_lr must be > 0 (NeuCLIP: 1.0), got {self.neural_lr}")
        return out


@dataclass
class OptimConfig:
    """AdamW and the cosine learning-rate schedule of the fine-tuning stage."""

    lr: float = setting(1e-5, "peak learning rate of fine-tuning", resume="schedule")
    betas: tuple[float, float] = setting((0.9, 0.98), "AdamW betas (the moments OSR recovers use them)", osr=True)
    weight_decay: float = setting(0.02, "AdamW decoupled weight decay")
    eps: float = setting(1e-6, "AdamW epsilon")
    warmup_steps: int = setting(0, "linear warm-up steps before the cosine decay", resume="schedule")
    grad_clip: float = setting(0.0, "max global grad norm in fine-tuning; 0 = off (never applied in OSR)",
                               resume="schedule")
    # osr=True: the statistics hold no lr, but AdamW's saved moments are laid out by these param groups.
    layer_decay_image: float = setting(
        1.0, "layer-wise lr decay of the image tower: a parameter at depth d of L blocks learns at lr * "
        "decay^(L - d) (embeddings 0, block i i + 1, final norm and projection L); 1.0 = off", osr=True)
    layer_decay_text: float = setting(1.0, "layer-wise lr decay of the text tower, as layer_decay_image; "
                                      "logit_scale and logit_bias keep lr (factor 1); 1.0 = off", osr=True)

    def errors(self) -> list[str]:
        out = []
        if not self.lr > 0:
            out.append(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            out.append(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            out.append(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip < 0:
            out.append(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        for key in ("layer_decay_image", "layer_decay_text"):
            if not 0 < getattr(self, key) <= 1:
                out.append(f"optim.{key} must be in (0, 1] (1.0 = off), got {getattr(self, key)}")
        return out


@dataclass
class TeacherConfig:
    """The moving-average teacher of the `wma_teacher` loss term (TRACER): how its weights follow the student."""

    kind: TeacherKind = setting("wma", "wma = Beta-weighted average of the student's weights along fine-tuning "
                                "(TRACER); ema = exponential moving average (for comparison)")
    beta: float = setting(0.5, "wma: update k of K has weight BetaPDF((k + 0.5) / (K + 1); beta, beta); "
                          "1 = plain average")
    every_steps: int = setting(1, "fine-tuning optimizer steps between teacher updates")
    ema_momentum: float = setting(0.999, "ema: teacher <- m teacher + (1 - m) student")

    def errors(self) -> list[str]:
        out = choice_errors(self, "teacher")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            out.append(f"teacher.beta must be a number > 0 (0.5: TRACER's default, 1: plain average), got {self.beta!r}")
        if not (isinstance(self.every_steps, int) and self.every_steps >= 1):
            out.append(f"teacher.every_steps must be an integer >= 1, got {self.every_steps!r}")
        if not (isinstance(self.ema_momentum, (int, float)) and 0 <= self.ema_momentum < 1):
            out.append(f"teacher.ema_momentum must be in [0, 1), got {self.ema_momentum!r}")
        return out


@dataclass
class OSRConfig:
    """Stage I (paper Algorithm 1) and the stage-II seeding switches (paper Table 2)."""

    epochs: int = setting(5, "OSR epochs at the frozen starting weights", osr=True)
    seed_moments: bool = setting(True, "start fine-tuning's AdamW moments from the recovered ones")
    seed_u: bool = setting(True, "start fine-tuning's estimates u from the recovered ones")
    surrogate: OSRSurrogate = setting("auto", "auto = the stage-II surrogate (gcl for mbcl and siglip)",
                                      osr="surrogate")
    load_from: str | None = setting(None, "end-of-OSR checkpoint to start stage II from (skips OSR)",
                                    resume="may_change")

    def errors(self) -> list[str]:
        out = choice_errors(self, "osr")
        if self.load_from is not None and not Path(self.load_from).is_dir():
            out.append(f"osr.load_from: {self.load_from} is not a checkpoint folder (see `run.py osr`)")
        if self.epochs < 0:
            out.append(f"osr.epochs must be >= 0, got {self.epochs}")
        return out
