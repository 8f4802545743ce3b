"""The pipeline as a user runs it: `dvc repro` and the Prefect flow, in a copy of the repository."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import REPO, cli_env, repo_copy

pytestmark = pytest.mark.slow
STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])

SMALL_SIZES = {"ava": {"train": 50, "test": 15}, "tad66k": {"train": 50, "test": 15},
               "flickr_aes": {"train": 25, "test": 15}, "para": {"train": 0, "test": 15},
               "aadb": {"train": 0, "test": 15}}


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory):
    """A repository copy whose params shrink every stage."""
    root = repo_copy(tmp_path_factory.mktemp("repo"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["synth"]["sizes"] = SMALL_SIZES
    params["ingest"].update(train_size=100, min_test_per_dataset=5, max_reject_rate=0.2)
    params["backbone"]["tiny"].update(hidden_size=64, intermediate_size=128, layers=2, vision_hidden_size=32,
                                      vision_heads=2, image_size=32)
    params["backbone"]["pretrain"].update(samples=32)
    params["backbone"]["pretrain"]["train"].update(epochs=1)
    params["sft"]["train"].update(epochs=1)
    params["sft"]["heldout"].update(samples=8, max_new_tokens=24)
    params["rl"]["grpo"].update(max_steps=2, images_per_device=2, max_completion_length=16)
    params["rl"]["heldout"].update(samples=8, max_new_tokens=24)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def run(cmd, root, env):
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def stage_runs(tracking_uri):
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["aesr1"])
    return runs[runs["tags.aesr1.role"] == "stage"]


def test_dvc_repro_runs_every_stage_and_groups_mlflow_runs(small_repo, tmp_path):
    env = cli_env(tmp_path)
    run(["dvc", "repro"], small_repo, env)
    for path in ("data/ingest/train.parquet", "data/ingest/test.parquet", "data/ingest/rejected.parquet",
                 "data/aescot/distilled.parquet", "data/aescot/distill_failures.parquet",
                 "data/aescot/corpus.parquet", "data/aescot/filtered_out.parquet", "dvc.lock"):
        assert (small_repo / path).is_file(), path
    for stage in STAGES:
        assert (small_repo / "metrics" / f"{stage}.json").is_file(), stage
    assert json.loads((small_repo / "metrics/ingest.json").read_text())["train_size"] == 100
    assert json.loads((small_repo / "metrics/filter.json").read_text())["corpus_size"] > 90

    runs = stage_runs(env["MLFLOW_TRACKING_URI"])
    assert sorted(runs["tags.mlflow.runName"]) == sorted(STAGES)
    assert runs["tags.mlflow.parentRunId"].nunique() == 1  # one pipeline run holds every stage

    assert "up to date" in run(["dvc", "repro"], small_repo, env)  # DVC decides nothing is stale
    assert "train_size" in run(["dvc", "metrics", "show"], small_repo, env)


def test_prefect_flow_runs_the_same_stages(small_repo, tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    env = cli_env(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    with prefect_test_harness():
        state = pipeline(root=str(small_repo), force=True, return_state=True)
    assert state.is_completed(), state
    assert state.result() == STAGES
    runs = stage_runs(env["MLFLOW_TRACKING_URI"])
    assert sorted(runs["tags.mlflow.runName"]) == sorted(STAGES)
    assert runs["tags.aesr1.pipeline_id"].nunique() == 1
    with pytest.raises(ValueError, match="unknown stages"):
        with prefect_test_harness():
            pipeline(stages=["nope"], root=str(small_repo))
