"""Build webdataset tar shards (`<key>.<jpg|png|webp>` + `<key>.txt`) and their manifest from local data,
and check existing shards for what the loader would skip or choke on.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from engine.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    Manifest,
    build_manifest,
    default_num_workers,
    find_shards,
    read_json_object,
    sample_key,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Member extensions a sample's image may have in a shard, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# PIL format name -> member extension written into the shard.
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_EXT_FORMAT = {ext: fmt for fmt, ext in _FORMAT_EXT.items()}
# Decoding errors PIL raises for broken image bytes (UnidentifiedImageError is an OSError).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

SKIP_MISSING_IMAGE = "missing image file"
SKIP_CORRUPT_IMAGE = "corrupt image"
SKIP_MISSING_CAPTION = "missing caption"
SKIP_EMPTY_CAPTION = "empty caption"
SKIP_NON_UTF8_CAPTION = "non-UTF-8 caption"


@dataclass
class _SourceItem:
    """One (image, caption) pair to write; `caption` is None when the caption file is missing."""

    name: str
    image_path: Path
    caption: bytes | None


def _items_from_csv(csv_path: Path) -> Iterator[_SourceItem]:
    # surrogateescape keeps undecodable bytes so one bad row is skipped instead of failing the file.
    with open(csv_path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"filepath", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{csv_path}: header must contain 'filepath,caption' (missing {', '.join(sorted(missing))})"
            )
        for line, row in enumerate(reader, start=2):
            filepath = (row["filepath"] or "").strip()
            caption = row["caption"]
            yield _SourceItem(
                name=f"{csv_path}:{line} ({filepath})",
                image_path=csv_path.parent / filepath,
                caption=None if caption is None else caption.encode("utf-8", errors="surrogateescape"),
            )


def _items_from_folder(folder: Path) -> Iterator[_SourceItem]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    image_stems = {p.with_suffix("") for p in images}
    for path in files:
        if path.suffix == ".txt" and path.with_suffix("") not in image_stems:
            yield _SourceItem(name=str(path), image_path=path.with_suffix(""), caption=path.read_bytes())
    for path in images:
        caption_path = path.with_suffix(".txt")
        caption = caption_path.read_bytes() if caption_path.is_file() else None
        yield _SourceItem(name=str(path), image_path=path, caption=caption)


def _check_caption(raw: bytes | None) -> tuple[str | None, str | None]:
    """(caption, None) for a usable caption, else (None, skip reason)."""
    if raw is None:
        return None, SKIP_MISSING_CAPTION
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, SKIP_NON_UTF8_CAPTION
    text = text.strip()
    if not text:
        return None, SKIP_EMPTY_CAPTION
    return text, None


def _encode_image(path: Path, image_ext: str | None) -> tuple[str, bytes]:
    """(member extension, bytes) of a fully decodable image; re-encoded when its format must change."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        fmt = image.format
        target = image_ext or _FORMAT_EXT.get(fmt, "png")
        if _FORMAT_EXT.get(fmt) == target:
            return target, data
        image = image.convert("RGB") if _EXT_FORMAT[target] == "JPEG" else image
        out = io.BytesIO()
        image.save(out, format=_EXT_FORMAT[target])
        return target, out.getvalue()


class _ShardSequenceWriter:
    """Writes `shard-NNNNNN.tar` files of `samples_per_shard` samples, each renamed into place when complete."""

    def __init__(self, out_dir: Path, samples_per_shard: int):
        self.out_dir = out_dir
        self.samples_per_shard = samples_per_shard
        self.paths: list[Path] = []
        self._file: Any = None
        self._writer: TarWriter | None = None
        self._count = 0
        self._tmp: Path | None = None

    def write(self, key: str, ext: str, image: bytes, caption: str) -> None:
        if self._writer is None:
            self._open()
        assert self._writer is not None
        self._writer.write({"__key__": key, ext: image, "txt": caption.encode("utf-8")})
        self._count += 1
        if self._count == self.samples_per_shard:
            self.close()

    def _open(self) -> None:
        path = self.out_dir / f"shard-{len(self.paths):06d}.tar"
        self._tmp = path.with_name(f".{path.name}.partial")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 -- closed in close()/abort()
        # Fixed mtime: the same source gives byte-identical shards (and sha256).
        self._writer = TarWriter(self._file, encoder=False, mtime=0)
        self.paths.append(path)
        self._count = 0

    def close(self) -> None:
        """Finish the open shard, if any, and move it to its final name."""
        if self._writer is None:
            return
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        assert self._tmp is not None
        os.replace(self._tmp, self.paths[-1])
        self._writer = self._file = self._tmp = None

    def abort(self) -> None:
        """Drop the half-written shard."""
        if self._writer is not None:
            self._file.close()
            assert self._tmp is not None
            self._tmp.unlink(missing_ok=True)
            self.paths.pop()
            self._writer = self._file = self._tmp = None


