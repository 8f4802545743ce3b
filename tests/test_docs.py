"""The docs stay true: every relative link resolves, and the README's figures are the published run's."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import yaml
from conftest import REPO
from markdown.extensions.toc import slugify

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*(?:\{#([\w-]+)\})?\s*#*\s*$", re.M)


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def prose(text: str) -> str:
    """The text outside code blocks and code spans, where a link is a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links_in(text: str) -> list[str]:
    return [target for target in LINK.findall(prose(text))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: are not the repository's


@functools.cache
def anchors(path: Path) -> set[str]:
    """The ids MkDocs gives the headings of ``path`` (its toc extension's slugify, or an explicit ``{#id}``)."""
    ids = set()
    for _, title, explicit in HEADING.findall(FENCE.sub("", path.read_text())):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")
        ids.add(explicit or slugify(text, "-"))
    return ids


def tracked_files() -> set[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(listed.splitlines())


def declared_outputs() -> list[str]:
    """Every path dvc.yaml declares as an output (outs, metrics, plots), its ``${...}`` read from params.yaml."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())

    def resolve(path: str) -> str:
        def lookup(match: re.Match) -> str:
            value = params
            for key in match.group(1).split("."):
                value = value[key]
            return str(value)
        return re.sub(r"\$\{([^}]+)\}", lookup, path)

    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    paths = []
    for stage in pipeline["stages"].values():
        for field in ("outs", "metrics", "plots"):
            for entry in stage.get(field, []):
                paths.append(resolve(entry if isinstance(entry, str) else next(iter(entry))))
    for entry in pipeline.get("plots", []):
        paths.append(entry if isinstance(entry, str) else next(iter(entry)))
    return [path.rstrip("/") for path in paths]


def test_every_relative_link_in_the_readme_and_docs_resolves():
    tracked, outputs = tracked_files(), declared_outputs()
    broken = []
    for doc in documents():
        for target in links_in(doc.read_text()):
            path, _, fragment = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            try:
                relative = resolved.relative_to(REPO).as_posix()
            except ValueError:
                broken.append(f"{doc.relative_to(REPO)}: {target} points outside the repository")
                continue
            is_tracked = relative in tracked or any(name.startswith(relative + "/") for name in tracked)
            is_output = any(relative == out or relative.startswith(out + "/") for out in outputs)
            if not (is_tracked or is_output):
                broken.append(f"{doc.relative_to(REPO)}: {target} is neither a tracked file nor a pipeline output")
            elif fragment and resolved.suffix == ".md" and is_tracked and fragment not in anchors(resolved):
                broken.append(f"{doc.relative_to(REPO)}: {target} has no heading #{fragment}")
    assert not broken, "\n".join(broken)


def test_the_link_check_finds_links_and_headings():
    """The check above is not vacuous: it finds the README's links and the headings MkDocs makes, skips code and
    URLs, and a path that is neither tracked nor an output is not taken for one."""
    readme = (REPO / "README.md").read_text()
    assert "docs/method.md" in links_in(readme) and "#what-the-embedded-default-reaches" in links_in(readme)
    assert "what-the-embedded-default-reaches" in anchors(REPO / "README.md")
    policy = anchors(REPO / "docs" / "stages" / "policy.md")
    assert {"the-pixel-budget", "cold-start-sft-aesr1-sft", "backbone-families"} <= policy
    text = "see [x](docs/nope.md) and `[y](z.md)`\n```\n[w](v.md)\n```\n![m](https://e.org/a.png) [a](#b)"
    assert links_in(text) == ["docs/nope.md", "#b"]
    assert "docs/nope.md" not in tracked_files() and "data/evaluate" in declared_outputs()
