"""Copies of test images among the training images: perceptual hashes, their cache, the nearest test image.

The real sets overlap in ways their ids do not show (AVA, FLICKR-AES and AADB all draw on
public photo sites; one photo can sit in two sets, re-encoded, resized or turned grey), so
ingest compares pictures, not names: each image's 256-bit perceptual hash (imagehash's pHash at
``hash_size`` 16: the signs of the low frequencies of its 2-D DCT, on the grey image, so a
greyscale copy hashes alike) and the Hamming distance between hashes. ``max_distance`` (32) is
measured (``benchmarks/overlap.py``, docs/stages/ingest.md#test-overlap): JPEG re-encoding at
quality 50, halving, doubling, greyscale and greyscale + halving + JPEG 50 move a real photo's
hash by at most 8 bits, distinct real photos lie 108 bits or more apart, and AesSynth's closest
training and test images 42.

Hashes are cached by file (path, size, modification time), so a rerun reads only new or
changed files.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from aesr1.config import config
from aesr1.images import load_image

log = logging.getLogger(__name__)

HASH_SIZE = 16  # pHash over a 16 x 16 block of DCT coefficients: 256 bits
WORDS = HASH_SIZE * HASH_SIZE // 64  # the hash as this many uint64 words
BITS = HASH_SIZE * HASH_SIZE
KEY_COLUMNS = ["path", "size", "mtime_ns"]


@config
class OverlapConfig:
    """Params ``ingest.overlap``: when a training image counts as a copy of a test image."""

    max_distance: int = 32  # Hamming distance (of 256 bits) at or below which two images are one picture
    cache: str | None = "data/cache/image_hashes.parquet"  # null: hash every image on every run


def image_hash(path: str) -> np.ndarray:
    """The 256-bit pHash of an image file as ``WORDS`` uint64 words (EXIF-upright; a JPEG decoded at a reduced
    size first, which the hash's 64 x 64 resize makes no difference to)."""
    import imagehash
    from PIL import Image

    with Image.open(path) as opened:
        opened.draft(opened.mode, (16 * HASH_SIZE, 16 * HASH_SIZE))  # JPEG: decode at 1/2 to 1/8 scale
        image = load_image(opened)  # upright, 8-bit RGB: as every other path reads it
    bits = imagehash.phash(image, hash_size=HASH_SIZE).hash.flatten()
    return np.packbits(bits).view(">u8").astype(np.uint64)


def _file_key(path: str) -> tuple[str, int, int]:
    stat = os.stat(path)
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


def image_hashes(paths: list[str], cache: str | None = None, workers: int = 1) -> np.ndarray:
    """The hashes of ``paths`` (rows of ``WORDS`` uint64), read from ``cache`` where a file is unchanged and
    computed (on ``workers`` processes) where not; the cache is then rewritten with every file's hash."""
    words = [f"h{i}" for i in range(WORDS)]  # stored as int64: parquet has no unsigned 64-bit column here
    keys = pd.DataFrame([_file_key(p) for p in paths], columns=KEY_COLUMNS)
    known = pd.read_parquet(cache) if cache and Path(cache).is_file() else None
    hashes = np.zeros((len(paths), WORDS), dtype=np.uint64)
    missing = np.arange(len(paths))
    if known is not None:
        merged = keys.merge(known.drop_duplicates(KEY_COLUMNS), on=KEY_COLUMNS, how="left")
        cached = merged[words[0]].notna().to_numpy()
        hashes[cached] = merged.loc[cached, words].to_numpy(dtype=np.int64).view(np.uint64)
        missing = np.flatnonzero(~cached)
    if not len(missing):
        return hashes
    log.info("hashing %d images (%d read from the cache)", len(missing), len(paths) - len(missing))
    todo = [paths[i] for i in missing]
    workers = min(workers, os.cpu_count() or 1)
    if workers > 1 and len(todo) > 100:
        with ProcessPoolExecutor(workers) as pool:
            computed = list(pool.map(image_hash, todo, chunksize=64))
    else:
        computed = [image_hash(p) for p in todo]
    hashes[missing] = np.stack(computed)
    if cache:
        fresh = keys.assign(**{w: hashes[:, i].view(np.int64) for i, w in enumerate(words)})
        table = pd.concat([known, fresh]) if known is not None else fresh
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        partial = Path(f"{cache}.partial")
        table.drop_duplicates(KEY_COLUMNS, keep="last").to_parquet(partial, index=False)
        partial.replace(cache)  # a killed run leaves the old cache whole
    return hashes


def nearest(query: np.ndarray, reference: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``query``, the Hamming distance to its nearest row of ``reference`` and that row's index
    (every pair compared, ``chunk`` query rows at a time: 255,000 x 20,000 pairs take seconds)."""
    distances = np.full(len(query), BITS + 1, dtype=np.int64)
    indexes = np.full(len(query), -1, dtype=np.int64)
    if not len(reference):
        return distances, indexes
    for start in range(0, len(query), chunk):
        block = query[start:start + chunk]
        bits = np.zeros((len(block), len(reference)), dtype=np.int64)
        for word in range(query.shape[1]):
            bits += np.bitwise_count(block[:, None, word] ^ reference[None, :, word])
        indexes[start:start + len(block)] = bits.argmin(axis=1)
        distances[start:start + len(block)] = bits.min(axis=1)
    return distances, indexes
