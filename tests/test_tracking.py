"""MLflow lineage: every stage run names its commit, code, params and the data it read; killed runs get marked."""

import socket
import subprocess

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from aesr1.config import config
from aesr1.stage import Recorder, run_stage
from aesr1.tracking import (
    EXPERIMENT,
    HOST_TAG,
    PROCESS_TAG,
    ROLE_TAG,
    STAGE_TAG,
    ensure_experiment,
    stage_run,
    tracking_uri,
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
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs
    (stage,) = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'stage'")
    tags = stage.data.tags
    assert tags["mlflow.source.git.commit"] == commit and tags["aesr1.git_dirty"] == "false"
    assert tags["aesr1.code_files"].split(",") == ["aesr1/config.py", "aesr1/distributed.py", "aesr1/errors.py",
                                                   "aesr1/lineage.py", "aesr1/stage.py", "aesr1/tracking.py"]
    assert len(tags["aesr1.code_md5"]) == 32 and len(tags["aesr1.params_md5"]) == 32
    (dataset,) = stage.inputs.dataset_inputs
    assert dataset.dataset.name == "manifest.parquet"
    assert (tmp_path / "manifest.parquet").as_uri() in dataset.dataset.source
    assert dataset.tags[0].value == "training" and dataset.dataset.digest
    (pipeline,) = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'pipeline'")
    assert commit[:7] in pipeline.info.run_name and "+dirty" not in pipeline.info.run_name

    (tmp_path / "params.yaml").write_text("toy:\n  rate: 0.75\n")  # uncommitted: the next run says so
    run_stage("toy", "params.yaml", ToyConfig, toy_stage, metrics_dir=tmp_path / "metrics")
    newest = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'stage'",
                                order_by=["attributes.start_time DESC"])[0]
    assert newest.data.tags["aesr1.git_dirty"] == "true"
    assert newest.data.tags["aesr1.params_md5"] != tags["aesr1.params_md5"]
    assert newest.data.tags["aesr1.code_md5"] == tags["aesr1.code_md5"]


def test_a_stage_killed_mid_run_is_marked_killed_when_the_next_starts(tmp_path):
    mlflow.set_tracking_uri(tracking_uri(tmp_path))  # this test's store (an earlier test may have set another)
    client = MlflowClient()
    experiment_id = ensure_experiment(client, tmp_path)

    dead = client.create_run(experiment_id, tags={ROLE_TAG: "stage", STAGE_TAG: "sft",
                                                   HOST_TAG: socket.gethostname(), PROCESS_TAG: "999999999-1"})
    with stage_run("rl", {}, root=tmp_path) as run:
        assert client.get_run(dead.info.run_id).info.status == "KILLED"
        assert client.get_run(run.info.run_id).info.status == "RUNNING"  # a live process's run is left alone
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"
