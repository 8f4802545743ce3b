"""The ingest stage: native annotation files -> a clean, checked train/test manifest.

Per source: parse with its adapter, then the same checks for every format, in this
order, the first failure being the recorded reason:

``score_nan`` / ``score_out_of_scale`` (MOS vs the source's ``scale``), ``path_escape``
(the image path leaves the image root), ``missing_image``, ``unreadable_image``,
``duplicate_id`` (a later line with an id already accepted). Adapter-level reasons:
``malformed_line``, ``rating_out_of_scale`` (FLICKR-AES worker ratings).

Then, across every source: a training row whose image is a copy of a test image (of any
dataset; exact, re-encoded, resized or greyscale: :mod:`aesr1.data.overlap`) is quarantined as
``test_overlap``, naming the test image; test images that copy another dataset's test image are
listed in ``test_duplicates.parquet`` and kept (each test set is published as it is).

A source that cannot be read at all (a missing file, a header without the columns its
format needs) is recorded as one ``source_unreadable`` row and counts as wholly rejected:
every other source is still read and checked, then the ``max_reject_rate`` rule fails the
stage naming each such source, so a dataset never silently drops out of the mix or the
test sets. Leave it out of ``sources`` to go on without it.

Score normalisation to [0, 1], per source (``normalise``):

- ``linear``: ``(mos - scale[0]) / (scale[1] - scale[0])``, the nominal scale mapped to [0, 1];
- ``minmax``: the observed range of the source's accepted MOS mapped to [0, 1].

Splits: a file whose role names the split (TAD66K, PARA, AADB) decides it; otherwise
``test_ids`` (a file of native ids) or ``test_fraction`` (a stable hash of the id).
A source with ``role: test`` (PARA, AADB: out of domain) goes to test whole.
The training set mixes the ``mix`` sources by weight (AVA:TAD66K:FLICKR-AES = 2:2:1) up
to ``train_size``; if a pool is too small, every quota shrinks by the same factor so
the ratio holds, and the shortfall is reported.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image

from aesr1.checks import validate
from aesr1.config import config
from aesr1.data.adapters import ADAPTERS, ENCODING, AnnotationError, Entry, Rejection
from aesr1.data.overlap import BITS, OverlapConfig, image_hashes, nearest
from aesr1.errors import AesError
from aesr1.stage import Recorder

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["image_id", "dataset", "split", "image_path", "mos", "score", "n_ratings",
                    "native_id", "source_file", "source_line"]
REJECTED_COLUMNS = ["dataset", "source_file", "line", "native_id", "reason", "detail", "raw"]


@config
class SourceConfig:
    format: str  # a reader of adapters.ADAPTERS
    files: dict[str, str]
    image_root: str
    scale: tuple[float, float]
    role: Literal["train_test", "test"] = "train_test"
    normalise: Literal["linear", "minmax"] = "linear"
    test_ids: str | None = None
    test_fraction: float | None = None

    def __post_init__(self):
        if self.format not in ADAPTERS:
            raise ValueError(f"format must be one of {sorted(ADAPTERS)} (aesr1/data/adapters.py), got {self.format!r}")


@config
class IngestConfig:
    """Params section ``ingest``. Source paths are relative to ``raw_root`` unless absolute."""

    raw_root: str = "data/aessynth"
    out_dir: str = "data/ingest"
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    mix: dict[str, float] = field(default_factory=lambda: {"ava": 2, "tad66k": 2, "flickr_aes": 1})
    train_size: int = 1500
    test_max_per_dataset: int | None = None
    seed: int = 0
    max_reject_rate: float = 0.05
    mix_tolerance: float = 0.02
    min_test_per_dataset: int = 1
    verify_images: Literal["full", "header"] = "full"
    io_workers: int = 8
    overlap: OverlapConfig = field(default_factory=OverlapConfig)


class IngestError(AesError):
    """Ingest cannot produce a trustworthy manifest (too many rejections, bad config)."""


def _stable_unit(seed: int, key: str) -> float:
    digest = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def _image_problem(path: Path, mode: str) -> str | None:
    """None if the image opens, else the rejection reason with detail."""
    if not path.is_file():
        return "missing_image"
    try:
        with Image.open(path) as img:
            if mode == "full":
                img.load()  # decodes every byte: catches truncated files, unlike verify()
    except Exception as err:  # PIL raises many types for broken files
        return f"unreadable_image:{type(err).__name__}: {err}"
    return None


def _reject(dataset: str, rej: Rejection) -> dict:
    return {"dataset": dataset, **asdict(rej)}


def collect_source(name: str, src: SourceConfig, raw_root: Path, verify: str, workers: int,
                   seed: int) -> tuple[pd.DataFrame, list[dict]]:
    """Parse and check one source; return its accepted rows (before mixing) and rejections."""
    def resolve(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else raw_root / p

    image_root = resolve(src.image_root)
    files = {role: resolve(p) for role, p in src.files.items()}
    low, high = src.scale
    rejected: list[dict] = []
    candidates: list[tuple[Entry, Path]] = []
    root_real = image_root.resolve()
    for item in ADAPTERS[src.format](files, image_root):
        if isinstance(item, Rejection):
            rejected.append(_reject(name, item))
            continue
        base = dict(source_file=item.source_file, line=item.line, native_id=item.native_id)
        if not np.isfinite(item.mos):
            rejected.append(_reject(name, Rejection(**base, reason="score_nan", detail=f"MOS is {item.mos}")))
            continue
        if not low <= item.mos <= high:
            rejected.append(_reject(name, Rejection(
                **base, reason="score_out_of_scale", detail=f"MOS {item.mos} outside [{low}, {high}]")))
            continue
        path = image_root / item.image_rel
        if not path.resolve().is_relative_to(root_real):
            rejected.append(_reject(name, Rejection(
                **base, reason="path_escape", detail=f"{item.image_rel!r} leaves the image root {image_root}")))
            continue
        candidates.append((item, path))

    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = list(pool.map(lambda c: _image_problem(c[1], verify), candidates))

    rows = []
    seen: dict[str, str] = {}
    for (item, path), problem in zip(candidates, problems):
        base = dict(source_file=item.source_file, line=item.line, native_id=item.native_id)
        if problem:
            reason, _, detail = problem.partition(":")
            rejected.append(_reject(name, Rejection(**base, reason=reason, detail=detail or str(path))))
            continue
        if item.native_id in seen:
            rejected.append(_reject(name, Rejection(
                **base, reason="duplicate_id", detail=f"id already taken at {seen[item.native_id]}")))
            continue
        seen[item.native_id] = f"{Path(item.source_file).name}:{item.line}"
        rows.append({
            "image_id": f"{name}/{item.native_id}", "dataset": name, "split": item.split,
            "image_path": str(path), "mos": float(item.mos), "n_ratings": item.n_ratings,
            "native_id": item.native_id, "source_file": item.source_file, "source_line": item.line,
        })
    frame = pd.DataFrame(rows, columns=[c for c in MANIFEST_COLUMNS if c != "score"])
    frame["n_ratings"] = frame["n_ratings"].astype("Int64")

    if src.normalise == "linear":
        frame["score"] = (frame["mos"] - low) / (high - low)
    else:
        lo, hi = frame["mos"].min(), frame["mos"].max()
        frame["score"] = (frame["mos"] - lo) / (hi - lo) if hi > lo else 0.5

    if src.role == "test":
        frame["split"] = "test"
    elif frame["split"].isna().any():
        undecided = frame["split"].isna()
        if src.test_ids:
            text = resolve(src.test_ids).read_text(encoding=ENCODING, errors="replace")
            test_ids = {line.strip() for line in text.splitlines() if line.strip()}
            frame.loc[undecided, "split"] = np.where(frame.loc[undecided, "native_id"].isin(test_ids), "test", "train")
        elif src.test_fraction is not None:
            is_test = frame.loc[undecided, "native_id"].map(lambda i: _stable_unit(seed, i) < src.test_fraction)
            frame.loc[undecided, "split"] = np.where(is_test, "test", "train")
        else:
            raise IngestError(f"source '{name}': its files do not name a split; set test_ids or test_fraction")
    return frame[MANIFEST_COLUMNS], rejected


def mix_quotas(pools: dict[str, int], weights: dict[str, float], train_size: int) -> tuple[dict[str, int], float]:
    """Per-source train counts in the ratio of ``weights`` summing to at most ``train_size``.

    Returns the quotas and the scale applied (1.0 unless a pool was too small).
    """
    total = sum(weights.values())
    wanted = {d: train_size * w / total for d, w in weights.items()}
    scale = min([1.0] + [pools.get(d, 0) / q for d, q in wanted.items() if q > 0])
    quotas = {d: int(np.floor(q * scale)) for d, q in wanted.items()}
    # hand the rounding remainder to the sources with the largest fractional parts
    remainder = int(round(sum(wanted.values()) * scale)) - sum(quotas.values())
    for d in sorted(wanted, key=lambda d: (wanted[d] * scale) % 1, reverse=True)[:remainder]:
        if quotas[d] < pools.get(d, 0):
            quotas[d] += 1
    return quotas, scale


def _sample(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A deterministic sample that does not depend on the order of lines in the files."""
    ordered = frame.sort_values("image_id", kind="stable")
    if n >= len(ordered):
        return ordered
    idx = np.random.default_rng(seed).choice(len(ordered), n, replace=False)
    return ordered.iloc[np.sort(idx)]


