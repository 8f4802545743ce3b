"""The paper's ablations as queued ``dvc exp`` experiments, then a report beside the paper's tables.

    python -m flows.ablations rewards                   # binary, error, rank, binary+rank, error+rank
    python -m flows.ablations rewards --no-cold-start   # the same, each RL from the backbone (the paper's protocol)
    python -m flows.ablations sft-epochs             # 0, 1, 2, 10 epochs of SFT, then RAPO

Each setting is one experiment (``dvc exp run --queue -S ++key=value ...``), run one after another
(``dvc exp run --run-all``); DVC restores every stage the setting does not change from
its cache. With ``remote_stages`` (the ``-gpu`` deployments: a real backbone trains on the gpu
pool) each setting instead runs as the pipeline flow in this checkout, those stages handed to
their deployments, and is saved as the same named experiment (``dvc exp save``); the checkout's
params, lock and outputs are put back afterwards. Their MLflow runs go to an experiment of their
own (``aesr1-ablation-<study>``), one pipeline run per setting named after the DVC experiment,
so the MLflow UI compares them side by side. The report (markdown and plot) lands in
``data/ablations/<study>/`` and in that MLflow experiment.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from aesr1 import environment
from aesr1.errors import AesError
from aesr1.rl.reward_funcs import REWARD_MODES
from tasks.dvc_stage import run_logged

# Every setting evaluates only its RAPO model and registers nothing.
COMMON = {"evaluate.only": "[rapo]", "evaluate.register.model": "null"}
RESULT_COLUMNS = ["plcc", "plcc_se", "srcc", "srcc_se", "expected_plcc", "expected_srcc", "unparseable_rate",
                  "starting_entropy"]


def study_settings(study: str, cold_start: bool = True) -> dict[str, dict[str, str]]:
    """Setting name -> params overrides (``-S ++key=value``) of one study. ``cold_start=False``: the reward
    study's RL starts from the backbone, the paper's protocol, which a backbone that never writes the format (the
    embedded default's) cannot learn from."""
    if study == "rewards":
        start = {} if cold_start else {"rl.model": "data/models/backbone"}
        return {mode: {**start, "rl.rewards.mode": mode} for mode in REWARD_MODES}
    if study == "sft-epochs":
        return {"0": {"rl.model": "data/models/backbone"},
                **{str(e): {"sft.train.epochs": str(e)} for e in (1, 2, 10)}}
    raise AesError(f"unknown study {study!r}; choose rewards or sft-epochs")


def experiment_name(study: str, setting: str, stamp: str) -> str:
    return f"{study}-{setting.replace('+', '-plus-')}-{stamp}"


def set_params(overrides: dict[str, str]) -> list[str]:
    """``dvc exp run``'s ``-S`` arguments for one setting. ``++`` sets the key in params.yaml whether or not it
    is there yet: a recipe's keys (sft.train.epochs) are not, and params.yaml overrides the recipe."""
    return [arg for key, value in {**COMMON, **overrides}.items() for arg in ("-S", f"++{key}={value}")]


@task(name="queue-experiment", task_run_name="{name}", cache_policy=NO_CACHE)
def queue_experiment(root: str, name: str, overrides: dict[str, str]) -> None:
    run_logged(["dvc", "exp", "run", "--queue", "-n", name, *set_params(overrides)], root)


@task(name="run-queued-experiments", cache_policy=NO_CACHE)
def run_queue(root: str, jobs: int, mlflow_experiment: str) -> None:
    run_logged(["dvc", "exp", "run", "--run-all", "--jobs", str(jobs)], root,
               {environment.EXPERIMENT: mlflow_experiment})


def run_through_pools(root: str, names: dict[str, str], settings: dict[str, dict[str, str]],
                      remote_stages: dict[str, str], mlflow_experiment: str) -> None:
    """Each setting as the pipeline flow in ``root``, ``remote_stages`` on their pools, saved as its experiment."""
    from dvc.utils.hydra import apply_overrides

    from flows.pipeline import pipeline

    kept = {name: (Path(root) / name).read_text() for name in ("params.yaml", "dvc.lock")}
    outer = {key: os.environ.get(key) for key in (environment.EXPERIMENT, environment.DVC_EXPERIMENT)}
    try:
        for setting, overrides in settings.items():
            (Path(root) / "params.yaml").write_text(kept["params.yaml"])
            apply_overrides(Path(root) / "params.yaml", set_params(overrides)[1::2])  # DVC's own -S code
            os.environ.update({environment.EXPERIMENT: mlflow_experiment, environment.DVC_EXPERIMENT: names[setting]})
            pipeline(root=root, remote_stages=remote_stages)
            run_logged(["dvc", "exp", "save", "--force", "-n", names[setting]], root)
    finally:
        for key, value in outer.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for name, text in kept.items():
            (Path(root) / name).write_text(text)
        run_logged(["dvc", "checkout", "--quiet"], root)  # the outputs the restored lock names


def experiment_results(exp_show: list, names: dict[str, str]) -> pd.DataFrame:
    """Rows (setting, experiment, plcc, srcc, ...) from ``dvc exp show --json`` for the named experiments."""
    found = {}
    for baseline in exp_show:
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs") or []:
                if rev.get("name") in names.values():
                    found[rev["name"]] = (rev.get("data") or {}).get("metrics") or {}
    rows = []
    for setting, name in names.items():
        metrics = found.get(name)
        if metrics is None:
            rows.append({"setting": setting, "experiment": name})
            continue
        evaluate = (metrics.get("metrics/evaluate.json") or {}).get("data", {}).get("rapo", {})
        sft = (metrics.get("metrics/sft.json") or {}).get("data", {})
        average = evaluate.get("average", {})
        expected = ((evaluate.get("readouts") or {}).get("expected") or {}).get("average", {})
        rows.append({"setting": setting, "experiment": name, **{k: average.get(k) for k in
                     ("plcc", "plcc_se", "srcc", "srcc_se", "unparseable_rate")},
                     "expected_plcc": expected.get("plcc"), "expected_srcc": expected.get("srcc"),
                     "starting_entropy": sft.get("starting_entropy")})
    frame = pd.DataFrame(rows, columns=["setting", "experiment", *RESULT_COLUMNS])
    return frame.astype({c: float for c in RESULT_COLUMNS})


@task(name="collect-results", cache_policy=NO_CACHE)
def collect(root: str, names: dict[str, str]) -> pd.DataFrame:
    out = run_logged(["dvc", "exp", "show", "--json"], root)
    return experiment_results(json.loads(out[out.index("["):]), names)


@flow(name="aesr1-ablation", flow_run_name="{study}", log_prints=True)
def ablation(study: str, root: str = ".", cold_start: bool = True, jobs: int = 1,
             out_dir: str = "data/ablations", settings: list[str] | None = None,
             remote_stages: dict[str, str] | None = None) -> str:
    """Run one study's experiments (``settings``: only these), then write its report. ``remote_stages``: stage ->
    the deployment that runs it on another pool (the settings then run one at a time)."""
    from aesr1.evaluation.ablation import write_ablation_report

    root = str(Path(root).resolve())
    all_settings = study_settings(study, cold_start)
    unknown = sorted(set(settings or []) - set(all_settings))
    if unknown:
        raise AesError(f"unknown settings {unknown} for {study}; known: {list(all_settings)}")
    settings = {k: v for k, v in all_settings.items() if not settings or k in settings}
    stamp = time.strftime("%Y%m%d%H%M%S")
    names = {setting: experiment_name(study, setting, stamp) for setting in settings}
    mlflow_experiment = f"aesr1-ablation-{study}"
    if remote_stages:
        run_through_pools(root, names, settings, remote_stages, mlflow_experiment)
    else:
        for setting, overrides in settings.items():
            queue_experiment(root, names[setting], overrides)
        run_queue(root, jobs, mlflow_experiment)
    results = collect(root, names)
    report, plot = write_ablation_report(study, results, Path(root) / out_dir / study)
    _log_report(root, mlflow_experiment, study, results, report, plot)
    get_run_logger().info("%s:\n%s", report, report.read_text())
    return str(report)


def _log_report(root: str, experiment: str, study: str, results: pd.DataFrame, report: Path, plot: Path) -> None:
    import mlflow

    from aesr1.tracking import ensure_experiment, tracking_uri

    mlflow.set_tracking_uri(tracking_uri(Path(root)))
    experiment_id = ensure_experiment(mlflow.MlflowClient(), Path(root), experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{study}-report", tags={"aesr1.role": "report"}):
        mlflow.log_artifact(str(report))
        mlflow.log_artifact(str(plot))
        mlflow.log_table(results, artifact_file="results.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=["rewards", "sft-epochs"])
    parser.add_argument("--no-cold-start", dest="cold_start", action="store_false",
                        help="rewards: start RL from the backbone, not the SFT model (the paper's protocol)")
    parser.add_argument("--jobs", type=int, default=1, help="experiments at a time")
    parser.add_argument("--settings", nargs="*", help="run only these settings (e.g. rank error)")
    parser.add_argument("--root", default=".")
    parser.add_argument("--remote", nargs="*", default=[], metavar="STAGE=DEPLOYMENT",
                        help="run STAGE through DEPLOYMENT on another work pool (needs a Prefect server and worker)")
    args = parser.parse_args(argv)
    print(ablation(study=args.study, root=args.root, cold_start=args.cold_start, jobs=args.jobs,
                   settings=args.settings, remote_stages=dict(item.split("=", 1) for item in args.remote)))


if __name__ == "__main__":
    main()
