"""Leakage guards: lesion-grouped split and metadata statistics fit on the training split only."""
import numpy as np
import pandas as pd
import pytest

from skain.data.encoder import MetadataEncoder
from skain.data.schema import clean_metadata, read_csv
from skain.data.split import LeakageError, check_no_overlap, lesion_split


def test_real_metadata_split_never_shares_a_lesion_and_keeps_class_balance(shared_data):
    frame = clean_metadata(read_csv(shared_data / "HAM10000_metadata.csv"), "HAM10000_metadata.csv")
    for fold in range(5):
        tr, va = lesion_split(frame, folds=5, fold=fold, seed=42)
        assert not set(frame.loc[tr, "lesion_id"]) & set(frame.loc[va, "lesion_id"])
        assert len(tr) + len(va) == len(frame)
        share = frame.loc[va, "dx"].value_counts(normalize=True)
        overall = frame["dx"].value_counts(normalize=True)
        assert (share - overall).abs().max() < 0.02  # stratified
    same = lesion_split(frame, 5, 0, 42)[1]
    assert np.array_equal(same, lesion_split(frame, 5, 0, 42)[1])  # seeded
    assert not np.array_equal(same, lesion_split(frame, 5, 0, 7)[1])


def test_overlap_check_fails_loudly():
    a = pd.DataFrame({"lesion_id": ["L1", "L2"], "image_id": ["I1", "I2"]})
    b = pd.DataFrame({"lesion_id": ["L2"], "image_id": ["I3"]})
    with pytest.raises(LeakageError, match="lesion_id 'L2'"):
        check_no_overlap(a, b)


def test_encoder_uses_train_statistics_and_flags_missing_age_and_maps_unseen_to_unknown():
    train = pd.DataFrame({"age": [20.0, 40.0, np.nan, 60.0, 0.0], "sex": ["male", "female", "unknown", "male", "male"],
                          "localization": ["back", "face", "back", "trunk", "back"]})
    enc = MetadataEncoder.fit(train)
    # statistics over the ages actually given: NaN and the age-0 placeholder are missing, not 0 or the median
    assert enc.age_median == 40.0 and enc.age_mean == pytest.approx(40.0) and enc.sex_vocab == ["unknown", "female", "male"]
    val = pd.DataFrame({"age": [np.nan, 90.0, 0.0], "sex": ["other", "male", ""], "localization": ["acral", "face", "back"]})
    age, sex, site = enc.transform(val)
    assert age.shape == (3, 2) and age[:, 1].tolist() == [1.0, 0.0, 1.0]  # the missing flag
    assert age[1, 0] == pytest.approx((90.0 - enc.age_mean) / enc.age_std) and age[0, 0] == age[2, 0] == 0.0
    assert sex.tolist()[:2] == [0, 2] and site.tolist()[:2] == [0, enc.site_vocab.index("face")]
    # validation values never leak into the fitted state
    assert "acral" not in enc.site_vocab
    assert MetadataEncoder.from_state(enc.state_dict()) == enc


def test_blanking_a_field_equals_leaving_it_empty():
    train = pd.DataFrame({"age": [20.0, 40.0, 60.0], "sex": ["male", "female", "male"],
                          "localization": ["back", "face", "trunk"]})
    enc = MetadataEncoder.fit(train)
    given = pd.DataFrame({"age": [55.0], "sex": ["female"], "localization": ["face"]})
    empty = pd.DataFrame({"age": [np.nan], "sex": ["unknown"], "localization": ["unknown"]})
    blanked = enc.blank(*enc.transform(given), {"age", "sex", "site"})
    for a, b in zip(blanked, enc.transform(empty)):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="localization"):  # the CSV's column name is not an input's name
        enc.blank(*enc.transform(given), {"age", "sex", "localization"})


def test_metadata_dropout_blanks_at_the_stated_rate():
    torch = pytest.importorskip("torch")
    from skain.data.encoder import MetadataDropout
    train = pd.DataFrame({"age": [20.0, 40.0, 60.0], "sex": ["male", "female", "male"],
                          "localization": ["back", "face", "trunk"]})
    enc = MetadataEncoder.fit(train)
    age, sex, site = enc.transform(train.iloc[[0]])
    drop, n = MetadataDropout(enc, 0.2), 4000
    torch.manual_seed(0)
    draws = [drop(age[0], sex[0], site[0]) for _ in range(n)]
    age_blank = np.mean([d[0][1] == 1.0 for d in draws])
    all_blank = np.mean([d[0][1] == 1.0 and d[1] == 0 and d[2] == 0 for d in draws])
    assert abs(age_blank - (0.2 + 0.8 * 0.2)) < 0.03 and abs(all_blank - (0.2 + 0.8 * 0.2 ** 3)) < 0.03
    with pytest.raises(ValueError):
        MetadataDropout(enc, 1.0)


def test_holdout_split_has_three_disjoint_lesion_groups():
    from skain.data.split import holdout_split
    lesions = [f"L{i}" for i in range(200)]
    rows = [(les, f"I{les}_{j}", ["nv", "mel", "bkl"][i % 3]) for i, les in enumerate(lesions) for j in range(1 + i % 2)]
    frame = pd.DataFrame(rows, columns=["lesion_id", "image_id", "dx"]).sample(frac=1, random_state=1)
    frame = frame.reset_index(drop=True)
    tr, va, te = holdout_split(frame, 5, 2, 42, 8)
    assert len(set(tr) | set(va) | set(te)) == len(frame) == len(tr) + len(va) + len(te)
    check_no_overlap(frame.iloc[tr], frame.iloc[va], frame.iloc[te])
    assert 0.15 < len(te) / len(frame) < 0.25 and 0.05 < len(va) / len(frame) < 0.15
    tests = [set(holdout_split(frame, 5, k, 42, 8)[2]) for k in range(5)]
    assert set().union(*tests) == set(range(len(frame)))  # every image is tested exactly once over the folds
    assert sum(len(t) for t in tests) == len(frame)
