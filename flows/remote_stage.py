"""One DVC stage on a worker of another pool (the GPU pool for ``rl``), data through the DVC remote.

The pipeline flow (``flows/pipeline.py``) starts this flow's deployment with its commit,
``params.yaml`` and ``dvc.lock``. In the worker's own checkout of the repository, put at that
commit (:mod:`tasks.source`), it pulls the stage's missing inputs from the DVC remote,
reproduces the stage, and pushes the outputs with DVC's run cache, from which the
pipeline's side then restores them.
The checkout is the flow run's working directory (``AESR1_REPO`` in ``prefect.yaml``).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from aesr1 import environment
from tasks.dvc_stage import run_logged
from tasks.source import check_out


@flow(name="aesr1-remote-stage", flow_run_name="{stage}", log_prints=True)
def remote_stage_flow(stage: str, commit: str, params_yaml: str, dvc_lock: str, pipeline_id: str,
                      force: bool = False, root: str = ".", run_env: dict[str, str] | None = None) -> str:
    """Reproduce ``stage`` here at the caller's commit with its params and lock; push its outputs and run cache.
    ``run_env``: the caller's :data:`aesr1.environment.FORWARDED` variables (its MLflow and DVC experiment)."""
    root_path = Path(root).resolve()
    check_out(root_path, commit)
    (root_path / "params.yaml").write_text(params_yaml)
    if dvc_lock:
        (root_path / "dvc.lock").write_text(dvc_lock)
    get_run_logger().info("stage %s in %s at %s", stage, root_path, commit[:12])
    cmd = ["dvc", "repro", "--pull", "--single-item", stage] + (["--force"] if force else [])
    forwarded = {k: v for k, v in (run_env or {}).items() if k in environment.FORWARDED}
    run_logged(cmd, root_path, {**forwarded, environment.PIPELINE_ID: pipeline_id})
    run_logged(["dvc", "push", "--run-cache", stage], root_path)
    return stage
