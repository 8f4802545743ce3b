"""RAPO rewards: the relative (ranking) and absolute (error) rewards, vectorised.

``pred`` is (N images, K samples) of parsed scores with NaN for an unparseable output;
``gt`` is (N,). For image i with parsed predictions, mu_i and sigma_i^2 are the mean and
unbiased variance of its parsed predictions (one parsed prediction: variance 0).

- pairwise probability  p_ik(j) = Phi((o_ik - mu_j) / sqrt(sigma_i^2 + sigma_j^2 + gamma))
- ranking reward        r_rank(o_ik) = mean over the other images j of
                        sqrt(p_c * p_ik(j) + e) + sqrt((1 - p_c) * (1 - p_ik(j)) + e)
                        with p_c = 1 if gt_i >= gt_j else 0 (``ties="ge"``, the reference) or
                        0.5 on ties (``ties="half"``, VisualQuality-R1), e = ``sqrt_eps``
- absolute reward       r_abs(o_ik) = exp(-0.5 * (|o_ik - gt_i| / sigma)^2) + eps

Unparseable outputs are never given a guessed score: they get 0 for both rewards (below
any parsed output's), and are left out of their image's mean and variance. An image whose
K outputs are all unparseable has no mean: its outputs get 0, and it is left out of the
other images' comparisons. An image with no other image to compare with gets a rank
reward of 0 for every output (no ranking signal).
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr


def group_stats(pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: mean, unbiased variance (0 with one parsed value) and whether any output parsed."""
    valid = np.isfinite(pred)
    count = valid.sum(axis=1)
    filled = np.where(valid, pred, 0.0)
    has = count > 0
    mean = np.where(has, filled.sum(axis=1) / np.maximum(count, 1), np.nan)
    sq = np.where(valid, (pred - mean[:, None]) ** 2, 0.0).sum(axis=1)
    var = np.where(count > 1, sq / np.maximum(count - 1, 1), 0.0)
    return mean, var, has


def rapo_rewards(pred, gt, *, sigma: float = 0.1, eps: float = 1e-5, gamma: float = 1e-6,
                 ties: str = "ge", sqrt_eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """(rank reward, absolute reward), each (N, K); see the module docstring."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.ndim != 2 or gt.shape != (pred.shape[0],):
        raise ValueError(f"pred must be (N, K) and gt (N,), got {pred.shape} and {gt.shape}")
    if ties not in ("ge", "half"):
        raise ValueError(f"ties must be 'ge' or 'half', got {ties!r}")
    valid = np.isfinite(pred)
    n = pred.shape[0]

    r_abs = np.where(valid, np.exp(-0.5 * ((np.where(valid, pred, 0.0) - gt[:, None]) / sigma) ** 2) + eps, 0.0)

    mean, var, has = group_stats(pred)
    # p_ik(j), shape (N, K, N)
    z = np.where(valid, pred, 0.0)[:, :, None] - np.nan_to_num(mean)[None, None, :]
    z /= np.sqrt(var[:, None, None] + var[None, None, :] + gamma)
    p = ndtr(z, out=z)
    if ties == "ge":
        # p_c is 0 or 1, so one of the two square roots is sqrt(e): one sqrt over the array suffices
        above = (gt[:, None] >= gt[None, :])[:, None, :]
        fidelity = np.sqrt(np.where(above, p, 1.0 - p) + sqrt_eps) + np.sqrt(sqrt_eps)
    else:
        pc = ((gt[:, None] > gt[None, :]) + 0.5 * (gt[:, None] == gt[None, :]))[:, None, :]
        fidelity = np.sqrt(pc * p + sqrt_eps) + np.sqrt((1 - pc) * (1 - p) + sqrt_eps)
    partners = ((~np.eye(n, dtype=bool)) & has[None, :]).astype(np.float64)  # j: another image with a mean
    count = partners.sum(axis=1)
    total = np.einsum("ikj,ij->ik", fidelity, partners)
    r_rank = np.where(valid & (count[:, None] > 0), total / np.maximum(count, 1)[:, None], 0.0)
    return r_rank, r_abs


def binary_reward(pred, gt, *, threshold: float = 0.0875) -> np.ndarray:
    """Q-Insight's binary score reward: 1 if |pred - gt| < threshold, else 0 (0 if unparseable)."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    return (np.isfinite(pred) & (np.abs(np.nan_to_num(pred, nan=np.inf) - gt[..., None]) < threshold)).astype(float)
