"""`aesr1 score` on photos of any size and mode: each read within the budget the model was trained on, each
unreadable file an error line of its own while the others are scored."""

import dataclasses
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from aesr1.backbone.backbone import BackboneConfig, backbone, pixel_budget, with_pixel_budget
from aesr1.backbone.pretrain import PretrainConfig
from aesr1.backbone.tiny import TinyModelConfig, build_tiny
from aesr1.cli import main
from aesr1.images import MAX_PIXELS, load_image
from aesr1.policy.generation import load_processor
from aesr1.policy.train import TrainConfig
from aesr1.stage import Recorder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# trained on 64 x 64 images, as the default: (64 / 8 / 2)^2 = 16 visual tokens (patch 8, 2 x 2 patches merged).
# (Qwen's resize keeps a side of at least one token, so an aspect ratio over the token budget, here 16:1, gets
# a few tokens more: a 32 x 32 model would read 37 x 300 with 5 tokens, not 4.)
SMALL = TinyModelConfig(vocab_size=600, hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64,
                        vision_depth=1, vision_hidden_size=32, vision_heads=2, patch_size=8, image_size=64)
TRAINED_TOKENS = (SMALL.image_size // SMALL.patch_size // 2) ** 2


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny model folder saved with the pixel budget the backbone stage saves (its config's, by its function)."""
    model, processor = build_tiny(SMALL)
    folder = tmp_path_factory.mktemp("policy")
    with_pixel_budget(processor, BackboneConfig(tiny=SMALL))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def visual_tokens(processor, image) -> int:
    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    return int(grid.prod()) // processor.image_processor.merge_size ** 2


def longest_edge(folder) -> int:
    return load_processor(folder).image_processor.size["longest_edge"]


def exif_rotated_jpeg(path, pixels: np.ndarray, orientation: int = 6):
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: display rotated 90 degrees clockwise (a portrait phone photo)
    Image.fromarray(pixels).save(path, "JPEG", exif=exif)


def gradient(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                     (x + y) * 255 // max(1, width + height - 2)], -1).astype(np.uint8)


def write_photos(folder) -> dict[str, str]:
    """Images of every size and mode a user's folder holds: name -> how it was written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}

    def save(name, image, **kw):
        image.save(folder / name, **kw)
        written[name] = f"{image.mode} {image.size}"

    rgb = Image.fromarray(gradient(720, 477))
    save("photo_720x477.jpg", rgb, quality=90)
    save("grey_L.png", rgb.convert("L"))
    save("bilevel_1.png", rgb.convert("1"))
    save("grey_alpha_LA.png", rgb.convert("LA"))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(gradient(720, 477)[..., 0]))
    save("rgba.png", rgba)
    palette = rgb.quantize(64)
    palette.info["transparency"] = 0
    save("palette_P.png", palette, transparency=0)
    save("grey_16bit.png", Image.fromarray((gradient(300, 200)[..., 0].astype(np.uint16) * 257)))
    save("cmyk.jpg", rgb.convert("CMYK"), quality=90)
    exif_rotated_jpeg(folder / "phone_exif_rotated.jpg", gradient(400, 300))
    written["phone_exif_rotated.jpg"] = "RGB (400, 300), EXIF orientation 6"
    save("big_4000x3000.jpg", Image.fromarray(gradient(4000, 3000)), quality=80)
    save("tall_37x300.png", Image.fromarray(gradient(37, 300)))
    save("wide_300x40.png", Image.fromarray(gradient(300, 40)))
    save("tiny_8x8.png", Image.fromarray(gradient(8, 8)))
    save("one_pixel_1x1.png", Image.new("RGB", (1, 1), (200, 30, 60)))
    save("webp.webp", rgb)
    return written


def write_unreadable(folder) -> dict[str, str]:
    """Files `aesr1 score` cannot score: name -> why."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "whole.jpg"
    Image.fromarray(gradient(640, 480)).save(good, quality=90)
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    good.unlink()
    (folder / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    (folder / "empty.png").write_bytes(b"")
    Image.fromarray(gradient(1, 300)).save(folder / "sliver_1x300.png")  # aspect 300: Qwen's processor refuses it
    return {"truncated.jpg": "cannot read", "notes.jpg": "cannot read", "empty.png": "cannot read",
            "sliver_1x300.png": "aspect ratio"}


@pytest.fixture
def quick_params(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"evaluate": {"decoding": {"greedy": True, "max_new_tokens": 4, "batch_size": 8}}}))
    return path


def score_json(capsys, policy, quick_params, *inputs) -> tuple[int, list[dict]]:
    status = main(["score", *map(str, inputs), "--model", str(policy), "--params", str(quick_params), "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_the_tiny_backbone_saves_its_trained_budget_and_a_real_one_the_references(tmp_path):
    """max_pixels null: the tiny model's image_size^2 (what the backbone stage saves), a real model's 262,144."""
    tiny = dataclasses.replace(SMALL, image_size=32)  # not the default's 64: the budget follows image_size
    cfg = BackboneConfig(out_dir=str(tmp_path / "tiny"), checkpoint_root=str(tmp_path / "ck"), tiny=tiny,
                         pretrain=PretrainConfig(samples=4, train=TrainConfig(epochs=1, batch_size=4)))
    assert cfg.max_pixels is None and pixel_budget(cfg) == 32 ** 2
    assert pixel_budget(BackboneConfig()) == 64 ** 2  # the embedded default's
    assert backbone(cfg, Recorder())["kind"] == "tiny"
    assert longest_edge(tmp_path / "tiny") == 32 ** 2
    saved = json.loads((tmp_path / "tiny" / "processor_config.json").read_text())["image_processor"]
    assert saved["size"]["longest_edge"] == 32 ** 2

    real = BackboneConfig(name_or_path=str(tmp_path / "tiny"), out_dir=str(tmp_path / "real"))
    assert pixel_budget(real) == MAX_PIXELS == 262_144
    assert backbone(real, Recorder())["kind"] == "pretrained"
    assert longest_edge(tmp_path / "real") == 262_144
    explicit = BackboneConfig(name_or_path=str(tmp_path / "tiny"), out_dir=str(tmp_path / "set"), max_pixels=12_544)
    backbone(explicit, Recorder())
    assert longest_edge(tmp_path / "set") == 12_544


def test_score_reads_photos_of_every_size_and_mode_and_reports_each_unreadable_file(tmp_path, capsys, policy,
                                                                                    quick_params):
    photos = write_photos(tmp_path / "my_photos")
    bad = write_unreadable(tmp_path / "my_photos" / "bad")
    status, rows = score_json(capsys, policy, quick_params, tmp_path / "my_photos")

    assert status == 1  # some file could not be read
    by_name = {row["image"].rsplit("/", 1)[1]: row for row in rows}
    assert len(rows) == len(by_name) == len(photos) + len(bad)
    assert set(by_name) == set(photos) | set(bad)
    for name, how in photos.items():
        row = by_name[name]
        assert "error" not in row, f"{name} ({how}): {row.get('error')}"
        assert isinstance(row["completion"], str) and "score" in row and "critique" in row, name
    for name, why in bad.items():
        error = by_name[name].get("error", "")
        assert str(tmp_path / "my_photos" / "bad" / name) in error and why in error, (name, error)
        assert "completion" not in by_name[name]

    processor = load_processor(policy)  # the processor scoring read them with
    for name, how in photos.items():
        tokens = visual_tokens(processor, load_image(tmp_path / "my_photos" / name))
        assert 1 <= tokens <= TRAINED_TOKENS, f"{name} ({how}): {tokens} visual tokens"


def test_score_prints_one_line_per_file_and_exits_0_when_all_are_read(tmp_path, capsys, policy, quick_params):
    write_photos(tmp_path / "ok")
    bad = write_unreadable(tmp_path / "bad")
    args = ["--model", str(policy), "--params", str(quick_params)]
    assert main(["score", str(tmp_path / "ok" / "tiny_8x8.png"), str(tmp_path / "ok" / "big_4000x3000.jpg"),
                 *args]) == 0
    out = capsys.readouterr().out
    assert out.count(str(tmp_path / "ok")) == 2 and "error" not in out

    assert main(["score", str(tmp_path / "bad"), str(tmp_path / "ok" / "cmyk.jpg"), *args]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(tmp_path))]
    assert len(lines) == len(bad) + 1
    errors = [line for line in lines if "\terror: " in line]
    assert sorted(line.split("\t")[0].rsplit("/", 1)[1] for line in errors) == sorted(bad)
    assert any(line.startswith(str(tmp_path / "ok" / "cmyk.jpg") + "\t") for line in lines)


def test_score_reads_real_photos(tmp_path, capsys, policy, quick_params):
    """scikit-image's bundled photos, as a phone or camera writes them: resized, EXIF-rotated, grey, RGBA."""
    data = pytest.importorskip("skimage.data")
    folder = tmp_path / "real"
    folder.mkdir()
    astronaut, coffee, chelsea, rocket = data.astronaut(), data.coffee(), data.chelsea(), data.rocket()
    Image.fromarray(astronaut).resize((4000, 3000)).save(folder / "astronaut_4000x3000.jpg", quality=85)
    Image.fromarray(coffee).save(folder / "coffee.png")
    exif_rotated_jpeg(folder / "chelsea_rotated.jpg", chelsea, orientation=8)
    Image.fromarray(rocket).convert("RGBA").save(folder / "rocket_rgba.png")
    Image.fromarray(data.camera()).save(folder / "camera_grey.jpg")
    Image.fromarray(chelsea).resize((37, 300)).save(folder / "chelsea_37x300.jpg")
    Image.fromarray(coffee).convert("CMYK").save(folder / "coffee_cmyk.jpg")

    status, rows = score_json(capsys, policy, quick_params, folder)
    assert status == 0 and len(rows) == 7
    assert all("error" not in row and isinstance(row["completion"], str) for row in rows), rows
    processor = load_processor(policy)
    assert load_image(folder / "chelsea_rotated.jpg").size == (chelsea.shape[0], chelsea.shape[1])  # upright
    for row in rows:
        assert visual_tokens(processor, load_image(row["image"])) <= TRAINED_TOKENS, row["image"]


def test_check_image_refuses_what_the_processor_refuses_and_warns_past_the_budget(policy, caplog):
    from aesr1.errors import AesError
    from aesr1.inference import check_image

    processor = load_processor(policy)
    check_image(Image.new("RGB", (300, 40)), processor, "wide.png")
    assert not caplog.records
    with pytest.raises(AesError, match=r"cannot process image sliver.png \(1 x 300\): .*aspect ratio"):
        check_image(Image.new("RGB", (1, 300)), processor, "sliver.png")
    check_image(Image.new("RGB", (4000, 30)), processor, "panorama.png")  # 133:1: each side at least one token
    assert "panorama.png" in caplog.text and "over the 16 of the pixel budget" in caplog.text
