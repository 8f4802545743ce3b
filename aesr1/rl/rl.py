"""The rl stage: RAPO, i.e. trl's GRPOTrainer with the relative + absolute rewards.

The defaults are the Aes-R1 reference's (its values and their reasons:
configs/recipes/qwen2.5-vl-7b.yaml and docs/method.md): a k3 KL to the reference policy,
asymmetric clipping, rewards normalised per image group, loss type ``dapo`` (every token of
the batch weighs the same). With ``num_iterations: 1`` the probability ratio is exactly 1
and the clipping never acts (as in the reference); set it above 1 to make the clip real.

A batch holds whole groups only: the per-device batch is ``images_per_device * K``.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import torch
from datasets import Dataset, Value
from transformers import TrainerCallback

from aesr1 import distributed
from aesr1.config import ParamsError, config
from aesr1.policy.data import prompt_dataset
from aesr1.policy.generation import load_policy
from aesr1.policy.probe import HeldoutConfig, heldout_images, probe
from aesr1.policy.trainer import (
    StepProgress,
    finish,
    free_optimizer,
    freeze_vision,
    lora_config,
    parameter_counts,
    quiet,
    resume,
    run_fingerprint,
    save_trained,
    trl_config,
)
from aesr1.rl.reward_funcs import RewardConfig, completion_text, make_reward_funcs, rewards_for_mode
from aesr1.trajectory import band_of, parse_score

if TYPE_CHECKING:  # the trainer runs without MLflow too (benchmarks/rl.py on a bare GPU machine)
    from aesr1.stage import Recorder

log = logging.getLogger(__name__)


@config
class GRPOParams:
    """Defaults: the reference's values (configs/recipes/qwen2.5-vl-7b.yaml); the tiny recipe sets its own."""

    num_generations: int = 4
    images_per_device: int = 8
    grad_accum: int = 2
    epochs: float = 10.0
    max_steps: int = -1
    learning_rate: float = 1e-6
    lr_scheduler: str = "linear"
    beta: float = 0.01
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    num_iterations: int = 1
    loss_type: str = "dapo"
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 512
    mode: Literal["full", "lora"] = "full"
    freeze_vision: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = False  # trade compute for memory on a real backbone
    use_vllm: bool = False
    vllm_mode: Literal["colocate", "server"] = "colocate"
    logging_steps: int = 1
    save_steps: int = 50
    completions_table_every: int = 10  # steps between completion tables logged to MLflow
    seed: int = 0
    trl: dict[str, Any] = field(default_factory=dict)  # any other GRPOConfig field (vLLM, generation), by trl's name


@config
class RLStageConfig:
    """Params section ``rl``."""

    model: str = "data/models/sft"  # data/models/backbone for RL without cold start
    train_manifest: str = "data/ingest/train.parquet"
    out_dir: str = "data/models/rapo"
    checkpoint_root: str = "data/checkpoints"
    test_manifest: str = "data/ingest/test.parquet"
    train_images: int | None = None  # a subset of the training images (None: all)
    balance_bands: bool = False  # as many bad, fair and good images (by their score) as the rarest band has
    log_model: bool = True
    keep_checkpoints: bool = False  # keep the last checkpoint after the run (a rerun of the same run resumes from it)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)  # the same probe as after SFT
    rewards: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOParams = field(default_factory=GRPOParams)


def rl_dataset(frame: pd.DataFrame) -> Dataset:
    """Prompts with one image each, plus the columns the rewards read (image_id, score)."""
    return prompt_dataset(frame, {"image_id": (list(frame.image_id), Value("string")),
                                  "score": ([float(s) for s in frame.score], Value("float64"))})


