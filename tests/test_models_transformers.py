"""Hugging Face transformers CLIPModel and SiglipModel folders in and out: tiny random models saved with
`save_pretrained`, imported by the engine, exported back, and a transformers -> tune -> transformers round trip
through the CLI."""

import importlib.util
import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from models import build_model, register_shipped_configs, transformers_clip, transformers_siglip

transformers = pytest.importorskip("transformers")


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


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_round_trip_transformers_tune_transformers_through_the_cli(tmp_path, shards, family, capsys):
    """transformers folder -> `run.py tune` (OSR + fine-tuning) -> `run.py export --format transformers`, from the
    final weights and from the last checkpoint folder: transformers loads both, the same weights, and gives the
    tuned engine model's features. The CLI's own `main`, in this process (as `python run.py` calls it)."""
    from engine.cli import main
    from tests.helpers.jobs import job

    hf_class = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    (_save_tiny_clip if family == "clip" else _save_tiny_siglip)(tmp_path / "hf")
    config = job(shards, tmp_path / "run", model={"name": str(tmp_path / "hf")},
                 run={"save_every_epochs": 1, "max_steps_per_epoch": 3})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    assert main(["tune", "--config", str(tmp_path / "job.yaml")]) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log if r["event"] == "step"} == {"osr", "finetune"}
    for weights, out in (("final.safetensors", "out"), ("checkpoints/latest", "from-checkpoint")):
        assert main(["export", "--model", str(tmp_path / "hf"), "--weights", str(tmp_path / "run" / weights),
                     "--format", "transformers", "--out", str(tmp_path / out)]) == 0
    capsys.readouterr()
    hf_model = hf_class.from_pretrained(tmp_path / "out").eval()
    from_checkpoint = hf_class.from_pretrained(tmp_path / "from-checkpoint")
    for key, value in from_checkpoint.state_dict().items():
        assert torch.equal(value, hf_model.state_dict()[key]), key
    tuned = build_model(str(tmp_path / "hf"), weights=tmp_path / "run" / "final.safetensors")
    base = build_model(str(tmp_path / "hf"))
    moved = [name for name, value in base.model.state_dict().items()
             if not torch.equal(value, tuned.model.state_dict()[name])]
    assert len(moved) > len(base.model.state_dict()) // 2  # fine-tuning moved the weights
    if family == "clip":
        pixels = torch.stack([tuned.eval_transform(image) for image in _images()])
        _assert_same_features(tuned, hf_model, pixels, tuned.tokenizer(TEXTS))
    else:
        pixels = _siglip_pixels(tmp_path / "out")
        _assert_same_siglip_outputs(tuned, hf_model, pixels, tuned.tokenizer(SIGLIP_TEXTS))


# SigLIP: a timm ViT trunk pooled by its attention head, open_clip's text tower pooled at the last token.
SIGLIP_TEXTS = ["a red circle", "a blue square on grey"]  # words of the tiny tokenizer, no punctuation


def _save_tiny_siglip(folder: Path, *, vision: dict | None = None, text: dict | None = None,
                      **overrides) -> transformers.SiglipModel:
    """A random tiny transformers SiglipModel with the tests' tiny word-level tokenizer and a SiglipImageProcessor
    (mean / std 0.5, bicubic squash), saved in `folder`."""
    from tests.helpers.families import save_tiny_tokenizer

    config = transformers.SiglipConfig(
        text_config={"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "pad_token_id": 0, "eos_token_id": 1,
                     "bos_token_id": None, **(text or {})},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 96,
                       "num_hidden_layers": 2, "num_attention_heads": 4, **(vision or {})}, **overrides)
    torch.manual_seed(0)
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():  # make the norms, biases and the logit bias count (they start at 1 and 0)
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    save_tiny_tokenizer(folder)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                      resample=3).save_pretrained(folder)
    return model


def _siglip_pixels(folder: Path) -> torch.Tensor:
    """transformers' SigLIP preprocessing of the test images, PIL backend (its torchvision backend resizes the
    tensor and lands a grey level away from PIL's, which open_clip's transform uses)."""
    return transformers.SiglipImageProcessorPil.from_pretrained(folder)(images=_images(),
                                                                       return_tensors="pt")["pixel_values"]


