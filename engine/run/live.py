"""Live views of the run log: TensorBoard (`run.tensorboard=true`) and Weights & Biases (`run.wandb_project`).

Each sink receives the run log's records (`engine.run.log.JsonlLogger(sinks=...)`) and writes their
scalars: step records as `<stage>/<name>` at the stage's step (fine-tuning steps for `finetune`,
so methods with and without OSR line up), evaluations as `eval/<task>/<metric>` at the fine-tuning
step (0 = the base model). W&B is optional: `pip install wandb`; offline mode writes under
`<out_dir>/wandb` for `wandb sync`.
"""

from __future__ import annotations

import math
from pathlib import Path

from engine.config import JobConfig

# Step-record fields that are positions or labels, not scalars to plot.
NOT_SCALARS = {"time", "event", "stage", "epoch", "step", "stage_step", "ft_step", "skipped", "keys"}


def step_scalars(record: dict) -> dict[str, float]:
    """The finite numeric fields of a step record, by name."""
    return {key: float(value) for key, value in record.items()
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def eval_scalars(record: dict) -> dict[str, float]:
    """`eval/<task>/<metric>` -> value for an evaluation record."""
    return {f"eval/{task}/{metric}": float(value) for task, metrics in record["results"].items()
            for metric, value in metrics.items() if isinstance(value, (int, float))}


class TensorBoardSink:
    """Scalars of every step and evaluation record into `<out_dir>/tensorboard` (torch's SummaryWriter)."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("run.tensorboard=true needs the tensorboard package: pip install tensorboard "
                             "(or set run.tensorboard=false)") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict) -> None:
        event = record.get("event")
        if event == "step":
            step = record.get("ft_step", record["stage_step"])
            for name, value in step_scalars(record).items():
                self.writer.add_scalar(f"{record['stage']}/{name}", value, step)
        elif event == "eval":
            for name, value in eval_scalars(record).items():
                self.writer.add_scalar(name, value, record.get("ft_step", record["step"]))
        else:
            return
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """The same scalars to a W&B run (`project`), `mode` offline or online; `ft_step` and `step` logged too."""

    def __init__(self, *, project: str, mode: str, out_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise ValueError(f"run.wandb_project={project} needs the optional package wandb: pip install wandb "
                             "(or drop run.wandb_project)") from None
        self.run = wandb.init(project=project, mode=mode, dir=str(out_dir), config=config,
                              name=Path(out_dir).name, reinit=True)

    def write(self, record: dict) -> None:
        event = record.get("event")
        if event == "step":
            values = {f"{record['stage']}/{name}": value for name, value in step_scalars(record).items()}
        elif event == "eval":
            values = eval_scalars(record)
        else:
            return
        positions = {key: record[key] for key in ("step", "ft_step", "stage_step") if key in record}
        self.run.log({**values, **positions})

    def close(self) -> None:
        self.run.finish()


def build_live_sinks(cfg: JobConfig, out_dir: Path) -> list:
    """The live sinks the configuration asks for (rank 0 only builds them)."""
    sinks: list = []
    if cfg.run.tensorboard:
        sinks.append(TensorBoardSink(Path(out_dir) / "tensorboard"))
    if cfg.run.wandb_project:
        sinks.append(WandbSink(project=cfg.run.wandb_project, mode=cfg.run.wandb_mode, out_dir=Path(out_dir),
                               config=cfg.to_dict()))
    return sinks
