import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.demo.synthetic import (
    COLOR_WORDS,
    COLORS,
    SHAPE_WORDS,
    SHAPES,
    ShapeSpec,
    describe,
    render_image,
    render_pairs,
    render_retrieval_task,
    render_zeroshot_task,
    zeroshot_classnames,
)
from engine.evaluate import RetrievalTask, ZeroShotTask


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_render_pairs_is_byte_identical_for_a_seed_and_differs_across_seeds_and_splits(tmp_path):
    same = [folder_bytes(render_pairs(tmp_path / name, num_samples=40, seed=7).parent) for name in ("a", "b")]
    other_seed = folder_bytes(render_pairs(tmp_path / "c", num_samples=40, seed=8).parent)
    other_split = folder_bytes(render_pairs(tmp_path / "d", num_samples=40, seed=7, split_name="val").parent)
    assert len(same[0]) == 41
    assert same[0] == same[1]
    for other in (other_seed, other_split):
        assert other["captions.csv"] != same[0]["captions.csv"]
        assert sum(other[k] != same[0][k] for k in same[0] if k.endswith(".png")) == 40


def test_render_pairs_csv_loads_as_retrieval_task_with_rgb_images(tmp_path):
    csv_path = render_pairs(tmp_path, num_samples=30, seed=0, image_size=48, split_name="val")
    assert csv_path == tmp_path / "val" / "captions.csv"
    task = RetrievalTask.from_csv(csv_path)
    assert len(task.image_paths) == len(task.captions) == 30
    assert task.caption_to_image == list(range(30))
    with Image.open(task.image_paths[0]) as image:
        assert (image.mode, image.size, image.format) == ("RGB", (48, 48), "PNG")


def mentions(caption: str, words: dict[str, tuple[str, ...]]) -> bool:
    return any(re.search(rf"\b{w}\b", caption) for options in words.values() for w in options)


def test_captions_are_varied_and_some_name_only_part_of_the_image(tmp_path):
    captions = RetrievalTask.from_csv(render_pairs(tmp_path, num_samples=400, seed=1)).captions
    no_colour = [c for c in captions if not mentions(c, COLOR_WORDS)]
    no_shape = [c for c in captions if not mentions(c, SHAPE_WORDS)]
    full = [c for c in captions if mentions(c, COLOR_WORDS) and mentions(c, SHAPE_WORDS)]
    assert len(set(captions)) > 300
    assert no_colour and no_shape
    assert 0.6 < len(full) / len(captions) < 0.95
    assert not [c for c in captions if re.search(r"\ba [aeiou]", c)]


def test_render_pairs_without_partial_captions_names_colour_and_shape(tmp_path):
    csv_path = render_pairs(tmp_path, num_samples=100, seed=2, partial_caption_prob=0.0)
    captions = RetrievalTask.from_csv(csv_path).captions
    assert all(mentions(c, COLOR_WORDS) and mentions(c, SHAPE_WORDS) for c in captions)


def test_describe_uses_an_before_vowels():
    rng = np.random.default_rng(0)
    spec = ShapeSpec(color="orange", shape="square", size="large", position="center")
    captions = {describe(spec, rng, template="a {color} thing") for _ in range(30)}
    assert captions == {"an orange thing", "an amber thing"}


@pytest.mark.parametrize("color", list(COLORS))
def test_render_image_paints_the_shape_colour_at_its_position(color):
    spec = ShapeSpec(color=color, shape="square", size="large", position="left")
    image = np.asarray(render_image(spec, np.random.default_rng(3), image_size=32), dtype=int)
    centre = image[16, 9]
    far_corner = image[2, 30]
    assert np.abs(centre - np.array(COLORS[color])).max() <= 15
    assert np.abs(far_corner - np.array(COLORS[color])).max() > 15


def test_zeroshot_task_is_balanced_and_loads(tmp_path):
    csv_path, classnames_path, templates_path = render_zeroshot_task(tmp_path / "a", num_per_class=3, seed=0)
    task = ZeroShotTask.from_csv(csv_path, classnames_path, templates_path)
    assert task.name == "synthetic-zeroshot"
    assert task.classnames == zeroshot_classnames()
    assert len(task.classnames) == len(COLORS) * len(SHAPES)
    assert "red circle" in task.classnames
    assert Counter(task.labels) == {c: 3 for c in range(len(task.classnames))}
    assert len(task.templates) >= 3 and all("{c}" in t for t in task.templates)
    render_zeroshot_task(tmp_path / "b", num_per_class=3, seed=0)
    render_zeroshot_task(tmp_path / "c", num_per_class=3, seed=1)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b") != folder_bytes(tmp_path / "c")


def test_zeroshot_images_show_their_class_colour(tmp_path):
    task = ZeroShotTask.from_csv(*render_zeroshot_task(tmp_path, num_per_class=1, seed=4))
    for path, label in zip(task.image_paths, task.labels, strict=True):
        color = task.classnames[label].split(" ")[0]
        pixels = np.asarray(Image.open(path), dtype=int).reshape(-1, 3)
        distance = np.abs(pixels - np.array(COLORS[color])).max(axis=1)
        assert (distance <= 15).sum() >= 8, path


def test_retrieval_task_has_two_distinct_captions_per_image(tmp_path):
    task = RetrievalTask.from_csv(render_retrieval_task(tmp_path, num_images=20, seed=0))
    assert task.name == "synthetic-retrieval"
    assert len(task.image_paths) == 20
    assert task.caption_to_image == [i // 2 for i in range(40)]
    assert all(task.captions[2 * i] != task.captions[2 * i + 1] for i in range(20))
    assert all(mentions(c, COLOR_WORDS) and mentions(c, SHAPE_WORDS) for c in task.captions)


def test_render_functions_reject_bad_sizes(tmp_path):
    with pytest.raises(
        ValueError, match="num_samples must be greater than 0.*image_size must be at least 16"
    ):
        render_pairs(tmp_path, num_samples=0, seed=0, image_size=8)
    with pytest.raises(ValueError, match="num_per_class must be greater than 0"):
        render_zeroshot_task(tmp_path, num_per_class=0, seed=0)


def test_colors_limit_what_each_renderer_draws_and_all_colours_is_the_default(tmp_path):
    def named(captions):
        return {c for c in COLORS if any(mentions(x, {c: COLOR_WORDS[c]}) for x in captions)}

    csv_path = render_pairs(tmp_path / "p", num_samples=60, seed=0, partial_caption_prob=0.0, colors=("purple",))
    assert named(RetrievalTask.from_csv(csv_path).captions) == {"purple"}
    assert named(RetrievalTask.from_csv(render_retrieval_task(tmp_path / "r", num_images=30, seed=0,
                                                              colors=("red", "blue"))).captions) == {"red", "blue"}
    zs_csv, classnames, templates = render_zeroshot_task(tmp_path / "z", num_per_class=2, seed=0, colors=("blue",))
    task = ZeroShotTask.from_csv(zs_csv, classnames, templates)
    assert len(task.classnames) == 30 and len(task.labels) == 10
    assert {task.classnames[label] for label in task.labels} == {f"blue {shape}" for shape in SHAPES}
    # Naming every colour draws exactly what the default draws.
    everything = render_pairs(tmp_path / "all", num_samples=20, seed=3, colors=tuple(COLORS)).parent
    default = render_pairs(tmp_path / "default", num_samples=20, seed=3).parent
    assert folder_bytes(everything) == folder_bytes(default)
    with pytest.raises(ValueError, match="colors must be a non-empty subset"):
        render_pairs(tmp_path / "bad", num_samples=2, seed=0, colors=("pink",))
