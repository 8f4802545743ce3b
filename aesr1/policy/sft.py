"""The cold-start SFT stage: NLL on the AesCoT trajectories, then the starting entropy.

After training, the policy samples completions for held-out in-domain test images at
the RL temperature; their mean token entropy is the paper's "starting entropy" (Tab. 3),
reported with the format-valid rate and the PLCC/SRCC of the parsed scores.
"""

from __future__ import annotations

import logging
import math
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from aesr1.config import config
from aesr1.policy.data import sft_dataset
from aesr1.policy.generation import load_processor
from aesr1.policy.probe import HeldoutConfig, heldout_images, probe
from aesr1.policy.train import TrainConfig, fit
from aesr1.policy.trainer import finish, free_optimizer, parameter_counts, run_fingerprint, save_trained

if TYPE_CHECKING:  # the model code runs without MLflow too (benchmarks on a bare GPU machine)
    from aesr1.stage import Recorder

log = logging.getLogger(__name__)


@config
class SFTStageConfig:
    """Params section ``sft``."""

    model: str = "data/models/backbone"
    corpus: str = "data/aescot/corpus.parquet"
    test_manifest: str = "data/ingest/test.parquet"
    out_dir: str = "data/models/sft"
    checkpoint_root: str = "data/checkpoints"
    log_model: bool = True  # copy the saved model folder into the MLflow run
    keep_checkpoints: bool = False  # keep the last checkpoint after the run (a rerun of the same run resumes from it)
    train: TrainConfig = field(default_factory=TrainConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)


def sft(cfg: SFTStageConfig, recorder: Recorder) -> dict:
    corpus = pd.read_parquet(cfg.corpus)
    recorder.dataset(cfg.corpus, corpus, "training")
    processor = load_processor(cfg.model)
    dataset = sft_dataset(corpus, "trajectory")
    checkpoints = Path(cfg.checkpoint_root) / f"sft-{run_fingerprint(cfg, corpus)}"
    log.info("SFT of %s on %d trajectories (%s, %s epochs)", cfg.model, len(corpus), cfg.train.mode, cfg.train.epochs)
    trainer = fit(cfg.model, processor, dataset, cfg.train, checkpoints, report_to=["mlflow"])
    merge_into = cfg.model if cfg.train.mode == "lora" and cfg.train.merge_lora else None
    save_trained(trainer, processor, cfg.out_dir, base=merge_into, log_model=cfg.log_model)
    finish(checkpoints, keep=cfg.keep_checkpoints)  # they only served to resume a killed run

    free_optimizer(trainer)
    state = trainer.state
    probe_metrics, table = probe(trainer.model, processor, heldout_images(cfg.test_manifest, cfg.heldout),
                                 cfg.heldout)
    recorder.table("heldout_completions.json", table.head(50))
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    train_stats = next((h for h in reversed(state.log_history) if "train_runtime" in h), {})
    return {
        "train_samples": len(corpus),
        "steps": int(state.global_step),
        "resumed_from_step": trainer.resumed_from_step,  # 0: trained from the start
        **parameter_counts(trainer.model),  # a vision tower left unfrozen shows here
        "loss_first": losses[0] if losses else math.nan,
        "loss_last": losses[-1] if losses else math.nan,
        "train_runtime_s": train_stats.get("train_runtime", math.nan),
        "train_samples_per_second": train_stats.get("train_samples_per_second", math.nan),
        # after SFT the probe's entropy is the entropy RL starts from (the paper's Tab. 3)
        "starting_entropy": probe_metrics.pop("entropy"),
        **probe_metrics,
    }
