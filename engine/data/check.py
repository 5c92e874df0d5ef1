"""`shards check`: read every shard completely and report what the loader would skip or choke on.

Samples are read and judged by the loader's own tar reader and validator (`samples.py`): a sample
counted as defective here is one the loader skips, for the same reason.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engine.data.manifest import Manifest
from engine.data.parallel import map_shards
from engine.data.samples import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_MEMBER_BYTES,
    SKIP_CORRUPT_IMAGE,
    SKIP_DUPLICATE_MEMBER,
    SKIP_EMPTY_CAPTION,
    SKIP_IMAGE_TOO_LARGE,
    SKIP_KEY_COLLISION,
    SKIP_MEMBER_TOO_LARGE,
    SKIP_MISSING_CAPTION,
    SKIP_MISSING_IMAGE,
    SKIP_NON_UTF8_CAPTION,
    SKIP_SPARSE_MEMBER,
    Rejection,
    TarSamples,
    decode_sample,
)
from engine.data.sources import find_manifest, find_shards

logger = logging.getLogger(__name__)


@dataclass
class ShardCheck:
    """What `check_shards` found in one tar; `error` is set when the tar is unreadable or truncated.

    `expected_samples` is the manifest's count (or the writer's declared count), None when unknown.
    `skipped` holds (key, reason) of every sample the loader would skip, in tar order. Besides those,
    `repeated_keys` counts samples whose key an earlier sample had, `small_images` usable samples whose
    image is narrower or lower than the check's `min_size`.
    """

    path: str
    num_samples: int = 0
    expected_samples: int | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    repeated_keys: int = 0
    small_images: int = 0
    error: str | None = None

    @property
    def skipped_by_reason(self) -> Counter[str]:
        return Counter(reason for _, reason in self.skipped)

    @property
    def undecodable_images(self) -> int:
        return self.skipped_by_reason[SKIP_CORRUPT_IMAGE]

    @property
    def large_images(self) -> int:
        """Images of more pixels than the check's `max_image_pixels` (skipped before decoding)."""
        return self.skipped_by_reason[SKIP_IMAGE_TOO_LARGE]

    @property
    def sparse_members(self) -> int:
        """Samples with a sparse tar member (skipped unread: a sparse map can claim any size)."""
        return self.skipped_by_reason[SKIP_SPARSE_MEMBER]

    @property
    def large_members(self) -> int:
        """Samples with a tar member of more than the check's `max_member_bytes` (skipped unread)."""
        return self.skipped_by_reason[SKIP_MEMBER_TOO_LARGE]

    @property
    def missing_images(self) -> int:
        return self.skipped_by_reason[SKIP_MISSING_IMAGE]

    @property
    def missing_captions(self) -> int:
        return self.skipped_by_reason[SKIP_MISSING_CAPTION]

    @property
    def empty_captions(self) -> int:
        """Captions that are blank or not UTF-8."""
        reasons = self.skipped_by_reason
        return reasons[SKIP_EMPTY_CAPTION] + reasons[SKIP_NON_UTF8_CAPTION]

    @property
    def duplicate_keys(self) -> int:
        """Samples with a member twice (skipped) or a key an earlier sample had (kept)."""
        return self.skipped_by_reason[SKIP_DUPLICATE_MEMBER] + self.repeated_keys

    @property
    def key_collisions(self) -> int:
        """Samples lacking image or caption because dotted member names share a key (webdataset's rule)."""
        return self.skipped_by_reason[SKIP_KEY_COLLISION]

    @property
    def count_mismatch(self) -> bool:
        return self.expected_samples is not None and self.expected_samples != self.num_samples

    @property
    def broken(self) -> bool:
        """Unreadable or truncated, or holding another number of samples than the manifest says."""
        return self.error is not None or self.count_mismatch

    @property
    def num_defects(self) -> int:
        """Samples the loader would skip or that are suspicious (small images, repeated keys)."""
        return len(self.skipped) + self.repeated_keys + self.small_images

    def status(self) -> str:
        if self.broken:
            problems = [self.error] if self.error else []
            if self.count_mismatch:
                problems.append(f"{self.num_samples} samples, expected {self.expected_samples}")
            return "BROKEN: " + "; ".join(problems)
        return "defects" if self.num_defects else "ok"


_CHECK_COLUMNS = (
    ("samples", "num_samples"),
    ("expected", "expected_samples"),
    ("bad_img", "undecodable_images"),
    ("too_big", "large_images"),
    ("sparse", "sparse_members"),
    ("huge_mbr", "large_members"),
    ("no_img", "missing_images"),
    ("no_txt", "missing_captions"),
    ("empty_txt", "empty_captions"),
    ("dup_key", "duplicate_keys"),
    ("dot_key", "key_collisions"),
    ("small", "small_images"),
)


