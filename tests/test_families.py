"""Every stage on a tiny random model of each VLM family beside Qwen2.5-VL (whose own run is test_pipeline's).

Per family: the backbone stage builds and pretrains the family's tiny model; the doctor's CPU smoke test runs the
sft and rl stages themselves on two processes (mixed image sizes, resumes, LoRA merged); the evaluate stage reads
the trained models and registers one in MLflow as the pyfunc model; ``aesr1 score`` scores a photo through the
registry and through a folder. The sizes are the smoke tests' (seconds per stage).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import with_venv
from test_smoke import SMALL, params_file

from aesr1 import cli
from aesr1.backbone.backbone import BackboneConfig, backbone
from aesr1.evaluation.evaluate import EvaluateConfig, evaluate
from aesr1.policy.families import FAMILIES, UnsupportedFamily
from aesr1.stage import run_stage

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

MODEL_CLASS = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_5": "Qwen3_5ForConditionalGeneration",
               "gemma3": "Gemma3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}


def family_params(root: Path, family: str) -> Path:
    return params_file(root, {**SMALL, "backbone.tiny": {**SMALL["backbone.tiny"], "family": family},
                              "backbone.pretrain": {"samples": 16},
                              "backbone.pretrain.train": {"epochs": 1, "batch_size": 8, "logging_steps": 1}})


def test_the_registry_and_the_tiny_testbed_name_the_same_families():
    from aesr1.backbone.tiny import BUILDERS, FAMILY_TOKENS

    assert set(BUILDERS) == set(FAMILY_TOKENS) == set(FAMILIES) == {"qwen2_5_vl", *MODEL_CLASS}


def test_an_unsupported_family_stops_the_backbone_stage_with_one_line_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = params_file(tmp_path, {"backbone.tiny": {"family": "llava"}})
    assert cli.main(["backbone", "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'llava'" in err[0] and "qwen3_vl" in err[0], err
    assert not (tmp_path / "data/models/backbone/config.json").exists()


def test_a_real_model_without_a_findable_tower_is_refused_before_training():
    from transformers import LlavaConfig

    from aesr1.policy.families import check_model

    with pytest.raises(UnsupportedFamily, match="'llava'.*not supported"):
        check_model(LlavaConfig())


@pytest.mark.slow
@pytest.mark.parametrize("family", list(MODEL_CLASS))
def test_every_stage_runs_on_a_tiny_model_of_the_family(family, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForImageTextToText

    monkeypatch.chdir(tmp_path)
    params = family_params(tmp_path, family)
    made = run_stage("backbone", params, BackboneConfig, backbone, metrics_dir=tmp_path / "metrics")
    assert made["model_type"] == family and made["pretrain_loss_last"] > 0

    # sft (full, resumed, LoRA merged) and rl (resumed) on two processes, through the stage runner
    env = with_venv({**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "aesr1.doctor", "--smoke", "--cpu",
                           "--params", str(params), "--smoke-dir", str(tmp_path / "smoke")],
                          env=env, capture_output=True, text=True, timeout=900)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"], (report.get("error"), done.stderr[-3000:])
    assert report["world_size"] == 2 and report["model"]["model_type"] == family
    assert len({tuple(size) for size in report["data"]["photos"]}) > 1  # images of mixed sizes in each batch
    assert {m["class"] for m in report["saved_models"].values()} == {MODEL_CLASS[family]}
    smoke = tmp_path / "smoke"
    for phase, stage in (("sft", "sft"), ("rl", "rl"), ("sft-lora", "sft")):
        counts = json.loads((smoke / "metrics" / phase / f"{stage}.json").read_text())
        assert counts["frozen_parameters"] > 0 and counts["trainable_parameters"] > 0, phase
    lora = json.loads((smoke / "metrics/sft-lora/sft.json").read_text())
    assert lora["trainable_parameters"] < counts["frozen_parameters"]  # adapters only
    from mlflow import MlflowClient

    client = MlflowClient(report["mlflow"]["tracking_uri"])  # each stage's run carries the counts too
    for phase in report["phases"]:
        logged = client.get_run(phase["mlflow_run"]).data.metrics
        assert logged["frozen_parameters"] > 0 and logged["trainable_parameters"] > 0, phase["name"]

    # evaluate the pretrained backbone and the trained models; register the RL one (the pyfunc model)
    settings = yaml.safe_load(params.read_text())
    test = pd.read_parquet(smoke / "data/test.parquet")
    settings["evaluate"].update(
        models={"backbone": str(tmp_path / "data/models/backbone"), "rl": "models/rl", "lora": "models/sft-lora"},
        test_manifest="data/test.parquet", latent_scores=None, rl_history=None, out_dir="evaluation", compare=[],
        test_sets=sorted(set(test.dataset)), in_domain=[], bootstrap=10, gallery_size=2,
        register={"model": "rl", "name": f"policy-{family}"})
    settings["evaluate"].setdefault("decoding", {}).update(max_new_tokens=16, batch_size=4)
    (smoke / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    monkeypatch.chdir(smoke)
    evaluated = run_stage("evaluate", smoke / "params.yaml", EvaluateConfig, evaluate, metrics_dir=smoke / "metrics")
    for model in ("backbone", "rl", "lora"):
        assert sum(evaluated[model][name]["n"] for name in set(test.dataset)) == len(test), model
    predictions = pd.read_parquet(smoke / "evaluation/predictions.parquet")
    assert len(predictions) == 3 * len(test)

    capsys.readouterr()
    photo = smoke / test.image_path.iloc[0]
    assert cli.main(["score", str(photo), "--json", "--greedy", "--model", f"models:/policy-{family}/1"]) == 0
    (by_registry,) = json.loads(capsys.readouterr().out)
    assert cli.main(["score", str(photo), "--json", "--greedy", "--model", "models/rl"]) == 0
    (by_folder,) = json.loads(capsys.readouterr().out)
    assert by_registry["completion"] and by_registry["completion"] == by_folder["completion"]
    model = AutoModelForImageTextToText.from_pretrained(smoke / "models/rl")
    assert type(model).__name__ == MODEL_CLASS[family]
