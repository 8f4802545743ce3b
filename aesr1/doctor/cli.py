"""``aesr1 doctor``'s command line: the checks, ``--plan`` or ``--smoke``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys

from aesr1.doctor import plan
from aesr1.doctor.checks import CHECKS, Context, run_checks, table
from aesr1.doctor.smoke import SMOKE_TIMEOUT_S, smoke
from aesr1.errors import AesError

log = logging.getLogger(__name__)

HELP = ("Check this machine and params.yaml before a GPU run (torch, CUDA and GPUs, DeepSpeed, flash-attn, vLLM, "
        "launcher, backbone, disk, teacher, DVC remote, MLflow and Prefect servers); --plan: whether the recipe fits "
        "the GPUs, phase by phase; --smoke: the sft and rl stages, a few steps each, on the recipe's model shape at "
        "reduced depth.")
DESCRIPTION = (
    "Check this machine and the params (recipe applied) before a run: exit status 1 if a check failed, else 0. "
    "--plan prints each phase's peak memory per GPU (SFT, RL training, RL generation, evaluation) for the recipe "
    "on the GPUs found here, or on --gpus N --gpu-memory GIB, whether it fits, and what makes it fit when it does "
    "not: exit status 0 it fits, 1 it does not. "
    "--smoke runs the stages themselves instead, on every visible GPU: a random-weight model of the recipe's backbone "
    "at reduced depth (--layers; untied where the real one is) saved with its own processor at the recipe's pixel "
    "budget, synthetic photos, and the recipe's batch, accumulation, K, completion length and DeepSpeed config with "
    "2 steps: the sft stage, the sft stage again (it must resume from the kept checkpoint), the rl stage twice "
    "likewise, and the sft stage in the other mode (LoRA merged, or full), each through the stage runner with "
    "MLflow (a store in the smoke's folder, or --smoke-mlflow) and its own held-out probe; the saved models must "
    "load and every loss and reward be finite. It prints each phase's step times and peak memory per process beside "
    "the planner's figure as JSON. Launch it with `torchrun --standalone --nproc_per_node gpu -m aesr1.cli doctor "
    "--smoke`. Without a GPU it exits 2, unless --cpu runs the same phases on the CPU. The GPU path has not yet "
    "been run on a GPU.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``doctor`` subcommand's options (``--params`` included)."""
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--json", action="store_true", help="print the checks (or the plan) as JSON")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds for each network check: hub, teacher, MLflow server (default: 10)")
    parser.add_argument("--skip", action="append", default=[], metavar="CHECK",
                        help=f"skip these checks (repeat or comma-separate): {', '.join(CHECKS)}")
    parser.add_argument("--plan", action="store_true",
                        help="instead of the checks: each phase's peak memory per GPU for the recipe (memory model), "
                             "whether it fits, and the changes that make it fit")
    parser.add_argument("--gpus", type=int, help="with --plan: plan for N GPUs (with --gpu-memory) instead of "
                                                 "the GPUs found here; ZeRO-3 partitions over all of them")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB", help="with --plan: GiB of memory per GPU")
    parser.add_argument("--host-memory", type=float, metavar="GIB",
                        help="with --plan: GiB of host memory per machine, for an offloaded optimizer (default: this "
                             "machine's where its GPUs are planned for; unchecked with --gpus)")
    parser.add_argument("--recipe", help="with --plan: this recipe in place of the params file's")
    parser.add_argument("--smoke", action="store_true",
                        help="instead of the checks: the sft and rl stages (2 steps, each rerun to resume; SFT also "
                             "in the other mode) on the recipe's model at reduced depth, random weights, its real "
                             "processor and pixel budget, its batch and DeepSpeed config; step times, peak memory "
                             "and the planner's figure as JSON. Launch: torchrun --standalone --nproc_per_node gpu -m "
                             "aesr1.cli doctor --smoke. Not yet run on a GPU")
    parser.add_argument("--cpu", action="store_true",
                        help="with --smoke: run on the CPU (hides any GPU; DeepSpeed on one process only)")
    parser.add_argument("--layers", type=int, help="with --smoke: text layers and vision blocks of the model (default: "
                                                   "2 for a real backbone, the recipe's for tiny)")
    parser.add_argument("--zero3", choices=["auto", "on", "off"], default="auto",
                        help="with --smoke: auto: the recipe's DeepSpeed config decides; on: the project's "
                             "configs/deepspeed/zero3.json where the recipe has none (with --cpu: DeepSpeed's CPU "
                             "accelerator, one process); off: without DeepSpeed")
    parser.add_argument("--smoke-dir", help="with --smoke: keep the models here (default: a temporary folder, removed; "
                                            "one machine: every process must see it; new or empty)")
    parser.add_argument("--smoke-timeout", type=float, default=SMOKE_TIMEOUT_S,
                        help=f"with --smoke: stop after this many seconds, exit status 124 (default: "
                             f"{SMOKE_TIMEOUT_S:g})")
    parser.add_argument("--smoke-mlflow", metavar="URI", help="with --smoke: track its runs there, in experiment "
                                                              "aesr1-doctor-smoke (default: a SQLite store in its "
                                                              "folder)")
    return parser


