"""The policy's prompt and its datasets: the same conversation for SFT, RL, evaluation and inference."""

from __future__ import annotations

from functools import lru_cache

import pandas as pd
from datasets import Dataset, Features, Image, List, Value

from aesr1.prompts import template


@lru_cache(maxsize=None)
def policy_prompt() -> str:
    """The one policy prompt (``templates/policy_prompt.txt``): critique, then a score on [0, 1]."""
    return template("policy_prompt.txt").strip()


def prompt_messages(text: str | None = None) -> list[dict]:
    """A user turn with one image and the prompt text (the policy prompt by default)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text or policy_prompt()}]}]


def completion_messages(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


_MESSAGE = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
_IMAGES = List(Image(mode="RGB"))


def sft_dataset(frame: pd.DataFrame, target_column: str, prompt_text: str | None = None) -> Dataset:
    """Prompt-completion conversations with one image each; the loss falls on the completion only."""
    rows = {
        "prompt": [prompt_messages(prompt_text)] * len(frame),
        "completion": [completion_messages(t) for t in frame[target_column]],
        "images": [[path] for path in frame["image_path"]],
    }
    features = Features({"prompt": _MESSAGE, "completion": _MESSAGE, "images": _IMAGES})
    return Dataset.from_dict(rows, features=features)


def prompt_dataset(frame: pd.DataFrame, columns: dict[str, tuple[list, Value]]) -> Dataset:
    """Policy prompts with one image each for the policy to complete (RL), plus ``columns``: name -> (values,
    feature)."""
    rows = {"prompt": [prompt_messages()] * len(frame), "images": [[path] for path in frame["image_path"]]}
    features = {"prompt": _MESSAGE, "images": _IMAGES}
    for name, (values, feature) in columns.items():
        rows[name], features[name] = values, feature
    return Dataset.from_dict(rows, features=Features(features))
