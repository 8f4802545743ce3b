"""``aesr1 doctor --plan``: the recipes' tiers on the GPUs they are for, the changes it proposes, the shapes it
reads, and the docs' table it generates (pure arithmetic; models are built on the meta device only)."""

import json

import pytest
import torch
from conftest import REPO, project

from aesr1.doctor import cli, memory, plan

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

OFFLOAD = "configs/deepspeed/zero3_offload.json"


@pytest.fixture
def params(tmp_path):
    """The project's params.yaml in tmp_path with its configs/ beside it, dotted keys changed on request."""
    return lambda **changes: str(project(tmp_path, **changes))


def planned(capsys, *argv: str) -> tuple[int, dict]:
    status = cli.main(["--plan", "--json", *argv])
    return status, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("recipe, gpus, gib, fits", [
    ("qwen2.5-vl-7b", 8, 80, True),  # the reference on its 8 x 80 GB
    ("qwen2.5-vl-7b", 1, 80, False),  # ... not on one of them
    ("qwen2.5-vl-7b-1gpu", 1, 80, True),
    ("qwen2.5-vl-3b-24gb", 1, 24, True),
    ("qwen3-vl-8b", 8, 80, True),  # the reference's values on the newer backbone
    ("qwen3-vl-2b-24gb", 1, 24, True),
    ("tiny", 1, 24, True),
])
def test_the_plan_says_which_recipe_fits_which_gpus(params, capsys, recipe, gpus, gib, fits):
    status, report = planned(capsys, "--params", params(recipe=recipe), "--gpus", str(gpus), "--gpu-memory", str(gib))
    assert (status, report["fits"], report["recipe"], report["gpus"]) == (0 if fits else 1, fits, recipe, gpus)
    phases = report["phases"]
    assert list(phases) == ["sft", "rl_training", "rl_generation", "evaluate"]
    assert report["peak_gib"] == max(p["peak_gib"] for p in phases.values()) == phases[report["peak_phase"]]["peak_gib"]
    assert fits == all(p["fits"] for p in phases.values())
    for phase in phases.values():
        assert phase["peak_gib"] == pytest.approx(phase["persistent_gib"] + phase["phase_gib"], abs=0.02)
        assert phase["fits"] == (phase["peak_gib"] <= 0.9 * gib + 0.01)
    assert bool(report["changes"]) is not fits


def test_the_one_gpu_tiers_fit_the_memory_torch_reports_for_their_cards(params):
    """torch.cuda sees an H100 80GB as 79.1 GiB and a 24 GB card as about 23.6 GiB."""
    for recipe, gib in (("qwen2.5-vl-7b-1gpu", 79.1), ("qwen2.5-vl-3b-24gb", 23.6)):
        assert plan.plan_recipe(params(recipe=recipe), None, plan.Hardware(1, gib)).fits, recipe


def test_each_change_the_planner_proposes_makes_the_run_fit(params, capsys):
    _, report = planned(capsys, "--params", params(recipe="qwen2.5-vl-7b"), "--gpus", "1", "--gpu-memory", "80")
    proposed = [change["params"] for change in report["changes"]]
    assert {"sft.train.trl.deepspeed": OFFLOAD, "rl.grpo.trl.deepspeed": OFFLOAD} in proposed
    assert {"sft.train.mode": "lora", "rl.grpo.mode": "lora"} in proposed
    for change in proposed:
        gpus = change.pop("GPUs", 1)
        status, after = planned(capsys, "--params", params(recipe="qwen2.5-vl-7b", **change), "--gpus", str(gpus),
                                "--gpu-memory", "80")
        assert status == 0 and after["fits"], change


def test_a_training_phase_that_does_not_fit_is_split_keeping_the_batch(params, capsys):
    """8 x 40 GB: the reference's RL micro-batch does not fit; fewer images per device with more grad_accum keep
    the 16 images per GPU and step (and so the sequences generated at once)."""
    _, report = planned(capsys, "--params", params(recipe="qwen2.5-vl-7b"), "--gpus", "8", "--gpu-memory", "40")
    assert not report["fits"] and not report["phases"]["rl_training"]["fits"]
    split = [c["params"] for c in report["changes"] if "rl.grpo.images_per_device" in c["params"]]
    assert split and all(c["rl.grpo.images_per_device"] * c["rl.grpo.grad_accum"] == 8 * 2 for c in split)


def test_an_offloaded_optimizer_needs_the_host_memory(params, capsys):
    path = params(recipe="qwen2.5-vl-7b-1gpu")
    status, report = planned(capsys, "--params", path, "--gpus", "1", "--gpu-memory", "80")
    trained = memory.param_counts(memory.QWEN25_VL_7B)["text"]
    assert report["host_gib"] == pytest.approx(trained * 16 / memory.GiB, abs=0.05) and report["host_fits"] is None
    assert status == 0 and report["settings"]["rl_offload"] and not report["settings"]["gather_for_generation"]
    status, short = planned(capsys, "--params", path, "--gpus", "1", "--gpu-memory", "80", "--host-memory", "96")
    assert status == 1 and short["host_fits"] is False and all(p["fits"] for p in short["phases"].values())
    assert planned(capsys, "--params", path, "--gpus", "1", "--gpu-memory", "80", "--host-memory", "256")[0] == 0


