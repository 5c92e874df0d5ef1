"""The end-of-run summary (`summary.json`): did fine-tuning help, what did it cost, where are the files.

Built from the run's `log.jsonl` (every launch of the run, so a resumed run summarises its whole
history), never from memory. `engine.results.report.run_report` prints it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from engine.evaluate import headline_metric
from engine.evaluate.policy import default_metric, is_below_base
from engine.io import write_json_atomic
from engine.run.log import read_jsonl

SUMMARY_FILE = "summary.json"
# Results a run leaves in its folder; a new run never writes over them. (A run killed before any
# evaluation or checkpoint leaves only its log and u table: a new run may start there, see `run_records`.)
RUN_OUTPUTS = (SUMMARY_FILE, "final.safetensors", "best.safetensors")


def earlier_run_outputs(out_dir: Path) -> list[str]:
    """Names of an earlier run's outputs present in `out_dir` (empty when there are none)."""
    out_dir = Path(out_dir)
    found = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
    return found + (["eval_step*.json"] if any(out_dir.glob("eval_step*.json")) else [])


def format_rate(rate: float) -> str:
    """Samples per second with 3 significant digits (0.0412, 3.21, 812, 12400), never a bare 0."""
    if rate >= 1000:
        return f"{rate:.0f}"
    return f"{rate:.3g}"


def run_records(path: Path) -> list[dict]:
    """The records of the current run in log `path`: from its last fresh start on (a resume continues a run;
    a fresh start in the folder of a run killed before any result begins a new one)."""
    log = read_jsonl(path)
    fresh = [i for i, r in enumerate(log)
             if r.get("event") == "start" and not r.get("config", {}).get("run", {}).get("resume")]
    return log[fresh[-1]:] if fresh else log


def _point(record: dict, key: str) -> dict:
    return {"step": record["step"], "ft_step": record.get("ft_step", 0 if record["stage"] == "start" else None),
            "stage": record["stage"], "value": headline_metric(record["results"], key)}


def run_summary(out_dir: Path, *, metric: str = "") -> dict:
    """The summary of the run in `out_dir` from its log: metric at the base, best (with its step) and final;
    evaluations below the base; OSR and fine-tuning wall-clock and device-hours (ranks x hours); samples
    skipped; paths. `metric` is `task/metric`, or empty for the first zero-shot acc1 (as best-checkpoint
    selection does). The best is chosen among all evaluations, the base model's included."""
    out_dir = Path(out_dir)
    log = run_records(out_dir / "log.jsonl")
    starts = [r for r in log if r.get("event") == "start"]
    config = starts[-1].get("config", {}) if starts else {}
    run_cfg = config.get("run", {})
    tolerance = run_cfg.get("below_base_tolerance", 0.0)
    evals = [r for r in log if r.get("event") == "eval"]
    summary: dict = {
        "out_dir": str(out_dir), "method": config.get("method"), "model": config.get("model", {}).get("name"),
        "paths": {"best": str(out_dir / "best.safetensors"), "final": str(out_dir / "final.safetensors"),
                  "log": str(out_dir / "log.jsonl"), "summary": str(out_dir / SUMMARY_FILE),
                  "evaluations": str(out_dir / "eval_step*.json")},
        "warnings": [],
    }
    for name in ("best", "final"):
        if not (out_dir / f"{name}.safetensors").exists():
            summary["paths"][name] = None
    summary["margin"] = _margin(config, log)
    summary["cost"] = _cost(log)
    summary["throughput"] = _throughput(log)
    epoch_ends = [r for r in log if r.get("event") == "epoch_end"]
    summary["num_skipped"] = (epoch_ends[-1].get("num_skipped_all_ranks", epoch_ends[-1].get("num_skipped", 0))
                              if epoch_ends else 0)
    stops = [r for r in log if r.get("event") == "early_stop"]
    summary["stopped_early"] = stops[-1]["reason"] if stops else None
    if not evals:
        summary["metric"] = None
        summary["note"] = ("no evaluation ran (eval.zeroshot / eval.retrieval are empty): nothing shows whether "
                           "fine-tuning helped")
        return summary
    key = metric or config.get("eval", {}).get("best_metric") or default_metric(evals[-1]["results"])
    base_record = next((r for r in evals if r["stage"] == "start"), None)
    base = _point(base_record, key) if base_record else None
    # max() keeps the first of equal scores, as the evaluation policy does (the base model wins ties).
    best_record = max(evals, key=lambda r: headline_metric(r["results"], key))
    best = {**_point(best_record, key), "is_base": best_record is base_record}
    final = _point(evals[-1], key)
    summary.update({"metric": key, "base": base, "best": best, "final": final,
                    "below_base_tolerance": tolerance, "num_evaluations": len(evals)})
    if best["is_base"]:
        summary["best"]["note"] = ("no fine-tuned evaluation beat the base model: best.safetensors holds the base "
                                   "model's weights")
    if base:
        for point in (best, final):
            point["change"] = point["value"] - base["value"]
        below = [_point(r, key) for r in evals if r["stage"] != "start"
                 and is_below_base(headline_metric(r["results"], key), base["value"], tolerance=tolerance)]
        summary["below_base"] = below
        if below:
            lowest = min(below, key=lambda p: p["value"])
            summary["warnings"].append(
                f"{len(below)} of {len(evals) - 1} evaluations fell more than {tolerance:g} below the base on {key} "
                f"(lowest {100 * lowest['value']:.2f} at fine-tuning step {lowest['ft_step']}, base "
                f"{100 * base['value']:.2f})")
        if final["value"] < base["value"]:
            summary["warnings"].append(
                f"the final model is worse than the base on {key} ({100 * final['change']:+.2f}); "
                + ("best.safetensors holds the base model's weights" if best["is_base"]
                   else f"best.safetensors (step {best['step']}) is above the base"))
    if summary["stopped_early"]:
        summary["warnings"].append(f"fine-tuning stopped early: {summary['stopped_early']}")
    return summary


