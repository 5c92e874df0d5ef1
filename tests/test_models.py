"""models/: tiny CLIP build, weight round trips in stock open_clip format, safe loading, pretrained tags."""

import json
import math
import os
import pathlib

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize

import models
import models.weights
from models import (
    CONFIG_DIR,
    build_model,
    build_transforms,
    export_weights,
    load_weights,
    make_logit_scale_1d,
    register_shipped_configs,
    temperature,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # written out: CLIP's published normalisation
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class CodeOnUnpickle:
    """Pickles to a call that creates a marker file: loading it must never run that call."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _images():
    return [Image.new("RGB", (48, 40), (200, 30, 90)), Image.new("RGB", (40, 56), (10, 160, 240))]


def _features(bundle):
    bundle.model.eval()
    images = torch.stack([bundle.eval_transform(image) for image in _images()])
    texts = bundle.tokenizer(["a red square", "a photo of the sky"])
    with torch.no_grad():
        return bundle.model.encode_image(images), bundle.model.encode_text(texts)


def _assert_same_state(left: dict, right: dict):
    assert left.keys() == right.keys()
    for key, value in left.items():
        assert value.dtype == right[key].dtype, key
        assert torch.equal(value, right[key]), key


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny-vit", seed=0)


@pytest.fixture
def tiny_weights(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    export_weights(tiny.model, path)
    return path


def test_shipped_configs_register_idempotently():
    names = register_shipped_configs()
    assert register_shipped_configs() == names
    assert {"tiny-vit", "tiny-vit-quickgelu"} <= set(names) <= set(open_clip.list_models())
    config = json.loads((CONFIG_DIR / "tiny-vit.json").read_text())
    assert open_clip.get_model_config("tiny-vit") == config
    expected_vision = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
    assert config["vision_cfg"] == expected_vision
    assert open_clip.get_model_config("tiny-vit-quickgelu")["quick_gelu"] is True


def test_tiny_model_forward(tiny):
    assert tiny.model_name == "tiny-vit"
    pixels = tiny.eval_transform(_images()[0])
    assert pixels.shape == (3, 32, 32)
    expected = (torch.tensor([200, 30, 90]) / 255 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    torch.testing.assert_close(pixels[:, 16, 16], expected.float(), atol=1e-5, rtol=0)

    tokens = tiny.tokenizer(["a red square", "a photo of the sky"])
    assert tokens.shape == (2, 32) and tokens.dtype == torch.long
    assert tokens[0, 0] == tiny.tokenizer.sot_token_id

    image_features, text_features = _features(tiny)
    assert image_features.shape == text_features.shape == (2, 64)
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()
    assert not torch.allclose(image_features[0], image_features[1])
    assert not torch.allclose(text_features[0], text_features[1])
    assert math.isclose(temperature(tiny.model), 0.07, rel_tol=1e-6)  # open_clip's initial tau


def test_seed_fixes_init_without_touching_global_rng():
    rng_before = torch.random.get_rng_state()
    first = build_model("tiny-vit", seed=3).model.state_dict()
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    _assert_same_state(first, build_model("tiny-vit", seed=3).model.state_dict())
    other = build_model("tiny-vit", seed=4).model.state_dict()
    assert not torch.equal(first["visual.conv1.weight"], other["visual.conv1.weight"])


def test_quickgelu_config_uses_quickgelu():
    def activation(name):
        return build_model(name, seed=0).model.visual.transformer.resblocks[0].mlp.gelu

    assert type(activation("tiny-vit-quickgelu")).__name__ == "QuickGELU"
    assert type(activation("tiny-vit")) is torch.nn.GELU


def test_export_loads_unchanged_in_stock_open_clip(tmp_path):
    bundle = build_model("tiny-vit", seed=1)
    make_logit_scale_1d(bundle.model)
    with torch.no_grad():
        bundle.model.logit_scale.fill_(2.5)  # a value that differs from the init
    path = tmp_path / "export" / "tiny.safetensors"
    export_weights(bundle.model, path)
    assert sorted(os.listdir(path.parent)) == ["tiny.safetensors"]  # no temp file left behind

    stock, _, stock_eval = open_clip.create_model_and_transforms("tiny-vit", pretrained=str(path))
    ours = bundle.model.state_dict()
    ours["logit_scale"] = ours["logit_scale"].reshape(())
    _assert_same_state(stock.state_dict(), ours)
    assert stock.logit_scale.ndim == 0 and stock.logit_scale.item() == 2.5

    stock_bundle = models.ClipBundle(stock, None, stock_eval, open_clip.get_tokenizer("tiny-vit"), "tiny-vit")
    for stock_features, our_features in zip(_features(stock_bundle), _features(bundle)):
        assert torch.equal(stock_features, our_features)


def test_export_is_atomic(tiny, tmp_path, monkeypatch):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"previous export")

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(models.weights, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_weights(tiny.model, path)
    assert path.read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["tiny.safetensors"]
    monkeypatch.undo()

    export_weights(tiny.model, path)
    _assert_same_state(load_file(path), tiny.model.state_dict())
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_weights(tiny.model, tmp_path / "tiny.pt")


def test_round_trip_safetensors(tiny, tiny_weights):
    loaded = build_model("tiny-vit", weights=tiny_weights, seed=7)
    _assert_same_state(loaded.model.state_dict(), tiny.model.state_dict())


@pytest.mark.parametrize("layout", ["state_dict_module_prefix", "raw"])
def test_round_trip_pickled_checkpoint(tiny, tmp_path, layout):
    state = tiny.model.state_dict()
    if layout == "raw":
        checkpoint, path = state, tmp_path / "tiny.pt"
    else:  # as open_clip's trainer saves it under DDP
        prefixed = {f"module.{key}": value for key, value in state.items()}
        checkpoint, path = {"epoch": 3, "name": "run", "state_dict": prefixed}, tmp_path / "epoch_3.bin"
    torch.save(checkpoint, path)
    loaded = build_model("tiny-vit", weights=path, seed=7)
    _assert_same_state(loaded.model.state_dict(), state)


def test_pickled_object_is_refused_without_running_it(tiny, tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.bin"
    torch.save({"state_dict": tiny.model.state_dict(), "payload": CodeOnUnpickle(marker)}, path)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.bin"):
        build_model("tiny-vit", weights=path)
    with pytest.raises(ValueError, match="refusing"):
        load_weights(tiny.model, path)
    assert not marker.exists()


def test_mismatched_weights_name_file_and_keys(tiny_weights, tmp_path):
    config = json.loads((CONFIG_DIR / "tiny-vit.json").read_text())
    config["vision_cfg"]["width"] = 32
    narrow = tmp_path / "tiny-vit-narrow-test.json"
    narrow.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape mismatches") as info:
        build_model(str(narrow), weights=tiny_weights)
    message = str(info.value)
    assert str(tiny_weights) in message and "visual.conv1.weight" in message
    assert "tiny-vit-narrow-test" in message

    state = load_file(tiny_weights)
    del state["text_projection"]
    state["extra.weight"] = torch.zeros(2)
    partial = tmp_path / "partial.safetensors"
    save_file(state, partial)
    expected = r"1 missing keys \(e\.g\. text_projection\).*1 unexpected keys \(e\.g\. extra\.weight\)"
    with pytest.raises(ValueError, match=expected) as info:
        build_model("tiny-vit", weights=partial)
    assert str(partial) in str(info.value)


def test_load_weights_accepts_both_logit_scale_shapes(tiny, tmp_path):
    scalar_path = tmp_path / "scalar.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, scalar_path)
    vector_state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    vector_state["logit_scale"] = vector_state["logit_scale"].reshape(1) + 1.0
    vector_path = tmp_path / "vector.safetensors"
    save_file(vector_state, vector_path)

    model_1d = build_model("tiny-vit", seed=5).model
    make_logit_scale_1d(model_1d)
    load_weights(model_1d, scalar_path)
    assert model_1d.logit_scale.shape == (1,)
    assert model_1d.logit_scale.item() == tiny.model.logit_scale.item()

    stock = build_model("tiny-vit", seed=5).model
    load_weights(stock, vector_path)
    assert stock.logit_scale.ndim == 0
    assert stock.logit_scale.item() == tiny.model.logit_scale.item() + 1.0


def test_make_logit_scale_1d_keeps_value_and_export_is_0dim(tmp_path):
    model = build_model("tiny-vit", seed=2).model
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    model.logit_scale.requires_grad_(False)
    make_logit_scale_1d(model)
    make_logit_scale_1d(model)  # idempotent
    assert isinstance(model.logit_scale, torch.nn.Parameter)
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == 3.0
    assert model.logit_scale.requires_grad is False
    assert dict(model.named_parameters())["logit_scale"] is model.logit_scale
    assert math.isclose(temperature(model), 1 / math.exp(3.0), rel_tol=1e-6)

    path = tmp_path / "tiny.safetensors"
    export_weights(model, path)
    exported = load_file(path)["logit_scale"]
    assert exported.shape == () and exported.item() == 3.0
    with pytest.raises(TypeError, match="logit_scale"):
        make_logit_scale_1d(torch.nn.Linear(2, 2))


def _eval_steps(transform):
    return {type(step): step for step in transform.transforms}


def test_tag_dfn5b_squashes_with_openai_stats():
    bundle = build_model("tiny-vit-quickgelu", pretrained_tag="dfn5b", seed=0)
    steps = _eval_steps(bundle.eval_transform)
    assert steps[Resize].size == (32, 32)  # squash: both sides resized, aspect ratio dropped
    assert steps[Resize].interpolation == InterpolationMode.BICUBIC
    assert CenterCrop not in steps
    assert tuple(steps[Normalize].mean) == OPENAI_MEAN and tuple(steps[Normalize].std) == OPENAI_STD
    assert bundle.eval_transform(Image.new("RGB", (64, 16))).shape == (3, 32, 32)
    _, eval_transform = build_transforms("tiny-vit-quickgelu", pretrained_tag="dfn5b")
    assert repr(eval_transform) == repr(bundle.eval_transform)


@pytest.mark.parametrize("tag", ["openai", None])
def test_tag_openai_and_default_resize_shortest_side_then_crop(tag):
    name = "tiny-vit-quickgelu" if tag else "tiny-vit"
    bundle = build_model(name, pretrained_tag=tag, seed=0)
    steps = _eval_steps(bundle.eval_transform)
    assert steps[Resize].size == 32 and steps[CenterCrop].size == (32, 32)
    assert tuple(steps[Normalize].mean) == OPENAI_MEAN and tuple(steps[Normalize].std) == OPENAI_STD
    assert repr(build_transforms(name, pretrained_tag=tag)[1]) == repr(bundle.eval_transform)


def test_explicit_preprocessing_overrides_the_tag():
    _, eval_transform = build_transforms("tiny-vit", pretrained_tag="webli",
                                         preprocess={"mean": [0.1, 0.2, 0.3], "resize_mode": "shortest"})
    steps = _eval_steps(eval_transform)
    assert steps[Resize].size == 32 and steps[CenterCrop].size == (32, 32)
    assert tuple(steps[Normalize].mean) == (0.1, 0.2, 0.3) and tuple(steps[Normalize].std) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    ("name", "tag", "suggestion"),
    [("ViT-H-14", "dfn5b", "ViT-H-14-quickgelu"), ("ViT-B-16", "openai", "ViT-B-16-quickgelu"),
     ("tiny-vit", "dfn5b", "tiny-vit-quickgelu")],
)
def test_tag_refuses_gelu_model_for_quickgelu_checkpoint(name, tag, suggestion):
    # Raised before the model is instantiated, so this is fast even for ViT-H-14.
    with pytest.raises(ValueError, match=rf"QuickGELU.*name='{suggestion}'"):
        build_model(name, pretrained_tag=tag)
    with pytest.raises(ValueError, match="QuickGELU"):
        build_transforms(name, pretrained_tag=tag)


def test_user_errors_name_the_input_and_fix(tmp_path):
    with pytest.raises(ValueError, match=r"pretrained_tag 'laion' is not a pretrained tag.*list_pretrained"):
        build_model("tiny-vit", pretrained_tag="laion")
    with pytest.raises(ValueError, match=r"unknown model architecture 'ViT-Q-99'.*list_models"):
        build_model("ViT-Q-99")
    missing_config = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError, match=r"model config file not found: .*absent\.json"):
        build_model(str(missing_config))
    missing_weights = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match=r"absent\.safetensors"):
        build_model("tiny-vit", weights=missing_weights)
    with pytest.raises(FileNotFoundError, match=r"absent\.safetensors"):
        load_weights(torch.nn.Linear(2, 2), missing_weights)
    with pytest.raises(ValueError, match="precision 'fp8'"):
        build_model("tiny-vit", precision="fp8")
    clashing = tmp_path / "tiny-vit.json"
    clashing.write_text(json.dumps({"embed_dim": 8, "vision_cfg": {}, "text_cfg": {}}))
    with pytest.raises(ValueError, match="rename the file"):
        build_model(str(clashing))
    not_a_config = tmp_path / "broken-cfg.json"
    not_a_config.write_text(json.dumps({"model_cfg": {}}))
    with pytest.raises(ValueError, match=r"broken-cfg\.json lacks \['embed_dim'"):
        build_model(str(not_a_config))
