"""Tower lock groups read from open_clip's lock methods, partial locking, and layer decay's depth table."""

import open_clip
import pytest

from models import build_model, register_shipped_configs
from models.towers import layer_decay_scales, lock_groups, lock_tower, tower_depths


@pytest.fixture(scope="module")
def tiny_vit():
    return build_model("tiny-vit", seed=0).model


def test_layer_decay_scales_equal_a_hand_computed_table(tiny_vit):
    """tiny-vit: 2 blocks per tower; image decay 0.5, text decay 0.8: lr * decay^(2 - depth)."""
    scales = layer_decay_scales(tiny_vit, image=0.5, text=0.8)
    image = {"conv1": 0.25, "class_embedding": 0.25, "positional_embedding": 0.25, "ln_pre": 0.25,
             "transformer.resblocks.0": 0.5, "transformer.resblocks.1": 1.0, "ln_post": 1.0, "proj": 1.0}
    text = {"token_embedding": 0.8 ** 2, "positional_embedding": 0.8 ** 2, "transformer.resblocks.0": 0.8,
            "transformer.resblocks.1": 1.0, "ln_final": 1.0, "text_projection": 1.0}
    expected = {}
    for name, _ in tiny_vit.named_parameters():
        table, rest = (image, name[len("visual."):]) if name.startswith("visual.") else (text, name)
        for prefix, scale in table.items():
            if rest == prefix or rest.startswith(prefix + "."):
                expected[name] = scale
    assert "logit_scale" not in scales  # a root parameter: the base lr
    assert set(scales) == set(expected) == {n for n, _ in tiny_vit.named_parameters()} - {"logit_scale"}
    for name, scale in expected.items():
        assert scales[name] == pytest.approx(scale, rel=1e-12), name
    assert layer_decay_scales(tiny_vit, image=1.0, text=1.0) == {}


def test_timm_trunk_depths_follow_timm_groups():
    """SigLIP's timm trunk: stem 0, block i i + 1, final norm and the attention-pool head at L."""
    register_shipped_configs()
    model = open_clip.create_model("tiny-siglip")
    depths, num_blocks = tower_depths(model, "image")
    assert num_blocks == len(model.visual.trunk.blocks)
    assert depths["visual.trunk.pos_embed"] == depths["visual.trunk.patch_embed.proj.weight"] == 0
    assert depths["visual.trunk.blocks.0.attn.qkv.weight"] == 1
    assert depths[f"visual.trunk.blocks.{num_blocks - 1}.mlp.fc1.weight"] == num_blocks
    assert depths["visual.trunk.norm.weight"] == depths["visual.trunk.attn_pool.latent"] == num_blocks
    text_depths, _ = tower_depths(model, "text")
    assert text_depths["text.text_projection.weight"] == 2 and text_depths["text.token_embedding.weight"] == 0


def test_lock_groups_are_open_clips_and_flags_are_restored(tiny_vit):
    before = {n: p.requires_grad for n, p in tiny_vit.named_parameters()}
    groups = lock_groups(tiny_vit, "image")
    assert {n: p.requires_grad for n, p in tiny_vit.named_parameters()} == before
    assert groups[0] == ["visual.class_embedding", "visual.positional_embedding", "visual.conv1.weight",
                         "visual.ln_pre.weight", "visual.ln_pre.bias"]
    assert groups[-1] == ["visual.proj"]
    assert "visual.ln_post.weight" in groups[-2] and "visual.transformer.resblocks.1.mlp.c_fc.weight" in groups[-2]
    assert len(groups) == 4


def test_lock_tower_leaves_its_last_groups_trainable():
    model = build_model("tiny-vit", seed=0).model
    frozen = lock_tower(model, "text", unlocked=1)  # open_clip's last text group: the projection
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "text_projection" in trainable and "token_embedding.weight" in frozen
    assert all(n.startswith("visual.") or n in ("text_projection", "logit_scale") for n in trainable)
    with pytest.raises(ValueError, match=r"^model.lock_image_unlocked_groups=4: the image tower of CLIP has 4 lock "
                                         r"groups, so nothing would stay frozen; use 0 to 3"):
        lock_tower(model, "image", unlocked=4)


def test_a_tower_without_partial_lock_is_one_error_line():
    model = open_clip.create_model("RN50", device="meta")
    with pytest.raises(ValueError, match=r"^the image tower of CLIP cannot be locked partially .*use "
                                         r"model.lock_image_unlocked_groups=0") as info:
        lock_tower(model, "image", unlocked=1)
    with pytest.raises(ValueError, match=r"optim.layer_decay_image=1.0$"):
        layer_decay_scales(model, image=0.9)
    assert "\n" not in str(info.value)
    assert lock_tower(model, "image", unlocked=0)  # the whole tower: open_clip's lock does it
