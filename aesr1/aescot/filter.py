"""The filter stage: triple filtering, human review decisions, and the AesCoT corpus checks.

A sample is kept only if it has no leak, align or fact error, unless a reviewer decided
otherwise for that exact critique (decisions are keyed by image id and critique hash,
so a decision never carries over to a rewritten critique). Every rejected sample is
written with its kind and evidence.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import field
from pathlib import Path

import pandas as pd

from aesr1.aescot.claims import DIMENSIONS, dimensions_addressed
from aesr1.aescot.critique_filters import LEAK_REGEX, FilterConfig, check
from aesr1.aescot.measure import measure_files
from aesr1.checks import validate
from aesr1.config import config
from aesr1.errors import AesError
from aesr1.stage import Recorder
from aesr1.trajectory import band_of

log = logging.getLogger(__name__)
KINDS = ("leak", "align", "fact")
DECISION_COLUMNS = ["image_id", "critique_sha", "decision", "note"]


@config
class FilterStageConfig:
    """Params section ``filter``."""

    distilled: str = "data/aescot/distilled.parquet"
    out_dir: str = "data/aescot"
    review_decisions: str = "reviews/aescot_decisions.csv"
    align: FilterConfig = field(default_factory=FilterConfig)
    min_words: int = 20
    max_words: int = 250
    sample_table_rows: int = 50
    io_workers: int = 2  # processes reading and measuring the images


def critique_sha(critique: str) -> str:
    return hashlib.sha256(critique.encode()).hexdigest()[:16]


def read_decisions(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=DECISION_COLUMNS)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = set(DECISION_COLUMNS) - set(frame.columns)
    if missing:
        raise AesError(f"{path}: review decisions lack columns {sorted(missing)}")
    bad = frame[~frame.decision.isin(["keep", "reject"])]
    if len(bad):
        raise AesError(f"{path}: decision must be 'keep' or 'reject'; rows {bad.index.tolist()} have "
                         f"{bad.decision.tolist()}")
    return frame.drop_duplicates(["image_id", "critique_sha"], keep="last")


def triage(distilled: pd.DataFrame, cfg: FilterStageConfig) -> pd.DataFrame:
    """Errors per sample: one row per distilled sample with leak/align/fact lists."""
    stats = measure_files(distilled.image_path, cfg.io_workers)
    found = [check(c, b, s, cfg.align) for c, b, s in zip(distilled.critique, distilled.band, stats)]
    return pd.DataFrame(found, index=distilled.index, columns=list(KINDS))


def _expectations(cfg: FilterStageConfig):
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToNotMatchRegex(column="critique", regex=f"(?i)(?:{LEAK_REGEX})"),
        gxe.ExpectColumnValuesToBeBetween(column="critique_words", min_value=cfg.min_words, max_value=cfg.max_words),
        gxe.ExpectColumnValuesToBeBetween(column="dimensions_addressed", min_value=len(DIMENSIONS),
                                          max_value=len(DIMENSIONS)),
        gxe.ExpectColumnValuesToBeBetween(column="score", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToNotBeNull(column="score"),
        gxe.ExpectColumnValuesToBeInSet(column="band_matches_score", value_set=[True]),
        gxe.ExpectColumnValuesToBeUnique(column="image_id"),
    ]


def filter_corpus(cfg: FilterStageConfig, recorder: Recorder) -> dict:
    distilled = pd.read_parquet(cfg.distilled)
    recorder.dataset(cfg.distilled, distilled, "training")
    errors = triage(distilled, cfg)
    flagged = errors.apply(lambda row: any(row[k] for k in KINDS), axis=1)

    decisions = read_decisions(cfg.review_decisions)
    keyed = distilled.assign(critique_sha=distilled.critique.map(critique_sha))
    decided = keyed.merge(decisions, on=["image_id", "critique_sha"], how="left").decision.set_axis(distilled.index)
    keep = (~flagged & (decided != "reject")) | (decided == "keep")

    rejected_rows = []
    for idx in distilled.index[~keep]:
        kinds = [k for k in KINDS if errors.at[idx, k]] or ["manual"]
        evidence = "; ".join(f"{k}: {e}" for k in KINDS for e in errors.at[idx, k]) or "rejected by reviewer"
        rejected_rows.append({**distilled.loc[idx, ["image_id", "dataset", "image_path", "score", "band",
                                                   "critique"]].to_dict(),
                              "kind": kinds[0], "kinds": ",".join(kinds), "evidence": evidence})
    filtered_out = pd.DataFrame(rejected_rows, columns=["image_id", "dataset", "image_path", "score", "band",
                                                        "critique", "kind", "kinds", "evidence"])
    corpus = distilled[keep].reset_index(drop=True)

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    filtered_out.to_parquet(out / "filtered_out.parquet", index=False)
    recorder.artifact(out / "filtered_out.parquet")

    checked = corpus.assign(
        critique_words=corpus.critique.str.split().str.len(),
        dimensions_addressed=corpus.critique.map(lambda c: len(dimensions_addressed(c))),
        band_matches_score=[band_of(s) == b for s, b in zip(corpus.score, corpus.band)],
    )
    try:
        validate({"corpus": (checked, _expectations(cfg))}, "aescot_corpus", out / "checks")
    finally:
        recorder.artifact(out / "checks" / "aescot_corpus.json", "checks")
        recorder.artifact(out / "checks" / "docs", "checks/docs")
    corpus.to_parquet(out / "corpus.parquet", index=False)
    recorder.table("sample_trajectories.json", corpus.sample(min(len(corpus), cfg.sample_table_rows), random_state=0)
                   [["image_id", "band", "score", "trajectory"]])

    n = len(distilled)
    error_counts = {k: int(errors[k].map(bool).sum()) for k in KINDS}
    metrics = {
        "distilled": n,
        "corpus_size": len(corpus),
        "filtered_out": len(filtered_out),
        "errors": error_counts,
        "error_rates": {k: v / n if n else 0.0 for k, v in error_counts.items()},
        "review": {"kept_by_reviewer": int(((decided == "keep") & flagged).sum()),
                   "rejected_by_reviewer": int(((decided == "reject") & ~flagged).sum())},
        "corpus_by_band": dict(Counter(corpus.band)),
        "corpus_by_dataset": dict(Counter(corpus.dataset)),
    }
    log.info("filter: kept %d of %d; errors %s", len(corpus), n, error_counts)
    return metrics
