"""The ``aesr1`` command: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from aesr1 import distributed, doctor, environment
from aesr1.distributed import quiet_other_processes
from aesr1.errors import AesError


class RestoreOnlyError(AesError):
    """DVC was about to run a stage that should have been restored from another machine's run."""


def _stage(name: str) -> tuple[type, Callable]:
    """Stage ``name``'s config class and function, imported lazily (torch, trl, GE are slow to import)."""
    import importlib

    module_name, config_name, function_name, _ = STAGES[name]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, function_name)


def _run_stage(args: argparse.Namespace) -> None:
    """Run the stage by the stage pattern."""
    from aesr1.stage import run_stage

    if os.environ.get(environment.RESTORE_ONLY) == args.command:
        raise RestoreOnlyError(f"stage '{args.command}' was to be restored from another machine's run (DVC run cache), "
                           f"but DVC is running it here: that run's outputs are not in the DVC remote")
    run_stage(args.command, args.params, *_stage(args.command))
    distributed.close()


def _review(args: argparse.Namespace) -> None:
    from aesr1.aescot import review
    from aesr1.aescot.filter import FilterStageConfig
    from aesr1.config import load_section

    cfg = load_section(args.params, "filter", FilterStageConfig)
    if args.action == "export":
        rows = review.export(cfg, args.file, args.passed_sample)
        print(f"wrote {len(rows)} samples to {args.file} and {Path(args.file).with_suffix('.html')}; "
              f"fill 'decision' (keep/reject), then: aesr1 review apply {args.file}")
    else:
        counts = review.apply(cfg, args.file)
        print(f"applied {counts['applied']} decisions ({counts['keep']} keep, {counts['reject']} reject) to "
              f"{cfg.review_decisions}; the filter stage honours them on its next run (dvc repro)")


# stage -> (module, config class, stage function, help). Stage X is the function X in the module
# aesr1/<package>/X.py (filter's is filter_corpus: the name filter is Python's builtin).
STAGES = {
    "synth": ("aesr1.data.synth", "SynthConfig", "synth",
              "Generate AesSynth, the procedural dataset, in the five native formats (params: synth)."),
    "ingest": ("aesr1.data.ingest", "IngestConfig", "ingest",
               "Read the datasets' native annotation files into a checked train/test manifest (params: ingest)."),
    "distill": ("aesr1.aescot.distill", "DistillConfig", "distill",
                "Ask a teacher for score-masked critiques of the training images and build <think>/<answer> "
                "trajectories (params: distill)."),
    "filter": ("aesr1.aescot.filter", "FilterStageConfig", "filter_corpus",
               "Triple-filter the distilled critiques (leak, align, fact), apply review decisions, check the "
               "AesCoT corpus (params: filter)."),
    "backbone": ("aesr1.backbone.backbone", "BackboneConfig", "backbone",
                 "Build the tiny Qwen2.5-VL (with descriptive pretraining) or point at a real VLM (params: backbone)."),
    "sft": ("aesr1.policy.sft", "SFTStageConfig", "sft",
            "Cold-start SFT on the AesCoT corpus, then measure the starting entropy (params: sft)."),
    "rl": ("aesr1.rl.rl", "RLStageConfig", "rl",
           "RAPO: GRPO with the relative (rank) and absolute (error) rewards (params: rl)."),
    "evaluate": ("aesr1.evaluation.evaluate", "EvaluateConfig", "evaluate",
                 "Score every test set with each model: PLCC/SRCC, unparseable rate, noise ceiling, critique "
                 "quality, entropy, plots, report; register the RAPO model in MLflow (params: evaluate)."),
}

TRAINED_MODELS = ("rl", "sft")  # the stages whose out_dir is a trained policy, the latest first


def _stage_config(name: str, params: str):
    """Stage ``name``'s config from the params file, or its defaults where there is no such file."""
    from aesr1.config import load_section

    cls, _ = _stage(name)
    return load_section(params, name, cls) if Path(params).is_file() else cls()


