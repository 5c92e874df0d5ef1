"""Weight-space interpolation of a finished run (WiSE-FT): theta_a = (1 - a) theta_base + a theta_ft on its eval tasks.

`run.py interpolate RUN_DIR` reads the run's configuration from its log (the base weights `model.weights`, the eval
section), evaluates every a of the grid in one process holding the two endpoint state dicts and one model, writes
`interpolate.json` and, when the user names a validation metric (`--select TASK/METRIC`), exports the best a.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from engine.config import JobConfig

logger = logging.getLogger(__name__)

INTERPOLATE_FILE = "interpolate.json"
INTERPOLATED_WEIGHTS = "interpolated.safetensors"
DEFAULT_ALPHAS = "0:1:0.25"
_ALPHAS_HELP = "use a range START:STOP:STEP (e.g. 0:1:0.25) and/or a comma list (e.g. 0,0.5,1), each a in [0, 1]"
_NUM_DIGITS = 10  # a range's points are rounded to this many decimals (0.1 * 3 is 0.3)


def parse_alphas(text: str, *, name: str = "--alphas") -> list[float]:
    """The interpolation weights `text` names, ascending and without repeats: comma-separated numbers and
    `START:STOP:STEP` ranges (STOP included), each in [0, 1]. Errors name the input as `name`."""
    alphas: list[float] = []
    for item in str(text).split(","):
        item = item.strip()
        if ":" in item:
            parts = item.split(":")
            if len(parts) != 3:
                raise ValueError(f"{name} {text!r}: range {item!r} must be START:STOP:STEP; {_ALPHAS_HELP}")
            start, stop, step = (_number(part, text, name) for part in parts)
            if step <= 0 or stop < start:
                raise ValueError(f"{name} {text!r}: range {item!r} needs STEP > 0 and STOP >= START; "
                                 f"{_ALPHAS_HELP}")
            count = math.floor((stop - start) / step + 1e-9) + 1
            alphas += [round(start + i * step, _NUM_DIGITS) for i in range(count)]
        else:
            alphas.append(_number(item, text, name))
    outside = [a for a in alphas if not 0.0 <= a <= 1.0]
    if outside:
        raise ValueError(f"{name} {text!r}: {outside[0]:g} is outside [0, 1]; {_ALPHAS_HELP}")
    return sorted(set(alphas))


def _number(item: str, text: str, name: str) -> float:
    try:
        value = float(item)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{name} {text!r}: {item!r} is not a number; {_ALPHAS_HELP}")
    return value


def interpolate_into(model: torch.nn.Module, base: dict[str, torch.Tensor], final: dict[str, torch.Tensor],
                     alpha: float) -> None:
    """Set `model`'s weights to (1 - alpha) * base + alpha * final, tensor by tensor (a tensor equal at both ends,
    a buffer or a frozen one, is copied as it is); a = 0 and a = 1 give the endpoints bit for bit."""
    import torch

    with torch.no_grad():
        for name, target in model.state_dict().items():
            start, end = base[name], final[name]
            if not start.is_floating_point() or torch.equal(start, end):
                target.copy_(end)
                continue
            value = start * (1.0 - alpha)
            value += end * alpha
            target.copy_(value)


@dataclass
class Interpolation:
    """What `interpolate_run` measured: one row of results per a, and the chosen a (None without --select)."""

    run_dir: Path
    base_weights: str
    final_weights: str
    rows: list[dict] = field(default_factory=list)  # {"alpha", "results", "aggregates"}
    select: str | None = None
    chosen: float | None = None
    exported: Path | None = None
    written: Path | None = None

    def table(self) -> str:
        """One line per a: a, then every task metric (4 decimals)."""
        columns = [f"{task}/{metric}" for task, metrics in self.rows[0]["results"].items() for metric in metrics]
        lines = [["a", *columns]]
        for row in self.rows:
            values = [row["results"][c.rpartition("/")[0]][c.rpartition("/")[2]] for c in columns]
            lines.append([f"{row['alpha']:g}", *(f"{v:.4f}" for v in values)])
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                                   enumerate(zip(line, widths))) for line in lines)

    def to_dict(self) -> dict:
        return {"run_dir": str(self.run_dir), "base_weights": self.base_weights,
                "final_weights": self.final_weights, "formula": "(1 - alpha) * base + alpha * final",
                "alphas": [row["alpha"] for row in self.rows], "evaluations": self.rows,
                "select": self.select, "chosen_alpha": self.chosen,
                "exported": str(self.exported) if self.exported else None}


def run_config(run_dir: Path) -> dict:
    """The configuration a finished run started with (its log's last fresh start record)."""
    from engine.results.summary import run_records

    log = Path(run_dir) / "log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{run_dir} holds no log.jsonl: give a run folder (run.out_dir of tune / finetune)")
    starts = [r for r in run_records(log) if r.get("event") == "start" and isinstance(r.get("config"), dict)]
    if not starts:
        raise ValueError(f"{log} has no start record with the run's config: not a run folder this engine wrote")
    return starts[-1]["config"]


def _clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


