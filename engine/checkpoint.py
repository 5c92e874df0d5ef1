"""Checkpoints: one folder = one consistent state of every stateful part, written atomically.

Layout under `<out_dir>/checkpoints/`:
  step_00001234/<part>/       a folder part's own files (`save(directory)`: backend partitions,
                              the normaliser's rows)
  step_00001234/ranks/<part>/rank_00000.json   per-rank parts (each rank's data position)
  step_00001234/state.json    the JSON parts (`state_dict()`: trainer position, schedules)
  step_00001234/COMPLETE      written last: the size of every file in the folder, an id, and the
                              earlier folders (name -> their id) a part's files apply on (the u
                              table's base and deltas); folders without it, whose files no longer
                              have those sizes, or whose required folders are gone, damaged or
                              saved again since, are skipped
  step_00001000/COMPLETE      of a folder kept only because a kept checkpoint requires it: `trimmed_to`
  step_00001000/normaliser/   names the parts it keeps (those saved as deltas), `files` lists only theirs;
                              never a checkpoint to resume, evaluate, export or reuse (`latest` skips it)
  latest                      name of the newest complete folder (replaced atomically)

A save is staged in a `.partial-*` folder and renamed once every rank has finished, so a crash
during a save leaves the previous checkpoint intact. Re-saving an existing step first renames
the old folder away (`.old-*`), so at every instant some complete checkpoint exists.

Background saves (`async_save=True`, parts declaring `supports_async_save`): the part copies its state to host
memory and returns a future while its files are written; the JSON parts are written at once. The
checkpoint counts only when every write has finished: rank 0 renames the staging folder (COMPLETE,
`latest`, old ones purged) at the first `poll()` after that, or in `wait()`, which also reports a
failed write. A crash during a background write leaves a `.partial-*` folder that is never loaded:
`latest` still names the previous checkpoint. One background save at a time (`save` waits for the
previous one first).

Parts saved as deltas (the u table) say which earlier checkpoints they need (`required_checkpoints()`, rank 0,
right after their save) and hear when a save counts (`checkpoint_saved(final)`, rank 0). The purge keeps the
last `keep_last_n` whole complete checkpoints; every older folder one of them requires is trimmed to the files of
those parts (its marker rewritten first, same id, then the rest deleted: crash-safe), the others are removed
(engine/checkpoint_chain.py).

What may be loaded into which job is decided here too (`resume_conflicts`, `osr_reuse_conflicts`).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import reprlib
import shutil
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from engine.checkpoint_chain import (  # noqa: F401 (re-exported: checkpoint folders are read through this module)
    COMPLETE,
    checkpoint_problems,
    is_trimmed,
    purge,
    read_marker,
    required_folders,
    step_folders,
    trimmed_message,
)
from engine.config import JobConfig, field_of, field_rule, keys_with
from engine.distributed import DistContext, barrier, gather_objects
from engine.io import fsync_dir, write_atomic, write_json_atomic

if TYPE_CHECKING:
    from torch import Tensor, nn

    from models import ClipBundle

logger = logging.getLogger(__name__)

STATE = "state.json"
LATEST = "latest"
RANKS = "ranks"
TRAIN_STATE = "train_state"  # the part whose state_dict describes the job (checked before loading)
BACKEND_PART = "backend"  # the folder part holding the backend's own files (model and optimizer state)
FINAL_WEIGHTS = "final.safetensors"  # a finished run's weights, in its run folder
# What each use of a checkpoint reads of its TRAIN_STATE, with the JSON types a value may hold.
_IDENTITY_FIELDS: dict[str, tuple[type, ...]] = {
    "model": (str,), "world_size": (int,), "config": (dict,), "manifest_fingerprint": (str,), "stage": (str,),
    "stage_step": (int,), "osr_surrogate": (str,),
}
OSR_FIELDS = {**_IDENTITY_FIELDS, "osr_steps": (int,), "data_epoch": (int,)}
RESUME_FIELDS = {**OSR_FIELDS, "global_step": (int,), "num_bad_steps": (int,)}


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class FolderStateful(Protocol):
    """A part with its own folder. One that declares `supports_async_save = True` also has
    `save_async(directory) -> Future`, used for background checkpoints."""

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path, *, reshard: bool = False) -> None: ...


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != COMPLETE}


def _describe(exc: OSError, rank: int, where: Path) -> str:
    return f"rank {rank}: {exc.filename or where}: {exc.strerror or exc}"


def is_complete(path: Path) -> bool:
    """Whether `path` is a whole, usable checkpoint (not one trimmed to the u table chain)."""
    return not checkpoint_problems(path) and not is_trimmed(path)


def has_checkpoints(root: Path) -> bool:
    """Whether folder `root` holds a complete checkpoint, or an intact folder trimmed to the u table chain (its
    whole checkpoints removed by hand: still an earlier run's, never to be purged by a fresh one)."""
    return any(not checkpoint_problems(p, chain=False) for p in step_folders(root))


def read_state(path: Path) -> dict[str, dict]:
    """The JSON parts of a complete checkpoint folder (part name -> state_dict)."""
    if is_trimmed(path):
        raise ValueError(trimmed_message(path))
    problems = checkpoint_problems(path)
    if problems:
        raise FileNotFoundError(
            f"{path} is not a usable checkpoint ({'; '.join(problems[:3])}); resume from `latest` "
            "or an earlier step_* folder"
        )
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path / STATE} is not valid JSON ({exc}); use another step_* folder") from None
    if _model_of(state) is None:
        raise ValueError(f"{path / STATE} holds no {TRAIN_STATE} part naming its model: not a checkpoint this "
                         "engine wrote; use another step_* folder")
    return state


