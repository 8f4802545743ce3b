"""What a teacher returns for one sample, in a module of its own: both teachers build it, the distill stage reads it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Critique:
    """A teacher's answer for one sample: the critique, or the reason it failed."""

    key: str
    text: str | None = None
    error: str | None = None
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
