"""Functions run on every rank by tests.helpers.harness.run_ranks for the sharded-backend tests (2 CPU ranks):
DeepSpeed ZeRO 1/2/3 (`stage` 1, 2, 3) and FSDP2 (`stage` "fsdp")."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.backends.deepspeed import DeepSpeedBackend
from engine.distributed import all_reduce_sum, context_from_env, gather_no_grad
from engine.objectives.contrastive import GlobalContrastiveLoss, SurrogateSpec
from models import build_model, make_logit_scale_1d

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-vit"
IMAGE_SIZE, CONTEXT_LENGTH, TEXT_WIDTH = 32, 32, 64  # models/configs/tiny-vit.json
VOCAB_SIZE = 512  # instead of 49,408: 0.3 M parameters to partition, gather and save instead of 3.4 M
LOCAL_BATCH = 2
OSR_STEPS = 3
LR = 1e-2  # large enough that float32 rounding of the weights stays ~1e-5 of the update
BETAS = (0.9, 0.98)
WEIGHT_DECAY = 0.1
GRAD_CLIP = 0.5  # below the fine-tuning step's gradient norm (~2), so that step clips
EPS = 1e-6  # large enough that float-noise gradients (e.g. attention key biases) barely move weights
SPEC = SurrogateSpec(kind="hgcl", margin=0.1, tau=0.05, eps=1e-10)
# Batches by index: 0..OSR_STEPS-1 OSR, then fine-tuning, reset, after-load steps, one discarded.
FINETUNE_BATCH, RESET_BATCH, RESUMED_BATCH, DISCARDED_BATCH = range(OSR_STEPS, OSR_STEPS + 4)


def global_batch(index: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `index` of the whole job (images, tokens), identical on every rank and in the reference."""
    gen = torch.Generator().manual_seed(1000 + index)
    num = LOCAL_BATCH * world_size
    images = torch.randn(num, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    texts = torch.randint(1, VOCAB_SIZE, (num, CONTEXT_LENGTH), generator=gen)
    return images, texts


def tiny_model(seed: int) -> torch.nn.Module:
    """The tiny CLIP with a small vocabulary, its fixed temperature frozen as the trainer does."""
    model = build_model(MODEL, seed=seed).model
    model.token_embedding = torch.nn.Embedding(VOCAB_SIZE, TEXT_WIDTH)
    gen = torch.Generator().manual_seed(seed)
    torch.nn.init.normal_(model.token_embedding.weight, std=0.02, generator=gen)
    make_logit_scale_1d(model)
    model.logit_scale.requires_grad_(False)
    return model


def forward_backward(backend, loss_fn: GlobalContrastiveLoss, images, texts, *, offset: int) -> None:
    """One rank's objective on its slice (u rows zero, never seen), backward through the backend."""
    model = backend.model
    num = images.shape[0]
    zeros = torch.zeros(num)
    out = loss_fn(model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True),
                  log_u_x=zeros, log_u_z=zeros, seen=torch.zeros(num, dtype=torch.bool), gamma=0.9,
                  offset=offset)
    backend.backward(out)


def _gathered(backend) -> tuple[dict, dict]:
    """Full model weights and full fp32 master weights (collective)."""
    if not isinstance(backend, DeepSpeedBackend):  # FSDP2: the fp32 shards are the weights and the masters
        weights = {name: p.full_tensor().detach().clone() for name, p in backend.model.named_parameters()}
        return weights, {name: w for name, w in weights.items() if backend.model.get_parameter(name).requires_grad}
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(backend.model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=backend.zero_stage == 3):
        weights = {name: p.detach().clone() for name, p in params.items()}
    masters = {name: safe_get_full_fp32_param(p).detach().clone()
               for name, p in params.items() if p.requires_grad}
    return weights, masters


def _differing(a: dict, b: dict) -> list[str]:
    return sorted(name for name in a if not torch.equal(a[name], b[name]))


def deepspeed_backend(seed: int, config: str, **kwargs) -> DeepSpeedBackend:
    """The tiny model under `zero_configs/<config>` with the tests' AdamW settings."""
    return DeepSpeedBackend(tiny_model(seed), device=torch.device("cpu"),
                            zero_config=str(ROOT / "zero_configs" / config), micro_batch_size=LOCAL_BATCH,
                            betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS, **kwargs)


