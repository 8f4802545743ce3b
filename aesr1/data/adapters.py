"""Readers for the native annotation files of AVA, TAD66K, FLICKR-AES, PARA and AADB.

An adapter only parses: it turns each annotation line into an :class:`Entry` (native
id, image path relative to the image root, MOS on the native scale, split if the file
says it) or a :class:`Rejection` (the line could not be parsed). Score ranges, image
files, duplicates and splits are checked by the ingest stage, the same for all formats.

``files`` maps a role to a path; the roles each format expects:

- ``ava``: ``votes`` (AVA.txt: index, image id, 10 vote counts, 2 tags, challenge id)
- ``tad66k``: ``train``, ``test`` (CSV ``image,score``)
- ``flickr_aes``: ``scores`` (``<name> <score>``), optional ``workers`` (CSV
  ``worker, imagePair, score``, ratings 1..5, leading spaces)
- ``para``: ``train``, ``test`` (PARA-Giaa{Train,Test}.csv, columns by name; the
  ``aestheticScore_<rating>`` count columns, when present, give ``n_ratings``)
- ``aadb``: ``train``, ``validation``, ``test`` (``<name> <score>``)

Text files are read as UTF-8 with an optional byte-order mark (``utf-8-sig``): Excel and
pandas write one, and it would otherwise stick to the first column name or id.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from aesr1.errors import AesError

ENCODING = "utf-8-sig"  # UTF-8, with or without a byte-order mark
SPLIT_ROLES = {"train": "train", "test": "test", "validation": "val"}


@dataclass
class Entry:
    native_id: str
    image_rel: str
    mos: float
    source_file: str
    line: int
    split: str | None = None
    n_ratings: int | None = None


@dataclass
class Rejection:
    source_file: str
    line: int
    reason: str
    detail: str
    raw: str = ""
    native_id: str = ""


Parsed = Iterator[Entry | Rejection]


class AnnotationError(AesError):
    """An annotation file is missing or lacks the columns its format needs."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


def _need(files: dict[str, Path], role: str, fmt: str) -> Path:
    if role not in files:
        raise AnnotationError(f"{fmt}: 'files' needs a '{role}' entry, got {sorted(files)}")
    path = files[role]
    if not path.is_file():
        raise AnnotationError(f"{fmt}: annotation file not found: {path}", path)
    return path


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding=ENCODING, errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                yield number, line.rstrip("\n")


def read_ava(files: dict[str, Path], image_root: Path) -> Parsed:
    path = _need(files, "votes", "ava")
    for number, line in _lines(path):
        cols = line.split()
        if len(cols) != 15:
            yield Rejection(str(path), number, "malformed_line", f"expected 15 columns, got {len(cols)}", line)
            continue
        try:
            votes = [int(v) for v in cols[2:12]]
        except ValueError:
            yield Rejection(str(path), number, "malformed_line", "vote counts are not integers", line, cols[1])
            continue
        total = sum(votes)
        mos = sum(score * v for score, v in zip(range(1, 11), votes)) / total if total else math.nan
        yield Entry(cols[1], f"{cols[1]}.jpg", mos, str(path), number, n_ratings=total)


def _csv_rows(path: Path, needed: tuple[str, ...], fmt: str) -> Iterator[tuple[int, dict, str]]:
    with open(path, newline="", encoding=ENCODING, errors="replace") as fh:
        reader = csv.reader(fh, skipinitialspace=True)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in needed if c not in header]
        if missing:
            raise AnnotationError(f"{fmt}: {path} lacks columns {missing}; header is {header}", path)
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            raw = ",".join(row)
            if len(row) != len(header):
                yield reader.line_num, {}, raw
                continue
            yield reader.line_num, {h: cell.strip() for h, cell in zip(header, row)}, raw


def read_tad66k(files: dict[str, Path], image_root: Path) -> Parsed:
    for role in ("train", "test"):
        if role not in files:
            continue
        path = _need(files, role, "tad66k")
        for number, row, raw in _csv_rows(path, ("image", "score"), "tad66k"):
            if not row:
                yield Rejection(str(path), number, "malformed_line", "wrong number of columns", raw)
                continue
            try:
                mos = float(row["score"])
            except ValueError:
                yield Rejection(str(path), number, "malformed_line", f"score {row['score']!r} is not a number",
                                raw, row["image"])
                continue
            yield Entry(row["image"], row["image"], mos, str(path), number, split=SPLIT_ROLES[role])


