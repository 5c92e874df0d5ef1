"""u table checkpoints as a full base + deltas (run.u_table_full_every): exact reads of the chain, a purge that
keeps what kept checkpoints need (folders kept only for the chain trimmed to the table's files, crash-safe),
fallback past a damaged delta (a resumed run equal to a straight one, through a chain of deltas and trimmed
folders: tests/test_resume.py)."""

import errno
import json
import logging
import os
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import checkpoint_chain
from engine.checkpoint import (
    CheckpointManager,
    checkpoint_problems,
    has_checkpoints,
    is_complete,
    is_trimmed,
    latest_checkpoint,
    read_state,
    required_folders,
)
from engine.distributed import DistContext
from engine.objectives import table as table_module
from engine.objectives.normaliser import SMALL_TABLE_BYTES, TableNormaliser
from engine.objectives.table import DATA_FILE, DELTA_FILE, PAGE_ROWS, UTable

NUM_ROWS = 10 * PAGE_ROWS + 123  # a short last page


def normaliser(live, *, full_every=3, num_rows=NUM_ROWS):
    return TableNormaliser(live, num_rows=num_rows, dataset_fingerprint="fp", ctx=DistContext(), gamma_min=0.5,
                           gamma_decay_epochs=1, fresh=True, full_every=full_every)


def write_region(norm, rng, first_row, count):
    rows = torch.arange(first_row, min(first_row + count, NUM_ROWS))
    norm.table.write(rows, torch.from_numpy(rng.standard_normal(rows.numel()).astype(np.float32)),
                     torch.from_numpy(rng.standard_normal(rows.numel()).astype(np.float32)))


def table_bytes(norm) -> bytes:
    norm.table.flush()
    return (norm.live_dir / DATA_FILE).read_bytes()


class Weights:
    """Stands for the backend's model and optimizer files (the bulk of a real checkpoint folder)."""

    def save(self, directory):
        directory.mkdir(parents=True)
        (directory / "optim.pt").write_bytes(bytes(WEIGHT_BYTES))

    def load(self, directory, *, reshard=False):
        assert (directory / "optim.pt").stat().st_size == WEIGHT_BYTES


WEIGHT_BYTES = 300_000


def saves(tmp_path, *, async_save, num_saves=8, keep_last_n=2, full_every=3, weights=False):
    """A normaliser saved `num_saves` times, rows of one or two pages (and the last, short one) written between
    (`weights`: beside a stand-in for the backend's files); returns the manager and the table's bytes at each step."""
    norm = normaliser(tmp_path / "live", full_every=full_every)
    parts = {"backend": Weights(), "normaliser": norm} if weights else {"normaliser": norm}
    manager = CheckpointManager(tmp_path / "ckpt", DistContext(), parts=parts, keep_last_n=keep_last_n,
                                async_save=async_save)
    rng, expected = np.random.default_rng(0), {}
    for step in range(1, num_saves + 1):
        write_region(norm, rng, int(rng.integers(0, NUM_ROWS)), 1000)
        write_region(norm, rng, NUM_ROWS - 50, 50)
        expected[step] = table_bytes(norm)
        manager.save(step)
        manager.wait()
    norm.close()
    return manager, expected


def folder_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "COMPLETE")


def load_bytes(tmp_path, folder, *, num_rows=NUM_ROWS) -> bytes:
    fresh = normaliser(tmp_path / "reloaded", num_rows=num_rows)
    fresh.load(folder / "normaliser")
    data = table_bytes(fresh)
    fresh.close()
    return data


