"""Command line: `python run.py <command>` (tune, osr, finetune, eval, export, shards, demo)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from engine.config import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_MEMBER_BYTES

# Only what `--help` needs is imported here: torch, open_clip and deepspeed load when a command runs.

COMMON_FLAGS = {
    # flag: config key it sets
    "method": "method",
    "train": "data.train",
    "model": "model.name",
    "weights": "model.weights",
    "preset": "model.preset",
    "pretrained_tag": "model.pretrained_tag",
    "out": "run.out_dir",
    "epochs": "run.epochs",
    "osr_epochs": "osr.epochs",
    "lr": "optim.lr",
    "batch_size": "data.batch_size",
    "margin": "loss.margin",
    "surrogate": "loss.surrogate",
    "device": "run.device",
    "resume": "run.resume",
    "osr_from": "osr.load_from",
    "save_every": "run.save_every_steps",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none to show (None, off switches)."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _config_default(key: str):
    from engine.config import JobConfig

    value = JobConfig()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _add_job_args(parser: argparse.ArgumentParser) -> None:
    from engine.config import METHODS, SURROGATE_CHOICES

    choices = {"method": METHODS, "surrogate": SURROGATE_CHOICES}  # shown and checked by argparse
    # Accepted after the subcommand too (where some launchers put it).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with the job configuration (see configs in README)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set loss.margin=0.2 (repeatable)")
    for flag, key in COMMON_FLAGS.items():
        default = _config_default(key)
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default=None, choices=choices.get(flag),
                            help=f"shortcut for --set {key}=..." + (f" (config default: {default})"
                                                                     if default not in (None, "") else ""))
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run of this engine in --out (a folder whose log.jsonl it wrote; "
                             "every removed entry is named); with --resume: continue a finished run, rewriting its "
                             "final weights, summary and later checkpoints")
    parser.add_argument("--no-seed-moments", action="store_true", help="ablation: do not seed AdamW from OSR")
    parser.add_argument("--no-seed-u", action="store_true", help="ablation: do not seed u from OSR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py", description="TuneCLIP-engine: self-supervised CLIP fine-tuning",
                                     formatter_class=HelpFormatter)
    # The deepspeed launcher inserts --local_rank=N right after the script name.
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=HelpFormatter)

    for name, text in (("tune", "OSR (if the method uses it) then fine-tuning, with evaluation"),
                       ("osr", "stage I only: recover AdamW moments and u at frozen weights"),
                       ("finetune", "stage II only (no OSR), e.g. the OpenCLIP / FastCLIP baselines")):
        _add_job_args(sub.add_parser(name, help=text, description=text))

    text = "evaluate a model (weights) on the config's eval tasks; needs no training data or run folder"
    evaluate = sub.add_parser("eval", help=text, description=text)
    evaluate.add_argument("--config", help="YAML file whose eval section lists the tasks")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config field, e.g. --set eval.batch_size=32 (repeatable)")
    for flag, key in EVAL_FLAGS.items():
        evaluate.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default=None,
                              help=f"shortcut for --set {key}=..." + (
                                  "; a weights file, a finished run's folder (its final.safetensors) or a "
                                  "checkpoints/step_N folder of any backend (checkpoints/latest: the newest)" if flag == "weights"
                                  else ""))
    evaluate.add_argument("--tasks", help="YAML file listing the tasks: {zeroshot: [...], retrieval: [...]} "
                                          "as in the eval section (see README)")
    evaluate.add_argument("--out", help="folder to write eval_results.json (clip_benchmark-style), "
                                        "eval_results.jsonl (DataComp-style) and eval_aggregates.json into")

    export = sub.add_parser("export", aliases=["convert"],
                            help="convert a local checkpoint (open_clip, OpenAI state dict or TorchScript, or a "
                                 "run's checkpoints/step_N folder of any backend) to open_clip safetensors")
    export.add_argument("--model", required=True, help="open_clip architecture or shipped config name")
    export.add_argument("--weights", default=None,
                        help="local .safetensors / .bin / .pt (an OpenAI TorchScript .pt too), or a run's "
                             "checkpoints/step_N folder (single, DeepSpeed or FSDP2, any number of ranks; "
                             "checkpoints/latest: the newest); "
                             "hf-hub:/local-dir: models default to their own file")
    export.add_argument("--out", required=True, help="output .safetensors path")
    export.add_argument("--pretrained-tag", dest="pretrained_tag", default=None,
                        help="open_clip pretrained tag of the weights (checks the activation; OpenAI files imply openai)")

    shards = sub.add_parser("shards", help="build or index webdataset shards")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True)
    build = shards_sub.add_parser("build", help="CSV (filepath,caption) or image+caption folder -> shards")
    build.add_argument("source")
    build.add_argument("out_dir")
    build.add_argument("--csv-separator", default=",", help="the CSV's column separator ('\\t' or 'tab': a TSV)")
    build.add_argument("--csv-img-key", default="filepath", help="the CSV's column of image paths")
    build.add_argument("--csv-caption-key", default="caption", help="the CSV's column of captions")
    build.add_argument("--samples-per-shard", type=int, default=1000)
    build.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                       help="skip larger images (width x height), as training does (data.max_image_pixels)")
    build.add_argument("--max-member-bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES,
                       help="skip larger image or caption files, as training skips such members "
                            "(data.max_member_bytes)")
    index = shards_sub.add_parser("index", help="write manifest.json for existing .tar shards")
    index.add_argument("shards", help="directory of .tar files, brace/glob pattern, wids shardindex.json; "
                                      "join several with '::'")
    index.add_argument("--read-tars", action="store_true",
                       help="read every tar (counts + sha256) even where img2dataset/wids declared the counts")
    index.add_argument("--workers", type=int, default=None, help="processes reading tars (default: one per core)")
    check = shards_sub.add_parser("check", help="per-shard data quality report; exit 1 if a shard is broken")
    check.add_argument("shards", help="shard directory or manifest.json (or what `shards index` accepts)")
    check.add_argument("--min-size", type=int, default=0, help="count images smaller than this many pixels a side")
    check.add_argument("--workers", type=int, default=None, help="processes checking shards (default: one per core)")
    check.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                       help="report larger images (width x height) as too big, as training skips them")
    check.add_argument("--max-member-bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES,
                       help="report larger tar members (and sparse ones) as skipped unread, as training skips "
                            "them (data.max_member_bytes)")

    text = ("a grid of fine-tuning runs (--set key=v1,v2,...) from shared recovered OSR statistics, and one report "
            "comparing them")
    sweep = sub.add_parser("sweep", help=text, description=text)
    sweep.add_argument("--config", help="YAML file with the job configuration")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE[,VALUE...]",
                       help="a fixed override, or a grid axis with several comma-separated values (repeatable)")
    sweep.add_argument("--osr-from", default=None,
                       help="recovered OSR statistics (a `run.py osr` checkpoint) every point starts from; "
                            "default: the sweep runs OSR once per value of the axes that define them")
    sweep.add_argument("--out", default=None, help="folder holding one run folder per grid point and report/ "
                                                   "(default: the config's run.out_dir)")

    text = "one self-contained HTML page (+ Markdown twin) comparing run folders: curves, tables, warnings"
    report = sub.add_parser("report", help=text, description=text)
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (run.out_dir of tune / finetune)")
    report.add_argument("--out", default=None,
                        help="folder for report.html, report.md and figures/ (default: RUN_DIRs' parent/report)")

    demo = sub.add_parser("demo", help="self-contained demo on synthetic data (no downloads)")
    demo.add_argument("--out", default="runs/demo", help="folder for the demo's data, runs, table and plot")
    demo.add_argument("--quick", action="store_true", help="smaller and shorter (for tests)")
    demo.add_argument("--overwrite", action="store_true", help="replace --out if an earlier demo wrote it (it holds .tuneclip-demo) and "
                                                                "no job runs there; no other folder is deleted")
    return parser


def job_config_from_args(args: argparse.Namespace):
    from engine.config import load_config

    overrides = list(args.overrides)
    for flag, key in COMMON_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.no_seed_moments:
        overrides.append("osr.seed_moments=false")
    if args.no_seed_u:
        overrides.append("osr.seed_u=false")
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engine.preemption import EXIT_PREEMPTED, Preempted
    rank = os.environ.get("RANK", "0")
    main_rank = rank == "0"  # other ranks log only what is their own (skipped samples) and errors
    # Our loggers at INFO; third-party chatter (open_clip's root-logger INFO lines) at WARNING.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format=("" if main_rank else f"rank {rank} ") + "%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("engine", "models"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO if main_rank else logging.WARNING)
    if not (main_rank or args.verbose):
        from engine.progress import RankFilter

        for handler in logging.root.handlers:
            handler.addFilter(RankFilter())
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    try:
        # On a terminal, log lines go above the progress bar instead of being glued onto it (rank 0 draws it).
        redirect = main_rank and sys.stderr.isatty()
        with logging_redirect_tqdm(loggers=[logging.root]) if redirect else contextlib.nullcontext():
            return _dispatch(args)
    except Preempted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2


# Errors a user can act on: bad input, a stopped run's reason, files and folders the OS refused.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, OSError)


def _one_line(exc: BaseException) -> str:
    """The message of `exc` for an `error:` line (OS errors name the file and the reason)."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.filename:
        hint = {errno.EACCES: "check the folder's permissions or pick another --out",
                errno.EROFS: "the filesystem is read-only; pick another --out",
                errno.ENOSPC: "free space or pick another --out"}.get(exc.errno, "")
        return f"{exc.filename}: {exc.strerror}" + (f"; {hint}" if hint else "")
    return str(exc)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from engine.demo import run_demo

        run_demo(Path(args.out), quick=args.quick, overwrite=args.overwrite)
        return 0
    if args.command == "sweep":
        from engine.config import load_config
        from engine.sweep import run_sweep, split_grid

        out = args.out or load_config(args.config, split_grid(args.overrides)[0]).run.out_dir
        run_dirs, report = run_sweep(args.config, args.overrides, out=out, osr_from=args.osr_from,
                                     local_rank=args.launcher_local_rank)
        print(f"swept {len(run_dirs)} runs; report: {report}")
        return 0
    if args.command == "report":
        from engine.report_page import write_report

        common = Path(os.path.commonpath([str(Path(p).resolve()) for p in args.runs]))
        out = args.out or (common.parent if len(args.runs) == 1 else common) / "report"
        html_path, md_path = write_report(args.runs, out)
        print(f"wrote {html_path} and {md_path}")
        return 0
    if args.command in ("export", "convert"):
        from models import export_model

        bundle = _build_model_from(args.model, {"pretrained_tag": args.pretrained_tag}, args.weights)
        export_model(bundle, bundle.model, args.out)
        print(f"wrote {args.out}")
        return 0
    if args.command == "shards":
        return _shards(args)
    if args.command == "eval":
        return _eval(args)

    try:
        cfg = job_config_from_args(args)  # every field and path checked before torch loads or ranks meet
    except USER_ERRORS:
        if os.environ.get("RANK", "0") != "0":
            return 2  # every rank finds the same problems in the same config: rank 0 prints them, once
        raise
    from engine.heartbeat import is_collective_timeout
    from engine.trainer import Trainer

    local_rank = args.local_rank if args.local_rank is not None else args.launcher_local_rank
    trainer = Trainer(cfg, local_rank=local_rank, overwrite=args.overwrite)
    try:
        if args.command == "tune":
            trainer.tune()
            _report(trainer)
        elif args.command == "osr":
            trainer.tune(finetune=False)
            print(f"recovered statistics: {trainer.checkpoints.find('latest')} (reuse with --osr-from)")
        elif args.command == "finetune":
            trainer.tune(osr=False)
            _report(trainer)
    except RuntimeError as exc:
        if trainer.heartbeat is None or not is_collective_timeout(exc):
            raise
        raise ValueError(trainer.heartbeat.timeout_report(exc)) from exc
    finally:
        trainer.close()
    return 0


