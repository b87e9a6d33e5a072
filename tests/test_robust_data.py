"""Bad metadata and image folders, for training and for batch prediction: each case is either handled
sensibly or stopped before any work with a message naming the file, the row and the field to fix.

tests/test_data.py covers the basic dx/duplicate/age/missing-image cases; this file adds the rest.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import tiny_config
from skain.cli import main
from skain.data.encoder import MetadataEncoder
from skain.data.layout import discover, load_table
from skain.data.schema import DataError
from skain.inference.predictor import prediction_table

HEADER = "lesion_id,image_id,dx,age,sex,localization\n"
ROWS = "L1,ISIC_1,mel,45,male,back\nL2,ISIC_2,nv,30,female,face\nL3,ISIC_3,bcc,70,male,scalp\n"
IDS = ("ISIC_1", "ISIC_2", "ISIC_3")


def folder(root: Path, csv: str | bytes, ids=IDS) -> Path:
    """An explicit layout: root/meta.csv + root/images/<id>.jpg."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (32, 24), (120, 80, 60)).save(root / "images" / f"{i}.jpg")
    (root / "meta.csv").write_bytes(csv.encode("utf-8") if isinstance(csv, str) else csv)
    return root


def table(root: Path, require=("lesion_id", "image_id", "dx")) -> pd.DataFrame:
    return load_table(discover(csv=root / "meta.csv", images=[root / "images"]), require=require)


# ------------------------------------------------------------------------------------------- CSV shape
@pytest.mark.parametrize("content, message", [
    ("", "the CSV is empty"),
    ("\n\n   \n", "the CSV is empty"),
    (HEADER, "header but no rows"),
    ("image_id,diagnosis,age\nISIC_1,mel,40\n", r"missing required column\(s\) lesion_id, dx; found image_id, "
                                                 r"diagnosis, age"),
    ("lesion id,image id,dx\nL1,ISIC_1,mel\n", r"missing required column\(s\) lesion_id, image_id"),
    (HEADER + "L1,ISIC_1,mel,45,male,back,oops,more\n", "row 2 has 8 fields but the header has 6"),
    (HEADER + "L1,ISIC_1,mel,45,male,back\nL2,ISIC_2,nv,30,female,lower extremity, left\n",
     "row 3 has 7 fields but the header has 6"),
    (HEADER + "L1,ISIC_1,,45,male,back\n", r"unknown dx label\(s\) '' \(first on row 2"),
    (HEADER + "L1,ISIC_1,melanoma,45,male,back\nL2,ISIC_2,Nevus,30,female,face\n", "'melanoma', 'nevus'"),
    (HEADER + "L1,ISIC_1,mel,,male,back\nL2,ISIC_2,nv,thirty,female,face\n", r"age must be a number.*row 3.*'thirty'"),
    (HEADER + "L1,ISIC_1,mel,1e3,male,back\n", "age must be between 0 and 120: row 2 has 1000"),
    (HEADER + "L1,ISIC_1,mel,inf,male,back\n", "age must be between 0 and 120"),
    (HEADER + "L1,ISIC_1,mel,45,male,back\nL1,ISIC_1.jpg,mel,45,male,back\n", "duplicate image_id 'ISIC_1' on rows "
                                                                             "2, 3"),
])
def test_bad_csv_stops_before_work_naming_the_file_row_and_field(tmp_path, content, message):
    root = folder(tmp_path, content)
    with pytest.raises(DataError, match=message) as err:
        table(root)
    assert str(root / "meta.csv") in str(err.value)


@pytest.mark.parametrize("image_id", ["../secret", "..\\secret", "/etc/passwd", "images/../../secret", "..", "."])
def test_image_id_with_a_path_is_refused_and_nothing_outside_the_folders_is_read(tmp_path, image_id):
    root = folder(tmp_path / "d", HEADER + f"L1,{image_id},mel,45,male,back\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.jpg")  # a readable image just outside the image folder
    for require in (("lesion_id", "image_id", "dx"), ("image_id",)):  # training and prediction
        with pytest.raises(DataError, match=r"must be a file name, not a path: row 2"):
            table(root, require)


