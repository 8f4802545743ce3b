"""Triple filtering of critiques: leak, align and fact errors, each with its evidence.

- leak: the critique reveals the score (a number, a fraction, score/rating talk, or a
  band word used as a verdict);
- align: the critique's overall polarity (a lexicon with negation, per dimension and
  overall) disagrees with the score band;
- fact: a claim found in the text is clearly contradicted by the image's measured
  statistics (see :mod:`aesr1.aescot.claims`).

The filter stage (:mod:`aesr1.aescot.filter`) applies them to the distilled critiques, the
evaluate stage to the models' own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from aesr1.aescot.claims import DIMENSION_WORDS, claims_in
from aesr1.aescot.measure import ImageStats
from aesr1.config import config

LEAK_PATTERNS = {
    "number": r"\b\d+(?:[.,]\d+)?\b|(?<![\w.])\.\d+\b",
    "fraction": r"\b\d+\s*/\s*\d+\b|\bout of (?:one|two|three|four|five|ten|a hundred|\d+)\b",
    "score talk": r"\b(?:scor\w*|rating\w*|rated|rate it|points?|grade[sd]?|marks?|stars?)\b",
    "band verdict": r"\b(?:is|looks|seems|as|an?|overall,?|quite|rather|fairly|pretty|very|simply)\s+"
                    r"(?:good|fair|bad|poor|average|mediocre)\b(?!\s+(?:deal|amount|bit|number|portion)\b)",
}
_LEAKS = {name: re.compile(p, re.IGNORECASE) for name, p in LEAK_PATTERNS.items()}
# what the GE corpus check uses: any leak pattern at all
LEAK_REGEX = "|".join(f"(?:{p})" for p in LEAK_PATTERNS.values())

POSITIVE = {
    "balanced", "pleasing", "harmonious", "harmony", "cohesive", "compelling", "well-crafted", "engaging", "strong",
    "effective", "clean", "uncluttered", "elegant", "inviting", "beautiful", "beautifully", "lovely", "striking",
    "confident", "rewarding", "works", "successful", "lifts", "pops", "vivid", "rich", "calm", "coherent",
    "unified", "well", "clear", "controlled", "appealing", "assured", "stands", "satisfying", "polished",
    "memorable", "care", "serene", "quiet",
}
NEGATIVE = {
    "struggles", "fails", "weak", "awkward", "distracting", "distracts", "cluttered", "clutter", "murky", "muddy",
    "dull", "flat", "harsh", "clash", "clashes", "jarring", "blown-out", "blown", "underexposed", "overexposed",
    "cramped", "chaotic", "disjointed", "fragmented", "jumble", "lacks", "lost", "loses", "unfortunately",
    "problem", "flaw", "flaws", "drab", "lifeless", "messy", "static", "discordant", "drains", "glaring",
    "clipped", "crushed", "dim", "heavy", "merges", "poorly", "little", "without", "unremarkable", "bland",
    "too", "fight", "stray", "cut",
}
NEGATORS = {"not", "no", "never", "nothing", "neither", "nor", "hardly", "barely", "without", "isn't", "doesn't"}
_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")
_SENTENCE = re.compile(r"(?<=[.!?;])\s+")


@config
class FilterConfig:
    """Thresholds of the align filter (overall polarity in [-1, 1] per band)."""

    bad_max: float = 0.0  # a critique for a bad score must not be net positive
    good_min: float = 0.1  # a critique for a good score must be clearly positive
    fair_min: float = -0.75
    fair_max: float = 0.75


@dataclass
class Polarity:
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        p, n = len(self.positive), len(self.negative)
        return (p - n) / (p + n + 1)


def polarity(text: str) -> Polarity:
    """Lexicon polarity with negation: a negator up to two words before flips a word."""
    result = Polarity()
    words = _WORD.findall(text.lower())
    for i, word in enumerate(words):
        sign = 1 if word in POSITIVE else -1 if word in NEGATIVE else 0
        if word in NEGATORS or not sign:
            continue
        if any(w in NEGATORS for w in words[max(0, i - 2):i]):
            sign = -sign
            word = f"not {word}"
        (result.positive if sign > 0 else result.negative).append(word)
    return result


def dimension_polarity(text: str) -> dict[str, float]:
    """Polarity of the sentences that address each dimension."""
    sentences = _SENTENCE.split(text)
    scores = {}
    for dim, words in DIMENSION_WORDS.items():
        regex = re.compile(words, re.IGNORECASE)
        chosen = " ".join(s for s in sentences if regex.search(s))
        if chosen:
            scores[dim] = round(polarity(chosen).score, 2)
    return scores


def leak_errors(critique: str) -> list[str]:
    found = []
    for name, regex in _LEAKS.items():
        for match in regex.finditer(critique):
            found.append(f"{name}: '{match.group(0)}'")
    return found


def align_errors(critique: str, band: str, cfg: FilterConfig) -> list[str]:
    pol = polarity(critique)
    score = pol.score
    wrong = ((band == "bad" and score > cfg.bad_max) or (band == "good" and score < cfg.good_min)
             or (band == "fair" and not cfg.fair_min <= score <= cfg.fair_max))
    if not wrong:
        return []
    return [f"polarity {score:+.2f} for band '{band}' (+{pol.positive} -{pol.negative}); "
            f"per dimension {dimension_polarity(critique)}"]


def fact_errors(critique: str, stats: ImageStats) -> list[str]:
    errors = []
    for claim, words in claims_in(critique):
        if claim.contradicted(stats):
            errors.append(f"'{words}' ({claim.id}) but {claim.evidence(stats)}")
    direction = re.search(r"from the (left|right|top|bottom|above|below)", critique, re.IGNORECASE)
    if direction and stats.light_strength > 0.15:
        said = {"above": "top", "below": "bottom"}.get(direction.group(1).lower(), direction.group(1).lower())
        if said != stats.light_from:
            errors.append(f"light '{direction.group(0)}' but it comes from the {stats.light_from}")
    return errors


def check(critique: str, band: str, stats: ImageStats, cfg: FilterConfig) -> dict[str, list[str]]:
    """Errors of each kind found in one critique (empty lists: the critique passes)."""
    return {"leak": leak_errors(critique), "align": align_errors(critique, band, cfg),
            "fact": fact_errors(critique, stats)}
