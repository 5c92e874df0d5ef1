"""The command line as a user runs it: demo, shard building, jobs, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.demo.synthetic import render_pairs

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "run.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
def test_quick_demo_writes_table_plot_report_and_summary_quietly(tmp_path):
    proc = run_cli("demo", "--quick", "--out", tmp_path / "demo")
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    methods = {"openclip", "fastclip", "osr+gcl", "tuneclip"}
    assert set(summary["histories"]) == methods and summary["seeds"] == [0, 1]
    for runs in summary["histories"].values():
        assert set(runs) == {"0", "1"}
        for records in runs.values():
            assert records[0]["step"] == 0 and len(records) >= 3
            assert records[-1]["step"] > records[0]["step"]
            for task in ("shapes-zeroshot", "retained-zeroshot"):  # in-domain and held-out colours, every time
                assert all(0.0 <= r["results"][task]["acc1"] <= 1.0 for r in records)
    # All methods and seeds start from the same base model: sd 0 for the base column.
    starts = {json.dumps(r[0]["results"], sort_keys=True) for runs in summary["histories"].values()
              for r in runs.values()}
    assert len(starts) == 1
    for method in methods:
        for task in ("shapes-retrieval", "retained-retrieval"):
            cells = summary["table"][method][f"{task}/mean_recall@1"]
            assert cells["base"]["sd"] == 0.0
            finals = [100 * r[-1]["results"][task]["mean_recall@1"] for r in summary["histories"][method].values()]
            assert cells["final"]["mean"] == pytest.approx(sum(finals) / 2)
        assert proc.stdout.count(f"\n{method} ") == 2  # a row in each group's table
    assert "in-domain (fine-tuning colours" in proc.stdout and "retained (held-out colours" in proc.stdout
    assert "+-" in proc.stdout and set(summary["margins"]) == {"tuneclip/seed0", "tuneclip/seed1"}
    # Quiet: the engine's INFO lines are in demo.log, not on the console.
    assert " INFO " not in proc.stdout + proc.stderr and " INFO engine" in (tmp_path / "demo" / "demo.log").read_text()
    assert (tmp_path / "demo" / "curves.png").stat().st_size > 10_000
    page = (tmp_path / "demo" / "report" / "report.html").read_text()
    assert all(f"<td>{m}/seed1</td>" in page for m in methods)
    assert (tmp_path / "demo" / "runs" / "tuneclip" / "seed1" / "final.safetensors").exists()


def test_shards_then_finetune_from_the_command_line(tmp_path):
    csv = render_pairs(tmp_path / "raw", num_samples=40, seed=0, split_name="train")
    out = run_cli("shards", "build", csv, tmp_path / "shards", "--samples-per-shard", 16)
    assert "40 samples" in out.stdout
    done = run_cli("finetune", "--method", "fastclip", "--train", tmp_path / "shards", "--out", tmp_path / "run",
                   "--batch-size", 8, "--epochs", 1, "--set", "run.progress=false")
    # No eval tasks were given: the end-of-run report says so and where the weights are.
    assert done.stdout.startswith("no evaluation ran") and str(tmp_path / "run" / "final.safetensors") in done.stdout
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["event"] == "step"]
    assert steps and all(r["stage"] == "finetune" for r in steps)
    assert (tmp_path / "run" / "final.safetensors").exists()


def test_config_errors_exit_2_with_every_problem(tmp_path):
    proc = run_cli("tune", "--train", tmp_path / "none", "--set", "loss.margin=-1", "--set", "osr.epochs=x",
                   "--set", "nope.key=1", check=False)
    assert proc.returncode == 2
    for text in ("loss.margin must be >= 0", "osr.epochs must be an integer", "unknown key 'nope'"):
        assert text in proc.stderr
    proc = run_cli("tune", "--train", tmp_path / "none", check=False)
    assert proc.returncode == 2 and "no manifest" in proc.stderr


def test_demo_never_replaces_an_existing_folder_unasked(tmp_path):
    keep = tmp_path / "mine" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("do not delete")
    proc = run_cli("demo", "--quick", "--out", tmp_path / "mine", check=False)
    assert proc.returncode == 2 and "pass --overwrite" in proc.stderr
    assert keep.read_text() == "do not delete"


def test_help_shows_defaults_and_choices_and_report_writes_the_page(tmp_path):
    from tests.test_report_page import fake_run

    text = run_cli("tune", "--help").stdout
    assert "{tuneclip,fastclip,openclip,siglip}" in text and "(config default: tuneclip)" in " ".join(text.split())
    for alias in ("--wd WD", "= --set optim.weight_decay=WD", "--warmup STEPS", "--precision {amp_bf16,fp32}",
                  "--report-to LIST", "--save-frequency EPOCHS", "--set run.save_every_epochs=EPOCHS"):
        assert alias in " ".join(text.split()), alias  # open_clip_train's spellings, each with the field it sets
    for command in (["--help"], ["tune", "--help"], ["eval", "--help"], ["shards", "build", "--help"]):
        proc = subprocess.run([sys.executable, "-X", "importtime", "run.py", *command], cwd=ROOT, capture_output=True,
                              text=True, check=True)
        imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
        assert not imported & {"torch", "deepspeed", "open_clip"}, command  # --help answers at once
    runs = [fake_run(tmp_path / "runs" / name, method=name, scores=[0.4, 0.5]) for name in ("openclip", "fastclip")]
    out = run_cli("report", *runs)
    assert str(tmp_path / "runs" / "report" / "report.html") in out.stdout
    assert "<td>fastclip</td>" in (tmp_path / "runs" / "report" / "report.html").read_text()


def test_every_command_has_one_handler_in_the_table():
    from engine.cli import COMMANDS, SHARDS_COMMANDS, build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == set(COMMANDS)
    assert set(commands["shards"]._subparsers._group_actions[0].choices) == set(SHARDS_COMMANDS)
