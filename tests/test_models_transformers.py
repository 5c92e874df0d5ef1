"""Hugging Face transformers CLIPModel folders in and out: tiny random models saved with `save_pretrained`,
imported by the engine, exported back, and a transformers -> tune -> transformers round trip through the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from models import build_model, register_shipped_configs, transformers_clip

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def _features(output) -> torch.Tensor:
    """Projected features of get_image_features / get_text_features (a tensor, or an output object in v5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _save_tiny_clip(folder: Path, *, hidden_act: str = "quick_gelu", **overrides) -> transformers.CLIPModel:
    """A random tiny transformers CLIPModel (open_clip's vocabulary) with its image processor, saved in `folder`."""
    config = transformers.CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 49407,
                     "hidden_act": hidden_act},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 96,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_act": hidden_act},
        projection_dim=24, **overrides)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # make the norms and biases count (they start at 1 and 0)
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3],
                                    resample=3).save_pretrained(folder)
    return model


def _images() -> list[Image.Image]:
    return [Image.radial_gradient("L").convert("RGB").resize((50, 40)), Image.new("RGB", (30, 60), (200, 30, 90))]


TEXTS = ["a photo of a cat", "Hello, World! two dogs"]


def _assert_same_features(bundle, hf_model, pixels: torch.Tensor, hf_ids: torch.Tensor) -> None:
    with torch.no_grad():
        ours = (bundle.model.encode_image(pixels), bundle.model.encode_text(bundle.tokenizer(TEXTS)))
        theirs = (_features(hf_model.get_image_features(pixel_values=pixels)),
                  _features(hf_model.get_text_features(input_ids=hf_ids)))
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(F.normalize(mine, dim=-1), F.normalize(reference, dim=-1), atol=1e-5, rtol=1e-5)


def test_imported_folder_gives_transformers_features(tmp_path):
    hf_model = _save_tiny_clip(tmp_path / "hf")
    bundle = build_model(str(tmp_path / "hf"))
    processor = transformers.CLIPImageProcessor.from_pretrained(tmp_path / "hf")
    pixels = processor(images=_images(), return_tensors="pt")["pixel_values"]
    # The folder's preprocessing (mean, std, bicubic: PIL's and torchvision's bilinear differ by a grey level)
    # is the engine's eval transform.
    torch.testing.assert_close(torch.stack([bundle.eval_transform(image) for image in _images()]), pixels,
                               atol=1e-5, rtol=0)
    _assert_same_features(bundle, hf_model, pixels, bundle.tokenizer(TEXTS))


def test_folder_as_weights_of_a_named_architecture_must_match_it(tmp_path):
    _save_tiny_clip(tmp_path / "hf")
    with pytest.raises(ValueError, match="another architecture than 'tiny-vit'"):
        build_model("tiny-vit", weights=tmp_path / "hf")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"text_config": {"layer_norm_eps": 1e-6}}, "layer_norm_eps 1e-06"),
])
def test_architecture_that_does_not_map_is_one_error(tmp_path, overrides, message):
    _save_tiny_clip(tmp_path / "hf", **({"hidden_act": overrides["hidden_act"]} if "hidden_act" in overrides else {}))
    if "text_config" in overrides:
        config = json.loads((tmp_path / "hf" / "config.json").read_text())
        config["text_config"].update(overrides["text_config"])
        (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"does not map onto open_clip: .*{message}"):
        build_model(str(tmp_path / "hf"))


