"""The evaluation policy: best weights (the base model a candidate), below-base warnings, early stop, and
its state carried by checkpoints so a resumed run decides as a straight run does."""

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.config import load_config
from engine.evaluate.policy import EvalPolicy
from engine.run.log import read_jsonl
from engine.trainer import Trainer
from tests.helpers.eval_fixtures import ScriptedEvaluator
from tests.helpers.jobs import crash_after, job

# The base model, a better fine-tuned step, then two below the base (tolerance 0.01) and a recovery.
SCORES = [0.50, 0.60, 0.495, 0.40, 0.30, 0.70]


def observe_all(policy, scores, *, first_ft_step=0):
    """The verdicts on `scores`; the first is the base model's when `first_ft_step` is 0."""
    verdicts = []
    for i, score in enumerate(scores, start=first_ft_step):
        stage = "start" if i == 0 else "finetune"
        verdicts.append(policy.observe({"zs": {"acc1": score}, "other": {"acc1": 0.0}}, stage=stage, step=10 + i,
                                       ft_step=i))
    return verdicts


def summary_of(verdicts):
    return [(v.key, v.score, v.is_best, [e["event"] for e in v.events], v.stop) for v in verdicts]


def test_best_includes_the_base_and_below_base_evaluations_in_a_row_stop():
    policy = EvalPolicy(below_base_tolerance=0.01, stop_below_base=2)
    verdicts = observe_all(policy, SCORES)
    assert summary_of(verdicts) == [
        ("zs/acc1", 0.50, True, [], None),  # the base model is the first best
        ("zs/acc1", 0.60, True, [], None),
        ("zs/acc1", 0.495, False, [], None),  # within the tolerance: not below
        ("zs/acc1", 0.40, False, ["below_base"], None),
        ("zs/acc1", 0.30, False, ["below_base", "early_stop"], verdicts[4].stop),
        ("zs/acc1", 0.70, True, [], None),  # back above: the count starts again
    ]
    assert "2 consecutive evaluations below the base on zs/acc1 (run.stop_below_base=2)" == verdicts[4].stop
    assert verdicts[4].events[0] == {"event": "below_base", "step": 14, "ft_step": 4, "metric": "zs/acc1",
                                     "value": 0.30, "base": 0.50, "consecutive": 2}
    assert policy.state_dict() == {"best_score": 0.70, "best_step": 15, "base_score": 0.50, "num_below_base": 0}

    # Ties keep the earlier evaluation (the base model wins them); a named metric is used as given.
    tied = EvalPolicy(best_metric="other/acc1")
    assert [v.is_best for v in observe_all(tied, [0.5, 0.9])] == [True, False]
    assert tied.best_step == 10
    # Without a base evaluation nothing is below the base, and stop_below_base=0 never stops.
    no_base = EvalPolicy(below_base_tolerance=0.0, stop_below_base=0)
    assert all(not v.events for v in observe_all(no_base, [0.1, 0.05], first_ft_step=1))
    never = EvalPolicy(stop_below_base=0)
    assert all(v.stop is None for v in observe_all(never, [0.5, 0.1, 0.1, 0.1]))


@pytest.mark.parametrize("split", [2, 4])
def test_state_restored_from_json_gives_the_straight_decisions(split):
    straight = summary_of(observe_all(EvalPolicy(below_base_tolerance=0.01, stop_below_base=2), SCORES))
    first = EvalPolicy(below_base_tolerance=0.01, stop_below_base=2)
    before = observe_all(first, SCORES[:split])
    resumed = EvalPolicy(below_base_tolerance=0.01, stop_below_base=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint's state.json holds it
    after = observe_all(resumed, SCORES[split:], first_ft_step=split)
    assert summary_of(before + after) == straight


def test_a_damaged_state_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"eval_policy: best_score is 'high'.*another step_\* folder"):
        EvalPolicy().load_state_dict({"best_score": "high", "best_step": 3})


class Crash(RuntimeError):
    pass


def decisions(out):
    """The run log's evaluations and the policy's events, without wall times."""
    return [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in read_jsonl(out / "log.jsonl")
            if r["event"] in ("eval", "below_base", "early_stop")]


def test_resume_mid_run_keeps_the_best_and_the_count_below_the_base(shards, tmp_path):
    """Stopped after fine-tuning step 2 (best at step 1, one evaluation below the base), resumed: step 3 is
    the second below the base, so the run stops and best.safetensors keeps step 1's weights, as straight."""
    scores = [0.50, 0.60, 0.40, 0.30, 0.70]  # base, ft 1 (best), ft 2 (below), ft 3 (below: stop), never reached

    def config(out, **run):
        return load_config(base=job(shards, out, data={"batch_size": 16}, eval={"at_start": True, "every_steps": 1},
                                    run={"epochs": 2, "stop_below_base": 2, "below_base_tolerance": 0.01,
                                         "save_every_steps": 1, **run}))

    straight = Trainer(config(tmp_path / "straight"))
    straight.evaluator = ScriptedEvaluator(scores)
    straight.tune()
    straight.close()

    out = tmp_path / "resumed"
    first = Trainer(config(out))
    first.evaluator = ScriptedEvaluator(scores)
    crash_after(first, 3 + 2, Crash("stopped"))  # 3 OSR steps, 2 fine-tuning steps
    with pytest.raises(Crash):
        first.tune()
    first.close()
    resumed = Trainer(config(out, resume="latest"))
    assert resumed.eval_policy.state_dict() == {"best_score": 0.60, "best_step": 4, "base_score": 0.50,
                                                "num_below_base": 1}
    resumed.evaluator = ScriptedEvaluator(scores[3:])
    resumed.tune()
    resumed.close()

    assert decisions(out) == decisions(tmp_path / "straight")
    stops = [r for r in decisions(out) if r["event"] == "early_stop"]
    assert [(r["ft_step"], r["reason"][:2]) for r in stops] == [(3, "2 ")]
    best, straight_best = load_file(out / "best.safetensors"), load_file(tmp_path / "straight" / "best.safetensors")
    assert best.keys() == straight_best.keys() and all(torch.equal(best[k], straight_best[k]) for k in best)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["best"]["ft_step"], summary["best"]["value"], summary["final"]["ft_step"]) == (1, 0.60, 3)
