"""Each model family, saved the way it ships: OSR + fine-tuning + export (through `run.py` for the
offline hub cache), and the export loads in stock open_clip under the family's own name with the same
features."""

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.config import load_config
from engine.trainer import Trainer
from models import build_model, export_weights, register_shipped_configs
from tests.helpers.families import SIGLIP_TOKENIZER_REPO, put_in_hub_cache, save_tiny_tokenizer
from tests.helpers.jobs import job

ROOT = Path(__file__).resolve().parents[1]
SHORT_RUN = ["--osr-epochs", "1", "--epochs", "1", "--batch-size", "8", "--set", "run.max_steps_per_epoch=2",
             "--set", "run.progress=false", "--set", "eval.at_start=false", "--lr", "1e-3"]
CAPTIONS = ["a red circle", "a blue square on a green background"]


def run_cli(*args, env=None):
    proc = subprocess.run([sys.executable, "run.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=600, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def _features(model, transform, tokenizer):
    model.eval()
    images = torch.stack([transform(Image.new("RGB", (300, 180), (200, 30, 90))),
                          transform(Image.radial_gradient("L").convert("RGB"))])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokenizer(CAPTIONS))


def _assert_same_features(left, right):
    for a, b in zip(left, right):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _osr_steps(out: Path) -> int:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return sum(1 for r in records if r.get("stage") == "osr" and "loss" in r)


def _tune(shards, out, **sections):
    """OSR + fine-tuning + export in this process (the CLI path is covered by the hub-cache test)."""
    config = job(shards, out, **sections)
    config["run"].update(max_steps_per_epoch=2)
    trainer = Trainer(load_config(base=config))
    try:
        trainer.tune()
    finally:
        trainer.close()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
@pytest.mark.parametrize("layout", ["state-dict", "torchscript"])
def test_openai_fp16_checkpoint_tunes_and_exports(shards, tmp_path, layout):
    register_shipped_configs()
    base = build_model("tiny-vit-quickgelu", seed=1).model.eval()
    with torch.no_grad():
        for param in base.parameters():
            param.copy_(param.half().float())  # fp16 values, as OpenAI ships them
        base.visual.conv1.weight.view(-1)[:8] = -0.0  # fp16 OpenAI checkpoints hold signed zeros
    weights = tmp_path / "ViT-tiny-openai.pt"
    if layout == "torchscript":
        torch.jit.trace(base, (torch.zeros(1, 3, 32, 32), torch.zeros(1, 32, dtype=torch.long)),
                        check_trace=False, strict=False).save(str(weights))
    else:
        state = {key: value.detach().half().clone() for key, value in base.state_dict().items()}
        state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(32),
                     vocab_size=torch.tensor(49408))
        torch.save(state, weights)
    out = tmp_path / "run"
    _tune(shards, out, model={"name": "tiny-vit-quickgelu", "weights": str(weights)})
    final = out / "final.safetensors"
    assert _osr_steps(out) > 0
    assert not torch.equal(load_file(final)["visual.conv1.weight"], base.state_dict()["visual.conv1.weight"].half().float())
    model, _, reference_eval = open_clip.create_model_and_transforms("tiny-vit-quickgelu", pretrained=str(final))
    ours = build_model("tiny-vit-quickgelu", weights=final, pretrained_tag="openai")
    assert repr(ours.eval_transform) == repr(reference_eval)
    tokenizer = open_clip.get_tokenizer("tiny-vit-quickgelu")
    _assert_same_features(_features(model, reference_eval, tokenizer),
                          _features(ours.model, ours.eval_transform, ours.tokenizer))


