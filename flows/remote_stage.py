"""One DVC stage on a worker of another pool (the GPU pool for ``rl``), data through the DVC remote.

The pipeline flow (``flows/pipeline.py``) starts this flow's deployment with its
``params.yaml`` and ``dvc.lock``. In the worker's own checkout of the repository it
pulls the stage's missing inputs from the DVC remote, reproduces the stage, and pushes
the outputs with DVC's run cache, from which the pipeline's side then restores them.
The checkout is the flow run's working directory (``AESR1_REPO`` in ``prefect.yaml``).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from aesr1 import environment
from tasks.dvc_stage import run_logged


@flow(name="aesr1-remote-stage", flow_run_name="{stage}", log_prints=True)
def remote_stage_flow(stage: str, params_yaml: str, dvc_lock: str, pipeline_id: str, force: bool = False,
                      root: str = ".") -> str:
    """Reproduce ``stage`` here with the caller's params and lock; push its outputs and run cache."""
    root_path = Path(root).resolve()
    (root_path / "params.yaml").write_text(params_yaml)
    if dvc_lock:
        (root_path / "dvc.lock").write_text(dvc_lock)
    get_run_logger().info("stage %s in %s", stage, root_path)
    cmd = ["dvc", "repro", "--pull", "--single-item", stage] + (["--force"] if force else [])
    run_logged(cmd, root_path, {environment.PIPELINE_ID: pipeline_id})
    run_logged(["dvc", "push", "--run-cache", stage], root_path)
    return stage
