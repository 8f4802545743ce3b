"""The ablation studies' settings, reading `dvc exp show`, and the report beside the paper's tables."""

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from aesr1.errors import AesError
from aesr1.evaluation.ablation import PAPER, findings, write_ablation_report
from flows.ablations import COMMON, experiment_name, experiment_results, set_params, study_settings


def test_reward_study_runs_every_mode_from_the_sft_model_unless_asked_for_the_papers_protocol():
    settings = study_settings("rewards")
    assert list(settings) == ["binary", "error", "rank", "binary+rank", "error+rank"]
    assert all("rl.model" not in s for s in settings.values())  # RL from the SFT model: the pipeline's own rl.model
    paper = study_settings("rewards", cold_start=False)  # the paper: RL without the cold start
    assert all(s["rl.model"] == "data/models/backbone" for s in paper.values())
    assert settings["binary+rank"]["rl.rewards.mode"] == "binary+rank"
    assert COMMON["evaluate.only"] == "[rapo]" and COMMON["evaluate.register.model"] == "null"


def test_sft_epoch_study_zero_epochs_means_rl_from_the_backbone():
    settings = study_settings("sft-epochs")
    assert settings["0"] == {"rl.model": "data/models/backbone"}
    assert [settings[e]["sft.train.epochs"] for e in ("1", "2", "10")] == ["1", "2", "10"]
    with pytest.raises(AesError, match="unknown study"):
        study_settings("learning-rate")
    assert experiment_name("rewards", "error+rank", "0101") == "rewards-error-plus-rank-0101"


def test_a_settings_overrides_reach_the_stage_over_the_recipe(tmp_path):
    """DVC applies the -S arguments to params.yaml (its own Hydra override code, as `dvc exp run` does); the
    override wins over the tiny recipe's value and leaves the recipe's other values as they are."""
    import shutil

    from conftest import REPO
    from dvc.utils.hydra import apply_overrides

    from aesr1.config import load_section
    from aesr1.evaluation.evaluate import EvaluateConfig
    from aesr1.policy.sft import SFTStageConfig

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    args = set_params(study_settings("sft-epochs")["10"])
    apply_overrides(tmp_path / "params.yaml", args[1::2])
    sft = load_section(tmp_path / "params.yaml", "sft", SFTStageConfig)
    tiny = load_section(REPO / "params.yaml", "sft", SFTStageConfig)
    assert tiny.train.epochs == 2 and sft.train.epochs == 10 and sft.train.learning_rate == tiny.train.learning_rate
    evaluate = load_section(tmp_path / "params.yaml", "evaluate", EvaluateConfig)
    assert evaluate.only == ["rapo"] and evaluate.register.model is None


def _exp(name, plcc, srcc, entropy):
    return {"rev": "abc", "name": name, "data": {"metrics": {
        "metrics/evaluate.json": {"data": {"rapo": {"average": {"plcc": plcc, "srcc": srcc,
                                                                "unparseable_rate": 0.1}}}},
        "metrics/sft.json": {"data": {"starting_entropy": entropy}}}}}


def test_results_come_from_dvc_exp_show_by_experiment_name():
    shown = [{"rev": "workspace", "data": {}, "experiments": None},
             {"rev": "sha", "name": "main", "experiments": [
                 {"revs": [_exp("s-1-x", 0.5, 0.4, 1.2)]}, {"revs": [_exp("other", 0.9, 0.9, 0.1)]}]}]
    results = experiment_results(shown, {"1": "s-1-x", "2": "s-2-x"})
    assert list(results.setting) == ["1", "2"]
    assert results.plcc.iloc[0] == 0.5 and results.starting_entropy.iloc[0] == 1.2
    assert math.isnan(results.plcc.iloc[1])  # an experiment that did not finish: a gap, not a guess


def test_findings_say_which_of_the_papers_shapes_hold():
    paper = PAPER["rewards"]
    paper_like = pd.DataFrame({"setting": paper.setting, "plcc": paper.paper_plcc, "srcc": paper.paper_srcc})
    assert all(held for _, held in findings("rewards", paper_like))
    noisy = paper_like.assign(plcc_se=0.02, srcc_se=0.02)  # the paper's error-only gap (0.006) is within noise
    assert dict(findings("rewards", noisy))[
        "error-only: PLCC above SRCC by more than twice their combined standard error"] is False
    flat = paper_like.assign(plcc=0.5, srcc=0.5)
    verdicts = dict(findings("rewards", flat))
    assert verdicts["rank-only ranks better than it calibrates (SRCC > PLCC)"] is False
    epochs = pd.DataFrame({"setting": ["0", "1", "2", "10"], "starting_entropy": [0.9, 1.6, 1.4, 0.7],
                           "plcc": [0.6, 0.63, 0.6, 0.46], "srcc": [0.6, 0.62, 0.59, 0.47]})
    assert all(held for _, held in findings("sft-epochs", epochs))
    missing = epochs.assign(starting_entropy=float("nan"))
    assert dict(findings("sft-epochs", missing))["starting entropy falls with more SFT epochs (1 > 2 > 10)"] is None