def _model_of(state: object) -> str | None:
    """The model name a checkpoint's JSON parts name in TRAIN_STATE; None when they do not."""
    train_state = state.get(TRAIN_STATE) if isinstance(state, dict) else None
    model = train_state.get("model") if isinstance(train_state, dict) else None
    return model if isinstance(model, str) else None


def train_state_problems(saved: dict, fields: dict[str, tuple[type, ...]]) -> list[str]:
    """Which of `fields` a checkpoint's TRAIN_STATE `saved` lacks or holds with another JSON type."""
    problems = []
    for name, types in fields.items():
        value = saved.get(name, ...)
        if value is ...:
            problems.append(f"{TRAIN_STATE}.{name} is missing")
        elif not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            kinds = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{TRAIN_STATE}.{name} is {reprlib.repr(value)}, not {kinds}")
    return problems


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete `step_*` folder of `root` (what `latest` means), skipping broken ones with a warning
    and trimmed ones (links of the u table chain) silently."""
    for candidate in reversed(step_folders(root)):
        if is_trimmed(candidate):
            continue
        problems = checkpoint_problems(candidate)
        if not problems:
            return candidate
        logger.warning("skipping checkpoint %s: %s", candidate, "; ".join(problems[:3]))
    return None


def is_checkpoint_folder(path: Path) -> bool:
    """Whether `path` looks like a checkpoint folder (complete or not; `read_state` tells which)."""
    path = Path(path)
    return path.is_dir() and ((path / STATE).exists() or (path / COMPLETE).exists())


def resolve_latest(weights: str | Path | None) -> str | Path | None:
    """`weights`, or for a run's `checkpoints/latest` pointer the checkpoint folder it means (as --resume latest)."""
    if weights is None or Path(weights).name != LATEST or not Path(weights).is_file():
        return weights
    found = latest_checkpoint(Path(weights).parent)
    if found is None:
        raise FileNotFoundError(f"--weights {weights}: no complete checkpoint in {Path(weights).parent}; pass a "
                                "weights file or a finished run's folder")
    return found


def resolve_weights(weights: str | None) -> Path | None:
    """`weights`, or the final weights of a run folder given instead, or a checkpoint folder (read only)."""
    weights = resolve_latest(weights)
    if not weights or not Path(weights).is_dir() or is_checkpoint_folder(Path(weights)):
        return Path(weights) if weights else None
    final = Path(weights) / FINAL_WEIGHTS
    if not final.is_file():
        raise FileNotFoundError(f"{weights} is a folder without {FINAL_WEIGHTS}; pass a weights file "
                                f"(e.g. {Path(weights) / 'best.safetensors'}), a finished run's folder or a "
                                f"checkpoint folder ({Path(weights) / 'checkpoints' / 'step_<N>'})")
    return final


