import os
import sys

# Keep CPU tests deterministic and light on this 2-core machine. Under pytest-xdist (`-n 2`, what .ci/run runs)
# each worker's torch takes one thread (see pytest_configure); subprocesses inherit it.
USER_THREADS = os.environ.get("OMP_NUM_THREADS")
os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import io
import tarfile
from pathlib import Path

import open_clip
import pytest
from torchvision import transforms


def pytest_configure(config):
    """With pytest-xdist workers (`-n N`), one torch thread each unless OMP_NUM_THREADS was given: two workers of
    two threads on two cores spin against each other. Set here, in the controller, before it starts the workers,
    which inherit it before they import torch; a CLI run and the in-process run it is compared with then use the
    same thread count."""
    if USER_THREADS is None and getattr(config.option, "numprocesses", None):
        os.environ["OMP_NUM_THREADS"] = "1"


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