def tiny_skeleton() -> torch.nn.Module:
    """`tiny_model` on the meta device: shapes only."""
    from models.meta import build_model_on_meta

    model = build_model_on_meta(MODEL).model
    with torch.device("meta"):
        model.token_embedding = torch.nn.Embedding(VOCAB_SIZE, TEXT_WIDTH)
    make_logit_scale_1d(model)
    model.logit_scale.requires_grad_(False)
    return model


def fsdp_backend(seed: int, **kwargs):
    """The tiny model sharded by FSDP2 with the tests' AdamW settings, built as for a checkpoint: on the meta
    device on every rank, filled from rank 0's full state dict."""
    from engine.backends.fsdp import FSDPBackend

    weights = tiny_model(seed).state_dict() if context_from_env().rank == 0 else None
    return FSDPBackend(tiny_skeleton(), device=torch.device("cpu"), betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS,
                       weights=weights, **kwargs)


def sharded_backend(stage: int | str, seed: int, **kwargs):
    """ZeRO-`stage` (1, 2, 3) with `zero_configs/zero<stage>.json`, or FSDP2 for stage "fsdp"."""
    if stage == "fsdp":
        kwargs.pop("grad_clip", None)  # FSDP2 clips in `step` only
        return fsdp_backend(seed, **kwargs)
    return deepspeed_backend(seed, f"zero{stage}.json", **kwargs)


def init_distributed(stage: int | str) -> None:
    ctx = context_from_env()
    if stage == "fsdp":
        from engine.backends.fsdp import FSDPBackend

        FSDPBackend.init_distributed(ctx)
    else:
        DeepSpeedBackend.init_distributed(ctx)


def zero_stage_checks(stage: int | str, checkpoint_dir: str) -> dict:
    """OSR, a fine-tuning step, reset, save and load on one ZeRO stage (or FSDP2); returns what the test
    asserts on."""
    ctx = context_from_env()
    init_distributed(stage)
    loss_fn = GlobalContrastiveLoss(SPEC, gather=gather_no_grad, reduce_sum=all_reduce_sum,
                                    world_size=ctx.world_size)
    lo, hi = ctx.rank * LOCAL_BATCH, (ctx.rank + 1) * LOCAL_BATCH

    def build(seed: int):
        # The config clips (gradient_clipping = GRAD_CLIP); OSR steps must still see raw gradients.
        return sharded_backend(stage, seed, grad_clip=GRAD_CLIP)

    def backward(backend, index: int) -> None:
        images, texts = global_batch(index, ctx.world_size)
        forward_backward(backend, loss_fn, images[lo:hi], texts[lo:hi], offset=lo)

    def train_step(backend, index: int, *, lr: float, grad_clip: float = 0.0) -> float:
        backward(backend, index)
        return backend.step(lr=lr, grad_clip=grad_clip)

    backend = build(seed=0)
    out = {"moments_before_step": backend.full_moments(), "count_before_step": backend.optimizer_step_count()}
    weights0, masters0 = _gathered(backend)
    out["weights0"] = weights0
    backward(backend, DISCARDED_BATCH)  # as after a non-finite loss: must not reach the moments
    backend.zero_grad()

    osr_norms = [train_step(backend, i, lr=0.0) for i in range(OSR_STEPS)]
    weights, masters = _gathered(backend)
    out.update(osr_norms=osr_norms, osr_changed_weights=_differing(weights0, weights),
               osr_changed_masters=_differing(masters0, masters), osr_count=backend.optimizer_step_count(),
               osr_moments=backend.full_moments())

    out["finetune_norm"] = train_step(backend, FINETUNE_BATCH, lr=LR, grad_clip=GRAD_CLIP)
    out["finetune_weights"], _ = _gathered(backend)
    out.update(finetune_count=backend.optimizer_step_count(), finetune_moments=backend.full_moments())

    backend.reset_optimizer_state()
    out.update(reset_count=backend.optimizer_step_count(), reset_moments=backend.full_moments())
    if stage == "fsdp":  # a checkpoint right after the reset ('no seeding' ablation) loads as no state at all
        backend.save(Path(checkpoint_dir) / "after_reset")
        stateful = build(seed=1)
        train_step(stateful, RESET_BATCH, lr=0.0)  # has moments and a counter before loading
        stateful.load(Path(checkpoint_dir) / "after_reset")
        out.update(reset_loaded_count=stateful.optimizer_step_count(), reset_loaded_moments=stateful.full_moments(),
                   reset_loaded_differing_weights=_differing(_gathered(backend)[0], _gathered(stateful)[0]))
        stateful.close()
    train_step(backend, RESET_BATCH, lr=LR)
    out["reset_step_weights"], _ = _gathered(backend)
    out.update(reset_step_count=backend.optimizer_step_count(), reset_step_moments=backend.full_moments())

    backend.save(checkpoint_dir)
    resumed = build(seed=1)
    resumed.load(checkpoint_dir)
    saved_weights, saved_masters = _gathered(backend)
    loaded_weights, loaded_masters = _gathered(resumed)
    saved_moments, loaded_moments = backend.full_moments(), resumed.full_moments()
    out.update(
        loaded_count=resumed.optimizer_step_count(), saved_count=backend.optimizer_step_count(),
        loaded_differing_weights=_differing(saved_weights, loaded_weights),
        loaded_differing_masters=_differing(saved_masters, loaded_masters),
        loaded_differing_moments=sorted(
            name for name, (m, v) in saved_moments.items()
            if not (torch.equal(m, loaded_moments[name][0]) and torch.equal(v, loaded_moments[name][1]))),
        num_moments=len(saved_moments), num_loaded_moments=len(loaded_moments),
    )
    # The next step from the loaded state equals the next step of the run that saved it.
    train_step(backend, RESUMED_BATCH, lr=LR)
    train_step(resumed, RESUMED_BATCH, lr=LR)
    out["resumed_differing_weights"] = _differing(_gathered(backend)[0], _gathered(resumed)[0])
    out["resumed_count"] = resumed.optimizer_step_count()
    backend.close()
    resumed.close()
    if ctx.rank != 0:  # rank 0 carries the tensors; the others only their own checks
        out = {k: v for k, v in out.items() if not isinstance(v, dict)}
    return out


