"""DeepSpeed's CPU all-reduce shared-memory buffers in /dev/shm, which DeepSpeed never deletes."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import stat
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SHM_PREFIX = "/dev/shm/deepspeed_allreduce_buffer"


def shm_buffers(master_port: str | int | None = None) -> list[str]:
    """DeepSpeed's CPU all-reduce shared-memory files (of one master port, or all)."""
    pattern = f"{SHM_PREFIX}*" if master_port is None else f"{SHM_PREFIX}*_{master_port}_*"
    return sorted(glob.glob(pattern))


def _mapped_files() -> set[str] | None:
    """Every file some process of this machine has mapped; None if any process could not be read."""
    mapped: set[str] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or entry.name == "1":  # the init process runs no job
            continue
        try:
            with open(f"/proc/{entry.name}/maps") as fh:
                mapped.update(line.split(maxsplit=5)[5].strip() for line in fh if line.count(" ") >= 5
                              and "/dev/shm/" in line)
        except FileNotFoundError:
            continue  # exited meanwhile
        except OSError:
            return None  # another user's process: cannot tell what it maps
    return mapped


def remove_stale_shm_buffers(*, min_age_s: float = 60.0) -> list[str]:
    """Remove DeepSpeed CPU all-reduce buffers no live process maps (left by killed jobs); returns them.

    Only regular files are buffers: a folder or link that merely carries the name is left alone."""
    candidates = []
    for path in shm_buffers():
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue  # removed meanwhile
        if stat.S_ISREG(info.st_mode) and time.time() - info.st_mtime > min_age_s:
            candidates.append(path)
    if not candidates:
        return []
    mapped = _mapped_files()
    if mapped is None:
        return []
    removed = []
    for path in candidates:
        if path not in mapped:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                removed.append(path)
    if removed:
        logger.info("removed %d stale DeepSpeed shared-memory buffer(s) of dead jobs", len(removed))
    return removed


def remove_shm_buffer() -> None:
    """Remove this rank's DeepSpeed CPU all-reduce buffer (DeepSpeed never deletes it)."""
    port, rank = os.environ.get("MASTER_PORT"), os.environ.get("RANK", "0")
    if port is None:
        return
    for path in shm_buffers(port):
        if path.endswith(f"_{port}_{rank}"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def shm_op_build_folder() -> Path | None:
    """The folder DeepSpeed's process-group set-up will compile its shared-memory op into (CPU, first launch:
    ~40 s of silence), or None when the op is prebuilt, already in torch's extension cache, or not used."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")  # as deepspeed.comm's build_shm_op
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False) or installed_ops.get(
            builder.NAME, False):
        return None
    folder = Path(_get_build_directory(builder.NAME, verbose=False))
    return None if (folder / f"{builder.NAME}.so").is_file() else folder
