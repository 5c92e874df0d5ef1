"""The end-of-run report: base, final, best on the selection metric, and a warning when worse."""

import json

from engine.results.report import run_report


def write_log(out, scores, *, task="zs"):
    """An eval record per (stage, step, acc1), plus unrelated records."""
    lines = [{"event": "start"}]
    for stage, step, acc in scores:
        lines.append({"event": "eval", "stage": stage, "step": step,
                      "results": {task: {"acc1": acc, "acc5": 1.0}, "ret": {"mean_recall@1": 0.5}}})
        lines.append({"event": "step", "step": step})
    (out / "log.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_worse_final_model_is_said_plainly_with_the_best_checkpoint(tmp_path):
    write_log(tmp_path, [("start", 0, 0.30), ("finetune", 10, 0.28), ("finetune", 20, 0.32), ("finetune", 30, 0.25)])
    text = run_report(tmp_path, metric="")
    assert "result on zs/acc1 (x100):" in text
    assert "base  (step      0, fine-tuning step 0)   30.00" in text
    assert "final (step     30)   25.00  (-5.00)" in text
    assert "best  (step     20)   32.00  (+2.00)  -> best.safetensors (not written)" in text
    assert text.splitlines()[-1] == ("warning: the final model is worse than the base on zs/acc1 (-5.00); "
                                     "best.safetensors (step 20) is above the base")


def test_better_model_has_no_warning_and_the_named_metric_is_used(tmp_path):
    write_log(tmp_path, [("start", 0, 0.30), ("finetune", 10, 0.35)])
    text = run_report(tmp_path, metric="ret/mean_recall@1")
    assert "result on ret/mean_recall@1" in text and "(+0.00)" in text and "warning" not in text
    # Equal scores: the base model stays the best.
    assert "(the base model's weights)" in text


def test_without_evaluations_the_report_says_nothing_shows_a_gain(tmp_path):
    write_log(tmp_path, [])
    assert run_report(tmp_path, metric="").startswith("no evaluation ran")