def test_report_puts_our_table_beside_the_papers(tmp_path):
    ours = pd.DataFrame({"setting": ["rank", "error"], "experiment": ["e-rank", "e-error"],
                         "plcc": [0.3, 0.4], "srcc": [0.5, 0.35], "unparseable_rate": [0.0, 0.1],
                         "starting_entropy": [math.nan, math.nan]})
    report, plot = write_ablation_report("rewards", ours, tmp_path)
    text = report.read_text()
    assert "| rank | e-rank | 0.300 | 0.500 | 0.000 | 0.454 | 0.591 |" in text
    assert "| binary | - | - | - | - | 0.425 | 0.443 |" in text  # the paper's row stays, ours is a gap
    assert "rank-only ranks better than it calibrates (SRCC > PLCC): **holds**" in text
    assert "error+rank (RAPO) is best on both PLCC and SRCC: **not measured**" in text
    assert plot.stat().st_size > 1000


def test_every_deployment_that_trains_has_a_gpu_twin_sending_the_training_stages_to_the_gpu_pool():
    from conftest import REPO

    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    training = [name for name, d in deployments.items()
                if d["entrypoint"] in ("flows/pipeline.py:pipeline", "flows/ablations.py:ablation")
                and not name.endswith("-gpu")]
    assert training
    for name in training:
        twin = deployments[f"{name}-gpu"]
        assert twin["entrypoint"] == deployments[name]["entrypoint"]
        assert twin["parameters"].get("study") == deployments[name]["parameters"].get("study")
        remote = twin["parameters"]["remote_stages"]
        assert set(remote) == {"sft", "rl", "evaluate"} and set(remote.values()) == {"aesr1-remote-stage/gpu-stage"}


TOY_STAGE = """import json, pathlib, yaml
mode = yaml.safe_load(open("params.yaml"))["rl"]["rewards"]["mode"]
pathlib.Path("metrics").mkdir(exist_ok=True)
json.dump({"rapo": {"average": {"plcc": len(mode) / 10, "srcc": 0.5}}}, open("metrics/evaluate.json", "w"))
"""


@pytest.mark.slow
def test_with_remote_stages_each_setting_runs_as_the_pipeline_flow_and_is_saved_as_its_experiment(tmp_path,
                                                                                                   monkeypatch):
    """The -gpu deployments: every setting runs as the pipeline flow (its stages handed to the pools), with the
    setting's params, in the study's MLflow experiment under its DVC experiment's name; then it is a named
    experiment like a queued one, and the checkout is as it was."""
    import os
    import subprocess

    from conftest import IDENTITY
    from prefect.testing.utilities import prefect_test_harness

    import flows.pipeline
    from aesr1 import environment
    from flows.ablations import ablation

    root = tmp_path / "repo"
    root.mkdir()
    params = yaml.safe_dump({"rl": {"rewards": {"mode": "error+rank"}}, "evaluate": {"only": None}})
    (root / "params.yaml").write_text(params)
    (root / "toy.py").write_text(TOY_STAGE)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": {
        "cmd": "python toy.py", "deps": ["toy.py"], "params": ["rl.rewards.mode"],
        "metrics": [{"metrics/evaluate.json": {"cache": False}}]}}}))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "toy"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True, env={**os.environ, **IDENTITY})
    lock = (root / "dvc.lock").read_text()
    ran = []

    def pools(root, remote_stages):  # the pipeline flow, its remote stages stood in for by a local `dvc repro`
        ran.append((yaml.safe_load((Path(root) / "params.yaml").read_text()), remote_stages,
                    os.environ[environment.EXPERIMENT], os.environ[environment.DVC_EXPERIMENT]))
        subprocess.run(["dvc", "repro", "-q"], cwd=root, check=True, capture_output=True)

    monkeypatch.setattr(flows.pipeline, "pipeline", pools)
    monkeypatch.delenv(environment.EXPERIMENT, raising=False)
    with prefect_test_harness():
        report = ablation("rewards", root=str(root), settings=["rank", "error"], remote_stages={"rl": "a/gpu"})
    assert sorted((p["rl"]["rewards"]["mode"], p["evaluate"]["only"], r, e) for p, r, e, _ in ran) == [
        ("error", ["rapo"], {"rl": "a/gpu"}, "aesr1-ablation-rewards"),
        ("rank", ["rapo"], {"rl": "a/gpu"}, "aesr1-ablation-rewards")]
    text = Path(report).read_text()
    assert "0.400" in text and "0.500" in text  # each experiment's PLCC, read back from `dvc exp show`
    names = subprocess.run(["dvc", "exp", "ls", "--name-only"], cwd=root, capture_output=True, text=True).stdout
    assert {name for *_, name in ran} <= set(names.split())
    assert (root / "params.yaml").read_text() == params and (root / "dvc.lock").read_text() == lock
    assert environment.EXPERIMENT not in os.environ
