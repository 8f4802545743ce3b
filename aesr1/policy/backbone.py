"""The backbone stage: a real VLM (hub id or folder) as is, or a tiny Qwen2.5-VL built here.

``tiny`` builds the same model class as the paper's backbone from a small config, with a
byte-level BPE tokenizer trained offline (Qwen's pre-tokenizer, special tokens and chat
template), Qwen2-VL image and video processors, then gives it a short generic
vision-language pretraining on AesSynth images with *descriptive* targets (colours,
brightness, shapes, layout: never a score or a judgement). It then plays the part of a
pretrained MLLM that has never learned aesthetics. It is saved with ``save_pretrained``,
so later stages load it exactly like a downloaded model.

For a real backbone nothing is built or copied: the stage checks that the model's config
and processor load and writes ``backbone.json`` pointing at it (``aesr1.policy.generation.resolve_model``).
"""

from __future__ import annotations

import colorsys
import json
import logging
import tempfile
from dataclasses import field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image

from aesr1.aescot import teachers
from aesr1.aescot.claims import CLAIMS
from aesr1.aescot.measure import ImageStats, measure
from aesr1.config import config
from aesr1.data.render import STYLES, Grid, render
from aesr1.images import MAX_PIXELS, set_pixel_budget
from aesr1.policy.data import policy_prompt, sft_dataset
from aesr1.policy.generation import POINTER
from aesr1.policy.train import TrainConfig, finish, fit, run_fingerprint, save_trained
from aesr1.trajectory import make_trajectory

if TYPE_CHECKING:  # the model code runs without MLflow too (benchmarks on a bare GPU machine)
    from aesr1.stage import Recorder

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
DESCRIBE_PROMPT = "Describe this image: its colours, brightness, shapes and layout."


@config
class TinyModelConfig:
    vocab_size: int = 1024
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384
    vision_depth: int = 2
    vision_hidden_size: int = 96
    vision_heads: int = 4
    patch_size: int = 8
    image_size: int = 64  # the descriptive pretraining renders its images at image_size x image_size


@config
class PretrainConfig:
    samples: int = 2000
    painted_fraction: float = 0.3  # share of images in the out-of-domain style
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=2, learning_rate=2e-3, batch_size=16, freeze_vision=False, warmup=0.05))


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


def pixel_budget(cfg: BackboneConfig) -> int:
    """The most pixels of an image the policy sees: ``max_pixels``, or (None) what the model was trained on.

    The tiny model is pretrained on ``tiny.image_size`` x ``tiny.image_size`` images only, so its budget
    is that many pixels: a photo of any size is read at about that size, with the visual tokens it was
    trained on (64 x 64: 16 tokens at patch 8, 2 x 2 merged), not hundreds it never saw. A real backbone's
    is the reference's :data:`aesr1.images.MAX_PIXELS` (~315 Qwen2.5-VL tokens).
    """
    if cfg.max_pixels is not None:
        return cfg.max_pixels
    return cfg.tiny.image_size ** 2 if cfg.name_or_path == "tiny" else MAX_PIXELS


def with_pixel_budget(processor, cfg: BackboneConfig):
    """``processor`` set to the backbone's budget (``min_pixels``, :func:`pixel_budget`), as the stage saves it."""
    budget, trained = pixel_budget(cfg), cfg.tiny.image_size ** 2
    if cfg.name_or_path == "tiny" and budget > trained:
        log.warning("backbone.max_pixels %d is above the %d pixels of the tiny model's %d x %d training images: "
                    "larger images get more visual tokens than it was trained on (null: its trained budget)",
                    budget, trained, cfg.tiny.image_size, cfg.tiny.image_size)
    return set_pixel_budget(processor, cfg.min_pixels, budget)


# ---------------------------------------------------------------- descriptions

_HUES = ["red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet", "magenta", "pink"]


def colour_name(rgb: np.ndarray) -> str:
    h, s, v = colorsys.rgb_to_hsv(*(float(c) for c in rgb))
    if v < 0.15:
        return "black"
    if s < 0.15:
        return "white" if v > 0.85 else "grey"
    name = _HUES[int(round(h * 12)) % 12]
    return f"dark {name}" if v < 0.4 else f"pale {name}" if s < 0.35 else name


