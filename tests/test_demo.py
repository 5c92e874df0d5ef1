"""The demo's data: its retained tasks show what pretraining had and fine-tuning lacks (held-out colours), and none
of their images or captions is trained on."""

import csv
import hashlib
import io
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from engine.demo.experiment import FINETUNE_COLORS, GROUPS, HELD_OUT_COLORS, _prepare_data, _sizes
from engine.demo.synthetic import COLOR_WORDS, zeroshot_classnames


def shard_samples(folder: Path) -> tuple[set[str], list[str]]:
    """(pixel hashes of every image, every caption) in the shards of `folder`."""
    pixels, captions = set(), []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name.endswith(".png"):
                    pixels.add(pixel_hash(Image.open(io.BytesIO(data))))
                elif member.name.endswith(".txt"):
                    captions.append(data.decode())
    return pixels, captions


def pixel_hash(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def names_colour(caption: str, colors) -> bool:
    return any(re.search(rf"\b{word}\b", caption) for c in colors for word in COLOR_WORDS[c])


def test_retained_tasks_hold_what_pretraining_had_and_fine_tuning_never_shows(tmp_path):
    tasks = _prepare_data(tmp_path, _sizes(quick=True))
    by_name = {task["name"]: task for section in tasks.values() for task in section}
    assert set(by_name) == {task for metrics in GROUPS.values() for task, _, _ in metrics}
    ft_pixels, ft_captions = shard_samples(tmp_path / "shards" / "finetune")
    pre_pixels, pre_captions = shard_samples(tmp_path / "shards" / "pretrain")
    # Fine-tuning never names a held-out colour; pretraining names each of them.
    assert ft_captions and not [c for c in ft_captions if names_colour(c, HELD_OUT_COLORS)]
    assert all(any(names_colour(c, [color]) for c in pre_captions) for color in HELD_OUT_COLORS)
    # The retained tasks show held-out colours only (the in-domain ones fine-tuning colours only), and no image or
    # caption of theirs is in the fine-tuning (or pretraining) shards.
    classnames = zeroshot_classnames()
    for group, colors in (("in-domain", FINETUNE_COLORS), ("retained", HELD_OUT_COLORS)):
        (zs_name, _, _), (rt_name, _, _) = GROUPS[group]
        with open(by_name[zs_name]["csv"], newline="") as f:
            labels = {int(row["label"]) for row in csv.DictReader(f)}
        assert {classnames[label].split(" ")[0] for label in labels} == set(colors)
        with open(by_name[rt_name]["csv"], newline="") as f:
            rows = list(csv.DictReader(f))
        assert all(names_colour(row["caption"], colors) for row in rows)
        if group == "retained":
            assert not {row["caption"] for row in rows} & set(ft_captions)
            root = Path(by_name[rt_name]["csv"]).parent
            images = {pixel_hash(Image.open(root / row["filepath"])) for row in rows}
            with open(by_name[zs_name]["csv"], newline="") as f:
                root = Path(by_name[zs_name]["csv"]).parent
                images |= {pixel_hash(Image.open(root / row["filepath"])) for row in csv.DictReader(f)}
            assert len(images) > 40 and not images & (ft_pixels | pre_pixels)