def test_binary_file_given_as_csv_says_save_as_csv(tmp_path):
    root = folder(tmp_path, b"PK\x03\x04\x14\x00\x06\x00" + bytes(range(256)))  # what an .xlsx starts with
    with pytest.raises(DataError, match="not a text CSV.*Save it as CSV"):
        table(root)


# ------------------------------------------------------------------------------------------- handled sensibly
@pytest.mark.parametrize("encode", [
    lambda t: t.encode("utf-16"),                                   # Excel "Unicode text"
    lambda t: t.replace(",", ";").encode("utf-8"),                   # European Excel
    lambda t: t.replace(",", "\t").encode("utf-8"),                  # tab-separated
    lambda t: t.replace("\n", "\r\n").encode("utf-8"),               # Windows line ends
    lambda t: b"\xef\xbb\xbf" + t.encode("utf-8"),                   # UTF-8 with BOM
    lambda t: t.replace("back", "épaule").encode("latin-1"),         # latin-1
], ids=["utf16", "semicolon", "tab", "crlf", "bom", "latin1"])
def test_csv_encodings_and_separators_are_read(tmp_path, encode):
    frame = table(folder(tmp_path, encode(HEADER + ROWS)))
    assert list(frame["image_id"]) == list(IDS) and list(frame["dx"]) == ["mel", "nv", "bcc"]
    assert frame.loc[0, "localization"] in ("back", "épaule") and frame.loc[2, "age"] == 70


def test_renamed_case_and_padded_headers_and_extra_columns_are_accepted(tmp_path):
    csv = (" Lesion_ID ,IMAGE_ID,Dx,dx_type,Age,Sex,Localization,notes,dataset\n"
           'L1,ISIC_1,MEL,histo,45,Male,Back,"free text, with a comma",x\n'
           "L2,ISIC_2,nv,follow_up,30,female,face,,x\nL3,ISIC_3,bcc,histo,70,male,scalp,,x\n")
    frame = table(folder(tmp_path, csv))
    assert frame.loc[0, ["dx", "sex", "localization"]].tolist() == ["mel", "male", "back"]
    assert not {"dx_type", "notes", "dataset"} & set(frame.columns)  # dx_type leaks the label; extras ignored


def test_missing_ages_and_metadata_columns_become_unknown(tmp_path):
    csv = ("lesion_id,image_id,dx,age\nL1,ISIC_1,mel,\nL2,ISIC_2,nv,unknown\nL3,ISIC_3,bcc,NaN\n")
    frame = table(folder(tmp_path, csv))
    assert frame["age"].isna().all()
    assert (frame["sex"] == "unknown").all() and (frame["localization"] == "unknown").all()
    enc = MetadataEncoder.fit(frame)  # no ages at all: the encoder still has finite statistics
    age, sex, site = enc.transform(frame)
    assert np.isfinite(age).all() and (sex == 0).all() and (site == 0).all()


def test_sex_and_site_not_seen_in_training_become_unknown_with_a_warning(tmp_path, caplog):
    train = table(folder(tmp_path / "a", HEADER + ROWS))
    enc = MetadataEncoder.fit(train)
    new = pd.DataFrame({"age": [40, 50, 60], "sex": ["male", "robot", "robot"],
                        "localization": ["back", "elbowpit", "face"]})
    with caplog.at_level(logging.WARNING, logger="skain.data.encoder"):
        _, sex, site = enc.transform(new)
    assert sex.tolist() == [enc.sex_vocab.index("male"), 0, 0]
    assert site.tolist() == [enc.site_vocab.index("back"), 0, enc.site_vocab.index("face")]
    assert "sex value(s) not seen in training" in caplog.text and "'robot' (2 row(s))" in caplog.text
    assert "'elbowpit' (1 row(s))" in caplog.text


