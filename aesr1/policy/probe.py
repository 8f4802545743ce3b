"""The held-out probe after SFT and after RL: sample held-out images at the RL temperature.

Its mean token entropy after SFT is the paper's "starting entropy" (Tab. 3); it also reports
the format-valid rate and the correlations of the parsed scores, so SFT and RL compare directly.
"""

from __future__ import annotations

from dataclasses import field

import numpy as np
import pandas as pd

from aesr1.config import config, shared
from aesr1.metrics import correlations
from aesr1.policy.generation import sample
from aesr1.trajectory import parse_score


@config
class HeldoutConfig:
    """Sampling on held-out images after training (starting entropy, format, correlations)."""

    samples: int = 200
    datasets: list[str] = field(default_factory=lambda: ["ava", "tad66k", "flickr_aes"])
    temperature: float = shared("rl.grpo.temperature", default=1.0)  # the RL rollouts' temperature
    max_new_tokens: int = 512
    batch_size: int = 32
    seed: int = 0


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
