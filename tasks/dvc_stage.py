"""DVC stages as Prefect tasks: run here, or hand to a deployment on another work pool.

No Prefect caching: a task's cache key would hash its arguments, not the data, so
DVC alone decides whether a stage is stale (``dvc repro --single-item``).

A stage handed to another machine travels through the DVC remote: this side pushes
what the stage needs, the remote worker reproduces it and pushes its outputs with DVC's
run cache, and this side then "reproduces" the stage by restoring that run
(``dvc repro --pull`` finds it in the run cache and checks the outputs out instead of
running). ``AESR1_RESTORE_ONLY`` makes the stage command refuse to run here if the run
is missing, so a GPU stage never silently falls back to the CPU.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from aesr1 import environment
from tasks.source import pipeline_commit


def dvc_stages(root: str | Path) -> list[str]:
    """Stage names in the order ``dvc.yaml`` lists them (each after the stages it depends on)."""
    return list((yaml.safe_load((Path(root) / "dvc.yaml").read_text()) or {}).get("stages", {}))


def run_logged(cmd: list[str], root: str | Path, env: dict | None = None) -> str:
    """Run a command in ``root`` with its output streamed to the Prefect log; raise if it fails."""
    logger = get_run_logger()
    logger.info("%s $ %s", root, " ".join(cmd))
    lines = []
    with subprocess.Popen(cmd, cwd=root, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            logger.info(line.rstrip())
            lines.append(line)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode} in {root}")
    return "".join(lines)


@task(name="dvc-stage", task_run_name="{stage}", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def repro_stage(stage: str, root: str, pipeline_id: str, force: bool = False) -> None:
    """Run one stage here with ``dvc repro --single-item``."""
    cmd = ["dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    try:
        run_logged(cmd, root, {environment.PIPELINE_ID: pipeline_id})
    except RuntimeError as error:
        raise RuntimeError(f"stage '{stage}' failed: {error}") from None


@task(name="remote-dvc-stage", task_run_name="{stage} on {deployment}", cache_policy=NO_CACHE)
def remote_stage(stage: str, root: str, deployment: str, pipeline_id: str, force: bool = False) -> None:
    """Hand ``stage`` to ``deployment`` (another work pool), wait, and restore its outputs here."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    commit = pipeline_commit(root)  # the worker runs this code, or nothing
    run_logged(["dvc", "push"], root)  # the stage's inputs, for the other machine to pull
    parameters = {"stage": stage, "commit": commit, "params_yaml": (Path(root) / "params.yaml").read_text(),
                  "dvc_lock": _read(Path(root) / "dvc.lock"), "pipeline_id": pipeline_id, "force": force,
                  "run_env": {k: os.environ[k] for k in environment.FORWARDED if k in os.environ}}
    flow_run = run_deployment(deployment, parameters=parameters, timeout=None, as_subflow=True)
    if not flow_run.state.is_completed():
        raise RuntimeError(f"stage '{stage}' on {deployment} ended {flow_run.state.name}: "
                           f"{flow_run.state.message or 'see its flow run'} (flow run {flow_run.id})")
    logger.info("stage '%s' finished on %s (flow run %s); restoring its outputs", stage, deployment, flow_run.id)
    out = run_logged(["dvc", "repro", "--pull", "--single-item", stage], root,
                     {environment.PIPELINE_ID: pipeline_id, environment.RESTORE_ONLY: stage})
    if "skipping run" not in out and "didn't change" not in out:
        raise RuntimeError(f"stage '{stage}' was not restored from the run cache:\n{out[-2000:]}")


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""
