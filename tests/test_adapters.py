"""Each native format on small hand-written files, including every kind of bad input."""

import pytest
from conftest import write_jpeg

from aesr1.data.adapters import AnnotationError
from aesr1.data.ingest import SourceConfig, collect_source


def collect(tmp_path, fmt, files, image_root, scale, **extra):
    src = SourceConfig(format=fmt, files=files, image_root=image_root, scale=scale, **extra)
    return collect_source(fmt, src, tmp_path, "full", 2, seed=0)


def reasons(rejected):
    return sorted((r["reason"], r["line"]) for r in rejected)


def test_ava_vote_histogram_and_bad_lines(tmp_path):
    for i in (11, 12, 13, 15):
        write_jpeg(tmp_path / "AVA/images" / f"{i}.jpg")
    (tmp_path / "AVA/images/14.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "AVA/AVA.txt").write_text(
        "1 11 0 0 0 0 2 0 0 0 0 2 1 2 9\n"       # votes: two 5s and two 10s -> MOS 7.5
        "2 12 1 0 0 0 0 0 0 0 0 0 0 0 9\n"       # a single vote of 1 -> MOS 1.0
        "3 13 0 0 0 0 0 0 0 0 0 0 0 0 9\n"       # no votes: MOS undefined
        "4 14 0 0 0 1 0 0 0 0 0 0 0 0 9\n"       # image is not a JPEG
        "5 99 0 0 0 1 0 0 0 0 0 0 0 0 9\n"       # image file missing
        "6 15 0 0 0 1 0 x 0 0 0 0 0 0 9\n"       # vote count not an integer
        "7 15 0 0 0\n"                           # too few columns
        "8 11 0 0 0 0 0 0 0 0 0 1 0 0 9\n"       # id 11 again
        "9 15 0 0 0 0 0 0 0 1 0 0 0 0 9\n")
    frame, rejected = collect(tmp_path, "ava", {"votes": "AVA/AVA.txt"}, "AVA/images", (1, 10),
                              test_fraction=0.0)
    assert reasons(rejected) == [("duplicate_id", 8), ("malformed_line", 6), ("malformed_line", 7),
                                 ("missing_image", 5), ("score_nan", 3), ("unreadable_image", 4)]
    by_id = frame.set_index("native_id")
    assert by_id.loc["11", "mos"] == pytest.approx(7.5)
    assert by_id.loc["11", "score"] == pytest.approx(6.5 / 9)
    assert by_id.loc["12", "score"] == 0.0
    assert by_id.loc["15", "n_ratings"] == 1
    assert list(frame["image_id"]) == ["ava/11", "ava/12", "ava/15"]
    assert set(frame["split"]) == {"train"}


