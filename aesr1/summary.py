"""What a pipeline run is and what it gave, under short names that read well side by side.

A pipeline run in MLflow (the parent of its stage runs) carries :func:`pipeline_params`
(what defines the run: recipe, backbone, teacher, rewards, the training values that are
tuned, seeds, how it was launched) and, from the stages, :func:`model_metrics` (each
evaluated model's averages, per-set figures and unparseable rate) and each stage's
seconds. The stage runs keep their full detail; this is the layer the UI's run table and
compare view show.
"""

from __future__ import annotations

import os

from aesr1 import environment
from aesr1.config import flatten

# short name -> dotted key in the params (params.yaml merged over its recipe)
PARAM_KEYS = {
    "recipe": "recipe",
    "backbone": "backbone.name_or_path",
    "teacher": "distill.teacher.kind",
    "teacher_model": "distill.teacher.model",
    "train_size": "ingest.train_size",
    "sft_epochs": "sft.train.epochs",
    "sft_learning_rate": "sft.train.learning_rate",
    "reward_mode": "rl.rewards.mode",
    "relative_weight": "rl.rewards.relative_weight",
    "absolute_weight": "rl.rewards.absolute_weight",
    "num_generations": "rl.grpo.num_generations",
    "rl_max_steps": "rl.grpo.max_steps",
    "rl_learning_rate": "rl.grpo.learning_rate",
    "rollout_temperature": "rl.grpo.temperature",
    "beta": "rl.grpo.beta",
    "synth_seed": "synth.seed",
    "ingest_seed": "ingest.seed",
    "sft_seed": "sft.train.seed",
    "rl_seed": "rl.grpo.seed",
    "eval_seed": "evaluate.decoding.seed",
    "launcher": "launcher",
}
LAUNCHED_STAGES = ("sft", "rl", "evaluate")  # the stages params.yaml's launcher starts: their process count
SECONDS = "seconds"  # seconds/<stage> and seconds/total


def pipeline_params(params: dict) -> dict[str, str]:
    """The defining params of a run, from the whole params file (recipe merged); absent keys read "none"."""
    flat = flatten(params)
    found = {name: str(flat.get(key, "none")) for name, key in PARAM_KEYS.items()}
    found["dvc_experiment"] = os.environ.get(environment.DVC_EXPERIMENT) or "none"
    return found


def model_metrics(evaluation: dict, readouts: tuple[str, ...] = ("expected",)) -> dict[str, float]:
    """Per evaluated model: ``<model>/plcc``, ``/srcc`` and their ``_se`` (the five-set average of the sampled
    readout), ``/in_domain_plcc`` ..., ``/unparseable``, ``/<set>_plcc`` and ``/<set>_srcc``, and each other
    readout's average as ``/<readout>_plcc``.

    Where no output held a parseable score, its correlations are undefined, not 0: they are left out and
    ``<model>/all_unparseable`` (or ``/<set>_all_unparseable``, ``/<readout>_all_unparseable``) is 1 instead.
    """
    out: dict[str, float] = {}
    for model, metrics in evaluation.items():
        average = metrics.get("average", {})
        if "unparseable_rate" in average:
            out[f"{model}/unparseable"] = average["unparseable_rate"]
        if average.get("unparseable_rate") == 1.0:
            out[f"{model}/all_unparseable"] = 1.0
        else:
            for key in ("plcc", "srcc", "plcc_se", "srcc_se", "in_domain_plcc", "in_domain_srcc",
                        "out_of_domain_plcc", "out_of_domain_srcc"):
                if key in average:
                    out[f"{model}/{key}"] = average[key]
        for test_set, figures in metrics.items():
            if isinstance(figures, dict) and "n" in figures and "plcc" in figures:
                if figures.get("unparseable_rate") == 1.0:
                    out[f"{model}/{test_set}_all_unparseable"] = 1.0
                else:
                    out[f"{model}/{test_set}_plcc"] = figures["plcc"]
                    out[f"{model}/{test_set}_srcc"] = figures["srcc"]
        for readout in readouts:
            other = metrics.get("readouts", {}).get(readout, {}).get("average", {})
            if other.get("unparseable_rate") == 1.0:
                out[f"{model}/{readout}_all_unparseable"] = 1.0
                continue
            for key in ("plcc", "srcc"):
                if key in other:
                    out[f"{model}/{readout}_{key}"] = other[key]
    return out


def seconds_metric(stage: str) -> str:
    return f"{SECONDS}/{stage}"


def total_seconds(metrics: dict[str, float]) -> float:
    """The sum of the stages' seconds among a run's metrics."""
    return sum(v for k, v in metrics.items() if k.startswith(SECONDS + "/") and k != f"{SECONDS}/total")
