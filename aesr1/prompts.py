"""The prompt templates shipped in ``aesr1/templates``: read by the teachers and the policy alike."""

from __future__ import annotations

import hashlib
from importlib import resources


def template(name: str) -> str:
    return resources.files("aesr1").joinpath("templates", name).read_text()


def prompt_id(*names: str) -> str:
    """Names and content hash of the prompt templates, e.g. ``teacher_system+teacher_user@3f2a9c1b``."""
    digest = hashlib.sha256("\0".join(template(n) for n in names).encode()).hexdigest()[:12]
    return "+".join(n.removesuffix(".txt") for n in names) + "@" + digest
