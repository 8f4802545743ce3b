"""Procedural rendering of AesSynth images from five latent aesthetic factors.

Each factor in [0, 1] (1 = best) is rendered so that it is visible in the pixels
and measurable by simple image statistics:

- exposure: global tone; a low value pushes the image dark or bright with clipping.
- lighting: a directional, soft light gradient and subject/background separation;
  a low value gives flat, low-contrast light.
- composition: subject near a rule-of-thirds point with few distractors; a low value
  centres or crops the subject and adds clutter.
- color: harmonious hues at moderate saturation; a low value gives clashing hues and
  muddy or garish saturation.
- narrative (emotion & narrative): a coherent landscape scene; a low value breaks the
  background into a jumble of unrelated patches.

Two styles exist: ``photo`` (in-domain) and ``painted`` (out-of-domain: different
shapes, palette shift, grain and vignette).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

FACTORS = ("exposure", "lighting", "composition", "color", "narrative")
STYLES = ("photo", "painted")


@dataclass(frozen=True)
class Grid:
    """Normalised pixel coordinates, cached per image size."""

    size: int
    yy: np.ndarray
    xx: np.ndarray

    @classmethod
    def of(cls, size: int) -> "Grid":
        axis = (np.arange(size, dtype=np.float32) + 0.5) / size
        yy, xx = np.meshgrid(axis, axis, indexing="ij")
        return cls(size, yy, xx)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))), np.float32)


def _shape_mask(grid: Grid, cx: float, cy: float, r: float, style: str, soft: float) -> np.ndarray:
    """Soft mask of the subject: a disc (photo) or a square (painted)."""
    dx, dy = grid.xx - cx, grid.yy - cy
    dist = np.hypot(dx, dy) if style == "photo" else np.maximum(np.abs(dx), np.abs(dy)) * 1.1
    return np.clip((r - dist) / soft + 0.5, 0.0, 1.0)


def render(factors: np.ndarray, style: str, rng: np.random.Generator, grid: Grid) -> np.ndarray:
    """Render one RGB uint8 image (size x size x 3) for the given factor vector."""
    exposure, lighting, composition, color, narrative = (float(v) for v in factors)
    size = grid.size
    yy, xx = grid.yy, grid.xx

    # Palette: a base hue; harmony pulls element hues onto analogous/complementary
    # offsets, disharmony scatters them. Saturation drifts to muddy or garish.
    base_hue = rng.random()
    clash = 1.0 - color
    sat = 0.55 + rng.choice((-1.0, 1.0)) * clash * 0.5
    if style == "painted":
        base_hue = 0.45 + 0.2 * rng.random()  # cool teal/blue palette
    subj_offset = rng.choice((0.5, 1 / 12, -1 / 12))

    def element_hue(offset: float) -> float:
        return base_hue + offset + clash * rng.uniform(-0.5, 0.5)

    # Background: a coherent sky/ground scene blended with a jumble of patches.
    horizon = 0.6 + rng.uniform(-0.08, 0.08)
    sky_top = _hsv(element_hue(0.0), sat * 0.7, 0.85)
    sky_low = _hsv(element_hue(0.03), sat * 0.5, 0.7)
    ground = _hsv(element_hue(-0.05), sat * 0.8, 0.42)
    t = np.clip(yy / horizon, 0, 1)[..., None]
    sky = sky_top * (1 - t) + sky_low * t
    below = np.clip((yy - horizon) * size / 2.0 + 0.5, 0, 1)[..., None]
    scene = sky * (1 - below) + ground * below

    # The jumble's patches take the palette's hues (scattered by the clash), so colour harmony
    # stays visible in the whole frame, not only in the scene it replaces.
    cells = 4
    patch_colors = np.stack([
        _hsv(element_hue(rng.choice((0.0, 0.03, -0.05))), sat * rng.uniform(0.5, 1.0), rng.uniform(0.25, 0.9))
        for _ in range(cells * cells)
    ]).reshape(cells, cells, 3)
    ci = np.minimum((yy * cells).astype(int), cells - 1)
    cj = np.minimum((xx * cells).astype(int), cells - 1)
    jumble = patch_colors[ci, cj]
    img = narrative * scene + (1 - narrative) * jumble

    # Lighting: directional soft gradient scaled by the lighting factor.
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle)
    img = img * (1.0 + lighting * gradient)[..., None]
    bg_value = float(img.mean())

    # Composition: thirds point vs centred/cropped placement, plus clutter.
    thirds = np.array([rng.choice((1 / 3, 2 / 3)), rng.choice((1 / 3, 2 / 3))])
    bad = np.array([0.5, 0.5]) if rng.random() < 0.5 else np.array([rng.choice((0.04, 0.96)), rng.uniform(0.2, 0.8)])
    cx, cy = composition * thirds + (1 - composition) * bad + rng.normal(0, 0.02, 2)
    radius = 0.13 + 0.04 * rng.random()

    n_clutter = int(round((1 - composition) * 7 + rng.random() * 0.8))
    for _ in range(n_clutter):
        px, py = rng.uniform(0.05, 0.95, 2)
        mask = _shape_mask(grid, px, py, rng.uniform(0.035, 0.06), style, 0.02)[..., None]
        img = img * (1 - mask) + _hsv(element_hue(subj_offset), sat, rng.uniform(0.3, 0.95)) * mask

    # Subject: separated from the background in proportion to lighting (from almost none in
    # flat light), with a highlight on the lit side.
    separation = 0.02 + 0.5 * lighting
    subj_value = bg_value + separation if bg_value < 0.5 else bg_value - separation
    subj_rgb = _hsv(element_hue(subj_offset), max(sat, 0.15), subj_value)
    hx, hy = cx - 0.5 * radius * np.cos(angle), cy - 0.5 * radius * np.sin(angle)
    shade = 1.0 + 0.5 * lighting * (0.5 - np.clip(np.hypot(xx - hx, yy - hy) / (1.5 * radius), 0, 1))
    mask = _shape_mask(grid, cx, cy, radius, style, 0.015)[..., None]
    img = img * (1 - mask) + (subj_rgb * shade[..., None]) * mask

    if style == "painted":
        vignette = 1.0 - 0.35 * np.hypot(xx - 0.5, yy - 0.5) ** 2 * 2
        img = img * vignette[..., None] + rng.normal(0, 0.035, img.shape)

    # Exposure: a global tone shift that clips highlights or crushes shadows.
    deviation = (1.0 - exposure) * rng.choice((-1.0, 1.0))
    if deviation > 0:
        img = img * (1 + 1.6 * deviation) + 0.25 * deviation
    else:
        img = img * (1 + 0.85 * deviation)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
