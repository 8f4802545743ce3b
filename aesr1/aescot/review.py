"""Manual review of the filter, as in the paper: export samples, take human decisions back.

``export`` writes the flagged samples and a random sample of the passed ones to a CSV
(fill its ``decision`` column with ``keep`` or ``reject``) and an HTML page with
thumbnails. ``apply`` merges the filled CSV into the decisions file that the filter
stage reads on its next run.
"""

from __future__ import annotations

import base64
import html
from io import BytesIO
from pathlib import Path

import pandas as pd

from aesr1.aescot.filter import DECISION_COLUMNS, FilterStageConfig, critique_sha, read_decisions
from aesr1.errors import AesError
from aesr1.images import load_image

REVIEW_COLUMNS = ["image_id", "critique_sha", "status", "kind", "evidence", "band", "score", "critique",
                  "image_path", "decision", "note"]


def _thumbnail(path: str, side: int = 160) -> str:
    try:
        img = load_image(path)
        img.thumbnail((side, side))
        buffer = BytesIO()
        img.save(buffer, format="JPEG", quality=85)
        return f'<img src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}">'
    except OSError as err:
        return f"<em>image unreadable: {html.escape(str(err))}</em>"


def export(cfg: FilterStageConfig, out_csv: str | Path, passed_sample: int = 50, seed: int = 0) -> pd.DataFrame:
    out_dir = Path(cfg.out_dir)
    flagged = pd.read_parquet(out_dir / "filtered_out.parquet").assign(status="flagged")
    corpus = pd.read_parquet(out_dir / "corpus.parquet")
    passed = corpus.sample(min(passed_sample, len(corpus)), random_state=seed).assign(
        status="passed", kind="", evidence="")
    review = pd.concat([flagged, passed], ignore_index=True)
    review = review.assign(critique_sha=review.critique.map(critique_sha), decision="", note="")[REVIEW_COLUMNS]
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    review.to_csv(out_csv, index=False)

    rows = "\n".join(
        f"<tr><td>{_thumbnail(r.image_path)}</td><td>{html.escape(r.image_id)}<br>{r.status}"
        f"<br>band {r.band}, score {r.score:.2f}</td><td>{html.escape(r.critique)}</td>"
        f"<td>{html.escape(str(r.kind))}<br><small>{html.escape(str(r.evidence))}</small></td></tr>"
        for r in review.itertuples())
    page = (f"<!doctype html><meta charset=utf-8><title>AesCoT review</title>"
            f"<style>td{{vertical-align:top;border-top:1px solid #ccc;padding:6px}}</style>"
            f"<h1>AesCoT review: {len(flagged)} flagged, {len(passed)} passed</h1>"
            f"<p>Fill the <code>decision</code> column of {html.escape(out_csv.name)} with keep or reject, "
            f"then run <code>aesr1 review apply {html.escape(str(out_csv))}</code>.</p>"
            f"<table><tr><th>image</th><th>sample</th><th>critique</th><th>filter</th></tr>{rows}</table>")
    out_csv.with_suffix(".html").write_text(page)
    return review


def apply(cfg: FilterStageConfig, review_csv: str | Path) -> dict:
    """Merge the decided rows of a review file into ``cfg.review_decisions``; return counts."""
    if not Path(review_csv).is_file():
        raise AesError(f"review file not found: {review_csv} (write one with: aesr1 review export)")
    review = pd.read_csv(review_csv, dtype=str, keep_default_na=False)
    missing = {"image_id", "critique_sha", "decision"} - set(review.columns)
    if missing:
        raise AesError(f"{review_csv}: not a review file, it lacks columns {sorted(missing)}")
    review["decision"] = review.decision.str.strip().str.lower()
    decided = review[review.decision != ""]
    if "note" not in decided:
        decided = decided.assign(note="")
    invalid = decided[~decided.decision.isin(["keep", "reject"])]
    if len(invalid):
        raise AesError(f"{review_csv}: decision must be keep or reject, got {sorted(set(invalid.decision))}")
    merged = pd.concat([read_decisions(cfg.review_decisions), decided[DECISION_COLUMNS]], ignore_index=True)
    merged = merged.drop_duplicates(["image_id", "critique_sha"], keep="last")
    Path(cfg.review_decisions).parent.mkdir(parents=True, exist_ok=True)
    merged.to_csv(cfg.review_decisions, index=False)
    return {"applied": len(decided), "keep": int((decided.decision == "keep").sum()),
            "reject": int((decided.decision == "reject").sum()), "total_decisions": len(merged)}
