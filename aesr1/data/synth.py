"""AesSynth: a procedural image-score dataset written in the five real datasets' native formats.

Every image has five latent factors (see :mod:`aesr1.data.render`). Each dataset has
its own population of raters with their own taste over the factors; their noisy
ratings become the dataset's native labels (AVA vote histograms, FLICKR-AES per-worker
ratings, PARA means, ...). PARA and AADB draw factors from shifted distributions and
render in another style, so they are out of domain.

A sidecar CSV (``aessynth_latent.csv``) records each image's factors and noiseless
latent score; training never reads it, evaluation uses it for the noise ceiling.
The generator can also plant a few faults of the kinds real annotation files have
(missing and truncated images, malformed lines, out-of-scale scores, duplicates,
paths escaping the image root) so the default run exercises ingest's quarantine.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from aesr1.config import config
from aesr1.data.render import FACTORS, Grid, render
from aesr1.errors import AesError

DATASETS = ("ava", "tad66k", "flickr_aes", "para", "aadb")
LATENT_FILE = "aessynth_latent.csv"


@dataclass(frozen=True)
class Population:
    """How a dataset's images are drawn and rated."""

    style: str
    factor_beta: tuple[float, float]  # Beta(a, b) for every factor
    taste: tuple[float, ...]  # mean weight per factor, order of FACTORS
    raters_per_image: int
    rater_noise: float  # std of one rating on the unit scale


POPULATIONS = {
    "ava": Population("photo", (2.2, 2.2), (0.15, 0.20, 0.30, 0.20, 0.15), 40, 0.16),
    "tad66k": Population("photo", (2.2, 2.2), (0.20, 0.25, 0.20, 0.15, 0.20), 20, 0.15),
    "flickr_aes": Population("photo", (2.2, 2.2), (0.25, 0.15, 0.15, 0.30, 0.15), 5, 0.14),
    "para": Population("painted", (3.0, 1.8), (0.20, 0.20, 0.20, 0.20, 0.20), 25, 0.15),
    "aadb": Population("painted", (1.8, 2.6), (0.15, 0.25, 0.25, 0.15, 0.20), 5, 0.14),
}


@config
class SplitSize:
    train: int = 0
    test: int = 0


@config
class SynthConfig:
    """Params section ``synth``."""

    seed: int = 0
    out_dir: str = "data/aessynth"
    image_size: int = 64
    jpeg_quality: int = 92
    workers: int = 2
    fault_fraction: float = 0.005
    sizes: dict[str, SplitSize] = field(default_factory=lambda: {
        "ava": SplitSize(620, 150), "tad66k": SplitSize(620, 150), "flickr_aes": SplitSize(310, 150),
        "para": SplitSize(0, 150), "aadb": SplitSize(0, 150),
    })


