"""The whole pipeline as a Prefect flow: the DVC stages, one after another.

Stages run in sequence (DVC's repository lock forbids two at once), each as a task
with retries; all stage runs of one flow run share its id in MLflow (``AESR1_PIPELINE_ID``).
A stage named in ``remote_stages`` runs on another work pool instead: its deployment
(``flows/remote_stage.py``, e.g. on the GPU pool) reproduces it and the outputs come
back through the DVC remote.

    python -m flows.pipeline                                   # all stages, like `dvc repro`
    python -m flows.pipeline --stages ingest                   # some of them
    python -m flows.pipeline --remote rl=aesr1-remote-stage/gpu-stage   # rl on the GPU pool
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from aesr1.errors import AesError
from aesr1.tracking import close_dead_runs_of
from tasks.dvc_stage import dvc_stages, remote_stage, repro_stage


@flow(name="aesr1-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, root: str = ".", force: bool = False,
             remote_stages: dict[str, str] | None = None) -> list[str]:
    """Reproduce ``stages`` (default: every stage in dvc.yaml) in ``root``; return the stages run.

    ``remote_stages`` maps a stage to the deployment that runs it elsewhere
    (``{"rl": "aesr1-remote-stage/gpu-stage"}``).
    """
    root = str(Path(root).resolve())
    known = dvc_stages(root)
    remote_stages = remote_stages or {}
    unknown = [s for s in [*(stages or []), *remote_stages] if s not in known]
    if unknown:
        raise AesError(f"unknown stages {unknown}; dvc.yaml has {known}")
    chosen = [s for s in known if s in stages] if stages else known
    pipeline_id = flow_run.id or uuid.uuid4().hex
    logger = get_run_logger()
    closed = close_dead_runs_of(Path(root))  # a stage DVC restores from its run cache opens no run to do it
    if closed:
        logger.info("marked KILLED the MLflow runs of dead processes: %s", closed)
    logger.info("pipeline %s: stages %s", pipeline_id, chosen)
    for stage in chosen:
        if stage in remote_stages:
            remote_stage(stage, root, remote_stages[stage], str(pipeline_id), force)
        else:
            repro_stage(stage, root, str(pipeline_id), force)
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the aesr1 pipeline's DVC stages through Prefect.")
    parser.add_argument("--stages", nargs="*", help="stages to run (default: all, in dvc.yaml order)")
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    parser.add_argument("--force", action="store_true", help="rerun stages even if DVC finds them up to date")
    parser.add_argument("--remote", nargs="*", default=[], metavar="STAGE=DEPLOYMENT",
                        help="run STAGE through DEPLOYMENT on another work pool (needs a Prefect server and worker)")
    args = parser.parse_args(argv)
    remote = dict(item.split("=", 1) for item in args.remote)
    pipeline(stages=args.stages, root=args.root, force=args.force, remote_stages=remote)


if __name__ == "__main__":
    main()
