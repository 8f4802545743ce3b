"""``aesr1 doctor --smoke`` on the CPU: the sft and rl stages themselves, rerun to resume, SFT in both modes,
through the stage runner with MLflow; under ZeRO-3 on one process; a real backbone's config reduced in depth;
and its failures (no GPU, no model files, a refused setting, a hang) as clear, fast errors.

The recipes' values are shrunk here as a user overrides a recipe (params.yaml over it): a smaller tiny model,
batches, K and completion lengths, so each smoke test takes seconds.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, with_venv

from aesr1.doctor import cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

ON_GPU = torch.cuda.is_available()
SMALL = {"backbone.tiny": {"hidden_size": 64, "intermediate_size": 128, "layers": 2, "vision_hidden_size": 32,
                           "vision_heads": 2, "image_size": 32},
         "sft.train": {"batch_size": 4}, "sft.heldout": {"max_new_tokens": 16},
         "rl.grpo": {"images_per_device": 2, "num_generations": 2, "max_completion_length": 16},
         "rl.heldout": {"max_new_tokens": 16}}
PHASES = ["sft", "sft-resume", "rl", "rl-resume", "sft-lora"]


def params_file(root: Path, changes: dict, recipe: str | None = None) -> Path:
    """The repository's params.yaml in ``root`` with ``changes`` (dotted section -> values merged in), beside a
    copy of the project's configs (the recipes, the DeepSpeed configs)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if recipe:
        params["recipe"] = recipe
    for dotted, values in changes.items():
        holder = params
        for part in dotted.split("."):
            holder = holder.setdefault(part, {})
        holder.update(values)
    shutil.copytree(REPO / "configs", root / "configs", dirs_exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root / "params.yaml"


def smoke_command(*args: str, env: dict | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess,
                                                                                       dict]:
    """``python -m aesr1.doctor --smoke --cpu ...`` in its own interpreter (DeepSpeed, the hub's offline mode and
    the watchdog's exit act on the process); (the finished process, its JSON report)."""
    environment = with_venv({**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})})
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "ACCELERATE_USE_DEEPSPEED"):
        environment.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "aesr1.doctor", "--smoke", "--cpu", *args], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=timeout)
    return done, json.loads(done.stdout)


def finite(*values) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for v in values)


@pytest.mark.skipif(ON_GPU, reason="on a GPU machine --smoke runs")
def test_smoke_without_a_gpu_says_so_and_exits_2(capsys):
    assert cli.main(["--smoke"]) == 2
    out = capsys.readouterr()
    assert "needs a CUDA GPU" in out.err and json.loads(out.out)["ok"] is False
    assert cli.main(["--cpu"]) == 2  # --cpu alone is a usage error


