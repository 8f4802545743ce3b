"""The policy's output format, defined once and used by distillation, SFT, RL and evaluation.

A trajectory is ``<think>CRITIQUE</think><answer>SCORE</answer>`` with SCORE a decimal on
[0, 1] written with two digits (``0.62``). This is the reference code's format; the
format reward accepts whitespace between the two blocks.

Score bands set the tone of a distilled critique: bad [0, 0.4), fair [0.4, 0.7),
good [0.7, 1]. The band is shown to the teacher; the number never is.
"""

from __future__ import annotations

import math
import re

FORMAT_PATTERN = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
_NUMBER = re.compile(r"^\s*([01](?:\.\d+)?|\.\d+)\s*$")

BANDS = (("bad", 0.0, 0.4), ("fair", 0.4, 0.7), ("good", 0.7, 1.0))


def format_score(score: float) -> str:
    return f"{score:.2f}"


def make_trajectory(critique: str, score: float) -> str:
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"score {score} outside [0, 1]")
    return f"<think>{critique.strip()}</think><answer>{format_score(score)}</answer>"


def split_trajectory(text: str) -> tuple[str, str] | None:
    """(critique, answer text) if ``text`` is in the format, else None."""
    match = FORMAT_PATTERN.match(text)
    return (match.group(1).strip(), match.group(2)) if match else None


def parse_score(text: str) -> float:
    """The score of a completion, or NaN if the format is broken or the answer is not a number in [0, 1].

    Never a guess: an unparseable output is NaN and must be handled by the caller.
    """
    parts = split_trajectory(text)
    if parts is None:
        return math.nan
    match = _NUMBER.match(parts[1])
    if not match:
        return math.nan
    value = float(match.group(1))
    return value if 0.0 <= value <= 1.0 else math.nan


def band_of(score: float) -> str:
    for name, low, high in BANDS:
        if low <= score < high or (name == "good" and score == high):
            return name
    raise ValueError(f"score {score} outside [0, 1]")
