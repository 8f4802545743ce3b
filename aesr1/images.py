"""Reading an image, the same way in every path; and the pixel budget of the policy's images.

A phone photo stores its orientation in EXIF: read without it, the model would see it on
its side in one path and upright in another. Training reads images through the datasets
``Image(mode="RGB")`` feature, which applies the same EXIF transpose and RGB conversion
(tests/test_images.py checks both readers agree).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# the reference's budget: Qwen2.5-VL's processor resizes each image to at most this many pixels (~315 visual
# tokens at 28 x 28 pixels per token), against its default of 12.8 MP (~16K tokens for a 4000 x 3000 photo)
MAX_PIXELS = 262_144


def load_image(source: str | Path | Image.Image) -> Image.Image:
    """An RGB image, turned upright by its EXIF orientation."""
    if isinstance(source, Image.Image):
        return _rgb(ImageOps.exif_transpose(source))
    with Image.open(source) as opened:
        return _rgb(ImageOps.exif_transpose(opened))


def _rgb(image: Image.Image) -> Image.Image:
    """``image`` in 8-bit RGB. PIL's own conversion clips 16-bit grey ("I;16", or "I" from some PNGs and
    TIFFs) at 255, which turns a 16-bit photo white; it is scaled down to 8 bits instead. (The training
    images are 8-bit: for them this is PIL's conversion, as the datasets Image feature does it.)"""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
        grey = np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8
        image = Image.fromarray(grey.astype(np.uint8), "L")
    return image.convert("RGB")


def downscale(image: Image.Image, max_pixels: int | None = None, max_side: int | None = None) -> Image.Image:
    """``image`` shrunk (aspect kept) until it has at most ``max_pixels`` pixels and ``max_side`` on its long side."""
    width, height = image.size
    scale = 1.0
    if max_pixels:
        scale = min(scale, math.sqrt(max_pixels / (width * height)))
    if max_side:
        scale = min(scale, max_side / max(width, height))
    if scale >= 1.0:
        return image
    return image.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.LANCZOS)


def set_pixel_budget(processor, min_pixels: int | None, max_pixels: int):
    """Make the processor resize every image into [min_pixels, max_pixels] (min None: the processor's own
    minimum); it is saved with the model, so every path that loads the model reads images alike."""
    image_processor = processor.image_processor
    min_pixels = min_pixels or image_processor.size["shortest_edge"]
    image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(image_processor, name):
            setattr(image_processor, name, value)
    return processor