@pytest.fixture
def siglip_repo(tmp_path):
    """An open_clip SigLIP repository folder as `push_to_hf_hub` lays it out (open_clip_config.json with
    webli preprocessing, weights, tokenizer files), and the random base model in it."""
    register_shipped_configs()
    repo = save_tiny_tokenizer(tmp_path / "repo")
    model_cfg = open_clip.get_model_config("tiny-siglip")
    webli = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")
    preprocess_cfg = {key: webli[key] for key in ("mean", "std", "interpolation", "resize_mode")}
    (repo / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = open_clip.create_model("tiny-siglip")
    export_weights(model, repo / "open_clip_model.safetensors")
    return repo, model


def _check_siglip_export(out: Path, base, *, method: str):
    exported = load_file(out / "final.safetensors")
    assert torch.equal(exported["logit_scale"], base.logit_scale.detach())  # temperature fixed for every method
    bias_moved = not torch.equal(exported["logit_bias"], base.logit_bias.detach())
    assert bias_moved == (method == "siglip")  # learned by SigLIP's loss only
    # Stock open_clip loads the folder under its local-dir: name, tokenizer and preprocessing included.
    folder = f"local-dir:{out / 'final'}"
    model, _, reference_eval = open_clip.create_model_and_transforms(folder)
    tokenizer = open_clip.get_tokenizer(folder)
    steps = {type(step).__name__: step for step in reference_eval.transforms}
    assert steps["Resize"].size == (160, 160) and "CenterCrop" not in steps  # webli: squash
    assert tuple(steps["Normalize"].mean) == (0.5, 0.5, 0.5)
    ours = build_model(folder)
    _assert_same_features(_features(model, reference_eval, tokenizer),
                          _features(ours.model, ours.eval_transform, ours.tokenizer))


@pytest.mark.slow
def test_siglip_from_offline_hub_cache_with_siglip_method_via_run_py(shards, tmp_path, siglip_repo):
    repo, base = siglip_repo
    cache = tmp_path / "hf-cache"
    put_in_hub_cache(cache, SIGLIP_TOKENIZER_REPO, save_tiny_tokenizer(tmp_path / "tokenizer"))
    put_in_hub_cache(cache, "tuneclip-engine/tiny-siglip", repo)
    out = tmp_path / "run"
    run_cli("tune", "--train", shards, "--model", "hf-hub:tuneclip-engine/tiny-siglip", "--method", "siglip",
            "--out", out, *SHORT_RUN, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert _osr_steps(out) == 0
    _check_siglip_export(out, base, method="siglip")


@pytest.mark.slow
def test_tuneclip_on_siglip_local_dir_runs_osr_and_hgcl_with_bias_frozen(shards, tmp_path, siglip_repo):
    repo, base = siglip_repo
    out = tmp_path / "run"
    _tune(shards, out, model={"name": f"local-dir:{repo}"})
    assert _osr_steps(out) > 0
    _check_siglip_export(out, base, method="tuneclip")


@pytest.mark.slow
def test_laion_bin_file_with_tag_tunes_and_exports(shards, tmp_path):
    register_shipped_configs()
    base = build_model("tiny-vit", seed=3).model
    weights = tmp_path / "open_clip_pytorch_model.bin"  # as LAION's hub repositories ship it
    torch.save(base.state_dict(), weights)
    out = tmp_path / "run"
    _tune(shards, out, model={"name": "tiny-vit", "weights": str(weights), "pretrained_tag": "laion2b_s34b_b79k"})
    assert _osr_steps(out) > 0
    model, _, reference_eval = open_clip.create_model_and_transforms("tiny-vit", pretrained=str(out / "final.safetensors"))
    ours = build_model("tiny-vit", weights=out / "final.safetensors", pretrained_tag="laion2b_s34b_b79k")
    assert repr(ours.eval_transform) == repr(reference_eval)  # laion2b: OpenAI mean/std, shortest side + crop
    _assert_same_features(_features(model, reference_eval, open_clip.get_tokenizer("tiny-vit")),
                          _features(ours.model, ours.eval_transform, ours.tokenizer))


@pytest.mark.slow
def test_dfn5b_hub_folder_tunes_and_exports_as_local_dir(shards, tmp_path):
    register_shipped_configs()
    base = build_model("tiny-vit-quickgelu", seed=4).model
    repo = tmp_path / "DFN5B-tiny"  # as apple/DFN5B-CLIP-ViT-H-14 ships: open_clip config + .bin weights
    repo.mkdir()
    dfn = open_clip.get_pretrained_cfg("ViT-H-14-quickgelu", "dfn5b")
    (repo / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": open_clip.get_model_config("tiny-vit-quickgelu"),
        "preprocess_cfg": {key: dfn[key] for key in ("mean", "std", "interpolation", "resize_mode")}}))
    torch.save(base.state_dict(), repo / "open_clip_pytorch_model.bin")
    out = tmp_path / "run"
    _tune(shards, out, model={"name": f"local-dir:{repo}"})
    assert _osr_steps(out) > 0
    folder = f"local-dir:{out / 'final'}"
    model, _, reference_eval = open_clip.create_model_and_transforms(folder)
    steps = {type(step).__name__: step for step in reference_eval.transforms}
    assert steps["Resize"].size == (32, 32) and "CenterCrop" not in steps  # dfn5b: squash
    ours = build_model(folder)
    _assert_same_features(_features(model, reference_eval, open_clip.get_tokenizer(folder)),
                          _features(ours.model, ours.eval_transform, ours.tokenizer))
    assert not torch.equal(ours.model.visual.conv1.weight, base.visual.conv1.weight)  # it was fine-tuned