def checkpoint_weights(step_dir: Path, model: nn.Module) -> dict[str, Tensor]:
    """The model weights held by the checkpoint folder `step_dir` (`checkpoints/step_N` of a run on any
    backend and number of ranks) as a state dict for `model` (its shapes and dtypes), read in one process."""
    from engine.backends import backend_class

    job = read_state(Path(step_dir))[TRAIN_STATE]
    weights = backend_class(job["config"]["run"]["backend"]).read_weights(Path(step_dir) / BACKEND_PART, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    if missing:
        raise ValueError(f"{step_dir} lacks {len(missing)} of the model's tensors ({', '.join(missing[:3])}); "
                         f"it is a checkpoint of {job['model']!r}")
    return {name: weights[name].reshape(tensor.shape).to(tensor.dtype) for name, tensor in own.items()}


def build_model_from(name: str, kwargs: dict, weights: str | Path | None, *,
                     seed: int | None = None) -> ClipBundle:
    """`models.build_model(name, weights=weights, ...)`, where `weights` may also be a checkpoint folder
    (`checkpoints/step_N` of a run on any backend and number of ranks): its weights are read in this process
    (FSDP2: DCP; DeepSpeed: zero_to_fp32 after vetting its pickles) and nothing is written there."""
    from models import build_model

    weights = resolve_latest(weights)
    if weights is None or not is_checkpoint_folder(Path(weights)):
        return build_model(name, **{**kwargs, "weights": weights}, seed=seed)
    trained = read_state(Path(weights))[TRAIN_STATE]["model"]
    if trained != name:
        raise ValueError(f"--weights {weights} is a checkpoint of model {trained!r}, not {name!r}; "
                         f"pass --model {trained}")
    from models.factory import weights_loaded_after
    from models.weights import load_weights, log_loaded_weights

    with weights_loaded_after():
        bundle = build_model(name, **{**kwargs, "weights": None}, seed=seed)
    num_tensors = load_weights(bundle.model, checkpoint_weights(Path(weights), bundle.model), source=weights)
    log_loaded_weights(weights, bundle.model_name, num_tensors)
    return bundle


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (disk full, permissions); nothing of it was kept."""


@dataclass
class _Pending:
    """A checkpoint whose folder parts are still being written in the background."""

    step: int
    staging: Path
    final: Path
    futures: list[Future]
    requires: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    finalised: bool = False


class CheckpointManager:
    """`save(step)` / `load(spec)` of a dict of stateful parts, for one run directory.

    `parts`: name -> object with `state_dict`/`load_state_dict` (kept in state.json), with
    `save(directory)`/`load(directory)` (its own folder, collective), or both. `rank_parts`: name ->
    Stateful whose state differs per rank (each rank writes its own file). The `train_state` part
    describes the job; `load` checks it against the live one before touching anything.
    `async_save`: folder parts declaring `supports_async_save` write through `save_async(directory) -> Future`
    in the background
    (see the module doc); call `poll()` now and then and `wait()` before the job ends.
    """

    def __init__(self, root: Path, ctx: DistContext, *, parts: dict[str, Any],
                 rank_parts: dict[str, Stateful] | None = None, keep_last_n: int = 2, async_save: bool = False):
        self.root = Path(root)
        self.ctx = ctx
        self.parts = parts
        self.rank_parts = rank_parts or {}
        self.keep_last_n = keep_last_n
        self.async_save = async_save
        self._pending: _Pending | None = None

    # ----- save -----
    def save(self, step: int) -> Path:
        """Write a checkpoint of `step` on every rank (collective); returns its folder.

        With background writes the folder exists only once `poll` or `wait` has seen them finish.
        """
        self.wait()
        final = self.root / f"step_{step:08d}"
        staging = self.root / f".partial-step_{step:08d}"
        if self.ctx.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        futures, requires = [], []
        try:
            futures, requires = self._write_parts(staging, step)
            failure = None
        except OSError as exc:  # disk full, quota, permissions: reported below on every rank
            failure = _describe(exc, self.ctx.rank, staging)
        failures = [f for f in gather_objects(failure) if f]  # also: every rank's files are written
        if failures:
            self._abandon(staging, step, failures)
        if futures:
            self._pending = _Pending(step, staging, final, futures, requires)
            logger.info("checkpoint of step %d: writing in the background", step)
            return final
        if self.ctx.is_main:
            self._finalise(staging, final, requires)
        barrier()
        return final

    def poll(self) -> None:
        """Make a finished background checkpoint count (rank 0 renames it; no collective, any rank may call).

        Rank 0's write finishing means every rank's has: DCP's last phase gathers every rank's write results
        on rank 0 before it writes the metadata. Failures wait for `wait()`, where every rank reports them.
        """
        pending = self._pending
        if pending is None or pending.finalised or not all(f.done() for f in pending.futures):
            return
        if any(f.exception() is not None for f in pending.futures):
            return
        if self.ctx.is_main:
            self._finalise(pending.staging, pending.final, pending.requires)
            logger.info("checkpoint of step %d written in the background in %.1f s", pending.step,
                        time.perf_counter() - pending.started)
        pending.finalised = True

    def wait(self) -> Path | None:
        """Wait for the background checkpoint, if any, and make it count (collective); raises
        CheckpointWriteError if its write failed on some rank (the previous checkpoint stays)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        failure = None
        for future in pending.futures:
            try:
                future.result()
            except OSError as exc:
                failure = _describe(exc, self.ctx.rank, pending.staging)
            except Exception as exc:  # noqa: BLE001 (reported on every rank below)
                failure = f"rank {self.ctx.rank}: {type(exc).__name__}: {str(exc).strip()[:300]}"
        failures = [f for f in gather_objects(failure) if f]
        if failures:
            self._abandon(pending.staging, pending.step, failures)
        if self.ctx.is_main and not pending.finalised:
            self._finalise(pending.staging, pending.final, pending.requires)
        barrier()
        return pending.final

    @property
    def pending_step(self) -> int | None:
        """The step of a background checkpoint not yet waited for (None: none)."""
        return None if self._pending is None else self._pending.step

    def _finalise(self, staging: Path, final: Path, requires: list[str] = ()) -> None:
        """Rank 0: mark the staged folder complete, move it into place, point `latest` at it, purge old ones."""
        marker = {"files": _file_sizes(staging), "id": uuid.uuid4().hex}
        if requires:  # each by the id it has now: a folder saved again since is not the one this save applies on
            marker["requires"] = {name: read_marker(self.root / name).get("id") for name in requires}
        write_json_atomic(staging / COMPLETE, marker, indent=1)
        old = self.root / f".old-{final.name}"
        if final.exists():  # the same step saved again: move the old copy away atomically first
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(staging, final)
        fsync_dir(self.root)
        shutil.rmtree(old, ignore_errors=True)
        write_atomic(self.root / LATEST, final.name + "\n")
        for part in self.parts.values():
            if hasattr(part, "checkpoint_saved"):
                part.checkpoint_saved(final)
        self._purge()
        logger.info("checkpoint saved: %s", final)

    def _write_parts(self, staging: Path, step: int) -> tuple[list[Future], list[str]]:
        """Every part's files; returns the futures of parts writing in the background and (rank 0) the earlier
        checkpoint folders the parts' files apply on."""
        futures, requires = [], []
        for name, part in self.parts.items():
            if isinstance(part, FolderStateful):
                if self.async_save and getattr(part, "supports_async_save", False):
                    futures.append(part.save_async(staging / name))
                else:
                    part.save(staging / name)
                if self.ctx.is_main and hasattr(part, "required_checkpoints"):
                    requires += [n for n in part.required_checkpoints() if n not in requires]
        for name, part in self.rank_parts.items():
            write_json_atomic(staging / RANKS / name / f"rank_{self.ctx.rank:05d}.json", part.state_dict())
        if self.ctx.is_main:
            states = {name: part.state_dict() for name, part in self.parts.items() if isinstance(part, Stateful)}
            write_json_atomic(staging / STATE, {**states, "step": step})
        return futures, requires

    def _abandon(self, staging: Path, step: int, failures: list[str]) -> None:
        """Remove a save that failed on some rank and raise one message saying why and what is intact."""
        barrier()
        if self.ctx.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        barrier()
        previous = [p for p in step_folders(self.root) if is_complete(p)]
        needed = sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file()) if previous else 0
        free = shutil.disk_usage(self.root).free
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(
            f"checkpoint of step {step} could not be written ({'; '.join(failures[:3])}); {free:,} bytes free "
            f"in {self.root}, a checkpoint takes about {needed:,}; {kept}; free space (or fix the folder) and "
            "continue with --resume latest"
        )

    def _purge(self) -> None:
        if self.keep_last_n > 0:  # parts saved as deltas keep their files in the folders later ones apply on
            chain_parts = [name for name, part in self.parts.items() if hasattr(part, "required_checkpoints")]
            purge(self.root, keep_last_n=self.keep_last_n, chain_parts=chain_parts)

    # ----- find and load -----
    def find(self, spec: str) -> Path:
        """`latest` (newest complete folder) or a path to a checkpoint folder."""
        if spec != "latest":
            path = Path(spec)
            read_state(path)
            return path
        found = latest_checkpoint(self.root)
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.root}; start without --resume")
        return found

    def has_checkpoints(self) -> bool:
        return has_checkpoints(self.root)

    def load(self, spec: str, *, purpose: str = "resume", can_reshard: bool = False) -> dict[str, dict]:
        """Restore every part from checkpoint `spec` (`latest` or a folder); returns its JSON states.

        `purpose="resume"`: everything, checked by `resume_conflicts`; per-rank parts: each rank its own
        when the world size is unchanged, else every old rank's states to `load_rank_states` (parts that
        have it; the return value is kept as `<name>_left`). `purpose="osr"`: the folder parts (moments, estimates) of an
        end-of-OSR checkpoint, checked by `osr_reuse_conflicts`; the caller takes what it needs from
        the returned states. Raises ValueError naming every conflict, before anything is changed.
        """
        path = self.find(spec)
        saved = read_state(path)
        live = self.parts[TRAIN_STATE].state_dict()
        check = {"resume": resume_conflicts, "osr": osr_reuse_conflicts}[purpose]
        fields = RESUME_FIELDS if purpose == "resume" else OSR_FIELDS
        damaged = train_state_problems(saved[TRAIN_STATE], fields)
        if damaged:
            raise ValueError(f"{path / STATE}: {'; '.join(damaged[:3])}: not a checkpoint this engine wrote; "
                             "use another step_* folder")
        problems = check(saved[TRAIN_STATE], live, can_reshard=can_reshard)
        if problems:
            what = "resume from" if purpose == "resume" else "reuse OSR statistics from"
            raise ValueError(f"cannot {what} {path}:\n  - " + "\n  - ".join(problems))
        same_world = saved[TRAIN_STATE]["world_size"] == self.ctx.world_size
        for name, part in self.parts.items():
            if isinstance(part, FolderStateful):
                self._load_folder(name, part, path, reshard=not same_world)
        if purpose == "resume":
            for name, part in self.parts.items():
                if isinstance(part, Stateful) and name in saved:
                    part.load_state_dict(saved[name])
            for name, part in self.rank_parts.items():
                if same_world:  # exact data position, skip counts included
                    state_file = path / RANKS / name / f"rank_{self.ctx.rank:05d}.json"
                    part.load_state_dict(json.loads(state_file.read_text()))
                elif hasattr(part, "load_rank_states"):  # continued from every old rank's state
                    old_size = saved[TRAIN_STATE]["world_size"]
                    states = [json.loads((path / RANKS / name / f"rank_{r:05d}.json").read_text())
                              for r in range(old_size)]
                    saved[f"{name}_left"] = part.load_rank_states(states)
        saved["path"] = str(path)
        return saved

    def _load_folder(self, name: str, part: FolderStateful, path: Path, *, reshard: bool) -> None:
        try:
            part.load(path / name, reshard=reshard)
        except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise ValueError(
                f"checkpoint {path} could not be loaded ({name}: {type(exc).__name__}: {reason}); "
                f"resume from an earlier one: --resume {self.root}/step_<N>"
            ) from exc


