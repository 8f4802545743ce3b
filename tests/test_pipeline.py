"""The pipeline as a user runs it: `dvc repro` and the Prefect flow, in a copy of the repository."""

import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pandas as pd
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
    params["evaluate"].update(max_per_test_set=6)
    params["evaluate"]["decoding"].update(max_new_tokens=24, batch_size=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def run(cmd, root, env):
    done = subprocess.run(cmd, cwd=root, env=_with_venv(env), capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def stage_runs(tracking_uri):
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["aesr1"])
    return runs[runs["tags.aesr1.role"] == "stage"]


@pytest.fixture(scope="module")
def reproduced(small_repo, tmp_path_factory):
    """The small repository after ``dvc repro``, and the environment it ran in."""
    env = cli_env(tmp_path_factory.mktemp("tracking"))
    run(["dvc", "repro"], small_repo, env)
    return small_repo, env


def test_dvc_repro_runs_every_stage_and_groups_mlflow_runs(reproduced):
    small_repo, env = reproduced
    for path in ("data/ingest/train.parquet", "data/ingest/test.parquet", "data/ingest/rejected.parquet",
                 "data/aescot/distilled.parquet", "data/aescot/distill_failures.parquet",
                 "data/aescot/corpus.parquet", "data/aescot/filtered_out.parquet", "data/models/backbone/config.json",
                 "data/models/sft/config.json", "data/models/rapo/config.json", "dvc.lock"):
        assert (small_repo / path).is_file(), path
    for stage in STAGES:
        assert (small_repo / "metrics" / f"{stage}.json").is_file(), stage
    assert json.loads((small_repo / "metrics/ingest.json").read_text())["train_size"] == 100
    assert json.loads((small_repo / "metrics/filter.json").read_text())["corpus_size"] > 90

    runs = stage_runs(env["MLFLOW_TRACKING_URI"])
    assert sorted(runs["tags.mlflow.runName"]) == sorted(STAGES)
    assert runs["tags.mlflow.parentRunId"].nunique() == 1  # one pipeline run holds every stage

    assert "up to date" in run(["dvc", "repro"], small_repo, env)  # DVC decides nothing is stale
    shown = run(["dvc", "metrics", "show"], small_repo, env)
    assert "train_size" in shown and "rapo.average.plcc" in shown


def test_evaluation_gives_the_main_table_predictions_plots_and_report(reproduced):
    small_repo, env = reproduced
    metrics = json.loads((small_repo / "metrics/evaluate.json").read_text())
    test_sets = ["ava", "tad66k", "flickr_aes", "para", "aadb"]
    assert list(metrics) == ["backbone", "sft", "rapo"]
    for model in metrics.values():
        for name in test_sets:
            assert model[name]["n"] == 6 and 0 <= model[name]["unparseable_rate"] <= 1
            assert "noise_ceiling_plcc" in model[name]  # AesSynth carries the latent score
        assert {"plcc", "srcc", "in_domain_plcc", "out_of_domain_plcc"} <= set(model["average"])
        assert "leak_rate" in model["critique"] or model["critique"]["critiques"] == 0
    predictions = pd.read_parquet(small_repo / "data/evaluate/predictions.parquet")
    assert len(predictions) == 3 * 5 * 6 and set(predictions.model) == set(metrics)
    for model in metrics:
        for kind in ("scatter", "histogram"):
            assert (small_repo / f"data/evaluate/plots/{kind}_{model}.png").stat().st_size > 1000
    assert "| rapo |" in (small_repo / "data/evaluate/report.md").read_text()
    run(["dvc", "plots", "show", "-o", "plots_html"], small_repo, env)
    html = (small_repo / "plots_html" / "index.html").read_text()
    assert "scatter_rapo.png" in html and "RL reward" in html

    runs = stage_runs(env["MLFLOW_TRACKING_URI"])
    evaluate_run = runs[runs["tags.mlflow.runName"] == "evaluate"].iloc[0]
    assert evaluate_run["metrics.rapo.average.plcc"] == pytest.approx(metrics["rapo"]["average"]["plcc"])


def test_the_rapo_policy_is_registered_and_served_with_critique_and_score(reproduced):
    small_repo, env = reproduced
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version("aesr1-policy", "1")
    assert version.tags["policy"] == "rapo" and "average_plcc" in version.tags
    image = small_repo / pd.read_parquet(small_repo / "data/ingest/test.parquet").image_path.iloc[0]

    port = _free_port()
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", "models:/aesr1-policy/1", "--env-manager", "local", "-h", "127.0.0.1",
         "-p", str(port)], cwd=small_repo, env=_with_venv(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        body = {"dataframe_records": [{"image": base64.b64encode(image.read_bytes()).decode()}],
                "params": {"max_new_tokens": 24}}
        answer = _post_when_up(f"http://127.0.0.1:{port}/invocations", body, server)
    finally:
        server.terminate()
        server.wait(30)
    (prediction,) = answer["predictions"]
    assert set(prediction) == {"critique", "score", "completion"} and prediction["completion"]


def test_score_command_uses_the_latest_pipeline_model_or_a_registry_uri(reproduced, tmp_path):
    small_repo, env = reproduced
    test = pd.read_parquet(small_repo / "data/ingest/test.parquet")
    images = [small_repo / p for p in test.image_path.iloc[:2]]
    shown = json.loads(run(["aesr1", "score", *map(str, images), "--json", "--greedy"], small_repo, env))
    assert [row["image"] for row in shown] == [str(p) for p in images]
    assert all(set(row) == {"image", "critique", "score", "completion"} for row in shown)
    by_uri = json.loads(run(["aesr1", "score", str(images[0]), "--json", "--greedy", "--model",
                             "models:/aesr1-policy/1"], small_repo, env))
    assert by_uri[0]["completion"] == shown[0]["completion"]  # the registered model is the pipeline's RAPO model

    folder = tmp_path / "mine"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(images[0].read_bytes()[:50])
    done = subprocess.run(["aesr1", "score", str(folder), "--greedy"], cwd=small_repo, env=_with_venv(env),
                          capture_output=True, text=True)
    assert done.returncode == 1  # one image could not be read: said, and the others still scored
    assert "broken.jpg\terror: cannot read image" in done.stdout
    assert all(f"{p.name}\t" in done.stdout for p in images)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_venv(env: dict) -> dict:
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}


def _post_when_up(url: str, body: dict, server: subprocess.Popen, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited: {server.stderr.read().decode()[-2000:]}")
        try:
            response = httpx.post(url, json=body, timeout=60)
            assert response.status_code == 200, response.text
            return response.json()
        except httpx.TransportError:
            time.sleep(1)
    raise AssertionError("the model server did not answer in time")


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