def _name_score_lines(path: Path) -> Iterator[tuple[int, str, float] | Rejection]:
    for number, line in _lines(path):
        cols = line.split()
        if len(cols) != 2:
            yield Rejection(str(path), number, "malformed_line",
                            f"expected '<name> <score>', got {len(cols)} fields", line)
            continue
        try:
            yield number, cols[0], float(cols[1])
        except ValueError:
            yield Rejection(str(path), number, "malformed_line", f"score {cols[1]!r} is not a number", line, cols[0])


def read_flickr_aes(files: dict[str, Path], image_root: Path) -> Parsed:
    counts: Counter[str] = Counter()
    if "workers" in files:
        path = _need(files, "workers", "flickr_aes")
        for number, row, raw in _csv_rows(path, ("worker", "imagePair", "score"), "flickr_aes"):
            if not row:
                yield Rejection(str(path), number, "malformed_line", "wrong number of columns", raw)
                continue
            try:
                rating = float(row["score"])
            except ValueError:
                rating = math.nan
            if not 1 <= rating <= 5:
                yield Rejection(str(path), number, "rating_out_of_scale",
                                f"worker rating {row['score']!r} outside 1..5", raw, row["imagePair"])
                continue
            counts[row["imagePair"]] += 1
    path = _need(files, "scores", "flickr_aes")
    for item in _name_score_lines(path):
        if isinstance(item, Rejection):
            yield item
            continue
        number, name, mos = item
        yield Entry(name, name, mos, str(path), number, n_ratings=counts.get(name) if counts else None)


_PARA_COUNT = re.compile(r"^aestheticScore_\d+(\.\d+)?$")  # raters per rating: aestheticScore_1.0 .. _5.0


def read_para(files: dict[str, Path], image_root: Path) -> Parsed:
    for role in ("train", "test"):
        if role not in files:
            continue
        path = _need(files, role, "para")
        for number, row, raw in _csv_rows(path, ("sessionId", "imageName", "aestheticScore_mean"), "para"):
            if not row:
                yield Rejection(str(path), number, "malformed_line", "wrong number of columns", raw)
                continue
            rel = f"{row['sessionId']}/{row['imageName']}"
            counts = [row[c] for c in row if _PARA_COUNT.match(c)]
            try:
                mos = float(row["aestheticScore_mean"])
                n_ratings = sum(int(float(c)) for c in counts) if counts else None  # pandas writes 3.0
            except ValueError:
                yield Rejection(str(path), number, "malformed_line",
                                f"aestheticScore_mean {row['aestheticScore_mean']!r} or the rating counts "
                                f"{counts} are not numbers", raw, rel)
                continue
            yield Entry(rel, rel, mos, str(path), number, split=SPLIT_ROLES[role], n_ratings=n_ratings)


_SCORE_PREFIX = re.compile(r"^\d+\.\d+_")


def _unprefixed_index(image_root: Path) -> dict[str, str]:
    """Map each file's name without a score prefix (``0.500_x.jpg`` -> ``x.jpg``) to its relative path."""
    index: dict[str, str] = {}
    if not image_root.is_dir():
        return index
    for folder, _, names in os.walk(image_root):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), image_root)
            index.setdefault(name, rel)
            stripped = _SCORE_PREFIX.sub("", name)
            if stripped != name:
                index.setdefault(stripped, rel)
    return index


def read_aadb(files: dict[str, Path], image_root: Path) -> Parsed:
    index = _unprefixed_index(image_root)
    for role in ("train", "validation", "test"):
        if role not in files:
            continue
        path = _need(files, role, "aadb")
        for item in _name_score_lines(path):
            if isinstance(item, Rejection):
                yield item
                continue
            number, name, mos = item
            yield Entry(name, index.get(name, name), mos, str(path), number, split=SPLIT_ROLES[role])


ADAPTERS: dict[str, Callable[[dict[str, Path], Path], Parsed]] = {
    "ava": read_ava,
    "tad66k": read_tad66k,
    "flickr_aes": read_flickr_aes,
    "para": read_para,
    "aadb": read_aadb,
}
