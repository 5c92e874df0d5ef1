"""Encoded test images."""

from __future__ import annotations

import io

from PIL import Image


def image_bytes(color: tuple[int, int, int], fmt: str = "PNG", size: int = 8) -> bytes:
    """A `size` x `size` RGB image of one `color`, encoded as `fmt` (PIL format name)."""
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format=fmt)
    return out.getvalue()


def png_bytes(color: tuple[int, int, int], size: int = 8) -> bytes:
    """`image_bytes` as PNG."""
    return image_bytes(color, "PNG", size)
