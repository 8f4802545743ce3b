"""MLflow tracking for stages: where runs go, and how one pipeline execution's stages group.

Every stage run is a child of a *pipeline run* (MLflow's parent/child nesting), so the
UI shows one pipeline execution with its stages under it. Stages of one execution share
a pipeline id, taken from, in order:

1. ``AESR1_PIPELINE_ID`` (the Prefect flow sets it to its flow-run id; set it yourself
   to group stages run by hand);
2. the process that launched this stage (past shells and launchers such as torchrun) when
   it is a pipeline runner (it exported ``DVC_ROOT``): that process's pid and start time,
   so all stages of one ``dvc repro`` share a parent;
3. otherwise a fresh id: a stage run alone is its own pipeline.

A tracking server with authentication (docs/deployment.md) gets the credentials MLflow's client
reads from the environment (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, or
``MLFLOW_TRACKING_TOKEN``). A stage asks it for its experiment before anything else, so a refusal
(HTTP 401: no or wrong credentials; 403: a user without permission) stops the stage before it
loads data or trains, with one line naming the server, the status and what to set
(:class:`TrackingAccessError`).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from unittest import mock

import mlflow
import psutil
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from aesr1 import environment
from aesr1.errors import AesError, redact
from aesr1.lineage import git_state
from aesr1.summary import seconds_metric, total_seconds

log = logging.getLogger(__name__)

EXPERIMENT = "aesr1"
PIPELINE_TAG = "aesr1.pipeline_id"
ROLE_TAG = "aesr1.role"
STAGE_TAG = "aesr1.stage"
DVC_EXP_TAG = "aesr1.dvc_experiment"
DIRTY_TAG = "aesr1.git_dirty"
HOST_TAG, PROCESS_TAG = "aesr1.host", "aesr1.process"
# marks a training experiment. MLflow 3.17's UI does not read it to pick its view: a new browser opens on the
# GenAI views unless the link carries UI_TRAINING_VIEW (or the user clicks "Model training" once)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_TRAINING_VIEW = "workflowType=machine_learning"
_SHELLS = {"sh", "bash", "dash", "zsh", "fish"}
# launchers that start a stage's processes (dvc.yaml's launcher): their parent is the pipeline runner
_LAUNCHERS = {"torchrun", "accelerate", "deepspeed"}
_LAUNCHER_MODULES = ("torch.distributed.run", "torch.distributed.launch", "deepspeed.launcher")
_EXPERIMENT_RUN_DIR = os.path.join(".dvc", "tmp", "exps")
# where MLflow's client takes the credentials it sends a tracking server (basic auth, else a bearer token)
CREDENTIALS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"


class TrackingAccessError(AesError):
    """The MLflow server refused this process: no or wrong credentials (HTTP 401), or a user who lacks
    permission (HTTP 403)."""


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


def served(uri: str) -> bool:
    """A tracking server (http/https), as opposed to a local store."""
    return uri.startswith(("http://", "https://"))


def refusal(uri: str, status: int, resource: str, needed: str, answer: str = "") -> str:
    """The line for a refusal: the server, the HTTP status, and the variable to set or the permission to ask for.

    ``answer``: the server's response, which tells a host name the server does not accept (403 too) from a user's
    permission. The user named is the one MLflow's client sent (the environment, else ``~/.mlflow/credentials``)."""
    from mlflow.server.security_utils import INVALID_HOST_MSG
    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()
    token = bool(os.environ.get("MLFLOW_TRACKING_TOKEN"))
    head = f"MLflow server {redact(uri)} refused (HTTP {status})"
    if INVALID_HOST_MSG in answer:
        return f"{head}: it does not accept the host name this client uses: add it to the server's --allowed-hosts"
    if status == 401:
        if creds.username and creds.password:
            return (f"{head}: it does not accept user '{creds.username}' with that password: set the user's "
                    f"password in MLFLOW_TRACKING_PASSWORD")
        if token:
            return f"{head}: it does not accept the token in MLFLOW_TRACKING_TOKEN: set {CREDENTIALS}"
        return f"{head}: set {CREDENTIALS}"
    user = f"user '{creds.username}'" if creds.username else "the token's user" if token else "an anonymous client"
    return (f"{head}: {user} lacks permission on {resource} ({needed} needed): ask the server's admin to grant "
            f"it (docs/deployment.md), or set {CREDENTIALS} to a user who has it")


@contextmanager
def refusals_explained(uri: str, resource: str, needed: str) -> Iterator[None]:
    """A tracking server's 401 or 403 inside the block as a :class:`TrackingAccessError` (:func:`refusal`'s line)
    in place of MLflow's exception, whose message carries the whole response."""
    try:
        yield
    except MlflowException as error:
        status = error.get_http_status_code()
        if served(uri) and status in (401, 403):
            raise TrackingAccessError(refusal(uri, status, resource, needed, error.message)) from None
        raise


