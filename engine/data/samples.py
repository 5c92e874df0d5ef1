"""The one tar reader and the one sample validator: what a sample is and when it is skipped.

A webdataset shard is a tar whose members are grouped into samples by key (the member name up to the
first dot of its basename); consecutive members with the same key form one sample, numbered 0, 1, ...
in tar order before anything is decoded. That number is the sample's raw position, which fixes its
u-table row. The loader, `shards index`, `shards build` and `shards check` all read and judge samples
here, so they cannot disagree about a bad sample.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

from engine.config import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_MEMBER_BYTES

# Member extensions a sample's image may have, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
# Decoding errors PIL raises for broken image bytes (UnidentifiedImageError is an OSError).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# Header blocks tarfile buffers whole while parsing (long names, pax records): real ones are a few KB.
MAX_HEADER_BYTES = 1024 * 1024

# Why a sample is skipped: one text per reason, wherever it is found.
SKIP_DUPLICATE_MEMBER = "duplicate member"
SKIP_KEY_COLLISION = "key collision"
SKIP_MISSING_IMAGE = "missing image"
SKIP_MISSING_CAPTION = "missing caption"
SKIP_NON_UTF8_CAPTION = "non-UTF-8 caption"
SKIP_EMPTY_CAPTION = "empty caption"
SKIP_IMAGE_TOO_LARGE = "image too large"
SKIP_CORRUPT_IMAGE = "corrupt image"
SKIP_SPARSE_MEMBER = "sparse member"
SKIP_MEMBER_TOO_LARGE = "member too large"
# Why samples of a shard are lost as a whole (skip records without a key).
SKIP_TRUNCATED_SHARD = "truncated shard"
SKIP_EXTRA_SAMPLES = "samples beyond manifest count"

# Members webdataset never hands out as sample parts (tar_file_iterator's skip_meta default).
_META_MEMBER = re.compile(r"__[^/]*__($|/)")
_TAR_END_BYTES = 1024  # a complete tar ends with two zero blocks of 512 bytes


class ReadLimits(NamedTuple):
    """What one sample may cost before it is decoded: `data.max_image_pixels` and `data.max_member_bytes`."""

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES


DEFAULT_LIMITS = ReadLimits()


def read_limits(data) -> ReadLimits:
    """The caps of a job's data section (`cfg.data`), which evaluation applies too."""
    return ReadLimits(data.max_image_pixels, data.max_member_bytes)


class SkipRecord(NamedTuple):
    """One skipped sample (or, with key None, samples of a shard that were not read or not used)."""

    shard: str
    key: str | None
    reason: str


def sample_key(member_name: str) -> str | None:
    """Key of the sample a tar member belongs to (name up to the first dot of its basename), as webdataset."""
    key, _ = base_plus_ext(member_name)
    return key


def _is_meta_member(name: str) -> bool:
    """Whether webdataset's tar_file_iterator drops this member before grouping."""
    if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
        return True
    return _META_MEMBER.match(name) is not None


@dataclass
class RawSample:
    """The undecoded members (extension -> bytes) of the sample at raw `position` of its tar.

    `members`: the member names as in the tar; `duplicate_member`: one extension occurred twice (the later
    bytes are kept); `unread`: why a member was left unread (sparse, or larger than the reader's
    `max_member_bytes`), judged from its header: such a sample is skipped for that reason.
    """

    position: int
    key: str
    parts: dict[str, bytes] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)
    duplicate_member: bool = False
    unread: Rejection | None = None

    def has_image_and_caption(self) -> bool:
        return CAPTION_EXTENSION in self.parts and any(ext in self.parts for ext in IMAGE_EXTENSIONS)