class CompletionTables(TrainerCallback):
    """Every N steps, log that step's completions with their parsed score, rewards and advantage to MLflow.

    trl (``log_completions``) writes each logging step's completions to
    ``<output_dir>/completions/completions_<step>.parquet``; this copies every N-th into an MLflow table.
    """

    def __init__(self, every: int):
        self.every = every
        self.logged: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.log_written(args, state)  # trl writes a step's file after this hook: the earlier steps' are there
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.log_written(args, state)
        return control

    def log_written(self, args, state) -> None:
        if not state.is_world_process_zero:
            return
        import mlflow

        for path in sorted((Path(args.output_dir) / "completions").glob("completions_*.parquet")):
            step = int(path.stem.split("_")[-1])
            if step % self.every or step in self.logged:
                continue
            written = pd.read_parquet(path)
            texts = [completion_text(c) for c in written["completion"]]
            rewards = [c for c in written.columns if c.endswith("_reward")]
            table = pd.DataFrame({"step": step, "completion": texts,
                                  "parsed_score": [parse_score(t.strip()) for t in texts],
                                  **{f"reward_{c.removesuffix('_reward')}": written[c] for c in rewards},
                                  "advantage": written["advantage"]})
            mlflow.log_table(table, artifact_file=f"completions/step_{step:06d}.json")
            self.logged.append(step)


# The first trl release that may hand vLLM unexpanded image placeholders (pyproject caps trl below it): trl 1.16's
# GRPOTrainer passes vLLM the processor's prompt ids, image tokens already expanded, beside the raw image, and vLLM
# expands them again (huggingface/trl #6294: corrupted prompts; #6401: a crash in M-RoPE, or silently shifted
# prompts, on images of mixed sizes, which every real dataset has)
VLLM_IMAGE_FIX = "1.17"


def check_vllm(g: GRPOParams, trl_version: str) -> None:
    """``rl.grpo.use_vllm`` settings that cannot work stop the stage before any model loads."""
    from packaging.version import Version

    if Version(trl_version) < Version(VLLM_IMAGE_FIX):
        raise ParamsError(
            f"rl.grpo.use_vllm: trl {trl_version} corrupts image prompts under vLLM (it passes vLLM image tokens "
            f"already expanded, which vLLM expands again: huggingface/trl #6294, #6401; on mixed image sizes a crash "
            f"or silently wrong prompts); set rl.grpo.use_vllm: false (rollouts by transformers' generate)")
    if g.vllm_mode == "colocate" and "vllm_max_model_length" not in g.trl:
        raise ParamsError(
            "rl.grpo.use_vllm with vllm_mode colocate, but rl.grpo.trl.vllm_max_model_length is not set: vLLM would "
            "size its KV cache for the model's whole context (Qwen2.5-VL: 128K tokens) inside "
            "vllm_gpu_memory_utilization; set it to the longest prompt plus rl.grpo.max_completion_length (e.g. 1024 "
            "for ~315 visual + ~90 prompt + 512 completion tokens)")


def grpo_config(cfg: RLStageConfig, checkpoints: Path, reward_weights: list[float], report_to: list[str]):
    """trl's GRPOConfig from ``rl.grpo`` (trl's own extra fields from ``rl.grpo.trl``); settings that cannot
    work stop here, before any model loads, in this project's keys."""
    import trl
    from trl import GRPOConfig

    g = cfg.grpo
    if g.use_vllm:
        check_vllm(g, trl.__version__)
    on_gpu = torch.cuda.is_available()
    return trl_config(GRPOConfig, dict(
        output_dir=str(checkpoints), use_cpu=not on_gpu, bf16=on_gpu, seed=g.seed,
        per_device_train_batch_size=g.images_per_device * g.num_generations,
        gradient_accumulation_steps=g.grad_accum, num_generations=g.num_generations,
        num_train_epochs=g.epochs, max_steps=g.max_steps, learning_rate=g.learning_rate,
        lr_scheduler_type=g.lr_scheduler, beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
        num_iterations=g.num_iterations, loss_type=g.loss_type, temperature=g.temperature, top_p=g.top_p,
        use_bias_correction_kl=False,  # the reference's k3 KL; trl's default weights it by the importance ratio
        max_completion_length=g.max_completion_length, reward_weights=reward_weights,
        gradient_checkpointing=g.gradient_checkpointing, use_vllm=g.use_vllm, vllm_mode=g.vllm_mode,
        logging_steps=g.logging_steps, save_strategy="steps", save_steps=g.save_steps, save_total_limit=1,
        report_to=report_to, disable_tqdm=True, dataloader_num_workers=0, shuffle_dataset=True,
        log_completions=True, num_completions_to_print=0, log_multimodal=False,  # files for CompletionTables
    ), g.trl, "rl.grpo", batch="rl.grpo.images_per_device x num_generations")


