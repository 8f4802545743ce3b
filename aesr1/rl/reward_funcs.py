"""trl reward functions over the RAPO core: module-level classes chosen by name from one registry.

Each is called by trl's GRPOTrainer as ``fn(prompts, completions, completion_ids, image_id=..., score=..., ...)``
on a process's local batch. Completions are grouped by the ``image_id`` column, never by
row order. The rank reward first gathers the batch of every process (when training on
several), ranks the whole global batch, and returns this process's slice.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from aesr1 import distributed
from aesr1.config import config
from aesr1.errors import AesError
from aesr1.rl.rewards import binary_reward, rapo_rewards
from aesr1.trajectory import BANDS, FORMAT_PATTERN, band_of, parse_score


def completion_text(completion) -> str:
    """The text of a completion: plain, or conversational (messages, as lists or as arrays read back from parquet)."""
    if isinstance(completion, str):
        return completion
    return "".join(part if isinstance(part, str) else (part.get("text") or "")
                   for message in completion for part in (
                       [message["content"]] if isinstance(message["content"], str) else message["content"]))


def group(image_ids: list, values: list[float]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A (N images, K) matrix of values grouped by image id (NaN-padded), and each row's (image, slot)."""
    order: dict = {}
    slots: list[tuple[int, int]] = []
    counts: list[int] = []
    for image_id in image_ids:
        if image_id not in order:
            order[image_id] = len(order)
            counts.append(0)
        i = order[image_id]
        slots.append((i, counts[i]))
        counts[i] += 1
    matrix = np.full((len(order), max(counts, default=0)), np.nan)
    for (i, k), value in zip(slots, values):
        matrix[i, k] = value
    return matrix, slots


def _ground_truth(image_ids: list, scores: list[float], n: int) -> np.ndarray:
    gt = np.full(n, np.nan)
    order: dict = {}
    for image_id, score in zip(image_ids, scores):
        order.setdefault(image_id, len(order))
        gt[order[image_id]] = score
    return gt


def _gather(items: list) -> tuple[list, int]:
    """Every process's items, concatenated in rank order, and where this process's start."""
    parts = distributed.gather([items])  # one list per process
    offset = sum(len(part) for part in parts[: distributed.rank()])
    return [item for part in parts for item in part], offset


def parsed_scores(completions) -> list[float]:
    return [parse_score(completion_text(c).strip()) for c in completions]


def score_health(image_ids: list, preds: list[float]) -> dict[str, float]:
    """How the sampled scores spread: the unparseable rate, each band's share of the parsed
    scores, and the spread of scores between images (of their group means) and within them.

    A collapse toward the middle shows here while it happens: the fair share rises and the
    spread between images shrinks.
    """
    parsed = [p for p in preds if math.isfinite(p)]
    health = {"unparseable_rate": 1.0 - len(parsed) / len(preds) if preds else math.nan}
    for band, _, _ in BANDS:
        health[f"band_share/{band}"] = (sum(band_of(p) == band for p in parsed) / len(parsed)) if parsed else math.nan
    matrix, _ = group(image_ids, preds)
    means = np.array([np.nanmean(row) for row in matrix if np.isfinite(row).any()])
    spreads = [np.nanstd(row) for row in matrix if np.isfinite(row).sum() > 1]
    health["score_std_between_images"] = float(np.std(means)) if len(means) > 1 else math.nan
    health["score_std_within_images"] = float(np.mean(spreads)) if spreads else math.nan
    return health


@config
class RewardConfig:
    """Params section ``rl.rewards``: which rewards (a mode of REWARD_MODES) and their constants."""

    mode: str = "error+rank"
    relative_weight: float = 0.5  # the paper's best relative:absolute is 0.5:0.5
    absolute_weight: float = 0.5
    format_weight: float = 1.0
    sigma: float = 0.1
    eps: float = 1e-5
    gamma: float = 1e-6
    ties: Literal["ge", "half"] = "ge"
    binary_threshold: float = 0.0875  # Q-Insight's 0.35 on a 1-5 scale, on [0, 1]

    def __post_init__(self):
        if self.mode not in REWARD_MODES:
            raise ValueError(f"reward mode must be one of {list(REWARD_MODES)}, got {self.mode!r}")