@pytest.mark.parametrize("async_save", [False, True])
def test_base_and_deltas_read_back_exactly_and_purge_keeps_the_chain(tmp_path, async_save):
    manager, expected = saves(tmp_path, async_save=async_save)
    root = manager.root
    kinds = {f.name: (f / "normaliser" / DELTA_FILE).exists() for f in root.glob("step_*")}
    # full_every=3: base at 1, 4, 7; deltas at 2, 3, 5, 6, 8. keep_last_n=2 keeps 7, 8 (8 needs 7 only).
    assert sorted(kinds) == ["step_00000007", "step_00000008"] and kinds == {"step_00000007": False,
                                                                            "step_00000008": True}
    delta = root / "step_00000008" / "normaliser" / DELTA_FILE
    assert delta.stat().st_size < (NUM_ROWS * 12) // 3  # a few pages, not the table
    assert required_folders(root / "step_00000008") and not required_folders(root / "step_00000007")
    for folder in sorted(root.glob("step_*")):
        assert load_bytes(tmp_path, folder) == expected[int(folder.name.removeprefix("step_"))], folder


def test_purge_keeps_bases_and_deltas_a_kept_checkpoint_needs(tmp_path):
    manager, expected = saves(tmp_path, async_save=False, num_saves=6, keep_last_n=1, full_every=4)
    # base at 1 and 5, deltas 2, 3, 4 on 1 and 6 on 5: keeping step 6 keeps 5, nothing older.
    assert sorted(f.name for f in manager.root.glob("step_*")) == ["step_00000005", "step_00000006"]
    manager, expected = saves(tmp_path / "b", async_save=False, num_saves=4, keep_last_n=1, full_every=8)
    assert sorted(f.name for f in manager.root.glob("step_*")) == [f"step_0000000{i}" for i in (1, 2, 3, 4)]
    assert load_bytes(tmp_path, manager.root / "step_00000004") == expected[4]


@pytest.mark.parametrize("damage", ["truncate_newest", "missing_middle", "middle_folder_gone"])
def test_a_damaged_delta_falls_back_to_the_previous_complete_checkpoint_with_one_warning(tmp_path, caplog, damage):
    manager, expected = saves(tmp_path, async_save=False, num_saves=3, keep_last_n=3, full_every=8)
    root = manager.root  # step 1 base, 2 delta on 1, 3 delta on 2
    if damage == "truncate_newest":
        file = root / "step_00000003" / "normaliser" / DELTA_FILE
        file.write_bytes(file.read_bytes()[:-7])
    elif damage == "missing_middle":
        (root / "step_00000002" / "normaliser" / DELTA_FILE).unlink()
    else:
        shutil.rmtree(root / "step_00000002")
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        found = latest_checkpoint(root)
    fallback = 2 if damage == "truncate_newest" else 1
    assert found == root / f"step_0000000{fallback}"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == (1 if damage == "truncate_newest" else 1 + (damage == "missing_middle"))
    assert "step_00000003" in warnings[0].getMessage()
    assert load_bytes(tmp_path, found) == expected[fallback]


def test_a_delta_whose_parent_was_saved_again_is_never_read(tmp_path):
    manager, _ = saves(tmp_path, async_save=False, num_saves=2, keep_last_n=3, full_every=8)
    parent = manager.root / "step_00000001"
    marker = json.loads((parent / "COMPLETE").read_text())
    marker["id"] = "another save"
    (parent / "COMPLETE").write_text(json.dumps(marker))
    assert checkpoint_problems(manager.root / "step_00000002") == ["needs step_00000001, which was saved again since"]
    chain = json.loads((parent / "normaliser" / "u_chain.json").read_text())
    chain["save_id"] = "another"
    (parent / "normaliser" / "u_chain.json").write_text(json.dumps(chain))
    with pytest.raises(ValueError, match="saved again"):
        load_bytes(tmp_path, manager.root / "step_00000002")


def test_a_delta_naming_a_parent_outside_its_checkpoints_folder_is_refused(tmp_path):
    manager, _ = saves(tmp_path, async_save=False, num_saves=2, keep_last_n=3, full_every=8)
    header = manager.root / "step_00000002" / "normaliser" / "u_delta.json"
    meta = json.loads(header.read_text())
    meta["parent"]["checkpoint"] = "../../elsewhere"
    header.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="names no parent checkpoint folder"):
        load_bytes(tmp_path, manager.root / "step_00000002")