# ----- what may be loaded into which job -----

# The rules live on the config fields (engine/config/ `setting(..., resume=..., osr=...)`); these are read from them.
# Settings that define recovered OSR statistics: reusing them needs the same values.
OSR_DEFINING_KEYS = keys_with("osr", True)
# Schedule-only settings a resumed run may change (e.g. a lower lr after non-finite steps); logged.
SCHEDULE_KEYS = keys_with("resume", "schedule", "may_grow")
# Schedule settings a resumed run may only raise (more fine-tuning epochs extend the run).
GROW_ONLY_KEYS = keys_with("resume", "may_grow")
# Settings that may change between a run and its resumption (they do not change the method).
RESUME_FREE_KEYS = keys_with("resume", "may_change", "schedule", "may_grow")


def schedule_changes(saved: dict, live: dict) -> list[str]:
    """The schedule-only settings (SCHEDULE_KEYS) a resuming job changes, as 'key: old -> new'."""
    old, new = saved_config(saved), flatten(live["config"])
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in SCHEDULE_KEYS if old.get(key) != new.get(key)]


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def saved_config(saved: dict) -> dict:
    """A checkpoint's config, flattened; a field added to the engine after the checkpoint was written (absent
    there) takes its default, which is what the run it belongs to did."""
    old = flatten(saved["config"])
    present = {field_of(key) for key in old}
    defaults = flatten(JobConfig().to_dict())
    return {**{key: value for key, value in defaults.items() if field_of(key) not in present}, **old}


