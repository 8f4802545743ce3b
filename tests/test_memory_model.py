"""The arithmetic of benchmarks/memory_model.py (pure Python: no model is built)."""

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory_model as mm  # noqa: E402

SHAPE = mm.QWEN25_VL_7B
RECIPE = mm.Recipe()


def test_parameter_counts_are_qwen25_vl_7b():
    counts = mm.param_counts(SHAPE)
    assert counts["total"] == 8_292_166_656  # the meta-device model's count (real_shape.py checks it again)
    assert counts["embed"] == counts["lm_head"] == 152_064 * 3584  # untied
    assert mm.param_counts(dataclasses.replace(SHAPE, tied=True))["lm_head"] == 0


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


def test_lora_optimizer_state_is_far_below_full_fine_tuning():
    full = mm.estimate(SHAPE, mm.settings(RECIPE)["rl/full"]).persistent
    lora = mm.estimate(SHAPE, mm.settings(RECIPE)["rl/lora"]).persistent
    assert lora["master + Adam (fp32)"] < full["master + Adam (fp32)"] / 100
    assert lora["master + Adam (fp32)"] == pytest.approx(mm.lora_params(SHAPE, 16) * 12 / 8)
    assert "reference model (bf16)" in full and "reference model (bf16)" not in lora  # adapters off = reference


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
    assert not mm.fits(mm.estimate(SHAPE, no_checkpointing).peak, "80GB")
    assert mm.images_that_fit(SHAPE, no_checkpointing, "80GB") < RECIPE.images_per_device
