"""Evaluation reads images under training's caps (`data.max_image_pixels`, `data.max_member_bytes`) for CSV,
webdataset and clip_benchmark sets: an over-cap image is one `error:` line, never a multi-GB decode, a
DecompressionBombError or a worker's traceback; `nshards.txt` is read bounded and checked against the tars."""

import tracemalloc

import pytest
import yaml

from engine.cli import main
from engine.evaluate.sources import read_clip_benchmark
from tests.helpers.bombs import png_claiming
from tests.helpers.eval_fixtures import write_clip_benchmark_set
from tests.helpers.images import png_bytes

HUGE = (20000, 20000)  # 400 Mpx from a 69-byte file: 1.2 GB as RGB if decoded


def images(folder, huge_at: int, num: int = 3):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num):
        path = folder / f"im{i}.png"
        path.write_bytes(png_claiming(*HUGE) if i == huge_at else png_bytes((40 * i, 0, 0), size=16))
        paths.append(path)
    return paths


def eval_error(tmp_path, capsys, task: dict, *extra: str) -> str:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"retrieval": [task]}))
    out = tmp_path / "out"
    assert main(["eval", "--model", "tiny-vit", "--tasks", str(tasks), "--out", str(out), *extra]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "DecompressionBombError" not in captured.err
    [line] = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert not out.exists()
    return line


TOO_LARGE = "image too large (20000 x 20000 = 400000000 pixels > max_image_pixels 67108864)"
FIX = "raise data.max_image_pixels (--set data.max_image_pixels=N) or remove the image from the set"


@pytest.mark.parametrize("num_workers", ["0", "2"])
def test_clip_benchmark_tar_with_an_over_cap_image_is_one_error_line(tmp_path, capsys, num_workers):
    paths = images(tmp_path / "raw", huge_at=1)
    root = write_clip_benchmark_set(tmp_path / "cb", [(p, f"caption {i}") for i, p in enumerate(paths)],
                                    num_shards=1, dataset_type="retrieval")
    line = eval_error(tmp_path, capsys, {"name": "cb", "clip_benchmark": str(root)},
                      "--set", f"eval.num_workers={num_workers}")
    assert line == f"error: task 'cb': {root / 'test' / '0.tar'}: sample 's000001': {TOO_LARGE}; {FIX}"


def test_csv_task_with_an_over_cap_image_is_one_error_line(tmp_path, capsys):
    paths = images(tmp_path / "raw", huge_at=2)
    csv = tmp_path / "raw" / "pairs.csv"
    csv.write_text("filepath,caption\n" + "".join(f"{p.name},caption {i}\n" for i, p in enumerate(paths)))
    line = eval_error(tmp_path, capsys, {"name": "pairs", "csv": str(csv)})
    assert line == f"error: task 'pairs': {paths[2]}: {TOO_LARGE}; {FIX}"


def test_the_cap_is_the_data_sections(tmp_path, capsys):
    paths = images(tmp_path / "raw", huge_at=-1)  # 16 x 16 images only
    csv = tmp_path / "raw" / "pairs.csv"
    csv.write_text("filepath,caption\n" + "".join(f"{p.name},caption {i}\n" for i, p in enumerate(paths)))
    line = eval_error(tmp_path, capsys, {"name": "pairs", "csv": str(csv)}, "--set", "data.max_image_pixels=255")
    assert line.startswith(f"error: task 'pairs': {paths[0]}: image too large (16 x 16 = 256 pixels > "
                           "max_image_pixels 255)")


def test_nshards_txt_claiming_two_million_shards_costs_nothing_before_the_check(tmp_path, capsys):
    paths = images(tmp_path / "raw", huge_at=-1)
    root = write_clip_benchmark_set(tmp_path / "cb", [(p, f"caption {i}") for i, p in enumerate(paths)],
                                    num_shards=1, dataset_type="retrieval")
    nshards = root / "test" / "nshards.txt"
    nshards.write_text("2000000\n")
    tracemalloc.start()
    with pytest.raises(ValueError, match=r"nshards\.txt says 2000000 shards but .* holds 1 \*\.tar file\(s\); "
                                         r"fix nshards\.txt or add the missing shards"):
        read_clip_benchmark(root)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000  # bytes (a list of 2,000,000 paths took 725 MB)
    nshards.write_text("9" * 10_000_000)  # a 10 MB 'number' is read no further than a number needs
    line = eval_error(tmp_path, capsys, {"name": "cb", "clip_benchmark": str(root)})
    assert line.startswith(f"error: eval.retrieval[0] 'cb': {nshards}: must hold the number of shards")
    assert len(line) < 400
