"""Real photos for the test-overlap check's benchmark and its test: scikit-image's sample photographs (the dev
install's), so both measure on the same pictures without a download."""

from __future__ import annotations

import io

from PIL import Image


def real_photos() -> list[Image.Image]:
    """21 distinct real photos: scikit-image's sample photographs, five of them as their left and right halves."""
    from skimage import data

    whole = [data.chelsea(), data.immunohistochemistry(), data.camera(), data.moon(), data.grass(), data.gravel(),
             data.brick(), data.coins(), data.clock(), data.cell(), data.stereo_motorcycle()[0]]
    halved = [data.coffee(), data.rocket(), data.hubble_deep_field(), data.retina(), data.astronaut()]
    arrays = whole + [half for a in halved for half in (a[:, :a.shape[1] // 2], a[:, a.shape[1] // 2:])]
    return [Image.fromarray(a).convert("RGB") for a in arrays]


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """``image`` re-encoded as a JPEG of ``quality`` and decoded again."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
