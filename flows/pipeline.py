"""The whole pipeline as a Prefect flow: the DVC stages, one after another.

Stages run in sequence (DVC's repository lock forbids two at once), each as a task
with retries; all stage runs of one flow run share its id in MLflow (``AESR1_PIPELINE_ID``).

    python -m flows.pipeline                 # all stages, like `dvc repro`
    python -m flows.pipeline --stages ingest # some of them
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from tasks.dvc_stage import dvc_stages, repro_stage


@flow(name="aesr1-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, root: str = ".", force: bool = False) -> list[str]:
    """Reproduce ``stages`` (default: every stage in dvc.yaml) in ``root``; return the stages run."""
    root = str(Path(root).resolve())
    known = dvc_stages(root)
    unknown = [s for s in stages or [] if s not in known]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; dvc.yaml has {known}")
    chosen = [s for s in known if s in stages] if stages else known
    pipeline_id = flow_run.id or uuid.uuid4().hex
    get_run_logger().info("pipeline %s: stages %s", pipeline_id, chosen)
    for stage in chosen:
        repro_stage(stage, root, str(pipeline_id), force)
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the aesr1 pipeline's DVC stages through Prefect.")
    parser.add_argument("--stages", nargs="*", help="stages to run (default: all, in dvc.yaml order)")
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    parser.add_argument("--force", action="store_true", help="rerun stages even if DVC finds them up to date")
    args = parser.parse_args(argv)
    pipeline(stages=args.stages, root=args.root, force=args.force)


if __name__ == "__main__":
    main()