def quarantine_test_copies(manifest: pd.DataFrame, test: pd.DataFrame, cfg: OverlapConfig,
                           workers: int) -> tuple[pd.DataFrame, list[dict], pd.DataFrame]:
    """(``manifest`` less its training rows whose image copies a test image, with ``nearest_test_distance`` on the
    training rows kept; those rows' rejections, ``test_overlap``; the test images that copy another dataset's).
    """
    train = manifest[manifest.split == "train"]
    hashes = image_hashes(list(test.image_path) + list(train.image_path), cfg.cache, workers)
    test_hashes, train_hashes = hashes[:len(test)], hashes[len(test):]
    distance, index = nearest(train_hashes, test_hashes)
    copies = distance <= cfg.max_distance
    rejected = [_reject(row.dataset, Rejection(
        row.source_file, int(row.source_line), "test_overlap",
        f"a copy of test image {test.image_id.iloc[i]} ({test.image_path.iloc[i]}; {d} of {BITS} hash bits differ)",
        native_id=row.native_id)) for row, i, d in zip(train[copies].itertuples(), index[copies], distance[copies])]
    kept = manifest.drop(index=train.index[copies])
    kept["nearest_test_distance"] = pd.Series(distance[~copies], index=train.index[~copies], dtype="Int64")

    pairs = []
    for name in test.dataset.unique():  # each test set against the others' (within one set: its own business)
        own, others = (test.dataset == name).to_numpy(), (test.dataset != name).to_numpy()
        d, j = nearest(test_hashes[own], test_hashes[others])
        other = test[others]
        pairs += [{"image_id": a, "image_path": pa, "copy_of": other.image_id.iloc[k],
                   "copy_path": other.image_path.iloc[k], "distance": int(dist)}
                  for a, pa, k, dist in zip(test.image_id[own], test.image_path[own], j, d)
                  if dist <= cfg.max_distance and a < other.image_id.iloc[k]]  # each pair once
    duplicates = pd.DataFrame(pairs, columns=["image_id", "image_path", "copy_of", "copy_path", "distance"])
    return kept, rejected, duplicates


