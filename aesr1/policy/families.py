"""What differs between the VLM families the policy can be: one home for it.

Every stage handles a model the same way once three things are known, and each is read
off the model itself rather than from a list of module names:

- the **language model**: ``model.get_decoder()`` (Qwen's ``language_model``, SmolVLM's ``text_model``);
- the **vision side**: the module built from ``config.vision_config`` (the tower) and every other
  sub-module of the multimodal base beside the language model (Gemma 3's ``multi_modal_projector``,
  SmolVLM's ``connector``; Qwen's merger sits inside its tower). The reference freezes both;
- the **image budget**, in the processor's own terms (:class:`Family`).

A model whose family is not in :data:`FAMILIES`, or whose parts cannot be found, is refused by name
(:class:`UnsupportedFamily`) before anything trains: a tower left unfrozen without a word is the failure
this module exists to prevent.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from aesr1.errors import AesError
from aesr1.images import set_pixel_budget

# the projections LoRA adapts, in the language model only (every tower here has MLPs with the same names)
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnsupportedFamily(AesError):
    """A backbone this project cannot train as a policy, with what is missing."""


@dataclass(frozen=True)
class Family:
    """One VLM family: how its processor sizes images, and the chat template the policy trains and samples with.

    ``budget`` is the processor's own way of bounding an image's visual tokens:
    ``pixels`` (Qwen: every image resized into [min_pixels, max_pixels]), ``fixed`` (Gemma 3: every image
    resized to one square, a fixed token count), ``tiles`` (SmolVLM: the long side resized to a multiple of
    the tile size, one tile's tokens per tile plus a global view).

    ``chat_template`` is a file of trl's ``chat_templates`` that the tiny testbed is built with. A real backbone
    keeps its own template unless ``own_template_works`` is False: Qwen3.5's templates move a ``<think>`` block
    out of the assistant's text and render it anew, so a prompt is not the start of prompt + completion (trl
    then trains on a different prompt than the policy samples from); the policy's completion carries its own
    ``<think>`` block, so the backbone stage saves Qwen3-VL's template (the same tokens, the assistant's text
    kept verbatim) with such a model's processor.
    """

    model_type: str
    name: str
    chat_template: str
    budget: Literal["pixels", "fixed", "tiles"]
    own_template_works: bool = True


FAMILIES = {f.model_type: f for f in (
    Family("qwen2_5_vl", "Qwen2.5-VL", "qwen2_5_vl.jinja", "pixels"),
    Family("qwen3_vl", "Qwen3-VL", "qwen3_vl.jinja", "pixels"),
    Family("qwen3_5", "Qwen3.5", "qwen3_vl.jinja", "pixels", own_template_works=False),
    Family("gemma3", "Gemma 3", "gemma3.jinja", "fixed"),
    Family("smolvlm", "SmolVLM", "smolvlm.jinja", "tiles"),
)}


def family(model_type: str) -> Family:
    """The :class:`Family` of a transformers ``model_type``; :class:`UnsupportedFamily` names it otherwise."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedFamily(
            f"backbone family {model_type!r} is not supported as a policy (supported: {', '.join(FAMILIES)}): "
            f"aesr1.policy.families has no image budget or vision-tower rule for it") from None


@dataclass(frozen=True)
class Parts:
    """Module names: the language model, the vision tower, the projector(s) between them (may be none)."""

    language_model: str
    vision_tower: str
    projectors: tuple[str, ...]

    @property
    def vision(self) -> tuple[str, ...]:
        return (self.vision_tower, *self.projectors)


def parts(model) -> Parts:
    """The language model, vision tower and projectors of ``model`` (a peft wrapper is looked through)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    vision_config = getattr(config, "vision_config", None)
    if vision_config is None:
        raise UnsupportedFamily(f"backbone family {model_type!r}: its config has no vision_config (not a VLM?)")
    names = {id(module): name for name, module in model.named_modules()}
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        decoder = None
    if decoder is None or id(decoder) not in names:
        raise UnsupportedFamily(f"backbone family {model_type!r}: get_decoder() gives no language model")
    towers = [name for name, module in model.named_modules()
              if getattr(module, "config", None) is vision_config and name]
    if not towers:
        raise UnsupportedFamily(f"backbone family {model_type!r}: no module is built from config.vision_config")
    language, tower = names[id(decoder)], min(towers, key=len)
    base = language.rpartition(".")[0]
    if tower.rpartition(".")[0] != base:
        raise UnsupportedFamily(f"backbone family {model_type!r}: its vision tower ({tower}) and language model "
                                f"({language}) are not siblings, so its projector cannot be told apart")
    parent = model.get_submodule(base) if base else model
    projectors = tuple(f"{base}.{child}" if base else child for child, module in parent.named_children()
                       if module is not decoder and f"{base}.{child}".lstrip(".") != tower
                       and any(True for _ in module.parameters()))
    return Parts(language, tower, projectors)


def check_model(config) -> Parts:
    """The :class:`Parts` of the model ``config`` builds (on the meta device: no memory, no weights), or
    :class:`UnsupportedFamily` naming its family and what is missing."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    family(config.model_type)
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    return parts(model)


def lora_targets(model) -> str:
    """peft's ``target_modules`` regex: :data:`LORA_PROJECTIONS` inside the language model alone."""
    language = re.escape(parts(model).language_model)
    projections = "|".join(LORA_PROJECTIONS)
    return rf"(.*\.)?{language}\..*\.({projections})"


def vision_modules(model) -> list:
    """The tower and projector modules of ``model``."""
    return [model.get_submodule(name) for name in parts(model).vision]


def trl_chat_template(name: str) -> str:
    from importlib import resources

    return resources.files("trl").joinpath("chat_templates", name).read_text()


def set_image_budget(processor, model_type: str, min_pixels: int | None, max_pixels: int | None):
    """``processor`` made to read every image within the budget, in its family's terms; it is saved with the
    model, so every path that loads the model reads images alike. None keeps the processor's own.

    pixels (Qwen): size = {shortest_edge: min_pixels, longest_edge: max_pixels}. tiles (SmolVLM): the long
    side a whole number of tiles within ``max_pixels`` (at least one). fixed (Gemma 3): the processor's square
    is the budget; another ``max_pixels`` is refused (its token count is fixed by the model).
    """
    kind, images = family(model_type).budget, processor.image_processor
    if kind == "pixels":
        set_pixel_budget(processor, min_pixels, max_pixels or images.size["longest_edge"])
    elif kind == "tiles" and max_pixels is not None:
        tile = images.max_image_size["longest_edge"]
        images.size = {"longest_edge": tile * max(1, math.isqrt(max_pixels) // tile)}
    elif kind == "fixed" and max_pixels is not None and max_pixels != image_pixels(processor, model_type):
        raise UnsupportedFamily(
            f"{family(model_type).name} reads every image at {images.size['height']} x {images.size['width']} "
            f"pixels (a fixed number of visual tokens): backbone.max_pixels {max_pixels} cannot apply (set null)")
    return processor


def image_pixels(processor, model_type: str) -> int:
    """The most pixels of one image the processor passes to the model (a tiled family: all its tiles)."""
    kind, size = family(model_type).budget, processor.image_processor.size
    if kind == "pixels":
        return size["longest_edge"]
    if kind == "fixed":
        return size["height"] * size["width"]
    return size["longest_edge"] ** 2