def test_the_save_after_its_parent_was_removed_is_a_full_base(tmp_path):
    norm = normaliser(tmp_path / "live", full_every=8)
    manager = CheckpointManager(tmp_path / "ckpt", DistContext(), parts={"normaliser": norm}, keep_last_n=3)
    rng = np.random.default_rng(1)
    for step in (1, 2):
        write_region(norm, rng, 100 * step, 500)
        manager.save(step)
    shutil.rmtree(manager.root / "step_00000002")  # e.g. removed by hand while the run goes on
    write_region(norm, rng, 2000, 500)
    expected = table_bytes(norm)
    folder = manager.save(3)
    assert not required_folders(folder) and not (folder / "normaliser" / DELTA_FILE).exists()
    assert latest_checkpoint(manager.root) == folder
    assert load_bytes(tmp_path, folder) == expected
    norm.close()


def test_a_delta_is_applied_in_pieces_and_a_flipped_byte_changes_nothing(tmp_path):
    norm = normaliser(tmp_path / "live", full_every=8)
    manager = CheckpointManager(tmp_path / "ckpt", DistContext(), parts={"normaliser": norm}, keep_last_n=3)
    rng, expected = np.random.default_rng(2), {}
    for step, first_row in ((1, 0), (2, PAGE_ROWS)):
        write_region(norm, rng, first_row, 8 * PAGE_ROWS)  # step 2: a delta of 8 pages (~100 KB)
        expected[step] = table_bytes(norm)
        manager.save(step)
    norm.close()
    base, delta = manager.root / "step_00000001" / "normaliser", manager.root / "step_00000002" / "normaliser"
    fresh = normaliser(tmp_path / "reloaded")
    fresh.load(base)
    tracemalloc.start()
    fresh.table.apply_delta(delta, block=1024)  # pieces smaller than a page (12 KiB)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert table_bytes(fresh) == expected[2]
    assert peak < (delta / DELTA_FILE).stat().st_size // 3  # never the whole delta in memory
    fresh.load(base)
    data = bytearray((delta / DELTA_FILE).read_bytes())
    data[-1] ^= 0x40  # same size: only the digest tells
    (delta / DELTA_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="the delta is damaged"):
        fresh.table.apply_delta(delta, block=1024)
    assert table_bytes(fresh) == expected[1]  # checked before anything is written
    fresh.close()


def test_rows_written_all_over_a_large_table_make_the_save_a_base(tmp_path):
    num_rows = SMALL_TABLE_BYTES // 12 + 100 * PAGE_ROWS  # just large enough for the rule (a sparse file)
    norm = normaliser(tmp_path / "live", full_every=8, num_rows=num_rows)
    manager = CheckpointManager(tmp_path / "ckpt", DistContext(), parts={"normaliser": norm}, keep_last_n=4)

    def write(rows):
        values = torch.linspace(-1, 1, rows.numel())
        norm.table.write(rows, values, -values)

    write(torch.arange(0, num_rows, 7))  # a first epoch: the whole table allocated
    assert not required_folders(manager.save(1))
    write(torch.arange(5 * PAGE_ROWS, 15 * PAGE_ROWS))  # 10 pages: a delta
    assert list(required_folders(manager.save(2))) == ["step_00000001"]
    write(torch.arange(3, num_rows, PAGE_ROWS))  # one row in every page (random order): a delta as large as the table
    third = manager.save(3)
    assert not required_folders(third) and not (third / "normaliser" / DELTA_FILE).exists()
    expected = table_bytes(norm)
    norm.close()
    assert load_bytes(tmp_path, third, num_rows=num_rows) == expected