_BUFFERED_HEADERS = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo whose parsing buffers at most MAX_HEADER_BYTES of header data per member.

    tarfile reads long-name and pax header blocks whole and a GNU sparse member's extended map block by
    block before it hands out the member; a compressed tar makes those gigabytes from a few KB. Such a
    header ends the tar as damaged (HeaderError) instead. Webdataset writers never write sparse members.
    """

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # tarfile's per-header hook
        if self.type in _BUFFERED_HEADERS and self.size > MAX_HEADER_BYTES:
            raise tarfile.HeaderError(
                f"header block of {self.size} bytes (type {self.type!r}) > {MAX_HEADER_BYTES}: not a shard's tar"
            )
        if self.type == tarfile.GNUTYPE_SPARSE and self._sparse_structs[1]:
            raise tarfile.HeaderError(f"member {self.name!r} has an extended GNU sparse map: not a shard's tar")
        return super()._proc_member(tarfile_)

    def _proc_gnusparse_10(self, next, pax_headers, tarfile_):  # tarfile's hook, its signature
        # Version 1.0 keeps the sparse map in the member's data, of a length the data itself states.
        raise tarfile.HeaderError(f"member {next.name!r} has a pax 1.0 sparse map: not a shard's tar")


def member_rejection(info: tarfile.TarInfo, *, max_member_bytes: int) -> Rejection | None:
    """Why a member is not read, from its header and sparse map alone (nothing of its data), or None."""
    if info.sparse is not None:
        claimed = max([info.size, *(offset + size for offset, size in info.sparse)])
        return Rejection(
            SKIP_SPARSE_MEMBER,
            f" (member {info.name!r} is sparse, claiming {claimed} bytes; shards hold plain files)",
        )
    if info.size > max_member_bytes:
        return Rejection(
            SKIP_MEMBER_TOO_LARGE,
            f" (member {info.name!r} has {info.size} bytes > data.max_member_bytes {max_member_bytes})",
        )
    return None


class _HashingReader:
    """Read-only file wrapper that hashes and counts every byte read through it."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.digest = hashlib.sha256()
        self.num_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        self.num_bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class TarSamples:
    """One pass over a tar shard: its samples in tar order, then how the reading ended.

    Iterating yields the samples whose raw position `keep` accepts (all by default), each once a
    following member shows it is complete; the members of other samples are not extracted. Reading
    stops at the first error (missing file, damaged tar) instead of raising. Afterwards:

    - `num_started`: samples whose first member was read (its count, for an index);
    - `truncated`: reading stopped on an error, or (with `expected`, the count a manifest states)
      fewer samples were found. The last sample of a truncated tar is handed out only if it holds an
      image and a caption (it may have lost members): `num_whole` counts the samples kept as read;
    - `error`, `end_marker` (the tar ends with its two zero blocks; None when unknown: compressed),
      and with `checksum`, `num_bytes` and `sha256` of the whole file.

    No member is read whose header says it is sparse or larger than `max_member_bytes` (its sample gets
    `unread`), and header blocks tarfile would buffer (long names, pax records, sparse maps) are bounded:
    a tar that claims gigabytes costs no more memory than one that holds kilobytes.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        keep: Callable[[int], bool] | None = None,
        expected: int | None = None,
        checksum: bool = False,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ):
        self.path = Path(path)
        self.keep = keep
        self.expected = expected
        self.checksum = checksum
        self.max_member_bytes = max_member_bytes
        self.num_started = 0
        self.num_whole = 0
        self.error: Exception | None = None
        self.end_marker: bool | None = None
        self.num_bytes: int | None = None
        self.sha256: str | None = None

    @property
    def truncated(self) -> bool:
        return self.error is not None or (self.expected is not None and self.num_started < self.expected)

    def __iter__(self) -> Iterator[RawSample]:
        try:
            file = open(self.path, "rb")  # noqa: SIM115 -- closed below, after the last yield
        except OSError as exn:
            self.error = exn
            return
        with file:
            source = _HashingReader(file) if self.checksum else file
            last = yield from self._samples(source, file)
            if self.checksum and self.error is None:
                source.drain()
                self.num_bytes, self.sha256 = source.num_bytes, source.digest.hexdigest()
            # A truncated tar may have cut its last sample short: keep it only if it is usable.
            last_cut = self.truncated and self.num_started > 0 and not (last and last.has_image_and_caption())
            self.num_whole = self.num_started - last_cut
            if last is not None and not last_cut:
                yield last

    def _samples(self, source: IO[bytes], file: IO[bytes]) -> Iterator[RawSample]:
        """Yield the kept samples but the last started one, which is returned (None when not kept)."""
        pending: RawSample | None = None
        current_key = None
        try:
            with tarfile.open(fileobj=source, mode="r|*", tarinfo=_BoundedTarInfo) as tar:
                for info in tar:
                    tar.members = []  # stream mode: keep no member list
                    if not info.isreg() or _is_meta_member(info.name):
                        continue
                    key = sample_key(info.name)
                    if key is None:
                        continue
                    if key != current_key:
                        if pending is not None:
                            yield pending
                        position = self.num_started
                        self.num_started += 1
                        current_key = key
                        pending = (
                            RawSample(position, key) if self.keep is None or self.keep(position) else None
                        )
                    if pending is None:
                        continue
                    unread = member_rejection(info, max_member_bytes=self.max_member_bytes)
                    if unread is not None:
                        pending.unread = pending.unread or unread
                        pending.members.append(info.name)
                        continue
                    data = tar.extractfile(info).read()
                    suffix = info.name[len(key) + 1 :].lower()
                    pending.duplicate_member |= suffix in pending.parts
                    pending.parts[suffix] = data
                    pending.members.append(info.name)
                if getattr(tar.fileobj, "comptype", "tar") == "tar":
                    tail = os.pread(file.fileno(), _TAR_END_BYTES, tar.offset)
                    self.end_marker = len(tail) == _TAR_END_BYTES and not tail.strip(b"\0")
        except Exception as exn:  # noqa: BLE001 -- a damaged tar ends its shard, whatever tarfile raises
            self.error = exn
        return pending  # the last started sample, if kept: no member follows it


def describe_error(exn: BaseException) -> str:
    """`Type: message` of a reading error, for logs and reports."""
    message = str(getattr(exn, "strerror", None) or (exn.args[0] if exn.args else ""))
    return f"{type(exn).__name__}: {message.splitlines()[0] if message else ''}"


class DecodedSample(NamedTuple):
    """A usable sample: its image converted to RGB and its stripped caption."""

    image: Image.Image
    caption: str


class Rejection(NamedTuple):
    """Why a sample is skipped (a SKIP_* reason), with a detail for the log."""

    reason: str
    detail: str = ""


def check_caption(raw: bytes | None) -> str | Rejection:
    """The stripped caption, or why it is unusable (missing, not UTF-8, empty)."""
    if raw is None:
        return Rejection(SKIP_MISSING_CAPTION)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Rejection(SKIP_NON_UTF8_CAPTION)
    text = text.strip()
    return text if text else Rejection(SKIP_EMPTY_CAPTION)


_PIL_LIMIT_LOCK = threading.Lock()


@contextmanager
def open_image(data: bytes | Path) -> Iterator[Image.Image]:
    """`Image.open` of `data` (bytes, or a file) lazily (the header only) without PIL's own bomb check.

    The caller judges the size against its own cap (`max_image_pixels`, see `pixel_rejection`), so PIL's
    `MAX_IMAGE_PIXELS` (a warning above 89 Mpx, an error above twice that) is off while the header is
    read, then restored.
    """
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with image:
        yield image


# Modes whose values are not 8-bit and the largest value each maps to 255 (I: PNG's 16-bit grey in old PIL).
_HIGH_DEPTH_MAX = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, whatever its mode.

    Transparency (an alpha band, or a palette or colour marked transparent) is composited over white,
    as img2dataset stores the images open_clip models are trained on. 16-bit modes (I;16*, and I as PNG's
    16-bit grey) scale 0..65535 to 0..255, float mode F scales 0..1 to 0..255 (both clipped): PIL's
    own convert("RGB") clips them at 255, which turns a 16-bit image white. Other modes (1, L, P, CMYK,
    YCbCr, ...) convert as PIL does.
    """
    if image.mode in _HIGH_DEPTH_MAX:
        values = np.asarray(image, dtype=np.float64) * (255.0 / _HIGH_DEPTH_MAX[image.mode])
        grey = np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def pixel_rejection(image: Image.Image, *, max_image_pixels: int) -> Rejection | None:
    """SKIP_IMAGE_TOO_LARGE when an opened (not yet decoded) image has more than `max_image_pixels` pixels."""
    width, height = image.size
    if width * height <= max_image_pixels:
        return None
    detail = f" ({width} x {height} = {width * height} pixels > max_image_pixels {max_image_pixels})"
    return Rejection(SKIP_IMAGE_TOO_LARGE, detail)


