"""Stage configs: dataclasses validated by pydantic, read from one section of params.yaml."""

from __future__ import annotations

import copy
import dataclasses
import typing
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


SHARED = "aesr1.shared"  # field metadata: the dotted params key that holds this field's value


def shared(key: str, **default):
    """A config field whose value has its one home elsewhere in params (``key``, e.g. ``rl.grpo.temperature``
    for every probe's sampling temperature): :func:`load_section` fills it from there, and setting it in the
    section too is an error. ``default`` (``default=`` or ``default_factory=``) applies when ``key`` is unset."""
    return dataclasses.field(metadata={SHARED: key}, **default)


def shared_keys(cls: type, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], str]:
    """Field path within ``cls`` -> the params key it is read from, for every :func:`shared` field (nested too)."""
    found = {}
    if not dataclasses.is_dataclass(cls):
        return found
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if SHARED in f.metadata:
            found[(*prefix, f.name)] = f.metadata[SHARED]
        else:
            nested = next((c for c in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(c)),
                          None)
            if nested is not None:
                found.update(shared_keys(nested, (*prefix, f.name)))
    return found


def lookup(params: dict, key: str):
    """The value at a dotted key, or KeyError."""
    value = params
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def with_shared(path: str | Path, params: dict, section: str, cls: type, raw: dict) -> dict:
    """``raw`` with every :func:`shared` field of ``cls`` filled from its one home in ``params``."""
    raw = copy.deepcopy(raw)
    for field_path, key in shared_keys(cls).items():
        here = ".".join((section, *field_path))
        holder = raw
        for part in field_path[:-1]:
            holder = holder.setdefault(part, {})
            if not isinstance(holder, dict):
                break
        else:
            if field_path[-1] in holder:
                raise ParamsError(f"{source_of(path, params, here.split('.'))}: {here} is not set here: it is "
                                  f"{key}, one value for every place that uses it")
            try:
                holder[field_path[-1]] = lookup(params, key)
            except KeyError:
                pass
    return raw


def read_params(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of stage sections, got {type(data).__name__}")
    return data


RECIPES = Path("configs/recipes")
# ``recipe: <name>``: configs/recipes/<name>.yaml, with the params file merged over it (the file's values win);
# ``tiny`` (the default) is the embedded model's; ``custom``: no recipe, the params file's values for any backbone
TINY, CUSTOM = "tiny", "custom"
TRAINED = ("sft", "rl")  # the stages whose hyper-parameters depend on the backbone
RECIPE_SECTIONS = ("backbone", "sft", "rl", "evaluate")  # the sections a recipe sets keys of


def merged(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in, key by key in nested mappings."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipe_file(path: str | Path, params: dict) -> Path | None:
    """The recipe's file: beside the params file, else the project's (the stages run in its root)."""
    recipe = params.get("recipe") or TINY
    if recipe == CUSTOM:
        return None
    beside = Path(path).parent / RECIPES / f"{recipe}.yaml"
    return beside if beside.is_file() or not (RECIPES / f"{recipe}.yaml").is_file() else RECIPES / f"{recipe}.yaml"


def with_recipe(path: str | Path, params: dict, required: bool = True) -> dict:
    """The params file merged over its recipe: the recipe gives a backbone's values, the file overrides them.

    A missing recipe file is an error when ``required`` (a stage reading a section recipes set); else the
    params are returned as they are (a params file for the data stages alone needs no recipe beside it).
    """
    recipe = recipe_file(path, params)
    if recipe is None or not (required or recipe.is_file()):
        return params
    if not recipe.is_file():
        known = sorted(p.stem for p in recipe.parent.glob("*.yaml"))
        raise ParamsError(f"{path}: recipe '{params.get('recipe') or TINY}' has no file {recipe} (recipes: {known} "
                          f"or '{CUSTOM}')")
    return merged(yaml.safe_load(recipe.read_text()) or {}, params)


def check_recipe(path: str | Path, params: dict, section: str) -> None:
    backbone = (params.get("backbone") or {}).get("name_or_path", TINY)
    if section in TRAINED and (params.get("recipe") or TINY) == TINY and backbone != TINY:
        raise ParamsError(
            f"{path}: backbone.name_or_path is {backbone}, but the '{section}' hyper-parameters are the tiny "
            f"model's (recipe: {TINY}; e.g. SFT at lr 2e-3 would wreck a pretrained model). Select its recipe "
            f"in params.yaml, e.g. `recipe: qwen2.5-vl-7b` (configs/recipes/qwen2.5-vl-7b.yaml), or set "
            f"`recipe: {CUSTOM}` to train with params.yaml's values (and the sections' defaults) as they are")


def load_section(path: str | Path, section: str, cls: type[T]) -> T:
    """Parse ``section`` of the params file (over its recipe) into ``cls``; missing keys take the defaults."""
    params = with_recipe(path, read_params(path), required=section in RECIPE_SECTIONS)
    check_recipe(path, params, section)
    raw = with_shared(path, params, section, cls, params.get(section) or {})
    try:
        return TypeAdapter(cls).validate_python(raw)
    except ValidationError as err:
        problems = [describe(error, section, cls, source_of(path, params, [section, *map(str, error["loc"])]))
                    for error in err.errors()]
        raise ParamsError("\n".join(problems)) from None


def source_of(path: str | Path, params: dict, keys: list[str]) -> str:
    """The file a value came from: the params file when it sets that key, else the recipe when it does."""
    def sets(data: dict) -> bool:
        try:
            lookup(data, ".".join(keys))
        except KeyError:
            return False
        return True

    recipe = recipe_file(path, params)
    if recipe is not None and recipe.is_file() and not sets(read_params(path)) \
            and sets(yaml.safe_load(recipe.read_text()) or {}):
        return str(recipe)
    return str(path)


def settings_at(cls: type, loc: tuple) -> list[str]:
    """The setting names of the config class reached by following ``loc`` from ``cls`` (empty if none)."""
    for key in loc:
        if not dataclasses.is_dataclass(cls):
            return []
        hint = typing.get_type_hints(cls).get(str(key))
        candidates = [hint, *typing.get_args(hint)]  # a config, or an optional one
        cls = next((c for c in candidates if dataclasses.is_dataclass(c)), None)
    return [f.name for f in dataclasses.fields(cls)] if cls is not None and dataclasses.is_dataclass(cls) else []


def describe(error: dict, section: str, cls: type, source: str) -> str:
    """One pydantic error as a person acts on it: the file, the dotted key, and what to write instead."""
    import difflib

    loc = tuple(error["loc"])
    key = ".".join([section, *map(str, loc)])
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        valid = settings_at(cls, loc[:-1])
        near = difflib.get_close_matches(str(loc[-1]), valid, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(near)}?" if near else f"the settings there: {', '.join(valid)}"
        return f"{source}: {key} is not a setting; {hint}"
    given = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
    return f"{source}: {key}: {error['msg']}{given}"


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
