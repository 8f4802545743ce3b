"""One way to read images (EXIF upright, RGB) and one pixel budget, in every path the policy sees images."""

import io

import numpy as np
import pytest
from datasets import Dataset, Features, Image, List
from PIL import Image as PILImage

from aesr1.images import downscale, load_image, set_pixel_budget
from aesr1.policy.backbone import TinyModelConfig, build_tiny


def rotated_jpeg(path, size=(300, 200)):
    """A landscape-stored JPEG whose EXIF says: display rotated 90 degrees (a portrait phone photo)."""
    exif = PILImage.Exif()
    exif[0x0112] = 6
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2] = 255  # left half white as stored
    PILImage.fromarray(pixels).save(path, "JPEG", exif=exif)
    return path


def test_load_image_turns_photos_upright_and_gives_rgb(tmp_path):
    image = load_image(rotated_jpeg(tmp_path / "phone.jpg"))
    assert image.size == (200, 300) and image.mode == "RGB"
    grey = tmp_path / "grey.png"
    PILImage.new("L", (10, 10)).save(grey)
    assert load_image(grey).mode == "RGB"
    assert load_image(io.BytesIO(grey.read_bytes())).mode == "RGB"


def test_training_reads_images_as_load_image_does(tmp_path):
    """SFT and RL read images through the datasets Image(mode="RGB") feature: the same pixels."""
    path = str(rotated_jpeg(tmp_path / "phone.jpg"))
    decoded = Dataset.from_dict({"images": [[path]]}, features=Features({"images": List(Image(mode="RGB"))}))
    assert np.array_equal(np.asarray(decoded[0]["images"][0]), np.asarray(load_image(path)))


def test_downscale_keeps_the_aspect_and_meets_both_limits():
    image = PILImage.new("RGB", (4000, 3000))
    small = downscale(image, max_pixels=262_144)
    assert small.size[0] * small.size[1] <= 262_144 and abs(small.size[0] / small.size[1] - 4 / 3) < 0.01
    assert max(downscale(image, max_side=500).size) == 500
    assert downscale(PILImage.new("RGB", (64, 64)), max_pixels=262_144).size == (64, 64)


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory):
    """A tiny model folder saved with a budget of 4,096 pixels: 16 visual tokens at most."""
    model, processor = build_tiny(TinyModelConfig(vocab_size=600, hidden_size=32, layers=1, heads=2, kv_heads=1,
                                                  intermediate_size=64, vision_depth=1, vision_hidden_size=32,
                                                  vision_heads=2))
    folder = tmp_path_factory.mktemp("budget")
    set_pixel_budget(processor, None, 4096)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def visual_tokens(processor, image) -> int:
    out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image], return_tensors="pt")
    return int(out["image_grid_thw"].prod()) // 4  # 2 x 2 patches merge into one token


def test_a_large_photo_gets_at_most_the_budgets_tokens_in_every_path(budgeted):
    from transformers import AutoProcessor

    from aesr1.policy.generation import load_policy, load_processor, sample

    photo = PILImage.new("RGB", (4000, 3000), (90, 120, 200))
    for processor in (load_processor(budgeted), load_policy(budgeted)[1], AutoProcessor.from_pretrained(budgeted)):
        assert visual_tokens(processor, photo) <= 4096 // 256
    assert visual_tokens(load_processor(budgeted), PILImage.new("RGB", (64, 64))) == 16
    model, processor = load_policy(budgeted)
    assert len(sample(model, processor, [photo], max_new_tokens=3).texts) == 1  # generation reads it in budget


def test_the_tiny_default_reads_synthetic_images_at_their_size():
    _, processor = build_tiny(TinyModelConfig())
    set_pixel_budget(processor, None, 262_144)
    assert visual_tokens(processor, PILImage.new("RGB", (64, 64))) == 16
    assert visual_tokens(processor, PILImage.new("RGB", (32, 32))) == 4
