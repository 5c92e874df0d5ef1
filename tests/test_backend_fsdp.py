"""FSDP2 backend without processes: selection, the launcher check, DCP metadata that never runs code, meta-device
models. The 2-rank checks live with the DeepSpeed ones (tests/test_backend_deepspeed.py, stage "fsdp")."""

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from engine.backends import select_backend
from engine.backends.fsdp import FSDPBackend, TensorOnlyReader, transformer_blocks
from engine.distributed import DistContext
from models import build_model
from models.meta import build_model_on_meta, init_non_persistent_buffers
from tests.helpers.planted import Planted


def test_fsdp_is_selectable_for_any_world_size_and_reshards():
    cls = select_backend("fsdp", world_size=64)
    assert cls is FSDPBackend and cls.supports_reshard and cls.max_ranks is None


def test_fsdp_without_a_launcher_names_torchrun(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 1"):
        FSDPBackend.init_distributed(DistContext())


def test_every_block_of_both_towers_is_a_shard_unit():
    model = build_model("tiny-vit", seed=0).model
    blocks = transformer_blocks(model)
    assert len(blocks) == len(model.visual.transformer.resblocks) + len(model.transformer.resblocks) > 0
    with pytest.raises(ValueError, match="run.backend=deepspeed"):
        transformer_blocks(torch.nn.Linear(2, 2))


def test_a_timm_vision_tower_is_sharded_block_by_block_too():
    """SigLIP's open_clip model: a timm ViT trunk (`trunk.blocks`) and an open_clip text tower (`resblocks`)."""
    import open_clip

    from models import register_shipped_configs

    register_shipped_configs()
    model = open_clip.create_model("tiny-siglip")
    blocks = transformer_blocks(model)
    expected = [*model.visual.trunk.blocks, *model.text.transformer.resblocks]
    assert len(model.visual.trunk.blocks) > 0 and [id(b) for b in blocks] == [id(b) for b in expected]


def test_dcp_checkpoint_loads_through_the_tensor_only_reader(tmp_path):
    saved = {"w": torch.randn(3, 4), "step": torch.tensor(7.0)}
    dcp.save(saved, checkpoint_id=tmp_path)  # one process: no process group needed
    loaded = {"w": torch.zeros(3, 4), "step": torch.tensor(0.0)}
    dcp.load(loaded, storage_reader=TensorOnlyReader(tmp_path))
    assert torch.equal(loaded["w"], saved["w"]) and loaded["step"].item() == 7.0


def test_code_planted_in_dcp_metadata_never_runs(tmp_path):
    dcp.save({"w": torch.ones(2)}, checkpoint_id=tmp_path)
    marker = tmp_path / "ran"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Planted(str(marker))))
    with pytest.raises(ValueError, match="is not allowed in DCP checkpoint metadata"):
        TensorOnlyReader(tmp_path).read_metadata()
    with pytest.raises(BaseException):  # noqa: B017 (DCP wraps the reader's error in a BaseException)
        dcp.load({"w": torch.zeros(2)}, storage_reader=TensorOnlyReader(tmp_path))
    assert not marker.exists()


def test_non_tensor_entries_are_refused(tmp_path):
    """DCP reads non-tensor entries with torch.load(weights_only=False): a checkpoint listing any is refused."""
    dcp.save({"w": torch.ones(2), "extra": {"note": "hello"}}, checkpoint_id=tmp_path)
    with pytest.raises(ValueError, match="non-tensor entries"):
        TensorOnlyReader(tmp_path).read_metadata()


def test_meta_model_filled_from_a_state_dict_equals_the_built_model():
    real = build_model("tiny-vit", seed=3).model.eval()
    skeleton = build_model_on_meta("tiny-vit").model
    assert all(p.is_meta for p in skeleton.parameters())
    skeleton.to_empty(device="cpu")
    init_non_persistent_buffers(skeleton)
    skeleton.load_state_dict(real.state_dict())
    skeleton.eval()
    torch.manual_seed(0)
    images, texts = torch.randn(2, 3, 32, 32), torch.randint(1, 400, (2, 32))
    with torch.no_grad():
        for a, b in zip(real(images, texts), skeleton(images, texts)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(real.attn_mask, skeleton.attn_mask)


@pytest.mark.slow
def test_timm_tower_blocks_sharded_on_two_ranks_give_the_single_process_gradients():
    """tiny-siglip on 2 FSDP2 ranks, each timm and text block its own unit: the full gradients equal one process's
    on the whole batch (the mean of the ranks' halves)."""
    import open_clip

    from models import register_shipped_configs
    from tests.helpers.dist_cases_deepspeed import siglip_batch
    from tests.helpers.harness import run_ranks

    out = run_ranks("tests.helpers.dist_cases_deepspeed:fsdp_timm_tower_grads", world_size=2)[0]
    assert out["num_blocks"] > 0 and out["units"] == out["num_blocks"] + 1  # every block, then the root
    register_shipped_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-siglip")
    images, texts = siglip_batch()
    image_features, text_features, *_ = model(images, texts)
    ((image_features * text_features).sum() / 2).backward()
    reference = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert out["grads"].keys() == reference.keys()
    for name, grad in out["grads"].items():
        torch.testing.assert_close(grad.reshape(reference[name].shape), reference[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
