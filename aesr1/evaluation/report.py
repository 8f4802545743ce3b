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


NOT_PARSED = "n/a: 100% unparseable"
INTRODUCTION = (
    "PLCC (Pearson) and SRCC (Spearman) measure how well a model's scores follow the human mean opinion scores "
    "(1: perfectly; 0: not at all); ± is the bootstrap standard error over the test images; a model that never "
    "writes a parseable score has no correlation to report (n/a) rather than 0. The readouts are two ways to read "
    "a score from an answer: the number one sample writes (the paper's) or the mean of the digit distribution "
    "(expected). The noise ceiling is what the human scores themselves reach against AesSynth's noiseless "
    "score, the most any model can. A difference between two models carries its paired standard error (both on "
    "the same resampled images); over 2 SE it is unlikely to be chance.")


def all_unparseable(result: dict) -> bool:
    """Whether no output behind ``result`` held a parseable score (its correlations are then undefined)."""
    return result.get("unparseable_rate") == 1.0


def pair(result: dict) -> str:
    if all_unparseable(result):
        return NOT_PARSED
    return f"{with_se(result, 'plcc')} / {with_se(result, 'srcc')}"


def main_table(metrics: dict, test_sets: list[str]) -> str:
    """Rows: models; columns: PLCC / SRCC per test set and their average (the paper's layout), and the share of
    unparseable outputs."""
    rows = [[model, *(pair(result.get(t, {})) for t in test_sets), f"**{pair(result['average'])}**",
             percent(result["average"].get("unparseable_rate"))] for model, result in metrics.items()]
    return markdown_table(["model", *(f"{t} PLCC / SRCC" for t in test_sets), "average PLCC / SRCC",
                           "unparseable"], rows)


def percent(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


READOUT_NAMES = {"sampled": "sampled (one sample, the reference's)", "expected": "expected (digit distribution)",
                 "mean": "mean of the samples"}


def readout_tables(metrics: dict) -> list[str]:
    """Average PLCC / SRCC per model and readout, and each compared pair's difference with its paired SE."""
    readouts = list(dict.fromkeys(r for result in metrics.values() for r in result.get("readouts", {})))
    if not readouts:
        return []
    rows = [[model, *(pair(result["readouts"][r]["average"]) if r in result["readouts"] else "-" for r in readouts),
             *(percent(result["readouts"][r]["average"].get("unparseable_rate")) if r in result["readouts"] else "-"
               for r in readouts)]
            for model, result in metrics.items() if "readouts" in result]
    parts = ["## Readouts (average PLCC / SRCC over the test sets ± bootstrap standard error)", "",
             markdown_table(["model", *(READOUT_NAMES.get(r, r) for r in readouts),
                             *(f"unparseable, {r}" for r in readouts)], rows), ""]
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


def write_report(path: Path, metrics: dict, ceilings: dict, test_sets: list[str], paper: dict,
                 test_split: str, models: dict[str, tuple]) -> None:
    """``models``: name -> (path, prompt, scale, how its answer is read), as each model was asked."""
    parts = ["# Evaluation", "", INTRODUCTION, "",
             f"Test split `{test_split}` (a hash of the evaluated images' ids, file contents and scores): two runs' "
             f"figures compare only when their test splits match.", "",
             "## Models (each asked with its prompt; its scores mapped from its scale to [0, 1])", "",
             markdown_table(["model", "path", "prompt", "scale", "answer read by"],
                            [[name, f"`{path}`", prompt, f"{scale[0]:g} to {scale[1]:g}", f"`{parse}`"]
                             for name, (path, prompt, scale, parse) in models.items()]), "",
             "## Main table (PLCC / SRCC ± bootstrap standard error; the reference's sampling, "
             "one sample; unparseable outputs scored 0.5)", "", main_table(metrics, test_sets), ""]
    parts += readout_tables(metrics)
    if ceilings:
        parts += ["Noise ceiling (MOS vs AesSynth's latent score) PLCC / SRCC: "
                  + ", ".join(f"{t} {number(c['plcc'])} / {number(c['srcc'])}" for t, c in ceilings.items()), ""]
    beside = [[model, *((NOT_PARSED, NOT_PARSED) if all_unparseable(result["average"]) else
                        (result["average"]["plcc"], result["average"]["srcc"])),
               percent(result["average"].get("unparseable_rate")), *paper.get(model, ("-", None, None))]
              for model, result in metrics.items()]
    parts += ["## Beside the paper (average over the five test sets)", "",
              markdown_table(["ours", "PLCC", "SRCC", "unparseable", "paper", "PLCC", "SRCC"], beside), ""]
    domains = [[model, *([NOT_PARSED] * 4 if all_unparseable(a) else
                         [a["in_domain_plcc"], a["out_of_domain_plcc"], a.get("in_domain_ceiling_ratio"),
                          a.get("out_of_domain_ceiling_ratio")]), percent(a["unparseable_rate"])]
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