@pytest.mark.parametrize("async_save", [False, True])
def test_folders_kept_only_for_the_chain_are_trimmed_to_the_table(tmp_path, async_save):
    manager, expected = saves(tmp_path, async_save=async_save, num_saves=7, keep_last_n=2, full_every=4,
                              weights=True)
    root = manager.root  # base at 1 and 5, deltas 2, 3, 4 on 1 and 6, 7 on 5: keeping 6 and 7 keeps 5's table
    assert sorted(f.name for f in root.glob("step_*")) == ["step_00000005", "step_00000006", "step_00000007"]
    link, newest = root / "step_00000005", root / "step_00000007"
    assert sorted(p.name for p in link.iterdir()) == ["COMPLETE", "normaliser"]  # weights and state.json gone
    assert folder_bytes(link) == folder_bytes(link / "normaliser") < WEIGHT_BYTES
    assert (newest / "backend" / "optim.pt").stat().st_size == WEIGHT_BYTES  # kept checkpoints stay whole
    link_id = json.loads((link / "COMPLETE").read_text())["id"]  # the id the trim kept, which 6 and 7 match
    assert sorted(required_folders(newest)) == ["step_00000005", "step_00000006"]
    assert required_folders(newest)["step_00000005"] == link_id == required_folders(newest.parent / "step_00000006")[
        "step_00000005"]
    assert is_trimmed(link) and not is_complete(link) and checkpoint_problems(link) == []
    assert latest_checkpoint(root) == newest and checkpoint_problems(newest) == []
    for folder in (root / "step_00000006", newest):  # the newest read from 5's base and its own delta, exactly
        assert load_bytes(tmp_path, folder) == expected[int(folder.name.removeprefix("step_"))], folder
    with pytest.raises(ValueError, match=r"step_00000005 was trimmed to the u table chain \(it keeps only "
                       r"normaliser/.*use a whole checkpoint of that run instead \(step_00000006, step_00000007;"):
        read_state(link)


class Crash(RuntimeError):
    pass


def test_a_crash_between_the_marker_rewrite_and_the_deletion_leaves_a_resumable_state(tmp_path, monkeypatch):
    norm = normaliser(tmp_path / "live", full_every=8)
    manager = CheckpointManager(tmp_path / "ckpt", DistContext(), parts={"backend": Weights(), "normaliser": norm},
                                keep_last_n=2)
    root, rng = manager.root, np.random.default_rng(2)
    for step in (1, 2):
        write_region(norm, rng, 300 * step, 700)
        manager.save(step)
    write_region(norm, rng, 5000, 900)
    expected = table_bytes(norm)
    real_delete, calls = checkpoint_chain._delete, []

    def crashing_delete(entry):  # the first file goes, then the process dies
        calls.append(entry.name)
        if len(calls) > 1:
            raise Crash("killed while trimming")
        real_delete(entry)

    monkeypatch.setattr(checkpoint_chain, "_delete", crashing_delete)
    with pytest.raises(Crash):
        manager.save(3)  # keeps 2 and 3, trims 1 (the base both apply on)
    monkeypatch.undo()
    assert latest_checkpoint(root) == root / "step_00000003" and checkpoint_problems(root / "step_00000002") == []
    assert load_bytes(tmp_path, root / "step_00000003") == expected
    first = root / "step_00000001"  # its marker lists the table's files, state.json is left over
    assert calls == ["backend", "state.json"] and is_trimmed(first) and (first / "state.json").exists()
    write_region(norm, rng, 7000, 300)
    expected = table_bytes(norm)
    manager.save(4)  # the next purge finishes the trim and trims 2
    norm.close()
    assert [sorted(p.name for p in (root / f"step_0000000{i}").iterdir()) for i in (1, 2)] == [
        ["COMPLETE", "normaliser"]] * 2
    assert load_bytes(tmp_path, root / "step_00000004") == expected


