"""A gallery of what the models say: one static HTML page, thumbnail, true score and each model's
score and critique, the worst-scored images first.

The figures say how well a model ranks; the gallery shows why: which images it gets wrong,
and whether its critique talks about the picture. Thumbnails are embedded, so the page is
one file (logged to MLflow beside the report).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from aesr1.images import downscale, load_image
from aesr1.inference import critique_of

THUMBNAIL_PIXELS = 160 * 160


def thumbnail(path: str) -> str:
    """A small JPEG of the image as a data URI; empty when it cannot be read."""
    try:
        image = downscale(load_image(path), THUMBNAIL_PIXELS)
    except OSError:
        return ""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def gallery_rows(predictions: pd.DataFrame, sort_model: str, size: int, seed: int) -> pd.DataFrame:
    """One row per image (at most ``size``, drawn evenly over the test sets), each model's score and
    critique side by side, sorted by ``sort_model``'s absolute error (unparseable first)."""
    images = predictions.drop_duplicates("image_id")[["image_id", "dataset", "image_path", "score"]]
    per_set = max(1, size // max(1, images.dataset.nunique()))
    chosen = (images.sample(frac=1.0, random_state=seed).groupby("dataset", sort=False).head(per_set)
              .head(size).set_index("image_id"))
    for model, rows in predictions.groupby("model", sort=False):
        rows = rows.set_index("image_id").reindex(chosen.index)
        chosen[f"{model}_predicted"] = rows.predicted
        chosen[f"{model}_critique"] = [critique_of(text) or text for text in rows.completion.fillna("")]
    error = (chosen[f"{sort_model}_predicted"] - chosen.score).abs().fillna(math.inf)
    return chosen.assign(error=error).sort_values("error", ascending=False).reset_index()


def write_gallery(predictions: pd.DataFrame, path: Path, sort_model: str, size: int = 200, seed: int = 0) -> Path:
    """Write the gallery page of ``predictions`` (the evaluate stage's table) to ``path``."""
    models = list(dict.fromkeys(predictions.model))
    rows = gallery_rows(predictions, sort_model, size, seed)
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    body = []
    for row in rows.itertuples(index=False):
        cells = []
        for model in models:
            score = getattr(row, f"{model}_predicted")
            shown = "unparseable" if not np.isfinite(score) else f"{score:.2f}"
            cells.append(f"<td><b>{shown}</b><br><small>{html.escape(getattr(row, f'{model}_critique'))}</small></td>")
        error = "-" if not np.isfinite(row.error) else f"{row.error:.2f}"
        body.append(f"<tr><td><img src='{thumbnail(row.image_path)}' alt='{html.escape(str(row.image_id))}'><br>"
                    f"<small>{html.escape(str(row.image_id))}<br>{html.escape(row.dataset)}</small></td>"
                    f"<td><b>{row.score:.2f}</b></td><td>{error}</td>{''.join(cells)}</tr>")
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>aesr1 gallery</title><style>"
        "body{font-family:sans-serif;margin:1em} table{border-collapse:collapse} "
        "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;max-width:28em} img{width:128px}"
        "</style></head><body>"
        f"<h1>What the models say</h1><p>{len(rows)} test images, drawn evenly over the test sets, sorted by "
        f"{html.escape(sort_model)}'s absolute error (unparseable first). Scores in [0, 1].</p>"
        f"<table><tr><th>image</th><th>true</th><th>{html.escape(sort_model)} error</th>{head}</tr>"
        + "\n".join(body) + "</table></body></html>\n")
    return path
