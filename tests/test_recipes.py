"""Recipes per backbone: selected in one line, params.yaml merged over them, and a guard against the tiny model's
values."""

import shutil

import pytest
import yaml
from conftest import REPO

from aesr1.backbone.backbone import BackboneConfig
from aesr1.config import ParamsError, load_section
from aesr1.errors import AesError
from aesr1.policy.sft import SFTStageConfig
from aesr1.policy.trainer import trl_arguments
from aesr1.rl.rl import GRPOParams, RLStageConfig, grpo_config


@pytest.fixture
def params(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    data = yaml.safe_load((REPO / "params.yaml").read_text())

    def write(**top):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump({**data, **top}))
        return path
    return write, data


def test_a_real_backbone_with_the_tiny_models_values_stops_and_names_the_recipe(params):
    write, data = params
    path = write(backbone={**data["backbone"], "name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"})
    for section, cls in (("sft", SFTStageConfig), ("rl", RLStageConfig)):
        with pytest.raises(ParamsError, match="recipe: qwen2.5-vl-7b"):
            load_section(path, section, cls)
    assert load_section(path, "backbone", BackboneConfig).name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    custom = write(recipe="custom", backbone={**data["backbone"], "name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"},
                   sft={**data["sft"], "train": {"learning_rate": 3e-6}})
    assert load_section(custom, "sft", SFTStageConfig).train.learning_rate == 3e-6  # no recipe: params.yaml's


def test_the_tiny_recipe_holds_the_embedded_defaults_values_and_params_yaml_none_of_a_recipes_keys():
    """Switching the recipe switches every backbone-dependent value: the shipped params.yaml overrides none."""
    from aesr1.config import RECIPE_SECTIONS, flatten

    shipped = set(flatten(yaml.safe_load((REPO / "params.yaml").read_text())))
    for recipe in (REPO / "configs/recipes").glob("*.yaml"):
        keys = set(flatten(yaml.safe_load(recipe.read_text())))
        assert {key.split(".")[0] for key in keys} <= set(RECIPE_SECTIONS), recipe.name
        assert not shipped & keys, (recipe.name, sorted(shipped & keys))
    tiny = load_section(REPO / "params.yaml", "backbone", BackboneConfig)
    assert tiny.name_or_path == "tiny" and tiny.tiny.hidden_size == 128 and tiny.pretrain.samples == 2000
    assert load_section(REPO / "params.yaml", "rl", RLStageConfig).grpo.learning_rate == 5e-5


def test_the_7b_recipe_is_one_line_and_merges_over_the_sections(params):
    write, data = params
    path = write(recipe="qwen2.5-vl-7b")
    sft = load_section(path, "sft", SFTStageConfig)
    rl = load_section(path, "rl", RLStageConfig)
    backbone = load_section(path, "backbone", BackboneConfig)
    from aesr1.backbone.backbone import pixel_budget

    assert backbone.name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct" and pixel_budget(backbone) == 262_144
    assert (sft.train.learning_rate, sft.train.epochs, sft.train.freeze_vision) == (1e-5, 1, True)
    assert (rl.grpo.learning_rate, rl.grpo.temperature, rl.grpo.max_completion_length) == (1e-6, 1.0, 512)
    assert sft.corpus == data["sft"]["corpus"] and rl.rewards.mode == "error+rank"  # the rest is params.yaml's
    assert (sft.train.lora_r, rl.grpo.logging_steps) == (16, 1)  # nothing of the tiny recipe: defaults, params
    override = write(recipe="qwen2.5-vl-7b", rl={**data["rl"], "grpo": {**data["rl"]["grpo"], "learning_rate": 2e-6}})
    overridden = load_section(override, "rl", RLStageConfig).grpo  # params.yaml wins, key by key
    assert (overridden.learning_rate, overridden.temperature, overridden.beta) == (2e-6, 1.0, 0.01)
    with pytest.raises(ParamsError, match="no file"):
        load_section(write(recipe="qwen9"), "sft", SFTStageConfig)


def test_each_section_a_recipe_sets_belongs_to_a_stage_that_depends_on_the_recipe():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for recipe in (REPO / "configs/recipes").glob("*.yaml"):
        for section in yaml.safe_load(recipe.read_text()):
            assert "recipe" in stages[section]["params"] and "configs/recipes" in stages[section]["deps"], section