class RewardFunction:
    """A trl reward function: called on a process's local batch, named by ``__name__`` in trl's logs.

    Module-level classes (not closures) so that a configured reward pickles, as trl's own do.
    """

    __name__ = "reward"

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg

    def __call__(self, prompts, completions, image_id, score, **kwargs) -> list[float]:
        raise NotImplementedError


class RankReward(RewardFunction):
    """RAPO's relative reward: the rank agreement of each score over the global batch (all processes)."""

    __name__ = "rank_reward"

    def __call__(self, prompts, completions, image_id, score, **_):
        c = self.cfg
        rows, offset = _gather(list(zip(image_id, parsed_scores(completions), score)))
        ids, all_preds, all_scores = zip(*rows)
        matrix, slots = group(list(ids), list(all_preds))
        rank, _ = rapo_rewards(matrix, _ground_truth(list(ids), list(all_scores), len(matrix)),
                               sigma=c.sigma, eps=c.eps, gamma=c.gamma, ties=c.ties)
        return [float(rank[i, k]) for i, k in slots[offset:offset + len(completions)]]


class AbsoluteReward(RewardFunction):
    """RAPO's absolute reward: a Gaussian of the score's error, per image group."""

    __name__ = "absolute_reward"

    def __call__(self, prompts, completions, image_id, score, **_):
        c = self.cfg
        matrix, slots = group(image_id, parsed_scores(completions))
        _, absolute = rapo_rewards(matrix, _ground_truth(image_id, score, len(matrix)),
                                   sigma=c.sigma, eps=c.eps, gamma=c.gamma, ties=c.ties)
        return [float(absolute[i, k]) for i, k in slots]


class BinaryReward(RewardFunction):
    """1 when the score is within a threshold of the truth (Q-Insight's reward), else 0."""

    __name__ = "binary_reward"

    def __call__(self, prompts, completions, image_id, score, **_):
        preds = parsed_scores(completions)
        return [float(binary_reward(np.array([[p]]), np.array([s]), threshold=self.cfg.binary_threshold)[0, 0])
                for p, s in zip(preds, score)]


class FormatReward(RewardFunction):
    """The reference's format check; every mode has it, so it also logs the scores' health once a batch."""

    __name__ = "format_reward"

    def __call__(self, prompts, completions, image_id=None, log_metric=None, **_):
        if log_metric is not None and image_id is not None:
            for name, value in score_health(list(image_id), parsed_scores(completions)).items():
                if math.isfinite(value):
                    log_metric(name, value)
        return [1.0 if FORMAT_PATTERN.match(completion_text(c).strip()) else 0.0 for c in completions]


REWARDS: dict[str, type[RewardFunction]] = {
    "rank": RankReward, "absolute": AbsoluteReward, "binary": BinaryReward, "format": FormatReward}

# One row per reward mode: (relative reward, absolute reward) from REWARDS, weighted by
# relative_weight / absolute_weight; the format reward is always added. The rl stage, the
# reward ablation and params validation all read this table.
REWARD_MODES: dict[str, tuple[str | None, str | None]] = {
    "binary": (None, "binary"),
    "error": (None, "absolute"),
    "rank": ("rank", None),
    "binary+rank": ("rank", "binary"),
    "error+rank": ("rank", "absolute"),  # RAPO
}


def make_reward_funcs(names: list[str], cfg: RewardConfig | None = None) -> list[RewardFunction]:
    """The reward functions named in ``names`` (keys of REWARDS), configured by ``cfg``."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise AesError(f"unknown reward functions {unknown}; known: {sorted(REWARDS)}")
    cfg = cfg or RewardConfig()
    return [REWARDS[n](cfg) for n in names]


def rewards_for_mode(cfg: RewardConfig) -> tuple[list[str], list[float]]:
    """Reward function names and trl reward weights for the config's mode (format always included;
    the mode was checked against REWARD_MODES when the config was built)."""
    relative, absolute = REWARD_MODES[cfg.mode]
    names, weights = [], []
    if relative:
        names.append(relative)
        weights.append(cfg.relative_weight if absolute else 1.0)
    if absolute:
        names.append(absolute)
        weights.append(cfg.absolute_weight if relative else 1.0)
    names.append("format")
    weights.append(cfg.format_weight)
    return names, weights