def _assert_same_siglip_outputs(bundle, hf_model, pixels: torch.Tensor, ids: torch.Tensor) -> None:
    """Image / text features and the logits with scale and bias of the engine's model and transformers'."""
    from models.factory import features_of, logit_bias_of

    with torch.no_grad():
        output = bundle.model(pixels, ids)
        theirs = hf_model(pixel_values=pixels, input_ids=ids)
    image, text = features_of(output)
    torch.testing.assert_close(image, F.normalize(theirs.image_embeds, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text, F.normalize(theirs.text_embeds, dim=-1), atol=1e-5, rtol=1e-5)
    logits = text @ image.t() * output[2] + logit_bias_of(output)
    torch.testing.assert_close(logits, theirs.logits_per_text, atol=1e-5, rtol=1e-5)
    assert abs(logit_bias_of(output).item() - hf_model.logit_bias.item()) < 1e-7


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])  # SigLIP's own, and the exact GELU
def test_imported_siglip_folder_gives_transformers_features_and_logits(tmp_path, act):
    hf_model = _save_tiny_siglip(tmp_path / "hf", vision={"hidden_act": act}, text={"hidden_act": act})
    bundle = build_model(str(tmp_path / "hf"))
    pixels = _siglip_pixels(tmp_path / "hf")
    torch.testing.assert_close(torch.stack([bundle.eval_transform(image) for image in _images()]), pixels,
                               atol=1e-6, rtol=0)
    ids = bundle.tokenizer(SIGLIP_TEXTS)
    hf_ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(
        SIGLIP_TEXTS, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, hf_ids) and (ids == 1).sum() == 2  # one end-of-text each, padded with 0
    _assert_same_siglip_outputs(bundle, hf_model, pixels, ids)


@pytest.mark.parametrize(("vision", "text", "message"), [
    ({"vision_use_head": False}, {}, "vision_use_head false"),
    ({"hidden_act": "relu"}, {"projection_size": 16}, "vision hidden_act 'relu'.*projection_size 16"),
])
def test_siglip_architecture_that_does_not_map_is_one_error(tmp_path, vision, text, message):
    _save_tiny_siglip(tmp_path / "hf", vision=vision, text=text)
    with pytest.raises(ValueError, match=f"SiglipModel does not map onto open_clip: .*{message}"):
        build_model(str(tmp_path / "hf"))


