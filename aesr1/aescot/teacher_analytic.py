"""The analytic teacher (the offline default): critiques written from the image's measured statistics.

It measures the image and writes a five-dimension critique from claims that hold for its
pixels (:mod:`aesr1.aescot.claims`), in the tone of the score band it is given (never the score).
"""

from __future__ import annotations

import hashlib
import inspect
import random
from typing import Literal

from aesr1.aescot import claims
from aesr1.aescot.claims import CLAIMS, DIMENSIONS, Claim
from aesr1.aescot.critique import Critique
from aesr1.aescot.critique_filters import FilterConfig, polarity
from aesr1.aescot.measure import ImageStats, measure_file
from aesr1.config import config


@config
class AnalyticTeacherConfig:
    """Params ``distill.teacher`` with ``kind: analytic``: the offline teacher of the embedded default."""

    kind: Literal["analytic"] = "analytic"
    seed: int = 0


_NEUTRAL = {
    "good": {
        "lighting": ("the light is handled with care", "the lighting is assured and pleasing"),
        "emotion & narrative": ("the scene has an engaging, calm mood", "there is a quiet, inviting feel to the scene"),
        "composition": ("the arrangement feels balanced", "the framing is confident and clear"),
        "color": ("the colour is appealing", "the tones are pleasing"),
        "exposure": ("the brightness suits the subject", "the tonal range is pleasing"),
    },
    "fair": {
        "lighting": ("the lighting is serviceable but unremarkable", "the light does its job without much character"),
        "emotion & narrative": ("the mood is present but faint",
                                "the scene hints at a story without quite telling one"),
        "composition": ("the arrangement is ordinary", "the framing neither helps nor hurts much"),
        "color": ("the colour is ordinary", "the tones are ordinary"),
        "exposure": ("the brightness is acceptable", "the tonal range is ordinary"),
    },
    "bad": {
        "lighting": ("the light does little for the subject", "the lighting is dull and lifeless"),
        "emotion & narrative": ("the scene fails to create a mood", "no clear story or feeling emerges from the scene"),
        "composition": ("the arrangement feels awkward", "the framing is weak and unresolved"),
        "color": ("the colour is bland", "the tones feel lifeless"),
        "exposure": ("the brightness does the subject no favours", "the tonal range is weak"),
    },
}
_VERDICTS = {
    "good": ("Overall, a compelling and polished image.", "Overall, the image is engaging and memorable.",
             "Overall, a confident, satisfying picture."),
    "fair": ("Overall, a competent image that stops short of memorable.",
             "Overall, it has strengths and flaws in equal measure.", "Overall, pleasant but unremarkable."),
    "bad": ("Overall, the image struggles to hold attention.", "Overall, its flaws outweigh what works.",
            "Overall, it feels unresolved and weak."),
}
_LABELS = {"lighting": "Lighting", "emotion & narrative": "Emotion & narrative", "composition": "Composition",
           "color": "Color", "exposure": "Exposure"}


def phrase_bank() -> list[str]:
    """The analytic teacher's fixed wording besides the claims (neutral remarks, verdicts, labels), for a tokenizer."""
    return ([p for band in _NEUTRAL.values() for phrases in band.values() for p in phrases]
            + [v for verdicts in _VERDICTS.values() for v in verdicts]
            + [f"{label}: " for label in _LABELS.values()])


class AnalyticTeacher:
    """Writes critiques from measured image statistics: every claim holds for the pixels."""

    name = "analytic"

    def __init__(self, cfg: AnalyticTeacherConfig):
        self.seed = cfg.seed
        self.teacher_id = "analytic"
        # its instructions are its rules: the claims, the neutral phrases, the verdicts and this class
        rules = inspect.getsource(claims) + inspect.getsource(AnalyticTeacher) + repr(_NEUTRAL) + repr(_VERDICTS)
        self.prompt_id = "analytic-rules@" + hashlib.sha256(rules.encode()).hexdigest()[:12]

    def choose_claims(self, stats: ImageStats, band: str) -> dict[str, list[Claim]]:
        """The true claims to state per dimension, picked so the tone fits the band.

        The good band leaves out criticism, the bad band praise (omission, never invention);
        the fair band keeps both.
        """
        chosen = {}
        for dim in DIMENSIONS:
            holding = [c for c in CLAIMS if c.dimension == dim and c.holds(stats)]
            if band == "good":
                holding = [c for c in holding if c.polarity >= 0]
            elif band == "bad":
                holding = [c for c in holding if c.polarity <= 0]
            chosen[dim] = holding[:2]
        return chosen

    def write(self, chosen: dict[str, list[Claim]], stats: ImageStats, band: str, rng: random.Random) -> str:
        parts = []
        for dim in DIMENSIONS:
            claims = chosen.get(dim, [])
            phrases = [rng.choice(c.phrases).format(light_from=stats.light_from) for c in claims]
            if not phrases:
                phrases = [rng.choice(_NEUTRAL[band][dim])]
            body = rng.choice((", and ", "; ")).join(phrases) if len(phrases) > 1 else phrases[0]
            parts.append(f"{_LABELS[dim]}: {body[0].upper()}{body[1:]}.")
        parts.append(rng.choice(_VERDICTS[band]))
        return " ".join(parts)

    def critique(self, image_path: str, band: str, key: str) -> Critique:
        """A critique whose tone passes the align filter's default thresholds.

        If the draft's polarity is off for the band, the claim of the offending
        polarity stated last is dropped and the critique rewritten.
        """
        stats = measure_file(image_path)
        chosen = self.choose_claims(stats, band)
        while True:
            text = self.write(chosen, stats, band, random.Random(f"{self.seed}/{key}"))
            tone = polarity(text).score
            cfg = FilterConfig()
            too_negative = tone < {"good": cfg.good_min, "fair": cfg.fair_min}.get(band, -1.0)
            too_positive = tone > {"bad": cfg.bad_max, "fair": cfg.fair_max}.get(band, 1.0)
            offending = -1 if too_negative else 1 if too_positive else 0
            stated = [(dim, c) for dim in reversed(DIMENSIONS) for c in chosen[dim] if c.polarity == offending]
            if not offending or not stated:
                return Critique(key, text, attempts=1)
            dim, claim = stated[0]
            chosen[dim] = [c for c in chosen[dim] if c is not claim]

    def critique_many(self, items: list[tuple[str, str, str]]) -> list[Critique]:
        return [self.critique(path, band, key) for key, path, band in items]

    def usage(self) -> dict:
        return {}
