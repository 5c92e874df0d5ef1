"""Command line: `python run.py <command>` (tune, osr, finetune, eval, export, shards, sweep, report, interpolate,
demo), one handler each."""

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


# open_clip_train's spellings with a one-to-one meaning here: flag -> (config key, accepted values -> value set).
# Each is run as the `--set` it stands for, named once when the job starts.
OPEN_CLIP_TRAIN_FLAGS = {
    "wd": ("optim.weight_decay", None),
    "warmup": ("optim.warmup_steps", None),  # steps, as in open_clip_train
    "precision": ("model.precision", {"amp_bf16": "bf16", "amp_bfloat16": "bf16", "fp32": "fp32"}),
    "report_to": (None, {"tensorboard": ["run.tensorboard=true"],  # comma-separated, as in open_clip_train
                         "wandb": ["run.wandb_project=open-clip"],  # open_clip_train's default project name
                         "all": ["run.tensorboard=true", "run.wandb_project=open-clip"]}),
    "save_frequency": ("run.save_every_epochs", None),  # epochs, as in open_clip_train
    "lock_image": ("model.lock_image", {"": "true"}),  # a switch there: given without a value
    "lock_image_unlocked_groups": ("model.lock_image_unlocked_groups", None),
    "lock_text": ("model.lock_text", {"": "true"}),
    "lock_text_unlocked_layers": ("model.lock_text_unlocked_layers", None),
    "torchcompile": ("run.compile", {"": "blocks"}),  # per block here: the mode every backend but ZeRO-3 runs
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
    aliases = parser.add_argument_group(
        "open_clip_train spellings", "open_clip_train's names for fields of this engine: each runs as the --set "
                                     "shown, named once at the start (--resume latest is the same as there)")
    text = {"wd": ("WD", "= --set optim.weight_decay=WD"),
            "warmup": ("STEPS", "= --set optim.warmup_steps=STEPS"),
            "precision": ("{amp_bf16,fp32}", ("amp_bf16 (or amp_bfloat16) = --set model.precision=bf16; "
                                              "fp32 = --set model.precision=fp32")),
            "report_to": ("LIST", ("tensorboard = --set run.tensorboard=true; wandb = --set "
                                   "run.wandb_project=open-clip; all = both (comma-separated, as there)")),
            "save_frequency": ("EPOCHS", "= --set run.save_every_epochs=EPOCHS (a checkpoint every EPOCHS epochs)"),
            "lock_image": (None, "= --set model.lock_image=true"),
            "lock_image_unlocked_groups": ("N", "= --set model.lock_image_unlocked_groups=N"),
            "lock_text": (None, "= --set model.lock_text=true"),
            "lock_text_unlocked_layers": ("N", "= --set model.lock_text_unlocked_layers=N"),
            "torchcompile": (None, ("= --set run.compile=blocks (each transformer block compiled; "
                                    "run.compile=model compiles the whole forward as open_clip_train does)"))}
    for flag, (metavar, help_text) in text.items():
        if metavar is None:  # a switch: present or not
            aliases.add_argument(f"--{flag.replace('_', '-')}", dest=f"alias_{flag}", default=None,
                                 action="store_const", const="", help=help_text)
        else:
            aliases.add_argument(f"--{flag.replace('_', '-')}", dest=f"alias_{flag}", default=None, metavar=metavar,
                                 help=help_text)


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
    export.add_argument("--model", required=True, help="open_clip architecture, shipped config name or a "
                                                       "transformers CLIPModel / SiglipModel folder")
    export.add_argument("--weights", default=None,
                        help="local .safetensors / .bin / .pt (an OpenAI TorchScript .pt too), or a run's "
                             "checkpoints/step_N folder (single, DeepSpeed or FSDP2, any number of ranks; "
                             "checkpoints/latest: the newest); "
                             "hf-hub:/local-dir: models default to their own file")
    export.add_argument("--out", required=True, help="output .safetensors path (--format transformers: a folder)")
    export.add_argument("--format", default="open_clip", choices=("open_clip", "transformers"),
                        help="open_clip safetensors, or a folder transformers' CLIPModel / CLIPProcessor "
                             "(SiglipModel / SiglipProcessor) from_pretrained loads (ViT CLIP and SigLIP "
                             "architectures)")
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

    text = ("weight-space interpolation (WiSE-FT) of a finished run: (1 - a) * base + a * fine-tuned weights, "
            "each a evaluated on the run's eval tasks; interpolate.json in the run folder")
    interpolate = sub.add_parser("interpolate", help=text, description=text)
    interpolate.add_argument("run_dir", metavar="RUN_DIR",
                             help="a finished run's folder (run.out_dir of tune / finetune)")
    interpolate.add_argument("--alphas", default="0:1:0.25",
                             help="the weights a of the fine-tuned end: START:STOP:STEP and/or a comma list, "
                                  "each in [0, 1]")
    interpolate.add_argument("--select", default=None, metavar="TASK/METRIC",
                             help="the metric of a task held out as validation that picks the best a, exported "
                                  "to --out (without it nothing is exported: never chosen on the test tasks)")
    interpolate.add_argument("--weights", default=None,
                             help="the fine-tuned end: a weights file (e.g. RUN_DIR/best.safetensors) or a checkpoint "
                                  "folder (default: RUN_DIR/final.safetensors)")
    interpolate.add_argument("--out", default=None, help="where --select exports the chosen weights "
                                                         "(default: RUN_DIR/interpolated.safetensors)")
    interpolate.add_argument("--device", default=None, help="evaluation device (default: the run's run.device)")

    text = ("self-contained demo on synthetic data (no downloads): a tiny CLIP pretrained on six colours, fine-tuned "
            "on four of them with four methods over 3 seeds; evaluated in-domain and on the two held-out colours (retained-*: "
            "what fine-tuning forgets)")
    demo = sub.add_parser("demo", help=text, description=text)
    demo.add_argument("--out", default="runs/demo", help="folder for the demo's data, runs, table and plot")
    demo.add_argument("--quick", action="store_true", help="smaller and shorter (for tests)")
    demo.add_argument("--overwrite", action="store_true", help="replace --out if an earlier demo wrote it (it holds .tuneclip-demo) and "
                                                                "no job runs there; no other folder is deleted")
    return parser


def open_clip_train_overrides(args: argparse.Namespace, *, say=print) -> list[str]:
    """The `--set` overrides open_clip_train's spellings in `args` stand for; each is named once through `say`."""
    overrides = []
    for flag, (key, values) in OPEN_CLIP_TRAIN_FLAGS.items():
        given = getattr(args, f"alias_{flag}", None)
        if given is None:
            continue
        spelled = f"--{flag.replace('_', '-')}"
        if values is None:
            these = [f"{key}={given}"]
        else:
            words = [word.strip() for word in given.split(",")] if key is None else [given]
            unknown = [word for word in words if word not in values]
            if unknown:
                fields = key or " / ".join(sorted({item.split("=")[0] for v in values.values() for item in v}))
                raise ValueError(f"{spelled} {given}: {unknown[0]!r} has no one-to-one equivalent in {fields}; "
                                 f"accepted: {', '.join(values)} (or --set the field, see run.py {args.command} --help)")
            these = [item for word in words for item in
                     (values[word] if isinstance(values[word], list) else [f"{key}={values[word]}"])]
        say(f"note: {' '.join(filter(None, (spelled, given)))} is run as " + " ".join(f"--set {item}" for item in these))
        overrides += these
    return overrides


def job_config_from_args(args: argparse.Namespace):
    from engine.config import load_config

    main_rank = os.environ.get("RANK", "0") == "0"
    # open_clip_train's spellings first: an explicit --set or shortcut of the same field wins.
    overrides = open_clip_train_overrides(args, say=lambda line: print(line, file=sys.stderr) if main_rank else None)
    overrides += list(args.overrides)
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
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        print(f"error: {_unknown_arguments(args, unknown)}", file=sys.stderr)
        return 2
    from engine.run.preemption import EXIT_PREEMPTED, Preempted
    rank = os.environ.get("RANK", "0")
    main_rank = rank == "0"  # other ranks log only what is their own (skipped samples) and errors
    # Our loggers at INFO; third-party chatter (open_clip's root-logger INFO lines) at WARNING.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format=("" if main_rank else f"rank {rank} ") + "%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("engine", "models"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO if main_rank else logging.WARNING)
    if not (main_rank or args.verbose):
        from engine.run.progress import RankFilter

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


def _unknown_arguments(args: argparse.Namespace, unknown: list[str]) -> str:
    """The one-line complaint about arguments no parser took, naming --set where the command has it."""
    command = " ".join(part for part in ("run.py", args.command, getattr(args, "shards_command", None)) if part)
    option = next((item.split("=", 1)[0] for item in unknown if item.startswith("-")), None)
    what = f"unknown option {option}" if option else f"unexpected argument {unknown[0]!r}"
    if hasattr(args, "overrides"):
        return (f"{what}; any config field can be set with --set section.key=value "
                f"(see {command} --help)")
    return f"{what} for {command} (see {command} --help)"


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
    return COMMANDS[args.command](args)


def _demo(args: argparse.Namespace) -> int:
    from engine.demo.experiment import run_demo

    run_demo(Path(args.out), quick=args.quick, overwrite=args.overwrite)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.results.sweep import run_sweep, split_grid

    out = args.out or load_config(args.config, split_grid(args.overrides)[0]).run.out_dir
    run_dirs, report = run_sweep(args.config, args.overrides, out=out, osr_from=args.osr_from,
                                 local_rank=args.launcher_local_rank)
    print(f"swept {len(run_dirs)} runs; report: {report}")
    return 0


def _report_page(args: argparse.Namespace) -> int:
    from engine.results.report_page import write_report

    common = Path(os.path.commonpath([str(Path(p).resolve()) for p in args.runs]))
    out = args.out or (common.parent if len(args.runs) == 1 else common) / "report"
    html_path, md_path = write_report(args.runs, out)
    print(f"wrote {html_path} and {md_path}")
    return 0


def _interpolate(args: argparse.Namespace) -> int:
    from engine.results.interpolate import parse_alphas

    alphas = parse_alphas(args.alphas)  # checked before torch loads
    from engine.results.interpolate import check_single_process, interpolate_run

    check_single_process()
    found = interpolate_run(args.run_dir, alphas=alphas, select=args.select, weights=args.weights, out=args.out,
                            device=args.device)
    _print_interpolation(found, select_flag="--select TASK/METRIC")
    return 0


def _print_interpolation(found, *, select_flag: str) -> None:
    print(found.table())
    if found.chosen is None:
        print(f"no {select_flag} (a task held out as validation): nothing exported")
    else:
        print(f"chose a = {found.chosen:g} (best {found.select}); wrote {found.exported}")
    print(f"wrote {found.written}")


def _export(args: argparse.Namespace) -> int:
    from engine.checkpoint import build_model_from
    from models import export_model, transformers_clip

    if args.format == "transformers":
        transformers_clip.require_transformers()  # before the model is built
    bundle = build_model_from(args.model, {"pretrained_tag": args.pretrained_tag}, args.weights)
    if args.format == "transformers":
        missing = transformers_clip.export(bundle, bundle.model.state_dict(), args.out,
                                           preprocessing=bundle.preprocessing)
        kind = "SiglipModel" if transformers_clip.is_siglip_model(bundle.model) else "CLIPModel"
        print(f"wrote {args.out} (transformers {kind}){''.join(f'; not written: {item}' for item in missing)}")
        return 0
    export_model(bundle, bundle.model, args.out)
    print(f"wrote {args.out}")
    return 0


def _job(args: argparse.Namespace) -> int:
    """tune / osr / finetune: one Trainer, run as the command says, then closed."""
    try:
        cfg = job_config_from_args(args)  # every field and path checked before torch loads or ranks meet
    except USER_ERRORS:
        if os.environ.get("RANK", "0") != "0":
            return 2  # every rank finds the same problems in the same config: rank 0 prints them, once
        raise
    from engine.run.folder import nothing_left_to_do

    if not args.overwrite and nothing_left_to_do(Path(cfg.run.out_dir), resume=cfg.run.resume, epochs=cfg.run.epochs):
        if os.environ.get("RANK", "0") == "0":
            print(f"{cfg.run.out_dir} holds a finished run (summary.json): --resume latest has nothing left to do; "
                  "nothing was changed")
        return 0
    from engine.run.heartbeat import is_collective_timeout
    from engine.trainer import Trainer

    local_rank = args.local_rank if args.local_rank is not None else args.launcher_local_rank
    trainer = Trainer(cfg, local_rank=local_rank, overwrite=args.overwrite)
    try:
        JOB_STAGES[args.command](trainer)
    except RuntimeError as exc:
        if trainer.heartbeat is None or not is_collective_timeout(exc):
            raise
        raise ValueError(trainer.heartbeat.timeout_report(exc)) from exc
    finally:
        trainer.close()
    del trainer  # its model and optimizer state: run.interpolate holds two state dicts and one model of its own
    from engine.results.interpolate import interpolate_finished_job

    found = interpolate_finished_job(cfg)
    if found is not None:
        _print_interpolation(found, select_flag="run.interpolate_select")
    return 0


def _tune(trainer) -> None:
    trainer.tune()
    _report(trainer)


def _osr(trainer) -> None:
    trainer.tune(finetune=False)
    print(f"recovered statistics: {trainer.checkpoints.find('latest')} (reuse with --osr-from)")


def _finetune(trainer) -> None:
    trainer.tune(osr=False)
    _report(trainer)


JOB_STAGES = {"tune": _tune, "osr": _osr, "finetune": _finetune}


def _report(trainer) -> None:
    """Print the end-of-run report (rank 0)."""
    from engine.results.report import run_report

    if trainer.ctx.is_main:
        print(run_report(trainer.out_dir, metric=trainer.cfg.eval.best_metric))


EVAL_FLAGS = {"model": "model.name", "weights": "model.weights", "preset": "model.preset",
              "pretrained_tag": "model.pretrained_tag", "device": "run.device"}


def _eval(args: argparse.Namespace) -> int:
    """`run.py eval`: one model on the eval tasks; prints a table, writes the results files into --out.

    Under torchrun / deepspeed every rank evaluates its part of each task; rank 0 prints and writes.
    """
    from engine.config import load_config
    from engine.evaluate.standalone import evaluate_standalone, read_task_file

    overrides = list(args.overrides)
    overrides += [f"{key}={getattr(args, flag)}" for flag, key in EVAL_FLAGS.items() if getattr(args, flag)]
    cfg = load_config(args.config, overrides, base={"eval": read_task_file(args.tasks)} if args.tasks else None,
                      training=False)  # every field and path checked before torch loads
    measured = evaluate_standalone(cfg, local_rank=args.launcher_local_rank)
    if measured is None:  # not rank 0
        return 0
    print(measured.table())
    if args.out:
        print(f"wrote {', '.join(str(p) for p in measured.write(Path(args.out)))}")
    return 0


def _shards(args: argparse.Namespace) -> int:
    return SHARDS_COMMANDS[args.shards_command](args)


def _shards_build(args: argparse.Namespace) -> int:
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


def _shards_check(args: argparse.Namespace) -> int:
    from engine.data.check import check_shards

    report = check_shards(args.shards, min_size=args.min_size, num_workers=args.workers, progress=sys.stderr.isatty(),
                          max_image_pixels=args.max_image_pixels, max_member_bytes=args.max_member_bytes)
    print(report.table())
    broken = report.broken
    if broken:
        print(f"{len(broken)} broken shard(s): {', '.join(shard.path for shard in broken[:5])}"
              + (" ..." if len(broken) > 5 else ""))
    return 1 if broken else 0


def _shards_index(args: argparse.Namespace) -> int:
    from engine.data.sources import index_shards

    manifest = index_shards(args.shards, read_tars=args.read_tars, num_workers=args.workers)
    print(f"indexed {manifest.num_shards} shards, {manifest.num_samples} samples")
    if not manifest.checksums_available:
        unread = sum(not shard.has_checksum for shard in manifest.shards)
        print(f"{unread} shard(s) counted from img2dataset/wids indexes without reading them (no checksums)")
    return 0


SHARDS_COMMANDS = {"build": _shards_build, "check": _shards_check, "index": _shards_index}

# The command table: `run.py <command>` -> its handler (argparse stores an alias as typed).
COMMANDS = {
    "tune": _job, "osr": _job, "finetune": _job,
    "eval": _eval,
    "export": _export, "convert": _export,
    "shards": _shards,
    "sweep": _sweep,
    "report": _report_page,
    "interpolate": _interpolate,
    "demo": _demo,
}