def test_the_recipe_values_reach_the_plan_as_the_stages_read_them(params, capsys):
    """params.yaml merged over the recipe, the pixel budget in visual tokens, trl's generation batch."""
    _, report = planned(capsys, "--params", params(recipe="qwen2.5-vl-3b-24gb"), "--gpus", "1", "--gpu-memory", "24")
    s = report["settings"]
    assert (s["sft_mode"], s["rl_mode"], s["sft_zero3"], s["rl_zero3"]) == ("lora", "lora", False, False)
    assert (s["images_per_device"], s["generations"], s["grad_accum"], s["visual_tokens"]) == (4, 4, 8, 262_144 // 784)
    assert report["backbone"] == "Qwen/Qwen2.5-VL-3B-Instruct" and report["parameters"] == 3_754_622_976
    changed = params(recipe="qwen2.5-vl-3b-24gb", **{"rl.grpo.trl": {"generation_batch_size": 32},
                                                      "backbone.max_pixels": 200_704})
    _, report = planned(capsys, "--params", changed, "--gpus", "1", "--gpu-memory", "24")
    assert report["settings"]["steps_per_generation"] == 2 and report["settings"]["visual_tokens"] == 256


def qwen_config(s: memory.Shape):
    """transformers' config of a known shape: Qwen3-VL's layout (its DeepStack blocks spread over the tower) or
    Qwen2.5-VL's."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    if not s.vision_gated:
        step = s.vision_depth // (s.deepstack + 1)
        return Qwen3VLConfig(
            text_config=dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                             num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                             head_dim=s.head_dim, tie_word_embeddings=s.tied),
            vision_config=dict(depth=s.vision_depth, hidden_size=s.vision_hidden,
                               intermediate_size=s.vision_intermediate, num_heads=s.vision_heads, patch_size=s.patch,
                               spatial_merge_size=s.merge, temporal_patch_size=s.temporal, out_hidden_size=s.hidden,
                               num_position_embeddings=s.vision_positions,
                               deepstack_visual_indexes=[step * (i + 1) for i in range(s.deepstack)]),
            tie_word_embeddings=s.tied)
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         tie_word_embeddings=s.tied),
        vision_config=dict(depth=s.vision_depth, hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate,
                           num_heads=s.vision_heads, patch_size=s.patch, spatial_merge_size=s.merge,
                           temporal_patch_size=s.temporal, out_hidden_size=s.hidden),
        tie_word_embeddings=s.tied)


def test_the_known_shapes_count_the_parameters_transformers_builds_and_read_back_from_config_json(tmp_path):
    from transformers import AutoModelForImageTextToText

    for name, shape in plan.KNOWN_SHAPES.items():
        config = qwen_config(shape)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == memory.param_counts(shape)["total"], name
        config.save_pretrained(tmp_path / name)  # transformers' layout: the text keys under text_config
        assert plan.config_shape(json.loads((tmp_path / name / "config.json").read_text()), name) == shape
    flat = {"model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152_064, "tie_word_embeddings": False,
            "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}}
    assert plan.config_shape(flat, "the hub's older layout") == memory.QWEN25_VL_7B


def test_a_local_backbone_plans_from_its_config_json_and_an_unknown_one_says_why(params, capsys, tmp_path):
    folder = tmp_path / "models" / "vlm"
    qwen_config(memory.QWEN25_VL_3B).save_pretrained(folder)
    local = {"backbone.name_or_path": "./models/vlm"}
    status, report = planned(capsys, "--params", params(recipe="qwen2.5-vl-3b-24gb", **local), "--gpus", "1",
                             "--gpu-memory", "24")
    assert status == 0 and report["shape_source"] == str(folder / "config.json")
    assert report["parameters"] == memory.param_counts(memory.QWEN25_VL_3B)["total"]
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert cli.main(["--plan", "--params", params(recipe="qwen2.5-vl-3b-24gb", **local), "--gpus", "1",
                     "--gpu-memory", "24"]) == 2
    assert "model_type 'llava': the memory model knows the layouts of qwen2_5_vl, qwen3_vl only" \
        in capsys.readouterr().err
    assert cli.main(["--plan", "--params", params(recipe="custom", **{"backbone.name_or_path": "org/unknown-vlm"}),
                     "--gpus", "1", "--gpu-memory", "24"]) == 2
    assert "org/unknown-vlm: its shape is unknown here" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the plan takes its GPUs")
def test_without_gpus_the_plan_asks_for_them(capsys):
    assert cli.main(["--plan", "--params", str(REPO / "params.yaml")]) == 2
    assert "give the GPUs to plan for, --gpus N --gpu-memory GIB" in capsys.readouterr().err
    assert cli.main(["--plan", "--params", str(REPO / "params.yaml"), "--gpus", "2"]) == 2  # and their memory
    assert cli.main(["--gpus", "2", "--gpu-memory", "80"]) == 2  # --plan's options alone


def test_the_text_plan_prints_each_phase_and_the_changes(capsys):
    status = cli.main(["--plan", "--params", str(REPO / "params.yaml"), "--recipe", "qwen2.5-vl-7b", "--gpus", "1",
                       "--gpu-memory", "80"])
    out = capsys.readouterr().out
    assert status == 1 and "recipe qwen2.5-vl-7b: Qwen/Qwen2.5-VL-7B-Instruct, 8.29B parameters" in out
    for title in ("SFT", "RL training", "RL generation", "evaluation"):
        assert f"\n{title} " in out
    assert "does NOT fit" in out and "what makes it fit" in out and OFFLOAD in out


def test_the_docs_memory_table_is_what_the_planner_prints():
    """docs/real-scale.md's block between the plan markers: `python -m aesr1.doctor.plan --markdown --write
    docs/real-scale.md` regenerates it."""
    assert plan.docs_block((REPO / "docs" / "real-scale.md").read_text()) == plan.markdown()