def _throughput(log: list[dict]) -> dict:
    """Per stage, the median over its logged steps of samples/s per device and of MFU (where known), with the
    model's FLOPs per sample and the device they were computed for (engine/run/throughput.py)."""
    model = [r for r in log if r.get("event") == "throughput_model"]
    out: dict = {"flops_per_sample": model[-1]["flops_per_sample"], "device": model[-1]["device"]} if model else {}
    for stage in ("osr", "finetune"):
        steps = [r for r in log if r.get("event") == "step" and r.get("stage") == stage
                 and "samples_per_s_per_device" in r]
        if steps:
            out[stage] = {"samples_per_s_per_device": statistics.median(r["samples_per_s_per_device"] for r in steps)}
            if all("mfu" in r for r in steps):
                out[stage]["mfu"] = statistics.median(r["mfu"] for r in steps)
    return out


def _margin(config: dict, log: list[dict]) -> dict | None:
    """The HGCL margin used (and the rule that chose it, for `loss.margin=auto`), else None."""
    surrogate = config.get("loss", {}).get("surrogate", "auto")
    if surrogate == "auto":
        surrogate = {"tuneclip": "hgcl", "fastclip": "gcl", "openclip": "mbcl"}.get(config.get("method"), surrogate)
    if surrogate != "hgcl":
        return None
    chosen = [r for r in log if r.get("event") == "margin_chosen"]
    if chosen:
        return {"value": round(chosen[-1]["margin"], 6), "rule": chosen[-1]["rule"]}
    return {"value": config.get("loss", {}).get("margin"), "rule": "fixed (loss.margin)"}


def _cost(log: list[dict]) -> dict:
    """Steps, samples, wall-clock seconds and device-hours (ranks x hours) of OSR and fine-tuning, with each
    launch's part: the cost the latest record carries (checkpoints carry it across launches, see
    `engine.run.cost`); logs from before it was recorded: the sum of their stage ends."""
    carried = [r["cost"] for r in log if isinstance(r.get("cost"), dict)]
    if carried:
        return carried[-1]
    cost = {}
    for stage in ("osr", "finetune"):
        ends = [r for r in log if r.get("event") == "stage_end" and r.get("stage") == stage]
        if ends:
            seconds = sum(r["seconds"] for r in ends)
            cost[stage] = {"seconds": round(seconds, 3),
                           "device_hours": round(sum(r["seconds"] * r["world_size"] for r in ends) / 3600, 6),
                           "world_size": ends[-1]["world_size"], "steps": ends[-1]["stage_step"]}
    return cost


def write_summary(out_dir: Path, summary: dict) -> Path:
    """`summary` as `<out_dir>/summary.json` (atomic)."""
    return write_json_atomic(Path(out_dir) / SUMMARY_FILE, summary)


def format_summary(summary: dict) -> str:
    """The summary as lines for the user (values x100), `warning:` lines last."""
    paths = summary["paths"]
    files = f"final weights: {paths['final']}; log: {paths['log']}; summary: {paths['summary']}"
    lines = []
    key = summary.get("metric")
    if key:
        base = summary.get("base")

        def change(point: dict) -> str:
            return f"  ({100 * point['change']:+.2f})" if base else ""

        def where(point: dict) -> str:
            ft = point.get("ft_step")
            return f"(step {point['step']:>6}" + (f", fine-tuning step {ft}" if ft is not None else "") + ")"

        lines.append(f"result on {key} (x100):")
        if base:
            lines.append(f"  base  {where(base)} {100 * base['value']:7.2f}")
        final, best = summary["final"], summary["best"]
        lines.append(f"  final {where(final)} {100 * final['value']:7.2f}{change(final)}")
        best_path = paths["best"] or "best.safetensors (not written)"
        lines.append(f"  best  {where(best)} {100 * best['value']:7.2f}{change(best)}  -> {best_path}"
                     + (" (the base model's weights)" if best["is_base"] else ""))
        files += f"; evaluations: {paths['evaluations']}"
    margin = summary.get("margin")
    if margin:
        lines.append(f"HGCL margin m = {margin['value']}: {margin['rule']}")
    for stage, name in (("osr", "OSR"), ("finetune", "fine-tuning")):
        cost = summary["cost"].get(stage)
        if cost:
            launches = cost.get("launches", [])
            ranks = (f"{len(launches)} launches on {' + '.join(str(e['world_size']) for e in launches)} rank(s)"
                     if len(launches) > 1 else f"{cost['world_size']} rank(s)")
            speed = summary.get("throughput", {}).get(stage)
            rate = (f", {speed['samples_per_s_per_device']:.4g} samples/s per device"
                    + (f", MFU {100 * speed['mfu']:.1f}%" if "mfu" in speed else "")) if speed else ""
            lines.append(f"{name}: {cost['steps']} steps, {cost['seconds']:.1f} s wall-clock, "
                         f"{cost['device_hours']:.4g} device-hours ({ranks}){rate}")
    if summary.get("num_skipped"):
        lines.append(f"samples skipped: {summary['num_skipped']} (see skipped/rank_*.jsonl)")
    if key:
        lines.append(f"  {files}")
    else:
        lines.insert(0, f"{summary['note']}; {files}")
    lines += [f"warning: {text}" for text in summary["warnings"]]
    return "\n".join(lines)
