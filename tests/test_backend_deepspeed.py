"""DeepSpeed backend: config building (no processes); ZeRO 1/2/3 and FSDP2 on 2 real CPU ranks vs. single process."""

import functools
import json
from pathlib import Path

import pytest
import torch

from engine.backends.deepspeed import build_deepspeed_config
from engine.backends.single import SingleProcessBackend, adamw_param_groups
from engine.objectives.contrastive import GlobalContrastiveLoss
from tests.helpers.dist_cases_deepspeed import (
    BETAS,
    EPS,
    FINETUNE_BATCH,
    GRAD_CLIP,
    LR,
    OSR_STEPS,
    RESET_BATCH,
    SPEC,
    WEIGHT_DECAY,
    forward_backward,
    global_batch,
    tiny_model,
)
from tests.helpers.harness import run_ranks
from tests.helpers.planted import Planted

WORLD = 2
CONFIG_DIR = Path(__file__).resolve().parents[1] / "zero_configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.json"))
OURS = {"micro_batch_size": 4, "world_size": 2, "betas": (0.9, 0.98), "weight_decay": 0.02, "eps": 1e-8,
        "grad_clip": 1.0}


# ----- build_deepspeed_config (pure) -----

def test_shipped_configs_are_the_expected_set():
    assert [p.name for p in SHIPPED] == ["zero1.json", "zero2.json", "zero2_bf16.json", "zero3.json",
                                         "zero3_bf16.json", "zero3_offload.json"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    precision = "bf16" if "bf16" in path.name else "fp32"
    cfg = build_deepspeed_config(path, **{**OURS, "world_size": 1}, precision=precision)
    ds = DeepSpeedConfig(cfg)  # DeepSpeed's own parsing and validation (world size 1 without a process group)
    raw = json.loads(path.read_text())
    assert ds.zero_optimization_stage == raw["zero_optimization"]["stage"]
    assert ds.train_batch_size == 4 and ds.train_micro_batch_size_per_gpu == 4
    assert ds.gradient_accumulation_steps == 1
    assert ds.gradient_clipping == 1.0
    assert ds.bfloat16_config.enabled == (precision == "bf16")
    assert ds.scheduler_name is None
    params = ds.optimizer_params
    assert ds.optimizer_name == "adamw"
    assert (params["lr"], tuple(params["betas"]), params["eps"], params["weight_decay"]) == (0.0, (0.9, 0.98),
                                                                                              1e-8, 0.02)
    # torch AdamW on CPU (FusedAdam would JIT-build); offload needs DeepSpeed's CPU Adam instead.
    offload = "offload_optimizer" in raw["zero_optimization"]
    assert params.get("torch_adam", False) is (not offload)
    assert ds.zero_config.offload_optimizer is None or ds.zero_config.offload_optimizer.device == "cpu"


def test_fills_batch_sizes_and_optimizer_without_touching_the_input():
    raw = {"zero_optimization": {"stage": 2}}
    cfg = build_deepspeed_config(raw, **OURS)
    assert raw == {"zero_optimization": {"stage": 2}}
    assert cfg["train_batch_size"] == 8 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["gradient_clipping"] == 1.0
    assert cfg["optimizer"] == {"type": "AdamW", "params": {
        "torch_adam": True, "lr": 0.0, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.02}}
    bf16 = build_deepspeed_config(raw, **OURS, precision="bf16")
    assert bf16["bf16"] == {"enabled": True}


def test_job_config_is_merged_once_and_handed_out_as_copies(tmp_path):
    from engine.backends.deepspeed.config import _merged_file, job_deepspeed_config

    path = tmp_path / "zero2.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    settings = {**OURS, "precision": "fp32"}
    first = job_deepspeed_config(path, **settings)
    misses = _merged_file.cache_info().misses
    first["optimizer"]["params"]["lr"] = 1.0  # DeepSpeed may change what it is given
    second = job_deepspeed_config(path, **settings)
    assert _merged_file.cache_info().misses == misses  # the file was not merged again
    assert second == build_deepspeed_config(path, **OURS) and second["optimizer"]["params"]["lr"] == 0.0


def test_agreeing_values_in_the_file_are_accepted():
    raw = {"zero_optimization": {"stage": 1}, "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4,
           "gradient_accumulation_steps": 1, "gradient_clipping": 1,
           "optimizer": {"type": "AdamW",
                         "params": {"betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.02}}}
    assert build_deepspeed_config(raw, **OURS)["gradient_clipping"] == 1.0


@pytest.mark.parametrize("key,section,value,ours", [
    ("train_batch_size", None, 64, "8"),
    ("train_micro_batch_size_per_gpu", None, 32, "4"),
    ("gradient_accumulation_steps", None, 2, "1"),
    ("gradient_clipping", None, 0.5, "1.0"),
    ("lr", "optimizer", 1e-4, "0.0"),
    ("betas", "optimizer", [0.9, 0.999], "(0.9, 0.98)"),
    ("eps", "optimizer", 1e-6, "1e-08"),
    ("weight_decay", "optimizer", 0.1, "0.02"),
])
def test_conflicting_value_names_file_key_both_values_and_fix(tmp_path, key, section, value, ours):
    raw = {"zero_optimization": {"stage": 2}}
    if section == "optimizer":
        raw["optimizer"] = {"type": "AdamW", "params": {key: value}}
    else:
        raw[key] = value
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError) as err:
        build_deepspeed_config(path, **OURS)
    message = str(err.value)
    assert str(path) in message and key in message and repr(value) in message and ours in message
    assert "remove the key" in message


def test_all_conflicts_reported_at_once():
    raw = {"zero_optimization": {"stage": 2}, "train_batch_size": 64, "gradient_clipping": 0.5}
    with pytest.raises(ValueError, match=r"(?s)train_batch_size.*gradient_clipping"):
        build_deepspeed_config(raw, **OURS)


@pytest.mark.parametrize("stage", [0, 4, "3", None])
def test_unknown_zero_stage_raises(stage):
    raw = {"zero_optimization": {"stage": stage}} if stage is not None else {}
    with pytest.raises(ValueError, match=r"zero_optimization\.stage = .* one of \(1, 2, 3\)"):
        build_deepspeed_config(raw, **OURS)


@pytest.mark.parametrize("extra,pattern", [
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"optimizer": {"type": "SGD", "params": {}}}, "optimizer.type = 'SGD'"),
    ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, "adam_w_mode"),
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"bf16": {"enabled": True}}, "bf16.enabled = true disagrees .* 'fp32'"),
])
def test_unsupported_settings_raise(extra, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_deepspeed_config({"zero_optimization": {"stage": 2}, **extra}, **OURS)


def test_missing_file_and_bad_precision():
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_deepspeed_config("nope.json", **OURS)
    with pytest.raises(ValueError, match="precision"):
        build_deepspeed_config({"zero_optimization": {"stage": 2}}, **OURS, precision="fp16")


# ----- 2 ranks vs. single process -----

@functools.cache
def adamw_reference() -> dict:
    """The same job on one process: SingleProcessBackend on the whole global batch, world size 1."""
    backend = SingleProcessBackend(tiny_model(seed=0), device=torch.device("cpu"), betas=BETAS,
                                   weight_decay=WEIGHT_DECAY, eps=EPS)
    params = dict(backend.model.named_parameters())
    loss_fn = GlobalContrastiveLoss(SPEC)

    def grads_of(index: int) -> dict:
        forward_backward(backend, loss_fn, *global_batch(index, WORLD), offset=0)
        return {name: p.grad.detach().clone() for name, p in params.items() if p.grad is not None}

    def weights() -> dict:
        return {name: p.detach().clone() for name, p in params.items()}

    def moments() -> dict:  # copies: the single-process backend returns its live state tensors
        return {name: (m.clone(), v.clone()) for name, (m, v) in backend.full_moments().items()}

    out = {"osr_grads": [], "osr_norms": []}
    for index in range(OSR_STEPS):
        out["osr_grads"].append(grads_of(index))
        out["osr_norms"].append(backend.step(lr=0.0))
    out["osr_moments"] = moments()
    out["finetune_grads"] = grads_of(FINETUNE_BATCH)
    backend.step(lr=LR, grad_clip=GRAD_CLIP)
    out["finetune_weights"] = weights()
    backend.reset_optimizer_state()
    out["reset_grads"] = grads_of(RESET_BATCH)
    backend.step(lr=LR)
    out["reset_step_weights"], out["reset_step_moments"] = weights(), moments()
    return out


def decay_names() -> set[str]:
    model = tiny_model(seed=0)
    decayed = {id(p) for p in adamw_param_groups(model, WEIGHT_DECAY)[1]["params"]}
    return {name for name, p in model.named_parameters() if id(p) in decayed}


def adamw_by_hand(w, m, v, *, t: int, decay: bool):
    """torch AdamW's update (decoupled weight decay, bias correction with step t), in float64."""
    w, m, v = w.double(), m.double(), v.double()
    b1, b2 = BETAS
    if decay:
        w = w * (1 - LR * WEIGHT_DECAY)
    return w - LR / (1 - b1**t) * m / (v.sqrt() / (1 - b2**t) ** 0.5 + EPS)


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (0 when both vanish)."""
    scale = expected.double().abs().max().item()
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_all_close(actual: dict, expected: dict, *, tol: float, what: str) -> float:
    assert actual.keys() == expected.keys(), f"{what}: names differ"
    errs = {name: rel_err(actual[name], expected[name]) for name in expected}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, f"{what}: {worst} off by {errs[worst]:.2e} (relative to its max)"
    return errs[worst]


def updates(after: dict, before: dict) -> dict:
    return {name: after[name].double() - before[name].double() for name in after}


def assert_updates_close(actual: dict, expected: dict, moments: dict, *, tol: float, noise_tol: float,
                         what: str) -> tuple[float, float]:
    """Updates agree to `tol` where the gradient is resolved in float32, to `noise_tol` everywhere.

    AdamW normalises each element by sqrt(v): an element whose gradient is ~1e-4 of its tensor's
    largest carries float32 summation noise of ~1 %, and its update (~lr) carries that noise too.
    Resolved elements: sqrt(v) >= 1 % of the tensor's largest.
    """
    errs = {}
    for name, (_, v) in moments.items():
        root = v.double().sqrt()
        keep = root >= 1e-2 * root.max()
        diff = (actual[name] - expected[name])[keep].abs().max().item() if keep.any() else 0.0
        scale = expected[name].abs().max().item()
        errs[name] = diff / scale if scale > 0 else diff
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, f"{what}: {worst} off by {errs[worst]:.2e} on resolved elements"
    return errs[worst], assert_all_close(actual, expected, tol=noise_tol, what=f"{what} (all elements)")


def exp_avg(moments: dict) -> dict:
    return {name: m for name, (m, _) in moments.items()}


def exp_avg_sq(moments: dict) -> dict:
    return {name: v for name, (_, v) in moments.items()}


def ema(grads: list[dict], beta: float, *, power: int) -> dict:
    """(1 - beta) sum_s beta^(T-1-s) g_s^power: Adam's moment after T steps from zero."""
    last = len(grads) - 1
    return {name: sum((1 - beta) * beta ** (last - s) * g[name].double() ** power
                      for s, g in enumerate(grads))
            for name in grads[0]}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3, "fsdp"])
