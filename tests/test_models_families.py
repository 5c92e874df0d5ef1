"""The paper's model families as they ship: pretrained-tag preprocessing equal to open_clip's, OpenAI's
fp16 state dict with metadata keys and its TorchScript archive."""

import open_clip
import open_clip.factory
import pytest
import torch
from PIL import Image

from models import build_model, build_transforms, export_weights, read_checkpoint

# (architecture, tag) of every family the README lists.
FAMILY_TAGS = [("ViT-B-16-quickgelu", "openai"), ("ViT-B-32-quickgelu", "openai"), ("ViT-B-32", "laion2b_s34b_b79k"),
               ("ViT-B-16-SigLIP", "webli"), ("ViT-B-16-SigLIP2", "webli"), ("ViT-H-14-quickgelu", "dfn5b")]


def _image_batch(transform):
    images = [Image.new("RGB", (300, 180), (200, 30, 90)), Image.radial_gradient("L").convert("RGB").resize((150, 260))]
    return torch.stack([transform(image) for image in images])


@pytest.mark.parametrize(("name", "tag"), FAMILY_TAGS)
def test_tag_preprocessing_equals_open_clip_create_model_and_transforms(name, tag, monkeypatch):
    # open_clip would download the tag's weights first: offline, skip only that (weights are not compared).
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **kwargs: "")
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