def build_shards(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    image_ext: str | None = None,
) -> tuple[Manifest, dict[str, Any]]:
    """Write shards + `manifest.json` to `out_dir` from a `filepath,caption` CSV or an image/.txt folder.

    Images stay in their own bytes when JPEG, PNG or WebP (other formats become PNG) unless `image_ext`
    ("jpg" | "png" | "webp") asks for one format. Returns (manifest, report); the report holds
    `num_written`, `num_skipped`, `skipped_by_reason` {reason: count} and `skipped` [{source, reason}].
    """
    source = Path(source)
    out_dir = Path(out_dir)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if image_ext is not None and image_ext not in _EXT_FORMAT:
        raise ValueError(f"image_ext must be one of {sorted(_EXT_FORMAT)} or None, got {image_ext!r}")
    if source.is_dir():
        items = _items_from_folder(source)
    elif source.is_file():
        items = _items_from_csv(source)
    else:
        raise ValueError(f"source {source} does not exist; give a CSV (filepath,caption) or a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(
        p.name for p in out_dir.iterdir() if p.name.startswith("shard-") or p.name == MANIFEST_NAME
    )
    if existing:
        raise ValueError(
            f"out_dir {out_dir} already holds shards ({', '.join(existing[:3])}); use an empty directory"
        )

    skipped: list[dict[str, str]] = []
    writer = _ShardSequenceWriter(out_dir, samples_per_shard)
    num_written = 0
    try:
        for item in items:
            caption, reason = None, None
            ext = image = None
            if not item.image_path.is_file():
                reason = SKIP_MISSING_IMAGE
            if reason is None:
                caption, reason = _check_caption(item.caption)
            if reason is None:
                try:
                    ext, image = _encode_image(item.image_path, image_ext)
                except IMAGE_ERRORS as exn:
                    reason = SKIP_CORRUPT_IMAGE
                    logger.debug("cannot decode %s: %s", item.image_path, exn)
            if reason is not None:
                logger.warning("skipping %s: %s", item.name, reason)
                skipped.append({"source": item.name, "reason": reason})
                continue
            assert ext is not None and image is not None and caption is not None
            writer.write(f"{num_written:09d}", ext, image, caption)
            num_written += 1
        writer.close()
    except BaseException:
        writer.abort()
        raise

    report = {
        "num_written": num_written,
        "num_skipped": len(skipped),
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped)),
        "skipped": skipped,
    }
    if num_written == 0:
        raise ValueError(f"no usable samples in {source}: skipped {report['skipped_by_reason']}")
    manifest = build_manifest(writer.paths, root=out_dir)
    manifest.save(out_dir / MANIFEST_NAME)
    logger.info(
        "wrote %d samples in %d shards to %s, skipped %d %s",
        num_written,
        len(writer.paths),
        out_dir,
        len(skipped),
        report["skipped_by_reason"],
    )
    return manifest, report


# Members webdataset never hands out as sample parts (its skip_meta default).
_META_MEMBER = re.compile(r"__[^/]*__($|/)")
_TAR_END_BYTES = 1024  # a complete tar ends with two zero blocks of 512 bytes


@dataclass
class ShardCheck:
    """What `check_shards` found in one tar; `error` is set when the tar is unreadable or truncated.

    `expected_samples` is the manifest's count (or the writer's declared count), None when unknown.
    `empty_captions` counts captions that are blank or not UTF-8.
    """

    path: str
    num_samples: int = 0
    expected_samples: int | None = None
    undecodable_images: int = 0
    missing_images: int = 0
    missing_captions: int = 0
    empty_captions: int = 0
    duplicate_keys: int = 0
    small_images: int = 0
    error: str | None = None

    @property
    def count_mismatch(self) -> bool:
        return self.expected_samples is not None and self.expected_samples != self.num_samples

    @property
    def broken(self) -> bool:
        """Unreadable or truncated, or holding another number of samples than the manifest says."""
        return self.error is not None or self.count_mismatch

    @property
    def num_defects(self) -> int:
        """Samples the loader would skip or that are suspicious (small images, duplicate keys)."""
        return (
            self.undecodable_images
            + self.missing_images
            + self.missing_captions
            + self.empty_captions
            + self.duplicate_keys
            + self.small_images
        )

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
    ("no_img", "missing_images"),
    ("no_txt", "missing_captions"),
    ("empty_txt", "empty_captions"),
    ("dup_key", "duplicate_keys"),
    ("small", "small_images"),
)


