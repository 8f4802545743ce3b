"""The ``aesr1`` command: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _run_stage(args: argparse.Namespace) -> None:
    """Import the stage lazily (torch, trl, GE are slow to import) and run it by the stage pattern."""
    import importlib

    from aesr1.stage import run_stage

    module_name, config_name, function_name, _ = STAGES[args.command]
    module = importlib.import_module(module_name)
    run_stage(args.command, args.params, getattr(module, config_name), getattr(module, function_name))


def _review(args: argparse.Namespace) -> None:
    from aesr1.aescot import review
    from aesr1.aescot.corpus import FilterStageConfig
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


# stage -> (module, config class, stage function, help)
STAGES = {
    "synth": ("aesr1.data.synth", "SynthConfig", "synth_stage",
              "Generate AesSynth, the procedural dataset, in the five native formats (params: synth)."),
    "ingest": ("aesr1.data.ingest", "IngestConfig", "ingest",
               "Read the datasets' native annotation files into a checked train/test manifest (params: ingest)."),
    "distill": ("aesr1.aescot.distill", "DistillConfig", "distill",
                "Ask a teacher for score-masked critiques of the training images and build <think>/<answer> "
                "trajectories (params: distill)."),
    "filter": ("aesr1.aescot.corpus", "FilterStageConfig", "filter_corpus",
               "Triple-filter the distilled critiques (leak, align, fact), apply review decisions, check the "
               "AesCoT corpus (params: filter)."),
    "backbone": ("aesr1.policy.backbone", "BackboneConfig", "backbone",
                 "Build the tiny Qwen2.5-VL (with descriptive pretraining) or point at a real VLM (params: backbone)."),
    "sft": ("aesr1.policy.sft", "SFTStageConfig", "sft",
            "Cold-start SFT on the AesCoT corpus, then measure the starting entropy (params: sft)."),
    "rl": ("aesr1.rl.grpo", "RLStageConfig", "rl",
           "RAPO: GRPO with the relative (rank) and absolute (error) rewards (params: rl)."),
}


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aesr1").setLevel(logging.INFO)
    from aesr1.config import ParamsError
    from aesr1.checks import DataCheckError
    from aesr1.data.adapters import AnnotationError
    from aesr1.data.ingest import IngestError
    from aesr1.aescot.distill import DistillError

    try:
        args.handler(args)
    except (ParamsError, DataCheckError, AnnotationError, IngestError, DistillError, ValueError) as err:
        print(f"aesr1 {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
