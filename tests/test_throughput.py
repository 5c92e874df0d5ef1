"""Throughput figures: FLOPs per sample against a hand count, per-device rates and MFU, their place in a run."""

import json
from pathlib import Path

import pytest
import torch

from engine.run.throughput import PEAK_TFLOPS, Throughput, device_peak_flops, model_flops_per_sample


def vit_clip_flops(cfg: dict) -> int:
    """Forward + backward matmul FLOPs of one image-caption pair through an open_clip ViT CLIP, counted by hand:
    2 per multiply-add; backward twice the forward, except the patch convolution (no gradient for the image)."""
    v, t, embed = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]

    def tower(tokens: int, width: int, heads: int, layers: int) -> int:
        linear = tokens * width * (3 * width + width + 2 * 4 * width)  # qkv, out proj, MLP (ratio 4)
        attention = 2 * heads * tokens * tokens * (width // heads)  # q k^T and attn v
        return 2 * layers * (linear + attention)

    patches = (v["image_size"] // v["patch_size"]) ** 2
    conv = 2 * patches * 3 * v["patch_size"] ** 2 * v["width"]
    forward = (conv + tower(patches + 1, v["width"], v["width"] // v["head_width"], v["layers"])
               + tower(t["context_length"], t["width"], t["heads"], t["layers"])
               + 2 * v["width"] * embed + 2 * t["width"] * embed)  # the two projections (one token each)
    return 3 * forward - conv


def test_flops_per_sample_equal_a_hand_count_for_the_tiny_vit():
    with open(Path(__file__).resolve().parents[1] / "models" / "configs" / "tiny-vit.json") as f:
        cfg = json.load(f)
    assert model_flops_per_sample("tiny-vit") == vit_clip_flops(cfg) == 31_753_728


def test_per_device_rate_and_mfu():
    known = Throughput(world_size=4, flops_per_sample=2e9, device_name="NVIDIA H100 80GB HBM3", peak_flops=1e12)
    assert known.per_device(800.0) == {"samples_per_s_per_device": 200.0, "mfu": pytest.approx(0.4)}
    unknown = Throughput(world_size=2, flops_per_sample=2e9, device_name="cpu", peak_flops=None)
    assert unknown.per_device(10.0) == {"samples_per_s_per_device": 5.0}  # no peak: no MFU, never a guess


def test_device_peaks_only_for_listed_gpus():
    assert device_peak_flops(torch.device("cpu"), "bf16") == ("cpu", None)
    assert set(PEAK_TFLOPS) == {"A100", "H100", "H200", "L40S"}
    assert all(peaks["bf16"] > peaks["fp32"] for peaks in PEAK_TFLOPS.values())
