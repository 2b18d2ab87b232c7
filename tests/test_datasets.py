"""The raw-dataset readers: label parsing, rejects for bad labels, errors for empty inputs."""

import csv
import shutil

import pytest

from agecl.datasets import (
    AAF_IDENTITY_NOTE,
    AAF_SPLIT,
    BAD_AGE,
    BAD_IDENTITY,
    BAD_NAME,
    DUPLICATE,
    UTKFACE_IDENTITY_NOTE,
    DatasetError,
    is_photo,
    read_aaf,
    read_csv,
    read_dataset,
    read_fgnet,
    read_morph,
    read_utkface,
)


def _touch(folder, *names):
    for name in names:
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")  # readers never decode: any bytes will do


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_fgnet_names_suffixes_and_case(tmp_path):
    _touch(tmp_path, "001A02.JPG", "001a22b.jpg", "001A22a.JPG", "078A11.jpeg", "nope.jpg", "12.png", "001A999.JPG",
           "notes.txt", "001a02.pts")
    got = read_fgnet(tmp_path)
    by = {r.source: r for r in got.records}
    assert set(by) == {"001A02.JPG", "001a22b.jpg", "001A22a.JPG", "078A11.jpeg"}
    assert (by["001A02.JPG"].age, by["001A02.JPG"].identity) == (2, "001")
    assert (by["001a22b.jpg"].age, by["001a22b.jpg"].identity) == (22, "001")
    assert (by["078A11.jpeg"].age, by["078A11.jpeg"].identity) == (11, "078")
    reasons = {r["source"]: r["reason"] for r in got.rejects}
    assert reasons == {"nope.jpg": BAD_NAME, "12.png": BAD_NAME, "001A999.JPG": BAD_AGE}
    assert all(r["message"].startswith(r["source"]) for r in got.rejects)
    assert got.ignored == 2 and got.count == 7  # .txt and .pts are not photos; nothing else is lost
    assert [r.source for r in got.records] == sorted(r.source for r in got.records)


def test_photo_extensions_any_case():
    assert all(is_photo(n) for n in ("a.JPG", "a.jpeg", "a.PNG", "a.bmp", "a.tif", "a.TIFF", "a.webp"))
    assert not any(is_photo(n) for n in ("a.txt", "a.pts", "a.csv", "a"))


def test_key_collisions_are_duplicates_not_crashes(tmp_path):
    _touch(tmp_path, "001A02.JPG", "001A02.png")  # same person, age and stem: same shard key
    got = read_fgnet(tmp_path)
    assert [r.source for r in got.records] == ["001A02.JPG"]
    assert [(r["source"], r["reason"]) for r in got.rejects] == [("001A02.png", DUPLICATE)]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path}: no photos found"):
        read_fgnet(tmp_path)
    (tmp_path / "readme.txt").write_text("no photos here")
    with pytest.raises(DatasetError, match="1 other file"):
        read_utkface(tmp_path)
    with pytest.raises(DatasetError, match="no such folder"):
        read_fgnet(tmp_path / "absent")


def test_utkface_names_and_identity_note(tmp_path):
    _touch(tmp_path, "25_0_1_20170116174525125.jpg.chip.jpg", "part2/3_1_0_20170109193055962.jpg",
           "39_1_20170116174525125.jpg.chip.jpg", "face.jpg", "x_0_1_2017.jpg")
    got = read_utkface(tmp_path)
    by = {r.source: r for r in got.records}
    assert by["25_0_1_20170116174525125.jpg.chip.jpg"].age == 25
    assert by["part2/3_1_0_20170109193055962.jpg"].age == 3
    assert by["39_1_20170116174525125.jpg.chip.jpg"].age == 39  # the release's names without race
    assert by["part2/3_1_0_20170109193055962.jpg"].identity == "part2/3_1_0_20170109193055962"
    assert len({r.identity for r in got.records}) == len(got.records)  # each photo its own identity
    assert {r["source"] for r in got.rejects} == {"face.jpg", "x_0_1_2017.jpg"}
    assert got.identity_note == UTKFACE_IDENTITY_NOTE


def test_morph_default_columns(tmp_path):
    _touch(tmp_path, "Album2/003307_00M21.JPG", "Album2/003307_01M22.JPG", "Album2/003308_00F30.JPG")
    header = ["id_num", "picture_num", "dob", "doa", "race", "gender", "facial_hair", "age", "age_diff", "glasses", "photo"]
    rows = [
        ["3307", "0", "", "", "B", "M", "0", "21", "0", "0", "Album2/003307_00M21.JPG"],
        ["3307", "1", "", "", "B", "M", "0", "22.0", "1", "0", "Album2/003307_01M22.JPG"],
        ["3308", "0", "", "", "W", "F", "0", "thirty", "0", "0", "Album2/003308_00F30.JPG"],
        ["", "0", "", "", "W", "F", "0", "30", "0", "0", "Album2/003309_00F30.JPG"],
    ]
    got = read_morph(_write_csv(tmp_path / "morph.csv", header, rows))  # root: the CSV's folder
    assert [(r.source, r.age, r.identity) for r in got.records] == [
        ("Album2/003307_00M21.JPG", 21, "3307"),
        ("Album2/003307_01M22.JPG", 22, "3307"),
    ]
    assert got.records[0].path == str(tmp_path / "Album2/003307_00M21.JPG")
    assert {(r["source"], r["reason"]) for r in got.rejects} == {
        ("Album2/003308_00F30.JPG", BAD_AGE),
        ("Album2/003309_00F30.JPG", BAD_IDENTITY),
    }
    assert "line 4" in next(r["message"] for r in got.rejects if r["reason"] == BAD_AGE)