def test_siglip_folder_without_a_readable_tokenizer_is_one_error(tmp_path):
    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed: spiece.model is readable")
    _save_tiny_siglip(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").unlink()
    (tmp_path / "hf" / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="spiece.model .* needs the `sentencepiece` package"):
        build_model(str(tmp_path / "hf"))


def test_siglip_folder_meta_build_and_weights_of_another_architecture(tmp_path):
    from models.meta import build_model_on_meta, read_matching_state_dict

    _save_tiny_siglip(tmp_path / "hf")
    skeleton = build_model_on_meta(str(tmp_path / "hf"))
    state = read_matching_state_dict(skeleton.model, tmp_path / "hf")
    for key, value in build_model(str(tmp_path / "hf")).model.state_dict().items():
        assert torch.equal(state[key].reshape(value.shape), value), key
    with pytest.raises(ValueError, match="SiglipModel of another architecture than 'tiny-siglip'"):
        build_model("tiny-siglip", weights=tmp_path / "hf")


def test_siglip_export_of_a_tuned_model_loads_in_transformers_with_the_engine_features(tmp_path, capsys):
    """The engine's export (the CLI's, in this process) of an imported SigLIP folder whose weights moved, as
    fine-tuning moves them: transformers' SiglipModel and SiglipProcessor give the engine's ids, pixels, features
    and logits."""
    from safetensors.torch import save_file

    from engine.cli import main

    _save_tiny_siglip(tmp_path / "hf")
    torch.manual_seed(1)
    tuned = {key: value + 0.05 * torch.randn_like(value)
             for key, value in build_model(str(tmp_path / "hf")).model.state_dict().items()}
    save_file(tuned, tmp_path / "tuned.safetensors")
    assert main(["export", "--model", str(tmp_path / "hf"), "--weights", str(tmp_path / "tuned.safetensors"),
                 "--format", "transformers", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "(transformers SiglipModel)" in printed and "not written" not in printed  # tokenizer files too
    bundle = build_model(str(tmp_path / "hf"), weights=tmp_path / "tuned.safetensors")
    hf_model = transformers.SiglipModel.from_pretrained(tmp_path / "out").eval()
    processor = transformers.SiglipProcessor.from_pretrained(tmp_path / "out")
    hf_ids = processor.tokenizer(SIGLIP_TEXTS, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    assert torch.equal(hf_ids, bundle.tokenizer(SIGLIP_TEXTS))
    pixels = _siglip_pixels(tmp_path / "out")
    torch.testing.assert_close(torch.stack([bundle.eval_transform(image) for image in _images()]), pixels,
                               atol=1e-6, rtol=0)
    _assert_same_siglip_outputs(bundle, hf_model, pixels, hf_ids)


def test_siglip_export_of_open_clips_own_architecture_and_refusal(tmp_path):
    """open_clip's ViT-B-16-SigLIP (a stock timm trunk, exact GELU) has a SiglipConfig; tiny-siglip (register token,
    layer scale) has none, in one line."""
    register_shipped_configs()
    with torch.device("meta"):  # shapes only (and no time spent on initial values)
        stock_model, tiny_model = (open_clip.create_model(name, device="meta") for name in ("ViT-B-16-SigLIP",
                                                                                            "tiny-siglip"))
    stock = transformers_siglip.transformers_config(stock_model, arch="ViT-B-16-SigLIP")
    assert stock["vision_config"] == {"image_size": 224, "patch_size": 16, "hidden_size": 768, "num_hidden_layers": 12,
                                      "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
                                      "layer_norm_eps": 1e-6}
    assert stock["text_config"]["hidden_act"] == "gelu" and stock["text_config"]["max_position_embeddings"] == 64
    with pytest.raises(ValueError, match=r"'tiny-siglip' has no transformers SiglipModel counterpart \(.*reg_token"):
        transformers_siglip.transformers_config(tiny_model, arch="tiny-siglip")


def test_siglip_trunk_name_builds_in_a_process_that_never_saw_the_folder(tmp_path):
    """A config naming a trunk of this engine (a `local-dir:` folder exported from an imported SigLIP folder does)
    builds where the folder was never read: the name alone registers the trunk, its shape and activation."""
    name = transformers_siglip.siglip_trunk_name(image_size=16, patch_size=8, width=16, depth=1, heads=2, mlp=40,
                                                 act="gelu")
    config = {"embed_dim": 16, "custom_text": True, "init_logit_bias": -10,
              "vision_cfg": {"image_size": 16, "timm_model_name": name, "timm_model_pretrained": False,
                             "timm_pool": "map", "timm_proj": "none"},
              "text_cfg": {"context_length": 8, "width": 16, "heads": 2, "layers": 1, "no_causal_mask": True,
                           "proj_bias": True, "pool_type": "last"}}
    (tmp_path / "trunk-by-name.json").write_text(json.dumps(config))
    trunk = build_model(str(tmp_path / "trunk-by-name.json")).model.visual.trunk
    assert (trunk.patch_embed.proj.kernel_size, len(trunk.blocks), trunk.blocks[0].mlp.fc1.out_features,
            trunk.pos_embed.shape[1], type(trunk.blocks[0].mlp.act).__name__) == ((8, 8), 1, 40, 4, "GELU")
    assert int(1152 * transformers_siglip._mlp_ratio(4304, 1152)) == 4304  # so400m's MLP, as timm rounds it


def test_sparse_siglip_config_reads_transformers_defaults(tmp_path):
    """A hub config.json names only some fields (google/siglip-base-patch16-224's names no activation, eps or
    context length): the missing ones are transformers' defaults, as SiglipConfig reads them."""
    (tmp_path / "sparse").mkdir()
    (tmp_path / "sparse" / "config.json").write_text(json.dumps({
        "model_type": "siglip", "architectures": ["SiglipModel"],
        "text_config": {"model_type": "siglip_text_model", "hidden_size": 768, "num_hidden_layers": 12},
        "vision_config": {"model_type": "siglip_vision_model", "image_size": 224, "patch_size": 16}}))
    transformers.SiglipConfig().save_pretrained(tmp_path / "full")
    sparse, full = (transformers_clip.open_clip_config(tmp_path / name) for name in ("sparse", "full"))
    assert transformers_siglip.same_architecture(sparse, full)
    assert sparse["vision_cfg"]["timm_model_name"] == "tuneclip_siglip_vit_i224_p16_w768_d12_h12_m3072_gelu_tanh"
    assert sparse["text_cfg"]["context_length"] == 64 and sparse["text_cfg"]["act_kwargs"] == {"approximate": "tanh"}