def check_access(uri: str, timeout: float) -> str:
    """Ask the tracking server, as this process's user, for what a stage needs of it first: to read the experiment
    and write to it (its kind tag, set to the value the stages set: nothing changes). Says what was found; a
    refusal is a :class:`TrackingAccessError`. One try per request, each within ``timeout`` seconds."""
    from mlflow.utils.credentials import read_mlflow_creds

    name = experiment_name()
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout)))}
    with mock.patch.dict(os.environ, quick), refusals_explained(uri, f"experiment '{name}'", "EDIT"):
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            return f"experiment '{name}' does not exist yet (the first stage creates it)"
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(experiment.experiment_id, key, value)
    user = read_mlflow_creds().username
    return f"{f'user {user!r}' if user else 'this client'} may write to experiment '{name}'"


def check_can_register(name: str) -> None:
    """On a tracking server: whether this process's user may add a version to registered model ``name``, asked
    before a stage spends its time, not after (its description set to the one it holds: nothing changes). A model
    not registered yet, any signed-in user may create. A refusal is a :class:`TrackingAccessError`."""
    uri = mlflow.get_tracking_uri()
    if not served(uri):
        return
    client = MlflowClient()
    with refusals_explained(uri, f"registered model '{name}'", "EDIT"):
        try:
            model = client.get_registered_model(name)
        except MlflowException as error:
            if error.get_http_status_code() == 404:
                return
            raise
        client.update_registered_model(name, description=model.description or "")


def experiment_name() -> str:
    """``AESR1_EXPERIMENT`` (an ablation study puts its runs in an experiment of their own), else "aesr1"."""
    return os.environ.get(environment.EXPERIMENT) or EXPERIMENT


