"""The shard manifest: which tar shards make up a dataset, how many samples each holds, and their checksums.

Every training sample owns one row of the u table. Its row is the number of samples in earlier shards
(in manifest order) plus its raw position in its own tar, counted before any decoding, so the rows stay
put when a sample later turns out to be corrupt.

Sample counts come from reading each tar once (with its sha256), or, for datasets too large to read, from
the counts their writers left next to them: img2dataset's `<shard>_stats.json` ("successes") or a wids
`shardindex.json` ("shardlist": [{"url", "nsamples"}]). Such shards are recorded with their count source
and without a checksum, and `Manifest.verify(checksums=True)` refuses to vouch for them.
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
from concurrent.futures import ProcessPoolExecutor
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
SOURCE_SEPARATOR = "::"  # joins several shard patterns into one dataset, as open_clip's --train-data
STATS_SUFFIX = "_stats.json"  # img2dataset writes <shard>_stats.json next to <shard>.tar
WIDS_INDEX_NAME = "shardindex.json"

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
class DeclaredCount:
    """A shard's sample count as its writer recorded it (not read from the tar), and where it was found."""

    num_samples: int
    source: str
    origin: str  # the file that declared it
    num_bytes: int | None = None


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
        shards = [
            ShardEntry(
                **{name: item[name] for name in _SHARD_FIELDS},
                count_source=item.get("count_source", COUNT_FROM_TAR),
            )
            for item in data["shards"]
        ]
        manifest = cls(root=path.parent, shards=shards)
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
                digest = _file_sha256(path)
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


