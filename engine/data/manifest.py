"""The shard manifest: which tar shards make up a dataset, how many samples each holds, their checksums.

Every training sample owns one row of the u table. Its row is the number of samples in earlier shards
(in manifest order) plus its raw position in its own tar, counted before any decoding, so the rows stay
put when a sample later turns out to be corrupt.

Counts come from reading each tar once (with its sha256) or from the counts their writers left next to
them (img2dataset stats, a wids index; see `sources.py`). Such shards are recorded with their count
source and without a checksum, and `Manifest.verify(checksums=True)` refuses to vouch for them.
The fingerprint and the JSON layout key u tables and checkpoints: they must not change.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from engine.io import write_json_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tuneclip-shard-manifest"
MANIFEST_VERSION = 1
REINDEX_HINT = "re-run `python run.py shards index <dir>`"

COUNT_FROM_TAR = "tar"
COUNT_FROM_STATS = "img2dataset-stats"
COUNT_FROM_WIDS = "wids-index"
COUNT_SOURCES = (COUNT_FROM_TAR, COUNT_FROM_STATS, COUNT_FROM_WIDS)


@dataclass(frozen=True)
class ShardEntry:
    """One tar shard: path relative to the manifest's directory, sample count, size in bytes, sha256 hex.

    `count_source` says where `num_samples` came from (COUNT_SOURCES); `sha256` is "" when the tar was
    not read (counts from img2dataset stats or a wids index).
    """

    path: str
    num_samples: int
    num_bytes: int
    sha256: str
    count_source: str = COUNT_FROM_TAR

    @property
    def has_checksum(self) -> bool:
        return bool(self.sha256)


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
            if shard.count_source not in COUNT_SOURCES:
                problems.append(f"shard {i} ({shard.path}): count_source must be one of {COUNT_SOURCES}")
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

    @property
    def checksums_available(self) -> bool:
        """Whether every shard has a sha256 (False when counts came from stats files or a wids index)."""
        return all(shard.has_checksum for shard in self.shards)

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
            "checksums": self.checksums_available,
            "shards": [
                {
                    "path": s.path,
                    "num_samples": s.num_samples,
                    "num_bytes": s.num_bytes,
                    "sha256": s.sha256,
                    "count_source": s.count_source,
                }
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
        # indent=1, keys in insertion order: the bytes manifests have always had.
        return write_json_atomic(path, self.to_json(), indent=1, sort_keys=False)

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
        shards = [
            ShardEntry(
                **{name: item[name] for name in _SHARD_FIELDS},
                count_source=item.get("count_source", COUNT_FROM_TAR),
            )
            for item in data["shards"]
        ]
        manifest = cls(root=path.parent, shards=shards)
        escaping = [(i, s.path) for i, s in enumerate(shards)
                    if not Path(os.path.normpath(manifest.root / s.path)).is_relative_to(manifest.root)]
        if escaping:
            i, shard_path = escaping[0]
            raise ValueError(
                f"manifest {path}: shards[{i}].path {shard_path!r} escapes the manifest's folder {manifest.root}"
                + (f" (and {len(escaping) - 1} more)" if len(escaping) > 1 else "")
                + f"; shard paths must be relative paths inside it: {REINDEX_HINT}"
            )
        if "fingerprint" in data and data["fingerprint"] != manifest.fingerprint():
            raise ValueError(
                f"manifest {path}: its 'fingerprint' does not match its shard list (edited by hand?); {REINDEX_HINT}"
            )
        return manifest

    def verify(self, *, checksums: bool = False) -> None:
        """Check every shard exists with its recorded size (and sha256 if `checksums`); ValueError lists all.

        With `checksums`, shards indexed without reading (no sha256) are an error too: their bytes cannot
        be vouched for.
        """
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
            if checksums and shard.has_checksum:
                digest = file_sha256(path)
                if digest != shard.sha256:
                    problems.append(
                        f"shard {shard.path} has sha256 {digest}, the manifest says {shard.sha256}"
                    )
        unchecked = [shard.path for shard in self.shards if not shard.has_checksum] if checksums else []
        if not problems and not unchecked:
            return
        message = f"manifest {self.root / MANIFEST_NAME} does not match its shards: " + "; ".join(problems)
        if problems:
            message += (
                f". If the shards changed on purpose, {REINDEX_HINT} (this invalidates any u table built "
                "on the old manifest)."
            )
        if unchecked:
            shown = ", ".join(unchecked[:3]) + (" ..." if len(unchecked) > 3 else "")
            sources = sorted({s.count_source for s in self.shards if not s.has_checksum})
            message = (message + " " if problems else f"manifest {self.root / MANIFEST_NAME}: ") + (
                f"checksums are unavailable for {len(unchecked)} shard(s) ({shown}): their counts came from "
                f"{' and '.join(sources)} without reading the tars. Re-index with "
                "`python run.py shards index <dir> --read-tars` to compute them, or verify without checksums."
            )
        raise ValueError(message)


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
        if fields.get("count_source", COUNT_FROM_TAR) not in COUNT_SOURCES:
            problems.append(
                f"shard {i} has count_source {fields['count_source']!r}, not one of {COUNT_SOURCES}"
            )
    return problems


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