def test_tad66k_split_files_and_out_of_scale(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        write_jpeg(tmp_path / "T/img" / name)
    (tmp_path / "T/train.csv").write_text("image,score\na.jpg,5.5\nb.jpg,11\nc.jpg,nan\nd.jpg,abc\n")
    (tmp_path / "T/test.csv").write_text("image,score\nd.jpg,10\na.jpg,2\n")
    frame, rejected = collect(tmp_path, "tad66k", {"train": "T/train.csv", "test": "T/test.csv"}, "T/img", (1, 10))
    assert reasons(rejected) == [("duplicate_id", 3), ("malformed_line", 5), ("score_nan", 4),
                                 ("score_out_of_scale", 3)]
    assert dict(zip(frame.native_id, frame.split)) == {"a.jpg": "train", "d.jpg": "test"}
    assert frame.set_index("native_id").loc["d.jpg", "score"] == 1.0


def test_tad66k_missing_column_is_a_clear_error(tmp_path):
    (tmp_path / "train.csv").write_text("img,mos\na.jpg,5\n")
    with pytest.raises(AnnotationError, match=r"lacks columns \['image', 'score'\]"):
        collect(tmp_path, "tad66k", {"train": "train.csv"}, ".", (1, 10))


def test_flickr_aes_worker_csv_with_leading_spaces(tmp_path):
    for name in ("p1.jpg", "p2.jpg"):
        write_jpeg(tmp_path / "F/40K" / name)
    write_jpeg(tmp_path / "F/secret.jpg")
    (tmp_path / "F/scores.txt").write_text("p1.jpg 3.4\np2.jpg 5.0\n../secret.jpg 3.0\np3.jpg\n")
    (tmp_path / "F/workers.csv").write_text(
        "worker, imagePair, score\nA1,  p1.jpg,  3\nA2,  p1.jpg,  4\nA3,  p1.jpg,  9\nA1,  p2.jpg,  5\n")
    frame, rejected = collect(tmp_path, "flickr_aes", {"scores": "F/scores.txt", "workers": "F/workers.csv"},
                              "F/40K", (1, 5), test_fraction=0.0)
    assert reasons(rejected) == [("malformed_line", 4), ("path_escape", 3), ("rating_out_of_scale", 4)]
    by_id = frame.set_index("native_id")
    assert by_id.loc["p1.jpg", "n_ratings"] == 2  # the out-of-scale rating is not counted
    assert by_id.loc["p1.jpg", "score"] == pytest.approx(0.6)


def test_para_columns_by_name_and_session_folders(tmp_path):
    write_jpeg(tmp_path / "P/imgs/s1/x.jpg")
    write_jpeg(tmp_path / "P/imgs/s2/y.jpg")
    (tmp_path / "P/test.csv").write_text(
        "imageName,userNum,aestheticScore_mean,sessionId\n"
        "x.jpg,10,4.5,s1\n"
        "y.jpg,10,0.5,s2\n"     # below the 1..5 scale
        "z.jpg,10,3.0,s2\n")    # missing image
    frame, rejected = collect(tmp_path, "para", {"test": "P/test.csv"}, "P/imgs", (1, 5), role="test")
    assert reasons(rejected) == [("missing_image", 4), ("score_out_of_scale", 3)]
    assert frame.native_id.tolist() == ["s1/x.jpg"]
    assert frame.score.tolist() == [0.875]
    assert frame.split.tolist() == ["test"]


def test_aadb_score_prefixed_copies(tmp_path):
    write_jpeg(tmp_path / "A/new/0.500_farm1_a.jpg")
    write_jpeg(tmp_path / "A/new/farm1_b.jpg")
    (tmp_path / "A/test.txt").write_text("farm1_a.jpg 0.5\nfarm1_b.jpg 0.25\nfarm1_c.jpg 1.5\nbroken\n")
    frame, rejected = collect(tmp_path, "aadb", {"test": "A/test.txt"}, "A", (0, 1), role="test")
    assert reasons(rejected) == [("malformed_line", 4), ("score_out_of_scale", 3)]
    paths = dict(zip(frame.native_id, frame.image_path))
    assert paths["farm1_a.jpg"].endswith("new/0.500_farm1_a.jpg")
    assert paths["farm1_b.jpg"].endswith("new/farm1_b.jpg")
    assert frame.score.tolist() == [0.5, 0.25]


def test_minmax_normalisation_uses_the_observed_range(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        write_jpeg(tmp_path / "img" / name)
    (tmp_path / "s.txt").write_text("a.jpg 2\nb.jpg 3\nc.jpg 6\n")
    frame, _ = collect(tmp_path, "aadb", {"test": "s.txt"}, "img", (0, 10), role="test", normalise="minmax")
    assert frame.score.tolist() == [0.0, 0.25, 1.0]


def test_split_from_test_id_list(tmp_path):
    for i in (1, 2, 3):
        write_jpeg(tmp_path / "img" / f"{i}.jpg")
    (tmp_path / "AVA.txt").write_text("".join(f"{i} {i} 0 0 0 0 1 0 0 0 0 0 0 0 1\n" for i in (1, 2, 3)))
    (tmp_path / "test_ids.txt").write_text("2\n")
    frame, _ = collect(tmp_path, "ava", {"votes": "AVA.txt"}, "img", (1, 10), test_ids="test_ids.txt")
    assert dict(zip(frame.native_id, frame.split)) == {"1": "train", "2": "test", "3": "train"}


def test_para_rating_counts_give_n_ratings(tmp_path):
    write_jpeg(tmp_path / "P/imgs/s1/x.jpg")
    write_jpeg(tmp_path / "P/imgs/s1/y.jpg")
    levels = [f"aestheticScore_{v / 2:.1f}" for v in range(2, 11)]
    (tmp_path / "P/test.csv").write_text(
        f"imageName,sessionId,{','.join(levels)},aestheticScore_mean\n"
        "x.jpg,s1,0,0,1,2,3.0,0,0,0,0,2.9\n"     # pandas writes counts as 3.0
        "y.jpg,s1,0,0,1,x,3,0,0,0,0,2.9\n")      # a count that is not a number
    frame, rejected = collect(tmp_path, "para", {"test": "P/test.csv"}, "P/imgs", (1, 5), role="test")
    assert reasons(rejected) == [("malformed_line", 3)]
    assert frame.n_ratings.tolist() == [6]


def test_byte_order_marks_are_ignored(tmp_path):
    """Excel and pandas (encoding='utf-8-sig') start text files with a BOM; it must not stick to a name."""
    write_jpeg(tmp_path / "P/imgs/s1/x.jpg")
    (tmp_path / "P/test.csv").write_text("sessionId,imageName,aestheticScore_mean\ns1,x.jpg,4.5\n",
                                         encoding="utf-8-sig")
    frame, rejected = collect(tmp_path, "para", {"test": "P/test.csv"}, "P/imgs", (1, 5), role="test")
    assert frame.native_id.tolist() == ["s1/x.jpg"] and not rejected

    for i in (1, 2):
        write_jpeg(tmp_path / "img" / f"{i}.jpg")
    (tmp_path / "s.txt").write_text("1.jpg 0.5\n2.jpg 0.25\n", encoding="utf-8-sig")
    (tmp_path / "test_ids.txt").write_text("1.jpg\n", encoding="utf-8-sig")
    frame, rejected = collect(tmp_path, "aadb", {"test": "s.txt"}, "img", (0, 1), role="test")
    assert frame.native_id.tolist() == ["1.jpg", "2.jpg"] and not rejected
    frame, _ = collect(tmp_path, "flickr_aes", {"scores": "s.txt"}, "img", (0, 1), test_ids="test_ids.txt")
    assert dict(zip(frame.native_id, frame.split)) == {"1.jpg": "test", "2.jpg": "train"}
