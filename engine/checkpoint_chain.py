"""Checkpoint folders on disk: their COMPLETE markers, whether a folder and the earlier folders its parts' deltas
apply on are intact, and the purge that trims folders kept only for those deltas.

A folder kept only because a kept checkpoint requires it (the u table's base or an earlier delta) is trimmed to the
files of the parts saved as deltas: its COMPLETE marker is first replaced atomically by one that lists only those
files and names the parts (`trimmed_to`; the same id, which later markers' `requires` match), then every other file
is deleted. A crash between the two leaves a folder whose marker lists what it keeps, plus files the next purge
deletes. A trimmed folder is a link of a chain, never a checkpoint to resume, evaluate, export or reuse.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from engine.io import write_json_atomic

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TRIMMED = "trimmed_to"  # COMPLETE key of a trimmed folder: the parts (sub-folders) it keeps


def read_marker(path: Path) -> dict:
    """The COMPLETE marker of folder `path` ({} when absent or unreadable)."""
    try:
        marker = json.loads((Path(path) / COMPLETE).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def inside(name: str) -> bool:
    """Whether relative file name `name` stays inside its folder (no absolute path, no `..`)."""
    return bool(name) and not os.path.isabs(name) and ".." not in Path(name).parts


def step_folders(root: Path) -> list[Path]:
    """The `step_*` folders of `root`, oldest step first (by number: names outgrow their padding)."""
    folders = [p for p in Path(root).glob("step_*") if p.name.removeprefix("step_").isdigit()]
    return sorted(folders, key=lambda p: int(p.name.removeprefix("step_")))


def required_folders(path: Path) -> dict[str, str]:
    """The earlier checkpoint folders (name -> their COMPLETE id) checkpoint `path` needs to be read."""
    required = read_marker(path).get("requires", {})
    return required if isinstance(required, dict) else {}


def trimmed_parts(path: Path) -> list[str]:
    """The parts a trimmed folder `path` keeps (empty: the folder is not trimmed)."""
    parts = read_marker(path).get(TRIMMED)
    return [p for p in parts if isinstance(p, str)] if isinstance(parts, list) else []


def is_trimmed(path: Path) -> bool:
    return bool(trimmed_parts(path))


def checkpoint_problems(path: Path, *, chain: bool = True) -> list[str]:
    """Why `path` is not a usable checkpoint (empty list: complete, every file at its written size, and with
    `chain` every folder it requires likewise, as it was when `path` was saved). A trimmed folder counts as
    intact when the files it keeps are (`is_trimmed` tells that it is no checkpoint of its own)."""
    marker = path / COMPLETE
    if not marker.exists():
        return [f"no {COMPLETE} marker (interrupted while saving)"]
    try:
        expected = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return [f"unreadable {COMPLETE} marker"]
    if not isinstance(expected, dict) or not all(
            isinstance(name, str) and inside(name) and isinstance(size, int) for name, size in expected.items()):
        return [f"unreadable {COMPLETE} marker (not a mapping of the folder's file names to sizes)"]
    problems = []
    for name, size in expected.items():
        file = path / name
        if not file.exists():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes, {size} were written")
    if chain and not problems:
        problems = chain_problems(path)
    return problems


def chain_problems(path: Path) -> list[str]:
    """Which earlier folders checkpoint `path` requires are missing, damaged or saved again since."""
    problems = []
    for name, marker_id in required_folders(path).items():
        other = path.parent / str(name)
        if not inside(str(name)) or not other.is_dir():
            problems.append(f"needs {name} (the u table's base or an earlier delta), which is missing")
            continue
        theirs = checkpoint_problems(other, chain=False)
        if theirs:
            problems.append(f"needs {name}, which is damaged ({theirs[0]})")
        elif read_marker(other).get("id") != marker_id:
            problems.append(f"needs {name}, which was saved again since")
    return problems


def trimmed_message(path: Path) -> str:
    """The refusal of trimmed folder `path` as a checkpoint, naming the whole ones of its run."""
    whole = [p.name for p in step_folders(path.parent) if not is_trimmed(p) and not checkpoint_problems(p)]
    instead = (f"use a whole checkpoint of that run instead ({', '.join(whole)}; the newest is `latest`)" if whole
               else "no whole checkpoint of that run is left")
    kept = ", ".join(f"{part}/" for part in trimmed_parts(path))
    return (f"{path} was trimmed to the u table chain (it keeps only {kept}, which later checkpoints' deltas apply "
            f"on): it cannot be resumed, evaluated, exported or reused; {instead}, or for OSR statistics the last "
            "checkpoint of a `run.py osr` run")


def trim(folder: Path, parts: list[str]) -> None:
    """Reduce checkpoint folder `folder` to the files of `parts` (crash-safe: marker first, then deletion)."""
    marker = read_marker(folder)
    if not marker.get(TRIMMED):
        files = {name: size for name, size in marker["files"].items() if Path(name).parts[0] in parts}
        write_json_atomic(folder / COMPLETE, {**marker, "files": files, TRIMMED: sorted(parts)}, indent=1)
    kept = {COMPLETE, *trimmed_parts(folder)}
    for entry in sorted(folder.iterdir()):
        if entry.name not in kept:
            _delete(entry)


def _delete(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def purge(root: Path, *, keep_last_n: int, chain_parts: list[str]) -> None:
    """Keep the last `keep_last_n` whole complete checkpoints of `root`; the folders they require are trimmed to
    `chain_parts` (kept whole when none is given), other older ones and trimmed folders nothing needs removed."""
    folders = step_folders(root)
    whole = [p for p in folders if not is_trimmed(p) and not checkpoint_problems(p)]
    kept = whole[-keep_last_n:]
    needed = {name for folder in kept for name in required_folders(folder)}  # bases and deltas they apply on
    for old in folders:
        if old in kept or not (old in whole or is_trimmed(old)):
            continue  # a damaged folder is left for the user to look at
        if old.name not in needed:
            shutil.rmtree(old, ignore_errors=True)
        elif chain_parts:
            trim(old, chain_parts)
    for leftover in (*Path(root).glob(".partial-*"), *Path(root).glob(".old-*")):
        shutil.rmtree(leftover, ignore_errors=True)