def ensure_experiment(client: MlflowClient, root: Path, name: str | None = None) -> str:
    """Create the experiment once; with a local store its artifacts go under the repo (``mlartifacts/``).

    With a tracking server (http/https) the server's artifact store decides, so every
    machine's artifacts land in one place.
    """
    name = name or experiment_name()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        remote = tracking_uri(root).startswith(("http://", "https://", "databricks"))
        try:
            return client.create_experiment(name, artifact_location=None if remote else (root / "mlartifacts").as_uri(),
                                            tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException:
            experiment = client.get_experiment_by_name(name)  # another process created it first
    if not set(EXPERIMENT_KIND.items()) <= set(experiment.tags.items()):
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def ui_link(experiment_id: str, run_id: str | None = None, root: Path | None = None) -> str:
    """Where the MLflow UI shows an experiment's runs (or one run), opening on its training views.

    With a local store the UI is ``mlflow ui`` on its default port."""
    uri = tracking_uri(root)
    base = redact(uri).rstrip("/") if served(uri) else "http://127.0.0.1:5000"
    page = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/#/{page}?{UI_TRAINING_VIEW}"


def git_tags(root: Path) -> dict[str, str]:
    """The commit (MLflow's own tag, shown in the UI) and whether tracked files differed from it."""
    state = git_state(root)
    if state is None:
        return {}
    commit, dirty = state
    return {MLFLOW_GIT_COMMIT: commit, DIRTY_TAG: str(dirty).lower()}


def process_tags() -> dict[str, str]:
    process = psutil.Process()
    return {HOST_TAG: socket.gethostname(), PROCESS_TAG: f"{process.pid}-{int(process.create_time())}"}


def alive(process_tag: str) -> bool:
    pid, started = (int(part) for part in process_tag.split("-"))
    try:
        return int(psutil.Process(pid).create_time()) == started
    except psutil.Error:
        return False


def close_dead_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the runs whose process died: stage runs still RUNNING whose process on this host is gone,
    then pipeline runs still RUNNING with no stage running (a pipeline run is RUNNING only while one of its
    stages is). Returns the ids marked."""
    found = client.search_runs([experiment_id], filter_string=(
        f"attributes.status = 'RUNNING' and tags.`{ROLE_TAG}` = 'stage' "
        f"and tags.`{HOST_TAG}` = '{socket.gethostname()}'"))
    killed = [r.info.run_id for r in found if PROCESS_TAG in r.data.tags and not alive(r.data.tags[PROCESS_TAG])]
    for run_id in killed:
        client.set_terminated(run_id, status="KILLED")
    pipelines = client.search_runs([experiment_id], filter_string=(
        f"attributes.status = 'RUNNING' and tags.`{ROLE_TAG}` = 'pipeline'"))
    for run in pipelines:
        children = client.search_runs([experiment_id], filter_string=(
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run.info.run_id}'"))
        if children and not any(child.info.status == "RUNNING" for child in children):
            client.set_terminated(run.info.run_id, status="KILLED")
            killed.append(run.info.run_id)
    return killed


def close_dead_runs_of(root: Path | None = None) -> list[str]:
    """:func:`close_dead_runs` in the project's store, for what starts a pipeline without a stage
    (a run restored from DVC's run cache starts none); nothing when the experiment does not exist yet."""
    root = root or project_root()
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    with refusals_explained(uri, f"experiment '{experiment_name()}'", "EDIT"):
        experiment = client.get_experiment_by_name(experiment_name())
        return close_dead_runs(client, experiment.experiment_id) if experiment else []


def pipeline_id() -> str:
    """The id shared by the stages of one pipeline execution (see the module docstring)."""
    explicit = os.environ.get(environment.PIPELINE_ID)
    if explicit:
        return explicit
    if environment.DVC_ROOT in os.environ:
        process = psutil.Process().parent()
        while process is not None and _between(process):
            process = process.parent()
        if process is not None:
            return f"{process.pid}-{int(process.create_time())}"
    return uuid.uuid4().hex


def _between(process: psutil.Process) -> bool:
    """A shell or a distributed launcher between the pipeline runner (DVC) and a stage's process.

    Launchers are told by their command line: torchrun renames its process (``pt_elastic``).
    """
    if process.name() in _SHELLS:
        return True
    try:
        argv = process.cmdline()
    except psutil.Error:
        return False
    return any(Path(arg).name in _LAUNCHERS for arg in argv[:2]) or any(m in argv for m in _LAUNCHER_MODULES)


def _pipeline_run(client: MlflowClient, experiment_id: str, pid: str, lineage: dict[str, str]) -> str:
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{pid}' and tags.`{ROLE_TAG}` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    # a queued `dvc exp` run names its pipeline run after the experiment (DVC sets DVC_EXP_NAME)
    exp_name = os.environ.get(environment.DVC_EXPERIMENT)
    tags = {PIPELINE_TAG: pid, ROLE_TAG: "pipeline", **lineage, **({DVC_EXP_TAG: exp_name} if exp_name else {})}
    return client.create_run(experiment_id, run_name=pipeline_run_name(lineage, exp_name), tags=tags).info.run_id


def pipeline_run_name(lineage: dict[str, str], exp_name: str | None) -> str:
    """E.g. ``2026-11-24 09:30 3f2a9c1+dirty exp-lr-sweep``: when, which commit, which DVC experiment."""
    parts = [datetime.datetime.now().strftime("%Y-%m-%d %H:%M")]
    if MLFLOW_GIT_COMMIT in lineage:
        parts.append(lineage[MLFLOW_GIT_COMMIT][:7] + ("+dirty" if lineage[DIRTY_TAG] == "true" else ""))
    return " ".join(parts + ([exp_name] if exp_name else []))


@contextmanager
def stage_run(stage: str, params: dict, root: Path | None = None, tags: dict[str, str] | None = None,
              pipeline: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one stage, nested under its pipeline run, with params and lineage tags.

    ``pipeline``: the params that define the whole run (:func:`aesr1.summary.pipeline_params`), logged on the
    pipeline run. The pipeline run is RUNNING while one of its stages runs and FINISHED (or FAILED) after it,
    so it never stays 'running' in the UI after the last stage; runs whose process was killed are marked
    KILLED when the next stage starts on that host (:func:`close_dead_runs`).
    """
    root = root or project_root()
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    with refusals_explained(uri, f"experiment '{experiment_name()}'", "EDIT"):  # before the stage loads or trains
        experiment_id = ensure_experiment(client, root)
        close_dead_runs(client, experiment_id)
        pid = pipeline_id()
        lineage = git_tags(root)
        parent_id = _pipeline_run(client, experiment_id, pid, lineage)
    status = "FAILED"
    tags = {PIPELINE_TAG: pid, ROLE_TAG: "stage", STAGE_TAG: stage, **lineage, **process_tags(),
            **(tags or {})}
    try:
        with mlflow.start_run(
                experiment_id=experiment_id, run_name=stage, parent_run_id=parent_id, tags=tags) as run:
            client.update_run(parent_id, status="RUNNING")
            log_pipeline_params(client, parent_id, pipeline or {})
            mlflow.log_params({k: _param_value(v) for k, v in params.items()})
            yield run
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status=status)


def log_pipeline_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """Log the params the pipeline run does not hold yet; a value that changed within one pipeline run
    (a params file edited between its stages) is kept as first logged, with a warning."""
    held = client.get_run(run_id).data.params
    changed = {k: (held[k], v) for k, v in params.items() if k in held and held[k] != _param_value(v)}
    if changed:
        log.warning("pipeline run %s keeps its first values of %s", run_id, changed)
    new = {k: v for k, v in params.items() if k not in held}
    if new:
        client.log_batch(run_id, params=[Param(k, _param_value(v)) for k, v in new.items()])


def log_pipeline_metrics(client: MlflowClient, run_id: str, stage: str, seconds: float,
                         metrics: dict[str, float]) -> None:
    """A stage's contribution to its pipeline run: its seconds (and the new total) and its summary metrics."""
    values = {**metrics, seconds_metric(stage): seconds}
    held = {**client.get_run(run_id).data.metrics, **values}
    values[seconds_metric("total")] = total_seconds(held)
    client.log_batch(run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), 0) for k, v in values.items()])


def _param_value(value: object) -> str:
    # MLflow caps a param value at 6000 characters
    return str(value)[:6000]
