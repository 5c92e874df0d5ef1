"""Build webdataset tar shards (`<key>.<jpg|png|webp>` + `<key>.txt`) and their manifest from local data."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from webdataset import TarWriter

from engine.manifest import MANIFEST_NAME, Manifest, build_manifest

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
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
