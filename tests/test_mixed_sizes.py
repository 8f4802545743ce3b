"""Images of mixed sizes and aspect ratios in one batch, as real datasets have them, through SFT, RL and evaluation.

Every other test feeds the pipeline 64 x 64 images: one visual-token count, so a batch's prompts are all
the same length and nothing is padded. Here a batch mixes a tall strip, a wide strip, a VGA frame, a
12 MP phone photo stored on its side (EXIF orientation 6), a greyscale PNG and an RGBA PNG: within the
tiny model's pixel budget each gets its own grid of visual tokens, so prompts differ in length and
trl, the processor and generation must pad them. trl's GRPO has had Qwen2.5-VL bugs exactly there
(huggingface/trl#5785: prompt ids and image-token marks padded on opposite sides, get_rope_index
crashing or silently misplacing positions); the check that matters is that a completion's log-probs in
trl's padded batch are those of its own prompt, image and completion alone.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, with_venv
from datasets import Dataset, Features, Image, List
from PIL import Image as PILImage
from test_policy import SMALL

from aesr1.backbone.backbone import BackboneConfig, backbone, pixel_budget
from aesr1.backbone.pretrain import PretrainConfig
from aesr1.images import downscale, load_image
from aesr1.policy.data import prompt_messages, sft_dataset
from aesr1.policy.generation import load_policy, load_processor
from aesr1.policy.train import TrainConfig, fit
from aesr1.policy.trainer import save_trained
from aesr1.stage import Recorder
from aesr1.trajectory import make_trajectory

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# image_size 64: a budget of 4,096 pixels, up to 16 visual tokens (8-pixel patches, 2 x 2 merged)
MIXED = dataclasses.replace(SMALL, image_size=64)

# name, stored (width, height), PIL mode, EXIF orientation, the upright (width, height) the policy must see
IMAGES = [
    ("tall.png", (37, 300), "RGB", None, (37, 300)),
    ("wide.jpg", (300, 40), "RGB", None, (300, 40)),
    ("vga.jpg", (640, 480), "RGB", None, (640, 480)),
    ("phone.jpg", (4000, 3000), "RGB", 6, (3000, 4000)),  # a portrait phone photo, stored landscape
    ("grey.png", (48, 33), "L", None, (48, 33)),
    ("rgba.png", (64, 64), "RGBA", None, (64, 64)),
]
SCORES = [0.1, 0.3, 0.5, 0.7, 0.9, 0.2]
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]


def write_image(path: Path, size: tuple[int, int], mode: str, orientation: int | None, seed: int) -> Path:
    """A smooth random picture (coarse noise, upsampled: small files even at 12 MP), its left half
    brightened as stored, so that a turn shows in the pixels."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    coarse = rng.integers(0, 200, (6, 6, channels), dtype=np.uint8)
    if mode == "RGBA":
        coarse[..., 3] = rng.integers(60, 256, (6, 6))  # a real, varying alpha channel
    picture = PILImage.fromarray(coarse[..., 0] if channels == 1 else coarse, mode).resize(size,
                                                                                           PILImage.BILINEAR)
    pixels = np.asarray(picture).copy()
    left = pixels[:, : size[0] // 2] if channels == 1 else pixels[:, : size[0] // 2, :3]
    left[...] = 190 + left // 4
    picture = PILImage.fromarray(pixels, mode)
    if orientation is not None:
        exif = PILImage.Exif()
        exif[0x0112] = orientation
        picture.save(path, "JPEG", exif=exif, quality=90)
    else:
        picture.save(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread in this process, as torchrun gives each of its processes: the model is tiny, and on a
    busy 2-core machine two spinning threads run its many small steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> pd.DataFrame:
    """The mixed images as a manifest (image_id, image_path, score), with each image's upright size."""
    root = tmp_path_factory.mktemp("mixed")
    rows = []
    for i, (name, size, mode, orientation, upright) in enumerate(IMAGES):
        path = write_image(root / name, size, mode, orientation, seed=i)
        rows.append({"image_id": f"mixed/{name}", "image_path": str(path), "dataset": "ava", "score": SCORES[i],
                     "upright": upright, "mode": mode})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def manifest(mixed, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "train.parquet"
    mixed[["image_id", "image_path", "dataset", "score"]].to_parquet(path)
    return path


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    """The tiny backbone as the stage builds it, at image_size 64, its processor saved with the stage's budget."""
    root = tmp_path_factory.mktemp("backbone")
    cfg = BackboneConfig(out_dir=str(root / "backbone"), checkpoint_root=str(root / "ck"), tiny=MIXED,
                         pretrain=PretrainConfig(samples=24, train=TrainConfig(epochs=1, learning_rate=2e-3,
                                                                               logging_steps=1, batch_size=8,
                                                                               freeze_vision=False)))
    backbone(cfg, Recorder())
    return root / "backbone", cfg


def torchrun(phase: str, folder: Path, data: Path, out: Path) -> list[dict]:
    done = subprocess.run([*TORCHRUN, str(REPO / "tests/multiprocess/mixed_sizes.py"), phase, str(folder), str(data),
                           str(out)], cwd=REPO, env=with_venv(dict(os.environ)), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"{phase}_rank{r}.json").read_text()) for r in (0, 1)]


def visual_grid(processor, image) -> tuple[int, int, int]:
    prompt = processor.apply_chat_template(prompt_messages(), add_generation_prompt=True, tokenize=False)
    return tuple(processor(text=[prompt], images=[image], return_tensors="pt")["image_grid_thw"][0].tolist())


def test_mixed_images_are_read_upright_in_rgb_within_the_pixel_budget(mixed, tiny_backbone):
    folder, cfg = tiny_backbone
    processor = load_processor(folder)
    budget = pixel_budget(cfg)
    assert budget == 64 * 64 and processor.image_processor.size["longest_edge"] == budget
    merge = processor.image_processor.merge_size ** 2
    grids = {}
    for row in mixed.itertuples():
        image = load_image(row.image_path)
        assert image.mode == "RGB" and image.size == row.upright, (row.image_path, image.mode, image.size)
        grid = visual_grid(processor, image)
        patch = processor.image_processor.patch_size
        assert grid[1] * grid[2] * patch ** 2 <= budget  # the resized image's pixels
        grids[Path(row.image_path).name] = grid
    tokens = {name: t * h * w // merge for name, (t, h, w) in grids.items()}
    assert all(1 <= n <= budget // (2 * processor.image_processor.patch_size) ** 2 for n in tokens.values()), tokens
    assert len(set(grids.values())) == len(grids), grids  # every image its own grid of visual tokens
    assert len(set(tokens.values())) >= 5, tokens  # and prompts of (nearly) all different lengths
    assert grids["phone.jpg"][1] > grids["phone.jpg"][2]  # read upright: taller than wide, as EXIF says
    phone = np.asarray(load_image(mixed.set_index("image_id").image_path["mixed/phone.jpg"]), dtype=float)
    assert phone[:2000].mean() > phone[2000:].mean() + 50  # turned clockwise: the stored left half is on top
    assert grids["tall.png"][1] > 5 * grids["tall.png"][2] and grids["wide.jpg"][2] > 5 * grids["wide.jpg"][1]

    # SFT and RL read images through the datasets Image(mode="RGB") feature: the same pixels as load_image
    decoded = Dataset.from_dict({"images": [[p] for p in mixed.image_path]},
                                features=Features({"images": List(Image(mode="RGB"))}))
    for row, path in zip(decoded, mixed.image_path):
        assert np.array_equal(np.asarray(row["images"][0]), np.asarray(load_image(path))), path


def test_one_sft_step_over_mixed_sizes_on_two_processes(tmp_path, mixed, tiny_backbone):
    """fit (SFTTrainer) on 2 processes (gloo), a batch of 6 per process: it completes with a finite loss."""
    folder, _ = tiny_backbone
    # 12 rows, each image twice: one step of 6 rows per process, so each batch holds at least 3 of the sizes
    frame = pd.concat([mixed, mixed], ignore_index=True)
    frame["trajectory"] = [make_trajectory(f"Exposure: frame {i} is {'dark' if s < 0.5 else 'bright'}.", s)
                           for i, s in enumerate(frame.score)]
    frame[["image_path", "score", "trajectory"]].to_parquet(tmp_path / "trajectories.parquet")
    ranks = torchrun("sft", folder, tmp_path / "trajectories.parquet", tmp_path)
    assert [(r["world"], r["steps"]) for r in ranks] == [(2, 1)] * 2
    for r in ranks:
        assert len(r["losses"]) == 1 and math.isfinite(r["losses"][0]), r


def _alone_logps(model, processor, path, completion, temperature):
    """Per-token log-probs of ``completion`` after the policy prompt and one image, the sequence alone
    (no padding), computed the plain way: the evaluation path's processor, the model's logits."""
    prompt = processor.apply_chat_template(prompt_messages(), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[load_image(path)], return_tensors="pt").to(model.device)
    ids = torch.cat([inputs["input_ids"][0], completion])[None]
    mm = torch.cat([inputs["mm_token_type_ids"][0], torch.zeros_like(completion)])[None]
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                   pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits
    logps = torch.log_softmax(logits[0, -len(completion) - 1:-1].float() / temperature, dim=-1)
    return inputs, logps.gather(-1, completion[:, None])[:, 0]


def test_grpo_padded_batch_gives_each_completion_its_unpadded_logps(tmp_path, manifest, mixed, tiny_backbone):
    """One process: the project's GRPO trainer generates one batch of the six mixed images (K = 2) the way
    trl does; each completion's per-token log-probs in trl's padded batch (left-padded prompts of different
    lengths, right-padded completions, image-token marks, stacked pixel rows) equal those of the same prompt,
    image and completion alone: trl's own per-token function on that row alone, and a plain forward of it
    built from scratch by the evaluation path's processor. So does trl's reference (KL) log-prob."""
    from aesr1.rl.rl import GRPOParams, RLStageConfig, build_trainer

    folder, _ = tiny_backbone
    images = len(mixed)
    cfg = RLStageConfig(model=str(folder), train_manifest=str(manifest), checkpoint_root=str(tmp_path / "ck"),
                        out_dir=str(tmp_path / "rapo"),
                        grpo=GRPOParams(num_generations=2, images_per_device=images, grad_accum=1, max_steps=2,
                                        max_completion_length=12, save_steps=1000, seed=0))
    trainer, processor, *_ = build_trainer(cfg, [], [])
    torch.manual_seed(0)
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch) == images * 2 and {x["image_id"] for x in batch} == set(mixed.image_id)
    trainer.model.train()  # as in trainer.train(): the training generation path (K = num_generations)
    out = trainer._generate_and_score_completions(batch)

    prompt_ids, prompt_mask = out["prompt_ids"], out["prompt_mask"]
    completion_ids, completion_mask = out["completion_ids"], out["completion_mask"]
    prompt_lengths = prompt_mask.sum(1)
    assert len(set(prompt_lengths.tolist())) >= 5, prompt_lengths  # the prompts really are padded
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    steps = completion_ids.size(1)
    model = trainer.model
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # trl's image-token marks sit exactly on the image_pad tokens of its left-padded prompts (trl#5785)
    marks = out["mm_token_type_ids"][:, : prompt_ids.size(1)] == 1
    misplaced = (marks != ((prompt_ids == image_pad) & (prompt_mask == 1))).any(1)
    assert not misplaced.any(), (f"rows {misplaced.nonzero().flatten().tolist()}: trl's mm_token_type_ids are not "
                                 f"on their prompt's image tokens (processor padding_side "
                                 f"{processor.tokenizer.padding_side!r}; trl left-pads the prompt ids)")

    with torch.no_grad():
        padded, _, _ = trainer._get_per_token_logps_and_entropies(
            model, ids, mask, steps, pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"],
            num_images=out["num_images"], mm_token_type_ids=out["mm_token_type_ids"])
        rows = np.cumsum([0, *out["image_grid_thw"].prod(-1).tolist()])
        paths = dict(zip(mixed.image_id, mixed.image_path))
        worst = {"trl_row_alone": 0.0, "plain_alone": 0.0, "reference": 0.0}
        for i, example in enumerate(batch):
            keep = mask[i].bool()
            length = int(completion_mask[i].sum())
            row, _, _ = trainer._get_per_token_logps_and_entropies(
                model, ids[i][keep][None], mask[i][keep][None], length,
                pixel_values=out["pixel_values"][rows[i]:rows[i + 1]], image_grid_thw=out["image_grid_thw"][i:i + 1],
                num_images=[1], mm_token_type_ids=out["mm_token_type_ids"][i][keep][None])
            completion = completion_ids[i, :length]
            inputs, plain = _alone_logps(model, processor, paths[example["image_id"]], completion, cfg.grpo.temperature)
            # trl's row is the evaluation path's prompt and pixels exactly
            assert torch.equal(prompt_ids[i][prompt_mask[i].bool()], inputs["input_ids"][0])
            assert torch.equal(out["pixel_values"][rows[i]:rows[i + 1]], inputs["pixel_values"])
            worst["trl_row_alone"] = max(worst["trl_row_alone"], float((padded[i, :length] - row[0]).abs().max()))
            worst["plain_alone"] = max(worst["plain_alone"], float((padded[i, :length] - plain).abs().max()))
            worst["reference"] = max(worst["reference"],
                                     float((out["ref_per_token_logps"][i, :length] - plain).abs().max()))
    print(f"max |logp padded - unpadded| over {len(batch)} completions (prompt lengths "
          f"{sorted(set(prompt_lengths.tolist()))}, completion lengths {completion_mask.sum(1).tolist()}): {worst}")
    assert max(worst.values()) < 1e-4, worst


def test_two_grpo_steps_over_mixed_sizes_on_two_processes(tmp_path, manifest, mixed, tiny_backbone):
    """build_trainer + trainer.train() on 2 processes (gloo): each step's global batch is the six mixed images
    (K = 2), three per process; both steps complete with finite losses."""
    folder, cfg = tiny_backbone
    processor = load_processor(folder)
    tokens = [int(np.prod(visual_grid(processor, load_image(p)))) // 4 for p in mixed.image_path]
    ranks = torchrun("rl", folder, manifest, tmp_path)
    assert [(r["world"], r["steps"]) for r in ranks] == [(2, 2)] * 2
    for r in ranks:
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"] + r["grad_norms"]), r
        assert len(r["visual_tokens"]) == 2 * 3 * 2  # 2 steps x 3 images x K
        assert len(set(r["visual_tokens"][:6])) > 1  # each process's batch mixes sizes
    # every image was trained on, K times per step, with the visual tokens of its size
    assert sorted(ranks[0]["visual_tokens"] + ranks[1]["visual_tokens"]) == sorted(tokens * 4)


def _runner():
    """tests/multiprocess/mixed_sizes.py as a module (its ``greedy``), as torchrun runs it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mixed_sizes_runner", REPO / "tests/multiprocess/mixed_sizes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image_policy(tmp_path_factory, mixed, tiny_backbone):
    """A policy whose greedy output depends on the image: the backbone, briefly SFT'd on the six images.

    The tiny backbone after its short pretraining writes the same text for every image (16 newlines),
    which would hide a batch's rows coming back mixed up or out of order. Thirty steps on one trajectory
    per image teach it the answer format, so each image gets its own answer or expected score. It trains on
    copies of the images shrunk to 4x the pixel budget (the 12 MP photo makes every step slow, and the
    processor reads a copy at the same grid anyway); it samples the originals.
    """
    folder, cfg = tiny_backbone
    root = tmp_path_factory.mktemp("image_policy")
    copies = []
    for path in mixed.image_path:
        copy = root / f"{Path(path).stem}.png"
        downscale(load_image(path), max_pixels=4 * pixel_budget(cfg)).save(copy)
        copies.append(str(copy))
    words = [Path(p).stem for p in mixed.image_path]
    train = pd.DataFrame({"image_path": copies,
                          "trajectory": [make_trajectory(f"A {w} frame.", s) for w, s in zip(words, mixed.score)]})
    model, processor = load_policy(folder, training="full")
    trainer = fit(model, processor, sft_dataset(train, "trajectory"),
                  TrainConfig(epochs=30, learning_rate=5e-3, lr_scheduler="constant", batch_size=len(train),
                              freeze_vision=False, save_steps=10_000, logging_steps=10), root / "ck")
    save_trained(trainer, processor, root / "policy")
    return root / "policy"


@pytest.fixture(scope="module")
def greedy_one_process(mixed, image_policy):
    model, processor = load_policy(image_policy)
    greedy = _runner().greedy
    return {name: greedy(model, processor, list(mixed.image_path), batch_size)
            for name, batch_size in (("batched", len(mixed)), ("single", 1))}


def _logit_gap(rows, reference) -> float:
    """The largest |logit difference| of each row against its reference row, over the reference's steps (a
    batched row goes on, padded, while the other rows of its batch decode)."""
    return max(float((row[: len(ref)] - ref).abs().max()) for row, ref in zip(rows, reference, strict=True))


def test_batched_greedy_sampling_equals_one_image_at_a_time(greedy_one_process):
    """sample(batch_size=6) over the mixed images (left-padded prompts of different lengths) gives what
    sample(batch_size=1) gives, image by image: texts, token counts, entropy, expected scores, and the
    logits of every decoding step."""
    (batched, batched_logits), (single, single_logits) = greedy_one_process["batched"], greedy_one_process["single"]
    # the check can tell the images apart: each has its own text or expected score
    fingerprints = list(zip(single.texts, single.expected))
    assert all(a[0] != b[0] or abs(a[1] - b[1]) > 1e-5 for i, a in enumerate(fingerprints)
               for b in fingerprints[i + 1:]), fingerprints
    assert batched.texts == single.texts
    assert batched.tokens == single.tokens
    assert batched.entropy == pytest.approx(single.entropy, abs=1e-5)
    np.testing.assert_allclose(batched.expected, single.expected, rtol=0, atol=1e-6)
    between = min(float((a[:8] - b[:8]).abs().max()) for i, a in enumerate(single_logits)
                  for b in single_logits[i + 1:])
    gap = _logit_gap(batched_logits, single_logits)
    print(f"greedy logits, batched vs one at a time: max |diff| {gap:.2e} (images differ by >= {between:.2e})")
    assert gap < 1e-4 < between


def test_batched_greedy_sampling_on_two_processes_equals_one_process(tmp_path, manifest, image_policy,
                                                                      greedy_one_process):
    """torchrun, 2 processes: the six images shard three and three; batched or one at a time, every process
    gets every result back in input order, as one process has them, and each process's rows decode with the
    logits one process has for those images."""
    single, single_logits = greedy_one_process["single"]
    ranks = torchrun("sample", image_policy, manifest, tmp_path)
    gaps = []
    for r in ranks:
        assert r["world"] == 2
        logits = torch.load(tmp_path / f"logits_rank{r['rank']}.pt")
        mine = single_logits[3 * r["rank"]: 3 * r["rank"] + 3]  # accelerate's contiguous split
        for name in ("batched", "single"):
            assert r[name]["texts"] == single.texts, (r["rank"], name)
            assert r[name]["tokens"] == single.tokens
            got = np.array([np.nan if e is None else e for e in r[name]["expected"]])
            np.testing.assert_allclose(got, single.expected, rtol=0, atol=1e-6)
            gaps.append(_logit_gap(logits[name], mine))
    print(f"greedy logits on 2 processes vs 1: max |diff| {max(gaps):.2e}")
    assert max(gaps) < 1e-4