def test_zero_stage_matches_single_process(stage, tmp_path):
    rank0, rank1 = run_ranks("tests.helpers.dist_cases_deepspeed:zero_stage_checks", world_size=WORLD, stage=stage,
                             checkpoint_dir=str(tmp_path / "ckpt"))
    ref = adamw_reference()
    decay = decay_names()
    b1, b2 = BETAS
    trained = set(ref["osr_moments"])
    w0 = rank0["weights0"]
    ft = rank0["finetune_weights"]
    rs = rank0["reset_step_weights"]

    # Before any step there is no optimizer state (as with torch AdamW).
    assert rank0["moments_before_step"] == {} and rank0["count_before_step"] == 0
    for res in (rank0, rank1):
        # OSR: weights and fp32 masters untouched bit for bit, counter = OSR steps.
        assert res["osr_changed_weights"] == [] and res["osr_changed_masters"] == []
        assert res["osr_count"] == OSR_STEPS and res["finetune_count"] == OSR_STEPS + 1
        assert res["reset_count"] == 0 and res["reset_step_count"] == 1
        if stage == "fsdp":  # saved right after the reset, loaded over a stateful optimizer: no state, same weights
            assert res["reset_loaded_count"] == 0 and res.get("reset_loaded_moments", {}) == {}
            assert res["reset_loaded_differing_weights"] == []
        # Save -> load into a model built from another seed: everything restored exactly.
        assert res["loaded_count"] == res["saved_count"] == 1
        assert res["num_moments"] == res["num_loaded_moments"] == len(trained)
        assert res["loaded_differing_weights"] == [] and res["loaded_differing_masters"] == []
        assert res["loaded_differing_moments"] == []
        assert res["resumed_differing_weights"] == [] and res["resumed_count"] == 2
    assert rank0["osr_norms"] == rank1["osr_norms"]
    torch.testing.assert_close(rank0["osr_norms"], ref["osr_norms"], rtol=1e-5, atol=0)

    # OSR moments (config clips at GRAD_CLIP, OSR must not): the single-process engine's, and the
    # EMA of the raw global-batch gradients at w0 (the batch discarded by zero_grad left no trace).
    osr_m, osr_v = exp_avg(rank0["osr_moments"]), exp_avg_sq(rank0["osr_moments"])
    assert_all_close(osr_m, exp_avg(ref["osr_moments"]), tol=1e-5, what="OSR m vs single")
    assert_all_close(osr_v, exp_avg_sq(ref["osr_moments"]), tol=1e-5, what="OSR v vs single")
    assert_all_close(osr_m, ema(ref["osr_grads"], b1, power=1), tol=1e-5, what="OSR m vs EMA of gradients")
    assert_all_close(osr_v, ema(ref["osr_grads"], b2, power=2), tol=1e-5, what="OSR v vs EMA of g^2")

    # Fine-tuning step (clipping on): AdamW by hand from the seeded moments with t = OSR steps + 1.
    clip = GRAD_CLIP / (rank0["finetune_norm"] + 1e-6)
    assert clip < 1.0  # the step did clip
    g_ft = ref["finetune_grads"]
    seeded_m = {n: b1 * osr_m[n].double() + (1 - b1) * clip * g_ft[n].double() for n in trained}
    assert_all_close(exp_avg(rank0["finetune_moments"]), seeded_m, tol=1e-5,
                     what="fine-tuning m vs seeded EMA of the clipped gradient")
    by_hand = {n: adamw_by_hand(w0[n], *rank0["finetune_moments"][n], t=OSR_STEPS + 1, decay=n in decay)
               for n in trained}
    ft_update = updates({n: ft[n] for n in trained}, w0)
    assert_all_close(ft_update, updates(by_hand, w0), tol=2e-5, what="fine-tuning update vs AdamW by hand")
    assert_updates_close(ft_update, updates({n: ref["finetune_weights"][n] for n in trained}, w0),
                         rank0["finetune_moments"], tol=3e-5, noise_tol=1e-2,
                         what="fine-tuning update vs single process")
    frozen = set(w0) - trained
    assert frozen == {"logit_scale"} and all(torch.equal(ft[n], w0[n]) for n in frozen)

    # Reset: zero moments and counter; the next step is a fresh AdamW's first step.
    assert all(not m.any() and not v.any() for m, v in rank0["reset_moments"].values())
    m1, v1 = exp_avg(rank0["reset_step_moments"]), exp_avg_sq(rank0["reset_step_moments"])
    assert_all_close(v1, {n: (1 - b2) / (1 - b1) ** 2 * m1[n].double() ** 2 for n in trained}, tol=1e-5,
                     what="moments after reset carry one gradient only")
    assert_all_close(m1, ema([ref["reset_grads"]], b1, power=1), tol=2e-5, what="m after reset vs single")
    fresh = {n: adamw_by_hand(ft[n], m1[n], v1[n], t=1, decay=n in decay) for n in trained}
    rs_update = updates({n: rs[n] for n in trained}, ft)
    assert_all_close(rs_update, updates(fresh, ft), tol=2e-5, what="first step after reset vs AdamW by hand")
    ref_ft, ref_rs = ref["finetune_weights"], ref["reset_step_weights"]
    assert_updates_close(rs_update, updates({n: ref_rs[n] for n in trained}, ref_ft),
                         rank0["reset_step_moments"], tol=3e-5, noise_tol=1e-2,
                         what="first step after reset vs single process")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero3_bf16.json", "fsdp"])
