"""The pipeline as a user runs it: `dvc repro` and the Prefect flow, in a copy of the repository."""

import base64
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
import yaml
from conftest import IDENTITY, REPO, cli_env, repo_copy, run, shrink_params, with_venv

from aesr1.errors import AesError
from aesr1.trajectory import split_trajectory

pytestmark = pytest.mark.slow
STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])

@pytest.fixture(scope="module")
def small_repo(tmp_path_factory):
    """A repository copy whose params shrink every stage, committed as a user's clone is."""
    root = shrink_params(repo_copy(tmp_path_factory.mktemp("repo")))
    run(["git", "add", "-A"], root, os.environ)
    run(["git", "commit", "-qm", "small"], root, {**os.environ, **IDENTITY})
    return root


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
    assert sorted(runs["tags.mlflow.runName"]) == sorted(STAGES)  # one run per stage, however many processes
    assert runs["tags.mlflow.parentRunId"].nunique() == 1  # one pipeline run holds every stage
    processes = dict(zip(runs["tags.mlflow.runName"], runs["params.processes"]))
    assert processes == {stage: "2" if stage in ("sft", "rl", "evaluate") else "1" for stage in STAGES}
    from transformers import AutoModelForImageTextToText, AutoProcessor

    for model in ("sft", "rapo"):  # saved once, by the main process, as ordinary model folders
        AutoModelForImageTextToText.from_pretrained(small_repo / "data/models" / model)
        AutoProcessor.from_pretrained(small_repo / "data/models" / model)

    (pipeline,) = mlflow.search_runs(experiment_names=["aesr1"], filter_string="tags.`aesr1.role` = 'pipeline'",
                                     output_format="list")
    # the run's own rewrites (dvc.lock, metrics/) do not make it dirty: the clone was clean
    assert pipeline.data.tags["aesr1.git_dirty"] == "false" and "+dirty" not in pipeline.info.run_name
    assert pipeline.info.status == "FINISHED"
    params, figures = pipeline.data.params, pipeline.data.metrics  # what defines the run and what it gave
    assert params["recipe"] == "tiny" and params["rl_max_steps"] == "2" and params["processes"] == "2"
    assert params["launcher"].startswith("torchrun") and params["teacher"] == "analytic"
    evaluation = json.loads((small_repo / "metrics/evaluate.json").read_text())
    for model in ("backbone", "sft", "rapo"):
        average = evaluation[model]["average"]
        assert figures[f"{model}/unparseable"] == pytest.approx(average["unparseable_rate"])
        if average["unparseable_rate"] == 1.0:  # no parseable score: no correlation, said by name
            assert figures[f"{model}/all_unparseable"] == 1.0 and f"{model}/plcc" not in figures
            continue
        assert figures[f"{model}/plcc"] == pytest.approx(average["plcc"])
        assert {f"{model}/srcc_se", f"{model}/in_domain_plcc"} <= set(figures)
    summary = json.loads((small_repo / "metrics/evaluate_summary.json").read_text())  # the same, for DVC
    assert summary["rapo/unparseable"] == pytest.approx(figures["rapo/unparseable"]) and len(summary) < len(figures)
    # the test split's fingerprint: a param of the pipeline run, in the summary and in the report
    assert len(params["test_split"]) == 16 and summary["test_split"] == params["test_split"]
    assert f"Test split `{params['test_split']}`" in (small_repo / "data/evaluate/report.md").read_text()
    assert {f"seconds/{stage}" for stage in STAGES} <= set(figures)
    assert figures["seconds/total"] == pytest.approx(sum(figures[f"seconds/{stage}"] for stage in STAGES))

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
    predictions = pd.read_parquet(small_repo / "data/evaluate/predictions.parquet")
    for name, model in metrics.items():  # the critique check ran on exactly the completions that hold a critique
        written = sum(split_trajectory(text) is not None for text in predictions[predictions.model == name].completion)
        assert model["critique"]["critiques"] == written, name
        assert ("leak_rate" in model["critique"]) == (written > 0), name
    assert len(predictions) == 3 * 5 * 6 and set(predictions.model) == set(metrics)
    # evaluated on two processes (conftest's launcher): every test image exactly once per model
    assert not predictions.duplicated(["model", "image_id"]).any()
    assert (predictions.groupby("model").image_id.nunique() == 30).all()
    for model in metrics:
        for kind in ("scatter", "histogram"):
            assert (small_repo / f"data/evaluate/plots/{kind}_{model}.png").stat().st_size > 1000
    assert "| rapo |" in (small_repo / "data/evaluate/report.md").read_text()
    run(["dvc", "plots", "show", "-o", "plots_html"], small_repo, env)
    html = (small_repo / "plots_html" / "index.html").read_text()
    assert "scatter_rapo.png" in html and "RL reward" in html
    curves = pd.read_csv(small_repo / "data/evaluate/rl_curves.csv")
    for plot in yaml.safe_load((small_repo / "dvc.yaml").read_text())["plots"]:
        for definition in plot.values() if isinstance(plot, dict) else []:
            for fields in definition["y"].values():  # every plotted field is in the data it plots
                assert set(fields) <= set(curves.columns), (fields, list(curves.columns))
    gallery = (small_repo / "data/evaluate/gallery.html").read_text()
    assert gallery.count("<tr>") == 1 + 30 and gallery.count("data:image/jpeg;base64,") == 30

    runs = stage_runs(env["MLFLOW_TRACKING_URI"])
    evaluate_run = runs[runs["tags.mlflow.runName"] == "evaluate"].iloc[0]
    assert evaluate_run["metrics.rapo.average.plcc"] == pytest.approx(metrics["rapo"]["average"]["plcc"])
    artifacts = [a.path for a in mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).list_artifacts(evaluate_run.run_id)]
    assert "gallery.html" in artifacts