@dataclass
class CheckReport:
    """Per-shard findings of `check_shards`, in dataset order."""

    shards: list[ShardCheck] = field(default_factory=list)
    min_size: int = 0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES

    @property
    def broken(self) -> list[ShardCheck]:
        return [shard for shard in self.shards if shard.broken]

    def totals(self) -> dict[str, int]:
        return {
            attr: sum(getattr(s, attr) or 0 for s in self.shards)
            for _, attr in _CHECK_COLUMNS
            if attr != "expected_samples"
        }

    def table(self) -> str:
        """A fixed-width table, one line per shard and a total line."""
        header = ["shard", *(name for name, _ in _CHECK_COLUMNS), "status"]
        rows = [
            [
                shard.path,
                *("-" if getattr(shard, a) is None else str(getattr(shard, a)) for _, a in _CHECK_COLUMNS),
            ]
            + [shard.status()]
            for shard in self.shards
        ]
        totals = self.totals()
        rows.append(
            ["total", *("" if a == "expected_samples" else str(totals[a]) for _, a in _CHECK_COLUMNS)]
            + [f"{len(self.broken)} broken of {len(self.shards)}"]
        )
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]

        def line(row: list[str]) -> str:
            cells = [row[0].ljust(widths[0])] + [
                cell.rjust(width) for cell, width in zip(row[1:-1], widths[1:])
            ]
            return "  ".join([*cells, row[-1]])

        return "\n".join([line(header), *map(line, rows)])


def check_shard(
    path: str | os.PathLike,
    *,
    min_size: int = 0,
    expected_samples: int | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> ShardCheck:
    """Read one tar completely: count samples and judge each as the loader does, detect truncation.

    `num_samples` counts the samples the loader would read (a truncated tar's cut last sample is lost).
    """
    path = Path(path)
    result = ShardCheck(path=str(path), expected_samples=expected_samples)
    if not path.is_file():
        result.error = "missing"
        return result
    tar = TarSamples(path, expected=expected_samples, max_member_bytes=max_member_bytes)
    seen: set[str] = set()
    for sample in tar:
        result.repeated_keys += sample.key in seen
        seen.add(sample.key)
        judged = decode_sample(sample, max_image_pixels=max_image_pixels)
        if isinstance(judged, Rejection):
            result.skipped.append((sample.key, judged.reason))
        elif min(judged.image.size) < min_size:
            result.small_images += 1
    result.num_samples = tar.num_whole
    if tar.error is not None:
        message = str(tar.error).splitlines()[0] if str(tar.error) else type(tar.error).__name__
        state = "unreadable" if result.num_samples == 0 else f"truncated after {result.num_samples} sample(s)"
        result.error = f"{state} ({message})"
    elif tar.end_marker is False:
        result.error = f"truncated: no end-of-archive marker after {result.num_samples} sample(s)"
    return result


def _check_job(job: tuple[str, int, int | None, int, int]) -> ShardCheck:
    path, min_size, expected, max_image_pixels, max_member_bytes = job
    return check_shard(path, min_size=min_size, expected_samples=expected, max_image_pixels=max_image_pixels,
                       max_member_bytes=max_member_bytes)


def check_shards(
    source: str | os.PathLike,
    *,
    min_size: int = 0,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    num_workers: int | None = None,
    progress: bool = False,
) -> CheckReport:
    """Check every shard of `source`: a manifest (or a folder holding one), or anything `find_shards` accepts.

    With a manifest, each shard's sample count is compared with the manifest's; otherwise with the count
    img2dataset or wids declared, if any. Images narrower or lower than `min_size` pixels count as small;
    images of more than `max_image_pixels` pixels, tar members of more than `max_member_bytes` bytes and
    sparse members are skipped as the loader with those caps skips them.
    Shards are checked in `num_workers` processes (default: one per core).
    """
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0 pixels, got {min_size}")
    if max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be at least 1, got {max_image_pixels}")
    if max_member_bytes < 1:
        raise ValueError(f"max_member_bytes must be at least 1, got {max_member_bytes}")
    caps = (max_image_pixels, max_member_bytes)
    manifest_path = find_manifest(source)
    if manifest_path is not None:
        manifest = Manifest.load(manifest_path)
        jobs = [
            (str(manifest.shard_path(i)), min_size, shard.num_samples, *caps)
            for i, shard in enumerate(manifest.shards)
        ]
        names = [shard.path for shard in manifest.shards]
    else:
        paths, declared = find_shards(source)
        jobs = [
            (str(p), min_size, declared[p].num_samples if p in declared else None, *caps)
            for p in paths
        ]
        root = Path(os.path.commonpath([p.parent for p in paths]))
        names = [p.relative_to(root).as_posix() for p in paths]
    results = map_shards(_check_job, jobs, num_workers=num_workers, desc="checking shards", progress=progress)
    for name, result in zip(names, results):
        result.path = name
    report = CheckReport(shards=results, min_size=min_size, max_image_pixels=max_image_pixels,
                         max_member_bytes=max_member_bytes)
    for shard in report.broken:
        logger.error("shard %s: %s", shard.path, shard.status())
    return report
