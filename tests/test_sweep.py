"""`run.py sweep`: a grid from one recovered OSR, one report; axes that define OSR statistics get their own OSR."""

import json

import pytest
import yaml

from engine.results.sweep import run_sweep, split_grid
from tests.helpers.jobs import job


def test_grid_axes_are_the_comma_separated_values():
    fixed, axes = split_grid(["loss.margin=0.02,0.05", "optim.lr=1e-4", "optim.betas=[0.9,0.98]"])
    assert fixed == ["optim.lr=1e-4", "optim.betas=[0.9,0.98]"]
    assert axes == {"loss.margin": ["0.02", "0.05"]}


def test_lr_sweep_shares_one_osr_and_writes_one_report(shards, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job(shards, tmp_path / "unused", data={"batch_size": 16},
                                         eval={"at_start": True, "retrieval": [{"name": "pairs", "csv": str(
                                             next((shards.parent / "raw").rglob("*.csv")))}]},
                                         run={"max_steps_per_epoch": 2})))
    run_dirs, report = run_sweep(str(config), ["optim.lr=1e-3,1e-4"], out=tmp_path / "sweep")
    assert [d.name for d in run_dirs] == ["optim.lr=1e-3", "optim.lr=1e-4"]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["optim.lr=1e-3", "optim.lr=1e-4", "osr",
                                                                    "report"]
    for run_dir in run_dirs:
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        loaded = [r for r in log if r["event"] == "osr_loaded"]
        assert len(loaded) == 1 and "/sweep/osr/checkpoints/" in loaded[0]["from"]
        assert not any(r["event"] == "step" and r["stage"] == "osr" for r in log)
        assert (run_dir / "summary.json").exists()
        # Steps as a tune run counts them: the base model at 0, then OSR steps + fine-tuning steps.
        osr_log = (tmp_path / "sweep" / "osr" / "log.jsonl").read_text().splitlines()
        osr_steps = next(r for r in map(json.loads, osr_log) if r["event"] == "osr_done")["adam_step"]
        evals = [r for r in log if r["event"] == "eval"]
        assert [(r["step"], r["ft_step"]) for r in evals] == [(0, 0)] + [(osr_steps + r["ft_step"], r["ft_step"])
                                                                        for r in evals[1:]]
        assert osr_steps > 0 and evals[-1]["ft_step"] > 0
        assert sorted(p.name for p in run_dir.glob("eval_step*.json")) == [
            f"eval_step{r['step']:07d}.json" for r in evals]
    page = report.read_text()
    assert "<td>optim.lr=1e-3</td>" in page and "<td>optim.lr=1e-4</td>" in page


@pytest.mark.parametrize("axis", ["loss.margin=0.05,0.1", "data.train_transform=augment,eval", "method=tuneclip,fastclip",
                                  "loss.surrogate=hgcl,gcl"])
def test_an_axis_that_defines_the_osr_statistics_refuses_one_shared_osr(tmp_path, shards, axis):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job(shards, tmp_path / "unused")))
    with pytest.raises(ValueError, match=f"{axis.partition('=')[0]} define"):
        run_sweep(str(config), [axis], out=tmp_path / "sweep", osr_from=str(tmp_path))