def test_bf16_osr_leaves_weights_and_masters_untouched(config):
    rank0, rank1 = run_ranks("tests.helpers.dist_cases_deepspeed:bf16_osr_checks", world_size=WORLD,
                             config=config)
    for res in (rank0, rank1):
        # DeepSpeed keeps bf16 weights beside fp32 masters; FSDP2 keeps fp32 shards and gathers bf16 copies.
        assert res["weight_dtypes"] == ["torch.float32" if config == "fsdp" else "torch.bfloat16"]
        assert res["block_dtypes"] == ["torch.bfloat16"]
        assert res["osr_changed_weights"] == [] and res["osr_changed_masters"] == []
        assert res["osr_count"] == OSR_STEPS
    # fp32 moments of a bf16 forward/backward: the fp32 single-process moments to bf16 precision.
    ref = adamw_reference()
    assert_all_close(exp_avg(rank0["osr_moments"]), exp_avg(ref["osr_moments"]), tol=0.15,
                     what="bf16 OSR m vs fp32")


def _assert_same_full_state(a: dict, b: dict) -> None:
    assert a["count"] == b["count"]
    for key in ("weights", "masters"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for name, (m, v) in a["moments"].items():
        assert torch.equal(m, b["moments"][name][0]) and torch.equal(v, b["moments"][name][1]), name


@pytest.mark.slow
@pytest.mark.parametrize("stage,back_to_two", [(2, True), (3, False), ("fsdp", True)])
def test_checkpoint_resharded_to_another_world_size_is_exact(tmp_path, stage, back_to_two):
    """2 ranks -> 1 rank (and 1 -> 2) through DeepSpeed's universal checkpoint (DCP's resharding load for
    FSDP2): weights, fp32 masters, moments and step counter carry over bit for bit. FSDP2's 2-rank save is a
    background one (run.async_checkpoint) with two training steps changing the state while it is written."""
    two = run_ranks("tests.helpers.dist_cases_deepspeed:reshard_round", world_size=2, stage=stage,
                    save_dir=str(tmp_path / "two"), load_dir=None, background=stage == "fsdp")[0]
    # A universal folder found in the checkpoint is never trusted: code planted there must not run.
    marker = tmp_path / "ran"
    planted = tmp_path / "two" / "universal"
    (planted / "zero" / "visual.proj").mkdir(parents=True)
    torch.save({"x": Planted(str(marker))}, planted / "mp_rank_00_model_states.pt")
    torch.save({"param": Planted(str(marker))}, planted / "zero" / "visual.proj" / "fp32.pt")
    (planted / "zero" / "optimizer_state.pt").write_bytes((planted / "mp_rank_00_model_states.pt").read_bytes())
    one = run_ranks("tests.helpers.dist_cases_deepspeed:reshard_round", world_size=1, stage=stage,
                    save_dir=str(tmp_path / "one"), load_dir=str(tmp_path / "two"))[0]
    assert not marker.exists()
    assert two["count"] == OSR_STEPS + 1
    _assert_same_full_state(two, one)
    if back_to_two:
        again = run_ranks("tests.helpers.dist_cases_deepspeed:reshard_round", world_size=2, stage=stage,
                          save_dir=str(tmp_path / "again"), load_dir=str(tmp_path / "one"))[0]
        _assert_same_full_state(one, again)


def test_checkpoint_with_code_in_a_pickle_is_refused_before_loading(tmp_path):
    from engine.backends.deepspeed import vet_checkpoint_folder

    folder = tmp_path / "deepspeed"
    folder.mkdir()
    torch.save({"module": {"w": torch.zeros(2)}, "param_shapes": [{"w": torch.Size([2])}]},
               folder / "mp_rank_00_model_states.pt")
    vet_checkpoint_folder(folder, expected_names={"w"})  # plain tensors, known names pass
    with pytest.raises(ValueError, match="names parameter 'w', which the model does not have"):
        vet_checkpoint_folder(folder, expected_names={"v"})
    marker = tmp_path / "ran"
    torch.save({"state": Planted(str(marker))}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match="needs more than tensors"):
        vet_checkpoint_folder(folder, expected_names={"w"})
    assert not marker.exists()


def test_frozen_values_file_is_vetted(tmp_path):
    """A checkpoint's fp32 values of frozen parameters: safetensors naming the model's own parameters, float32."""
    from safetensors.torch import save_file

    from engine.backends.deepspeed import read_frozen_values
    from engine.safe_load import UnsafeFileError

    path = tmp_path / "frozen_fp32.safetensors"
    save_file({"logit_scale": torch.tensor([2.9])}, str(path))
    assert torch.equal(read_frozen_values(path, expected_numel={"logit_scale": 1})["logit_scale"], torch.tensor([2.9]))
    with pytest.raises(UnsafeFileError, match="names parameter 'logit_scale', which the model does not have"):
        read_frozen_values(path, expected_numel={"logit_bias": 1})
    for wrong in (torch.tensor([2.9], dtype=torch.bfloat16), torch.tensor([2.9, 2.9])):
        save_file({"logit_scale": wrong}, str(path))
        with pytest.raises(ValueError, match="not 1 float32"):
            read_frozen_values(path, expected_numel={"logit_scale": 1})
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    with pytest.raises(UnsafeFileError, match="symlink"):
        read_frozen_values(link, expected_numel={"logit_scale": 1})
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read"):
        read_frozen_values(path, expected_numel={"logit_scale": 1})


def test_first_launch_build_of_the_cpu_communication_op_is_foreseen(tmp_path, monkeypatch):
    """The log line before DeepSpeed compiles its shared-memory op appears only when that op will be built."""
    from deepspeed.accelerator import get_accelerator

    from engine.backends.deepspeed.shm import shm_op_build_folder

    if get_accelerator().device_name() != "cpu":
        pytest.skip("the shared-memory op is DeepSpeed's CPU accelerator's")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty build cache: a first launch
    folder = shm_op_build_folder()
    assert folder is not None and folder.parent == tmp_path
    (folder / f"{folder.name}.so").write_bytes(b"")  # built by an earlier launch
    assert shm_op_build_folder() is None