def test_unicode_and_spaces_in_folders_and_image_ids(tmp_path):
    root = tmp_path / "dätä set" / "日本 lesions"
    ids = ("ISIC 1 é", "lésion_2", "病変3")
    csv = HEADER + "".join(f"L{k},{i},nv,40,female,back\n" for k, i in enumerate(ids))
    frame = table(folder(root, csv, ids))
    assert list(frame["image_id"]) == list(ids)
    assert all(Path(p).is_file() for p in frame["path"])


def test_prediction_csv_with_an_empty_dx_column_is_treated_as_unlabelled(tmp_path):
    root = folder(tmp_path, "image_id,dx,age\nISIC_1,,40\nISIC_2,,\nISIC_3,,50\n")
    frame, _ = prediction_table(csv=root / "meta.csv", images=[root / "images"])
    assert "dx" not in frame.columns and len(frame) == 3


# ------------------------------------------------------------------------------------------- images
def bad_images(image_dir: Path) -> dict[str, str]:
    """Replace three good images with a zero-byte file, a truncated JPEG and a text file named .jpg."""
    files = sorted(image_dir.glob("*.jpg"))
    good = files[0].read_bytes()
    files[1].write_bytes(b"")
    files[2].write_bytes(good[:len(good) // 3])
    files[3].write_text("I am a text file, honestly\n")
    return {files[1].stem: "empty file (0 bytes)", files[2].stem: "cannot decode image",
            files[3].stem: "not an image"}


def test_training_with_unreadable_images_stops_before_work_listing_every_one(synth_root, tmp_path):
    from skain.training.train import fit
    data = tmp_path / "d"
    shutil.copytree(synth_root / "dataset_train", data)
    expected = bad_images(data / "image")
    with pytest.raises(DataError, match=r"3 unreadable image\(s\); fix or remove them from the CSV") as err:
        fit(tiny_config(data, tmp_path / "out"))
    for stem, reason in expected.items():
        assert any(stem in line and reason in line for line in str(err.value).splitlines()), (stem, reason)
    assert not any((tmp_path / "out").glob("*.pt"))  # no checkpoint, nothing half-written


def test_batch_prediction_reports_unreadable_images_by_name_and_predicts_the_rest(trained, synth_root, tmp_path,
                                                                               capsys):
    data = tmp_path / "d"
    shutil.copytree(synth_root / "dataset_test", data)
    expected = bad_images(data / "image")
    out = tmp_path / "pred.csv"
    code = main(["predict", "--data", str(data), "--model", str(trained), "--output", str(out), "--no-progress",
                 "--cache-dir", "off"])
    assert code == 3  # PARTIAL_FAILURE: predictions written, some images unreadable
    pred = pd.read_csv(out, keep_default_na=False).set_index("image_id")
    for stem, reason in expected.items():
        assert reason in pred.loc[stem, "error"] and pred.loc[stem, "pred"] == ""
    ok = pred[pred["error"] == ""]
    assert len(ok) == 37 and ok["pred"].ne("").all()
    err = capsys.readouterr().err
    assert "3 image(s) could not be read" in err and all(f"failed: {s}" in err for s in expected)


@pytest.mark.parametrize("content, message", [
    ("", "the CSV is empty"),
    ("image_id,age\n", "header but no rows"),
    ("name,age\nISIC_1,40\n", r"missing required column\(s\) image_id"),
    ("image_id,age\n../ISIC_1,40\n", "not a path"),
    ("image_id,age\nISIC_1,200\n", "between 0 and 120"),
    ("image_id,age\nISIC_404,40\n", "1 of 1 image.*not found.*ISIC_404"),
])
def test_skain_predict_stops_with_exit_2_and_the_message(trained, tmp_path, capsys, content, message):
    root = folder(tmp_path, content)
    out = tmp_path / "pred.csv"
    code = main(["predict", "--csv", str(root / "meta.csv"), "--images", str(root / "images"), "--model",
                 str(trained), "--output", str(out), "--no-progress"])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and pd.Series([err]).str.contains(message, regex=True).all(), err
