"""Conversion of a DeepSpeed checkpoint for another world size (DeepSpeed's universal format)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from engine.safe_load import deepspeed_globals, tensor_only_torch_load

logger = logging.getLogger(__name__)


def convert_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's own converter (ds_to_universal) into a fresh staging folder that replaces `target`; every
    torch.load inside it is weights_only."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))  # new: no symlink
    logger.info("converting %s to a universal checkpoint (world size changed)", source)
    try:
        with tensor_only_torch_load(deepspeed_globals()):
            ds_to_universal(Namespace(input_folder=str(source), output_folder=str(staging), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True))
        if target.is_symlink() or target.is_file():
            target.unlink()  # whatever was there is replaced, never loaded
        elif target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, (ValueError, OSError)):
            raise
        raise ValueError(f"DeepSpeed could not convert {source} for another world size "
                         f"({type(exc).__name__}: {exc}); resume on the world size it was written with") from None
