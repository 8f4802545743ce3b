"""The evaluation report: our main table in markdown, beside the paper's."""

from __future__ import annotations

import math
from pathlib import Path


def _f(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def main_table(metrics: dict, test_sets: list[str]) -> str:
    """Rows: models; columns: PLCC / SRCC per test set and their average (the paper's layout)."""
    head = "| model | " + " | ".join(f"{t} PLCC / SRCC" for t in test_sets) + " | average PLCC / SRCC |"
    lines = [head, "|---" * (len(test_sets) + 2) + "|"]
    for model, result in metrics.items():
        cells = [f"{_f(result.get(t, {}).get('plcc'))} / {_f(result.get(t, {}).get('srcc'))}" for t in test_sets]
        avg = result["average"]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | **{_f(avg['plcc'])} / {_f(avg['srcc'])}** |")
    return "\n".join(lines)


def write_report(path: Path, metrics: dict, ceilings: dict, test_sets: list[str], paper: dict) -> None:
    parts = ["# Evaluation", "", "## Main table (PLCC / SRCC; unparseable outputs scored 0.5)", "",
             main_table(metrics, test_sets), ""]
    if ceilings:
        parts += ["Noise ceiling (MOS vs AesSynth's latent score) PLCC / SRCC: "
                  + ", ".join(f"{t} {_f(c['plcc'])} / {_f(c['srcc'])}" for t, c in ceilings.items()), ""]
    parts += ["## Beside the paper (average over the five test sets)", "",
              "| ours | PLCC | SRCC | paper | PLCC | SRCC |", "|---|---|---|---|---|---|"]
    for model, result in metrics.items():
        label, plcc, srcc = paper.get(model, ("-", None, None))
        parts.append(f"| {model} | {_f(result['average']['plcc'])} | {_f(result['average']['srcc'])} "
                     f"| {label} | {_f(plcc)} | {_f(srcc)} |")
    parts += ["", "## In and out of domain, against the noise ceiling", "",
              "| model | in-domain PLCC | out-of-domain PLCC | in-domain / ceiling | out-of-domain / ceiling "
              "| unparseable |", "|---|---|---|---|---|---|"]
    for model, result in metrics.items():
        a = result["average"]
        parts.append(f"| {model} | {_f(a['in_domain_plcc'])} | {_f(a['out_of_domain_plcc'])} "
                     f"| {_f(a.get('in_domain_ceiling_ratio'))} | {_f(a.get('out_of_domain_ceiling_ratio'))} "
                     f"| {_f(a['unparseable_rate'])} |")
    parts += ["", "## Critiques (the AesCoT filters on the models' own critiques) and entropy", "",
              "| model | words | dimension coverage | leak | fact errors | align errors | tone-score SRCC "
              "| token entropy |", "|---|---|---|---|---|---|---|---|"]
    for model, result in metrics.items():
        c = result["critique"]
        parts.append(f"| {model} | {_f(c.get('mean_words'))} | {_f(c.get('dimension_coverage'))} "
                     f"| {_f(c.get('leak_rate'))} | {_f(c.get('fact_error_rate'))} | {_f(c.get('align_error_rate'))} "
                     f"| {_f(c.get('tone_score_srcc'))} | {_f(result['entropy'])} |")
    path.write_text("\n".join(parts) + "\n")
