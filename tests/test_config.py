"""Job configuration: YAML + overrides, typed coercion, every error at once, stable round trip."""

from pathlib import Path

import pytest

from engine import backends
from engine.backends import backend_names
from engine.config import JobConfig, load_config


def test_config_errors_are_reported_together(tmp_path):
    with pytest.raises(ValueError) as info:
        load_config(base={"method": "simclr", "loss": {"margin": -1, "gamma_min": 2.0, "bogus": 1},
                          "data": {"train": str(tmp_path), "batch_size": 1}})
    text = str(info.value)
    for expected in ("method must be one of", "loss.margin", "loss.gamma_min", "unknown key 'loss.bogus'",
                     "data.batch_size"):
        assert expected in text


def test_training_data_is_required_for_training_only(tmp_path):
    cfg = load_config(training=False)
    assert cfg.data.train == "" and cfg == JobConfig()
    with pytest.raises(ValueError, match="data.train is required") as info:
        load_config()
    assert str(info.value).count("\n  - ") == 1  # the only problem of the defaults
    (tmp_path / "manifest.json").write_text("{}")
    assert load_config(overrides=[f"data.train={tmp_path}"]).data.train == str(tmp_path)


def test_yaml_file_then_overrides(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    path = tmp_path / "job.yaml"
    path.write_text(
        "method: fastclip\n"
        f"data:\n  train: {tmp_path}\n  batch_size: 32\n"
        "optim:\n  lr: 1e-5\n  betas: [0.8, 0.9]\n"  # YAML 1.1 reads 1e-5 (no dot) as a string
        "loss:\n  margin: 0.5\n  gamma_decay_epochs: 2\n"
    )
    cfg = load_config(path, ["loss.margin=0.2", "run.epochs=3", "optim.weight_decay=2e-2", "model.weights=null"])
    assert cfg.method == "fastclip"
    assert cfg.data.train == str(tmp_path) and cfg.data.batch_size == 32
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-5
    assert cfg.optim.betas == (0.8, 0.9) and isinstance(cfg.optim.betas, tuple)
    assert cfg.loss.margin == 0.2  # the override wins over the file
    assert cfg.loss.gamma_decay_epochs == 2  # the file's other keys in that section are kept
    assert isinstance(cfg.optim.weight_decay, float) and cfg.optim.weight_decay == 0.02
    assert cfg.run.epochs == 3 and cfg.model.weights is None
    assert cfg.data.shuffle_buffer == JobConfig().data.shuffle_buffer  # untouched default
    assert cfg.surrogate == "gcl"


def test_overrides_are_typed_and_bad_ones_named(tmp_path):
    with pytest.raises(ValueError) as info:
        load_config(overrides=["data.train=x", "run.epochs=two", "optim.lr=fast", "run.progress=maybe",
                               "optim.betas=[0.9]", "nosection.key=1"])
    text = str(info.value)
    for expected in ("run.epochs must be an integer", "optim.lr must be a number", "run.progress must be true",
                     "optim.betas must be a list of 2", "unknown key 'nosection'"):
        assert expected in text
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(overrides=["loss.margin"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", backend_names())
def test_every_registered_backend_is_accepted(name):
    assert load_config(overrides=[f"run.backend={name}"], training=False).run.backend == name


def test_unknown_backend_is_refused_naming_the_choices(monkeypatch):
    names = backend_names()
    assert {"single", "deepspeed"} <= set(names)
    with pytest.raises(ValueError, match="run.backend must be one of") as info:
        load_config(overrides=["run.backend=megatron"], training=False)
    text = str(info.value)
    assert "'megatron'" in text
    assert all(name in text for name in names)
    # The choices come from the registry: a newly registered backend becomes valid.
    monkeypatch.setitem(backends._REGISTERED, "megatron", object)
    assert load_config(overrides=["run.backend=megatron"], training=False).run.backend == "megatron"


def test_to_dict_round_trips_to_an_equal_config_and_digest(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "osr_ckpt").mkdir()
    cfg = load_config(base={
        "method": "openclip",
        "model": {"name": "ViT-B-32", "weights": str(weights), "preset": "dfn5b", "precision": "bf16"},
        "data": {"train": str(tmp_path / "manifest.json"), "batch_size": 8, "resampled": True, "samples_per_epoch": 1000},
        "loss": {"margin": 0.3, "eps": 1e-10, "chunk_size": 4},
        "optim": {"betas": [0.85, 0.95], "lr": 3e-4},
        "osr": {"load_from": str(tmp_path / "osr_ckpt"), "seed_u": False},
        "eval": {"zeroshot": [{"name": "in", "csv": str(weights), "classnames": str(weights)}], "every_steps": 7},
        "run": {"seed": 123, "keep_last_n": 3, "resume": "latest"},
    })
    again = load_config(base=cfg.to_dict())
    assert again == cfg
    assert again.digest() == cfg.digest()
    assert again.to_dict() == cfg.to_dict()
    assert isinstance(again.optim.betas, tuple)
    # The digest sees every value.
    changed = load_config(base={**cfg.to_dict(), "run": {**cfg.to_dict()["run"], "seed": 124}})
    assert changed != cfg and changed.digest() != cfg.digest()
    assert load_config(training=False).digest() == JobConfig().digest()
    assert JobConfig().digest() != cfg.digest()


def test_shipped_zero_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from engine.backends.zero_configs import SHIPPED_ZERO_CONFIGS, resolve_zero_config, shipped_zero_configs

    monkeypatch.chdir(tmp_path)  # outside the repository
    assert set(shipped_zero_configs()) == {p.stem for p in SHIPPED_ZERO_CONFIGS.glob("*.json")} >= {"zero2", "zero3"}
    for given in ("zero3", "zero3.json", "zero_configs/zero3.json"):
        assert resolve_zero_config(given) == SHIPPED_ZERO_CONFIGS / "zero3.json"
    assert resolve_zero_config(None) == SHIPPED_ZERO_CONFIGS / "zero2.json"
    own = tmp_path / "zero_configs" / "zero3.json"  # a path that exists wins over the shipped name
    own.parent.mkdir()
    own.write_text("{}")
    assert resolve_zero_config("zero_configs/zero3.json") == Path("zero_configs/zero3.json")
    cfg = load_config(overrides=["run.backend=deepspeed", "run.zero_config=zero3_bf16"], training=False)
    assert cfg.run.zero_config == "zero3_bf16"  # kept as given (digest, resume); resolved where it is read


def test_every_path_of_a_job_is_checked_with_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as info:
        load_config(overrides=[
            "data.train=shards", "model.weights=w.safetensors", "run.backend=deepspeed", "run.zero_config=zero9",
            "run.resume=runs/x/checkpoints/step_9", "eval.retrieval=[{name: r, csv: pairs.csv}]",
            "eval.zeroshot=[{name: z, csv: zs.csv, classnames: imagenet1k, templates: t.txt}]"])
    problems = str(info.value).split("\n  - ")[1:]
    assert len(problems) == 7, problems
    expected = ["data.train: no manifest at shards", "model.weights: file w.safetensors does not exist",
                "run.zero_config: zero9 is neither a file", "zero2, zero2_bf16, zero3",
                "run.resume: runs/x/checkpoints/step_9 is not a checkpoint folder",
                "eval.retrieval[0] 'r': csv pairs.csv does not exist", "eval.zeroshot[0] 'z': csv zs.csv does not exist",
                "eval.zeroshot[0] 'z': templates t.txt does not exist"]
    for text in expected:
        assert any(text in problem for problem in problems), text
    assert not any("imagenet1k" in problem for problem in problems)  # a built-in list, not a path


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_job_with_missing_paths_stops_before_torch_loads_from_any_folder(tmp_path, rank):
    """`run.py tune` from outside the repository: the shipped ZeRO config is found by name, the missing paths are
    named before torch, open_clip or deepspeed is imported; under a launcher only rank 0 prints them."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import sys; from engine.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, sorted(m for m in ('torch', 'open_clip', 'deepspeed') if m in sys.modules))")
    args = ["tune", "--train", "shards", "--weights", "w.safetensors", "--set", "run.backend=deepspeed",
            "--set", "run.zero_config=zero3_bf16", "--set", "eval.retrieval=[{name: r, csv: eval/r.csv}]"]
    env = {**os.environ, "PYTHONPATH": str(root), "RANK": rank}
    proc = subprocess.run([sys.executable, "-c", code, *args], check=False, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == "2 []", proc.stderr
    if rank != "0":
        assert proc.stderr == ""
        return
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "error: invalid configuration:" and len(lines) == 4, proc.stderr
    assert "data.train: no manifest at shards" in lines[1] and "model.weights" in lines[2] and "r.csv" in lines[3]
    assert "zero_config" not in proc.stderr  # found by name
