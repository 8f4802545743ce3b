"""The backbone stage: a real VLM (hub id or folder) as is, or the tiny testbed of a VLM family.

``tiny`` builds the same model class as the paper's backbone from a small config
(:mod:`aesr1.backbone.tiny`), then gives it a short generic vision-language pretraining on
AesSynth images with *descriptive* targets (:mod:`aesr1.backbone.pretrain`). It then plays
the part of a pretrained MLLM that has never learned aesthetics. It is saved with
``save_pretrained``, so later stages load it exactly like a downloaded model.

For a real backbone nothing is built or copied: the stage checks that the model's config
and processor load, that its family is one the policy code handles (:mod:`aesr1.policy.families`:
its vision tower and projector found, else it stops naming what is missing), and writes
``backbone.json`` pointing at it (``aesr1.policy.generation.resolve_model``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING

from aesr1.backbone.pretrain import DESCRIBE_PROMPT, PretrainConfig, pretraining_images
from aesr1.backbone.tiny import TinyModelConfig, build_tiny
from aesr1.config import config
from aesr1.images import MAX_PIXELS
from aesr1.policy.data import sft_dataset
from aesr1.policy.families import check_model, family, set_image_budget, trl_chat_template
from aesr1.policy.generation import POINTER
from aesr1.policy.train import fit
from aesr1.policy.trainer import finish, run_fingerprint, save_trained

if TYPE_CHECKING:  # the model code runs without MLflow too (benchmarks on a bare GPU machine)
    from aesr1.stage import Recorder

log = logging.getLogger(__name__)


@config
class BackboneConfig:
    """Params section ``backbone``."""

    name_or_path: str = "tiny"
    out_dir: str = "data/models/backbone"
    checkpoint_root: str = "data/checkpoints"
    # the pixel budget of every image the policy sees (SFT, RL, evaluation, inference), saved with its processor
    min_pixels: int | None = None  # None: the model's own (Qwen2.5-VL: 3136; the tiny model: one visual token)
    max_pixels: int | None = None  # None: the model's trained budget (:func:`pixel_budget`)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


def pixel_budget(cfg: BackboneConfig, model_type: str | None = None) -> int | None:
    """The most pixels of an image the policy sees: ``max_pixels``, or (None) what the model was trained on.

    The tiny model is pretrained on ``tiny.image_size`` x ``tiny.image_size`` images only, so its budget
    is that many pixels: a photo of any size is read at about that size, with the visual tokens it was
    trained on (64 x 64: 16 tokens at patch 8, 2 x 2 merged), not hundreds it never saw. A real backbone of
    a pixel-budget family (Qwen; ``model_type`` None: one of them) gets the reference's
    :data:`aesr1.images.MAX_PIXELS` (~315 Qwen2.5-VL tokens); of another family, None: its processor's own
    (Gemma 3's fixed square, SmolVLM's tiles).
    """
    if cfg.max_pixels is not None:
        return cfg.max_pixels
    if cfg.name_or_path == "tiny":
        return cfg.tiny.image_size ** 2
    return MAX_PIXELS if model_type is None or family(model_type).budget == "pixels" else None


def with_pixel_budget(processor, cfg: BackboneConfig, model_type: str | None = None):
    """``processor`` set to the backbone's budget (``min_pixels``, :func:`pixel_budget`) in its family's terms
    (:func:`aesr1.policy.families.set_image_budget`), as the stage saves it; ``model_type`` is the real
    backbone's (the tiny one's is ``tiny.family``)."""
    if cfg.name_or_path == "tiny":
        model_type = cfg.tiny.family
    elif model_type is None:
        raise ValueError("with_pixel_budget: a real backbone's model_type is needed")
    budget, trained = pixel_budget(cfg, model_type), cfg.tiny.image_size ** 2
    if cfg.name_or_path == "tiny" and budget > trained:
        log.warning("backbone.max_pixels %d is above the %d pixels of the tiny model's %d x %d training images: "
                    "larger images get more visual tokens than it was trained on (null: its trained budget)",
                    budget, trained, cfg.tiny.image_size, cfg.tiny.image_size)
    return set_image_budget(processor, model_type, cfg.min_pixels, budget)


def policy_processor(processor, cfg: BackboneConfig, model_type: str):
    """A real backbone's processor as the policy uses it: at the backbone's pixel budget, with the family's chat
    template where the model's own does not work for the policy (:class:`aesr1.policy.families.Family`)."""
    with_pixel_budget(processor, cfg, model_type)
    kind = family(model_type)
    if not kind.own_template_works:
        log.info("%s: the policy's chat template is trl's %s (%s's own re-renders the <think> block)",
                 cfg.name_or_path, kind.chat_template, kind.name)
        processor.chat_template = trl_chat_template(kind.chat_template)
    return processor


def backbone(cfg: BackboneConfig, recorder: Recorder) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.name_or_path != "tiny":
        from transformers import AutoConfig, AutoProcessor

        config_ = AutoConfig.from_pretrained(cfg.name_or_path)
        found = check_model(config_)  # an unsupported family stops here, before any training
        processor = policy_processor(AutoProcessor.from_pretrained(cfg.name_or_path), cfg, config_.model_type)
        processor.save_pretrained(out)  # the folder's processor: the model's, with the budget
        (out / POINTER).write_text(json.dumps({"name_or_path": cfg.name_or_path}, indent=1))
        return {"kind": "pretrained", "model_type": config_.model_type, "vision_tower": found.vision_tower,
                "projectors": ",".join(found.projectors)}

    model, processor = build_tiny(cfg.tiny, cfg.pretrain.seed)
    with_pixel_budget(processor, cfg)
    params = sum(p.numel() for p in model.parameters())
    log.info("tiny %s: %.2fM parameters, vocabulary %d", family(cfg.tiny.family).name, params / 1e6,
             len(processor.tokenizer))
    checkpoints = Path(cfg.checkpoint_root) / f"backbone-{run_fingerprint(cfg)}"
    with tempfile.TemporaryDirectory() as tmp:
        images = pretraining_images(cfg.pretrain, cfg.tiny.image_size, Path(tmp))
        dataset = sft_dataset(images, "description", prompt_text=DESCRIBE_PROMPT)
        trainer = fit(model, processor, dataset, cfg.pretrain.train, checkpoints, report_to=["mlflow"],
                      progress_name="pretrain")
    save_trained(trainer, processor, out)
    finish(checkpoints)
    state = trainer.state
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    recorder.table("pretraining_samples.json", images.head(20)[["description"]])
    return {"kind": "tiny", "model_type": cfg.tiny.family, "parameters": params, "vocab_size": len(processor.tokenizer),
            "pretrain_samples": len(images), "pretrain_loss_first": losses[0] if losses else None,
            "pretrain_loss_last": losses[-1] if losses else None}
