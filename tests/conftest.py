import os
import sys

# Keep CPU tests deterministic and light on this 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import io
import tarfile
from pathlib import Path

import open_clip
import pytest
from torchvision import transforms


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar holding `members` (name, bytes) in the given order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="session")
def transform():
    return transforms.Compose([transforms.Resize(32), transforms.ToTensor()])


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """48 synthetic pairs in uneven shards (20, 20, 8), for trainer and resume tests."""
    from engine.data.build import build_shards
    from engine.demo.synthetic import render_pairs

    root = tmp_path_factory.mktemp("pairs48")
    csv = render_pairs(root / "raw", num_samples=48, seed=0, split_name="train")
    build_shards(csv, root / "shards", samples_per_shard=20)
    return root / "shards"