def _score(args: argparse.Namespace) -> int:
    """Print critique and score per image; exit status 1 when some image could not be read."""
    import dataclasses
    import json

    from aesr1.inference import image_files, load_scorer

    model = args.model
    if model is None:
        trained = [_stage_config(stage, args.params).out_dir for stage in TRAINED_MODELS]
        model = next((m for m in trained if (Path(m) / "config.json").is_file()), None)
        if model is None:
            raise AesError(f"no pipeline model in {' or '.join(trained)}; run dvc repro or pass --model")
    decoding = _stage_config("evaluate", args.params).decoding
    decoding = dataclasses.replace(decoding, greedy=args.greedy or decoding.greedy,
                                   samples_per_image=args.samples or decoding.samples_per_image,
                                   readout=args.readout or decoding.readout)
    files = image_files(args.images)
    if not files:
        raise AesError(f"no images in {args.images}")
    scorer = load_scorer(model)
    unreadable = {}
    for path in files:  # each file alone first: one that cannot be decoded or processed must not stop the others
        try:
            scorer.check(path)
        except ValueError as error:
            unreadable[path] = str(error)
    readable = [p for p in files if p not in unreadable]
    results = dict(zip(readable, scorer(readable, decoding))) if readable else {}
    rows = [{"image": str(p), **results[p]} if p in results else {"image": str(p), "error": unreadable[p]}
            for p in files]
    if args.json:
        print(json.dumps(rows, indent=1))
    for row in [] if args.json else rows:
        if "error" in row:
            print(f"{row['image']}\terror: {row['error']}")
            continue
        score = "unparseable" if row["score"] is None else f"{row['score']:.2f}"
        print(f"{row['image']}\t{score}\n  {row['critique'] or row['completion']}")
    return 1 if unreadable else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aesr1", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, (*_, help_text) in STAGES.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        cmd.set_defaults(handler=_run_stage)
    review = sub.add_parser("review", help="Manual review of the AesCoT filter: export samples, apply decisions.",
                            description="Manual review of the AesCoT filter (params: filter).")
    review.add_argument("action", choices=["export", "apply"],
                        help="export: write flagged + sampled passed samples to FILE (CSV + HTML); "
                             "apply: merge FILE's decisions into filter.review_decisions")
    review.add_argument("file", nargs="?", default="reviews/aescot_review.csv",
                        help="review CSV (default: reviews/aescot_review.csv)")
    review.add_argument("--passed-sample", type=int, default=50, help="passed samples to include (export)")
    review.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    review.set_defaults(handler=_review)
    score = sub.add_parser("score", help="Critique and score images with a trained policy.",
                           description="Critique and score images (files or folders) with the latest pipeline model "
                                       "(rl.out_dir, else sft.out_dir, of --params), a model folder, or an MLflow "
                                       "model URI.")
    score.add_argument("images", nargs="+", help="image files or folders")
    score.add_argument("--model", help="model folder or MLflow URI (models:/aesr1-policy/latest, runs:/ID/policy)")
    score.add_argument("--json", action="store_true", help="print JSON records")
    score.add_argument("--greedy", action="store_true", help="greedy decoding instead of evaluate.decoding")
    score.add_argument("--samples", type=int, help="samples per image, scores averaged")
    score.add_argument("--readout", choices=["mean", "expected"],
                       help="mean: of the written scores; expected: of the expected scores under the policy's "
                            "digit distribution after each critique (lower noise)")
    score.add_argument("--params", default="params.yaml",
                       help="decoding from this file's evaluate section, the pipeline model from its rl and sft")
    score.set_defaults(handler=_score)
    check = sub.add_parser("doctor", help=doctor.HELP, description=doctor.DESCRIPTION)
    doctor.add_arguments(check)
    check.set_defaults(handler=doctor.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aesr1").setLevel(logging.INFO)
    quiet_other_processes()
    try:
        status = args.handler(args)
    except AesError as err:  # expected: the message says what to fix; anything else is a bug and keeps its traceback
        print(f"aesr1 {args.command}: error: {err}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
