"""Where a dataset's shards are and what their writers declared; `index_shards` writes manifest.json.

A shard source is a directory (its `*.tar`, sorted), a brace/glob pattern, a wids `shardindex.json`, or
several of these joined by `::` (one dataset, in that order; as open_clip's --train-data). Sample counts
are read from the tars (with their sha256) or, for datasets too large to read, taken from what their
writers left next to them: img2dataset's `<shard>_stats.json` ("successes") or a wids index
("shardlist": [{"url", "nsamples"}]).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from engine.data.manifest import (
    COUNT_FROM_STATS,
    COUNT_FROM_WIDS,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    Manifest,
    ShardEntry,
)
from engine.data.parallel import map_shards
from engine.data.samples import TarSamples, describe_error

logger = logging.getLogger(__name__)

SOURCE_SEPARATOR = "::"  # joins several shard patterns into one dataset, as open_clip's --train-data
STATS_SUFFIX = "_stats.json"  # img2dataset writes <shard>_stats.json next to <shard>.tar
WIDS_INDEX_NAME = "shardindex.json"


@dataclass(frozen=True)
class DeclaredCount:
    """A shard's sample count as its writer recorded it (not read from the tar), and where it was found."""

    num_samples: int
    source: str
    origin: str  # the file that declared it
    num_bytes: int | None = None


def _count_samples(path: Path) -> tuple[int, int, str]:
    """Read a tar once: (num_samples, num_bytes, sha256); ValueError if it is not a readable tar."""
    tar = TarSamples(path, keep=lambda position: False, checksum=True)
    for _ in tar:
        pass
    if tar.error is not None:
        raise ValueError(f"shard {path} is not a readable tar ({describe_error(tar.error)})") from tar.error
    assert tar.num_bytes is not None and tar.sha256 is not None
    return tar.num_started, tar.num_bytes, tar.sha256


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
    counted = map_shards(
        _count_samples, to_read, num_workers=num_workers, desc="reading shards", progress=progress
    )
    scanned = dict(zip(to_read, counted))
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
    """Shard counts of a wids `shardindex.json`, in order; urls resolve against `base_path` or its folder.

    Every shard must resolve (lexically, so shard files may be symlinks) inside the index's folder: a `../` or
    absolute `url` or `base_path` is refused, as `shards index` writes its manifest beside the shards.
    """
    path = Path(os.path.abspath(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ValueError(f"wids index {path} is not valid JSON ({exn})") from exn
    shardlist = data.get("shardlist") if isinstance(data, dict) else None
    if type(shardlist) is not list:
        raise ValueError(f"wids index {path} has no 'shardlist' list")
    base_path = data.get("base_path")
    folder = path.parent
    base = Path(os.path.normpath(folder / base_path)) if isinstance(base_path, str) else folder
    inside = f"must be a relative path inside the index's folder {folder} (no '..', not absolute); move " \
             f"{path.name} into the folder above its shards"
    if not base.is_relative_to(folder):
        raise ValueError(f"wids index {path}: base_path {base_path!r} resolves to {base}, which {inside}")
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
        elif not (shard := Path(os.path.normpath(base / url))).is_relative_to(folder):
            problems.append(f"shardlist[{i}].url {url!r} resolves to {shard}, outside the index's folder")
        else:
            counts[shard] = DeclaredCount(nsamples, COUNT_FROM_WIDS, str(path), filesize)
    if problems:
        escaping = any("outside the index's folder" in problem for problem in problems)
        raise ValueError(f"wids index {path}: " + "; ".join(problems[:5])
                         + (f"; every url {inside}" if escaping else ""))
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
    duplicates = [p for p, n in Counter(paths).items() if n > 1]
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
        by_source = Counter(c.source for c in declared.values())
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


def find_manifest(spec: str | os.PathLike) -> Path | None:
    """The manifest `spec` names (a manifest file, or a folder holding `manifest.json`), else None."""
    path = Path(os.fspath(spec))
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return path / MANIFEST_NAME
    data = read_json_object(path)
    return path if data is not None and data.get("format") == MANIFEST_FORMAT else None
