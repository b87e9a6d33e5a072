"""ISIC Archive exports read directly: the documented diagnosis/site mapping, lesion grouping, and absent metadata
columns named in a warning (never a silent "unknown" for every row), in the Archive path and the plain CSV path."""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from skain.data.isic import from_archive
from skain.data.layout import discover, load_table
from skain.data.schema import DataError, clean_metadata, read_csv

HIERARCHICAL = """isic_id,attribution,copyright_license,lesion_id,patient_id,age_approx,sex,anatom_site_general,diagnosis_1,diagnosis_2,diagnosis_3,diagnosis_4
ISIC_0000001,A,CC-BY,IL_1,IP_1,55,male,posterior torso,Malignant,Malignant melanocytic proliferations (Melanoma),Melanoma Invasive,"Melanoma Invasive, Superficial spreading"
ISIC_0000002,A,CC-BY,IL_1,IP_1,55,male,posterior torso,Malignant,Malignant melanocytic proliferations (Melanoma),Melanoma in situ,
ISIC_0000003,A,CC-BY,IL_2,IP_1,55,male,anterior torso,Benign,Benign melanocytic proliferations,Nevus,Blue nevus
ISIC_0000004,A,CC-BY,,IP_2,85+,female,head/neck,Malignant,Malignant adnexal epithelial proliferations - Follicular,Basal cell carcinoma,
ISIC_0000005,A,CC-BY,,,40,female,palms/soles,Indeterminate,Indeterminate epidermal proliferations,Solar or actinic keratosis,
ISIC_0000006,A,CC-BY,IL_6,IP_3,70,male,upper extremity,Malignant,Malignant epidermal proliferations,Squamous cell carcinoma in situ,
ISIC_0000007,A,CC-BY,IL_7,IP_3,70,male,lower extremity,Benign,Benign epidermal proliferations,Solar lentigo,
ISIC_0000008,A,CC-BY,IL_8,IP_4,30,female,oral/genital,Benign,Benign soft tissue proliferations - Fibro-histiocytic,Dermatofibroma,"Dermatofibroma, Aneurysmal"
ISIC_0000009,A,CC-BY,IL_9,IP_4,30,female,lateral torso,Benign,Benign soft tissue proliferations - Vascular,Hemangioma,"Hemangioma, Cherry"
ISIC_0000010,A,CC-BY,IL_10,IP_5,60,male,,Benign,Hemorrhagic lesions,Hemorrhage,
ISIC_0000011,A,CC-BY,IL_11,IP_5,60,male,nail,Malignant,Malignant epidermal proliferations,"Squamous cell carcinoma, Invasive",
ISIC_0000012,A,CC-BY,IL_12,IP_6,20,female,posterior torso,Benign,Cysts,Milium,
ISIC_0000013,A,CC-BY,IL_13,IP_6,20,female,posterior torso,Benign,,,
"""

LEGACY = """isic_id,attribution,copyright_license,age_approx,anatom_site_general,benign_malignant,diagnosis,lesion_id,sex
ISIC_0024306,ViDIR,CC-BY-NC,45,posterior torso,benign,nevus,IL_0000001,male
ISIC_0024307,ViDIR,CC-BY-NC,50,lower extremity,benign,pigmented benign keratosis,IL_0000002,male
ISIC_0024308,ViDIR,CC-BY-NC,55,,malignant,melanoma,IL_0000003,female
ISIC_0024309,ViDIR,CC-BY-NC,40,head/neck,benign,vascular lesion,IL_0000004,female
ISIC_0024310,ViDIR,CC-BY-NC,60,upper extremity,malignant,actinic keratosis,IL_0000005,male
ISIC_0024311,ViDIR,CC-BY-NC,70,anterior torso,benign,lichenoid keratosis,IL_0000006,male
ISIC_0024312,ViDIR,CC-BY-NC,80,anterior torso,benign,verruca,IL_0000007,male
ISIC_0024313,ViDIR,CC-BY-NC,80,anterior torso,malignant,,IL_0000008,male
"""


def frame_of(text: str, tmp_path: Path) -> pd.DataFrame:
    (tmp_path / "metadata.csv").write_text(text)
    return read_csv(tmp_path / "metadata.csv")


