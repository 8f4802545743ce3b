"""The distill stage: score-masked critiques from a teacher, turned into trajectories.

For each training sample the teacher sees the image and its score band, never the
score; the critique plus the ground-truth score becomes the policy's target
(:func:`aesr1.trajectory.make_trajectory`). Samples the teacher could not critique
are written with their reason to ``distill_failures.parquet``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import field
from pathlib import Path

import pandas as pd

from aesr1.aescot.teacher_analytic import AnalyticTeacherConfig
from aesr1.aescot.teachers import TeacherConfig, make_teacher
from aesr1.config import config, shared
from aesr1.errors import AesError
from aesr1.images import MAX_PIXELS
from aesr1.stage import Recorder
from aesr1.trajectory import band_of, make_trajectory

log = logging.getLogger(__name__)


@config
class DistillConfig:
    """Params section ``distill``."""

    train_manifest: str = "data/ingest/train.parquet"
    out_dir: str = "data/aescot"
    teacher: TeacherConfig = field(default_factory=AnalyticTeacherConfig)  # one typed config per kind
    limit: int | None = None  # distil only the first N samples (a cheap trial with a paid teacher)
    max_failure_rate: float = 0.05
    # the images the teacher is shown fit the policy's pixel budget (None: the reference's, images.MAX_PIXELS)
    max_pixels: int | None = shared("backbone.max_pixels", default=None)


class DistillError(AesError):
    """Too many samples could not be critiqued."""


def distill(cfg: DistillConfig, recorder: Recorder) -> dict:
    manifest = pd.read_parquet(cfg.train_manifest)
    if cfg.limit is not None:
        manifest = manifest.head(cfg.limit)
    recorder.dataset(cfg.train_manifest, manifest, "training")
    manifest = manifest.assign(band=manifest["score"].map(band_of))
    teacher = make_teacher(cfg.teacher, cfg.max_pixels if cfg.max_pixels is not None else MAX_PIXELS)
    pid, teacher_id = teacher.prompt_id, teacher.teacher_id
    recorder.param("prompt_id", pid)
    recorder.param("teacher_id", teacher_id)

    items = list(zip(manifest.image_id, manifest.image_path, manifest.band))
    log.info("distilling %d samples with teacher %s (%s)", len(items), teacher_id, pid)
    results = {c.key: c for c in teacher.critique_many(items)}

    rows, failures = [], []
    for sample in manifest.itertuples(index=False):
        result = results[sample.image_id]
        if result.text is None:
            failures.append({"image_id": sample.image_id, "image_path": sample.image_path,
                             "reason": result.error, "attempts": result.attempts})
            continue
        rows.append({
            "image_id": sample.image_id, "dataset": sample.dataset, "image_path": sample.image_path,
            "score": float(sample.score), "band": sample.band, "critique": result.text,
            "trajectory": make_trajectory(result.text, float(sample.score)),
            "teacher": teacher_id, "prompt_id": pid,
        })
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    distilled = pd.DataFrame(rows, columns=["image_id", "dataset", "image_path", "score", "band", "critique",
                                            "trajectory", "teacher", "prompt_id"])
    failed = pd.DataFrame(failures, columns=["image_id", "image_path", "reason", "attempts"])
    distilled.to_parquet(out / "distilled.parquet", index=False)
    failed.to_parquet(out / "distill_failures.parquet", index=False)
    recorder.artifact(out / "distill_failures.parquet")

    rate = len(failed) / len(manifest) if len(manifest) else 0.0
    metrics = {
        "samples": len(manifest), "distilled": len(distilled), "failed": len(failed), "failure_rate": rate,
        "by_band": dict(Counter(distilled.band)),
        "critique_words_mean": float(distilled.critique.str.split().str.len().mean()) if len(distilled) else 0.0,
        "teacher_usage": teacher.usage(),
    }
    if rate > cfg.max_failure_rate:
        reasons = Counter(failed.reason.str.split(":").str[0])
        raise DistillError(f"{len(failed)}/{len(manifest)} samples failed ({rate:.1%} > max_failure_rate "
                           f"{cfg.max_failure_rate:.1%}): {dict(reasons)}; see {out / 'distill_failures.parquet'}")
    return metrics