def rl_images(cfg: RLStageConfig) -> pd.DataFrame:
    """The training images RL prompts with: all, a seeded subset, and/or band-balanced.

    Balancing matters on a training mix dominated by one band: there the cheapest gain for
    the policy is to drop the rarer bands' tones, which are the outputs that followed the image.
    """
    train = pd.read_parquet(cfg.train_manifest)
    if cfg.balance_bands:
        bands = train.score.map(band_of)
        per_band = int(bands.value_counts().min())
        train = pd.concat([rows.sample(per_band, random_state=cfg.grpo.seed) for _, rows in train.groupby(bands)])
        train = train.sample(frac=1.0, random_state=cfg.grpo.seed)
    if cfg.train_images is not None:
        train = train.sample(min(cfg.train_images, len(train)), random_state=cfg.grpo.seed)
    return train.reset_index(drop=True)


def build_trainer(cfg: RLStageConfig, report_to: list[str], callbacks: list) -> tuple:
    """(trainer, processor, training frame, reward names, reward weights, checkpoint folder) as the stage uses them."""
    from trl import GRPOTrainer

    train = rl_images(cfg)
    names, weights = rewards_for_mode(cfg.rewards)
    reward_funcs = make_reward_funcs(names, cfg.rewards)
    checkpoints = Path(cfg.checkpoint_root) / f"rl-{run_fingerprint(cfg, train)}"
    args = grpo_config(cfg, checkpoints, weights, report_to)  # before the model: ZeRO-3 partitions it while loading
    model, processor = load_policy(cfg.model, training=cfg.grpo.mode)
    if cfg.grpo.freeze_vision:
        freeze_vision(model)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args,
                          train_dataset=rl_dataset(train), processing_class=processor,
                          peft_config=lora_config(cfg.grpo, model), callbacks=callbacks)
    return trainer, processor, train, names, weights, checkpoints


def rl(cfg: RLStageConfig, recorder: Recorder) -> dict:
    tables = CompletionTables(cfg.grpo.completions_table_every)
    trainer, processor, train, names, weights, checkpoints = build_trainer(cfg, ["mlflow"],
                                                                           [tables, StepProgress("rl")])
    quiet(trainer)
    recorder.dataset(cfg.train_manifest, train, "training")  # the images RL prompts with
    recorder.param("rapo.reward_functions", ",".join(names))
    recorder.param("rapo.reward_weights", ",".join(map(str, weights)))
    last = resume(trainer, checkpoints, cfg.grpo.mode)
    log.info("RAPO on %s: %d images, rewards %s weights %s", cfg.model, len(train), names, weights)
    with warnings.catch_warnings():  # trl asks a deprecated transformers property at every step
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        trainer.train(resume_from_checkpoint=last)

    out = save_trained(trainer, processor, cfg.out_dir, base=cfg.model if cfg.grpo.mode == "lora" else None,
                       log_model=cfg.log_model)
    finish(checkpoints, keep=cfg.keep_checkpoints)  # they only served to resume a killed run

    history = pd.DataFrame([h for h in trainer.state.log_history if "loss" in h])
    if distributed.is_main():
        history.to_csv(out / "training_history.csv", index=False)  # the reward/entropy curves

    def first_last(column: str) -> dict:
        if column not in history or history[column].dropna().empty:
            return {"first": math.nan, "last": math.nan}
        values = history[column].dropna()
        window = max(1, len(values) // 5)
        return {"first": float(values.head(window).mean()), "last": float(values.tail(window).mean())}

    free_optimizer(trainer)
    reward_columns = [c for c in history.columns if c.startswith("rewards/") and c.endswith("/mean")]
    heldout, table = probe(trainer.model, processor, heldout_images(cfg.test_manifest, cfg.heldout), cfg.heldout)
    recorder.table("heldout_completions.json", table.head(50))
    return {
        "heldout": heldout,
        "steps": int(trainer.state.global_step),
        "resumed_from_step": trainer.resumed_from_step,  # 0: trained from the start
        **parameter_counts(trainer.model),
        "train_images": len(train),
        "reward": first_last("reward"),
        **{c.removeprefix("rewards/").removesuffix("/mean"): first_last(c) for c in reward_columns},
        "unparseable_rate": first_last("unparseable_rate"),
        "entropy": first_last("entropy"),
        "kl": first_last("kl"),
        "completion_tables": len(tables.logged),
    }
