"""MLflow lineage: every stage run names its commit, code, params and the data it read; killed runs get marked;
a tracking server's refusal stops a stage before it runs, with one line."""

import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pandas as pd
import pytest
from conftest import project
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from aesr1 import cli, environment
from aesr1.config import config
from aesr1.stage import Recorder, run_stage
from aesr1.summary import model_metrics
from aesr1.tracking import (
    EXPERIMENT,
    HOST_TAG,
    PIPELINE_TAG,
    PROCESS_TAG,
    ROLE_TAG,
    STAGE_TAG,
    close_dead_runs_of,
    ensure_experiment,
    refusal,
    stage_run,
    tracking_uri,
    ui_link,
)


@config
class ToyConfig:
    manifest: str = "manifest.parquet"
    rate: float = 0.5


def toy_stage(cfg: ToyConfig, recorder: Recorder) -> dict:
    frame = pd.read_parquet(cfg.manifest)
    recorder.dataset(cfg.manifest, frame, "training")
    return {"rows": len(frame)}


def git(root, *args):
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def test_a_stage_run_carries_commit_code_params_and_dataset_lineage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("toy:\n  rate: 0.25\n")
    pd.DataFrame({"image_id": ["a", "b"], "score": [0.1, 0.9]}).to_parquet(tmp_path / "manifest.parquet")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "params.yaml")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params")
    commit = git(tmp_path, "rev-parse", "HEAD")

    run_stage("toy", "params.yaml", ToyConfig, toy_stage, metrics_dir=tmp_path / "metrics")
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # a training experiment
    (stage,) = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'stage'")
    tags = stage.data.tags
    assert tags["mlflow.source.git.commit"] == commit and tags["aesr1.git_dirty"] == "false"
    assert tags["aesr1.code_files"].split(",") == ["aesr1/config.py", "aesr1/distributed.py", "aesr1/environment.py",
                                                   "aesr1/errors.py", "aesr1/lineage.py", "aesr1/stage.py",
                                                   "aesr1/summary.py", "aesr1/tracking.py"]
    assert len(tags["aesr1.code_md5"]) == 32 and len(tags["aesr1.params_md5"]) == 32
    (dataset,) = stage.inputs.dataset_inputs
    assert dataset.dataset.name == "manifest.parquet"
    assert (tmp_path / "manifest.parquet").as_uri() in dataset.dataset.source
    assert dataset.tags[0].value == "training" and dataset.dataset.digest
    (pipeline,) = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'pipeline'")
    assert commit[:7] in pipeline.info.run_name and "+dirty" not in pipeline.info.run_name

    (tmp_path / "dvc.lock").write_text("v1")
    git(tmp_path, "add", "dvc.lock", "metrics")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock and metrics")
    commit = git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "dvc.lock").write_text("v2")  # what the pipeline rewrites itself is not the user's change
    (tmp_path / "metrics" / "toy.json").write_text("{}")
    run_stage("toy", "params.yaml", ToyConfig, toy_stage, metrics_dir=tmp_path / "metrics")
    newest = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'pipeline'",
                                order_by=["attributes.start_time DESC"])[0]
    assert newest.data.tags["aesr1.git_dirty"] == "false" and "+dirty" not in newest.info.run_name

    (tmp_path / "params.yaml").write_text("toy:\n  rate: 0.75\n")  # uncommitted: the next run says so
    run_stage("toy", "params.yaml", ToyConfig, toy_stage, metrics_dir=tmp_path / "metrics")
    newest = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'stage'",
                                order_by=["attributes.start_time DESC"])[0]
    assert newest.data.tags["aesr1.git_dirty"] == "true"
    assert newest.data.tags["aesr1.params_md5"] != tags["aesr1.params_md5"]
    assert newest.data.tags["aesr1.code_md5"] == tags["aesr1.code_md5"]


def dead_stage(client, experiment_id):
    """A pipeline run whose stage's process died mid-run: both left RUNNING."""
    parent = client.create_run(experiment_id, tags={ROLE_TAG: "pipeline", PIPELINE_TAG: "dead-pipeline"})
    stage = client.create_run(experiment_id, tags={ROLE_TAG: "stage", STAGE_TAG: "sft", MLFLOW_PARENT_RUN_ID:
                                                   parent.info.run_id, HOST_TAG: socket.gethostname(),
                                                   PROCESS_TAG: "999999999-1"})
    return parent.info.run_id, stage.info.run_id


def test_runs_killed_mid_stage_are_marked_killed_when_the_next_stage_starts(tmp_path):
    mlflow.set_tracking_uri(tracking_uri(tmp_path))  # this test's store (an earlier test may have set another)
    client = MlflowClient()
    experiment_id = ensure_experiment(client, tmp_path)

    dead_parent, dead = dead_stage(client, experiment_id)
    with stage_run("rl", {}, root=tmp_path) as run:
        assert client.get_run(dead).info.status == "KILLED"
        assert client.get_run(dead_parent).info.status == "KILLED"
        assert client.get_run(run.info.run_id).info.status == "RUNNING"  # a live process's run is left alone
        parent = run.data.tags[MLFLOW_PARENT_RUN_ID]
        assert client.get_run(parent).info.status == "RUNNING"  # a pipeline runs while a stage does
        assert close_dead_runs_of(tmp_path) == []  # a live stage keeps its pipeline run running
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"
    assert client.get_run(parent).info.status == "FINISHED"


def test_a_pipeline_flow_start_closes_runs_of_dead_processes(tmp_path):
    """A stage restored from DVC's run cache starts no run: the pipeline flow closes the dead ones itself."""
    mlflow.set_tracking_uri(tracking_uri(tmp_path))
    client = MlflowClient()
    dead_parent, dead = dead_stage(client, ensure_experiment(client, tmp_path))
    assert sorted(close_dead_runs_of(tmp_path)) == sorted([dead_parent, dead])
    assert {client.get_run(r).info.status for r in (dead_parent, dead)} == {"KILLED"}


