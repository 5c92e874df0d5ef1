"""The shard manifest: which tar shards make up a dataset, how many samples each holds, and their checksums.

Every training sample owns one row of the u table. Its row is the number of samples in earlier shards
(in manifest order) plus its raw position in its own tar, counted before any decoding, so the rows stay
put when a sample later turns out to be corrupt.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, Any

import braceexpand
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext, tar_file_iterator

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tuneclip-shard-manifest"
MANIFEST_VERSION = 1
REINDEX_HINT = "re-run `python run.py shards index <dir>`"


@dataclass(frozen=True)
class ShardEntry:
    """One tar shard: path relative to the manifest's directory, sample count, size in bytes, sha256 hex."""

    path: str
    num_samples: int
    num_bytes: int
    sha256: str


def sample_key(member_name: str) -> str | None:
    """Key of the sample a tar member belongs to (name up to the first dot of its basename), as webdataset."""
    key, _ = base_plus_ext(member_name)
    return key


def iter_sample_keys(member_names: Iterable[str]) -> Iterator[str]:
    """Yield one key per sample: consecutive members with the same key form one sample."""
    current = None
    for name in member_names:
        key = sample_key(name)
        if key is None or key == current:
            continue
        current = key
        yield key


@dataclass(frozen=True)
class Manifest:
    """An ordered list of shards under `root`; addresses every sample by a global row index."""

    root: Path
    shards: list[ShardEntry]

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(os.path.abspath(self.root)))
        problems = []
        seen = set()
        for i, shard in enumerate(self.shards):
            if shard.num_samples < 0 or shard.num_bytes < 0:
                problems.append(f"shard {i} ({shard.path}): negative num_samples or num_bytes")
            if shard.path in seen:
                problems.append(f"shard {i} ({shard.path}): listed twice")
            seen.add(shard.path)
        if problems:
            raise ValueError("invalid manifest: " + "; ".join(problems))

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @cached_property
    def offsets(self) -> list[int]:
        """Cumulative sample counts: shard i holds rows offsets[i] .. offsets[i+1]-1; len = num_shards+1."""
        offsets = [0]
        for shard in self.shards:
            offsets.append(offsets[-1] + shard.num_samples)
        return offsets

    @property
    def num_samples(self) -> int:
        return self.offsets[-1]

    def row(self, shard_index: int, position: int) -> int:
        """Global u-table row of the sample at raw `position` in shard `shard_index`."""
        if not 0 <= shard_index < self.num_shards:
            raise IndexError(f"shard index {shard_index} out of range for {self.num_shards} shards")
        if not 0 <= position < self.shards[shard_index].num_samples:
            raise IndexError(
                f"position {position} out of range for shard {self.shards[shard_index].path} "
                f"with {self.shards[shard_index].num_samples} samples"
            )
        return self.offsets[shard_index] + position

    def shard_path(self, i: int) -> Path:
        """Absolute, normalised path of shard `i`; ValueError if it points outside the manifest's root."""
        # Normalised lexically (not resolve()) so shard files may be symlinks into other storage.
        path = Path(os.path.normpath(self.root / self.shards[i].path))
        if not path.is_relative_to(self.root):
            raise ValueError(
                f"shard {i} path {self.shards[i].path!r} escapes the manifest directory {self.root}; "
                "shard paths must be relative paths inside it"
            )
        return path

    def fingerprint(self) -> str:
        """sha256 hex over the ordered (path, num_samples, num_bytes, sha256) list; ignores `root`."""
        payload = json.dumps([[s.path, s.num_samples, s.num_bytes, s.sha256] for s in self.shards])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "num_samples": self.num_samples,
            "fingerprint": self.fingerprint(),
            "shards": [
                {"path": s.path, "num_samples": s.num_samples, "num_bytes": s.num_bytes, "sha256": s.sha256}
                for s in self.shards
            ],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the manifest as JSON to `path` (in `root`) atomically; return the path."""
        path = Path(os.path.abspath(path))
        if path.parent != self.root:
            raise ValueError(
                f"manifest for {self.root} must be saved in that directory (shard paths are relative "
                f"to it), not at {path}"
            )
        text = json.dumps(self.to_json(), indent=1) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        """Read a manifest written by `save`; the shards are resolved against the file's directory."""
        path = Path(os.path.abspath(path))
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.exists():
            raise FileNotFoundError(
                f"manifest {path} not found; create it with `python run.py shards index <dir>`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exn:
            raise ValueError(f"manifest {path} is not valid JSON ({exn}); {REINDEX_HINT}") from exn
        problems = _json_problems(data)
        if problems:
            raise ValueError(f"manifest {path}: " + "; ".join(problems) + f"; {REINDEX_HINT}")
        shards = [ShardEntry(**{name: item[name] for name in _SHARD_FIELDS}) for item in data["shards"]]
        manifest = cls(root=path.parent, shards=shards)
        if "fingerprint" in data and data["fingerprint"] != manifest.fingerprint():
            raise ValueError(
                f"manifest {path}: its 'fingerprint' does not match its shard list (edited by hand?); {REINDEX_HINT}"
            )
        return manifest

    def verify(self, *, checksums: bool = False) -> None:
        """Check every shard exists with its recorded size (and sha256 if `checksums`); ValueError lists all."""
        problems = []
        for i, shard in enumerate(self.shards):
            path = self.shard_path(i)
            if not path.is_file():
                problems.append(f"shard {shard.path} is missing ({path})")
                continue
            size = path.stat().st_size
            if size != shard.num_bytes:
                problems.append(f"shard {shard.path} has {size} bytes, the manifest says {shard.num_bytes}")
                continue
            if checksums:
                digest = _file_sha256(path)
                if digest != shard.sha256:
                    problems.append(
                        f"shard {shard.path} has sha256 {digest}, the manifest says {shard.sha256}"
                    )
        if problems:
            raise ValueError(
                f"manifest {self.root / MANIFEST_NAME} does not match its shards: "
                + "; ".join(problems)
                + f". If the shards changed on purpose, {REINDEX_HINT} (this invalidates any u table built "
                "on the old manifest)."
            )


_SHARD_FIELDS = {"path": str, "num_samples": int, "num_bytes": int, "sha256": str}


def _json_problems(data: Any) -> list[str]:
    """Everything wrong with a parsed manifest file, as messages; empty when it is usable."""
    shards = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(shards, list):
        return ["no 'shards' list"]
    problems = []
    if data.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
        problems.append(f"not a shard manifest (format {data.get('format')!r})")
    if data.get("version", MANIFEST_VERSION) != MANIFEST_VERSION:
        problems.append(f"version {data.get('version')!r}, this engine reads version {MANIFEST_VERSION}")
    for i, item in enumerate(shards):
        fields = item if isinstance(item, dict) else {}
        missing = [name for name in _SHARD_FIELDS if name not in fields]
        if missing:
            problems.append(f"shard {i} lacks field(s) {', '.join(missing)}")
            continue
        wrong = [name for name, kind in _SHARD_FIELDS.items() if type(fields[name]) is not kind]
        if wrong:
            problems.append(f"shard {i} has mistyped field(s) {', '.join(wrong)}")
    return problems


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


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        reader.drain()
    return reader.digest.hexdigest()


def _raise(exn: Exception) -> bool:
    raise exn


def _scan_shard(path: Path) -> tuple[int, int, str]:
    """Read a tar once: (num_samples, num_bytes, sha256)."""
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        try:
            members = tar_file_iterator(reader, handler=_raise)
            num_samples = sum(1 for _ in iter_sample_keys(member["fname"] for member in members))
        except Exception as exn:
            raise ValueError(f"shard {path} is not a readable tar ({type(exn).__name__}: {exn})") from exn
        reader.drain()
    return num_samples, reader.num_bytes, reader.digest.hexdigest()


def build_manifest(
    shard_paths: Iterable[str | os.PathLike], *, root: str | os.PathLike, progress: bool = False
) -> Manifest:
    """Count samples, size and sha256 of each shard (one read each), in the given order, relative to `root`."""
    root = Path(os.path.abspath(root))
    entries = []
    paths = [Path(os.path.abspath(p)) for p in shard_paths]
    for path in tqdm(paths, desc="indexing shards", unit="shard", disable=not progress):
        if not path.is_relative_to(root):
            raise ValueError(f"shard {path} is outside the manifest directory {root}; keep shards under it")
        if not path.is_file():
            raise ValueError(f"shard {path} does not exist")
        num_samples, num_bytes, sha256 = _scan_shard(path)
        if num_samples == 0:
            logger.warning("shard %s holds no samples", path)
        entries.append(ShardEntry(path.relative_to(root).as_posix(), num_samples, num_bytes, sha256))
    return Manifest(root=root, shards=entries)


_GLOB_CHARS = re.compile(r"[*?\[]")


def _expand_shard_pattern(pattern: str) -> list[Path]:
    paths: list[Path] = []
    missing = []
    for item in braceexpand.braceexpand(pattern):
        if _GLOB_CHARS.search(item):
            paths.extend(Path(p) for p in sorted(glob.glob(item)))
        elif Path(item).is_file():
            paths.append(Path(item))
        else:
            missing.append(item)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"shard pattern {pattern!r}: {len(missing)} file(s) not found: {shown}")
    return list(dict.fromkeys(paths))


def index_shards(directory_or_pattern: str | os.PathLike) -> Manifest:
    """Index all `*.tar` in a directory (sorted) or a brace/glob pattern; write `manifest.json` next to them."""
    spec = os.fspath(directory_or_pattern)
    if Path(spec).is_dir():
        root = Path(os.path.abspath(spec))
        paths = sorted(root.glob("*.tar"))
        if not paths:
            raise ValueError(f"no *.tar shards in {root}")
    else:
        paths = _expand_shard_pattern(spec)
        if not paths:
            raise ValueError(f"shard pattern {spec!r} matches no files")
        root = Path(os.path.commonpath([os.path.abspath(p.parent) for p in paths]))
    manifest = build_manifest(paths, root=root, progress=True)
    manifest.save(root / MANIFEST_NAME)
    logger.info(
        "indexed %d shards, %d samples; wrote %s",
        manifest.num_shards,
        manifest.num_samples,
        root / MANIFEST_NAME,
    )
    return manifest
