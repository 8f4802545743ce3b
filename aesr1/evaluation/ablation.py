"""The paper's ablation tables: ours beside theirs, a plot, and which findings hold here.

The studies themselves run as queued ``dvc exp`` experiments (``flows/ablations.py``);
this module only turns their results (one row per experiment) into the report.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from aesr1.errors import AesError
from aesr1.evaluation.report import markdown_table

# the paper's (PLCC, SRCC) and starting entropy per setting (docs/method.md)
PAPER = {
    "rewards": pd.DataFrame({
        "setting": ["binary", "error", "rank", "binary+rank", "error+rank"],
        "paper_plcc": [0.4255, 0.5655, 0.4542, 0.5964, 0.6297],
        "paper_srcc": [0.4433, 0.5600, 0.5908, 0.5825, 0.6102]}),
    "sft-epochs": pd.DataFrame({
        "setting": ["0", "1", "2", "10"],
        "paper_starting_entropy": [0.961, 1.626, 1.391, 0.716],
        "paper_plcc": [0.6297, 0.6337, 0.6027, 0.4624],
        "paper_srcc": [0.6102, 0.6186, 0.5903, 0.4705]}),
}


# shown only where some setting has them (an older result has no standard errors or expected readout)
OPTIONAL_COLUMNS = ("starting_entropy", "plcc_se", "srcc_se", "expected_plcc", "expected_srcc")


def _value(frame: pd.DataFrame, setting: str, column: str) -> float:
    if column not in frame:
        return math.nan
    rows = frame.loc[frame.setting == setting, column]
    return float(rows.iloc[0]) if len(rows) and pd.notna(rows.iloc[0]) else math.nan


def findings(study: str, ours: pd.DataFrame) -> list[tuple[str, bool | None]]:
    """The paper's findings for ``study``, each with whether it holds in ``ours`` (None: not measurable)."""
    v = lambda setting, column: _value(ours, setting, column)  # noqa: E731

    def holds(*values_and_test):
        *values, test = values_and_test
        return None if any(math.isnan(x) for x in values) else bool(test(*values))

    def se(*pairs):  # the combined standard error of a difference (0 where the results carry none)
        values = [v(setting, f"{column}_se") for setting, column in pairs]
        return math.hypot(*(0.0 if math.isnan(x) else x for x in values))

    if study == "rewards":
        best_plcc, best_srcc = ours.plcc.max(), ours.srcc.max()
        margin = {"rank": 2 * se(("rank", "srcc"), ("rank", "plcc")),
                  "error": 2 * se(("error", "srcc"), ("error", "plcc"))}
        return [
            ("rank-only ranks better than it calibrates (SRCC > PLCC)",
             holds(v("rank", "srcc"), v("rank", "plcc"), lambda s, p: s > p)),
            ("rank-only: SRCC above PLCC by more than twice their combined standard error",
             holds(v("rank", "srcc"), v("rank", "plcc"), lambda s, p: s - p > margin["rank"])),
            ("error-only calibrates at least as well as it ranks (PLCC >= SRCC)",
             holds(v("error", "plcc"), v("error", "srcc"), lambda p, s: p >= s)),
            ("error-only: PLCC above SRCC by more than twice their combined standard error",
             holds(v("error", "plcc"), v("error", "srcc"), lambda p, s: p - s > margin["error"])),
            ("error-only is better calibrated than rank-only (higher PLCC)",
             holds(v("error", "plcc"), v("rank", "plcc"), lambda e, r: e > r)),
            ("error-only ranks worse than rank-only (lower SRCC)",
             holds(v("error", "srcc"), v("rank", "srcc"), lambda e, r: e < r)),
            ("error+rank (RAPO) is best on both PLCC and SRCC",
             holds(v("error+rank", "plcc"), v("error+rank", "srcc"),
                   lambda p, s: p >= best_plcc and s >= best_srcc)),
        ]
    if study == "sft-epochs":
        e1, e2, e10 = (v(s, "starting_entropy") for s in ("1", "2", "10"))
        return [
            ("starting entropy falls with more SFT epochs (1 > 2 > 10)",
             holds(e1, e2, e10, lambda a, b, c: a > b > c)),
            ("too much SFT hurts RL (10 epochs below the best of 1 and 2, PLCC)",
             holds(v("1", "plcc"), v("2", "plcc"), v("10", "plcc"), lambda a, b, c: c < max(a, b))),
        ]
    raise AesError(f"unknown study {study!r}; known: {sorted(PAPER)}")


def write_ablation_report(study: str, ours: pd.DataFrame, out_dir: str | Path) -> tuple[Path, Path]:
    """``ours``: one row per setting with plcc, srcc (and starting_entropy). Writes report.md and plot.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = PAPER[study].merge(ours, on="setting", how="outer")
    order = {s: i for i, s in enumerate(PAPER[study].setting)}
    table = table.sort_values("setting", key=lambda col: col.map(order)).reset_index(drop=True)
    columns = [c for c in ("setting", "experiment", "starting_entropy", "plcc", "plcc_se", "srcc", "srcc_se",
                           "expected_plcc", "expected_srcc", "unparseable_rate", "paper_starting_entropy",
                           "paper_plcc", "paper_srcc")
               if c in table.columns and not (c in OPTIONAL_COLUMNS and table[c].isna().all())]
    frame = table[columns].astype(object).where(table[columns].notna(), None)
    lines = [f"# Ablation: {study}", "", "PLCC / SRCC: the reference's sampling (one sample at T 0.6), averaged "
             "over the test sets; *_se: bootstrap standard errors over the test images; expected_*: the "
             "expected-score readout.", "", markdown_table(columns, frame.values.tolist()), "",
             "## The paper's findings here", ""]
    for text, held in findings(study, table):
        lines.append(f"- {text}: **{ {True: 'holds', False: 'does not hold', None: 'not measured'}[held] }**")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    x = range(len(table))
    for ax, metric in zip(axes, ("plcc", "srcc")):
        if f"{metric}_se" in table and table[f"{metric}_se"].notna().any():
            ax.errorbar(x, table[metric], yerr=2 * table[f"{metric}_se"], fmt="o-", capsize=3, label="ours (± 2 SE)")
        else:
            ax.plot(x, table[metric], "o-", label="ours")
        ax.plot(x, table[f"paper_{metric}"], "s--", label="paper")
        ax.set_xticks(list(x), table.setting, rotation=20)
        ax.set_title(metric.upper())
    axes[0].legend()
    fig.suptitle(f"Ablation: {study}")
    fig.tight_layout()
    plot = out / "plot.png"
    fig.savefig(plot, dpi=90)
    plt.close(fig)
    return report, plot
