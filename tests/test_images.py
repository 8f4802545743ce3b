"""One way to read images (EXIF upright, RGB) and one pixel budget, in every path the policy sees images."""

import copy
import io

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, List
from PIL import Image as PILImage

from aesr1.backbone.backbone import BackboneConfig, with_pixel_budget
from aesr1.backbone.tiny import TinyModelConfig, build_tiny
from aesr1.images import downscale, load_image, set_pixel_budget
from aesr1.policy.generation import load_processor


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


def test_the_tiny_default_reads_every_image_at_its_training_size(tmp_path):
    """The stage's budget for the default (max_pixels null): the 64 x 64 pixels it is trained on, so a photo
    gets its 16 visual tokens, not 240; and a 64 x 64 image is read exactly as under the old 262,144 budget."""
    _, built = build_tiny(TinyModelConfig())
    old = set_pixel_budget(copy.deepcopy(built), None, 262_144)
    processor = with_pixel_budget(built, BackboneConfig())
    processor.save_pretrained(tmp_path)
    saved = load_processor(tmp_path)
    assert saved.image_processor.size["longest_edge"] == 64 * 64
    for photo in (PILImage.new("RGB", (720, 477)), PILImage.new("RGB", (4000, 3000)), PILImage.new("RGB", (477, 720))):
        assert 12 <= visual_tokens(saved, photo) <= 16 < visual_tokens(old, photo)
    assert visual_tokens(saved, PILImage.new("RGB", (32, 32))) == 4

    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    text = ["<|vision_start|><|image_pad|><|vision_end|>"] * len(images)
    before = old(text=text, images=images, return_tensors="pt")
    after = saved(text=text, images=images, return_tensors="pt")
    assert after["image_grid_thw"].tolist() == [[1, 8, 8]] * 3
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_load_image_scales_16_bit_grey_down_instead_of_clipping_it_white(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    PILImage.fromarray(ramp).save(tmp_path / "deep.png")
    assert PILImage.open(tmp_path / "deep.png").mode == "I;16"
    pixels = np.asarray(load_image(tmp_path / "deep.png")).astype(int)
    assert np.array_equal(pixels[..., 0], ramp >> 8) and (pixels[..., 0] == pixels[..., 2]).all()
    eight = np.asarray(load_image(PILImage.fromarray((ramp >> 8).astype(np.uint8)).convert("I")))
    assert np.array_equal(eight[..., 0], ramp >> 8)  # 8-bit values in a 32-bit image are kept as they are