def _report(trainer) -> None:
    """Print the end-of-run report (rank 0)."""
    from engine.report import run_report

    if trainer.ctx.is_main:
        print(run_report(trainer.out_dir, metric=trainer.cfg.eval.best_metric))


EVAL_FLAGS = {"model": "model.name", "weights": "model.weights", "preset": "model.preset",
              "pretrained_tag": "model.pretrained_tag", "device": "run.device"}


def _eval(args: argparse.Namespace) -> int:
    """`run.py eval`: one model on the eval tasks; prints a table, writes the results files into --out.

    Under torchrun / deepspeed every rank evaluates its part of each task; rank 0 prints and writes.
    """
    from engine.config import load_config

    overrides = list(args.overrides)
    overrides += [f"{key}={getattr(args, flag)}" for flag, key in EVAL_FLAGS.items() if getattr(args, flag)]
    cfg = load_config(args.config, overrides, base={"eval": _read_task_file(args.tasks)} if args.tasks else None,
                      training=False)  # every field and path checked before torch loads
    from engine.distributed import context_from_env, default_device, destroy_process_group, init_process_group
    from engine.evaluate import (
        Evaluator,
        aggregate_metrics,
        build_tasks,
        results_table,
        write_eval_jsonl,
        write_results,
    )
    from engine.io import write_json_atomic

    tasks = build_tasks(cfg.eval, limits=cfg.data.limits)
    if not tasks:
        raise ValueError("no evaluation tasks: list them in --tasks FILE or under eval.zeroshot / eval.retrieval "
                         "in --config, or --set 'eval.retrieval=[{name: NAME, csv: FILE}]'")
    weights = _weights_file(cfg.model.weights)
    ctx = context_from_env(args.launcher_local_rank)
    init_process_group(ctx, timeout_s=cfg.run.collective_timeout_s)
    try:
        device = default_device(ctx, cfg.run.device)
        bundle = _build_model_from(cfg.model.name, cfg.model.build_kwargs(), weights, seed=cfg.run.seed)
        evaluator = Evaluator(tasks, batch_size=cfg.eval.batch_size, device=device, num_workers=cfg.eval.num_workers)
        results = evaluator(bundle.model.to(device), bundle.tokenizer, bundle.eval_transform)
    finally:
        destroy_process_group()
    if not ctx.is_main:
        return 0
    aggregates = aggregate_metrics(results, evaluator.main_metrics, evaluator.kinds)
    print(results_table(results, aggregates))
    if args.out:
        out = Path(args.out)
        paths = [write_results(out / "eval_results.json", results, model_name=bundle.model_name,
                               pretrained=str(weights or "")),
                 write_eval_jsonl(out / "eval_results.jsonl", results, evaluator.main_metrics),
                 write_json_atomic(out / "eval_aggregates.json", aggregates)]
        print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _read_task_file(path: str) -> dict:
    """The eval-section mapping a --tasks YAML file holds ({zeroshot: [...], retrieval: [...]})."""
    from engine.config import read_yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--tasks {path}: file not found")
    loaded = read_yaml(file, what="--tasks") or {}
    if not isinstance(loaded, dict) or not set(loaded) <= {"zeroshot", "retrieval"}:
        raise ValueError(f"--tasks {path}: must be a mapping with 'zeroshot' and/or 'retrieval' lists of tasks")
    return loaded