def test_a_damaged_trimmed_folder_makes_the_checkpoints_needing_it_skipped(tmp_path, caplog):
    manager, expected = saves(tmp_path, async_save=False, num_saves=5, keep_last_n=2, full_every=8, weights=True)
    root = manager.root  # base at 1, deltas 2..5: 4 and 5 kept whole, 1, 2, 3 trimmed
    assert [is_trimmed(root / f"step_0000000{i}") for i in range(1, 6)] == [True, True, True, False, False]
    newest = root / "step_00000005" / "normaliser" / DELTA_FILE
    newest.write_bytes(newest.read_bytes()[:-5])
    caplog.clear()  # the saves' own records (logged when another test in this process set INFO)

    def warnings():
        return [r for r in caplog.records if r.levelno >= logging.WARNING]

    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        assert latest_checkpoint(root) == root / "step_00000004"  # one warning, trimmed ones unmentioned
    assert [r.getMessage().split(":")[0] for r in warnings()] == [f"skipping checkpoint {newest.parents[1]}"]
    assert load_bytes(tmp_path, root / "step_00000004") == expected[4]
    caplog.clear()
    (root / "step_00000002" / "normaliser" / DELTA_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        assert latest_checkpoint(root) is None  # 4 applies on 2's delta, the trimmed ones are no checkpoints
    assert len(warnings()) == 2 and warnings()[1].getMessage() == (
        f"skipping checkpoint {root / 'step_00000004'}: needs step_00000002, which is damaged "
        "(normaliser/u_delta.bin is missing)")


def test_a_folder_left_with_only_trimmed_checkpoints_still_counts_as_an_earlier_runs(tmp_path):
    manager, _ = saves(tmp_path, async_save=False, num_saves=3, keep_last_n=1, full_every=8)
    root = manager.root  # step 3 whole, 1 and 2 trimmed to the chain it needs
    assert [is_trimmed(f) for f in sorted(root.glob("step_*"))] == [True, True, False]
    shutil.rmtree(root / "step_00000003")  # the whole checkpoints removed by hand
    assert latest_checkpoint(root) is None and has_checkpoints(root)  # a fresh run refuses the folder


def _clone_by_copying(src, dst):  # stands in for a filesystem that clones (reflink)
    shutil.copyfile(src, dst)
    return True


@pytest.mark.parametrize("reflink", ["stand-in", "real"])
def test_a_base_is_cloned_where_the_filesystem_can_and_copied_elsewhere(tmp_path, monkeypatch, reflink):
    """Where the filesystem clones, a background base save stages nothing in memory and later writes never reach
    the checkpoint (copy on write); where it cannot, the copy is as before. "real" needs a folder on a filesystem
    with reflink (XFS with reflink=1, btrfs) in TUNECLIP_REFLINK_DIR."""
    if reflink == "real":
        if not os.environ.get("TUNECLIP_REFLINK_DIR"):
            pytest.skip("set TUNECLIP_REFLINK_DIR to a folder on a filesystem with reflink")
        tmp_path = Path(tempfile.mkdtemp(dir=os.environ["TUNECLIP_REFLINK_DIR"]))
    else:
        monkeypatch.setattr(table_module, "try_clone", _clone_by_copying)
    monkeypatch.setattr(UTable, "snapshot", lambda self, **_: pytest.fail("a clonable base was staged in memory"))
    norm = normaliser(tmp_path / "live")
    manager = CheckpointManager(tmp_path / "ckpt", DistContext(), parts={"normaliser": norm}, async_save=True)
    write_region(norm, np.random.default_rng(3), 0, 3 * PAGE_ROWS)
    expected = table_bytes(norm)
    folder = manager.save(1)
    write_region(norm, np.random.default_rng(4), 0, NUM_ROWS)  # every page written after the clone
    manager.wait()
    norm.close()
    assert load_bytes(tmp_path, folder) == expected
    if reflink == "real":
        shutil.rmtree(tmp_path)


def test_a_filesystem_that_cannot_clone_gets_a_copy_and_no_stray_file(tmp_path, monkeypatch):
    import fcntl

    def refuse(*_):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(fcntl, "ioctl", refuse)
    (tmp_path / "src").write_bytes(b"x" * 5000)
    assert not table_module.try_clone(tmp_path / "src", tmp_path / "dst") and not (tmp_path / "dst").exists()
    norm = normaliser(tmp_path / "live")
    write_region(norm, np.random.default_rng(5), 0, 2 * PAGE_ROWS)
    expected = table_bytes(norm)
    norm.table.copy_to(tmp_path / "copied").close()
    norm.close()
    assert (tmp_path / "copied" / DATA_FILE).read_bytes() == expected