def validate_pair(
    image: bytes | None,
    caption: bytes | None,
    *,
    duplicate_member: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> DecodedSample | Rejection:
    """Judge one (image bytes, caption bytes) pair; reasons are checked in the order of SKIP_* above.

    An image of more than `max_image_pixels` pixels is rejected from its header, before it is decoded.
    """
    if duplicate_member:
        return Rejection(SKIP_DUPLICATE_MEMBER)
    if image is None:
        return Rejection(SKIP_MISSING_IMAGE)
    text = check_caption(caption)
    if isinstance(text, Rejection):
        return text
    try:
        with open_image(image) as opened:
            too_large = pixel_rejection(opened, max_image_pixels=max_image_pixels)
            if too_large is not None:
                return too_large
            rgb = to_rgb(opened)
    except IMAGE_ERRORS as exn:
        return Rejection(SKIP_CORRUPT_IMAGE, f" ({type(exn).__name__}: {exn})")
    return DecodedSample(rgb, text)


def key_collision(sample: RawSample, missing: set[str]) -> Rejection | None:
    """Why a sample lacks the parts with `missing` extensions though dotted member names end in them, or None.

    webdataset's key is the member name up to the first dot of its basename, so `a.b.jpg` and `a.b.txt`
    are the parts `b.jpg` and `b.txt` of sample `a` (and `a.c.jpg` joins them): no `jpg`, no `txt`.
    """
    dotted = [
        name
        for name in sample.members
        if "." in (suffix := name[len(sample.key) + 1 :]) and suffix.rsplit(".", 1)[1].lower() in missing
    ]
    if not dotted:
        return None
    names = [repr(name) for name in dotted[:3]] + ([f"{len(dotted) - 3} more"] if len(dotted) > 3 else [])
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    shares = "member " + listed + " has" if len(names) == 1 else "members " + listed + " share"
    return Rejection(
        SKIP_KEY_COLLISION,
        f": {shares} key {sample.key!r} under webdataset's first-dot rule "
        "(rename them so that only the extension follows the first dot)",
    )


def decode_sample(
    sample: RawSample, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> DecodedSample | Rejection:
    """The sample's image (first of IMAGE_EXTENSIONS present) and caption (`txt`), or why it is skipped.

    A sample with a member left unread (sparse, too large) is skipped for that reason first; a sample
    without image or caption whose members have dots in their names is a key collision.
    """
    if sample.unread is not None:
        return sample.unread
    image = next((sample.parts[ext] for ext in IMAGE_EXTENSIONS if ext in sample.parts), None)
    caption = sample.parts.get(CAPTION_EXTENSION)
    missing = {
        *(IMAGE_EXTENSIONS if image is None else ()),
        *((CAPTION_EXTENSION,) if caption is None else ()),
    }
    if missing and not sample.duplicate_member:
        collision = key_collision(sample, missing)
        if collision is not None:
            return collision
    return validate_pair(
        image, caption, duplicate_member=sample.duplicate_member, max_image_pixels=max_image_pixels
    )
