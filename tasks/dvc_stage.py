"""One DVC stage as a Prefect task.

No Prefect caching: a task's cache key would hash its arguments, not the data, so
DVC alone decides whether a stage is stale (``dvc repro --single-item``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE


def dvc_stages(root: str | Path) -> list[str]:
    """Stage names in the order ``dvc.yaml`` lists them (each after the stages it depends on)."""
    return list((yaml.safe_load((Path(root) / "dvc.yaml").read_text()) or {}).get("stages", {}))


@task(name="dvc-stage", task_run_name="{stage}", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def repro_stage(stage: str, root: str, pipeline_id: str, force: bool = False) -> None:
    """Run one stage with ``dvc repro --single-item``, its output streamed to the Prefect log."""
    logger = get_run_logger()
    cmd = ["dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    env = {**os.environ, "AESR1_PIPELINE_ID": pipeline_id}
    logger.info("%s $ %s", root, " ".join(cmd))
    with subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        for line in proc.stdout:
            logger.info(line.rstrip())
    if proc.returncode != 0:
        raise RuntimeError(f"stage '{stage}' failed: {' '.join(cmd)} exited with {proc.returncode}")
