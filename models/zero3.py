"""open_clip models built already partitioned by DeepSpeed ZeRO-3: no rank ever holds the whole model.

`build_model_zero3` constructs the model inside `deepspeed.zero.Init`, which partitions every
submodule's parameters over the ranks as soon as that submodule is built, then streams the weights
file into the partitions a few parameters at a time (`deepspeed.zero.GatheredParameters`, values
from rank 0, which reads the file tensor by tensor: safetensors lazily, `.pt`/`.bin` memory-mapped).
Peak memory per rank during construction: its partition plus one group of gathered parameters.

Without weights the random init is DeepSpeed's: each submodule's own initialisation on rank 0,
broadcast. open_clip re-initialises some children from their parent's constructor (the text
tower's `init_parameters`), which cannot reach parameters already partitioned, so a random-init
ZeRO-3 model differs from `build_model`'s with the same seed (trained checkpoints are unaffected).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from engine.safe_load import load_tensor_file
from models.factory import ClipBundle, resolve_model, weights_loaded_after
from models.weights import (
    LOADED_FP32_ATTR,
    OPENAI_METADATA_KEYS,
    SCALAR_PARAMS,
    _describe_mismatch,
    log_loaded_weights,
    read_state_dict,
)

LOAD_GROUP_NUMEL = 1 << 26  # parameters gathered together while loading: 64 M elements at most


@contextmanager
def _scalar_params_as_1d() -> Iterator[None]:
    """Register open_clip's 0-dim `logit_scale` / `logit_bias` with shape [1] (ZeRO-3 cannot partition 0-dim)."""
    def hook(module: nn.Module, name: str, param: nn.Parameter | None):
        if name in SCALAR_PARAMS and param is not None and param.ndim == 0:
            return nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad)
        return None

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _weights_reader(path: Path) -> tuple[dict[str, torch.Size], Callable[[str], torch.Tensor]]:
    """(name -> shape, name -> tensor) of a weights file, reading one tensor at a time where the format allows."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            shapes = {key: torch.Size(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118

        def getter(key: str) -> torch.Tensor:
            # A mapping per tensor: pages read are unmapped again, so the file never piles up in RSS.
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return handle.get_tensor(key)
    elif path.is_dir():  # a transformers CLIPModel folder: renamed to open_clip's names whole
        state = read_state_dict(path)
        shapes = {key: value.shape for key, value in state.items()}
        getter = state.__getitem__
    else:
        try:  # zip-format checkpoints map lazily; older ones are read whole (weights_only either way)
            state = load_tensor_file(path, mmap=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                state = read_state_dict(path)  # its error names what is wrong with the file
        except ValueError:
            state = read_state_dict(path)
        shapes = {key: value.shape for key, value in state.items()}
        getter = state.__getitem__
    # Keys saved from a wrapper (DDP / DeepSpeed engine "module.", torch.compile "_orig_mod.").
    prefix = next((p for p in ("module.", "_orig_mod.") if shapes and all(k.startswith(p) for k in shapes)), "")
    # OpenAI's metadata entries are not weights (open_clip drops them too).
    shapes = {key[len(prefix):]: shape for key, shape in shapes.items() if key[len(prefix):] not in OPENAI_METADATA_KEYS}
    return shapes, lambda key: getter(prefix + key)


def _partitioned_shapes(model: nn.Module) -> dict[str, torch.Size]:
    shapes = {name: getattr(p, "ds_shape", p.shape) for name, p in model.named_parameters()}
    shapes.update({name: b.shape for name, b in model.named_buffers() if name in model.state_dict()})
    return shapes


def load_weights_into_partitions(model: nn.Module, path: str | os.PathLike, *, rank: int,
                                 keep_fp32: Collection[str] = ()) -> int:
    """Load weights file `path` strictly into a ZeRO-3 partitioned `model` (collective; rank 0 reads the file);
    returns the number of tensors loaded. Rank 0 keeps the file's float32 values of the parameters named in
    `keep_fp32` (those the job freezes: their partitions may hold them rounded to bf16)."""
    from deepspeed import zero

    from engine.distributed import broadcast_object

    path = Path(path)
    expected = _partitioned_shapes(model)
    problem, reader = None, None
    if rank == 0:
        try:
            shapes, getter = _weights_reader(path)
            shapes = {key: (expected[key] if key in SCALAR_PARAMS and key in expected and shape.numel() == 1
                            and expected[key].numel() == 1 else shape) for key, shape in shapes.items()}
            meta = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
            mismatch = _describe_mismatch(meta, {k: torch.empty(s, device="meta") for k, s in expected.items()})
            if mismatch:
                problem = (f"weights {path} do not match the model architecture: {mismatch}. Fix: build the model "
                           "with the architecture the checkpoint was trained as (model.name), or pass the right file")
            reader = getter
        except (OSError, ValueError) as err:
            problem = str(err)
    problem = broadcast_object(problem)  # every rank raises, none waits in a collective for the others
    if problem:
        raise ValueError(problem)

    def value(name: str, like: torch.Tensor) -> torch.Tensor:
        return reader(name).reshape(like.shape).to(like.dtype)

    params = list(model.named_parameters())
    group: list[tuple[str, nn.Parameter]] = []
    for index, (name, param) in enumerate(params):
        group.append((name, param))
        numel = sum(p.ds_numel for _, p in group)
        if numel < LOAD_GROUP_NUMEL and index + 1 < len(params):
            continue
        with zero.GatheredParameters([p for _, p in group], modifier_rank=0), torch.no_grad():
            if rank == 0:
                for key, p in group:
                    p.data.copy_(value(key, p.data))
        group = []
    for name, param in params:  # the file's float32 scalars, kept beside their (maybe bf16) partitions
        if name in SCALAR_PARAMS:
            exact = (reader(name).reshape(param.ds_shape).float() if rank == 0
                     else torch.empty(param.ds_shape, dtype=torch.float32))
            exact = exact.to(param.ds_tensor.device)
            torch.distributed.broadcast(exact, src=0)
            setattr(param, LOADED_FP32_ATTR, exact.cpu())
        elif name in keep_fp32 and rank == 0:  # rank 0 exports and checkpoints them; the others need no copy
            setattr(param, LOADED_FP32_ATTR, reader(name).reshape(param.ds_shape).float().cpu())
    # Buffers are not partitioned: every rank holds them whole and takes rank 0's values.
    for name, buf in model.named_buffers():
        if name in expected:
            data = value(name, buf) if rank == 0 else torch.empty_like(buf)
            torch.distributed.broadcast(data, src=0)
            buf.copy_(data)
    return len(expected)


def build_model_zero3(
    name: str,
    *,
    ds_config: dict,
    weights: str | os.PathLike | None = None,
    pretrained_tag: str | None = None,
    preprocess: dict | None = None,
    tokenizer: str | None = None,
    seed: int | None = None,
    keep_fp32: Collection[str] = (),
) -> ClipBundle:
    """`build_model(name, weights=..., pretrained_tag=..., ...)` for ZeRO-3: parameters partitioned as
    they are created (collective). Names, weights, tags and tokenizers resolve as in `build_model`.

    `ds_config` is the DeepSpeed config the engine will use (its bf16 setting gives the partitions'
    dtype). `logit_scale` comes out with shape [1]. Needs the process group (deepspeed.init_distributed).
    `keep_fp32`: names of parameters the job will freeze, whose float32 values rank 0 keeps from `weights`.
    """
    import deepspeed
    import open_clip
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    spec = resolve_model(name, weights=weights, pretrained_tag=pretrained_tag, preprocess=preprocess,
                         tokenizer=tokenizer)
    train_transform, eval_transform = spec.transforms()
    preprocess_cfg = {key.removeprefix("image_"): value
                      for key, value in spec.preprocessing.create_kwargs().items() if value is not None}
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        with (_scalar_params_as_1d(), deepspeed.zero.Init(config_dict_or_path=ds_config),
              weights_loaded_after(spec.weights is not None)):
            model = open_clip.create_model(spec.arch, precision="fp32", device=get_accelerator().current_device_name(),
                                           load_weights=False, force_preprocess_cfg=preprocess_cfg)
    if spec.weights is not None:
        num_tensors = load_weights_into_partitions(model, spec.weights, rank=dist.get_rank(), keep_fp32=keep_fp32)
        log_loaded_weights(spec.weights, spec.arch, num_tensors, into="the ZeRO-3 partitions")
    return ClipBundle(model=model, train_transform=train_transform, eval_transform=eval_transform,
                      tokenizer=spec.tokenizer, model_name=spec.arch, model_cfg=spec.config,
                      preprocessing=spec.preprocessing)
