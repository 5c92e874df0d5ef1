"""The paper's model families as they ship: pretrained-tag preprocessing equal to open_clip's, OpenAI's
fp16 state dict with metadata keys and its TorchScript archive."""

import open_clip
import open_clip.factory
import pytest
import torch
from PIL import Image

from models import build_model, build_transforms, export_weights, read_checkpoint

# Tracing builds the test archives only (torch >= 2.9 also marks it deprecated).
pytestmark = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")]

# (architecture, tag) of every family docs/user-guide.md lists.
FAMILY_TAGS = [("ViT-B-16-quickgelu", "openai"), ("ViT-B-32-quickgelu", "openai"), ("ViT-B-32", "laion2b_s34b_b79k"),
               ("ViT-B-16-SigLIP", "webli"), ("ViT-B-16-SigLIP2", "webli"), ("ViT-H-14-quickgelu", "dfn5b")]


def _image_batch(transform):
    images = [Image.new("RGB", (300, 180), (200, 30, 90)), Image.radial_gradient("L").convert("RGB").resize((150, 260))]
    return torch.stack([transform(image) for image in images])


@pytest.mark.parametrize(("name", "tag"), FAMILY_TAGS)
def test_tag_preprocessing_equals_open_clip_create_model_and_transforms(name, tag, monkeypatch):
    # open_clip would download the tag's weights first: offline, skip only that (weights are not compared).
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **kwargs: "")
    with torch.device("meta"):  # parameters without storage: ViT-H-14 in a fraction of a second
        _, reference_train, reference_eval = open_clip.create_model_and_transforms(
            name, pretrained=tag, load_weights=False, device="meta")
    train, evaluation = build_transforms(name, pretrained_tag=tag)
    assert torch.equal(_image_batch(evaluation), _image_batch(reference_eval))
    assert repr(train) == repr(reference_train)


def _openai_layout_state_dict(model) -> dict:
    """State dict as OpenAI ships it: fp16, -0.0 values, the three metadata entries."""
    state = {key: value.detach().half().clone() for key, value in model.state_dict().items()}
    flat = state["visual.conv1.weight"].view(-1)
    flat[:8] = -0.0
    state["input_resolution"] = torch.tensor(32)
    state["context_length"] = torch.tensor(32)
    state["vocab_size"] = torch.tensor(49408)
    return state


