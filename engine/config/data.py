"""The `data` section: training shards and batching."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.config.choices import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_MEMBER_BYTES, TrainTransform
from engine.config.fields import choice_errors, setting


@dataclass
class DataConfig:
    """Training shards (a directory with manifest.json, or the manifest itself) and batching."""

    train: str = setting("", "shard directory with manifest.json, or the manifest itself (see `run.py shards`)",
                         resume="may_change")
    batch_size: int = setting(64, "global batch across all ranks", osr=True)
    accum_steps: int = setting(1, "micro-batches per step: each rank encodes its share of data.batch_size in this "
                               "many pieces (a feature cache, two forwards), the step exactly that of the whole "
                               "batch; memory of one micro-batch, ~1 extra forward of time", resume="may_change")
    num_workers: int = setting(0, "data loader processes per rank (0 = in the training process)")
    shuffle_buffer: int = setting(1000, "samples held for shuffling within a rank's stream")
    verify_checksums: bool = setting(False, "check every shard's sha256 against the manifest at start")
    resampled: bool = setting(False, "draw shards with replacement (very large data); epoch = samples_per_epoch")
    samples_per_epoch: int | None = setting(None, "samples per epoch, all ranks together; required with resampled")
    max_image_pixels: int = setting(DEFAULT_MAX_IMAGE_PIXELS,
                                    "larger images (width x height) are skipped before decoding")
    max_member_bytes: int = setting(DEFAULT_MAX_MEMBER_BYTES, "tar members larger than this (bytes, from the tar "
                                    "header) or sparse are skipped unread; 64 MiB")
    train_transform: TrainTransform = setting(
        "augment", "augment: the model's random-resized-crop train transform; eval: none (the eval transform)",
        osr=True)

    def errors(self, *, training: bool = True) -> list[str]:
        out = choice_errors(self, "data")
        if training and not self.train:
            out.append("data.train is required: a shard directory with manifest.json (see `run.py shards`)")
        elif training and not (Path(self.train) / "manifest.json" if Path(self.train).is_dir()
                               else Path(self.train)).is_file():
            out.append(f"data.train: no manifest at {self.train} (relative to {Path.cwd()}); build shards with "
                       "`run.py shards build <csv|dir> <out>` or index existing ones with `run.py shards index <dir>`")
        if self.batch_size < 2:
            out.append(f"data.batch_size must be >= 2 (contrastive losses need negatives), got {self.batch_size}")
        if self.num_workers < 0:
            out.append(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.accum_steps < 1:
            out.append(f"data.accum_steps must be >= 1 (1 = no accumulation), got {self.accum_steps}")
        elif self.batch_size % self.accum_steps:
            out.append(f"data.batch_size={self.batch_size} is not divisible by data.accum_steps={self.accum_steps}; "
                       "pick a batch size that is a multiple of world size x accum_steps")
        if self.resampled and not self.samples_per_epoch:
            out.append("data.samples_per_epoch is required with data.resampled=true (samples of all ranks per epoch)")
        if not self.resampled and self.samples_per_epoch is not None:
            out.append("data.samples_per_epoch applies to data.resampled=true only; drop it or set resampled")
        if self.max_image_pixels < 1:
            out.append(f"data.max_image_pixels must be >= 1 (width x height), got {self.max_image_pixels}")
        if self.max_member_bytes < 1:
            out.append(f"data.max_member_bytes must be >= 1 (bytes of one tar member), got {self.max_member_bytes}")
        return out
