"""Copies of test images among the training images, on real photos in the five native layouts.

AesSynth writes the five datasets' annotation files and image folders; every image is then
replaced by a distinct real photo (scikit-image's sample photos, and their halves), and copies of
test images are planted in training: exact, JPEG re-encoded, resized, greyscale, each from
another dataset's test set. Ingest must quarantine exactly those as ``test_overlap``, and no
distinct photo.
"""

import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO
from PIL import Image

from aesr1.data import overlap
from aesr1.data.ingest import IngestConfig, collect_source, ingest
from aesr1.data.synth import SplitSize, SynthConfig, generate
from aesr1.stage import Recorder

sys.path.insert(0, str(REPO / "benchmarks"))
from photos import jpeg, real_photos  # noqa: E402  (the photos benchmarks/overlap.py measures the threshold on)

SIZES = {"ava": SplitSize(4, 2), "tad66k": SplitSize(4, 2), "flickr_aes": SplitSize(3, 2), "para": SplitSize(0, 2),
         "aadb": SplitSize(0, 2)}

COPIES = {  # how a test image is planted in training
    "exact": lambda im: im,
    "re-encoded": lambda im: jpeg(im, 50),
    "resized": lambda im: im.resize((im.width // 2, im.height // 2), Image.LANCZOS),
    "greyscale": lambda im: im.convert("L").convert("RGB"),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(raw root, ingest params, {train image id: (how, the test image id it copies, its path)}, the test image that
    copies another set's and that one)."""
    root = tmp_path_factory.mktemp("real") / "raw"
    generate(SynthConfig(out_dir=str(root), sizes=SIZES, fault_fraction=0.0, workers=1))
    section = yaml.safe_load((REPO / "params.yaml").read_text())["ingest"]
    section.update(raw_root=str(root), out_dir=str(root.parent / "ingest"), train_size=5, min_test_per_dataset=1,
                   io_workers=1, overlap={"max_distance": 32, "cache": str(root.parent / "hashes.parquet")})
    cfg = IngestConfig(**section)
    rows = pd.concat([collect_source(name, src, root, "full", 1, cfg.seed)[0] for name, src in cfg.sources.items()])
    rows = rows.sort_values("image_id").reset_index(drop=True)
    photos = real_photos()
    assert len(photos) >= len(rows)
    pictures = {}
    for row, photo in zip(rows.itertuples(), photos):
        photo.thumbnail((320, 320))
        photo.save(row.image_path)
        pictures[row.image_id] = photo
    train, test = rows[rows.split == "train"], rows[rows.split == "test"]
    sources = [("para", "ava", "exact"), ("aadb", "tad66k", "re-encoded"), ("ava", "flickr_aes", "resized"),
               ("tad66k", "ava", "greyscale")]
    plants = {}
    for i, (from_set, into_set, how) in enumerate(sources):
        original = test[test.dataset == from_set].iloc[0]
        target = train[train.dataset == into_set].iloc[i // 3]  # ava gets two copies: its first and second image
        COPIES[how](pictures[original.image_id]).save(target.image_path)
        plants[target.image_id] = (how, original.image_id, target.image_path)
    # a test image of one set that is a copy of another set's: listed, and kept in both
    para, aadb = test[test.dataset == "para"].iloc[1], test[test.dataset == "aadb"].iloc[1]
    pictures[para.image_id].save(aadb.image_path)
    return root, cfg, plants, (aadb.image_id, para.image_id)


def test_copies_of_test_images_are_quarantined_and_no_distinct_photo_is(planted):
    root, cfg, plants, (copy, original) = planted
    metrics = ingest(cfg, Recorder())
    out = root.parent / "ingest"
    rejected = pd.read_parquet(out / "rejected.parquet")
    overlapping = rejected[rejected.reason == "test_overlap"]
    found = dict(zip(overlapping.dataset + "/" + overlapping.native_id, overlapping.detail))
    assert set(found) == set(plants), overlapping.detail.tolist()  # every planted copy, and nothing else
    for image_id, (how, original_id, _) in plants.items():
        assert found[image_id].startswith(f"a copy of test image {original_id} "), (how, found[image_id])
    assert metrics["test_overlap"] == len(plants)
    train, test = pd.read_parquet(out / "train.parquet"), pd.read_parquet(out / "test.parquet")
    assert not set(train.image_id) & set(plants) and len(train) == cfg.train_size
    duplicates = pd.read_parquet(out / "test_duplicates.parquet")
    assert sorted(duplicates[["image_id", "copy_of"]].iloc[0]) == sorted([copy, original])
    assert metrics["test_duplicates"] == 1 and {copy, original} <= set(test.image_id)  # both test sets kept whole


def test_a_rerun_hashes_only_new_or_changed_files(planted, monkeypatch):
    root, cfg, _, _ = planted
    ingest(cfg, Recorder())  # the cache holds every file now
    hashed = []
    original = overlap.image_hash

    def counted(path):
        hashed.append(path)
        return original(path)

    monkeypatch.setattr(overlap, "image_hash", counted)
    ingest(cfg, Recorder())
    assert hashed == []
    test = pd.read_parquet(root.parent / "ingest" / "test.parquet")
    changed = test.image_path.iloc[0]
    Image.open(changed).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT).save(changed)
    ingest(cfg, Recorder())
    assert hashed == [changed]


def test_the_hash_ignores_greyscale_and_size_but_not_the_picture(tmp_path):
    photos = real_photos()[:3]
    paths = []
    for i, photo in enumerate([photos[0], COPIES["greyscale"](photos[0]), COPIES["resized"](photos[0]), photos[1]]):
        paths.append(str(tmp_path / f"{i}.png"))
        photo.save(paths[-1])
    hashes = overlap.image_hashes(paths)
    distance, index = overlap.nearest(hashes[1:], hashes[:1])
    assert list(index) == [0, 0, 0] and distance[0] <= 2 and distance[1] <= 16 and distance[2] > 64
    assert overlap.nearest(hashes[:0], hashes)[0].size == 0
    assert (overlap.nearest(hashes, hashes[:0])[0] == overlap.BITS + 1).all()
    assert np.array_equal(overlap.image_hashes(paths), hashes)