def run(args: argparse.Namespace) -> int:
    """The ``doctor`` subcommand: 0 all checks passed (or were skipped), 1 one failed, 2 a usage error
    (or --smoke without a GPU)."""
    if not args.plan and (args.gpus or args.gpu_memory or args.host_memory or args.recipe):
        print("aesr1 doctor: --gpus, --gpu-memory, --host-memory and --recipe go with --plan", file=sys.stderr)
        return 2
    if args.plan and args.smoke:
        print("aesr1 doctor: --plan or --smoke, not both", file=sys.stderr)
        return 2
    if args.plan:
        return plan.command(args)
    if not args.smoke and (args.cpu or args.layers or args.zero3 != "auto" or args.smoke_dir
                           or args.smoke_timeout != SMOKE_TIMEOUT_S or args.smoke_mlflow):
        print("aesr1 doctor: --cpu, --layers, --zero3, --smoke-dir, --smoke-timeout and --smoke-mlflow go with --smoke",
              file=sys.stderr)
        return 2
    if args.smoke:
        if args.cpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks torch for a GPU
        with contextlib.redirect_stdout(sys.stderr):  # trainer chatter off stdout: it carries the JSON alone
            status, report = smoke(args.params, layers=args.layers, cpu=args.cpu, zero3=args.zero3,
                                   folder=args.smoke_dir, timeout=args.smoke_timeout, mlflow_uri=args.smoke_mlflow)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(report, indent=1))
            if "error" in report:
                print(f"aesr1 doctor --smoke: {report['error']}", file=sys.stderr)
        return status
    skip = {name.strip() for item in args.skip for name in item.split(",") if name.strip()}
    unknown = sorted(skip - set(CHECKS))
    if unknown:
        print(f"aesr1 doctor: no check(s) {unknown}; the checks: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    ctx = Context(args.params, args.timeout)
    checks = run_checks(ctx, skip)
    failed = any(c.ok is False for c in checks)
    if args.json:
        print(json.dumps({"params": str(ctx.params_path), "recipe": (ctx.params or {}).get("recipe") or "tiny",
                          "ok": not failed, "checks": [c.as_dict() for c in checks]}, indent=1))
    else:
        recipe = (ctx.params or {}).get("recipe") or "tiny"
        print(table(checks, f"aesr1 doctor: {ctx.params_path} (recipe {recipe})"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aesr1.doctor``: the same as ``aesr1 doctor`` (for a launcher, or before cli.py wires it)."""
    parser = add_arguments(argparse.ArgumentParser(prog="aesr1 doctor", description=DESCRIPTION))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aesr1").setLevel(logging.INFO)
    from aesr1.distributed import quiet_other_processes

    quiet_other_processes()
    try:
        return run(args)
    except AesError as err:
        print(f"aesr1 doctor: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
