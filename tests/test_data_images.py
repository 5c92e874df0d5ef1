"""Image decoding in the one validator: every PIL mode to the right 8-bit RGB, and the pixel cap."""

import io
import struct
import warnings
import zlib

import pytest
from PIL import Image

from engine.config import DataConfig
from engine.data import ShardLoader
from engine.data.samples import (
    DEFAULT_MAX_IMAGE_PIXELS,
    SKIP_CORRUPT_IMAGE,
    SKIP_IMAGE_TOO_LARGE,
    DecodedSample,
    Rejection,
    validate_pair,
)
from engine.data.sources import build_manifest
from tests.conftest import write_tar

PALETTE = [10, 20, 30, 200, 100, 50]
WHITE = (255, 255, 255)


def over_white(rgb: tuple[int, ...], alpha: int) -> tuple[int, ...]:
    """A colour with `alpha` (0..255) composited over white, by the plain formula."""
    return tuple(round((c * alpha + 255 * (255 - alpha)) / 255) for c in rgb)


def grey(v: int) -> tuple[int, int, int]:
    return (v, v, v)


# mode -> (pixel values of a 1-pixel-high image, the RGB each must decode to)
MODE_CASES = {
    "1": ([0, 255], [grey(0), grey(255)]),
    "L": ([0, 100, 255], [grey(0), grey(100), grey(255)]),
    "LA": ([(100, 255), (100, 0), (100, 128)], [grey(100), WHITE, over_white(grey(100), 128)]),
    "P": ([0, 1], [(10, 20, 30), (200, 100, 50)]),
    "PA": ([(0, 255), (1, 0), (1, 64)], [(10, 20, 30), WHITE, over_white((200, 100, 50), 64)]),
    "RGB": ([(1, 2, 3), (250, 128, 0)], [(1, 2, 3), (250, 128, 0)]),
    "RGBA": (
        [(200, 100, 50, 255), (200, 100, 50, 0), (200, 100, 50, 128)],
        [(200, 100, 50), WHITE, over_white((200, 100, 50), 128)],
    ),
    # PIL's CMYK -> RGB: channel = (255 - colour) * (255 - K) / 255.
    "CMYK": ([(0, 0, 0, 0), (255, 0, 0, 0), (100, 50, 0, 60)], [WHITE, (0, 255, 255), (119, 157, 195)]),
    # 16 bits: a gradient keeps its gradient, 0..65535 -> 0..255 (PIL's own convert makes it all white).
    "I;16": ([0, 257, 1000, 32896, 65535], [grey(0), grey(1), grey(4), grey(128), grey(255)]),
    # 32-bit integers hold 16-bit values (PNG's 16-bit grey in older PIL): the same scale, clipped.
    "I": ([0, 1000, 32896, 65535, 70000, -5], [grey(0), grey(4), grey(128), grey(255), grey(255), grey(0)]),
    # Floats are 0..1, clipped.
    "F": ([0.0, 0.25, 1.0, 2.0, -1.0], [grey(0), grey(64), grey(255), grey(255), grey(0)]),
}
# Formats that store the mode as it is (TIFF stores them all; PNG is where 16-bit images come from).
MODE_FORMATS = [(mode, "TIFF") for mode in MODE_CASES] + [
    (mode, "PNG") for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")
]


def encoded(mode: str, values: list, fmt: str) -> bytes:
    image = Image.new(mode, (len(values), 1))
    if mode in ("P", "PA"):
        image.putpalette(PALETTE)
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    out = io.BytesIO()
    image.save(out, format=fmt)
    assert Image.open(io.BytesIO(out.getvalue())).mode == mode  # the file really holds that mode
    return out.getvalue()


def decoded_pixels(data: bytes) -> list[tuple[int, ...]]:
    judged = validate_pair(data, b"a caption")
    assert isinstance(judged, DecodedSample), judged
    assert judged.image.mode == "RGB"
    return [judged.image.getpixel((x, 0)) for x in range(judged.image.width)]