def describe(rgb: np.ndarray, stats: ImageStats) -> str:
    """A neutral description of what is in the picture; no judgement, no score."""
    h, w, _ = rgb.shape
    tone = "dark" if stats.brightness < 0.3 else "bright" if stats.brightness > 0.7 else "mid-toned"
    top, bottom = rgb[: h // 3].reshape(-1, 3).mean(0), rgb[-h // 3:].reshape(-1, 3).mean(0)
    cy, cx = int(stats.subject_y * h), int(stats.subject_x * w)
    subject = rgb[max(0, cy - 1):cy + 2, max(0, cx - 1):cx + 2].reshape(-1, 3).mean(0)
    across = "left" if stats.subject_x < 0.4 else "right" if stats.subject_x > 0.6 else "centre"
    down = "upper" if stats.subject_y < 0.4 else "lower" if stats.subject_y > 0.6 else "middle"
    where = "centre" if (across, down) == ("centre", "middle") else f"{down} {across}"
    shapes = "no small shapes" if stats.clutter == 0 else "a few small shapes" if stats.clutter <= 3 \
        else "many small shapes"
    layout = "a patchwork of blocks" if stats.fragmentation > 10 else "a sky above a ground" \
        if stats.fragmentation < 6 else "broad areas of colour"
    parts = [f"A {tone} image.", f"A {colour_name(subject)} shape in the {where}.",
             f"The background is {colour_name(top)} above and {colour_name(bottom)} below, {layout}.",
             f"There are {shapes}."]
    if stats.light_strength > 0.2:
        parts.append(f"It grows brighter toward the {stats.light_from}.")
    return " ".join(parts)


def pretraining_images(cfg: PretrainConfig, size: int, folder: Path) -> pd.DataFrame:
    """Render images from random factors and describe them; returns image_path and description."""
    rng = np.random.default_rng(cfg.seed)
    grid = Grid.of(size)
    rows = []
    for i in range(cfg.samples):
        style = STYLES[1] if rng.random() < cfg.painted_fraction else STYLES[0]
        pixels = render(rng.random(5), style, np.random.default_rng([cfg.seed, i]), grid)
        path = folder / f"{i}.png"
        Image.fromarray(pixels).save(path)
        rgb = pixels.astype(np.float32) / 255
        rows.append({"image_path": str(path), "description": describe(rgb, measure(rgb))})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the tiny model

def tokenizer_corpus() -> list[str]:
    """Text the tokenizer learns its merges from: prompts, descriptions' and critiques' wording, scores."""
    texts = [policy_prompt(), DESCRIBE_PROMPT, "system\nYou are a helpful assistant.\nuser\nassistant\n"]
    for claim in CLAIMS:
        texts += [p.format(light_from=d) for p in claim.phrases for d in ("left", "right", "top", "bottom")]
    texts += teachers.phrase_bank()
    texts += [make_trajectory("x", s / 100) for s in range(101)]
    texts += [f"A {t} image. A {c} shape in the {p}. The background is {c} above and {c} below."
              for t in ("dark", "bright", "mid-toned") for c in _HUES + ["grey", "black", "white"]
              for p in ("upper left", "centre", "lower right")]
    return texts * 3


def build_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tokenizer


def build_tiny(cfg: TinyModelConfig, seed: int = 0):
    """A randomly initialised Qwen2.5-VL and its processor, from config; the processor reads every image
    within the ``image_size`` x ``image_size`` pixels the model is trained on.

    The initialisation is seeded (torch's default generator starts from a different seed in
    every process, and an unseeded build made each pipeline run train a different model), on a
    forked generator so the caller's random state is left as it was.
    """
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = build_tokenizer(cfg.vocab_size)
    chat_template = resources.files("trl").joinpath("chat_templates", "qwen2_5_vl.jinja").read_text()
    token = (2 * cfg.patch_size) ** 2  # the pixels of one visual token (2 x 2 patches merged)
    # at most the pixels of its training images (the backbone stage saves it with pixel_budget's)
    image_processor = Qwen2VLImageProcessor(patch_size=cfg.patch_size, merge_size=2, temporal_patch_size=2,
                                            min_pixels=token, max_pixels=cfg.image_size ** 2)
    video_processor = Qwen2VLVideoProcessor(patch_size=cfg.patch_size, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=chat_template)
    ids = tokenizer.convert_tokens_to_ids
    head_dim = cfg.hidden_size // cfg.heads
    half = head_dim // 2  # mrope_section must sum to head_dim / 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    model_config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=4096, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(
            depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, intermediate_size=2 * cfg.vision_hidden_size,
            num_heads=cfg.vision_heads, patch_size=cfg.patch_size, spatial_merge_size=2, temporal_patch_size=2,
            out_hidden_size=cfg.hidden_size, window_size=cfg.patch_size * 4,
            fullatt_block_indexes=list(range(1, cfg.vision_depth, 2))),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(model_config)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    return model, processor


def backbone(cfg: BackboneConfig, recorder: Recorder) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.name_or_path != "tiny":
        from transformers import AutoConfig, AutoProcessor

        config_ = AutoConfig.from_pretrained(cfg.name_or_path)
        processor = with_pixel_budget(AutoProcessor.from_pretrained(cfg.name_or_path), cfg)
        processor.save_pretrained(out)  # the folder's processor: the model's, with the budget
        (out / POINTER).write_text(json.dumps({"name_or_path": cfg.name_or_path}, indent=1))
        return {"kind": "pretrained", "model_type": config_.model_type}

    model, processor = build_tiny(cfg.tiny, cfg.pretrain.seed)
    with_pixel_budget(processor, cfg)
    params = sum(p.numel() for p in model.parameters())
    log.info("tiny Qwen2.5-VL: %.2fM parameters, vocabulary %d", params / 1e6, len(processor.tokenizer))
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
    return {"kind": "tiny", "parameters": params, "vocab_size": len(processor.tokenizer),
            "pretrain_samples": len(images), "pretrain_loss_first": losses[0] if losses else None,
            "pretrain_loss_last": losses[-1] if losses else None}
