"""End of every run: summary.json contents, best never below the base, early stop, refusal to overwrite,
TensorBoard scalars."""

import json
import statistics

import pytest
import torch
from safetensors.torch import load_file

from engine.config import load_config
from engine.results.summary import format_rate, format_summary, run_summary
from engine.run.throughput import model_flops_per_sample
from engine.trainer import Trainer
from tests.helpers.eval_fixtures import ScriptedEvaluator
from tests.helpers.jobs import job


def write_log(out, records):
    (out / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def evaluation(stage, step, ft_step, acc):
    return {"event": "eval", "stage": stage, "step": step, "ft_step": ft_step, "results": {"zs": {"acc1": acc}}}


def test_summary_from_the_log_of_a_resumed_run(tmp_path):
    config = {"method": "tuneclip", "loss": {"surrogate": "auto", "margin": 0.1},
              "run": {"below_base_tolerance": 0.01}, "eval": {"best_metric": ""}}
    write_log(tmp_path, [
        {"event": "start", "config": config},  # a run killed before any result: not part of this run
        evaluation("start", 0, 0, 0.99),
        {"event": "start", "config": config},
        evaluation("start", 0, 0, 0.50),
        {"event": "stage_end", "stage": "osr", "seconds": 7200.0, "world_size": 4, "stage_step": 30},
        evaluation("finetune", 32, 2, 0.495),  # within the tolerance: not below the base
        evaluation("finetune", 34, 4, 0.46),
        {"event": "epoch_end", "num_skipped": 1, "num_skipped_all_ranks": 3},
        {"event": "start", "config": {**config, "run": {"below_base_tolerance": 0.01, "resume": "latest"}}},  # a resumed launch
        evaluation("finetune", 36, 6, 0.55),
        evaluation("finetune", 38, 8, 0.48),
        {"event": "stage_end", "stage": "finetune", "seconds": 1800.0, "world_size": 2, "stage_step": 8},
        {"event": "epoch_end", "num_skipped": 2, "num_skipped_all_ranks": 5},
    ])
    summary = run_summary(tmp_path)
    assert summary["metric"] == "zs/acc1"
    assert summary["base"] == {"step": 0, "ft_step": 0, "stage": "start", "value": 0.50}
    assert summary["best"]["ft_step"] == 6 and summary["best"]["value"] == 0.55 and not summary["best"]["is_base"]
    assert summary["best"]["change"] == pytest.approx(0.05)
    assert summary["final"]["ft_step"] == 8 and summary["final"]["change"] == pytest.approx(-0.02)
    assert [p["ft_step"] for p in summary["below_base"]] == [4, 8]
    assert summary["cost"]["osr"] == {"seconds": 7200.0, "device_hours": 8.0, "world_size": 4, "steps": 30}
    assert summary["cost"]["finetune"]["device_hours"] == 1.0
    assert summary["num_skipped"] == 5
    assert summary["margin"] == {"value": 0.1, "rule": "fixed (loss.margin)"}
    assert summary["paths"]["best"] is None  # nothing was written in this folder
    assert any("2 of 4 evaluations fell more than 0.01 below the base" in w for w in summary["warnings"])
    assert any("final model is worse than the base" in w for w in summary["warnings"])


def test_the_base_model_wins_when_nothing_beats_it(tmp_path):
    write_log(tmp_path, [{"event": "start", "config": {"method": "fastclip"}}, evaluation("start", 0, 0, 0.5),
                         evaluation("finetune", 2, 2, 0.4), evaluation("finetune", 4, 4, 0.5)])
    summary = run_summary(tmp_path)
    assert summary["best"]["is_base"] and summary["best"]["ft_step"] == 0
    assert "base model's weights" in summary["best"]["note"]
    assert summary["margin"] is None


def test_samples_per_second_never_round_to_zero():
    assert [format_rate(r) for r in (0.0412, 3.214, 812.4, 12400.2)] == ["0.0412", "3.21", "812", "12400"]


def test_a_run_below_base_keeps_the_base_as_best_stops_early_and_logs_to_tensorboard(shards, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = load_config(base=job(shards, out, data={"batch_size": 16}, osr={"epochs": 1},
                               eval={"at_start": True, "every_steps": 1},
                               run={"epochs": 2, "stop_below_base": 2, "tensorboard": True, "log_every": 1}))
    trainer = Trainer(cfg)
    trainer.evaluator = ScriptedEvaluator([0.50, 0.40, 0.30, 0.60])  # the last one is never reached
    w0 = {k: v.detach().clone() for k, v in trainer.backend.model.state_dict().items()}
    trainer.tune()
    trainer.close()

    # best.safetensors holds the base weights (every fine-tuned evaluation was worse); final moved on.
    best, final = load_file(out / "best.safetensors"), load_file(out / "final.safetensors")
    assert all(torch.equal(best[k], w0[k]) for k in best)
    assert any(not torch.equal(final[k], w0[k]) for k in final if k in w0 and final[k].is_floating_point())

    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["is_base"] and summary["best"]["value"] == 0.5
    assert summary["final"]["ft_step"] == 2 and summary["final"]["value"] == 0.3  # stopped after 2 below
    assert "2 consecutive evaluations below the base" in summary["stopped_early"]
    assert summary["cost"]["osr"]["steps"] == 3 and summary["cost"]["osr"]["seconds"] > 0
    assert summary["cost"]["osr"]["device_hours"] == pytest.approx(summary["cost"]["osr"]["seconds"] / 3600,
                                                                   abs=1e-6)
    assert summary["margin"]["value"] == 0.1

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # Throughput: FLOPs counted once for the architecture; per-device rates are the logged ones (1 rank); no MFU
    # on a CPU. The medians are those of the steps' values.
    steps = [r for r in log if r["event"] == "step"]
    assert all(r["samples_per_s_per_device"] == r["samples_per_s"] and "mfu" not in r for r in steps)
    assert summary["throughput"]["flops_per_sample"] == model_flops_per_sample(cfg.model.name)
    for stage in ("osr", "finetune"):
        rates = sorted(r["samples_per_s"] for r in steps if r["stage"] == stage)
        assert summary["throughput"][stage] == {"samples_per_s_per_device": statistics.median(rates)}
    assert f"{summary['throughput']['finetune']['samples_per_s_per_device']:.4g} samples/s per device" in \
        format_summary(summary)
    evals = [r for r in log if r["event"] == "eval"]
    # Evaluation steps: global steps count OSR's 3; ft_step counts fine-tuning steps only.
    assert [(r["step"], r["ft_step"]) for r in evals] == [(0, 0), (4, 1), (5, 2)]

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    zs = [(e.step, round(e.value, 4)) for e in events.Scalars("eval/zs/acc1")]
    assert zs == [(0, 0.5), (1, 0.4), (2, 0.3)]
    osr_loss = [r["loss"] for r in log if r["event"] == "step" and r["stage"] == "osr"]
    assert [round(e.value, 4) for e in events.Scalars("osr/loss")] == [round(v, 4) for v in osr_loss]
    assert [e.step for e in events.Scalars("osr/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("finetune/lr")] == [1, 2]


def test_a_new_run_refuses_a_folder_with_an_earlier_run(shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"event": "start"}\n')
    (out / "final.safetensors").write_bytes(b"keep")
    with pytest.raises(ValueError, match="earlier run's final.safetensors: start a new run in another --out.*--resume latest"):
        Trainer(load_config(base=job(shards, out)))
    assert (out / "log.jsonl").read_text() == '{"event": "start"}\n'
    assert (out / "final.safetensors").read_bytes() == b"keep"


def test_wandb_without_the_package_is_one_clear_error(tmp_path, monkeypatch):
    import builtins

    from engine.run.live import build_live_sinks

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    cfg = load_config(None, ["run.wandb_project=demo"], training=False)
    with pytest.raises(ValueError, match="run.wandb_project=demo needs the optional package wandb: pip install wandb"):
        build_live_sinks(cfg, tmp_path)
