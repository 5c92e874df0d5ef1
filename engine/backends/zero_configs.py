"""The DeepSpeed ZeRO configs shipped in `zero_configs/`, found by name (`zero2`, `zero3_bf16`, ...) from any folder.

`run.zero_config` is a shipped name or a JSON file; a path is relative to the working directory, as every
other path of a job is. Light on purpose: the config's validation resolves it before anything heavy loads.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ZERO_CONFIG_NAME = "zero2"
# The repository's zero_configs/ folder, beside the engine package (a source checkout or `pip install -e .`).
SHIPPED_ZERO_CONFIGS = Path(__file__).resolve().parents[2] / "zero_configs"


def shipped_zero_configs() -> dict[str, Path]:
    """Name (file stem) -> file of every shipped ZeRO config; empty where the folder is not installed."""
    if not SHIPPED_ZERO_CONFIGS.is_dir():
        return {}
    return {path.stem: path for path in sorted(SHIPPED_ZERO_CONFIGS.glob("*.json"))}


def resolve_zero_config(value: str | os.PathLike | None) -> Path:
    """The file `run.zero_config` means: an existing path as given, else a shipped config's name (`zero2`,
    `zero2.json`, `zero_configs/zero2.json`); None = the default (`zero2`). FileNotFoundError names the choices."""
    if value is None or value == "":
        value = DEFAULT_ZERO_CONFIG_NAME
    path = Path(value)
    if path.is_file():
        return path
    shipped = shipped_zero_configs()
    # A bare name, or a repository-relative path given from another folder (`zero_configs/zero2.json`).
    if path.stem in shipped and path.suffix in ("", ".json") and (path.parent == Path(".") or path.parent.name == SHIPPED_ZERO_CONFIGS.name):
        return shipped[path.stem]
    names = ", ".join(shipped) if shipped else f"none: {SHIPPED_ZERO_CONFIGS} is not installed"
    raise FileNotFoundError(f"run.zero_config: {value} is neither a file (paths are relative to the working "
                            f"directory {Path.cwd()}) nor a shipped ZeRO config (names: {names}); give a name "
                            "or a path to a DeepSpeed JSON config")
