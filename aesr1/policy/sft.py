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

import numpy as np
import pandas as pd

from aesr1.config import config
from aesr1.metrics import correlations
from aesr1.policy.backbone import resolve_model
from aesr1.policy.data import sft_dataset
from aesr1.policy.generation import load_policy, sample
from aesr1.policy.train import TrainConfig, fit, run_fingerprint, save_policy
from aesr1.trajectory import parse_score

if TYPE_CHECKING:  # the model code runs without MLflow too (benchmarks on a bare GPU machine)
    from aesr1.stage import Recorder

log = logging.getLogger("aesr1.sft")


@config
class HeldoutConfig:
    """Sampling on held-out images after training (starting entropy, format, correlations)."""

    samples: int = 200
    datasets: list[str] = field(default_factory=lambda: ["ava", "tad66k", "flickr_aes"])
    temperature: float = 1.0  # the RL temperature
    max_new_tokens: int = 512
    batch_size: int = 32
    seed: int = 0


@config
class SFTStageConfig:
    """Params section ``sft``."""

    model: str = "data/models/backbone"
    corpus: str = "data/aescot/corpus.parquet"
    test_manifest: str = "data/ingest/test.parquet"
    out_dir: str = "data/models/sft"
    checkpoint_root: str = "data/checkpoints"
    log_model: bool = True  # copy the saved model folder into the MLflow run
    train: TrainConfig = field(default_factory=TrainConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)


def heldout_images(test_manifest: str, cfg: HeldoutConfig) -> pd.DataFrame:
    test = pd.read_parquet(test_manifest)
    pool = test[test.dataset.isin(cfg.datasets)].sort_values("image_id")
    return pool.sample(min(cfg.samples, len(pool)), random_state=cfg.seed)


def probe(model, processor, images: pd.DataFrame, cfg: HeldoutConfig) -> tuple[dict, pd.DataFrame]:
    """Sample one completion per image at the RL temperature: token entropy, format-valid rate, correlations."""
    sampled = sample(model, processor, list(images.image_path), n=1, temperature=cfg.temperature,
                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    preds = np.array([parse_score(t) for t in sampled.texts])
    metrics = {"entropy": sampled.entropy, "format_valid_rate": float(np.isfinite(preds).mean()),
               "heldout_images": len(images), **correlations(preds, images.score)}
    metrics.pop("n")
    table = images[["image_id", "score"]].assign(completion=sampled.texts, predicted=preds)
    return metrics, table


def sft(cfg: SFTStageConfig, recorder: Recorder) -> dict:
    corpus = pd.read_parquet(cfg.corpus)
    source = resolve_model(cfg.model)
    model, processor = load_policy(source)
    dataset = sft_dataset(corpus, "trajectory")
    checkpoints = Path(cfg.checkpoint_root) / f"sft-{run_fingerprint(cfg, len(corpus), corpus.image_id.iloc[0])}"
    log.info("SFT of %s on %d trajectories (%s, %s epochs)", source, len(corpus), cfg.train.mode, cfg.train.epochs)
    model, state = fit(model, processor, dataset, cfg.train, checkpoints, report_to=["mlflow"])
    save_policy(model, processor, cfg.out_dir, checkpoints, cfg.log_model)

    processor.tokenizer.padding_side = "left"
    probe_metrics, table = probe(model, processor, heldout_images(cfg.test_manifest, cfg.heldout), cfg.heldout)
    recorder.table("heldout_completions.json", table.head(50))
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    train_stats = next((h for h in reversed(state.log_history) if "train_runtime" in h), {})
    return {
        "train_samples": len(corpus),
        "loss_first": losses[0] if losses else math.nan,
        "loss_last": losses[-1] if losses else math.nan,
        "train_runtime_s": train_stats.get("train_runtime", math.nan),
        "train_samples_per_second": train_stats.get("train_samples_per_second", math.nan),
        # after SFT the probe's entropy is the entropy RL starts from (the paper's Tab. 3)
        "starting_entropy": probe_metrics.pop("entropy"),
        **probe_metrics,
    }