def _is_checkpoint_folder(path: Path) -> bool:
    from engine.checkpoint import COMPLETE, STATE

    return path.is_dir() and ((path / STATE).exists() or (path / COMPLETE).exists())


def _resolve_latest(weights: str | Path | None) -> str | Path | None:
    """`weights`, or for a run's `checkpoints/latest` pointer the checkpoint folder it means (as --resume latest)."""
    from engine.checkpoint import LATEST, latest_checkpoint

    if weights is None or Path(weights).name != LATEST or not Path(weights).is_file():
        return weights
    found = latest_checkpoint(Path(weights).parent)
    if found is None:
        raise FileNotFoundError(f"--weights {weights}: no complete checkpoint in {Path(weights).parent}; pass a "
                                "weights file or a finished run's folder")
    return found


def _weights_file(weights: str | None) -> Path | None:
    """`weights`, or the final weights of a run folder given instead, or a checkpoint folder (read only)."""
    weights = _resolve_latest(weights)
    if not weights or not Path(weights).is_dir() or _is_checkpoint_folder(Path(weights)):
        return Path(weights) if weights else None
    final = Path(weights) / "final.safetensors"
    if not final.is_file():
        raise FileNotFoundError(f"{weights} is a folder without final.safetensors; pass a weights file "
                                f"(e.g. {Path(weights) / 'best.safetensors'}), a finished run's folder or a "
                                f"checkpoint folder ({Path(weights) / 'checkpoints' / 'step_<N>'})")
    return final