def test_openai_state_dict_with_metadata_loads_as_open_clip_does(tmp_path):
    source = build_model("tiny-vit-quickgelu", seed=3).model
    path = tmp_path / "ViT-tiny.pt"
    torch.save(_openai_layout_state_dict(source), path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.layout == "openai-state-dict"
    assert "input_resolution" not in checkpoint.state_dict
    bundle = build_model("tiny-vit-quickgelu", weights=path)
    for key, value in source.state_dict().items():
        expected = value.half().float() if key != "visual.conv1.weight" else bundle.model.state_dict()[key]
        assert torch.equal(bundle.model.state_dict()[key], expected), key
    assert torch.signbit(bundle.model.visual.conv1.weight.view(-1)[:8]).all()  # -0.0 kept


def test_openai_layout_implies_quickgelu(tmp_path):
    path = tmp_path / "openai.pt"
    torch.save(_openai_layout_state_dict(build_model("tiny-vit-quickgelu", seed=0).model), path)
    with pytest.raises(ValueError, match=r"'openai' is for checkpoints trained with QuickGELU.*'tiny-vit-quickgelu'"):
        build_model("tiny-vit", weights=path)


class _Wrapped(torch.nn.Module):
    """Holds a CLIP's parameters under its own names (what a scripted OpenAI model looks like to state_dict)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_image(image)


def _torchscript_archive(model, path):
    traced = torch.jit.trace(model, (torch.zeros(1, 3, 32, 32), torch.zeros(1, 32, dtype=torch.long)),
                             check_trace=False, strict=False)
    traced.save(str(path))
    return path


def test_torchscript_archive_is_read_without_unpickling_and_exported(tmp_path):
    source = build_model("tiny-vit-quickgelu", seed=5).model.eval().half().float()
    archive = _torchscript_archive(source, tmp_path / "ViT-tiny.pt")
    checkpoint = read_checkpoint(archive)
    assert checkpoint.layout == "torchscript"
    bundle = build_model("tiny-vit-quickgelu", weights=archive)
    for key, value in source.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[key], value), key
    out = tmp_path / "converted.safetensors"
    export_weights(bundle.model, out)
    reloaded = open_clip.create_model("tiny-vit-quickgelu", pretrained=str(out))
    for key, value in source.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_run_py_convert_writes_safetensors_from_torchscript(tmp_path, capsys):
    from engine.cli import main

    source = build_model("tiny-vit-quickgelu", seed=6).model.eval()
    archive = _torchscript_archive(source, tmp_path / "ViT-tiny.pt")
    out = tmp_path / "ViT-tiny.safetensors"
    assert main(["convert", "--model", "tiny-vit-quickgelu", "--weights", str(archive), "--out", str(out)]) == 0
    reloaded = open_clip.create_model("tiny-vit-quickgelu", pretrained=str(out))
    for key, value in source.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert main(["convert", "--model", "tiny-vit", "--weights", str(archive), "--out", str(out)]) == 2
    assert "QuickGELU" in capsys.readouterr().err  # the OpenAI layout implies tag openai


def test_siglip_without_transformers_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"needs the `transformers` package: pip install -e '\.\[siglip\]'"):
        build_model("tiny-siglip")


def test_missing_tokenizer_and_hub_repo_are_one_line_errors_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match=r"tokenizer 'tuneclip-engine/tiny-siglip-tokenizer' .*model\.tokenizer"):
        build_model("tiny-siglip")
    with pytest.raises(FileNotFoundError, match=r"hf-hub:org/absent: open_clip_config\.json of org/absent is not in "
                                                r"the local Hugging Face cache .*empty-cache"):
        build_model("hf-hub:org/absent")
    with pytest.raises(FileNotFoundError, match=r"local-dir:.*open_clip_config\.json not found"):
        build_model(f"local-dir:{tmp_path}")


def test_siglip_tokenizer_from_local_folder_and_tag_preprocessing(tmp_path):
    from tests.helpers.families import save_tiny_tokenizer

    folder = save_tiny_tokenizer(tmp_path / "tokenizer")
    bundle = build_model("tiny-siglip", tokenizer=str(folder), pretrained_tag="webli", seed=0)
    tokens = bundle.tokenizer(["a red circle"])
    assert tokens.shape == (1, 16) and tokens[0, 0] > 2 and (tokens[0, 4:] == 0).all()  # words, eos, padding
    steps = {type(step).__name__: step for step in bundle.eval_transform.transforms}
    assert steps["Resize"].size == (160, 160) and tuple(steps["Normalize"].std) == (0.5, 0.5, 0.5)
    assert bundle.model.logit_bias is not None


def test_local_dir_name_reads_config_preprocessing_and_weights_as_open_clip(tmp_path):
    source = build_model("tiny-vit-quickgelu", seed=7)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    config = {"model_cfg": open_clip.get_model_config("tiny-vit-quickgelu"),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize_mode": "squash"}}
    (folder / "open_clip_config.json").write_text(__import__("json").dumps(config))
    export_weights(source.model, folder / "open_clip_model.safetensors")
    name = f"local-dir:{folder}"
    ours = build_model(name)
    model, _, reference_eval = open_clip.create_model_and_transforms(name)
    assert torch.equal(_image_batch(ours.eval_transform), _image_batch(reference_eval))
    for key, value in model.state_dict().items():
        assert torch.equal(ours.model.state_dict()[key], value), key
    assert ours.model_name == name


def test_model_section_validates_preprocessing_fields():
    from engine.config import load_config

    with pytest.raises(ValueError) as err:
        load_config(overrides=["model.mean=[0.5, 0.5]", "model.std=[0.5, 0, 0.5]", "model.resize_mode=crop",
                               "model.interpolation=nearest", "model.preset=openai", "model.pretrained_tag=webli"],
                    training=False)
    for field_name in ("model.mean", "model.std", "model.resize_mode", "model.interpolation", "model.preset"):
        assert field_name in str(err.value)
    cfg = load_config(overrides=["model.preset=dfn5b", "model.std=[0.5, 0.5, 0.5]"], training=False)
    assert cfg.model.build_kwargs()["pretrained_tag"] == "dfn5b"
    assert cfg.model.build_kwargs()["preprocess"] == {"std": [0.5, 0.5, 0.5]}
