"""The ``aesr1`` command: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import logging
import sys


def _synth(args: argparse.Namespace) -> None:
    from aesr1.data.synth import SynthConfig, synth_stage
    from aesr1.stage import run_stage

    run_stage("synth", args.params, SynthConfig, synth_stage)


def _ingest(args: argparse.Namespace) -> None:
    from aesr1.data.ingest import IngestConfig, ingest
    from aesr1.stage import run_stage

    run_stage("ingest", args.params, IngestConfig, ingest)


STAGES = {
    "synth": (_synth, "Generate AesSynth, the procedural dataset, in the five native formats (params: synth)."),
    "ingest": (_ingest, "Read the datasets' native annotation files into a checked train/test manifest "
                        "(params: ingest)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aesr1", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, (handler, help_text) in STAGES.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        cmd.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aesr1").setLevel(logging.INFO)
    from aesr1.config import ParamsError
    from aesr1.checks import DataCheckError
    from aesr1.data.adapters import AnnotationError
    from aesr1.data.ingest import IngestError

    try:
        args.handler(args)
    except (ParamsError, DataCheckError, AnnotationError, IngestError) as err:
        print(f"aesr1 {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