def test_csv_custom_columns_missing_column_and_no_rows(tmp_path):
    photos = tmp_path / "photos"
    _touch(photos, "a/1.png", "b/2.jpg")
    labels = _write_csv(tmp_path / "labels.csv", ["file", "years", "who"], [["a/1.png", "7", "ann"], ["b/2.jpg", "70", "bob"]])
    got = read_dataset("csv", photos, labels, path_column="file", age_column="years", identity_column="who")
    assert [(r.source, r.age, r.identity) for r in got.records] == [("a/1.png", 7, "ann"), ("b/2.jpg", 70, "bob")]
    assert got.extra["columns"] == {"path": "file", "age": "years", "identity": "who"}
    with pytest.raises(DatasetError, match="no column 'path'.*--path-column"):
        read_csv(labels, photos)
    empty = _write_csv(tmp_path / "empty.csv", ["path", "age", "identity"], [])
    with pytest.raises(DatasetError, match=f"{empty}: no rows"):
        read_csv(empty, photos)
    with pytest.raises(DatasetError, match="needs --csv"):
        read_dataset("morph", photos)


def test_aaf_names_gender_and_the_authors_split(tmp_path):
    images, lists = tmp_path / "aaf" / "images", tmp_path / "aaf" / "splits"
    _touch(images, "00000A02.jpg", "00001A35.jpg", "07381A80.JPG", "07382a19.jpg", "12345B20.jpg", "00003A999.jpg")
    lists.mkdir()
    (lists / "train.txt").write_text("00000A02.jpg 0\n07381A80.jpg 1\n")
    (lists / "val.txt").write_text("00001A35.jpg 0\n07382A19.jpg 1\n\n99999A50.jpg 1\n")
    got = read_dataset("aaf", images)
    by = {r.source: r for r in got.records}
    assert sorted(by) == ["00000A02.jpg", "00001A35.jpg", "07381A80.JPG", "07382a19.jpg"]
    assert [(by[s].age, by[s].identity) for s in sorted(by)] == [(2, "00000"), (35, "00001"), (80, "07381"), (19, "07382")]
    assert {s: r.meta["gender"] for s, r in by.items()} == {
        "00000A02.jpg": "female", "00001A35.jpg": "female", "07381A80.JPG": "male", "07382a19.jpg": "male",
    }
    assert {r["source"]: r["reason"] for r in got.rejects} == {"12345B20.jpg": BAD_NAME, "00003A999.jpg": BAD_AGE}
    assert got.identity_note == AAF_IDENTITY_NOTE and got.dataset == "aaf"
    (split,) = got.published_splits
    # fold 0 = val.txt (the default test fold), fold 1 = train.txt; names as the lists spell them
    assert split.name == AAF_SPLIT and sorted(split.entries) == [
        ("00000A02.jpg", 1), ("00001A35.jpg", 0), ("07381A80.jpg", 1), ("07382A19.jpg", 0), ("99999A50.jpg", 0),
    ]
    assert got.extra["split_lists"] == [str(lists / "val.txt"), str(lists / "train.txt")]
    # The gender is part of what the build depends on.
    before = got.digest()
    (lists / "train.txt").write_text("00000A02.jpg 1\n07381A80.jpg 1\n")
    assert read_aaf(images).digest() != before

    # The lists inside the root work too (root = the dataset folder); without them, no gender and no split.
    assert read_aaf(tmp_path / "aaf").published_splits[0].name == AAF_SPLIT
    shutil.rmtree(lists)
    bare = read_aaf(images)
    assert all(r.meta is None for r in bare.records) and not bare.published_splits
    assert "none found" in bare.extra["split_lists"]


def test_aaf_lists_that_do_not_parse_are_errors_naming_the_line(tmp_path):
    images, lists = tmp_path / "images", tmp_path / "splits"
    _touch(images, "00000A02.jpg")
    lists.mkdir()
    (lists / "val.txt").write_text("00000A02.jpg 0\n")
    (lists / "train.txt").write_text("00000A02.jpg 0\n00001A02.jpg female\n")
    with pytest.raises(DatasetError, match=r"train.txt line 2: expected '<file name> <gender 0\|1>'"):
        read_aaf(images)
    (lists / "train.txt").write_text("00000A02.jpg 1\n")
    with pytest.raises(DatasetError, match="train.txt: 00000A02.jpg has gender 1, another list gives it female"):
        read_aaf(images)
