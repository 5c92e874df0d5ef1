"""The attacker's routes through every CLI path that reads a file: a TorchScript weights file whose loading
writes bytes, an FSDP2 checkpoint whose `.metadata` runs a shell command through a dotted name, a DeepSpeed
checkpoint whose parameter names lead the universal conversion out of its folder, and model folders whose
tokenizer names code of its own. Each payload is built here; each path must refuse it with one `error:` line
and nothing may run or be written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from engine.cli import main
from engine.data.build import build_shards
from engine.demo.synthetic import render_pairs, render_retrieval_task
from tests.helpers.harness import free_port
from tests.helpers.planted import Planted
from tests.test_safe_load import evil_torchscript, prepended, shell_payload

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
ROOT = Path(__file__).resolve().parents[1]
JOB = ["--batch-size", "8", "--epochs", "1", "--osr-epochs", "1", "--lr", "1e-3", "--set", "run.progress=false",
       "--set", "eval.at_start=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("security_data")
    csv = render_pairs(root / "raw", num_samples=16, seed=0, split_name="train")
    build_shards(csv, root / "shards", samples_per_shard=8)
    tasks = root / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"retrieval": [{"name": "pairs",
                                                     "csv": str(render_retrieval_task(root, num_images=8, seed=0))}]}))
    return {"shards": root / "shards", "tasks": tasks}


def one_error_line(err: str, *, match: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-3000:]
    assert match in lines[0], lines[0]


def run_py(args: list[str], *, launcher: bool = False) -> subprocess.CompletedProcess:
    """`python run.py ...` as one process; `launcher=True` sets what torchrun / deepspeed would (1 rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    if launcher:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    try:
        return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
    finally:
        if launcher:
            for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer*_{env['MASTER_PORT']}_*"):
                path.unlink(missing_ok=True)


def tree(folder: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_torchscript_weights_never_run_through_export_eval_and_tune(data, tmp_path, capsys):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(bytes(8))
    evil = tmp_path / "evil.pt"
    evil_torchscript(evil, victim)
    commands = {
        "export": ["export", "--model", "tiny-vit-quickgelu", "--weights", str(evil), "--out", str(tmp_path / "x.safetensors")],
        "eval": ["eval", "--model", "tiny-vit-quickgelu", "--weights", str(evil), "--tasks", str(data["tasks"])],
        "tune": ["tune", "--model", "tiny-vit-quickgelu", "--weights", str(evil), "--train", str(data["shards"]),
                 "--out", str(tmp_path / "run"), *JOB],
    }
    for name, args in commands.items():
        assert main(args) == 2, name
        one_error_line(capsys.readouterr().err, match="custom __getstate__")
        assert victim.read_bytes() == bytes(8), name
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "run" / "final.safetensors").exists()


def _rewrite_complete(step: Path) -> None:
    """What an attacker does after changing files: the COMPLETE marker lists the new sizes."""
    sizes = {str(p.relative_to(step)): p.stat().st_size for p in sorted(step.rglob("*"))
             if p.is_file() and p.name != "COMPLETE"}
    (step / "COMPLETE").write_text(json.dumps({"files": sizes}))


def _plant_fsdp(step: Path, marker: Path) -> str:
    metadata = step / "backend" / ".metadata"
    metadata.write_bytes(prepended(shell_payload("torch.distributed.checkpoint.metadata", marker),
                                   metadata.read_bytes()))
    return "os.system is not allowed"


def _plant_deepspeed(step: Path, marker: Path) -> str:
    """The universal conversion builds paths from `param_shapes` names: one renamed to leave the folder, and a
    pickle planted where the conversion would load it (the resume below also claims another world size)."""
    folder = step / "backend" / "deepspeed"
    model_file = next(folder.glob("*model_states.pt"))
    state = torch.load(model_file, weights_only=False)  # the test's own file
    shapes = state["param_shapes"][0]
    first = next(iter(shapes))
    state["param_shapes"][0] = {("../../deepspeed/x" if k == first else k): v for k, v in shapes.items()}
    torch.save(state, model_file)
    for base in (step / "backend", step, step.parent):
        (base / "deepspeed" / "x" / "0").mkdir(parents=True, exist_ok=True)
        torch.save({"param": Planted(marker)}, base / "deepspeed" / "x" / "0" / "fp32.07")
    return "names parameter '../../deepspeed/x'"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_tampered_checkpoint_never_runs_through_any_cli_path(data, tmp_path, capsys, backend):
    """export / eval of the step folder (one process), --resume and --osr-from (a launched rank)."""
    backend_args = ["--set", f"run.backend={backend}"] + (
        ["--set", "run.zero_config=zero_configs/zero2.json"] if backend == "deepspeed" else [])
    run = tmp_path / "run"
    done = run_py(["tune", "--train", str(data["shards"]), "--out", str(run), *JOB, *backend_args,
                   "--save-every", "1", "--set", "run.keep_last_n=10"], launcher=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The end-of-OSR checkpoint (OSR: 2 steps): what --osr-from takes, and a mid-run point to resume from.
    step = next(p for p in sorted((run / "checkpoints").glob("step_*"))
                if json.loads((p / "state.json").read_text())["train_state"]["stage"] == "finetune")
    marker = tmp_path / "ran"
    reason = (_plant_fsdp if backend == "fsdp" else _plant_deepspeed)(step, marker)
    _rewrite_complete(step)
    (run / "final.safetensors").unlink()  # as if the job had been stopped: a resume is expected
    calls = {
        "export": ["export", "--model", "tiny-vit", "--weights", str(step), "--out", str(tmp_path / "x.safetensors")],
        "eval": ["eval", "--model", "tiny-vit", "--weights", str(step), "--tasks", str(data["tasks"])],
        "osr-from": ["finetune", "--train", str(data["shards"]), "--out", str(tmp_path / "again"), *JOB,
                     *backend_args, "--osr-from", str(step)],
        "resume": ["tune", "--train", str(data["shards"]), "--out", str(run), *JOB, *backend_args,
                   "--resume", str(step)],
    }
    for name, args in calls.items():
        if name == "resume" and backend == "deepspeed":  # another world size: DeepSpeed's universal conversion
            state = json.loads((step / "state.json").read_text())
            state["train_state"]["world_size"] = 2
            (step / "state.json").write_text(json.dumps(state))
            _rewrite_complete(step)
        before = tree(tmp_path)
        if name in ("export", "eval"):  # one process, in-process
            assert main(args) == 2, name
            err = capsys.readouterr().err
        else:  # a launched rank
            done = run_py(args, launcher=True)
            assert done.returncode == 2, (name, done.stdout[-2000:], done.stderr[-3000:])
            err = done.stderr
        one_error_line(err, match=reason)
        assert not marker.exists(), name
        # Only the run's lock (taken on --resume) and its log may change; nothing else, nowhere.
        written = {p for p, v in tree(tmp_path).items() if before.get(p) != v and p.is_file()
                   and not p.is_relative_to(tmp_path / "again") and p.name != "log.jsonl"
                   and not p.name.startswith(".run.")}
        assert not written, (name, sorted(map(str, written))[:10])
    assert not list(step.parent.glob("**/universal*")) and not list(step.parent.glob("**/.universal*"))


def _evil_model_folder(folder: Path, marker: Path, *, hub_id: str, kwargs_route: bool) -> Path:
    """An open_clip SigLIP folder whose tokenizer names a module of its own (`auto_map`) that touches `marker` on
    import; `kwargs_route`: the model config also asks for trust_remote_code through tokenizer_kwargs."""
    import open_clip

    from models import export_weights, register_shipped_configs
    from tests.helpers.families import save_tiny_tokenizer

    register_shipped_configs()
    save_tiny_tokenizer(folder)
    (folder / "evil_tok.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
                                        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    model_cfg = open_clip.get_model_config("tiny-siglip")
    model_cfg["text_cfg"]["hf_tokenizer_name"] = hub_id
    if kwargs_route:
        model_cfg["text_cfg"]["tokenizer_kwargs"] = {"clean": "canonicalize", "trust_remote_code": True}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    export_weights(open_clip.create_model("tiny-siglip"), folder / "open_clip_model.safetensors")
    (folder / f"tiny-evil-{int(kwargs_route)}.json").write_text(json.dumps({**model_cfg, "text_cfg": {
        **model_cfg["text_cfg"], "hf_tokenizer_name": str(folder)}}))
    return folder


@pytest.mark.parametrize("kwargs_route", [True, False], ids=["tokenizer_kwargs", "auto_map"])
def test_model_folder_tokenizer_code_never_runs(data, tmp_path, capsys, monkeypatch, kwargs_route):
    """local-dir:, hf-hub: from the offline cache and a JSON model config, through eval and export."""
    import huggingface_hub.constants

    from tests.helpers.families import put_in_hub_cache

    marker = tmp_path / "ran"
    folder = _evil_model_folder(tmp_path / "repo", marker, hub_id="org/evil", kwargs_route=kwargs_route)
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, "org/evil", folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    reason = "tokenizer_kwargs ['trust_remote_code'] not accepted" if kwargs_route else "names Python code of its own"
    before = tree(tmp_path)
    for model in (f"local-dir:{folder}", "hf-hub:org/evil", str(folder / f"tiny-evil-{int(kwargs_route)}.json")):
        for args in (["eval", "--model", model, "--tasks", str(data["tasks"])],
                     ["export", "--model", model, "--out", str(tmp_path / "out" / "x.safetensors")]):
            assert main(args) == 2, args
            one_error_line(capsys.readouterr().err, match=reason)
            assert not marker.exists(), args
    assert tree(tmp_path) == before


@pytest.mark.parametrize("content", ["empty", "int-keys", "truncated"])
def test_damaged_weights_file_is_one_error_line(tmp_path, capsys, content):
    path = tmp_path / "w.pt"
    if content == "empty":
        path.write_bytes(b"")
    else:
        torch.save({0: torch.ones(2)}, path)
        if content == "truncated":
            path.write_bytes(path.read_bytes()[:100])
    out = tmp_path / "x.safetensors"
    assert main(["export", "--model", "tiny-vit", "--weights", str(path), "--out", str(out)]) == 2
    one_error_line(capsys.readouterr().err, match=str(path))
    assert not out.exists()


def test_transformers_folder_pickles_and_code_never_run(data, tmp_path, capsys):
    """A transformers CLIPModel (or SiglipModel) folder whose weights are a pickle (`pytorch_model.bin` that runs a
    shell command, no model.safetensors) or whose config names Python code of its own (`auto_map`, with the module
    beside it): every path that reads the folder (model name or weights of tune, eval, export to transformers)
    refuses it in one line, and nothing runs or is written."""
    from tests.test_models_transformers import _save_tiny_clip, _save_tiny_siglip

    marker = tmp_path / "ran"
    pickled = tmp_path / "pickled"
    _save_tiny_clip(pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(shell_payload("torch.serialization", marker))
    pickled_siglip = tmp_path / "pickled_siglip"
    _save_tiny_siglip(pickled_siglip)
    (pickled_siglip / "model.safetensors").unlink()
    (pickled_siglip / "pytorch_model.bin").write_bytes(shell_payload("torch.serialization", marker))
    coded = tmp_path / "coded"
    _save_tiny_clip(coded)
    config = json.loads((coded / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil_model.EvilModel"}
    (coded / "config.json").write_text(json.dumps(config))
    (coded / "evil_model.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass EvilModel: pass\n")
    for folder, match in ((pickled, ".bin is never unpickled"), (pickled_siglip, ".bin is never unpickled"),
                          (coded, "auto_map")):
        commands = {
            "tune (name)": ["tune", "--model", str(folder), "--train", str(data["shards"]),
                            "--out", str(tmp_path / "run"), *JOB],
            "tune (weights)": ["tune", "--model", "tiny-vit", "--weights", str(folder), "--train", str(data["shards"]),
                               "--out", str(tmp_path / "run"), *JOB],
            "eval": ["eval", "--model", str(folder), "--tasks", str(data["tasks"])],
            "export": ["export", "--model", str(folder), "--format", "transformers", "--out", str(tmp_path / "hf")],
        }
        for name, args in commands.items():
            assert main(args) == 2, (folder.name, name)
            # As weights of another named architecture the pickled folder is refused before its weights are read.
            weights_route = "weights" in name and folder in (pickled, pickled_siglip)
            one_error_line(capsys.readouterr().err, match="another architecture" if weights_route else match)
            assert not marker.exists(), (folder.name, name)
    assert not (tmp_path / "run" / "final.safetensors").exists() and not (tmp_path / "hf").exists()
