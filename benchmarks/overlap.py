"""The test-overlap check at real scale: how far copies and distinct pictures lie apart, and how fast it runs.

    python benchmarks/overlap.py [--photos 2000] [--aessynth data/aessynth] [--json]

1. Distances (bits of the 256-bit pHash, aesr1.data.overlap): each real photo (scikit-image's sample
   photographs and their halves, 21) and each AesSynth test image against its own copies (exact, JPEG
   quality 50, half size, double size, greyscale, and greyscale + half + JPEG 50), and every distinct pair.
   What ``ingest.overlap.max_distance`` must separate, and the false-positive rate at it: the share of
   distinct pairs at or below it (real photos; AesSynth's training images against its test images, as
   ingest compares them).
2. Throughput on 2 cores: ``--photos`` JPEG photos of 640 x 480 (AVA's typical size: the sample photos
   resized, each made distinct by a shift), hashed by ``image_hashes`` on the workers ingest uses, then read
   back from the cache; and ``nearest`` over 25,500 training x 20,000 test hashes. Extrapolated to AVA's
   255,000 images (hashing) and 255,000 x 20,000 pairs (matching).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import jpeg, real_photos  # noqa: E402  (the photos tests/test_overlap.py plants)

from aesr1.data import overlap  # noqa: E402

AVA_IMAGES = 255_000
TEST_IMAGES = 20_000


COPIES = {
    "exact": lambda im: im,
    "jpeg q50": lambda im: jpeg(im, 50),
    "half size": lambda im: im.resize((max(8, im.width // 2), max(8, im.height // 2)), Image.LANCZOS),
    "double size": lambda im: im.resize((im.width * 2, im.height * 2), Image.BICUBIC),
    "greyscale": lambda im: im.convert("L").convert("RGB"),
    "grey + half + jpeg q50": lambda im: jpeg(im.convert("L").convert("RGB").resize(
        (max(8, im.width // 2), max(8, im.height // 2)), Image.LANCZOS), 50),
}


def hashes_of(images: list[Image.Image], folder: Path) -> np.ndarray:
    paths = []
    for i, image in enumerate(images):
        paths.append(str(folder / f"{i}.png"))
        image.save(paths[-1])
    return overlap.image_hashes(paths)


def pair_distances(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Every pair's distance (within ``a`` when ``b`` is None, each pair once)."""
    if b is None:
        i, j = np.triu_indices(len(a), k=1)
        return sum(np.bitwise_count(a[i, w] ^ a[j, w]) for w in range(a.shape[1]))
    return sum(np.bitwise_count(a[:, None, w] ^ b[None, :, w]) for w in range(a.shape[1])).ravel()


def distances(images: list[Image.Image], folder: Path) -> dict:
    originals = hashes_of(images, folder)
    copies = {}
    for name, make in COPIES.items():
        copied = hashes_of([make(im) for im in images], folder)
        d = sum(np.bitwise_count(originals[:, w] ^ copied[:, w]) for w in range(originals.shape[1]))
        copies[name] = {"max": int(d.max()), "mean": round(float(d.mean()), 1)}
    distinct = pair_distances(originals)
    return {"images": len(images), "copies": copies,
            "distinct": {"pairs": len(distinct), "min": int(distinct.min()),
                         "1st percentile": float(np.percentile(distinct, 1))}}


def aessynth_distances(root: Path, folder: Path, max_distance: int) -> dict:
    """AesSynth's test images against their copies, and its training images against its test images."""
    import yaml

    from aesr1.data.ingest import IngestConfig, collect_source

    section = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["ingest"]
    section.update(raw_root=str(root), out_dir=str(folder / "ingest"))
    cfg = IngestConfig(**section)
    rows = pd.concat([collect_source(name, src, root, "header", 4, cfg.seed)[0] for name, src in cfg.sources.items()])
    test, train = rows[rows.split == "test"], rows[rows.split == "train"]
    sample = test.sample(min(300, len(test)), random_state=0)
    result = distances([Image.open(p).convert("RGB") for p in sample.image_path], folder)
    train_hashes = overlap.image_hashes(list(train.image_path))
    test_hashes = overlap.image_hashes(list(test.image_path))
    nearest, _ = overlap.nearest(train_hashes, test_hashes)
    result["train vs test"] = {"train images": len(train), "test images": len(test), "min": int(nearest.min()),
                               f"train images within {max_distance}": int((nearest <= max_distance).sum())}
    return result


def throughput(photos: int, folder: Path, workers: int) -> dict:
    sources = [im.resize((640, 480), Image.LANCZOS) for im in real_photos()]
    paths = []
    for i in range(photos):
        base = np.asarray(sources[i % len(sources)])
        shifted = np.roll(base, shift=(i // len(sources)) * 3, axis=1)  # distinct files, photo-like content
        paths.append(str(folder / f"p{i}.jpg"))
        Image.fromarray(shifted).save(paths[-1], quality=90)
    cache = str(folder / "cache.parquet")
    started = time.perf_counter()
    overlap.image_hashes(paths, cache, workers)
    hashing = time.perf_counter() - started
    started = time.perf_counter()
    overlap.image_hashes(paths, cache, workers)
    cached = time.perf_counter() - started
    rng = np.random.default_rng(0)
    train = rng.integers(0, 2**63, (AVA_IMAGES // 10, overlap.WORDS), dtype=np.uint64)
    test = rng.integers(0, 2**63, (TEST_IMAGES, overlap.WORDS), dtype=np.uint64)
    started = time.perf_counter()
    overlap.nearest(train, test)
    matching = time.perf_counter() - started
    rate = photos / hashing
    return {"workers": workers, "photos": photos, "hashing_images_per_s": round(rate, 1),
            "ava_255k_hashing_minutes": round(AVA_IMAGES / rate / 60, 1),
            "cached_rerun_images_per_s": round(photos / cached, 1),
            "matching_25500_x_20000_s": round(matching, 2), "ava_255k_x_20k_matching_s": round(matching * 10, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--aessynth", default="data/aessynth", help="an AesSynth folder (dvc repro synth)")
    parser.add_argument("--max-distance", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        real = real_photos()
        report = {"max_distance": args.max_distance, "real photos": distances(real, folder)}
        hashes = hashes_of(real, folder)
        distinct = pair_distances(hashes)
        report["real photos"]["false positives at max_distance"] = \
            f"{int((distinct <= args.max_distance).sum())} of {len(distinct)} distinct pairs"
        if Path(args.aessynth).is_dir():
            report["aessynth"] = aessynth_distances(Path(args.aessynth), folder, args.max_distance)
        report["throughput"] = throughput(args.photos, folder, args.workers)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for section, figures in report.items():
        print(f"{section}: {json.dumps(figures, indent=1) if isinstance(figures, dict) else figures}")


if __name__ == "__main__":
    main()