def bf16_osr_checks(config: str) -> dict:
    """OSR under bf16 (DeepSpeed: autocast forward, as the trainer runs it; FSDP2 for config "fsdp": its
    MixedPrecisionPolicy): weights and fp32 masters untouched. Also the dtype the blocks compute in."""
    ctx = context_from_env()
    stage = "fsdp" if config == "fsdp" else None
    init_distributed(stage)
    loss_fn = GlobalContrastiveLoss(SPEC, gather=gather_no_grad, reduce_sum=all_reduce_sum,
                                    world_size=ctx.world_size)
    lo, hi = ctx.rank * LOCAL_BATCH, (ctx.rank + 1) * LOCAL_BATCH
    backend = fsdp_backend(0, precision="bf16") if stage else deepspeed_backend(0, config, precision="bf16")
    block_dtypes = set()
    backend.model.visual.transformer.resblocks[0].register_forward_hook(
        lambda module, args, output: block_dtypes.add(str(output.dtype)))
    weights0, masters0 = _gathered(backend)
    for index in range(OSR_STEPS):
        images, texts = global_batch(index, ctx.world_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=stage is None):
            forward_backward(backend, loss_fn, images[lo:hi], texts[lo:hi], offset=lo)
        backend.step(lr=0.0)
    weights, masters = _gathered(backend)
    out = {"weight_dtypes": sorted({str(w.dtype) for w in weights.values()}), "block_dtypes": sorted(block_dtypes),
           "osr_changed_weights": _differing(weights0, weights),
           "osr_changed_masters": _differing(masters0, masters),
           "osr_count": backend.optimizer_step_count(), "osr_moments": backend.full_moments()}
    backend.close()
    return out if ctx.rank == 0 else {k: v for k, v in out.items() if k != "osr_moments"}


