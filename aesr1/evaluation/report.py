"""The evaluation report: our main table in markdown, beside the paper's."""

from __future__ import annotations

import math
from pathlib import Path


def number(value) -> str:
    """Three decimals; '-' for a missing or undefined value."""
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "-" if missing else f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(number(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def with_se(result: dict, key: str) -> str:
    """A figure with its bootstrap standard error where there is one: ``0.412 ± 0.031``."""
    se = result.get(f"{key}_se")
    return number(result.get(key)) + (f" ± {number(se)}" if se is not None else "")


def pair(result: dict) -> str:
    return f"{with_se(result, 'plcc')} / {with_se(result, 'srcc')}"


def main_table(metrics: dict, test_sets: list[str]) -> str:
    """Rows: models; columns: PLCC / SRCC per test set and their average (the paper's layout)."""
    rows = [[model, *(pair(result.get(t, {})) for t in test_sets), f"**{pair(result['average'])}**"]
            for model, result in metrics.items()]
    return markdown_table(["model", *(f"{t} PLCC / SRCC" for t in test_sets), "average PLCC / SRCC"], rows)


READOUT_NAMES = {"sampled": "sampled (one sample, the reference's)", "expected": "expected (digit distribution)",
                 "mean": "mean of the samples"}


def readout_tables(metrics: dict) -> list[str]:
    """Average PLCC / SRCC per model and readout, and each compared pair's difference with its paired SE."""
    readouts = list(dict.fromkeys(r for result in metrics.values() for r in result.get("readouts", {})))
    if not readouts:
        return []
    rows = [[model, *(pair(result["readouts"][r]["average"]) if r in result["readouts"] else "-" for r in readouts)]
            for model, result in metrics.items() if "readouts" in result]
    parts = ["## Readouts (average PLCC / SRCC over the test sets ± bootstrap standard error)", "",
             markdown_table(["model", *(READOUT_NAMES.get(r, r) for r in readouts)], rows), ""]
    diffs = []
    for model, result in metrics.items():
        for baseline, entry in result.get("compared_to", {}).items():
            for r in readouts:
                if f"{r}_plcc_diff" in entry:
                    diffs.append([f"{model} - {baseline}", READOUT_NAMES.get(r, r),
                                  *(f"{number(entry[f'{r}_{k}_diff'])} ± {number(entry.get(f'{r}_{k}_diff_se'))}"
                                    + (" (> 2 SE)" if entry.get(f"{r}_{k}_diff_over_2se") else "")
                                    for k in ("plcc", "srcc"))])
    if diffs:
        parts += ["## Differences (average over the test sets, paired bootstrap standard error)", "",
                  markdown_table(["models", "readout", "PLCC difference", "SRCC difference"], diffs), ""]
    return parts


def write_report(path: Path, metrics: dict, ceilings: dict, test_sets: list[str], paper: dict) -> None:
    parts = ["# Evaluation", "", "## Main table (PLCC / SRCC ± bootstrap standard error; the reference's sampling, "
             "one sample; unparseable outputs scored 0.5)", "", main_table(metrics, test_sets), ""]
    parts += readout_tables(metrics)
    if ceilings:
        parts += ["Noise ceiling (MOS vs AesSynth's latent score) PLCC / SRCC: "
                  + ", ".join(f"{t} {number(c['plcc'])} / {number(c['srcc'])}" for t, c in ceilings.items()), ""]
    beside = [[model, result["average"]["plcc"], result["average"]["srcc"], *paper.get(model, ("-", None, None))]
              for model, result in metrics.items()]
    parts += ["## Beside the paper (average over the five test sets)", "",
              markdown_table(["ours", "PLCC", "SRCC", "paper", "PLCC", "SRCC"], beside), ""]
    domains = [[model, a["in_domain_plcc"], a["out_of_domain_plcc"], a.get("in_domain_ceiling_ratio"),
                a.get("out_of_domain_ceiling_ratio"), a["unparseable_rate"]]
               for model, a in ((m, r["average"]) for m, r in metrics.items())]
    parts += ["## In and out of domain, against the noise ceiling", "",
              markdown_table(["model", "in-domain PLCC", "out-of-domain PLCC", "in-domain / ceiling",
                              "out-of-domain / ceiling", "unparseable"], domains), ""]
    critiques = [[model, c.get("mean_words"), c.get("dimension_coverage"), c.get("leak_rate"),
                  c.get("fact_error_rate"), c.get("align_error_rate"), c.get("tone_score_srcc"), result["entropy"]]
                 for model, result in metrics.items() for c in [result["critique"]]]
    parts += ["## Critiques (the AesCoT filters on the models' own critiques) and entropy", "",
              markdown_table(["model", "words", "dimension coverage", "leak", "fact errors", "align errors",
                              "tone-score SRCC", "token entropy"], critiques)]
    path.write_text("\n".join(parts) + "\n")
