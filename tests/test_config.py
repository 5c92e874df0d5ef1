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


# ----- values read by the field's declared type -----

@pytest.fixture
def in_job_folder(tmp_path, monkeypatch):
    """A working folder holding the paths these configs name (paths are checked with the config)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "2024_01").mkdir()
    (tmp_path / "2024_01" / "manifest.json").write_text("{}")
    (tmp_path / "2024_01.csv").write_text("")
    (tmp_path / "2024-01-31").mkdir()
    return tmp_path



@pytest.mark.parametrize("override,key,expected", [
    # str fields keep the text as typed (YAML would read 83, 202401, 90, True, None)
    ("run.out_dir=0123", "run.out_dir", "0123"),
    ("data.train=2024_01", "data.train", "2024_01"),
    ("eval.best_metric=1:30", "eval.best_metric", "1:30"),
    ("run.device=on", "run.device", "on"),
    ("model.tokenizer=0x10", "model.tokenizer", "0x10"),
    ("model.name= spaced ", "model.name", " spaced "),
    # a field that may be null: YAML's null spellings and empty text
    ("model.weights=null", "model.weights", None),
    ("model.weights=~", "model.weights", None),
    ("model.weights=", "model.weights", None),
    # numbers and booleans
    ("run.epochs=0123", "run.epochs", 123),
    ("run.epochs=1_000", "run.epochs", 1000),
    ("optim.lr=1e-5", "optim.lr", 1e-5),
    ("optim.grad_clip=2", "optim.grad_clip", 2.0),
    ("run.progress=off", "run.progress", False),
    ("run.progress=True", "run.progress", True),
    # float | str: a number when it reads as one
    ("loss.margin=0.2", "loss.margin", 0.2),
    ("loss.margin=auto", "loss.margin", "auto"),
    # list elements, each by the element type
    ("optim.betas=[0.8, 0.9]", "optim.betas", (0.8, 0.9)),
    ("model.mean=[1, 2, 3]", "model.mean", [1.0, 2.0, 3.0]),
    ("eval.retrieval=[{name: 0123, csv: 2024_01.csv}]", "eval.retrieval", [{"name": "0123", "csv": "2024_01.csv"}]),
    ("model.precision=bf16", "model.precision", "bf16"),
])
def test_override_text_is_read_by_the_field_type(override, key, expected, in_job_folder):
    section, _, name = key.rpartition(".")
    value = getattr(getattr(load_config(overrides=[override], training=False), section), name)
    assert value == expected and type(value) is type(expected)
    if isinstance(value, (list, tuple)):
        assert [type(v) for v in value] == [type(v) for v in expected]


@pytest.mark.parametrize("override,error", [
    ("run.epochs=2.0", "run.epochs must be an integer, got '2.0'"),
    ("run.epochs=", "run.epochs must be an integer, got ''"),
    ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
    ("run.progress=1", "run.progress must be true or false, got '1'"),
    ("model.mean=[1, x, 3]", "model.mean[1] must be a number, got 'x'"),
    ("optim.betas=[0.9, no]", "optim.betas[1] must be a number, got 'no'"),
    ("optim.betas=0.9", "optim.betas must be a list of 2 values, got '0.9'"),
    ("eval.zeroshot=[a", "eval.zeroshot: '[a' is not a YAML list or mapping"),
    ("eval.zeroshot=[x]", "eval.zeroshot[0] must be a mapping, got 'x'"),
    ("method=simclr", "method must be one of ('tuneclip', 'fastclip', 'openclip', 'siglip'), got 'simclr'"),
    ("osr.surrogate=mbcl", "osr.surrogate must be one of ('auto', 'hgcl', 'gcl'), got 'mbcl'"),
    ("model.interpolation=nearest",
     "model.interpolation must be one of ('bicubic', 'bilinear', 'random'), got 'nearest'"),
])
def test_bad_override_text_is_one_line_naming_the_field(override, error):
    with pytest.raises(ValueError) as info:
        load_config(overrides=[override], training=False)
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid configuration:" and len(lines) == 2  # one line, no second report from the checks
    assert lines[1].startswith(f"  - {error}")


def test_every_error_is_reported_at_once_one_line_each():
    with pytest.raises(ValueError) as info:
        load_config(overrides=["method=simclr", "model.precision=fp16", "model.mean=[1, 2]", "run.epochs=x",
                               "data.train_transform=none", "run.wandb_mode=cloud", "loss.gamma_min=2"],
                    training=False)
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 7 and all(line.startswith("  - ") for line in lines)
    assert "  - data.train_transform must be one of ('augment', 'eval'), got 'none'" in lines


def test_config_file_is_yaml_but_a_str_field_keeps_a_number_as_written(tmp_path, in_job_folder):
    path = tmp_path / "job.yaml"
    path.write_text("data:\n  train: 2024_01\n  batch_size: 16\n"
                    "run:\n  out_dir: 0123\n  device: on\n  epochs: 3\n  progress: no\n  resume: 2024-01-31\n"
                    "eval:\n  best_metric: 1:30\n"
                    "model:\n  mean: [1, 2, 3]\n  tokenizer: 1.50\n"
                    "optim:\n  lr: 1e-5\n  betas: [0.8, 0.9]\n")
    cfg = load_config(path, training=False)
    assert (cfg.data.train, cfg.run.out_dir, cfg.run.device, cfg.eval.best_metric, cfg.model.tokenizer,
            cfg.run.resume) == ("2024_01", "0123", "on", "1:30", "1.50", "2024-01-31")
    assert (cfg.data.batch_size, cfg.run.epochs, cfg.run.progress, cfg.optim.lr) == (16, 3, False, 1e-5)
    assert cfg.model.mean == [1.0, 2.0, 3.0] and all(type(v) is float for v in cfg.model.mean)
    assert cfg.optim.betas == (0.8, 0.9)
    # Typed fields still read YAML values: a quoted number is text, not an integer.
    path.write_text("run:\n  epochs: '3'\n  progress: 'yes'\n")
    with pytest.raises(ValueError) as info:
        load_config(path, training=False)
    assert "run.epochs must be an integer, got '3'" in str(info.value)
    assert "run.progress must be true or false, got 'yes'" in str(info.value)


def test_a_whole_section_as_override_text_reads_each_field_by_its_type():
    cfg = load_config(overrides=["run={out_dir: 0123, epochs: 2, progress: off}"], training=False)
    assert (cfg.run.out_dir, cfg.run.epochs, cfg.run.progress) == ("0123", 2, False)
    with pytest.raises(ValueError, match="'run' must be a mapping of its fields"):
        load_config(overrides=["run=0123"], training=False)


def test_cli_shortcut_flags_keep_the_text_as_typed(in_job_folder):
    from engine.cli import build_parser, job_config_from_args

    args = build_parser().parse_args(["tune", "--out", "0123", "--train", "2024_01", "--lr", "1e-4", "--margin", "auto",
                                      "--epochs", "07", "--set", "eval.best_metric=1:30"])
    cfg = job_config_from_args(args)
    assert (cfg.run.out_dir, cfg.data.train, cfg.eval.best_metric) == ("0123", "2024_01", "1:30")
    assert (cfg.optim.lr, cfg.loss.margin, cfg.run.epochs) == (1e-4, "auto", 7)


# ----- the fields' own rules and the generated reference -----

def test_every_field_declares_a_doc_and_its_resume_and_osr_rules():
    from engine.config import OSR_RULES, RESUME_RULES, config_fields

    fields = config_fields()
    assert "loss.margin" in fields and "method" in fields and "run" not in fields
    for key, f in fields.items():
        assert f.metadata.get("doc"), f"{key}: give it a doc with setting(default, 'doc', ...)"
        assert f.metadata.get("resume") in RESUME_RULES and f.metadata.get("osr") in OSR_RULES, key


def test_choices_are_literal_types_shared_with_the_cli():
    import typing

    from engine.cli import build_parser
    from engine.config import METHODS, SURROGATE_CHOICES, Method, config_fields

    assert METHODS == typing.get_args(Method) and "hgcl" in SURROGATE_CHOICES
    hints = typing.get_type_hints(JobConfig)
    assert typing.get_origin(hints["method"]) is typing.Literal
    assert [f for f in config_fields() if f.endswith(("surrogate", "precision", "train_transform", "wandb_mode"))]
    tune = build_parser()._subparsers._group_actions[0].choices["tune"]
    method_flag = next(a for a in tune._actions if a.dest == "method")
    assert tuple(method_flag.choices) == METHODS


def test_configuration_reference_is_up_to_date():
    from pathlib import Path

    from engine.config_reference import reference_markdown

    path = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert path.read_text(encoding="utf-8") == reference_markdown(), (
        "docs/configuration.md is out of date: python -m engine.config_reference > docs/configuration.md")
    text = path.read_text(encoding="utf-8")
    assert "| `data.train_transform` | \"augment\" \\| \"eval\" | `augment` | must match | yes |" in text
    assert "| `run.epochs` | int | `5` | may only grow (logged) |" in text


def test_an_override_inside_a_mapping_field_adds_to_it_and_the_whole_field_replaces_it(tmp_path):
    assert load_config(overrides=["loss.terms.toy=0.5"], training=False).loss.terms == {"contrastive": 1.0, "toy": 0.5}
    assert load_config(overrides=["loss.terms={toy: 1}"], training=False).loss.terms == {"toy": 1.0}
    job = tmp_path / "job.yaml"
    job.write_text("loss: {terms: {toy: 1.0}}\n")
    assert load_config(str(job), ["loss.terms.pull=0.25"], training=False).loss.terms == {"toy": 1.0, "pull": 0.25}
    assert JobConfig().loss.terms == {"contrastive": 1.0}  # the default itself is never changed

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


