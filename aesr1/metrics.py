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
