"""Throughput a user can read: samples/s per device, the model's FLOPs per sample and model FLOP utilisation.

The FLOPs are counted once per run by torch's `FlopCounterMode` on the job's architecture built on the meta
device (no memory, no values, nothing of the training model touched): one forward and backward of both towers
on one image and one caption (matrix products and attention, as MFU counts them; the loss and elementwise work
are not counted, nor recomputation under gradient checkpointing). MFU = FLOPs per sample x samples/s per device
/ the device's peak at the model's precision, where the device is in `PEAK_TFLOPS` (dense, no sparsity); elsewhere
(CPUs, unlisted GPUs) it is left out rather than guessed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Dense peak TFLOP/s per device family (vendor data sheets; SXM parts; fp32 without TF32) by model precision.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
}


def device_peak_flops(device: torch.device, precision: str) -> tuple[str, float | None]:
    """The device's name and its dense peak FLOP/s at `precision` (None where not in `PEAK_TFLOPS`)."""
    if device.type != "cuda":
        return device.type, None
    name = torch.cuda.get_device_name(device)
    key = "bf16" if "bf16" in precision else "fp16" if "fp16" in precision else "fp32"
    for family, peaks in PEAK_TFLOPS.items():
        if family in name.upper():
            return name, peaks[key] * 1e12
    return name, None


def model_flops_per_sample(model_name: str, **build_kwargs) -> float:
    """Forward + backward FLOPs of one image-caption pair through `model_name` (counted on the meta device);
    counted once per architecture, file version and build arguments in a process (a second of CPU each)."""
    path = Path(model_name)
    key = (model_name, path.stat().st_mtime_ns if path.exists() else None,
           json.dumps(build_kwargs, sort_keys=True, default=repr))
    if key not in _COUNTED:
        _COUNTED[key] = _count_flops(model_name, build_kwargs)
    return _COUNTED[key]


_COUNTED: dict[tuple, float] = {}


def _count_flops(model_name: str, build_kwargs: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from models.meta import build_model_on_meta

    model = build_model_on_meta(model_name, **build_kwargs).model
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    images = torch.zeros(1, 3, *size, device="meta")
    texts = torch.zeros(1, model.context_length, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        image_features = model.encode_image(images)
        text_features = model.encode_text(texts)
        (image_features.sum() + text_features.sum()).backward()
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class Throughput:
    """What turns a measured rate (samples/s over all ranks) into per-device figures and MFU."""

    world_size: int
    flops_per_sample: float | None  # None: not countable for this architecture
    device_name: str
    peak_flops: float | None  # per device; None: unknown

    @classmethod
    def for_job(cls, model_name: str, build_kwargs: dict, *, precision: str, device: torch.device,
                world_size: int) -> Throughput:
        try:
            flops = model_flops_per_sample(model_name, **build_kwargs)
        except (RuntimeError, NotImplementedError, ValueError, TypeError, AttributeError) as error:
            # an architecture the meta build or the counter cannot run: no MFU, not a failed run
            logger.info("FLOPs per sample not counted for %s (%s): no MFU", model_name, error)
            flops = None
        name, peak = device_peak_flops(device, precision)
        return cls(world_size=world_size, flops_per_sample=flops, device_name=name, peak_flops=peak)

    def per_device(self, samples_per_s: float) -> dict[str, float]:
        """`samples_per_s_per_device`, and `mfu` (0..1) where FLOPs and the device's peak are known."""
        rate = samples_per_s / self.world_size
        out = {"samples_per_s_per_device": rate}
        if self.flops_per_sample and self.peak_flops:
            out["mfu"] = self.flops_per_sample * rate / self.peak_flops
        return out

    def describe(self) -> dict:
        """The run log's record of what MFU is computed from."""
        return {"flops_per_sample": self.flops_per_sample, "device": self.device_name, "peak_flops": self.peak_flops,
                "world_size": self.world_size}