def _build_model_from(name: str, kwargs: dict, weights: str | Path | None, *, seed: int | None = None):
    """`models.build_model(name, weights=weights, ...)`, where `weights` may also be a checkpoint folder
    (`checkpoints/step_N` of a run on any backend and number of ranks): its weights are read in this process
    (FSDP2: DCP; DeepSpeed: zero_to_fp32 after vetting its pickles) and nothing is written there."""
    from models import build_model

    weights = _resolve_latest(weights)
    if weights is None or not _is_checkpoint_folder(Path(weights)):
        return build_model(name, **{**kwargs, "weights": weights}, seed=seed)
    from engine.backends.base import checkpoint_weights
    from engine.checkpoint import TRAIN_STATE, read_state

    trained = read_state(Path(weights))[TRAIN_STATE]["model"]
    if trained != name:
        raise ValueError(f"--weights {weights} is a checkpoint of model {trained!r}, not {name!r}; "
                         f"pass --model {trained}")
    bundle = build_model(name, **{**kwargs, "weights": None}, seed=seed)
    bundle.model.load_state_dict(checkpoint_weights(Path(weights), bundle.model))
    return bundle


def _shards(args: argparse.Namespace) -> int:
    if args.shards_command == "build":
        from engine.data.build import build_shards

        manifest, report = build_shards(args.source, args.out_dir, samples_per_shard=args.samples_per_shard,
                                        max_image_pixels=args.max_image_pixels,
                                        max_member_bytes=args.max_member_bytes,
                                        csv_separator=args.csv_separator, csv_img_key=args.csv_img_key,
                                        csv_caption_key=args.csv_caption_key)
        print(f"wrote {manifest.num_shards} shards, {manifest.num_samples} samples to {args.out_dir}")
        if report["num_skipped"]:
            print(f"skipped {report['num_skipped']}: {json.dumps(report['skipped_by_reason'])}")
        return 0
    if args.shards_command == "check":
        from engine.data.check import check_shards

        report = check_shards(args.shards, min_size=args.min_size, num_workers=args.workers, progress=True,
                              max_image_pixels=args.max_image_pixels, max_member_bytes=args.max_member_bytes)
        print(report.table())
        broken = report.broken
        if broken:
            print(f"{len(broken)} broken shard(s): {', '.join(shard.path for shard in broken[:5])}"
                  + (" ..." if len(broken) > 5 else ""))
        return 1 if broken else 0
    from engine.data.sources import index_shards

    manifest = index_shards(args.shards, read_tars=args.read_tars, num_workers=args.workers)
    print(f"indexed {manifest.num_shards} shards, {manifest.num_samples} samples")
    if not manifest.checksums_available:
        unread = sum(not shard.has_checksum for shard in manifest.shards)
        print(f"{unread} shard(s) counted from img2dataset/wids indexes without reading them (no checksums)")
    return 0
