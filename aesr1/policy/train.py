"""Supervised fine-tuning of a VLM policy with trl's SFTTrainer: full or LoRA, resumable.

Used by the backbone's descriptive pretraining and by the cold-start SFT stage alike.
"""

from __future__ import annotations

import logging
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset

from aesr1.config import config
from aesr1.policy.trainer import StepProgress, freeze_vision, lora_config, quiet, resume, trl_config

log = logging.getLogger(__name__)


@config
class TrainConfig:
    """How to fine-tune. Defaults: the reference's cold start (configs/recipes/qwen2.5-vl-7b.yaml)."""

    mode: Literal["full", "lora"] = "full"
    epochs: float = 1.0
    learning_rate: float = 1e-5
    lr_scheduler: str = "cosine"
    warmup: float = 0.0  # warm-up steps, or a fraction of all steps if below 1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int | None = None
    freeze_vision: bool = True  # the reference freezes the vision tower and the projector
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    merge_lora: bool = True  # save a merged model (False: save the adapter beside the base)
    save_steps: int = 200
    logging_steps: int = 5
    seed: int = 0
    gradient_checkpointing: bool = False
    trl: dict[str, Any] = field(default_factory=dict)  # any other SFTConfig field, by trl's own name


def sft_config(cfg: TrainConfig, checkpoint_dir: Path, report_to: list[str] | None = None):
    """trl's SFTConfig from ``sft.train`` (trl's own extra fields from ``sft.train.trl``); settings that cannot
    work stop here, before any model loads, in this project's keys."""
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    return trl_config(SFTConfig, dict(
        output_dir=str(checkpoint_dir), use_cpu=not on_gpu, bf16=on_gpu, num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length, logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=1, seed=cfg.seed, report_to=report_to or [],
        gradient_checkpointing=cfg.gradient_checkpointing, completion_only_loss=True,
        dataloader_num_workers=0, disable_tqdm=True,  # StepProgress logs instead
    ), cfg.trl, "sft.train", batch="sft.train.batch_size")


def fit(model, processor, dataset: Dataset, cfg: TrainConfig, checkpoint_dir: Path,
        report_to: list[str] | None = None, callbacks: list | None = None, progress_name: str = "sft"):
    """Train with SFTTrainer (loss on the completion only); resume from the last checkpoint if any.

    ``model`` is a model, or a model folder that is loaded once the Trainer's arguments
    exist (under DeepSpeed ZeRO-3 the weights are then partitioned while loading, never
    whole on one GPU). Returns the trainer; :func:`aesr1.policy.trainer.save_trained` saves its model.
    """
    from trl import SFTTrainer

    args = sft_config(cfg, checkpoint_dir, report_to)
    if isinstance(model, (str, Path)):
        from aesr1.policy.generation import load_policy

        model, _ = load_policy(model, training=cfg.mode)
    if cfg.freeze_vision:
        log.info("froze %d vision parameters", freeze_vision(model))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         peft_config=lora_config(cfg, model),
                         callbacks=[StepProgress(progress_name), *(callbacks or [])])
    quiet(trainer)
    trainer.train(resume_from_checkpoint=resume(trainer, checkpoint_dir, cfg.mode))
    return trainer
