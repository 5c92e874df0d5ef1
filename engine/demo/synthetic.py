"""Synthetic image-caption data (coloured shapes on noisy backgrounds), rendered locally for demos and tests.

Each image shows one shape with four attributes: colour, shape, size and position. Captions
describe them with synonyms and varied word order; some captions name only part of the
attributes, so several images fit one caption (natural false negatives for contrastive losses).
"""

from __future__ import annotations

import csv
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 225),
    "yellow": (240, 215, 40),
    "purple": (140, 50, 175),
    "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
# Shape radius as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.15, "large": 0.25}
# Shape centre (x, y) as fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}

COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "red", "crimson"),
    "green": ("green", "green", "emerald"),
    "blue": ("blue", "blue", "cobalt"),
    "yellow": ("yellow", "yellow", "golden"),
    "purple": ("purple", "purple", "violet"),
    "orange": ("orange", "orange", "amber"),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "circle", "round shape", "disc", "dot"),
    "square": ("square", "square", "box", "block"),
    "triangle": ("triangle", "triangle", "three-sided shape", "wedge"),
    "cross": ("cross", "cross", "plus sign", "plus shape"),
    "diamond": ("diamond", "diamond", "rhombus", "lozenge"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left", "on the left side", "to the left"),
    "right": ("on the right", "at the right", "on the right side", "to the right"),
    "top": ("near the top", "at the top", "in the upper part"),
    "bottom": ("near the bottom", "at the bottom", "in the lower part"),
    "center": ("in the center", "in the middle", "at the centre"),
}
POSITION_TAGS: dict[str, tuple[str, ...]] = {
    "left": ("left side", "left"),
    "right": ("right side", "right"),
    "top": ("top", "upper part"),
    "bottom": ("bottom", "lower part"),
    "center": ("center", "middle"),
}

# Full captions name all four attributes; fields: size, color, shape, pos (phrase), tag (short).
FULL_CAPTIONS: tuple[str, ...] = (
    "a {size} {color} {shape} {pos}",
    "{color} {shape}, {tag}",
    "there is a {size} {color} {shape} {pos}",
    "{pos}, a {size} {color} {shape}",
    "a {color} {shape} that is {size}, {pos}",
    "{tag}: {size} {color} {shape}",
    "a picture of a {size} {color} {shape} {pos}",
    "{size} {shape}, colored {color}, {pos}",
    "a {shape} {pos}, {size} and {color}",
)
# Partial captions leave attributes out, so they fit many images.
PARTIAL_CAPTIONS: tuple[str, ...] = (
    "a {color} shape",
    "something {color}",
    "a {shape}",
    "a {size} {shape}",
    "a {color} object {pos}",
    "a {shape} {pos}",
)
ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "a picture of the {c}.",
    "the {c}.",
    "a drawing of the {c}.",
    "there is one {c} in the image.",
    "{c}",
)


@dataclass(frozen=True)
class ShapeSpec:
    """What one synthetic image shows."""

    color: str
    shape: str
    size: str
    position: str


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def random_spec(
    rng: np.random.Generator,
    *,
    color: str | None = None,
    shape: str | None = None,
    colors: Sequence[str] | None = None,
) -> ShapeSpec:
    """A uniformly random spec; `color`/`shape` fix those attributes when given, `colors` limits the colour."""
    return ShapeSpec(
        color=color or _pick(rng, list(colors or COLORS)),
        shape=shape or _pick(rng, SHAPES),
        size=_pick(rng, list(SIZES)),
        position=_pick(rng, list(POSITIONS)),
    )


def describe(
    spec: ShapeSpec, rng: np.random.Generator, *, partial: bool = False, template: str | None = None
) -> str:
    """One caption of `spec`: a random full (or, with `partial`, partial) template with random synonyms."""
    if template is None:
        template = _pick(rng, PARTIAL_CAPTIONS if partial else FULL_CAPTIONS)
    text = template.format(
        size=_pick(rng, SIZE_WORDS[spec.size]),
        color=_pick(rng, COLOR_WORDS[spec.color]),
        shape=_pick(rng, SHAPE_WORDS[spec.shape]),
        pos=_pick(rng, POSITION_PHRASES[spec.position]),
        tag=_pick(rng, POSITION_TAGS[spec.position]),
    )
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def render_image(spec: ShapeSpec, rng: np.random.Generator, *, image_size: int = 32) -> Image.Image:
    """An RGB `image_size` square image of `spec` on a tinted, graded, noisy background."""
    side = image_size
    base = rng.integers(70, 185) + rng.integers(-20, 21, size=3)
    ramp = np.linspace(-0.5, 0.5, side)
    gradient = rng.uniform(-40, 40) * ramp[None, :, None] + rng.uniform(-40, 40) * ramp[:, None, None]
    noise = rng.normal(0.0, rng.uniform(3.0, 15.0), size=(side, side, 3))
    image = Image.fromarray(np.clip(base + gradient + noise, 0, 255).astype(np.uint8))

    fx, fy = POSITIONS[spec.position]
    jitter = 0.04 * side
    cx = fx * side + rng.uniform(-jitter, jitter)
    cy = fy * side + rng.uniform(-jitter, jitter)
    r = SIZES[spec.size] * side * rng.uniform(0.9, 1.1)
    fill = tuple(
        int(v) for v in np.clip(np.array(COLORS[spec.color]) + rng.integers(-15, 16, size=3), 0, 255)
    )
    _draw_shape(ImageDraw.Draw(image), spec.shape, cx, cy, r, fill)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        half = 0.8 * r
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - 0.95 * r, cy + 0.8 * r), (cx + 0.95 * r, cy + 0.8 * r)], fill=fill)
    elif shape == "cross":
        arm = 0.35 * r
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _check_args(*, image_size: int, colors: Sequence[str] | None = None, **counts: int) -> None:
    errors = [f"{name} must be greater than 0, got {value}" for name, value in counts.items() if value <= 0]
    if colors is not None and (not colors or set(colors) - set(COLORS)):
        errors.append(f"colors must be a non-empty subset of {list(COLORS)}, got {list(colors)}")
    if image_size < 16:
        errors.append(
            f"image_size must be at least 16 pixels for shapes to be recognisable, got {image_size}"
        )
    if errors:
        raise ValueError("; ".join(errors))