def resume_conflicts(saved: dict, live: dict, *, can_reshard: bool) -> list[str]:
    """What differs between a checkpoint's job and the job trying to resume it (empty = compatible)."""
    problems = []
    if saved["manifest_fingerprint"] != live["manifest_fingerprint"]:
        problems.append("the training data (manifest fingerprint) differs from the checkpoint's")
    if saved["model"] != live["model"]:
        problems.append(f"model {live['model']!r} != checkpoint's {saved['model']!r}")
    if saved["world_size"] != live["world_size"] and not can_reshard:
        problems.append(f"world size {live['world_size']} != checkpoint's {saved['world_size']}: this backend "
                        "cannot reshard; resume on the same number of ranks or use run.backend=deepspeed "
                        "(universal checkpoint) or fsdp (resharding load)")
    old, new = saved_config(saved), flatten(live["config"])
    for key in sorted(set(old) | set(new)):
        rule = field_rule(key, "resume")
        if rule == "may_grow" and new.get(key, 0) < old.get(key, 0):
            problems.append(f"config {key}: checkpoint has {old.get(key)!r}, this job {new.get(key)!r}: a resumed "
                            "run may add epochs, not remove them (to stop earlier, use a checkpoint's weights)")
            continue
        if rule != "must_match" or old.get(key) == new.get(key):
            continue
        problems.append(f"config {key}: checkpoint has {old.get(key)!r}, this job {new.get(key)!r}")
    return problems