def test_hierarchical_diagnoses_map_onto_the_7_classes_and_the_rest_is_counted(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="skain.data.isic"):
        out = from_archive(frame_of(HIERARCHICAL, tmp_path), "metadata.csv").set_index("image_id")
    assert out["dx"].to_dict() == {
        "ISIC_0000001": "mel", "ISIC_0000002": "mel", "ISIC_0000003": "nv", "ISIC_0000004": "bcc",
        "ISIC_0000005": "akiec", "ISIC_0000006": "akiec", "ISIC_0000007": "bkl", "ISIC_0000008": "df",
        "ISIC_0000009": "vasc", "ISIC_0000010": "vasc"}
    assert ("3 of 13 image(s) have a diagnosis outside the 7 classes" in caplog.text
            and "Squamous cell carcinoma, Invasive (1)" in caplog.text and "Milium (1)" in caplog.text
            and "Benign (1)" in caplog.text)


def test_sites_ages_and_lesion_grouping(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="skain.data.isic"):
        out = from_archive(frame_of(HIERARCHICAL, tmp_path), "metadata.csv").set_index("image_id")
    assert out["localization"].to_dict() == {
        "ISIC_0000001": "back", "ISIC_0000002": "back", "ISIC_0000003": "trunk", "ISIC_0000004": "face",
        "ISIC_0000005": "acral", "ISIC_0000006": "upper extremity", "ISIC_0000007": "lower extremity",
        "ISIC_0000008": "genital", "ISIC_0000009": "trunk", "ISIC_0000010": "unknown"}
    assert "'nail' (1)" in caplog.text  # a site with no HAM10000 equivalent is named, not silently dropped
    assert out.loc["ISIC_0000004", "age"] == "85"
    # lesion_id where given, else patient_id, else the image itself
    assert out["lesion_id"].to_dict() == {
        "ISIC_0000001": "IL_1", "ISIC_0000002": "IL_1", "ISIC_0000003": "IL_2", "ISIC_0000004": "IP_2",
        "ISIC_0000005": "ISIC_0000005", "ISIC_0000006": "IL_6", "ISIC_0000007": "IL_7", "ISIC_0000008": "IL_8",
        "ISIC_0000009": "IL_9", "ISIC_0000010": "IL_10"}


def test_legacy_diagnosis_column(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="skain.data.isic"):
        out = from_archive(frame_of(LEGACY, tmp_path), "metadata.csv")
    assert out["dx"].tolist() == ["nv", "bkl", "mel", "vasc", "akiec", "bkl"]
    assert "2 of 8 image(s)" in caplog.text and "verruca (1)" in caplog.text and "malignant (1)" in caplog.text


def test_absent_columns_are_named_in_a_warning(tmp_path, caplog):
    text = "isic_id,diagnosis\nISIC_0000001,nevus\nISIC_0000002,melanoma\n"
    with caplog.at_level(logging.WARNING, logger="skain.data.isic"):
        out = from_archive(frame_of(text, tmp_path), "metadata.csv")
    for column in ("age_approx", "sex", "anatom_site_general", "lesion_id"):
        assert f"no {column}" in caplog.text
    assert out["lesion_id"].tolist() == ["ISIC_0000001", "ISIC_0000002"]


def test_an_unlabelled_export_is_fine_for_prediction_and_refused_for_training(tmp_path):
    text = "isic_id,age_approx,sex,anatom_site_general\nISIC_0000001,40,male,head/neck\n"
    out = from_archive(frame_of(text, tmp_path), "metadata.csv", need_dx=False)
    assert "dx" not in out and out["localization"].tolist() == ["face"]
    with pytest.raises(DataError, match="without diagnoses"):
        from_archive(frame_of(text, tmp_path), "metadata.csv", need_dx=True)


def test_archive_export_folder_is_discovered_and_loaded(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(1, 14):
        Image.new("RGB", (16, 12), (120, 80, 60)).save(tmp_path / "images" / f"ISIC_{i:07d}.jpg")
    (tmp_path / "metadata.csv").write_text(HIERARCHICAL)
    src = discover(tmp_path)
    assert src.layout == "isic"
    frame = load_table(src)
    assert len(frame) == 10 and frame["age"].max() == 85 and set(frame["sex"]) == {"male", "female"}
    unlabelled = load_table(src, require=("image_id",))       # prediction reads the same folder
    assert len(unlabelled) == 10 and "dx" in unlabelled


def test_a_plain_csv_without_metadata_columns_warns_by_name(tmp_path, caplog):
    (tmp_path / "m.csv").write_text("lesion_id,image_id,dx,age\nL1,ISIC_1,nv,40\n")
    with caplog.at_level(logging.WARNING, logger="skain.data.schema"):
        out = clean_metadata(read_csv(tmp_path / "m.csv"), "m.csv")
    assert out["sex"].tolist() == ["unknown"]
    assert "m.csv: no sex, localization column(s)" in caplog.text
