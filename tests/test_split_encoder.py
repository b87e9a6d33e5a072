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


def test_encoder_uses_train_statistics_and_maps_missing_and_unseen_to_unknown():
    train = pd.DataFrame({"age": [20.0, 40.0, np.nan, 60.0], "sex": ["male", "female", "unknown", "male"],
                          "localization": ["back", "face", "back", "trunk"]})
    enc = MetadataEncoder.fit(train)
    assert enc.age_median == 40.0 and enc.sex_vocab == ["unknown", "female", "male"]
    val = pd.DataFrame({"age": [np.nan, 90.0], "sex": ["other", "male"], "localization": ["acral", "face"]})
    age, sex, site = enc.transform(val)
    assert age[0] == pytest.approx((40.0 - enc.age_mean) / enc.age_std)
    assert sex.tolist() == [0, 2] and site.tolist() == [0, enc.site_vocab.index("face")]
    # validation values never leak into the fitted state
    assert "acral" not in enc.site_vocab and enc.age_mean == pytest.approx(np.mean([20, 40, 40, 60]))
    assert MetadataEncoder.from_state(enc.state_dict()) == enc
