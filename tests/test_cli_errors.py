"""Bad environments and tampered inputs end in one `error:` line (exit 2), no traceback, nothing written: an
output folder the OS refuses, the DeepSpeed backend started without a launcher, a symlinked run sub-folder, a
demo folder that is not the demo's."""

import errno
import pathlib
import shutil

import pytest

from engine.cli import main

JOB = ["--model", "tiny-vit", "--batch-size", "8", "--epochs", "1", "--osr-epochs", "1",
       "--set", "run.progress=false", "--set", "eval.at_start=false"]


@pytest.fixture(scope="module")
def osr_run(shards, tmp_path_factory):
    """A finished `run.py osr` folder (margin auto, one complete checkpoint); tests tamper with copies."""
    out = tmp_path_factory.mktemp("osr") / "run"
    assert main(["osr", "--train", str(shards), "--out", str(out), *JOB, "--margin", "auto"]) == 0
    return out


def copy_run(osr_run, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(osr_run, tmp_path / "run", symlinks=True))


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_out_dir_inside_a_file(shards, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "run"
    assert main(["tune", "--train", str(shards), "--out", str(out), *JOB]) == 2
    assert error_lines(capsys) == [f"error: {out}: Not a directory"]


def test_read_only_out_dir(shards, tmp_path, capsys, monkeypatch):
    out = tmp_path / "mounted_read_only"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):  # what a read-only mount answers (root ignores chmod)
        if self == out:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    assert main(["tune", "--train", str(shards), "--out", str(out), *JOB]) == 2
    assert error_lines(capsys) == [
        f"error: {out}: Read-only file system; the filesystem is read-only; pick another --out"
    ]


@pytest.mark.slow
def test_deepspeed_backend_without_a_launcher(shards, tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert main(["tune", "--train", str(shards), "--out", str(tmp_path / "run"), *JOB,
                 "--set", "run.backend=deepspeed"]) == 2
    [line] = error_lines(capsys)
    assert line.startswith("error: run.backend=deepspeed needs a launcher: run under `deepspeed` or `torchrun`")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_background_checkpoints_on_a_backend_that_saves_synchronously(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["tune", "--train", str(shards), "--out", str(out), *JOB, "--set", "run.async_checkpoint=true"]) == 2
    assert error_lines(capsys) == [(
        "error: run.async_checkpoint: run.backend=single writes checkpoints synchronously; use run.backend=fsdp "
        "for background writes or remove run.async_checkpoint"
    )]
    assert not (out / "checkpoints").exists()


def test_demo_overwrite_refuses_a_folder_no_demo_wrote(tmp_path, capsys):
    mine = tmp_path / "work"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(["demo", "--quick", "--out", str(mine), "--overwrite"]) == 2
    assert error_lines(capsys) == [(
        f"error: --out {mine} holds no .tuneclip-demo file, so no demo wrote it; --overwrite replaces only a "
        "demo's folder: nothing was deleted; pick another --out"
    )]
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]  # nothing deleted, no lock file written


def test_demo_overwrite_takes_the_run_lock_first(tmp_path, capsys, monkeypatch):
    import engine.demo
    from engine.distributed import DistContext
    from engine.runlock import RunLock

    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / ".tuneclip-demo").write_text("{}")
    (demo / "summary.json").write_text("{}")
    (demo / "runs").mkdir()
    holder = RunLock(demo, DistContext())  # a demo still running in this folder
    assert main(["demo", "--quick", "--out", str(demo), "--overwrite"]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"error: run.out_dir {demo} is in use by job {holder.run_id} ")
    assert (demo / "summary.json").exists() and (demo / "runs").is_dir()
    holder.release()
    ran = []
    monkeypatch.setattr(engine.demo, "_run", lambda root, sizes, **_: ran.append(root) or {})
    assert main(["demo", "--quick", "--out", str(demo), "--overwrite"]) == 0
    assert ran == [demo] and not (demo / "summary.json").exists() and not (demo / "runs").exists()
    assert (demo / ".tuneclip-demo").is_file()


def test_symlinked_run_sub_folder_is_refused_at_start(shards, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "run"
    out.mkdir()
    (out / "u_table").symlink_to(elsewhere)
    assert main(["tune", "--train", str(shards), "--out", str(out), *JOB]) == 2
    assert error_lines(capsys) == [(
        f"error: run.out_dir {out}: u_table is a symbolic link (to {elsewhere}); a run never writes through links: "
        "replace it with a real folder or file, or pick another --out (nothing was written)"
    )]
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == ["u_table"]


def test_symlinked_u_table_is_refused_on_resume_and_never_written_through(osr_run, shards, tmp_path, capsys):
    run = copy_run(osr_run, tmp_path)
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "u_table").rename(elsewhere / "u_table")
    (run / "u_table").symlink_to(elsewhere / "u_table")
    before = {p.name: p.read_bytes() for p in (elsewhere / "u_table").iterdir()}
    log = (run / "log.jsonl").read_bytes()
    assert main(["tune", "--train", str(shards), "--out", str(run), *JOB, "--margin", "auto",
                 "--resume", "latest"]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"error: run.out_dir {run}: u_table is a symbolic link (to {elsewhere / 'u_table'})")
    assert {p.name: p.read_bytes() for p in (elsewhere / "u_table").iterdir()} == before
    assert (run / "log.jsonl").read_bytes() == log


def test_symlink_inside_the_checkpoints_is_refused_on_resume(osr_run, shards, tmp_path, capsys):
    run = copy_run(osr_run, tmp_path)
    capsys.readouterr()
    step = next((run / "checkpoints").glob("step_*"))
    (step / "normaliser" / "u_table.bin").rename(tmp_path / "u_table.bin")
    (step / "normaliser" / "u_table.bin").symlink_to(tmp_path / "u_table.bin")
    assert main(["tune", "--train", str(shards), "--out", str(run), *JOB, "--margin", "auto",
                 "--resume", "latest"]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"error: run.out_dir {run}: checkpoints/{step.name}/normaliser/u_table.bin is a "
                           "symbolic link")
