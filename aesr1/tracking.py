"""MLflow tracking for stages: where runs go, and how one pipeline execution's stages group.

Every stage run is a child of a *pipeline run* (MLflow's parent/child nesting), so the
UI shows one pipeline execution with its stages under it. Stages of one execution share
a pipeline id, taken from, in order:

1. ``AESR1_PIPELINE_ID`` (the Prefect flow sets it to its flow-run id; set it yourself
   to group stages run by hand);
2. the process that launched this stage when it is a pipeline runner (it exported
   ``DVC_ROOT``): that process's pid and start time, so all stages of one
   ``dvc repro`` share a parent;
3. otherwise a fresh id: a stage run alone is its own pipeline.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import psutil
from mlflow.tracking import MlflowClient

EXPERIMENT = "aesr1"
PIPELINE_TAG = "aesr1.pipeline_id"
ROLE_TAG = "aesr1.role"
STAGE_TAG = "aesr1.stage"
DVC_EXP_TAG = "aesr1.dvc_experiment"
_SHELLS = {"sh", "bash", "dash", "zsh", "fish"}
_EXPERIMENT_RUN_DIR = os.path.join(".dvc", "tmp", "exps")


def project_root(start: Path | None = None) -> Path:
    """The repository root: nearest folder with params.yaml, outside any queued-experiment copy.

    Queued experiments run in a temporary copy under ``.dvc/tmp/exps``; their runs and
    artifacts still belong to the real repository, so the root is taken above that copy.
    """
    here = (start or Path.cwd()).resolve()
    text = str(here)
    marker = os.sep + _EXPERIMENT_RUN_DIR + os.sep
    if marker in text + os.sep:
        return Path(text[: (text + os.sep).index(marker)])
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file():
            return folder
    return here


def tracking_uri(root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite file at an absolute path in the repo."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(root or project_root()) / 'mlflow.db'}"


def experiment_name() -> str:
    """``AESR1_EXPERIMENT`` (an ablation study puts its runs in an experiment of their own), else "aesr1"."""
    return os.environ.get("AESR1_EXPERIMENT") or EXPERIMENT


def ensure_experiment(client: MlflowClient, root: Path, name: str | None = None) -> str:
    """Create the experiment once; with a local store its artifacts go under the repo (``mlartifacts/``).

    With a tracking server (http/https) the server's artifact store decides, so every
    machine's artifacts land in one place.
    """
    name = name or experiment_name()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    served = tracking_uri(root).startswith(("http://", "https://", "databricks"))
    try:
        return client.create_experiment(name, artifact_location=None if served else (root / "mlartifacts").as_uri())
    except mlflow.exceptions.MlflowException:
        # another process created it first
        return client.get_experiment_by_name(name).experiment_id


def pipeline_id() -> str:
    """The id shared by the stages of one pipeline execution (see the module docstring)."""
    explicit = os.environ.get("AESR1_PIPELINE_ID")
    if explicit:
        return explicit
    if "DVC_ROOT" in os.environ:
        process = psutil.Process().parent()
        while process is not None and process.name() in _SHELLS:
            process = process.parent()
        if process is not None:
            return f"{process.pid}-{int(process.create_time())}"
    return uuid.uuid4().hex


def _pipeline_run(client: MlflowClient, experiment_id: str, pid: str) -> str:
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{pid}' and tags.`{ROLE_TAG}` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    # a queued `dvc exp` run names its pipeline run after the experiment (DVC sets DVC_EXP_NAME)
    exp_name = os.environ.get("DVC_EXP_NAME")
    tags = {PIPELINE_TAG: pid, ROLE_TAG: "pipeline", **({DVC_EXP_TAG: exp_name} if exp_name else {})}
    run = client.create_run(experiment_id, run_name=exp_name or f"pipeline-{pid[:12]}", tags=tags)
    return run.info.run_id


@contextmanager
def stage_run(stage: str, params: dict, root: Path | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one stage, nested under its pipeline run, with params logged.

    The parent is marked FINISHED (or FAILED) with each stage, so it never stays
    'running' in the UI after the last stage.
    """
    root = root or project_root()
    mlflow.set_tracking_uri(tracking_uri(root))
    client = MlflowClient()
    experiment_id = ensure_experiment(client, root)
    pid = pipeline_id()
    parent_id = _pipeline_run(client, experiment_id, pid)
    status = "FAILED"
    tags = {PIPELINE_TAG: pid, ROLE_TAG: "stage", STAGE_TAG: stage}
    try:
        with mlflow.start_run(
                experiment_id=experiment_id, run_name=stage, parent_run_id=parent_id, tags=tags) as run:
            mlflow.log_params({k: _param_value(v) for k, v in params.items()})
            yield run
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status=status)


def _param_value(value: object) -> str:
    # MLflow caps a param value at 6000 characters
    return str(value)[:6000]