@dataclass
class CheckReport:
    """Per-shard findings of `check_shards`, in dataset order."""

    shards: list[ShardCheck] = field(default_factory=list)
    min_size: int = 0

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


def _iter_tar_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(key, [(extension, bytes)]) per sample, grouped as webdataset does (consecutive equal keys)."""
    key, parts = None, []
    for info in tar:
        if not info.isreg() or _META_MEMBER.match(info.name):
            continue
        data = tar.extractfile(info).read()
        member_key = sample_key(info.name)
        if member_key is None:
            continue
        if member_key != key:
            if key is not None:
                yield key, parts
            key, parts = member_key, []
        parts.append((info.name[len(member_key) + 1 :].lower(), data))
    if key is not None:
        yield key, parts


def _check_sample(result: ShardCheck, parts: list[tuple[str, bytes]], min_size: int) -> None:
    members = dict(parts)
    if len(members) < len(parts):
        result.duplicate_keys += 1
    caption = members.get("txt")
    if caption is None:
        result.missing_captions += 1
    else:
        try:
            if not caption.decode("utf-8").strip():
                result.empty_captions += 1
        except UnicodeDecodeError:
            result.empty_captions += 1
    image_bytes = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_bytes is None:
        result.missing_images += 1
        return
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()
            size = image.size
    except IMAGE_ERRORS:
        result.undecodable_images += 1
        return
    if min(size) < min_size:
        result.small_images += 1


def check_shard(
    path: str | os.PathLike, *, min_size: int = 0, expected_samples: int | None = None
) -> ShardCheck:
    """Read one tar completely: count samples and defects, decode every image, detect truncation."""
    path = Path(path)
    result = ShardCheck(path=str(path), expected_samples=expected_samples)
    if not path.is_file():
        result.error = "missing"
        return result
    seen: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for key, parts in _iter_tar_samples(tar):
                result.num_samples += 1
                if key in seen:
                    result.duplicate_keys += 1
                seen.add(key)
                _check_sample(result, parts, min_size)
            end = tar.offset
        with open(path, "rb") as f:
            f.seek(end)
            tail = f.read(_TAR_END_BYTES)
        if len(tail) < _TAR_END_BYTES or tail.strip(b"\0"):
            result.error = f"truncated: no end-of-archive marker after {result.num_samples} sample(s)"
    except (tarfile.TarError, OSError, EOFError) as exn:
        message = str(exn).splitlines()[0] if str(exn) else type(exn).__name__
        state = "unreadable" if result.num_samples == 0 else f"truncated after {result.num_samples} sample(s)"
        result.error = f"{state} ({message})"
    return result


def _check_job(job: tuple[str, int, int | None]) -> ShardCheck:
    path, min_size, expected = job
    return check_shard(path, min_size=min_size, expected_samples=expected)


def _is_manifest_file(path: Path) -> bool:
    data = read_json_object(path)
    return data is not None and data.get("format") == MANIFEST_FORMAT


def check_shards(
    source: str | os.PathLike, *, min_size: int = 0, num_workers: int | None = None, progress: bool = False
) -> CheckReport:
    """Check every shard of `source`: a manifest (or a folder holding one), or anything `find_shards` accepts.

    With a manifest, each shard's sample count is compared with the manifest's; otherwise with the count
    img2dataset or wids declared, if any. Images narrower or lower than `min_size` pixels count as small.
    Shards are checked in `num_workers` processes (default: one per core).
    """
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0 pixels, got {min_size}")
    spec = Path(os.fspath(source))
    if (spec.is_dir() and (spec / MANIFEST_NAME).is_file()) or _is_manifest_file(spec):
        manifest = Manifest.load(spec)
        jobs = [
            (str(manifest.shard_path(i)), min_size, shard.num_samples)
            for i, shard in enumerate(manifest.shards)
        ]
        names = [shard.path for shard in manifest.shards]
    else:
        paths, declared = find_shards(source)
        jobs = [(str(p), min_size, declared[p].num_samples if p in declared else None) for p in paths]
        root = Path(os.path.commonpath([p.parent for p in paths]))
        names = [p.relative_to(root).as_posix() for p in paths]
    workers = default_num_workers(len(jobs)) if num_workers is None else num_workers
    bar = tqdm(total=len(jobs), desc="checking shards", unit="shard", disable=not progress)
    results = []
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            results.append(_check_job(job))
            bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=workers) as executor:
            for result in executor.map(_check_job, jobs):
                results.append(result)
                bar.update(1)
    bar.close()
    for name, result in zip(names, results):
        result.path = name
    report = CheckReport(shards=results, min_size=min_size)
    for shard in report.broken:
        logger.error("shard %s: %s", shard.path, shard.status())
    return report
