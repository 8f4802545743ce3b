"""trl reward functions (grouping by image id) and a short RAPO run on the tiny model."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from aesr1.errors import AesError
from aesr1.rl.reward_funcs import REWARD_MODES, REWARDS, RewardConfig, make_reward_funcs, rewards_for_mode
from aesr1.rl.rewards import rapo_rewards
from aesr1.trajectory import make_trajectory

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def conversation(text):
    return [{"role": "assistant", "content": text}]


def test_reward_functions_match_the_core_on_a_shuffled_batch():
    rng = np.random.default_rng(0)
    n, k = 5, 4
    pred = rng.random((n, k)).round(2)
    pred[1, 2] = np.nan
    gt = rng.random(n)
    rows = [(f"img{i}", i, j) for i in range(n) for j in range(k)]
    order = rng.permutation(len(rows))  # completions arrive in any order
    rows = [rows[o] for o in order]
    completions = [conversation("garbage" if np.isnan(pred[i, j]) else make_trajectory("ok", pred[i, j]))
                   for _, i, j in rows]
    kwargs = dict(prompts=[None] * len(rows), completions=completions, completion_ids=None,
                  image_id=[r[0] for r in rows], score=[gt[r[1]] for r in rows])
    rank_fn, abs_fn, format_fn = make_reward_funcs(["rank", "absolute", "format"])
    rank = rank_fn(**kwargs)
    absolute = abs_fn(**kwargs)
    # the core on the same data, in image order; row order within a group does not matter to the core
    core_rank, core_abs = rapo_rewards(pred, gt)
    for (_, i, j), r, a in zip(rows, rank, absolute):
        assert r == pytest.approx(core_rank[i, j]) and a == pytest.approx(core_abs[i, j])
    logged = {}
    assert format_fn(**kwargs, log_metric=lambda name, value: logged.setdefault(name, value)) == [
        0.0 if np.isnan(pred[i, j]) else 1.0 for _, i, j in rows]
    assert logged["unparseable_rate"] == pytest.approx(1 / 20)
    parsed = pred[np.isfinite(pred)]
    assert logged["band_share/bad"] == pytest.approx(np.mean(parsed < 0.4))
    assert logged["band_share/good"] == pytest.approx(np.mean(parsed >= 0.7))
    assert logged["score_std_between_images"] == pytest.approx(np.std(np.nanmean(pred, axis=1)))


def test_score_health_shows_a_collapse_toward_the_middle():
    from aesr1.rl.reward_funcs import score_health

    ids = ["a", "a", "b", "b", "c", "c"]
    spread = score_health(ids, [0.1, 0.2, 0.5, 0.6, 0.9, 0.8])
    collapsed = score_health(ids, [0.5, 0.52, 0.5, 0.49, 0.51, 0.5])
    assert spread["band_share/fair"] == pytest.approx(1 / 3) and collapsed["band_share/fair"] == 1.0
    assert collapsed["score_std_between_images"] < 0.02 < spread["score_std_between_images"]
    assert score_health(["a", "a"], [float("nan"), 0.3])["unparseable_rate"] == 0.5


def test_grouping_ignores_row_order_mixing():
    """Two images whose rows interleave are still two groups (the reference would mix them)."""
    completions = [conversation(make_trajectory("x", s)) for s in (0.9, 0.1, 0.8, 0.2)]
    kwargs = dict(prompts=[None] * 4, completions=completions, completion_ids=None,
                  image_id=["a", "b", "a", "b"], score=[0.85, 0.15, 0.85, 0.15])
    (rank_fn,) = make_reward_funcs(["rank"])
    core, _ = rapo_rewards(np.array([[0.9, 0.8], [0.1, 0.2]]), np.array([0.85, 0.15]))
    assert rank_fn(**kwargs) == pytest.approx([core[0, 0], core[1, 0], core[0, 1], core[1, 1]])


def test_binary_reward_and_modes():
    (binary,) = make_reward_funcs(["binary"], RewardConfig(binary_threshold=0.1))
    out = binary(prompts=None, completions=[conversation(make_trajectory("x", 0.5)), conversation("bad")],
                 completion_ids=None, image_id=["a", "a"], score=[0.55, 0.55])
    assert out == [1.0, 0.0]
    assert rewards_for_mode(RewardConfig()) == (["rank", "absolute", "format"], [0.5, 0.5, 1.0])
    assert rewards_for_mode(RewardConfig(mode="rank")) == (["rank", "format"], [1.0, 1.0])
    assert rewards_for_mode(RewardConfig(mode="binary+rank", relative_weight=0.3, absolute_weight=0.7)) == (
        ["rank", "binary", "format"], [0.3, 0.7, 1.0])
    with pytest.raises(ValueError, match="reward mode"):
        RewardConfig(mode="score")
    with pytest.raises(AesError, match="unknown reward functions"):
        make_reward_funcs(["score"])


def test_configured_rewards_pickle_and_carry_trl_names():
    """trl names each reward by ``__name__`` and may pickle it (to worker processes)."""
    import pickle

    funcs = make_reward_funcs(list(REWARDS), RewardConfig(sigma=0.2))
    assert [f.__name__ for f in funcs] == [f"{n}_reward" for n in REWARDS]
    copy = pickle.loads(pickle.dumps(funcs[0]))
    assert copy.cfg.sigma == 0.2 and copy.__name__ == funcs[0].__name__
    assert set(REWARD_MODES) >= {"error+rank", "rank", "error"}
    for mode in REWARD_MODES:  # every mode names rewards that exist
        names, weights = rewards_for_mode(RewardConfig(mode=mode))
        assert names[-1] == "format" and len(make_reward_funcs(names)) == len(weights)


def exposure_testbed(root, n: int, seed: int) -> pd.DataFrame:
    """Images whose score is one clearly visible factor, their brightness (dark or bright, and how
    much), with AesCoT-like trajectories: a critique toned by the band, then a noisy score, as raters give."""
    from PIL import Image

    from aesr1.trajectory import band_of

    rng = np.random.default_rng(seed)
    rows = []
    scores = np.where(rng.random(n) < 0.5, rng.uniform(0.05, 0.35, n), rng.uniform(0.65, 0.95, n)).round(2)
    for i, score in enumerate(scores):
        pixels = np.clip(score * 255 + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
        path = root / f"{seed}_{i}.png"
        Image.fromarray(pixels).save(path)
        tone = {"bad": "dark and dull", "fair": "even", "good": "bright and lively"}[band_of(score)]
        target = float(np.clip(score + rng.normal(0, 0.1), 0, 1))
        rows.append({"image_id": f"ava/{seed}_{i}", "image_path": str(path), "dataset": "ava", "score": score,
                     "trajectory": make_trajectory(f"Exposure: the frame is {tone}.", target)})
    return pd.DataFrame(rows)


def expected_plcc(model, processor, frame: pd.DataFrame) -> float:
    """Held-out PLCC of the low-noise readout (expected score, mean of two critiques per image)."""
    from aesr1.evaluation.evaluate import readout_scores
    from aesr1.metrics import correlations
    from aesr1.policy.generation import sample

    processor.tokenizer.padding_side = "left"
    sampled = sample(model, processor, list(frame.image_path), n=2, temperature=0.6, top_p=0.7, top_k=50,
                     max_new_tokens=40, batch_size=48)
    predicted = readout_scores(sampled.texts, sampled.expected, 2)["expected"]
    return correlations(np.where(np.isfinite(predicted), predicted, 0.5), frame.score)["plcc"]


@pytest.mark.slow
def test_rapo_keeps_a_learned_visible_factor_and_logs_its_health(tmp_path, monkeypatch):
    """The guard that RL works: on a testbed where the score is the image's brightness, SFT learns it,
    and RAPO from that model raises its reward while the held-out PLCC rises or stays near its ceiling;
    the run logs rewards, score health and completion tables, and saves a loadable model.

    (With a learning rate of 1e-3 and two passes per rollout, RAPO took this testbed's PLCC from 0.58 to
    -0.10: the test catches an RL update that destroys what SFT learned.)"""
    import torch
    from test_policy import SMALL

    from aesr1.backbone.backbone import BackboneConfig, backbone
    from aesr1.backbone.pretrain import PretrainConfig
    from aesr1.policy.data import sft_dataset
    from aesr1.policy.generation import load_policy
    from aesr1.policy.probe import HeldoutConfig
    from aesr1.policy.train import TrainConfig, fit
    from aesr1.policy.trainer import save_trained
    from aesr1.rl.rl import GRPOParams, RLStageConfig, rl
    from aesr1.stage import Recorder
    from aesr1.tracking import stage_run

    backbone(BackboneConfig(out_dir=str(tmp_path / "backbone"), checkpoint_root=str(tmp_path / "ck"), tiny=SMALL,
                            pretrain=PretrainConfig(samples=8, train=TrainConfig(epochs=1, batch_size=8))),
             Recorder())
    (tmp_path / "img").mkdir()
    train, heldout = exposure_testbed(tmp_path / "img", 160, 0), exposure_testbed(tmp_path / "img", 64, 1)
    train.to_parquet(tmp_path / "train.parquet")
    heldout.to_parquet(tmp_path / "test.parquet")

    torch.manual_seed(0)
    model, processor = load_policy(str(tmp_path / "backbone"), training="full")
    sft_cfg = TrainConfig(epochs=14, learning_rate=3e-3, batch_size=16, freeze_vision=False, warmup=0.05,
                          save_steps=10_000, logging_steps=50)
    trainer = fit(model, processor, sft_dataset(train, "trajectory"), sft_cfg, tmp_path / "ck" / "sft")
    save_trained(trainer, processor, tmp_path / "sft")
    sft_plcc = expected_plcc(model, processor, heldout)
    assert sft_plcc > 0.5, f"SFT did not learn the visible factor (held-out PLCC {sft_plcc:.2f})"

    steps = 24
    cfg = RLStageConfig(model=str(tmp_path / "sft"), train_manifest=str(tmp_path / "train.parquet"),
                        test_manifest=str(tmp_path / "test.parquet"), balance_bands=True,
                        heldout=HeldoutConfig(samples=8, datasets=["ava"], max_new_tokens=40),
                        out_dir=str(tmp_path / "rapo"), checkpoint_root=str(tmp_path / "ck"),
                        grpo=GRPOParams(images_per_device=8, grad_accum=1, max_steps=steps, learning_rate=3e-4,
                                        max_completion_length=40, completions_table_every=12, save_steps=100,
                                        num_iterations=1, freeze_vision=True))
    monkeypatch.chdir(tmp_path)
    with stage_run("rl", {}, root=tmp_path) as run:
        metrics = rl(cfg, Recorder())
    assert metrics["steps"] == steps and metrics["completion_tables"] == 2
    assert metrics["heldout"]["heldout_images"] == 8
    logged = mlflow.get_run(run.info.run_id).data.metrics
    for name in ("rewards/rank_reward/mean", "rewards/absolute_reward/mean", "rewards/format_reward/mean",
                 "unparseable_rate", "band_share/fair", "score_std_between_images", "entropy", "kl",
                 "completions/mean_length"):
        assert name in logged, name
    assert any(k.startswith("clip_ratio") for k in logged)
    table = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="completions")
    assert json.loads(next(iter(sorted(__import__("pathlib").Path(table).iterdir()))).read_text())["columns"]
    reward = pd.read_csv(tmp_path / "rapo" / "training_history.csv")["reward"].to_numpy()
    third = steps // 3
    assert reward[-third:].mean() > reward[:third].mean(), reward
    model, processor = load_policy(str(tmp_path / "rapo"))
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    rapo_plcc = expected_plcc(model, processor, heldout)
    print(f"held-out PLCC (expected readout): SFT {sft_plcc:.3f}, RAPO {rapo_plcc:.3f}")
    # SFT already reads the factor (0.97 on this testbed): RL must keep it, not destroy it (0.58 -> -0.10 above)
    assert rapo_plcc > sft_plcc - 0.05, (sft_plcc, rapo_plcc)


def test_band_balanced_rl_prompts_take_the_rarest_bands_count_of_each(tmp_path):
    from aesr1.rl.rl import RLStageConfig, rl_images
    from aesr1.trajectory import band_of

    scores = [0.1] * 10 + [0.5] * 30 + [0.8] * 5
    pd.DataFrame({"image_id": [f"i{n}" for n in range(45)], "image_path": "x.jpg", "score": scores}).to_parquet(
        tmp_path / "train.parquet")
    cfg = RLStageConfig(train_manifest=str(tmp_path / "train.parquet"), balance_bands=True)
    chosen = rl_images(cfg)
    assert chosen.score.map(band_of).value_counts().to_dict() == {"bad": 5, "fair": 5, "good": 5}
    assert chosen.image_id.is_unique and list(chosen.image_id) == list(rl_images(cfg).image_id)  # seeded
    natural = rl_images(RLStageConfig(train_manifest=str(tmp_path / "train.parquet")))
    assert len(natural) == 45


@pytest.mark.parametrize("grpo, message", [
    (dict(images_per_device=2, num_generations=4, trl={"generation_batch_size": 6}),
     r"rl.grpo: trl refuses these settings: generation_batch_size \(6\) must be divisible"),
    (dict(use_vllm=True), r"rl.grpo.use_vllm: trl 1\.16.* corrupts image prompts under vLLM .*#6294, #6401"),
    (dict(trl={"deepspeed": {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_saves": True}}}),
     r"rl.grpo.trl.deepspeed \(the mapping given\): DeepSpeed refuses this config:\n  DeepSpeedZeroConfig: "
     r"stage3_gather_16bit_weights_on_model_saves: Extra inputs are not permitted"),
    (dict(images_per_device=2, num_generations=4,
          trl={"deepspeed": {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4}}),
     r"(?s)train_micro_batch_size_per_gpu=4 vs hf per_device_train_batch_size=8.*rl.grpo.images_per_device x "
     r"num_generations"),
    (dict(trl={"deepspeed": {"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}, "bf16": {"enabled": True}}}),
     "bfloat16 and fp16 modes cannot be simultaneously enabled"),
    (dict(trl={"deepspeed": "configs/deepspeed/no-such.json"}),
     r"rl.grpo: trl refuses these settings: .*configs/deepspeed/no-such.json"),
])
def test_settings_trl_refuses_stop_the_stage_before_any_model_loads(tmp_path, grpo, message):
    from aesr1.config import ParamsError
    from aesr1.rl.rl import GRPOParams, RLStageConfig, build_trainer

    pd.DataFrame({"image_id": ["a", "b"], "image_path": ["a.jpg", "b.jpg"], "score": [0.2, 0.8],
                  "dataset": ["ava", "ava"]}).to_parquet(tmp_path / "train.parquet")
    cfg = RLStageConfig(model=str(tmp_path / "no-model-here"), train_manifest=str(tmp_path / "train.parquet"),
                        checkpoint_root=str(tmp_path / "ck"), balance_bands=False, grpo=GRPOParams(**grpo))
    with pytest.raises(ParamsError, match=message):  # a ParamsError, not the missing model folder's OSError
        build_trainer(cfg, [], [])


def test_vllm_needs_a_model_length_in_colocate_mode_only():
    """Checked as for a trl release that fixes vLLM's image prompts: vLLM colocated on the training GPUs sizes its KV
    cache for the model's whole context unless told the length; a vLLM server (trl vllm-serve) has its own."""
    from aesr1.config import ParamsError
    from aesr1.rl.rl import VLLM_IMAGE_FIX, GRPOParams, check_vllm

    with pytest.raises(ParamsError, match="vllm_max_model_length is not set"):
        check_vllm(GRPOParams(use_vllm=True, vllm_mode="colocate"), VLLM_IMAGE_FIX)
    check_vllm(GRPOParams(use_vllm=True, vllm_mode="colocate", trl={"vllm_max_model_length": 1024}), VLLM_IMAGE_FIX)
    check_vllm(GRPOParams(use_vllm=True, vllm_mode="server"), VLLM_IMAGE_FIX)


def test_the_kl_term_is_the_references_k3_not_weighted_by_the_importance_ratio(tmp_path):
    """trl's default multiplies the per-token KL by the (differentiable) ratio, which changes its gradient even
    on-policy; the reference's is the plain k3 estimator."""
    from aesr1.rl.rl import GRPOParams, RLStageConfig, grpo_config

    args = grpo_config(RLStageConfig(grpo=GRPOParams(beta=0.01)), tmp_path / "ck", [1.0], [])
    assert args.beta == 0.01 and args.use_bias_correction_kl is False
