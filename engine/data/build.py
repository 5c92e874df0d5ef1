"""`shards build`: webdataset tar shards (`<key>.<jpg|png|webp>` + `<key>.txt`) and their manifest from
local data (a `filepath,caption` CSV or a folder of images with .txt captions).

Each pair is judged by the loader's own validator (`samples.validate_pair`), so a pair that is
written is one the loader uses, and a pair that is skipped is skipped for the reason the loader gives.
Samples are keyed by their number, not their file names, so dots in names cannot split a pair.

Only files inside the source folder (the CSV's folder) are read: a path that leaves it (`../`, absolute, or a
symlink whose target is elsewhere) is skipped unread and counted as `outside source`, so a planted
`caption.txt -> ~/.ssh/id_rsa` never reaches a shard. Skipped, not fatal, like every other unusable pair:
one stray row does not stop a large build, and the warning names the file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from webdataset import TarWriter

from engine.csvfile import csv_rows
from engine.data.manifest import MANIFEST_NAME, Manifest
from engine.data.samples import (
    CAPTION_EXTENSION,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_MEMBER_BYTES,
    IMAGE_ERRORS,
    SKIP_CORRUPT_IMAGE,
    SKIP_MEMBER_TOO_LARGE,
    Rejection,
    open_image,
    validate_pair,
)
from engine.data.sources import build_manifest
from engine.io import atomic_path

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# PIL format name -> member extension written into the shard.
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_EXT_FORMAT = {ext: fmt for fmt, ext in _FORMAT_EXT.items()}
# Why a source pair is skipped before any of its files is read (the loader's reasons are in samples.py).
SKIP_OUTSIDE_SOURCE = "outside source"


@dataclass
class _SourceItem:
    """One (image, caption) pair to write; `caption` is None when the caption file is missing.

    `refused`: why none of its files may be read (one resolves outside the source folder), else None.
    """

    name: str
    image_path: Path
    caption: bytes | None
    refused: Rejection | None = None


def outside_source(path: Path, root: Path) -> Rejection | None:
    """SKIP_OUTSIDE_SOURCE when `path`, symlinks followed, is not inside `root` (a resolved folder)."""
    real = Path(os.path.realpath(path))
    if real.is_relative_to(root):
        return None
    return Rejection(SKIP_OUTSIDE_SOURCE, f" ({path} resolves to {real}, outside the source folder {root}; "
                                          "copy the file into it, or put the CSV in the folder above the images)")


def parse_csv_separator(text: str) -> str:
    """The one-character column separator `text` names: ',' ';' '|', or a tab as '\\t', 'tab' or a tab itself."""
    separator = {"\\t": "\t", "tab": "\t", "comma": ","}.get(text.lower(), text)
    if len(separator) != 1 or separator in "\"\r\n":
        raise ValueError(f"--csv-separator {text!r} must be one character (',', ';', '|') or '\\t' / 'tab' for TSV")
    return separator


def _items_from_csv(csv_path: Path, *, separator: str = ",", img_key: str = "filepath",
                    caption_key: str = "caption") -> Iterator[_SourceItem]:
    # surrogateescape keeps undecodable bytes so one bad row is skipped instead of failing the file.
    with open(csv_path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter=separator)
        found = [name for name in (reader.fieldnames or []) if name is not None]
        missing = [key for key in (img_key, caption_key) if key not in found]
        if missing:
            flags = {img_key: "--csv-img-key", caption_key: "--csv-caption-key"}
            shown = {"\t": "tab"}.get(separator, separator)
            raise ValueError(
                f"{csv_path}: no column {' or '.join(repr(key) for key in missing)} in the header (columns found "
                f"with separator {shown!r}: {', '.join(repr(name) for name in found) or 'none'}); name the "
                f"columns with {' / '.join(flags[key] for key in missing)}, or the separator with --csv-separator"
            )
        root = Path(os.path.realpath(csv_path.parent))
        for line, row in enumerate(csv_rows(reader, csv_path), start=2):
            filepath = (row[img_key] or "").strip()
            caption = row[caption_key]
            image_path = csv_path.parent / filepath
            yield _SourceItem(
                name=f"{csv_path}:{line} ({filepath})",
                image_path=image_path,
                caption=None if caption is None else caption.encode("utf-8", errors="surrogateescape"),
                refused=outside_source(image_path, root),
            )


def _items_from_folder(folder: Path, *, max_member_bytes: int) -> Iterator[_SourceItem]:
    root = Path(os.path.realpath(folder))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    image_stems = {p.with_suffix("") for p in images}
    for path in files:
        if path.suffix == ".txt" and path.with_suffix("") not in image_stems:
            refused = outside_source(path, root)
            caption = None if refused else _read_file(path, max_member_bytes=max_member_bytes)
            yield _SourceItem(name=str(path), image_path=path.with_suffix(""), caption=caption, refused=refused)
    for path in images:
        caption_path = path.with_suffix(".txt")
        refused = outside_source(path, root) or (outside_source(caption_path, root) if caption_path.is_file()
                                                  else None)
        caption = (_read_file(caption_path, max_member_bytes=max_member_bytes)
                   if caption_path.is_file() and not refused else None)
        if isinstance(caption, Rejection):
            caption, refused = None, caption
        yield _SourceItem(name=str(path), image_path=path, caption=caption, refused=refused)


def _read_file(path: Path, *, max_member_bytes: int) -> bytes | Rejection | None:
    """The file's bytes; None when there is no such file, b"" (undecodable) when it cannot be read,
    SKIP_MEMBER_TOO_LARGE (unread) when it is larger than a shard member may be."""
    if not path.is_file():
        return None
    try:
        size = path.stat().st_size
        if size > max_member_bytes:
            return Rejection(SKIP_MEMBER_TOO_LARGE, f" ({path} has {size} bytes > max_member_bytes {max_member_bytes})")
        return path.read_bytes()
    except OSError as exn:
        logger.debug("cannot read %s: %s", path, exn)
        return b""


def _encode_image(data: bytes, rgb: Image.Image, image_ext: str | None) -> tuple[str, bytes]:
    """(member extension, bytes) of a validated image (`rgb`: its RGB decoding), re-encoded if need be."""
    with open_image(data) as image:
        fmt = image.format
        target = image_ext or _FORMAT_EXT.get(fmt, "png")
        if _FORMAT_EXT.get(fmt) == target:
            return target, data
        out = io.BytesIO()
        if _EXT_FORMAT[target] == "JPEG":
            rgb.save(out, format="JPEG")
        else:
            image.load()
            image.save(out, format=_EXT_FORMAT[target])
        return target, out.getvalue()


def shard_key(index: int) -> str:
    """Key of the `index`-th sample written: its number, unique and without a dot whatever the source's
    file names (webdataset's key ends at the first dot, so `a.b.jpg` + `a.b.txt` would be parts of `a`)."""
    return f"{index:09d}"


class _ShardSequenceWriter:
    """Writes `shard-NNNNNN.tar` files of `samples_per_shard` samples, each moved into place when complete."""

    def __init__(self, out_dir: Path, samples_per_shard: int):
        self.out_dir = out_dir
        self.samples_per_shard = samples_per_shard
        self.paths: list[Path] = []
        self._open_shard: ExitStack | None = None
        self._writer: TarWriter | None = None
        self._count = 0

    def write(self, key: str, ext: str, image: bytes, caption: str, *, source: str) -> None:
        """One sample; `source` (its original file name, which may hold dots) goes into its `.json`."""
        if self._writer is None:
            self._open()
        assert self._writer is not None
        self._writer.write({"__key__": key, ext: image, CAPTION_EXTENSION: caption.encode("utf-8"),
                            "json": json.dumps({"source": source}, ensure_ascii=False).encode("utf-8")})
        self._count += 1
        if self._count == self.samples_per_shard:
            self.close()

    def _open(self) -> None:
        path = self.out_dir / f"shard-{len(self.paths):06d}.tar"
        stack = ExitStack()
        tmp = stack.enter_context(atomic_path(path))
        file = stack.enter_context(open(tmp, "wb"))  # noqa: SIM115 -- the stack closes it
        # Fixed mtime: the same source gives byte-identical shards (and sha256).
        self._writer = stack.enter_context(TarWriter(file, encoder=False, mtime=0))
        self._open_shard = stack
        self.paths.append(path)
        self._count = 0

    def close(self) -> None:
        """Finish the open shard, if any, and move it to its final name."""
        if self._open_shard is not None:
            stack, self._open_shard, self._writer = self._open_shard, None, None
            stack.close()

    def abort(self, exn: BaseException) -> None:
        """Drop the half-written shard."""
        if self._open_shard is not None:
            stack, self._open_shard, self._writer = self._open_shard, None, None
            stack.__exit__(type(exn), exn, exn.__traceback__)
            self.paths.pop()


def build_shards(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    image_ext: str | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    csv_separator: str = ",",
    csv_img_key: str = "filepath",
    csv_caption_key: str = "caption",
) -> tuple[Manifest, dict[str, Any]]:
    """Write shards + `manifest.json` to `out_dir` from a `filepath,caption` CSV or an image/.txt folder.

    A CSV's separator and column names are open_clip_train's `--csv-separator` (a TSV: '\\t'),
    `--csv-img-key` and `--csv-caption-key`.

    Images stay in their own bytes when JPEG, PNG or WebP (other formats become PNG) unless `image_ext`
    ("jpg" | "png" | "webp") asks for one format. Images of more than `max_image_pixels` pixels are
    skipped, as the loader with that cap skips them; image and caption files larger than `max_member_bytes`
    are skipped unread, as are files outside the source folder (see the module docstring). Returns
    (manifest, report); the report holds
    `num_written`, `num_skipped`, `skipped_by_reason` {reason: count} and `skipped` [{source, reason}].
    """
    source = Path(source)
    out_dir = Path(out_dir)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if max_member_bytes < 1:
        raise ValueError(f"max_member_bytes must be at least 1, got {max_member_bytes}")
    if image_ext is not None and image_ext not in _EXT_FORMAT:
        raise ValueError(f"image_ext must be one of {sorted(_EXT_FORMAT)} or None, got {image_ext!r}")
    if source.is_dir():
        items = _items_from_folder(source, max_member_bytes=max_member_bytes)
    elif source.is_file():
        items = _items_from_csv(source, separator=parse_csv_separator(csv_separator), img_key=csv_img_key,
                                caption_key=csv_caption_key)
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
            data = None if item.refused else _read_file(item.image_path, max_member_bytes=max_member_bytes)
            if item.refused or isinstance(data, Rejection):
                judged = item.refused or data
            else:
                judged = validate_pair(data, item.caption, max_image_pixels=max_image_pixels)
            if not isinstance(judged, Rejection):
                assert data is not None
                try:
                    ext, image = _encode_image(data, judged.image, image_ext)
                except IMAGE_ERRORS as exn:
                    judged = Rejection(SKIP_CORRUPT_IMAGE, f" (re-encoding: {type(exn).__name__}: {exn})")
            if isinstance(judged, Rejection):
                logger.warning("skipping %s: %s%s", item.name, judged.reason, judged.detail)
                skipped.append({"source": item.name, "reason": judged.reason})
                continue
            writer.write(shard_key(num_written), ext, image, judged.caption,
                         source=os.path.relpath(item.image_path, source if source.is_dir() else source.parent))
            num_written += 1
        writer.close()
    except BaseException as exn:
        writer.abort(exn)
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
