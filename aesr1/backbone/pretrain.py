"""The tiny model's descriptive pretraining: AesSynth-style images with neutral descriptions.

The targets say what is in the picture (colours, brightness, shapes, layout), never a score
or a judgement, so the pretrained model plays a pretrained MLLM that has never learned
aesthetics.
"""

from __future__ import annotations

import colorsys
from dataclasses import field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from aesr1.aescot.measure import ImageStats, measure
from aesr1.config import config
from aesr1.data.render import STYLES, Grid, render
from aesr1.policy.train import TrainConfig

DESCRIBE_PROMPT = "Describe this image: its colours, brightness, shapes and layout."


@config
class PretrainConfig:
    samples: int = 2000
    painted_fraction: float = 0.3  # share of images in the out-of-domain style
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=2, learning_rate=2e-3, batch_size=16, freeze_vision=False, warmup=0.05))


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


def description_phrases() -> list[str]:
    """The descriptions' wording (tones, colour names, places), for a tokenizer."""
    return [f"A {t} image. A {c} shape in the {p}. The background is {c} above and {c} below."
            for t in ("dark", "bright", "mid-toned") for c in _HUES + ["grey", "black", "white"]
            for p in ("upper left", "centre", "lower right")]


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
