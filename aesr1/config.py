"""Stage configs: dataclasses validated by pydantic, read from one section of params.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from aesr1.errors import AesError

T = TypeVar("T")

# Unknown keys are an error: a typo in params.yaml must not be silently ignored.
config = _pydantic_dataclass(config=ConfigDict(extra="forbid"))


class ParamsError(AesError):
    """params.yaml is missing, unreadable, or a section does not match its config."""


def read_params(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of stage sections, got {type(data).__name__}")
    return data


def load_section(path: str | Path, section: str, cls: type[T]) -> T:
    """Parse ``section`` of the params file into ``cls``; missing keys take the defaults."""
    raw = read_params(path).get(section) or {}
    try:
        return TypeAdapter(cls).validate_python(raw)
    except ValidationError as err:
        raise ParamsError(f"{path}: section '{section}' is invalid:\n{err}") from None


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Flatten nested mappings to dotted keys (for MLflow params)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
