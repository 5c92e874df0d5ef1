"""DeepSpeed ZeRO backend (registered as run.backend=deepspeed), one job per file.

- `config`: the DeepSpeed config dict (ZeRO file + the engine's batch and AdamW settings)
- `backend`: `DeepSpeedBackend`, the model and AdamW under ZeRO 1/2/3
- `vetting`: a checkpoint folder checked before DeepSpeed unpickles it; the frozen parameters' fp32 file
- `universal`: a checkpoint converted for another world size
- `shm`: the CPU all-reduce buffers DeepSpeed leaves in /dev/shm
"""

from engine.backends.deepspeed.backend import CHECKPOINT_TAG, FROZEN_FILE, UNIVERSAL_TAG, DeepSpeedBackend
from engine.backends.deepspeed.config import DEFAULT_ZERO_CONFIG, ZERO_STAGES, build_deepspeed_config
from engine.backends.deepspeed.shm import (
    SHM_PREFIX,
    remove_shm_buffer,
    remove_stale_shm_buffers,
    shm_buffers,
    shm_op_build_folder,
)
from engine.backends.deepspeed.universal import convert_to_universal
from engine.backends.deepspeed.vetting import checkpoint_names, read_frozen_values, vet_checkpoint_folder

__all__ = [
    "CHECKPOINT_TAG", "DEFAULT_ZERO_CONFIG", "FROZEN_FILE", "SHM_PREFIX", "UNIVERSAL_TAG", "ZERO_STAGES",
    "DeepSpeedBackend", "build_deepspeed_config", "checkpoint_names", "convert_to_universal", "read_frozen_values",
    "remove_shm_buffer", "remove_stale_shm_buffers", "shm_buffers", "shm_op_build_folder", "vet_checkpoint_folder",
]
