"""Correlation metrics between predicted and ground-truth scores (scipy)."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def correlations(pred, truth) -> dict[str, float]:
    """PLCC and SRCC over the pairs where the prediction is a number; NaN when undefined.

    Undefined means fewer than 3 parsed pairs, or a constant prediction (no ranking at all).
    """
    pred, truth = np.asarray(pred, float), np.asarray(truth, float)
    ok = np.isfinite(pred) & np.isfinite(truth)
    if ok.sum() < 3 or np.ptp(pred[ok]) == 0 or np.ptp(truth[ok]) == 0:
        return {"plcc": math.nan, "srcc": math.nan, "n": int(ok.sum())}
    return {"plcc": float(stats.pearsonr(pred[ok], truth[ok])[0]),
            "srcc": float(stats.spearmanr(pred[ok], truth[ok])[0]), "n": int(ok.sum())}


def resample_indices(n: int, replicates: int, key: str) -> np.ndarray:
    """(replicates, n) bootstrap indices, the same for every model given the same ``key`` (paired comparisons)."""
    seed = int.from_bytes(key.encode()[:8].ljust(8, b"\0"), "little")
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    denominator = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    return np.divide((x * y).sum(axis=1), denominator, out=np.zeros(len(x)), where=denominator > 0)


def bootstrap_correlations(pred, truth, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PLCC and SRCC on each bootstrap resample (a row of ``indices``) of finite ``pred``/``truth`` pairs.

    A resample where either side is constant has no ranking: it counts 0, as the
    evaluation's unparseable rule does for a constant model.
    """
    pred, truth = np.asarray(pred, float)[indices], np.asarray(truth, float)[indices]
    plcc = _rowwise_pearson(pred, truth)
    srcc = _rowwise_pearson(stats.rankdata(pred, axis=1), stats.rankdata(truth, axis=1))
    return plcc, srcc