def check_single_process() -> None:
    """Refuse `run.py interpolate` started by a multi-process launcher (one process reads checkpoints of any world
    size; several would each evaluate every a)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("run.py interpolate runs in one process (it reads checkpoints of any world size): start it "
                         "with python, not torchrun or deepspeed")


def interpolate_finished_job(cfg: JobConfig) -> Interpolation | None:
    """`run.interpolate`: interpolate the job's run folder once its training results are on disk (final.safetensors,
    summary.json), in this process only when it is rank 0; None when off, on other ranks, or when the run did not
    finish (stopped, OSR only). Every rank calls it after the trainer is closed: each leaves the job's process group,
    so rank 0 evaluates alone instead of waiting for ranks that have exited."""
    from engine.distributed import destroy_process_group
    from engine.run.folder import finished_outputs

    if not cfg.run.interpolate:
        return None
    destroy_process_group()
    if os.environ.get("RANK", "0") != "0":
        return None
    if not finished_outputs(Path(cfg.run.out_dir)):
        return None
    return interpolate_run(cfg.run.out_dir, alphas=parse_alphas(cfg.run.interpolate, name="run.interpolate"),
                           select=cfg.run.interpolate_select or None)


def interpolate_run(run_dir: str | Path, *, alphas: list[float], select: str | None = None,
                    weights: str | None = None, out: str | Path | None = None,
                    device: str | None = None) -> Interpolation:
    """Evaluate theta_a for every a of `alphas` between the run's base weights and its fine-tuned ones
    (`weights`: a weights file or checkpoint folder; default the run's final.safetensors) on the run's eval tasks;
    write `interpolate.json` into the run folder; with `select` (`task/metric` of a task the user holds out as
    validation) export the best a to `out` (default `<run_dir>/interpolated.safetensors`)."""
    from engine.checkpoint import build_model_from, resolve_weights
    from engine.config import load_config
    from engine.data.samples import read_limits
    from engine.distributed import DistContext, default_device
    from engine.evaluate import Evaluator, aggregate_metrics, build_tasks, headline_metric
    from engine.io import write_json_atomic
    from models import export_model

    run_dir = Path(run_dir)
    if not alphas:
        raise ValueError(f"--alphas: no interpolation weight given; {_ALPHAS_HELP}")
    if out is not None and select is None:
        raise ValueError(f"--out {out}: only --select exports weights; add --select TASK/METRIC (a validation task)")
    if out is not None and Path(out).suffix != ".safetensors":
        raise ValueError(f"--out {out}: must end in .safetensors (open_clip picks a loader by suffix)")
    saved = run_config(run_dir)
    # What evaluation needs of it: the model, the eval tasks, the data section's read limits, the device and seed
    # (a resumed run's checkpoint or reused OSR statistics may be gone by now, and do not matter here).
    needed = {key: dict(saved[key]) for key in ("model", "eval", "data", "run") if isinstance(saved.get(key), dict)}
    needed.get("run", {}).pop("resume", None)
    cfg = load_config(base=needed, overrides=[f"run.device={device}"] if device else [], training=False)
    name = cfg.model.name
    if not cfg.model.weights and not cfg.model.has_own_weights():
        raise ValueError(f"{run_dir}: the run started from a random init (model.weights is empty in its config), "
                         "so it has no base weights to interpolate with; interpolate a run fine-tuned from weights")
    tasks = build_tasks(cfg.eval, limits=read_limits(cfg.data))
    if not tasks:
        raise ValueError(f"{run_dir}: the run's config lists no evaluation tasks (eval.zeroshot / eval.retrieval), "
                         "so there is nothing to measure the interpolation on")
    task_names = [task.name for task in tasks]
    if select is not None and select.rpartition("/")[0] not in task_names:
        raise ValueError(f"--select {select}: not a task of the run's evaluation; use TASK/METRIC with TASK one of "
                         f"{', '.join(task_names)}")
    base_path = resolve_weights(cfg.model.weights)
    final_path = resolve_weights(weights or str(run_dir))

    kwargs = cfg.model.build_kwargs()
    base_bundle = build_model_from(name, kwargs, base_path, seed=cfg.run.seed)
    base_state = _clone_state(base_bundle.model)
    del base_bundle
    bundle = build_model_from(name, kwargs, final_path, seed=cfg.run.seed)
    final_state = _clone_state(bundle.model)
    missing = sorted(set(base_state) ^ set(final_state))
    if missing:  # the same architecture builds the same tensors; guard all the same
        raise ValueError(f"{base_path} and {final_path} hold different tensors ({', '.join(missing[:3])})")

    dev = default_device(DistContext(), cfg.run.device)
    model = bundle.model.to(dev)
    evaluator = Evaluator(tasks, batch_size=cfg.eval.batch_size, device=dev, num_workers=cfg.eval.num_workers)
    found = Interpolation(run_dir=run_dir, base_weights=str(base_path or name), final_weights=str(final_path),
                          select=select)
    for alpha in alphas:
        interpolate_into(model, base_state, final_state, alpha)
        results = evaluator(model, bundle.tokenizer, bundle.eval_transform)
        found.rows.append({"alpha": alpha, "results": results,
                           "aggregates": aggregate_metrics(results, evaluator.main_metrics, evaluator.kinds)})
        if select is not None and len(found.rows) == 1:  # a metric the tasks lack: said at once, naming theirs
            try:
                headline_metric(results, select)
            except ValueError as exc:
                raise ValueError(f"--select {select}: {exc}") from None
        logger.info("interpolation a=%g evaluated", alpha)
    if select is not None:
        scores = [headline_metric(row["results"], select) for row in found.rows]
        best = max(range(len(scores)), key=scores.__getitem__)  # the first (smallest a) of equal scores
        found.chosen = found.rows[best]["alpha"]
        interpolate_into(model, base_state, final_state, found.chosen)
        found.exported = export_model(bundle, model, Path(out) if out else run_dir / INTERPOLATED_WEIGHTS)
    found.written = write_json_atomic(run_dir / INTERPOLATE_FILE, found.to_dict())
    return found
