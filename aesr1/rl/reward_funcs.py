"""trl reward functions over the RAPO core, chosen by name from a registry.

Each is called by trl's GRPOTrainer as ``fn(prompts, completions, completion_ids, image_id=..., score=..., ...)``
on a process's local batch. Completions are grouped by the ``image_id`` column, never by
row order. The rank reward first gathers the batch of every process (when training on
several), ranks the whole global batch, and returns this process's slice.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import numpy as np

from aesr1.rl.rewards import binary_reward, rapo_rewards
from aesr1.trajectory import BANDS, band_of, parse_score

# the reference's format check: the whole output is a think block then an answer block
FORMAT = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$", re.DOTALL)


def completion_text(completion) -> str:
    """The text of a completion, conversational (a list of messages) or plain."""
    if isinstance(completion, list):
        return "".join(part if isinstance(part, str) else part.get("text", "")
                       for message in completion for part in (
                           [message["content"]] if isinstance(message["content"], str) else message["content"]))
    return completion


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
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items, 0
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, items)
    offset = sum(len(part) for part in everyone[: dist.get_rank()])
    return [item for part in everyone for item in part], offset


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


def make_reward_funcs(names: list[str], *, sigma: float = 0.1, eps: float = 1e-5, gamma: float = 1e-6,
                      ties: str = "ge", binary_threshold: float = 0.0875) -> list[Callable]:
    """The reward functions named in ``names`` (rank, absolute, binary, format), configured."""

    def rank_reward(prompts, completions, image_id, score, **_):
        preds = parsed_scores(completions)
        rows, offset = _gather(list(zip(image_id, preds, score)))
        ids, all_preds, all_scores = zip(*rows)
        matrix, slots = group(list(ids), list(all_preds))
        rank, _ = rapo_rewards(matrix, _ground_truth(list(ids), list(all_scores), len(matrix)),
                               sigma=sigma, eps=eps, gamma=gamma, ties=ties)
        return [float(rank[i, k]) for i, k in slots[offset:offset + len(completions)]]

    def absolute_reward(prompts, completions, image_id, score, **_):
        preds = parsed_scores(completions)
        matrix, slots = group(image_id, preds)
        _, absolute = rapo_rewards(matrix, _ground_truth(image_id, score, len(matrix)),
                                   sigma=sigma, eps=eps, gamma=gamma, ties=ties)
        return [float(absolute[i, k]) for i, k in slots]

    def binary_reward_fn(prompts, completions, image_id, score, **_):
        preds = parsed_scores(completions)
        return [float(binary_reward(np.array([[p]]), np.array([s]), threshold=binary_threshold)[0, 0])
                for p, s in zip(preds, score)]

    def format_reward(prompts, completions, image_id=None, log_metric=None, **_):
        """The reference's format check; every mode has it, so it also logs the scores' health once a batch."""
        if log_metric is not None and image_id is not None:
            for name, value in score_health(list(image_id), parsed_scores(completions)).items():
                if math.isfinite(value):
                    log_metric(name, value)
        return [1.0 if FORMAT.match(completion_text(c).strip()) else 0.0 for c in completions]

    binary_reward_fn.__name__ = "binary_reward"
    registry = {"rank": rank_reward, "absolute": absolute_reward, "binary": binary_reward_fn,
                "format": format_reward}
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown reward functions {unknown}; known: {sorted(registry)}")
    return [registry[n] for n in names]


REWARD_MODES = {
    # mode -> (relative reward, absolute reward); each weighted by relative_weight / absolute_weight
    "binary": (None, "binary"),
    "error": (None, "absolute"),
    "rank": ("rank", None),
    "binary+rank": ("rank", "binary"),
    "error+rank": ("rank", "absolute"),
}


def rewards_for_mode(mode: str, relative_weight: float = 0.5, absolute_weight: float = 0.5,
                     format_weight: float = 1.0) -> tuple[list[str], list[float]]:
    """Reward function names and trl reward weights for a reward mode (format always included)."""
    if mode not in REWARD_MODES:
        raise ValueError(f"reward mode must be one of {sorted(REWARD_MODES)}, got {mode!r}")
    relative, absolute = REWARD_MODES[mode]
    names, weights = [], []
    if relative:
        names.append(relative)
        weights.append(relative_weight if absolute else 1.0)
    if absolute:
        names.append(absolute)
        weights.append(absolute_weight if relative else 1.0)
    names.append("format")
    weights.append(format_weight)
    return names, weights