def test_the_pipeline_run_holds_the_runs_defining_params_and_its_results(tmp_path, monkeypatch):
    """Two runs compare on the pipeline run alone: short-named params and metrics, each stage's seconds."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(environment.PIPELINE_ID, "p1")
    (tmp_path / "params.yaml").write_text(
        "launcher: python\nrecipe: custom\nrl:\n  grpo: {learning_rate: 5.0e-5, temperature: 0.7}\n"
        "toy:\n  rate: 0.25\n")
    pd.DataFrame({"image_id": ["a", "b"], "score": [0.1, 0.9]}).to_parquet(tmp_path / "manifest.parquet")

    def scored_stage(cfg: ToyConfig, recorder: Recorder) -> dict:
        evaluation = {"rapo": {"average": {"plcc": 0.4, "srcc": 0.3, "plcc_se": 0.02, "unparseable_rate": 0.0},
                               "ava": {"n": 2, "plcc": 0.5, "srcc": 0.45},
                               "readouts": {"expected": {"average": {"plcc": 0.42, "srcc": 0.35}}}}}
        recorder.pipeline_metrics(model_metrics(evaluation))
        return {"rows": 2}

    run_stage("toy", "params.yaml", ToyConfig, toy_stage, metrics_dir=tmp_path / "metrics")
    run_stage("evaluate", "params.yaml", ToyConfig, scored_stage, metrics_dir=tmp_path / "metrics")
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (pipeline,) = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'pipeline'")
    params, metrics = pipeline.data.params, pipeline.data.metrics
    assert params["rl_learning_rate"] == "5e-05" and params["rollout_temperature"] == "0.7"
    assert params["recipe"] == "custom" and params["launcher"] == "python" and params["teacher_model"] == "none"
    assert params["processes"] == "1"  # logged by the stages the launcher starts
    assert metrics["rapo/plcc"] == 0.4 and metrics["rapo/plcc_se"] == 0.02 and metrics["rapo/ava_srcc"] == 0.45
    assert metrics["rapo/expected_plcc"] == 0.42 and metrics["rapo/unparseable"] == 0.0
    assert metrics["seconds/total"] == metrics["seconds/toy"] + metrics["seconds/evaluate"] > 0
    (stage,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'evaluate'")
    assert "rapo/plcc" not in stage.data.metrics and "rows" in stage.data.metrics  # stages keep their detail


def test_the_ui_link_opens_the_training_views(monkeypatch):
    """MLflow 3.17's UI opens a new browser on its GenAI views unless the link picks the training ones."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow-host:5000/")
    assert ui_link("3", "abc") == "http://mlflow-host:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x.db")
    assert ui_link("3") == "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret-password@mlflow-host:5000")  # logged: no password
    assert ui_link("3") == "http://***@mlflow-host:5000/#/experiments/3?workflowType=machine_learning"


class Refusing:
    """A loopback server that refuses every request as an MLflow basic-auth server does (``status``, its body)."""

    BODIES = {401: b"You are not authenticated.", 403: b"Permission denied"}

    def __init__(self, status: int):
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def refuse(self):
                server.paths.append(self.path)
                self.send_response(status)
                self.send_header("Content-Length", str(len(Refusing.BODIES[status])))
                self.end_headers()
                self.wfile.write(Refusing.BODIES[status])

            do_GET = do_POST = refuse

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("status, user, said", [
    (401, None, "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"),
    (403, "bob", "user 'bob' lacks permission on experiment 'aesr1' (EDIT needed): ask the server's admin to grant "
                 "it (docs/deployment.md), or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                 "MLFLOW_TRACKING_TOKEN) to a user who has it"),
])
def test_a_refusing_server_stops_a_stage_before_it_runs_with_one_line(status, user, said, tmp_path, monkeypatch,
                                                                        capsys):
    params = project(tmp_path, **{"synth.out_dir": str(tmp_path / "aessynth")})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    if user:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a-password-never-shown")
    with Refusing(status) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        assert cli.main(["synth", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err == f"aesr1 synth: error: MLflow server {server.url} refused (HTTP {status}): {said}\n"
    assert server.paths == ["/api/2.0/mlflow/experiments/get-by-name?experiment_name=aesr1"]  # asked once, no retry
    assert not (tmp_path / "aessynth").exists() and not (tmp_path / "metrics").exists()  # the stage never ran


def test_a_refusal_says_what_to_fix_and_never_shows_a_secret(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    uri = "http://alice:s3cret-password@mlflow-host:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "a-token-never-shown")
    assert refusal(uri, 401, "experiment 'aesr1'", "EDIT") == (
        "MLflow server http://***@mlflow-host:5000 refused (HTTP 401): it does not accept the token in "
        "MLFLOW_TRACKING_TOKEN: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    assert "the token's user lacks permission on model models:/aesr1-policy/1 (READ needed)" in refusal(
        uri, 403, "model models:/aesr1-policy/1", "READ")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-password")
    assert refusal(uri, 401, "experiment 'aesr1'", "EDIT").endswith(
        "refused (HTTP 401): it does not accept user 'alice' with that password: set the user's password in "
        "MLFLOW_TRACKING_PASSWORD")
    host = refusal(uri, 403, "experiment 'aesr1'", "EDIT",
                   "Response body: 'Invalid Host header - possible DNS rebinding attack detected'")
    assert host.endswith("refused (HTTP 403): it does not accept the host name this client uses: add it to the "
                         "server's --allowed-hosts")
    for status in (401, 403):
        assert "s3cret-password" not in refusal(uri, status, "experiment 'aesr1'", "EDIT")