def _save_in_background_while_training(backend, loss_fn, save_dir: str, *, lo: int, hi: int, world_size: int) -> None:
    """`backend.save_async(save_dir)`, then two fine-tuning steps (weights and moments change in place) while
    the files are not yet written: the writer is held back until the steps are done."""
    import threading

    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    release = threading.Event()
    write_data = FileSystemWriter.write_data

    def held_back(self, *args, **kwargs):
        assert release.wait(120), "the training steps never finished"
        return write_data(self, *args, **kwargs)

    FileSystemWriter.write_data = held_back
    try:
        written = backend.save_async(save_dir)
        for index in (RESUMED_BATCH, DISCARDED_BATCH):
            images, texts = global_batch(index, world_size)
            forward_backward(backend, loss_fn, images[lo:hi], texts[lo:hi], offset=lo)
            backend.step(lr=LR)
        assert not written.done(), "the write finished before the steps after it"
        release.set()
        written.result(timeout=120)
    finally:
        release.set()
        FileSystemWriter.write_data = write_data


def reshard_round(stage: int | str, save_dir: str, load_dir: str | None, background: bool = False) -> dict:
    """Optionally load (resharded) a checkpoint of another world size, then train/save; returns full state.

    With `load_dir` the state right after loading is returned; without it, OSR + one fine-tuning
    step are run first. Either way the state is then saved to `save_dir` (`background`: with `save_async`,
    the training going on while it is written; the returned state is the one at the save).
    """
    ctx = context_from_env()
    init_distributed(stage)
    backend = sharded_backend(stage, 0 if load_dir is None else 1)
    if load_dir is None:
        loss_fn = GlobalContrastiveLoss(SPEC, gather=gather_no_grad, reduce_sum=all_reduce_sum,
                                        world_size=ctx.world_size)
        lo, hi = ctx.rank * LOCAL_BATCH, (ctx.rank + 1) * LOCAL_BATCH
        for index, lr in [(i, 0.0) for i in range(OSR_STEPS)] + [(FINETUNE_BATCH, LR)]:
            images, texts = global_batch(index, ctx.world_size)
            forward_backward(backend, loss_fn, images[lo:hi], texts[lo:hi], offset=lo)
            backend.step(lr=lr)
    else:
        backend.load(load_dir, reshard=True)
    weights, masters = _gathered(backend)
    out = {"weights": weights, "masters": masters, "moments": backend.full_moments(),
           "count": backend.optimizer_step_count()}
    if background:
        _save_in_background_while_training(backend, loss_fn, save_dir, lo=ctx.rank * LOCAL_BATCH,
                                           hi=(ctx.rank + 1) * LOCAL_BATCH, world_size=ctx.world_size)
        assert backend.optimizer_step_count() == out["count"] + 2
    else:
        backend.save(save_dir)
    backend.close()
    return out if ctx.rank == 0 else {}


def fsdp_timm_tower_grads() -> dict:
    """tiny-siglip (timm ViT trunk + open_clip text tower) under FSDP2, every block its own unit: the gradient of
    sum(image . text features) over this rank's half of a batch, averaged over the ranks by FSDP (rank 0 returns
    the full gradients and the number of FSDP units)."""
    import open_clip

    from engine.backends.fsdp import FSDPBackend, transformer_blocks
    from models import register_shipped_configs

    ctx = context_from_env()
    FSDPBackend.init_distributed(ctx)
    register_shipped_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-siglip")
    num_blocks = len(transformer_blocks(model))
    backend = FSDPBackend(model, device=torch.device("cpu"), betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)
    images, texts = siglip_batch()
    half = images.shape[0] // ctx.world_size
    lo = ctx.rank * half
    image_features, text_features, *_ = backend.forward(images[lo:lo + half], texts[lo:lo + half])
    backend.backward((image_features * text_features).sum())
    grads = {name: p.grad.full_tensor().clone() for name, p in backend.model.named_parameters() if p.grad is not None}
    from torch.distributed.fsdp import FSDPModule

    units = sum(1 for m in backend.model.modules() if isinstance(m, FSDPModule))
    backend.close()
    return {"grads": grads, "units": units, "num_blocks": num_blocks} if ctx.rank == 0 else {}


def siglip_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(77)
    return torch.randn(4, 3, 160, 160, generator=gen), torch.randint(1, 256, (4, 16), generator=gen)
