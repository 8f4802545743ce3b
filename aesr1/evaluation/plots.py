"""The evaluation's figures: predicted vs MOS, score histograms, and the RL curves for DVC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _figure(panels: int, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.2), squeeze=False)
    fig.suptitle(title)
    return plt, fig, axes[0]


def scatter_plot(predictions: pd.DataFrame, metrics: dict, test_sets: list[str], path: Path, model: str) -> None:
    """Predicted score against the true (normalised MOS) score, one panel per test set."""
    sets = [t for t in test_sets if t in set(predictions.dataset)]
    plt, fig, axes = _figure(len(sets), f"{model}: predicted vs true score")
    for ax, name in zip(axes, sets):
        rows = predictions[predictions.dataset == name]
        ax.scatter(rows.score, rows.predicted, s=6, alpha=0.5)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
        m = metrics.get(name, {})
        ax.set_title(f"{name}\nPLCC {m.get('plcc', np.nan):.2f}  SRCC {m.get('srcc', np.nan):.2f}", fontsize=9)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        ax.set_xlabel("true")
    axes[0].set_ylabel("predicted (parsed)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def histogram_plot(predictions: pd.DataFrame, test_sets: list[str], path: Path, model: str) -> None:
    """Distributions of predicted and true scores (the peak mismatch scalar rewards cause)."""
    sets = [t for t in test_sets if t in set(predictions.dataset)]
    plt, fig, axes = _figure(len(sets), f"{model}: score distributions")
    bins = np.linspace(0, 1, 21)
    for ax, name in zip(axes, sets):
        rows = predictions[predictions.dataset == name]
        ax.hist(rows.score, bins=bins, alpha=0.5, label="true", density=True)
        if rows.predicted.notna().any():
            ax.hist(rows.predicted.dropna(), bins=bins, alpha=0.5, label="predicted", density=True)
        ax.set_title(name, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


CURVE_COLUMNS = {"reward": "reward", "entropy": "entropy", "kl": "kl",
                 "rewards/rank_reward/mean": "rank_reward", "rewards/absolute_reward/mean": "absolute_reward",
                 "unparseable_rate": "unparseable_rate"}


def history_curves(history: pd.DataFrame) -> pd.DataFrame:
    """The RL reward and entropy per generation step (rows where rewards were logged), for ``dvc plots``."""
    present = {k: v for k, v in CURVE_COLUMNS.items() if k in history.columns}
    rows = history.dropna(subset=["reward"]) if "reward" in history.columns else history
    return rows[["step", *present]].rename(columns=present)
