"""What a run and `run.py export` hand to stock open_clip: a shipped-config model loads by the README's recipe in a
process that never imports this project, with the engine's features; the weights each command loaded are named
once, and open_clip's "initialized randomly" notice never shows when they are loaded. open_clip_train's spellings run
as the engine's fields, each named once."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import build_model

ROOT = Path(__file__).resolve().parents[1]
RANDOM_INIT_NOTICE = "No pretrained weights loaded"

# The README's recipe, run with a clean sys.path (python -I, outside the repository): images and captions in,
# features out; it fails if this project's packages were imported on the way.
STOCK_OPEN_CLIP = textwrap.dedent("""
    import sys
    import open_clip, torch
    from safetensors.torch import save_file
    out = {}
    for tag, folder in enumerate(sys.argv[2:]):
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        torch.manual_seed(0)
        images = torch.randn(2, 3, 32, 32)
        tokens = tokenizer(["a red square", "a blue circle"])
        with torch.no_grad():
            image, text = model.encode_image(images), model.encode_text(tokens)
        out.update({f"images{tag}": images, f"tokens{tag}": tokens, f"image{tag}": image, f"text{tag}": text})
    ours = sorted({name.split(".")[0] for name in sys.modules} & {"engine", "models", "tests"})
    assert not ours, f"imported {ours}"
    save_file(out, sys.argv[1])
""")


def run_cli(*args, cwd=ROOT):
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def stock_features(tmp_path: Path, *folders: Path) -> dict[str, torch.Tensor]:
    result = tmp_path / "stock.safetensors"
    subprocess.run([sys.executable, "-I", "-c", STOCK_OPEN_CLIP, str(result), *map(str, folders)], cwd=tmp_path,
                   check=True, timeout=300)
    return load_file(result)


def engine_features(weights: Path, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bundle = build_model("tiny-vit", weights=weights)
    assert torch.equal(bundle.tokenizer(["a red square", "a blue circle"]), tokens)
    with torch.no_grad():
        return bundle.model.encode_image(images), bundle.model.encode_text(tokens)


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):
    """A 2-epoch tiny-vit fine-tuning run (2 steps an epoch) started with open_clip_train's spellings."""
    out = tmp_path_factory.mktemp("export") / "run"
    proc = run_cli("finetune", "--method", "fastclip", "--model", "tiny-vit", "--train", shards, "--out", out,
                   "--batch-size", "8", "--epochs", "2", "--set", "run.max_steps_per_epoch=2",
                   "--set", "run.progress=false", "--wd", "0.05", "--warmup", "1", "--precision", "amp_bf16",
                   "--save-frequency", "1", "--report-to", "tensorboard", "--set", "model.precision=fp32")
    return out, proc.stderr


def test_open_clip_train_spellings_run_as_the_engines_fields_named_once(run):
    out, stderr = run
    notes = [line for line in stderr.splitlines() if line.startswith("note: ")]
    assert notes == ["note: --wd 0.05 is run as --set optim.weight_decay=0.05",
                     "note: --warmup 1 is run as --set optim.warmup_steps=1",
                     "note: --precision amp_bf16 is run as --set model.precision=bf16",
                     "note: --report-to tensorboard is run as --set run.tensorboard=true",
                     "note: --save-frequency 1 is run as --set run.save_every_epochs=1"]
    config = json.loads((out / "log.jsonl").read_text().splitlines()[0])["config"]
    assert (config["optim"]["weight_decay"], config["optim"]["warmup_steps"]) == (0.05, 1)
    assert config["model"]["precision"] == "fp32"  # an explicit --set of the same field wins
    assert config["run"]["tensorboard"] and any((out / "tensorboard").iterdir())
    # A checkpoint at each epoch end (2 steps an epoch), none configured in steps.
    assert config["run"]["save_every_steps"] == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]


def test_run_and_export_of_a_checkpoint_load_in_stock_open_clip_with_the_engines_features(run, tmp_path):
    out, stderr = run
    loaded = [line for line in stderr.splitlines() if "loaded weights" in line]
    assert loaded == [] and RANDOM_INIT_NOTICE in stderr  # trained from a random init: open_clip says so
    step = out / "checkpoints" / "step_00000002"
    export = run_cli("export", "--model", "tiny-vit", "--weights", step, "--out", tmp_path / "step2.safetensors",
                     cwd=tmp_path)
    assert RANDOM_INIT_NOTICE not in export.stderr
    loaded = [line for line in export.stderr.splitlines() if "loaded weights" in line]
    num_tensors = len(build_model("tiny-vit").model.state_dict())
    assert len(loaded) == 1 and loaded[0].endswith(f"loaded weights {step} into tiny-vit: {num_tensors} tensors, "
                                                   "0 missing, 0 unexpected"), export.stderr
    assert (out / "final" / "open_clip_config.json").is_file() and (tmp_path / "step2").is_dir()

    stock = stock_features(tmp_path, out / "final", tmp_path / "step2")
    for tag, weights in enumerate((out / "final.safetensors", tmp_path / "step2.safetensors")):
        image, text = engine_features(weights, stock[f"images{tag}"], stock[f"tokens{tag}"])
        assert torch.equal(stock[f"image{tag}"], image)
        assert torch.equal(stock[f"text{tag}"], text)
    # Two different models (steps 2 and 4): the comparison can tell them apart.
    assert not torch.allclose(stock["image0"], stock["image1"])