@pytest.mark.slow
def test_the_cpu_smoke_runs_the_stages_resumes_both_and_trains_both_modes(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored afterwards (--cpu sets it for the process)
    params = params_file(tmp_path, SMALL)
    status = cli.main(["--smoke", "--cpu", "--params", str(params), "--smoke-dir", str(tmp_path / "smoke")])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["ok"] is True, report.get("error")
    assert (report["device"], report["world_size"], report["recipe"]) == ("cpu", 1, "tiny")
    assert "not yet been run" in report["note"]
    model = report["model"]
    assert (model["layers"], model["vision_blocks"], model["hidden_size"], model["tied_head"]) == (2, 2, 64, True)
    assert model["processor"] == "Qwen2_5_VLProcessor" and model["max_pixels"] == 32 * 32  # the recipe's budget
    assert all(w * h > model["max_pixels"] for w, h in report["data"]["photos"])  # the processor resizes them
    assert report["data"]["sft_trajectories"] == 4 and report["data"]["trajectory_tokens"] >= 16

    phases = {p["name"]: p for p in report["phases"]}
    assert list(phases) == PHASES and phases["sft-lora"]["mode"] == "lora"
    for name in ("sft", "rl", "sft-lora"):  # trained from the start, 2 steps, each timed
        assert phases[name]["resumed_from_step"] == 0 and phases[name]["steps"] == 2
        assert len(phases[name]["step_seconds"]) == 2 and all(s > 0 for s in phases[name]["step_seconds"])
    for name in ("sft-resume", "rl-resume"):  # the same params: the kept checkpoint is resumed, nothing retrained
        assert phases[name]["resumed_from_step"] == 2 and phases[name]["step_seconds"] == []
    for name in ("sft", "sft-resume", "sft-lora"):
        assert finite(phases[name]["loss_first"], phases[name]["loss_last"]) and phases[name]["heldout_images"] == 2
    assert finite(*phases["rl"]["reward"].values()) and phases["rl"]["heldout"]["heldout_images"] == 2
    for phase in phases.values():
        assert phase["checkpoint_zero3"] is None  # no DeepSpeed in the tiny recipe
        assert phase["peak_memory_gib"][0] > 0 and phase["planned_peak_gib"] > 0
    assert set(report["saved_models"]) == {"models/sft", "models/rl", "models/sft-lora"}
    assert {m["parameters"] for m in report["saved_models"].values()} == {model["parameters"]}

    client = MlflowClient(report["mlflow"]["tracking_uri"])  # the smoke's own store, not the user's
    runs = client.search_runs([client.get_experiment_by_name("aesr1-doctor-smoke").experiment_id],
                              "tags.`aesr1.role` = 'stage'")
    assert sorted(r.data.tags["aesr1.stage"] for r in runs) == ["rl", "rl", "sft", "sft", "sft"]
    assert {r.info.run_id for r in runs} == {p["mlflow_run"] for p in report["phases"]}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert not list((tmp_path / "smoke" / "checkpoints").iterdir())  # removed once resumed (a 7B's are ~20 GB)


@pytest.mark.slow
def test_under_zero3_on_one_cpu_process_the_stages_write_zero3_checkpoints(tmp_path):
    """--zero3 on adds the project's ZeRO-3 config to the tiny recipe; on DeepSpeed's CPU accelerator every phase
    runs under it (its checkpoint holds per-process model states), LoRA and the resumes included."""
    pytest.importorskip("deepspeed")
    params = params_file(tmp_path, SMALL)
    done, report = smoke_command("--zero3", "on", "--params", str(params), "--smoke-dir", str(tmp_path / "smoke"),
                                 env={"DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0 and report["ok"], (report.get("error"), done.stderr[-3000:])
    assert report["deepspeed"] == {"sft": "configs/deepspeed/zero3.json", "rl": "configs/deepspeed/zero3.json"}
    phases = {p["name"]: p for p in report["phases"]}
    assert list(phases) == PHASES
    assert all(p["checkpoint_zero3"] is True for p in phases.values())
    assert phases["sft-resume"]["resumed_from_step"] == phases["rl-resume"]["resumed_from_step"] == 2


def test_a_real_backbone_is_its_own_config_at_reduced_depth_untied_with_its_processor(tmp_path, monkeypatch, capsys):
    """A model folder holding only a config (untied head, 4 layers and vision blocks) and a processor: the smoke
    builds its shape at --layers 2 with random weights, keeps the head untied and the processor's class, sets
    the pixel budget, and the planner reads the reduced shape."""
    from aesr1.backbone.tiny import TinyModelConfig, build_tiny

    model, processor = build_tiny(TinyModelConfig(**SMALL["backbone.tiny"], vision_depth=4))
    config = model.config
    config.text_config.num_hidden_layers, config.text_config.layer_types = 4, ["full_attention"] * 4
    config.vision_config.fullatt_block_indexes = [3]
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False  # a 7B's untied head
    config.save_pretrained(tmp_path / "vlm")  # no weights: the smoke needs none
    processor.save_pretrained(tmp_path / "vlm")
    params = params_file(tmp_path, {**SMALL, "backbone": {"name_or_path": str(tmp_path / "vlm"), "max_pixels": 1024},
                                    "sft.train": {"batch_size": 4, "save_steps": 100},
                                    "rl.grpo": {**SMALL["rl.grpo"], "grad_accum": 1, "save_steps": 100}},
                         recipe="custom")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    status = cli.main(["--smoke", "--cpu", "--params", str(params), "--smoke-dir", str(tmp_path / "smoke"),
                       "--layers", "2"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["ok"], report.get("error")
    built = report["model"]
    assert (built["layers"], built["vision_blocks"], built["tied_head"]) == (2, 2, False)
    assert (built["processor"], built["max_pixels"]) == ("Qwen2_5_VLProcessor", 1024)
    saved = json.loads((tmp_path / "smoke" / "backbone" / "config.json").read_text())
    assert saved["vision_config"]["fullatt_block_indexes"] == [1]  # the full-attention block kept, as the last
    assert all(p["planned_peak_gib"] > 0 for p in report["phases"])  # the planner read the reduced folder's shape


def test_a_qwen3_vl_backbone_is_built_in_its_own_family_and_planned(tmp_path, monkeypatch, capsys):
    """A Qwen3-VL config folder (the qwen3-vl recipes' family): the smoke builds that family at --layers 2, keeps a
    DeepStack block within the cut, runs every phase, and the planner reads the reduced Qwen3-VL shape."""
    from aesr1.backbone.tiny import TinyModelConfig, build_tiny

    model, processor = build_tiny(TinyModelConfig(**SMALL["backbone.tiny"], family="qwen3_vl", vision_depth=4))
    model.config.vision_config.deepstack_visual_indexes = [1, 3]
    model.config.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    params = params_file(tmp_path, {**SMALL, "backbone": {"name_or_path": str(tmp_path / "vlm"), "max_pixels": 1024}},
                         recipe="custom")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    status = cli.main(["--smoke", "--cpu", "--params", str(params), "--smoke-dir", str(tmp_path / "smoke"),
                       "--layers", "2"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["ok"], report.get("error")
    built = report["model"]
    assert (built["model_type"], built["processor"], built["layers"]) == ("qwen3_vl", "Qwen3VLProcessor", 2)
    saved = json.loads((tmp_path / "smoke" / "backbone" / "config.json").read_text())
    assert saved["vision_config"]["deepstack_visual_indexes"] == [1]
    assert {m["class"] for m in report["saved_models"].values()} == {"Qwen3VLForConditionalGeneration"}
    assert all(p["planned_peak_gib"] > 0 for p in report["phases"])


def test_a_hub_backbone_neither_cached_nor_reachable_fails_in_one_line(tmp_path):
    params = params_file(tmp_path, {}, recipe="qwen2.5-vl-7b")
    done, report = smoke_command("--params", str(params), "--smoke-dir", str(tmp_path / "smoke"),
                                 env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    assert done.returncode == 2 and report["ok"] is False
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in report["error"] and "hf download" in report["error"]
    assert "Traceback" not in done.stderr and done.stderr.count("aesr1 doctor --smoke:") == 1


def test_a_setting_the_stage_refuses_fails_its_phase_clearly_and_fast(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    params = params_file(tmp_path, {**SMALL, "sft.train": {"batch_size": 4, "trl": {"max_step": 3}}})
    status = cli.main(["--smoke", "--cpu", "--params", str(params), "--smoke-dir", str(tmp_path / "smoke")])
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert status == 1 and report["ok"] is False and report["phases"] == []
    assert report["error"].startswith("phase sft: ") and "did you mean 'max_steps'" in report["error"]
    assert "aesr1 doctor --smoke: phase sft" in out.err

    assert cli.main(["--smoke", "--cpu", "--params", str(params), "--smoke-dir", str(tmp_path / "smoke")]) == 2
    assert "is not empty" in json.loads(capsys.readouterr().out)["error"]  # it would resume what is there


def test_the_watchdog_stops_a_smoke_test_at_its_time_limit_with_the_report_so_far(tmp_path):
    done, report = smoke_command("--params", str(params_file(tmp_path, SMALL)), "--smoke-timeout", "1",
                                 "--smoke-dir", str(tmp_path / "smoke"), timeout=120)
    assert done.returncode == 124 and report["ok"] is False and "timed out after 1 s in phase" in report["error"]