def test_trl_options_pass_through_by_trls_own_names():
    from trl import GRPOConfig

    owned = {"learning_rate": 1e-6}
    assert trl_arguments(GRPOConfig, owned, {"vllm_gpu_memory_utilization": 0.3}, "rl.grpo") == {
        "learning_rate": 1e-6, "vllm_gpu_memory_utilization": 0.3}
    with pytest.raises(AesError, match="rl.grpo.trl: GRPOConfig has no .*did you mean 'vllm_gpu_memory_utilization'"):
        trl_arguments(GRPOConfig, owned, {"vllm_gpu_memory_utilisation": 0.3}, "rl.grpo")
    with pytest.raises(AesError, match="set by this project"):
        trl_arguments(GRPOConfig, owned, {"learning_rate": 1e-5}, "rl.grpo")


def test_the_recipes_deepspeed_config_passes_deepspeeds_own_checks(tmp_path):
    """configs/deepspeed/zero3.json under the 7B recipe's SFT and RL settings: transformers' comparison with
    trl's values and DeepSpeed's own parser both accept it (a refused option would stop the stage)."""
    recipe = yaml.safe_load((REPO / "configs/recipes/qwen2.5-vl-7b.yaml").read_text())
    assert recipe["rl"]["grpo"]["trl"]["deepspeed"] == recipe["sft"]["train"]["trl"]["deepspeed"]
    rl = RLStageConfig(grpo=GRPOParams(**{k: v for k, v in recipe["rl"]["grpo"].items() if k != "trl"},
                                       trl={"deepspeed": str(REPO / recipe["rl"]["grpo"]["trl"]["deepspeed"])}))
    args = grpo_config(rl, tmp_path / "ck", [1.0], [])
    assert args.hf_deepspeed_config.is_zero3() and args.hf_deepspeed_config.mismatches == []


def test_one_rollout_temperature_reaches_the_rollouts_and_every_probe(params, tmp_path):
    """rl.grpo.temperature is the one home: `dvc exp run -S ++rl.grpo.temperature=1.3` changes the RL sampling
    and the held-out probes after SFT and after RL alike; a copy of it in a probe's section is an error."""
    write, data = params
    data = yaml.safe_load(yaml.safe_dump(data))
    data["rl"]["grpo"]["temperature"] = 1.3
    path = write(rl=data["rl"])
    sft, rl = load_section(path, "sft", SFTStageConfig), load_section(path, "rl", RLStageConfig)
    assert sft.heldout.temperature == rl.heldout.temperature == 1.3
    assert grpo_config(rl, tmp_path / "ck", [1.0], []).temperature == 1.3
    assert load_section(write(recipe="qwen2.5-vl-7b"), "sft", SFTStageConfig).heldout.temperature == 1.0
    assert load_section(write(recipe="qwen2.5-vl-7b", rl=data["rl"]), "sft", SFTStageConfig).heldout.temperature == 1.3
    data["sft"]["heldout"] = {"temperature": 0.7}
    with pytest.raises(ParamsError, match="sft.heldout.temperature is not set here: it is rl.grpo.temperature"):
        load_section(write(rl=data["rl"], sft=data["sft"]), "sft", SFTStageConfig)


def test_every_shared_setting_is_a_dvc_params_dep_of_the_stage_that_reads_it():
    """A stage reading a value from another section reruns when it changes."""
    from aesr1.cli import STAGES
    from aesr1.config import shared_keys

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, (module, config_class, *_) in STAGES.items():
        import importlib

        for key in shared_keys(getattr(importlib.import_module(module), config_class)).values():
            assert any(key == dep or key.startswith(dep + ".") for dep in stages[name]["params"]), (name, key)


def test_the_evaluations_critique_check_uses_the_filter_stages_align_thresholds(params):
    from aesr1.evaluation.evaluate import EvaluateConfig

    write, data = params
    data = yaml.safe_load(yaml.safe_dump(data))
    data["filter"]["align"]["good_min"] = 0.3
    assert load_section(write(filter=data["filter"]), "evaluate", EvaluateConfig).align.good_min == 0.3


