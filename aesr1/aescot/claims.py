"""The factual claims a critique can make about an image, and how each is checked.

One table serves both sides: the analytic teacher states a claim only when the image
*clearly* has it (``holds``), and the fact filter flags a claim found in any critique
(by ``pattern``) when the image *clearly* does not have it (``contradicted``). The zone
between the two thresholds is neither stated by the teacher nor flagged by the filter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from aesr1.aescot.measure import ImageStats

DIMENSIONS = ("lighting", "emotion & narrative", "composition", "color", "exposure")

# words that show a sentence addresses a dimension (coverage check)
DIMENSION_WORDS = {
    "lighting": r"\blight\w*|\blit\b|\bshadow\w*|illuminat\w*",
    "emotion & narrative": r"\bmood\w*|emotion\w*|\bstory|narrative|\bfeel\w*|atmospher\w*|\bscene\b",
    "composition": r"compos\w*|\bfram\w*|placement|\bplaced\b|\bbalance\w*|\bthirds?\b|\barrangement",
    "color": r"\bcolou?r\w*|\bhues?\b|palette|saturat\w*|\btones?\b",
    "exposure": r"expos\w*|\bbright\w*|\bdark\w*|highlights?|shadows?",
}


@dataclass(frozen=True)
class Claim:
    id: str
    dimension: str
    polarity: int  # +1 praises, -1 criticises, 0 neutral description
    holds: Callable[[ImageStats], bool]
    contradicted: Callable[[ImageStats], bool]
    pattern: str  # regex that finds the claim in free text
    phrases: tuple[str, ...]  # how the analytic teacher words it
    opposite: str | None = None
    evidence: Callable[[ImageStats], str] = lambda s: ""

    @property
    def regex(self) -> re.Pattern:
        return _compiled(self.pattern)


_CACHE: dict[str, re.Pattern] = {}


def _compiled(pattern: str) -> re.Pattern:
    if pattern not in _CACHE:
        _CACHE[pattern] = re.compile(pattern, re.IGNORECASE)
    return _CACHE[pattern]


def _edge(s: ImageStats) -> float:
    return min(s.subject_x, 1 - s.subject_x, s.subject_y, 1 - s.subject_y)


CLAIMS: tuple[Claim, ...] = (
    # exposure
    Claim("dark", "exposure", -1, lambda s: s.brightness < 0.3, lambda s: s.brightness > 0.45,
          r"under-?exposed|too dark|murky|crushed shadows|dim and heavy",
          ("the frame is underexposed and murky", "it sits too dark, with crushed shadows",
           "the exposure is dim and heavy, the frame too dark"), "bright",
          lambda s: f"brightness {s.brightness:.2f}"),
    Claim("bright", "exposure", -1, lambda s: s.brightness > 0.72 or s.clip_bright > 0.15,
          lambda s: s.brightness < 0.5 and s.clip_bright < 0.02,
          r"over-?exposed|blown[- ]out|too bright|clipped highlights|glaring",
          ("the frame is overexposed, with blown-out highlights", "it is too bright and the highlights are clipped",
           "the exposure runs glaring and too bright"), "dark",
          lambda s: f"brightness {s.brightness:.2f}, clipped bright {s.clip_bright:.1%}"),
    Claim("exposed_well", "exposure", 1, lambda s: 0.35 < s.brightness < 0.65 and s.clip_bright < 0.03,
          lambda s: s.brightness < 0.22 or s.brightness > 0.8 or s.clip_bright > 0.2,
          r"well[- ]exposed|balanced exposure|exposure is (?:balanced|even|controlled)",
          ("the image is well exposed", "the exposure is balanced, keeping detail at both ends",
           "exposure is controlled, with no clipped areas"), "bright",
          lambda s: f"brightness {s.brightness:.2f}, clipped bright {s.clip_bright:.1%}"),
    # lighting
    Claim("directional", "lighting", 1, lambda s: s.light_strength > 0.25, lambda s: s.light_strength < 0.1,
          r"directional light|light (?:falls|comes|rakes) (?:in )?from|side ?light",
          ("directional light falls from the {light_from}, giving the frame depth",
           "light comes from the {light_from} and models the forms",
           "a clear side light from the {light_from} shapes the scene"), "flat",
          lambda s: f"light strength {s.light_strength:.2f}, from {s.light_from}"),
    Claim("flat", "lighting", -1, lambda s: s.light_strength < 0.12 and s.contrast < 0.09,
          lambda s: s.light_strength > 0.3 or s.contrast > 0.15,
          r"flat light\w*|lacks (?:contrast|depth)|low[- ]contrast|dull light",
          ("the light is flat and the frame lacks depth", "flat lighting leaves it low-contrast",
           "a dull light gives the shapes little modelling"), "directional",
          lambda s: f"light strength {s.light_strength:.2f}, contrast {s.contrast:.2f}"),
    Claim("separated", "lighting", 1, lambda s: s.subject_separation > 0.2, lambda s: s.subject_separation < 0.06,
          r"(?:stands out|separates|pops) (?:from|against) the background",
          ("the light makes the subject stand out from the background",
           "the subject pops against the background under this light"), "merged",
          lambda s: f"subject separation {s.subject_separation:.2f}"),
    Claim("merged", "lighting", -1, lambda s: s.subject_separation < 0.06, lambda s: s.subject_separation > 0.2,
          r"(?:blends|merges|sinks) into the background|lost against the background",
          ("the subject merges into the background under this light",
           "poorly lit, the subject is lost against the background"), "separated",
          lambda s: f"subject separation {s.subject_separation:.2f}"),
    # color
    Claim("vivid", "color", 1, lambda s: s.saturation > 0.45, lambda s: s.saturation < 0.2,
          r"\bvivid|rich colou?rs|bold colou?rs|strongly saturated",
          ("the colours are vivid", "rich, strongly saturated colours carry the frame"), "muted",
          lambda s: f"saturation {s.saturation:.2f}"),
    Claim("muted", "color", -1, lambda s: s.saturation < 0.15, lambda s: s.saturation > 0.35,
          r"\bmuted|desaturated|drab|greyish",
          ("the colours are muted and drab", "a desaturated, greyish palette drains the frame"), "vivid",
          lambda s: f"saturation {s.saturation:.2f}"),
    Claim("harmonious", "color", 1, lambda s: s.harmony > 0.5, lambda s: s.harmony < 0.2,
          r"harmon\w+|cohesive palette|colou?rs (?:work|sit) together",
          ("the palette is harmonious", "the hues sit together in a cohesive palette",
           "the colours work together in harmony"), "clashing",
          lambda s: f"hue harmony {s.harmony:.2f}"),
    Claim("clashing", "color", -1, lambda s: s.harmony < 0.2, lambda s: s.harmony > 0.5,
          r"clash\w*|discordant|jarring colou?rs?|colou?rs fight",
          ("the hues clash", "discordant colours fight each other", "jarring colours pull the eye in every direction"),
          "harmonious", lambda s: f"hue harmony {s.harmony:.2f}"),
    Claim("warm", "color", 0, lambda s: s.warmth > 0.08, lambda s: s.warmth < -0.03,
          r"warm (?:tones|palette|cast|hues)",
          ("warm tones dominate", "the palette leans to warm hues"), "cool", lambda s: f"warmth {s.warmth:+.2f}"),
    Claim("cool", "color", 0, lambda s: s.warmth < -0.08, lambda s: s.warmth > 0.03,
          r"(?:cool|cold) (?:tones|palette|cast|hues)",
          ("cool tones dominate", "the palette leans to cool hues"), "warm", lambda s: f"warmth {s.warmth:+.2f}"),
    # composition
    Claim("thirds", "composition", 1, lambda s: s.thirds_distance < 0.07, lambda s: s.thirds_distance > 0.2,
          r"rule of thirds|on a third|near a third|along a third",
          ("the subject sits near a third, following the rule of thirds",
           "placing the subject on a third gives the frame balance"), "centred",
          lambda s: f"subject at ({s.subject_x:.2f}, {s.subject_y:.2f}), {s.thirds_distance:.2f} from a third"),
    Claim("centred", "composition", -1, lambda s: s.centre_distance < 0.07, lambda s: s.centre_distance > 0.25,
          r"dead cent(?:re|er)|(?<!off-)(?<!off )\bcent(?:red|ered)\b",
          ("the subject sits dead centre, which feels static", "a centred subject makes the arrangement static"),
          "thirds", lambda s: f"subject {s.centre_distance:.2f} from the centre"),
    Claim("edge", "composition", -1, lambda s: _edge(s) < 0.12, lambda s: _edge(s) > 0.25,
          r"(?:cramped|pushed|jammed) (?:against|to) the (?:edge|frame)|cut off by the frame",
          ("the subject is cramped against the edge of the frame",
           "pushed to the edge, the subject is cut off by the frame"),
          None, lambda s: f"subject {_edge(s):.2f} from the nearest edge"),
    Claim("cluttered", "composition", -1, lambda s: s.clutter >= 6, lambda s: s.clutter <= 2,
          r"\bclutter\w*|distracting (?:elements|shapes|spots)|busy frame",
          ("small distracting elements clutter the frame", "the busy frame is cluttered with stray shapes"), "clean",
          lambda s: f"{s.clutter:.0f} distracting blobs"),
    Claim("clean", "composition", 1, lambda s: s.clutter <= 1, lambda s: s.clutter >= 6,
          r"uncluttered|clean frame|free of distractions|nothing distracts",
          ("the frame is clean and uncluttered", "nothing distracts from the subject"), "cluttered",
          lambda s: f"{s.clutter:.0f} distracting blobs"),
    # emotion & narrative
    Claim("coherent", "emotion & narrative", 1, lambda s: s.fragmentation < 6.0, lambda s: s.fragmentation > 10.0,
          r"coheren\w+|unified scene|reads as (?:one|a single)|sense of place",
          ("the scene is coherent and gives a calm sense of place", "it reads as one unified scene with a quiet mood"),
          "fragmented", lambda s: f"fragmentation {s.fragmentation:.1f}"),
    Claim("fragmented", "emotion & narrative", -1, lambda s: s.fragmentation > 10.0, lambda s: s.fragmentation < 6.0,
          r"fragment\w*|jumble|patchwork|disjointed",
          ("the background is a disjointed patchwork, so no mood emerges",
           "a jumble of unrelated patches leaves the scene fragmented and without a story"), "coherent",
          lambda s: f"fragmentation {s.fragmentation:.1f}"),
)

BY_ID = {claim.id: claim for claim in CLAIMS}


def claims_in(text: str) -> list[tuple[Claim, str]]:
    """Every claim whose pattern occurs in ``text``, with the matched words."""
    found = []
    for claim in CLAIMS:
        match = claim.regex.search(text)
        if match:
            found.append((claim, match.group(0)))
    return found


def dimensions_addressed(text: str) -> list[str]:
    return [d for d, words in DIMENSION_WORDS.items() if _compiled(words).search(text)]