def _scan_shards(paths: list[Path], *, num_workers: int, progress: bool) -> list[tuple[int, int, str]]:
    """`_scan_shard` over `paths` in order, in `num_workers` processes (inline for one)."""
    bar = tqdm(total=len(paths), desc="reading shards", unit="shard", disable=not progress)
    if num_workers <= 1 or len(paths) <= 1:
        results = []
        for path in paths:
            results.append(_scan_shard(path))
            bar.update(1)
        bar.close()
        return results
    executor = ProcessPoolExecutor(max_workers=num_workers)
    try:
        results = []
        for result in executor.map(
            _scan_shard, paths, chunksize=max(1, min(16, len(paths) // (8 * num_workers)))
        ):
            results.append(result)
            bar.update(1)
    finally:
        # A failing shard ends the indexing: do not wait for the rest to be read.
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return results


def default_num_workers(num_jobs: int) -> int:
    """Processes for reading `num_jobs` shards: one per CPU core, at most 16, at most one per shard."""
    return max(1, min(num_jobs, os.cpu_count() or 1, 16))


def build_manifest(
    shard_paths: Iterable[str | os.PathLike],
    *,
    root: str | os.PathLike,
    progress: bool = False,
    declared: dict[Path, DeclaredCount] | None = None,
    num_workers: int | None = None,
) -> Manifest:
    """Manifest of the shards in the given order, paths relative to `root`.

    Shards in `declared` (absolute path -> count) are not read: their size comes from the file system
    and they get no checksum. The others are read once each, in `num_workers` processes (default: one
    per core), for sample count, size and sha256.
    """
    root = Path(os.path.abspath(root))
    declared = declared or {}
    paths = [Path(os.path.abspath(p)) for p in shard_paths]
    for path in paths:
        if not path.is_relative_to(root):
            raise ValueError(f"shard {path} is outside the manifest directory {root}; keep shards under it")
        if not path.is_file():
            raise ValueError(f"shard {path} does not exist")
    to_read = [path for path in paths if path not in declared]
    workers = default_num_workers(len(to_read)) if num_workers is None else num_workers
    scanned = dict(zip(to_read, _scan_shards(to_read, num_workers=workers, progress=progress)))
    entries = []
    for path in paths:
        relative = path.relative_to(root).as_posix()
        if path in scanned:
            num_samples, num_bytes, sha256 = scanned[path]
            entry = ShardEntry(relative, num_samples, num_bytes, sha256)
        else:
            count = declared[path]
            num_bytes = path.stat().st_size
            if count.num_bytes is not None and count.num_bytes != num_bytes:
                raise ValueError(
                    f"shard {path} has {num_bytes} bytes, {count.origin} says {count.num_bytes}; the index "
                    "is stale: re-create it, or index with --read-tars"
                )
            entry = ShardEntry(relative, count.num_samples, num_bytes, "", count.source)
        if entry.num_samples == 0:
            logger.warning("shard %s holds no samples (%s)", path, entry.count_source)
        entries.append(entry)
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


def read_json_object(path: Path) -> dict | None:
    """The JSON object in `path` if it is a readable .json file holding one, else None."""
    if path.suffix != ".json" or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _is_wids_index(path: Path) -> bool:
    data = read_json_object(path)
    return data is not None and "wids_version" in data and "shardlist" in data


def read_wids_index(path: str | os.PathLike) -> dict[Path, DeclaredCount]:
    """Shard counts of a wids `shardindex.json`, in order; urls resolve against `base_path` or its folder."""
    path = Path(os.path.abspath(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ValueError(f"wids index {path} is not valid JSON ({exn})") from exn
    shardlist = data.get("shardlist") if isinstance(data, dict) else None
    if type(shardlist) is not list:
        raise ValueError(f"wids index {path} has no 'shardlist' list")
    base_path = data.get("base_path")
    base = path.parent / base_path if isinstance(base_path, str) else path.parent
    counts: dict[Path, DeclaredCount] = {}
    problems = []
    for i, item in enumerate(shardlist):
        url = item.get("url") if isinstance(item, dict) else None
        nsamples = item.get("nsamples") if isinstance(item, dict) else None
        filesize = item.get("filesize") if isinstance(item, dict) else None
        if not isinstance(url, str) or type(nsamples) is not int or nsamples < 0:
            problems.append(f"entry {i} needs a string 'url' and an integer 'nsamples' >= 0")
        elif "://" in url:
            problems.append(f"entry {i} url {url!r} is remote; index local copies of the shards")
        elif filesize is not None and type(filesize) is not int:
            problems.append(f"entry {i} has a non-integer 'filesize'")
        else:
            shard = Path(os.path.normpath(base / url))
            counts[shard] = DeclaredCount(nsamples, COUNT_FROM_WIDS, str(path), filesize)
    if problems:
        raise ValueError(f"wids index {path}: " + "; ".join(problems[:5]))
    return counts


def read_stats_count(shard: str | os.PathLike) -> DeclaredCount | None:
    """The sample count img2dataset recorded for `shard` (`successes` in `<stem>_stats.json`), if any."""
    shard = Path(shard)
    stats = shard.with_name(shard.stem + STATS_SUFFIX)
    if not stats.is_file():
        return None
    try:
        data = json.loads(stats.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ValueError(f"{stats} is not valid JSON ({exn}); delete it or index with --read-tars") from exn
    successes = data.get("successes") if isinstance(data, dict) else None
    if type(successes) is not int or successes < 0:
        raise ValueError(f"{stats}: 'successes' must be an integer >= 0, got {successes!r}")
    return DeclaredCount(successes, COUNT_FROM_STATS, str(stats))


def find_shards(spec: str | os.PathLike) -> tuple[list[Path], dict[Path, DeclaredCount]]:
    """Shards named by `spec`, in order, with the counts their writers declared.

    `spec`: a directory (its `*.tar`, sorted), a brace/glob pattern, a wids index JSON, or several of
    these joined by `::` (one dataset, in that order). Declared counts come from a wids `shardindex.json`
    (given, or in a shard's folder) or else img2dataset `<stem>_stats.json` files.
    """
    paths: list[Path] = []
    wids: dict[Path, DeclaredCount] = {}
    for part in os.fspath(spec).split(SOURCE_SEPARATOR):
        if not part:
            raise ValueError(f"shard source {spec!r} has an empty part between '{SOURCE_SEPARATOR}'")
        if Path(part).is_dir():
            found = sorted(Path(os.path.abspath(part)).glob("*.tar"))
            if not found:
                raise ValueError(f"no *.tar shards in {os.path.abspath(part)}")
        elif _is_wids_index(Path(part)):
            index = read_wids_index(part)
            wids.update(index)
            found = list(index)
            missing = [p for p in found if not p.is_file()]
            if missing:
                raise ValueError(f"wids index {part}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
        else:
            found = _expand_shard_pattern(part)
            if not found:
                raise ValueError(f"shard pattern {part!r} matches no files")
        paths.extend(Path(os.path.abspath(p)) for p in found)
    duplicates = [p for p, n in _count(paths).items() if n > 1]
    if duplicates:
        raise ValueError(
            f"shard source {spec!r} names {duplicates[0]} (and {len(duplicates) - 1} more) twice"
        )
    for folder in dict.fromkeys(p.parent for p in paths):
        if (folder / WIDS_INDEX_NAME).is_file():
            for shard, count in read_wids_index(folder / WIDS_INDEX_NAME).items():
                wids.setdefault(shard, count)
    declared: dict[Path, DeclaredCount] = {}
    for path in paths:
        count = wids.get(path) or read_stats_count(path)
        if count is not None:
            declared[path] = count
    return paths, declared


def _count(paths: list[Path]) -> dict[Path, int]:
    counts: dict[Path, int] = {}
    for path in paths:
        counts[path] = counts.get(path, 0) + 1
    return counts


def index_shards(
    directory_or_pattern: str | os.PathLike, *, read_tars: bool = False, num_workers: int | None = None
) -> Manifest:
    """Index the shards of `find_shards(spec)`; write `manifest.json` in their common folder.

    Declared counts (img2dataset stats, wids index) are used without reading the tars unless `read_tars`;
    the other shards are read in parallel.
    """
    paths, declared = find_shards(directory_or_pattern)
    if read_tars:
        declared = {}
    root = Path(os.path.commonpath([p.parent for p in paths]))
    manifest = build_manifest(paths, root=root, progress=True, declared=declared, num_workers=num_workers)
    manifest.save(root / MANIFEST_NAME)
    if declared:
        by_source = _count([Path(c.source) for c in declared.values()])
        logger.info(
            "took the counts of %s without reading those tars (no checksums)",
            ", ".join(f"{n} shard(s) from {source}" for source, n in by_source.items()),
        )
    logger.info(
        "indexed %d shards, %d samples; wrote %s",
        manifest.num_shards,
        manifest.num_samples,
        root / MANIFEST_NAME,
    )
    return manifest