@pytest.mark.parametrize(("mode", "fmt"), MODE_FORMATS, ids=[f"{m}-{f}" for m, f in MODE_FORMATS])
def test_every_mode_decodes_to_its_rgb_values(mode, fmt):
    values, expected = MODE_CASES[mode]
    assert decoded_pixels(encoded(mode, values, fmt)) == expected


def test_transparent_palette_entry_and_colour_key_are_composited_over_white():
    image = Image.new("P", (2, 1))
    image.putpalette(PALETTE)
    image.putpixel((1, 0), 1)
    out = io.BytesIO()
    image.save(out, format="PNG", transparency=1)  # tRNS: palette entry 1 is transparent
    assert decoded_pixels(out.getvalue()) == [(10, 20, 30), WHITE]
    rgb = Image.new("RGB", (2, 1), (5, 6, 7))
    rgb.putpixel((1, 0), (1, 2, 3))
    out = io.BytesIO()
    rgb.save(out, format="PNG", transparency=(1, 2, 3))  # tRNS: the colour (1, 2, 3) is transparent
    assert decoded_pixels(out.getvalue()) == [(5, 6, 7), WHITE]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height 8-bit grey whose pixel data is a few bytes of garbage."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"garbage") + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


@pytest.mark.parametrize(
    "side",
    [8193, 10_000, 20_000],  # just over the cap, PIL's warning zone (> 89 Mpx), PIL's error zone (> 179 Mpx)
)
def test_image_over_the_pixel_cap_is_skipped_from_its_header_whatever_pil_thinks(side):
    assert DEFAULT_MAX_IMAGE_PIXELS == 8192 * 8192
    limit = Image.MAX_IMAGE_PIXELS
    data = png_header_only(side, 8192)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning: the cap decides, not PIL
        judged = validate_pair(data, b"caption")
    assert judged == Rejection(
        SKIP_IMAGE_TOO_LARGE,
        f" ({side} x 8192 = {side * 8192} pixels > max_image_pixels {DEFAULT_MAX_IMAGE_PIXELS})",
    )
    # Under a higher cap the image is decoded, and its garbage pixel data is what rejects it, not PIL's limit.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        judged = validate_pair(data, b"caption", max_image_pixels=side * 8192)
    assert judged.reason == SKIP_CORRUPT_IMAGE and "DecompressionBomb" not in judged.detail
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's own setting is left as it was


def test_pixel_cap_is_inclusive_and_checked_after_the_caption():
    out = io.BytesIO()
    Image.new("RGB", (8, 4)).save(out, format="PNG")
    assert isinstance(validate_pair(out.getvalue(), b"c", max_image_pixels=32), DecodedSample)
    assert validate_pair(out.getvalue(), b"c", max_image_pixels=31).reason == SKIP_IMAGE_TOO_LARGE
    assert validate_pair(out.getvalue(), b" ", max_image_pixels=31).reason == "empty caption"


def test_loader_skips_images_over_its_cap_and_the_config_validates_it(tmp_path, tokenizer, transform):
    members = []
    for key, side in (("k0", 8), ("k1", 16), ("k2", 9)):
        out = io.BytesIO()
        Image.new("RGB", (side, side)).save(out, format="PNG")
        members += [(f"{key}.png", out.getvalue()), (f"{key}.txt", b"caption")]
    shard = write_tar(tmp_path / "shard-000000.tar", members)
    manifest = build_manifest([shard], root=tmp_path)
    loader = ShardLoader(
        manifest, batch_size=1, image_transform=transform, tokenizer=tokenizer, max_image_pixels=100
    )
    assert {key for batch in loader.epoch(0) for key in batch.keys} == {"k0", "k2"}  # 16 x 16 > 100
    assert dict(loader.skipped) == {"shard-000000.tar": {SKIP_IMAGE_TOO_LARGE: 1}}
    with pytest.raises(ValueError, match="max_image_pixels must be at least 1"):
        ShardLoader(
            manifest, batch_size=1, image_transform=transform, tokenizer=tokenizer, max_image_pixels=0
        )
    assert DataConfig().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    assert any("data.max_image_pixels must be >= 1" in e for e in DataConfig(max_image_pixels=0).errors())