def taste_score(factors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Nonlinear aesthetic judgement on [0, 1]: concave in each factor, gated by light.

    ``factors`` (..., 5) and ``weights`` (..., 5) broadcast; weights are normalised.
    Bad exposure or lighting caps how good an image can look, whatever else it has.
    """
    w = weights / weights.sum(axis=-1, keepdims=True)
    quality = (w * factors**0.8).sum(axis=-1)
    gate = 0.55 + 0.45 * np.sqrt(np.minimum(factors[..., 0], factors[..., 1]))
    return np.clip(1.15 * quality * gate - 0.02, 0.0, 1.0)


def rate(factors: np.ndarray, pop: Population, rng: np.random.Generator, n_raters: int) -> np.ndarray:
    """Unit-scale ratings (n_images, n_raters): each rater has own weights, bias and noise."""
    n = len(factors)
    taste = np.asarray(pop.taste)
    weights = taste * np.exp(rng.normal(0, 0.3, (n, n_raters, len(FACTORS))))
    bias = rng.normal(0, 0.05, (n, n_raters))
    noise = rng.normal(0, pop.rater_noise, (n, n_raters))
    return taste_score(factors[:, None, :], weights) + bias + noise


def to_scale(unit: np.ndarray, low: int, high: int, step: float = 1.0) -> np.ndarray:
    """Quantise unit-scale ratings to a rating scale [low, high] with the given step."""
    raw = low + np.clip(unit, 0, 1) * (high - low)
    return np.clip(np.round(raw / step) * step, low, high)


def _render_job(args: tuple) -> None:
    path, factors, style, seed, size, quality = args
    rng = np.random.default_rng(seed)
    pixels = render(factors, style, rng, Grid.of(size))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=quality)


def _hex_name(rng: np.random.Generator, n_hex: int) -> str:
    return "".join(rng.choice(list("0123456789abcdef"), n_hex))


@dataclass
class _Images:
    """The images of one dataset: native names, split, factors, latent score."""

    names: list[str]
    split: np.ndarray
    factors: np.ndarray
    latent: np.ndarray


def _draw(dataset: str, size: SplitSize, rng: np.random.Generator) -> _Images:
    pop = POPULATIONS[dataset]
    n = size.train + size.test
    factors = rng.beta(*pop.factor_beta, size=(n, len(FACTORS)))
    split = np.array(["train"] * size.train + ["test"] * size.test)
    rng.shuffle(split)
    if dataset == "ava":
        ids = rng.choice(np.arange(100_000, 999_999), n, replace=False)
        names = [str(i) for i in ids]
    elif dataset == "tad66k":
        names = [f"{_hex_name(rng, 10)}.jpg" for _ in range(n)]
    elif dataset == "flickr_aes":
        names = [f"{rng.integers(10**9, 10**10)}_{_hex_name(rng, 10)}_b.jpg" for _ in range(n)]
    elif dataset == "para":
        names = [f"session{rng.integers(1, 40)}/iaa_pub{i + 1}_.jpg" for i in range(n)]
    else:
        names = [f"farm1_{rng.integers(10**9, 10**10)}_{_hex_name(rng, 8)}.jpg" for _ in range(n)]
    latent = taste_score(factors, np.asarray(pop.taste))
    return _Images(names, split, factors, latent)


def _faults(n: int, fraction: float) -> int:
    return int(np.ceil(n * fraction)) if fraction > 0 else 0


class _Writer:
    """Writes one dataset's annotation files in its native format and queues its images."""

    def __init__(self, root: Path, cfg: SynthConfig, rng: np.random.Generator):
        self.root, self.cfg, self.rng = root, cfg, rng
        self.jobs: list[tuple] = []
        self.latent_rows: list[list] = []

    def queue(self, dataset: str, images: _Images, paths: list[Path]) -> None:
        style = POPULATIONS[dataset].style
        for name, path, f, latent in zip(images.names, paths, images.factors, images.latent):
            seed = int.from_bytes(hashlib.sha256(f"{self.cfg.seed}/{dataset}/{name}".encode()).digest()[:8], "little")
            self.jobs.append((path, f, style, seed, self.cfg.image_size, self.cfg.jpeg_quality))
            self.latent_rows.append([dataset, name, f"{latent:.6f}", *(f"{v:.6f}" for v in f)])

    def ava(self, im: _Images) -> None:
        d = self.root / "AVA"
        ratings = to_scale(rate(im.factors, POPULATIONS["ava"], self.rng, POPULATIONS["ava"].raters_per_image), 1, 10)
        lines = []
        for i, (name, r) in enumerate(zip(im.names, ratings), start=1):
            votes = np.bincount(r.astype(int), minlength=11)[1:]
            tags = self.rng.integers(0, 66, 2)
            lines.append(f"{i} {name} {' '.join(map(str, votes))} {tags[0]} {tags[1]} {self.rng.integers(1, 1400)}")
        n_faults = _faults(len(lines), self.cfg.fault_fraction)
        for k in range(n_faults):
            kind = k % 4
            if kind == 0:  # a duplicated id
                lines.append(lines[k])
            elif kind == 1:  # malformed: too few columns
                lines.append(f"{len(lines) + 1} {2_000_000 + k} 1 2 3")
            elif kind == 2:  # no votes at all: the MOS is undefined
                lines.append(f"{len(lines) + 1} {3_000_000 + k} 0 0 0 0 0 0 0 0 0 0 0 0 {k}")
            else:  # a line whose image was never rendered
                lines.append(f"{len(lines) + 1} {1_000_000 + k} 0 1 3 8 12 9 4 2 1 0 0 0 {k}")
        d.mkdir(parents=True, exist_ok=True)
        (d / "AVA.txt").write_text("\n".join(lines) + "\n")
        (d / "test_ids.txt").write_text("\n".join(n for n, s in zip(im.names, im.split) if s == "test") + "\n")
        self.queue("ava", im, [d / "images" / f"{n}.jpg" for n in im.names])

    def tad66k(self, im: _Images) -> None:
        d = self.root / "TAD66K"
        pop = POPULATIONS["tad66k"]
        mos = to_scale(rate(im.factors, pop, self.rng, pop.raters_per_image), 1, 10).mean(axis=1)
        rows = {"train": [], "test": []}
        for name, m, s in zip(im.names, mos, im.split):
            rows[s].append(f"{name},{m:.4f}")
        n_faults = _faults(len(im.names), self.cfg.fault_fraction)
        for k in range(n_faults):
            rows["train"].append(f"bad_score_{k}.jpg,{11.5 if k % 2 == 0 else 'nan'}")
        (d / "labels").mkdir(parents=True, exist_ok=True)
        for split, lines in rows.items():
            (d / "labels" / f"{split}.csv").write_text("image,score\n" + "\n".join(lines) + "\n")
        self.queue("tad66k", im, [d / "images" / n for n in im.names])

    def flickr_aes(self, im: _Images) -> None:
        d = self.root / "FLICKR-AES"
        pop = POPULATIONS["flickr_aes"]
        ratings = to_scale(rate(im.factors, pop, self.rng, pop.raters_per_image), 1, 5).astype(int)
        workers = [f"A{_hex_name(self.rng, 12).upper()}" for _ in range(60)]
        score_lines, worker_lines = [], []
        for name, r in zip(im.names, ratings):
            score_lines.append(f"{name} {r.mean():.1f}")
            for w, v in zip(self.rng.choice(workers, len(r), replace=False), r):
                worker_lines.append(f"{w},  {name},  {v}")
        n_faults = _faults(len(im.names), self.cfg.fault_fraction)
        for k in range(n_faults):
            if k % 2 == 0:  # a path that escapes the image root
                score_lines.append(f"../../outside_{k}.jpg 3.0")
            else:  # a worker rating outside 1..5
                worker_lines.append(f"{workers[0]},  {im.names[k]},  7")
        d.mkdir(parents=True, exist_ok=True)
        (d / "FLICKR-AES_image_score.txt").write_text("\n".join(score_lines) + "\n")
        (d / "FLICKR-AES_image_labeled_by_each_worker.csv").write_text(
            "worker, imagePair, score\n" + "\n".join(worker_lines) + "\n")
        (d / "test_ids.txt").write_text("\n".join(n for n, s in zip(im.names, im.split) if s == "test") + "\n")
        self.queue("flickr_aes", im, [d / "40K" / n for n in im.names])

    def para(self, im: _Images) -> None:
        d = self.root / "PARA"
        pop = POPULATIONS["para"]
        ratings = to_scale(rate(im.factors, pop, self.rng, pop.raters_per_image), 1, 5, step=0.5)
        levels = np.arange(1, 5.5, 0.5)  # PARA's score distribution: raters per level, aestheticScore_1.0 .. _5.0
        header = ["sessionId", "imageName", "qualityScore_mean", *(f"aestheticScore_{v:.1f}" for v in levels),
                  "aestheticScore_mean", "aestheticScore_std", "compositionScore_mean", "colorScore_mean"]
        rows = {"train": [], "test": []}
        for name, r, f, s in zip(im.names, ratings, im.factors, im.split):
            session, image = name.split("/")
            counts = [int(np.isclose(r, v).sum()) for v in levels]
            rows[s].append([session, image, f"{1 + 4 * f[0]:.2f}", *counts, f"{r.mean():.4f}", f"{r.std():.4f}",
                            f"{1 + 4 * f[2]:.2f}", f"{1 + 4 * f[3]:.2f}"])
        n_faults = _faults(len(im.names), self.cfg.fault_fraction)
        for k in range(n_faults):  # rows whose image file does not exist
            counts = [pop.raters_per_image if v == 3 else 0 for v in levels]
            rows["test"].append(["session1", f"missing_{k}.jpg", "3", *counts, "3.0", "0.5", "3", "3"])
        (d / "annotation").mkdir(parents=True, exist_ok=True)
        for split, split_rows in (("Train", rows["train"]), ("Test", rows["test"])):
            with open(d / "annotation" / f"PARA-Giaa{split}.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(header)
                writer.writerows(split_rows)
        self.queue("para", im, [d / "imgs" / n for n in im.names])

    def aadb(self, im: _Images) -> None:
        d = self.root / "AADB"
        pop = POPULATIONS["aadb"]
        scores = (to_scale(rate(im.factors, pop, self.rng, pop.raters_per_image), 1, 5).mean(axis=1) - 1) / 4
        files = {"train": [], "test": []}
        paths = []
        for i, (name, sc, s) in enumerate(zip(im.names, scores, im.split)):
            files[s].append(f"{name} {sc:.3f}")
            # some test copies carry their score as a file-name prefix, as in AADB's test folder
            prefixed = s == "test" and i % 3 == 0
            folder = "AADB_newtest" if s == "test" else "datasetImages_warp256"
            paths.append(d / folder / (f"{sc:.3f}_{name}" if prefixed else name))
        n_faults = _faults(len(im.names), self.cfg.fault_fraction)
        for k in range(n_faults):
            files["test"].append(f"{im.names[k]} 1.700" if k % 2 == 0 else "farm1_broken_line")
        d.mkdir(parents=True, exist_ok=True)
        (d / "imgListTrainRegression_score.txt").write_text("\n".join(files["train"]) + "\n")
        (d / "imgListValidationRegression_score.txt").write_text("")
        (d / "imgListTestNewRegression_score.txt").write_text("\n".join(files["test"]) + "\n")
        self.queue("aadb", im, paths)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def generate(cfg: SynthConfig) -> dict:
    """Write AesSynth under ``cfg.out_dir`` (replacing it); return counts for the metrics file."""
    root = Path(cfg.out_dir)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    unknown = set(cfg.sizes) - set(DATASETS)
    if unknown:
        raise AesError(f"synth.sizes names unknown datasets {sorted(unknown)}; known: {list(DATASETS)}")

    jobs: list[tuple] = []
    latent_rows: list[list] = []
    counts = {}
    for dataset in DATASETS:
        size = cfg.sizes.get(dataset, SplitSize())
        if size.train + size.test == 0:
            continue
        # one generator per dataset so a dataset's content does not depend on the others' sizes
        rng = np.random.default_rng([cfg.seed, DATASETS.index(dataset)])
        writer = _Writer(root, cfg, rng)
        getattr(writer, dataset)(_draw(dataset, size, rng))
        jobs += writer.jobs
        latent_rows += writer.latent_rows
        counts[dataset] = {"train": size.train, "test": size.test}

    workers = max(1, cfg.workers)
    if workers == 1:
        for job in jobs:
            _render_job(job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_render_job, jobs, chunksize=64))

    truncated = 0
    if cfg.fault_fraction > 0 and "ava" in counts:
        # a truncated JPEG, as a real download sometimes is
        ava_images = sorted((root / "AVA" / "images").glob("*.jpg"))
        for path in ava_images[: _faults(len(ava_images), cfg.fault_fraction / 2)]:
            _truncate(path)
            truncated += 1

    with open(root / LATENT_FILE, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "name", "latent_score", *FACTORS])
        w.writerows(latent_rows)
    return {"images": len(jobs), "datasets": counts, "truncated_images": truncated}


def synth(cfg: SynthConfig, recorder) -> dict:
    """The ``synth`` stage: generate AesSynth; the sidecar of latent scores goes to MLflow."""
    counts = generate(cfg)
    recorder.artifact(Path(cfg.out_dir) / LATENT_FILE)
    return counts