def osr_reuse_conflicts(saved: dict, live: dict, *, can_reshard: bool = False) -> list[str]:
    """Why recovered statistics (an end-of-OSR checkpoint) cannot seed this job (empty = they can)."""
    if saved["stage"] != "finetune" or saved["stage_step"] != 0:
        return [(f"not an end-of-OSR checkpoint (stage {saved['stage']}, step {saved['stage_step']}); "
                 "use the one `run.py osr` wrote")]
    old, new = saved_config(saved), flatten(live["config"])
    def under(flat: dict, key: str):  # a mapping field (loss.terms) is flattened into its entries
        return flat.get(key, {k: v for k, v in flat.items() if k.startswith(key + ".")} or None)

    problems = [f"{key}: statistics computed with {under(old, key)!r}, this job has {under(new, key)!r}"
                for key in OSR_DEFINING_KEYS if under(old, key) != under(new, key)]
    if saved["osr_surrogate"] != live["osr_surrogate"]:
        problems.append(f"OSR loss {saved['osr_surrogate']!r} != this job's {live['osr_surrogate']!r}")
    if saved["manifest_fingerprint"] != live["manifest_fingerprint"]:
        problems.append("the training data (manifest fingerprint) differs")
    if saved["world_size"] != live["world_size"]:
        problems.append(f"world size {live['world_size']} != {saved['world_size']} of the OSR run")
    return problems
