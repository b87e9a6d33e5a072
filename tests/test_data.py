"""Layout discovery and validation: every bad input stops before training with a message naming the problem."""
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from skain.data.layout import discover, load_table
from skain.data.schema import DataError, clean_metadata, read_csv

HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization\n"


def make_images(folder: Path, ids, ext=".jpg") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (32, 24), (120, 80, 60)).save(folder / f"{i}{ext}")


def seed_layout(root: Path, rows: str, ids=("ISIC_1", "ISIC_2", "ISIC_3")) -> Path:
    make_images(root / "image", ids)
    (root / "text").mkdir(parents=True)
    (root / "text" / "meta.csv").write_text(HEADER + rows, encoding="utf-8")
    return root


GOOD = "L1,ISIC_1,mel,histo,45,male,back\nL1,ISIC_2,mel,histo,45,male,back\nL2,ISIC_3,nv,follow_up,,female,\n"


def test_seed_layout_uses_the_largest_csv_and_cleans_metadata(tmp_path):
    root = seed_layout(tmp_path / "dataset_train", GOOD)
    (root / "text" / "small.csv").write_text("x\n1\n")
    src = discover(root)
    assert src.layout == "seed" and src.csv.name == "meta.csv"
    frame = load_table(src)
    assert list(frame["image_id"]) == ["ISIC_1", "ISIC_2", "ISIC_3"]
    assert frame.loc[2, "localization"] == "unknown" and pd.isna(frame.loc[2, "age"])
    assert "dx_type" not in frame.columns  # how the label was confirmed leaks the label


def test_official_layout_with_two_image_parts_and_mixed_case_extensions(tmp_path):
    root = tmp_path / "HAM10000"
    make_images(root / "HAM10000_images_part_1", ["ISIC_1"], ".JPG")
    make_images(root / "HAM10000_images_part_2", ["ISIC_2", "ISIC_3"], ".png")
    (root / "HAM10000_metadata.csv").write_text(HEADER + GOOD)
    src = discover(root)
    assert src.layout == "official" and len(src.image_dirs) == 2
    frame = load_table(src)
    assert frame["path"].str.endswith((".JPG", ".png")).all()


def test_official_csv_with_renamed_image_folders_finds_them(tmp_path):
    """HAM10000_metadata.csv beside images/ and images_part_2/ (folders renamed after unzipping) trains as is;
    a missing image's error names the folders that were searched."""
    root = tmp_path / "ham"
    make_images(root / "images", ["ISIC_1"])
    make_images(root / "images_part_2", ["ISIC_2"])
    (root / "notes").mkdir()
    (root / "HAM10000_metadata.csv").write_text(HEADER + GOOD)
    src = discover(root)
    assert src.layout == "official" and [p.name for p in src.image_dirs] == ["images", "images_part_2"]
    with pytest.raises(DataError, match=r"1 of 3 image\(s\) not found in the image folder\(s\) .*images, "
                                        r".*images_part_2 \(first: ISIC_3\)"):
        load_table(src)
    assert len(load_table(src, skip_missing=True)) == 2


def test_explicit_csv_and_several_image_folders(tmp_path):
    make_images(tmp_path / "a", ["ISIC_1"])
    make_images(tmp_path / "b", ["ISIC_2", "ISIC_3"])
    (tmp_path / "m.csv").write_text(HEADER + GOOD)
    frame = load_table(discover(csv=tmp_path / "m.csv", images=[tmp_path / "a", tmp_path / "b"]))
    assert len(frame) == 3


def test_default_folder_missing_says_how_to_get_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="dataset_train.*skain synth"):
        discover()


def test_no_csv_found(tmp_path):
    make_images(tmp_path / "d" / "image", ["ISIC_1"])
    (tmp_path / "d" / "text").mkdir()
    with pytest.raises(DataError, match="no CSV file found"):
        discover(tmp_path / "d")


@pytest.mark.parametrize("rows, message", [
    ("L1,ISIC_1,melanoma,histo,45,male,back\n", r"unknown dx label\(s\) 'melanoma'.*row 2"),
    ("L1,ISIC_1,mel,histo,45,male,back\nL2,ISIC_1,nv,histo,40,male,back\n", "duplicate image_id 'ISIC_1' on rows 2, 3"),
    ("L1,../ISIC_1,mel,histo,45,male,back\n", "must be a file name, not a path"),
    ("L1,ISIC_1,mel,histo,forty,male,back\n", "age must be a number.*'forty'"),
    ("L1,ISIC_1,mel,histo,-3,male,back\n", "between 0 and 120"),
    ("L1,ISIC_1,mel,histo,130,male,back\n", "between 0 and 120"),
])
def test_bad_rows_are_named(tmp_path, rows, message):
    root = seed_layout(tmp_path / "d", rows)
    with pytest.raises(DataError, match=message):
        load_table(discover(root))


def test_missing_columns_are_listed(tmp_path):
    (tmp_path / "m.csv").write_text("image_id,diagnosis\nISIC_1,mel\n")
    with pytest.raises(DataError, match="missing required column.*lesion_id, dx"):
        clean_metadata(read_csv(tmp_path / "m.csv"), "m.csv")


def test_empty_and_header_only_csv(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text(HEADER)
    with pytest.raises(DataError, match="empty"):
        read_csv(tmp_path / "empty.csv")
    with pytest.raises(DataError, match="no rows"):
        read_csv(tmp_path / "header.csv")


def test_bom_and_latin1_csvs_read(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeff".encode() + (HEADER + GOOD).encode())
    (tmp_path / "latin.csv").write_bytes((HEADER + "L1,ISIC_1,mel,histo,45,male,épaule\n").encode("latin-1"))
    assert "lesion_id" in read_csv(tmp_path / "bom.csv").columns
    assert read_csv(tmp_path / "latin.csv")["localization"][0] == "épaule"


def test_missing_images_stop_or_are_skipped(tmp_path):
    root = seed_layout(tmp_path / "d", GOOD + "L3,ISIC_404,bcc,histo,70,male,face\n")
    with pytest.raises(DataError, match="1 of 4 image.*not found.*ISIC_404.*--skip-missing"):
        load_table(discover(root))
    assert len(load_table(discover(root), skip_missing=True)) == 3


def test_real_official_csv_names_missing_images(shared_data, tmp_path):
    """The full official CSV lists 10,015 images, half of which are not in the sample."""
    src = discover(csv=shared_data / "HAM10000_metadata.csv", images=[shared_data / "images"])
    with pytest.raises(DataError, match=r"5008 of 10015 image\(s\) not found"):
        load_table(src)
    assert len(load_table(src, skip_missing=True)) == 5007


def test_unreadable_image_stops_training_before_work(synth_root, tmp_path):
    from conftest import tiny_config
    from skain.training.train import fit
    data = tmp_path / "d"
    shutil.copytree(synth_root / "dataset_train", data)
    bad = sorted((data / "image").iterdir())[5]
    bad.write_text("this is not a jpeg")
    with pytest.raises(DataError, match=f"(?s)1 unreadable image.*{bad.name}: not an image"):
        fit(tiny_config(data, tmp_path / "out"))
    assert not (tmp_path / "out" / "best_model.pt").exists()