def _write_csv(path: Path, header: tuple[str, str], rows: list[tuple[str, str | int]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def render_pairs(
    out_dir: str | Path,
    *,
    num_samples: int,
    seed: int,
    image_size: int = 32,
    split_name: str = "train",
    partial_caption_prob: float = 0.2,
    colors: Sequence[str] | None = None,
) -> Path:
    """Render `num_samples` image-caption pairs into `out_dir/split_name/`; returns its `captions.csv`.

    The CSV has header `filepath,caption` with paths relative to it. Output is a function of
    (seed, split_name, colors), so equal seeds still give different splits; `colors` (default: all)
    are the only colours drawn, so a split can lack what another one has.
    """
    _check_args(image_size=image_size, colors=colors, num_samples=num_samples)
    if not 0.0 <= partial_caption_prob <= 1.0:
        raise ValueError(f"partial_caption_prob must be in [0, 1], got {partial_caption_prob}")
    split_dir = Path(out_dir) / split_name
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, zlib.crc32(split_name.encode())])
    rows = []
    for i in range(num_samples):
        spec = random_spec(rng, colors=colors)
        filepath = f"images/{i:06d}.png"
        render_image(spec, rng, image_size=image_size).save(split_dir / filepath)
        rows.append((filepath, describe(spec, rng, partial=bool(rng.random() < partial_caption_prob))))
    csv_path = split_dir / "captions.csv"
    _write_csv(csv_path, ("filepath", "caption"), rows)
    return csv_path


def zeroshot_classnames() -> list[str]:
    """Class names of the synthetic zero-shot task: every colour-shape pair, e.g. "red circle"."""
    return [f"{color} {shape}" for color in COLORS for shape in SHAPES]


def render_zeroshot_task(
    out_dir: str | Path,
    *,
    num_per_class: int,
    seed: int,
    image_size: int = 32,
    colors: Sequence[str] | None = None,
) -> tuple[Path, Path, Path]:
    """Render a balanced colour-shape classification task; returns (CSV, classnames, templates) paths.

    Writes `synthetic-zeroshot.csv` (`filepath,label`, label = class index), `classnames.txt`,
    `templates.txt` and images under `synthetic-zeroshot/`, all inside `out_dir`. Images show only the
    classes of `colors` (default: all), while the classifier still chooses among every colour-shape pair.
    """
    _check_args(image_size=image_size, colors=colors, num_per_class=num_per_class)
    out_dir = Path(out_dir)
    (out_dir / "synthetic-zeroshot").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, zlib.crc32(b"synthetic-zeroshot")])
    classnames = zeroshot_classnames()
    shown = [label for label, name in enumerate(classnames) if colors is None or name.split(" ")[0] in colors]
    rows = []
    for i in range(num_per_class * len(shown)):
        label = shown[i % len(shown)]
        color, shape = classnames[label].split(" ")
        filepath = f"synthetic-zeroshot/{i:06d}.png"
        render_image(random_spec(rng, color=color, shape=shape), rng, image_size=image_size).save(
            out_dir / filepath
        )
        rows.append((filepath, label))
    csv_path = out_dir / "synthetic-zeroshot.csv"
    _write_csv(csv_path, ("filepath", "label"), rows)
    classnames_path = out_dir / "classnames.txt"
    classnames_path.write_text("\n".join(classnames) + "\n", encoding="utf-8")
    templates_path = out_dir / "templates.txt"
    templates_path.write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n", encoding="utf-8")
    return csv_path, classnames_path, templates_path


def render_retrieval_task(
    out_dir: str | Path,
    *,
    num_images: int,
    seed: int,
    image_size: int = 32,
    colors: Sequence[str] | None = None,
) -> Path:
    """Render `num_images` images of `colors` (default: all) with 2 full captions each; returns
    `out_dir/synthetic-retrieval.csv`.

    The CSV has header `filepath,caption`, two consecutive rows per image; images go under
    `out_dir/synthetic-retrieval/`.
    """
    _check_args(image_size=image_size, colors=colors, num_images=num_images)
    out_dir = Path(out_dir)
    (out_dir / "synthetic-retrieval").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, zlib.crc32(b"synthetic-retrieval")])
    rows = []
    for i in range(num_images):
        spec = random_spec(rng, colors=colors)
        filepath = f"synthetic-retrieval/{i:06d}.png"
        render_image(spec, rng, image_size=image_size).save(out_dir / filepath)
        first, second = rng.choice(len(FULL_CAPTIONS), size=2, replace=False)
        rows.append((filepath, describe(spec, rng, template=FULL_CAPTIONS[first])))
        rows.append((filepath, describe(spec, rng, template=FULL_CAPTIONS[second])))
    csv_path = out_dir / "synthetic-retrieval.csv"
    _write_csv(csv_path, ("filepath", "caption"), rows)
    return csv_path