def test_the_rapo_policy_is_registered_and_served_with_critique_and_score(reproduced):
    small_repo, env = reproduced
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version("aesr1-policy", "1")
    assert version.tags["policy"] == "rapo" and "average_plcc" in version.tags
    image = small_repo / pd.read_parquet(small_repo / "data/ingest/test.parquet").image_path.iloc[0]

    port = _free_port()
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", "models:/aesr1-policy/1", "--env-manager", "local", "-h", "127.0.0.1",
         "-p", str(port)], cwd=small_repo, env=with_venv(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    done = subprocess.run(["aesr1", "score", str(folder), "--greedy"], cwd=small_repo, env=with_venv(env),
                          capture_output=True, text=True)
    assert done.returncode == 1  # one image could not be read: said, and the others still scored
    assert "broken.jpg\terror: cannot read image" in done.stdout
    assert all(f"{p.name}\t" in done.stdout for p in images)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_a_failed_stage_keeps_earlier_outputs_and_a_rerun_resumes_there(tmp_path, monkeypatch):
    """Through the Prefect flow (test harness): distill fails, synth and ingest stay; the rerun starts at distill."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    root = shrink_params(repo_copy(tmp_path / "repo"))
    env = cli_env(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("PATH", with_venv(dict(os.environ))["PATH"])
    params = yaml.safe_load((root / "params.yaml").read_text())
    good_params = (root / "params.yaml").read_text()
    params["distill"]["no_such_setting"] = 1  # unknown keys are errors: the distill stage fails on it
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = ["synth", "ingest", "distill"]
    with prefect_test_harness():
        failed = pipeline(stages=stages, root=str(root), return_state=True)
        assert failed.is_failed() and "stage 'distill' failed" in failed.message
        train = root / "data/ingest/train.parquet"
        assert train.is_file() and (root / "metrics/ingest.json").is_file()
        first_build = train.stat().st_mtime_ns

        (root / "params.yaml").write_text(good_params)
        state = pipeline(stages=stages, root=str(root), return_state=True)
        # inside the harness: an exception leaving it skips its server's stop (prefect_test_harness has no
        # finally), and the server's atexit stop then logs to pytest's closed stdout
        with pytest.raises(AesError, match="unknown stages"):
            pipeline(stages=["nope"], root=str(root))
    assert state.is_completed(), state
    assert state.result() == stages
    assert train.stat().st_mtime_ns == first_build  # ingest was not redone
    assert (root / "data/aescot/distilled.parquet").is_file()
    runs = stage_runs(env["MLFLOW_TRACKING_URI"])
    # the invalid params stopped distill before its run began; the rerun's distill is the only one
    assert sorted(runs["tags.mlflow.runName"]) == ["distill", "ingest", "synth"]


def test_an_ablation_runs_as_queued_dvc_experiments_and_reports_beside_the_paper(reproduced, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.ablations import ablation

    small_repo, env = reproduced
    identity = IDENTITY
    for key, value in {**identity, "MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"],
                       "PATH": with_venv(dict(os.environ))["PATH"]}.items():
        monkeypatch.setenv(key, value)
    run(["git", "add", "-A"], small_repo, env)
    run(["git", "commit", "-qm", "baseline"], small_repo, {**env, **identity})  # experiments start from a commit
    with prefect_test_harness():
        report = Path(ablation(study="rewards", root=str(small_repo), settings=["rank", "error"]))
    text = report.read_text()
    assert "| rank | rewards-rank-" in text and "| error | rewards-error-" in text
    assert "| binary | - |" in text  # not run: the paper's row with a gap, never a guess
    assert (report.parent / "plot.png").is_file()

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["aesr1-ablation-rewards"])
    pipelines = runs[runs["tags.aesr1.role"] == "pipeline"]
    experiments = pipelines["tags.aesr1.dvc_experiment"]
    assert sorted(name.split("-")[1] for name in experiments) == ["error", "rank"]
    # a pipeline run is named by date, commit and DVC experiment
    assert all(run_name.endswith(" " + exp) for run_name, exp in zip(pipelines["tags.mlflow.runName"], experiments))
    stages = runs[runs["tags.aesr1.role"] == "stage"]
    assert set(stages["tags.mlflow.runName"]) == {"rl", "evaluate"}  # the rest came from DVC's cache
    assert (runs["tags.aesr1.role"] == "report").sum() == 1
    shown = run(["dvc", "exp", "show", "--csv"], small_repo, env)
    assert "rewards-rank-" in shown and "rewards-error-" in shown
