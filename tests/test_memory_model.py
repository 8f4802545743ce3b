"""The arithmetic of the memory model, aesr1/doctor/memory.py (pure Python: no model is built)."""

import dataclasses

import pytest

from aesr1.doctor import memory as mm

SHAPE = mm.QWEN25_VL_7B
RECIPE = mm.Recipe()
H100 = mm.GPU_GIB["80GB"]


def test_parameter_counts_are_qwen25_vl_7b_and_3b_and_qwen3_vl_8b_and_2b():
    counts = mm.param_counts(SHAPE)
    assert counts["total"] == 8_292_166_656  # the meta-device model's count (tests/test_plan.py builds it again)
    assert counts["embed"] == counts["lm_head"] == 152_064 * 3584  # untied
    assert mm.param_counts(dataclasses.replace(SHAPE, tied=True))["lm_head"] == 0
    assert mm.param_counts(mm.QWEN25_VL_3B)["total"] == 3_754_622_976  # tied: no lm_head of its own
    assert mm.param_counts(mm.QWEN3_VL_8B)["total"] == 8_767_123_696  # Qwen3-VL-8B-Instruct's published 8.77B
    assert mm.param_counts(mm.QWEN3_VL_2B)["total"] == 2_127_532_032  # tied


def test_zero3_divides_the_sharded_terms_by_the_gpus():
    for key in ("sft/full", "rl/full", "rl/lora"):
        st = mm.settings(RECIPE)[key]
        one = mm.estimate(SHAPE, dataclasses.replace(st, gpus=1)).persistent
        eight = mm.estimate(SHAPE, dataclasses.replace(st, gpus=8)).persistent
        for name in one:
            if name == "CUDA context":
                assert one[name] == eight[name]
            else:
                assert eight[name] == pytest.approx(one[name] / 8)


def test_full_fine_tuning_costs_18_bytes_per_trainable_parameter():
    counts = mm.param_counts(SHAPE)
    e = mm.estimate(SHAPE, dataclasses.replace(mm.settings(RECIPE)["sft/full"], gpus=1))
    trainable = counts["text"]  # the vision tower is frozen
    state = e.persistent["gradients (fp32)"] + e.persistent["master + Adam (fp32)"]
    assert state + e.persistent["weights (bf16)"] == pytest.approx(trainable * 18 + counts["vision"] * 2)


def test_optimizer_offload_moves_16_bytes_per_trained_parameter_to_host_memory():
    st = dataclasses.replace(mm.settings(RECIPE)["rl/full"], gpus=1)
    on_gpu = mm.estimate(SHAPE, st)
    offloaded = mm.estimate(SHAPE, dataclasses.replace(st, offload=True))
    trained = mm.param_counts(SHAPE)["text"]
    assert sum(offloaded.host.values()) == pytest.approx(trained * 16) and not on_gpu.host
    assert sum(on_gpu.persistent.values()) - sum(offloaded.persistent.values()) == pytest.approx(trained * 16)
    assert "gradients (fp32)" not in offloaded.persistent and "weights (bf16)" in offloaded.persistent
    assert offloaded.persistent["reference model (bf16)"] == on_gpu.persistent["reference model (bf16)"]


def test_generation_without_the_gathered_model_holds_one_layer_at_a_time():
    st = mm.settings(RECIPE)["rl/full"]
    gathered = mm.estimate(SHAPE, st).generation
    by_layer = mm.estimate(SHAPE, dataclasses.replace(st, gather_for_generation=False)).generation
    assert gathered["whole bf16 model gathered"] == mm.param_counts(SHAPE)["total"] * 2
    assert "whole bf16 model gathered" not in by_layer and by_layer["ZeRO-3 gathered params"] == mm.zero3_working_set(
        SHAPE) < gathered["whole bf16 model gathered"] / 10
    plain = mm.estimate(SHAPE, dataclasses.replace(st, zero3=False)).generation  # the whole model is there already
    assert "whole bf16 model gathered" not in plain and "ZeRO-3 gathered params" not in plain


def test_lora_optimizer_state_is_far_below_full_fine_tuning():
    full = mm.estimate(SHAPE, mm.settings(RECIPE)["rl/full"]).persistent
    lora = mm.estimate(SHAPE, mm.settings(RECIPE)["rl/lora"]).persistent
    assert lora["master + Adam (fp32)"] < full["master + Adam (fp32)"] / 100
    assert lora["master + Adam (fp32)"] == pytest.approx(mm.lora_params(SHAPE, 16) * 12 / 8)
    assert "reference model (bf16)" in full and "reference model (bf16)" not in lora  # adapters off = reference


def test_a_checkpoint_holds_bf16_weights_and_the_trained_parameters_master_and_moments():
    counts = mm.param_counts(SHAPE)
    assert mm.checkpoint_bytes(SHAPE, "full") == counts["total"] * 2 + counts["text"] * 12  # 108.0 GB
    assert mm.checkpoint_bytes(SHAPE, "full", freeze_vision=False) == counts["total"] * 14
    assert mm.checkpoint_bytes(SHAPE, "lora", lora_r=16) == mm.lora_params(SHAPE, 16) * 14


def test_naive_logits_are_batch_times_sequence_times_vocab_times_4():
    st = mm.settings(RECIPE)["rl/full"]
    e = mm.estimate(SHAPE, st)
    assert st.batch.sequences == 32 and st.batch.tokens_per_sequence == 315 + 90 + 512
    assert e.info["naive logits B x S x V x 4"] == 32 * 917 * 152_064 * 4
    assert e.info["naive logits, completion only"] == 32 * 512 * 152_064 * 4


def test_checkpointing_keeps_one_hidden_vector_per_token_per_layer():
    st = mm.settings(RECIPE)["sft/full"]
    e = mm.estimate(SHAPE, st)
    assert e.held["checkpointed layer inputs"] == 28 * 8 * 917 * 3584 * 2
    without = mm.estimate(SHAPE, dataclasses.replace(st, gradient_checkpointing=False)).held
    per_layer = e.info["activation bytes per token per layer"]
    assert without["all layers' activations"] == pytest.approx(28 * 8 * 917 * per_layer)
    assert e.training == sum(e.held.values()) + max(e.transient.values())  # transients come one at a time


def test_kv_cache_and_the_recipe_verdicts():
    assert mm.kv_bytes_per_token(SHAPE) == 28 * 2 * 4 * 128 * 2  # 56 KiB: GQA's 4 KV heads
    e = mm.estimate(SHAPE, mm.settings(RECIPE)["rl/full"])
    assert e.generation["KV cache"] == 64 * 917 * mm.kv_bytes_per_token(SHAPE)  # 8 images x K 4 x grad_accum 2
    assert e.peak == sum(e.persistent.values()) + max(e.training, sum(e.generation.values()))
    no_checkpointing = dataclasses.replace(mm.settings(RECIPE)["rl/full"], gradient_checkpointing=False)
    assert not mm.fits(mm.estimate(SHAPE, no_checkpointing).peak, H100)
    assert mm.images_that_fit(SHAPE, no_checkpointing, H100) < RECIPE.images_per_device
    assert mm.fits(72 * mm.GiB, 80) and not mm.fits(72.1 * mm.GiB, 80)  # 10% headroom


def test_the_recipes_generation_batch_follows_trls_steps_per_generation():
    assert RECIPE.generated_at_once == 8 * 4 * 2  # grad_accum micro-batches at once
    explicit = dataclasses.replace(RECIPE, steps_per_generation=1)
    assert explicit.generated_at_once == 32
    assert mm.stage_setting(explicit, "rl").steps_per_generation == 1