def test_the_7b_recipe_runs_zero3_through_the_trainer_under_any_launcher(params):
    """The DeepSpeed config comes with the recipe, so a launcher that counts the GPUs itself (torchrun's
    --nproc_per_node gpu) is all a GPU machine needs; no process count is written anywhere."""
    import json

    write, _ = params
    path = write(recipe="qwen2.5-vl-7b")
    sft, rl = load_section(path, "sft", SFTStageConfig), load_section(path, "rl", RLStageConfig)
    for options in (sft.train.trl, rl.grpo.trl):
        config = json.loads((REPO / options["deepspeed"]).read_text())
        assert config["zero_optimization"]["stage"] == 3
        assert config["train_micro_batch_size_per_gpu"] == "auto"  # from the Trainer: one home for the batch
        assert "num_processes" not in json.dumps(config)


RECIPE_NAMES = sorted(p.stem for p in (REPO / "configs/recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_recipe_reads_as_the_stages_read_it_and_its_deepspeed_config_passes_their_checks(params, name,
                                                                                                tmp_path):
    """The trl configs the stages build from each recipe; a DeepSpeed config's values agree with the Trainer's."""
    import contextlib

    from aesr1.evaluation.evaluate import EvaluateConfig
    from aesr1.policy.train import sft_config

    write, _ = params
    path = write(recipe=name)
    load_section(path, "backbone", BackboneConfig)
    load_section(path, "evaluate", EvaluateConfig)
    sft, rl = load_section(path, "sft", SFTStageConfig), load_section(path, "rl", RLStageConfig)
    with contextlib.chdir(tmp_path):  # the stages' root: the DeepSpeed file is relative to it
        built = [sft_config(sft.train, tmp_path / "sft"), grpo_config(rl, tmp_path / "rl", [1.0], [])]
    for options, args in zip((sft.train.trl, rl.grpo.trl), built):
        if options.get("deepspeed"):
            assert args.hf_deepspeed_config.is_zero3() and args.hf_deepspeed_config.mismatches == [], name


def test_the_one_gpu_7b_recipe_offloads_the_optimizer_to_deepspeeds_cpu_adam(params, tmp_path):
    import contextlib
    import json

    write, _ = params
    rl = load_section(write(recipe="qwen2.5-vl-7b-1gpu"), "rl", RLStageConfig)
    with contextlib.chdir(tmp_path):
        args = grpo_config(rl, tmp_path / "rl", [1.0], [])
    assert args.hf_deepspeed_config.is_offload() and args.ds3_gather_for_generation is False
    config = json.loads((REPO / "configs/deepspeed/zero3_offload.json").read_text())
    # without an optimizer in the config, DeepSpeed refuses the Trainer's torch AdamW under offload
    assert config["optimizer"]["type"] == "AdamW"
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("name, gpus", [("qwen2.5-vl-7b-1gpu", 1), ("qwen2.5-vl-3b-24gb", 1), ("qwen3-vl-2b-24gb", 1)])
def test_the_smaller_tiers_keep_the_references_training_values_where_memory_allows(params, name, gpus):
    """K, beta, clipping, temperature, completion length and SFT's batch per step as the reference's (8 GPUs); the
    header says what else departs and why."""
    write, _ = params
    reference = {s: load_section(write(recipe="qwen2.5-vl-7b"), s, c) for s, c in (("sft", SFTStageConfig),
                                                                                  ("rl", RLStageConfig))}
    tier = {s: load_section(write(recipe=name), s, c) for s, c in (("sft", SFTStageConfig), ("rl", RLStageConfig))}
    kept = ("num_generations", "beta", "epsilon", "epsilon_high", "loss_type", "temperature", "top_p",
            "max_completion_length", "num_iterations", "epochs", "gradient_checkpointing", "freeze_vision")
    for key in kept:
        assert getattr(tier["rl"].grpo, key) == getattr(reference["rl"].grpo, key), (name, key)
    ref_sft, sft = reference["sft"].train, tier["sft"].train
    assert sft.batch_size * sft.grad_accum * gpus == ref_sft.batch_size * ref_sft.grad_accum * 8
    assert tier["sft"].heldout == reference["sft"].heldout and tier["rl"].heldout == reference["rl"].heldout
    header = (REPO / "configs/recipes" / f"{name}.yaml").read_text().split("\nbackbone:")[0]
    assert "configs/recipes/qwen2.5-vl-7b.yaml" in header and "What it changes from the reference, and why" in header
