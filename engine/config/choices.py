"""The values config fields may take: choice types, what each method runs, and the data limits' defaults."""

from __future__ import annotations

import typing
from typing import Literal

Method = Literal["tuneclip", "fastclip", "openclip", "siglip"]
Surrogate = Literal["auto", "hgcl", "gcl", "mbcl", "siglip"]
OSRSurrogate = Literal["auto", "hgcl", "gcl"]
Precision = Literal["fp32", "bf16"]  # training precisions (weights fp32; bf16 compute)
ResizeMode = Literal["shortest", "longest", "squash"]  # open_clip.transform.image_transform_v2's modes
Interpolation = Literal["bicubic", "bilinear", "random"]
TrainTransform = Literal["augment", "eval"]
WandbMode = Literal["offline", "online"]
TeacherKind = Literal["wma", "ema"]
CompileMode = Literal["none", "blocks", "model", "step"]
METHODS = typing.get_args(Method)
SURROGATE_CHOICES = typing.get_args(Surrogate)
PRECISIONS = typing.get_args(Precision)
WANDB_MODES = typing.get_args(WandbMode)
# Images with more pixels (width x height, read from the header) are skipped before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
# Members larger than this (from the tar header, before any byte is read) are skipped. 64 MiB is twice a
# quality-100 JPEG at the pixel cap and far above what img2dataset writes (< 1 MB); a raw read stays
# within what decoding an image at the pixel cap costs anyway (192 MiB as RGB).
DEFAULT_MAX_MEMBER_BYTES = 64 * 1024 * 1024
# The metrics each kind of eval task reports (engine/evaluate/tasks.py), checked before anything loads.
EVAL_METRICS = {
    "zeroshot": ("acc1", "acc5", "mean_per_class_recall"),
    "retrieval": (*(f"{way}_retrieval_recall@{k}" for k in (1, 5, 10) for way in ("image", "text")), "mean_recall@1"),
}

# Paper Table 9: what each method runs.
# siglip: SigLIP's own sigmoid loss (open_clip's SigLipLoss), the baseline for SigLIP checkpoints.
METHOD_SURROGATE = {"tuneclip": "hgcl", "fastclip": "gcl", "openclip": "mbcl", "siglip": "siglip"}
METHOD_RUNS_OSR = {"tuneclip": True, "fastclip": False, "openclip": False, "siglip": False}