def test_siglip_folder_is_refused_with_one_line(tmp_path):
    (tmp_path / "siglip").mkdir()
    (tmp_path / "siglip" / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(ValueError, match="SiglipModel does not map onto open_clip"):
        build_model(str(tmp_path / "siglip"))


# transformers' OpenAI CLIP configs (CLIPConfig's defaults are ViT-B/32's) and open_clip's architectures.
OPENAI_CONFIGS = [
    ("ViT-B-32-quickgelu", {}, {}, {}),
    ("ViT-B-16-quickgelu", {}, {"patch_size": 16}, {}),
    ("ViT-L-14-quickgelu", {"projection_dim": 768},
     {"patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
      "num_attention_heads": 16},
     {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12}),
]


@pytest.mark.parametrize(("name", "top", "vision", "text"), OPENAI_CONFIGS)
def test_openai_transformers_configs_are_open_clip_quickgelu_architectures(tmp_path, name, top, vision, text):
    transformers.CLIPConfig(vision_config=vision, text_config={"eos_token_id": 2, **text},
                            **top).save_pretrained(tmp_path)
    assert (transformers_clip.transformers_config(transformers_clip.open_clip_config(tmp_path), arch="folder")
            == transformers_clip.transformers_config(open_clip.get_model_config(name), arch=name))


def test_folder_loads_into_a_meta_built_model_as_sharding_backends_do(tmp_path):
    from models.meta import build_model_on_meta, read_matching_state_dict

    _save_tiny_clip(tmp_path / "hf")
    skeleton = build_model_on_meta(str(tmp_path / "hf"))
    state = read_matching_state_dict(skeleton.model, tmp_path / "hf")
    for key, value in build_model(str(tmp_path / "hf")).model.state_dict().items():
        assert torch.equal(state[key].reshape(value.shape), value), key


def test_export_loads_in_transformers_with_the_engine_features(tmp_path):
    bundle = build_model("tiny-vit", seed=1, preprocess={"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)})
    assert transformers_clip.export(bundle, bundle.model.state_dict(), tmp_path / "out",
                                    preprocessing=bundle.preprocessing) == []
    hf_model = transformers.CLIPModel.from_pretrained(tmp_path / "out").eval()
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "out")
    pixels = processor(images=_images(), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(torch.stack([bundle.eval_transform(image) for image in _images()]), pixels,
                               atol=1e-5, rtol=0)
    hf_ids = processor.tokenizer(TEXTS, padding="max_length", max_length=32, return_tensors="pt")["input_ids"]
    ours = bundle.tokenizer(TEXTS)
    assert torch.equal(hf_ids[ours != 0], ours[ours != 0])  # same BPE; transformers pads with end-of-text
    _assert_same_features(bundle, hf_model, pixels, hf_ids)


@pytest.mark.parametrize("name", ["tiny-siglip", "RN50"])
def test_export_refuses_an_architecture_without_a_transformers_counterpart(name):
    register_shipped_configs()
    with pytest.raises(ValueError, match=f"'{name}' has no transformers CLIPModel counterpart"):
        transformers_clip.transformers_config(open_clip.get_model_config(name), arch=name)


def _run_cli(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "run.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_round_trip_transformers_tune_transformers_through_the_cli(tmp_path, shards):
    from tests.helpers.jobs import job

    _save_tiny_clip(tmp_path / "hf")
    config = job(shards, tmp_path / "run", model={"name": str(tmp_path / "hf")}, run={"save_every_epochs": 1})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    _run_cli("tune", "--config", tmp_path / "job.yaml")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log if r["event"] == "step"} == {"osr", "finetune"}
    _run_cli("export", "--model", tmp_path / "hf", "--weights", tmp_path / "run" / "final.safetensors",
             "--format", "transformers", "--out", tmp_path / "out")
    # From the run's last checkpoint folder too: the same weights.
    _run_cli("export", "--model", tmp_path / "hf", "--weights", tmp_path / "run" / "checkpoints" / "latest",
             "--format", "transformers", "--out", tmp_path / "from-checkpoint")
    hf_model = transformers.CLIPModel.from_pretrained(tmp_path / "out").eval()
    from_checkpoint = transformers.CLIPModel.from_pretrained(tmp_path / "from-checkpoint")
    for key, value in from_checkpoint.state_dict().items():
        assert torch.equal(value, hf_model.state_dict()[key]), key
    tuned = build_model(str(tmp_path / "hf"), weights=tmp_path / "run" / "final.safetensors")
    base = build_model(str(tmp_path / "hf"))
    assert not torch.equal(tuned.model.visual.proj, base.model.visual.proj)  # fine-tuning moved the weights
    pixels = torch.stack([tuned.eval_transform(image) for image in _images()])
    _assert_same_features(tuned, hf_model, pixels, tuned.tokenizer(TEXTS))