def _expectations(sources: list[str], train_size: int, cfg: IngestConfig):
    import great_expectations.expectations as gxe

    manifest = [
        gxe.ExpectColumnValuesToBeUnique(column="image_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="score"),
        gxe.ExpectColumnValuesToBeBetween(column="score", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToNotBeNull(column="mos"),
        gxe.ExpectColumnValuesToBeInSet(column="dataset", value_set=sources),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "test"]),
        gxe.ExpectColumnValuesToBeInSet(column="image_exists", value_set=[True]),
    ]
    # no training image is a copy of a test image (ingest quarantined them): checked on what is written
    overlap = [gxe.ExpectColumnValuesToBeBetween(column="nearest_test_distance",
                                                 min_value=cfg.overlap.max_distance + 1)]
    summary = [
        gxe.ExpectColumnValuesToBeBetween(column="mix_error", min_value=0.0, max_value=cfg.mix_tolerance),
        gxe.ExpectColumnValuesToBeBetween(column="test_rows", min_value=cfg.min_test_per_dataset),
        gxe.ExpectColumnSumToBeBetween(column="train_rows", min_value=train_size, max_value=train_size),
    ]
    return manifest, overlap, summary


def ingest(cfg: IngestConfig, recorder: Recorder) -> dict:
    """Run the ingest stage; writes train/test/rejected parquet files and data-check reports."""
    if not cfg.sources:
        raise IngestError("ingest.sources is empty: configure at least one dataset")
    unknown_mix = set(cfg.mix) - set(cfg.sources)
    if unknown_mix:
        raise IngestError(f"ingest.mix names sources that are not configured: {sorted(unknown_mix)}")
    raw_root = Path(cfg.raw_root)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    frames, rejected, per_source = [], [], {}
    for name, src in cfg.sources.items():
        try:
            frame, rej = collect_source(name, src, raw_root, cfg.verify_images, cfg.io_workers, cfg.seed)
        except (AnnotationError, OSError) as err:  # this source only: the others are still read
            path = err.path if isinstance(err, AnnotationError) else err.filename
            log.error("%s: cannot be read: %s", name, err)
            rejected.append(_reject(name, Rejection(str(path or ""), 0, "source_unreadable", str(err))))
            per_source[name] = {"accepted": 0, "rejected": 0, "reject_rate": 1.0,
                                "rejected_by_reason": {"source_unreadable": 1}, "error": str(err)}
            continue
        frames.append(frame)
        rejected += rej
        seen = len(frame) + len(rej)
        per_source[name] = {
            "accepted": len(frame), "rejected": len(rej),
            "reject_rate": len(rej) / seen if seen else 0.0,
            "rejected_by_reason": dict(Counter(r["reason"] for r in rej)),
        }
        log.info("%s: %d accepted, %d rejected %s", name, len(frame), len(rej),
                 per_source[name]["rejected_by_reason"] or "")

    too_many = {n: s for n, s in per_source.items() if s["reject_rate"] > cfg.max_reject_rate}
    if too_many:
        lines = [f"{n}: unreadable, the whole source is rejected: {s['error']}" if "error" in s else
                 f"{n}: {s['rejected']}/{s['rejected'] + s['accepted']} rejected ({s['reject_rate']:.1%}): "
                 f"{s['rejected_by_reason']}" for n, s in too_many.items()]
        pd.DataFrame(rejected, columns=REJECTED_COLUMNS).to_parquet(out / "rejected.parquet", index=False)
        recorder.artifact(out / "rejected.parquet")
        raise IngestError(f"rejection rate above max_reject_rate={cfg.max_reject_rate:.1%}:\n  " + "\n  ".join(lines)
                          + f"\nsee {out / 'rejected.parquet'} for each line and its reason")

    manifest = pd.concat(frames, ignore_index=True)
    tests = []
    for d in cfg.sources:
        pool = manifest[(manifest.dataset == d) & (manifest.split == "test")]
        tests.append(_sample(pool, cfg.test_max_per_dataset or len(pool), cfg.seed))
    test = pd.concat(tests, ignore_index=True)
    manifest, copies, test_duplicates = quarantine_test_copies(manifest, test, cfg.overlap, cfg.io_workers)
    rejected += copies
    if copies:
        log.warning("%d training images are copies of test images: quarantined as test_overlap (%s)", len(copies),
                    dict(Counter(r["dataset"] for r in copies)))
    if len(test_duplicates):
        log.warning("%d test images copy another dataset's test image (kept; listed in %s)", len(test_duplicates),
                    out / "test_duplicates.parquet")
    rejected_frame = pd.DataFrame(rejected, columns=REJECTED_COLUMNS)
    rejected_frame.to_parquet(out / "rejected.parquet", index=False)
    recorder.artifact(out / "rejected.parquet")
    test_duplicates.to_parquet(out / "test_duplicates.parquet", index=False)
    recorder.artifact(out / "test_duplicates.parquet")
    pools = {d: int(((manifest.dataset == d) & (manifest.split == "train")).sum()) for d in cfg.mix}
    quotas, scale = mix_quotas(pools, cfg.mix, cfg.train_size)
    if scale < 1:
        log.warning("train pools %s too small for train_size=%d: mix scaled by %.3f", pools, cfg.train_size, scale)
    train = pd.concat([_sample(manifest[(manifest.dataset == d) & (manifest.split == "train")], q, cfg.seed)
                       for d, q in quotas.items()], ignore_index=True)

    checked = pd.concat([train, test], ignore_index=True)
    checked["image_exists"] = checked["image_path"].map(lambda p: Path(p).is_file())
    total_weight = sum(cfg.mix.values())
    summary = pd.DataFrame([{
        "dataset": d,
        "train_rows": int((train.dataset == d).sum()),
        "test_rows": int((test.dataset == d).sum()),
        "mix_error": abs((train.dataset == d).mean() - cfg.mix.get(d, 0) / total_weight) if len(train) else 1.0,
    } for d in cfg.sources])
    planned = sum(quotas.values())
    manifest_checks, overlap_checks, summary_checks = _expectations(list(cfg.sources), planned, cfg)
    distances = train[["image_id", "nearest_test_distance"]].astype({"nearest_test_distance": "int64"})
    try:
        validate({"manifest": (checked, manifest_checks), "train_vs_test": (distances, overlap_checks),
                  "summary": (summary, summary_checks)}, "ingest", out / "checks")
    finally:
        recorder.artifact(out / "checks" / "ingest.json", "checks")
        recorder.artifact(out / "checks" / "docs", "checks/docs")

    train = train.drop(columns="nearest_test_distance")
    train.to_parquet(out / "train.parquet", index=False)
    test.to_parquet(out / "test.parquet", index=False)
    recorder.artifact(out / "train.parquet")
    recorder.artifact(out / "test.parquet")

    unused = len(manifest) - len(train) - len(test)
    return {
        "train_size": len(train),
        "test_size": len(test),
        "rejected": len(rejected_frame),
        "test_overlap": len(copies),  # training rows quarantined as copies of test images
        "test_duplicates": len(test_duplicates),  # test images that copy another dataset's (kept)
        "unused_rows": unused,
        "mix_scale": scale,
        "train_by_dataset": {d: int((train.dataset == d).sum()) for d in cfg.mix},
        "test_by_dataset": {d: int((test.dataset == d).sum()) for d in cfg.sources},
        "sources": per_source,
    }
