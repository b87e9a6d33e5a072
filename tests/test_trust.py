"""Trust layer: temperature scaling, ECE, triage thresholds, OOD rejection, model card, Predictor fields."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.special import softmax

from conftest import tiny_config
from skain.inference.predictor import Predictor
from skain.metrics import expected_calibration_error
from skain.modelfile.bundle import load_model
from skain.trust.calibration import (
    LOG_T_BOUNDS,
    calibration_report,
    fit_temperature,
    nll,
)
from skain.trust.ood import (
    MahalanobisScorer,
    MaxScorer,
    scorer_from_state,
    threshold_for_false_rejection,
)
from skain.trust.probes import probe_set, to_png
from skain.trust.triage import (
    INVESTIGATE,
    ROUTINE,
    operating_point,
    p_malignant,
    positives_needed,
    sensitivity_at_specificity,
    threshold_for_sensitivity,
)

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


# ----------------------------------------------------------------------------- calibration
def overconfident(n: int = 3000, scale: float = 3.0, seed: int = 0):
    """Labels drawn from softmax(z); the 'model' reports scale * z, i.e. is overconfident by `scale`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 7))
    labels = np.array([rng.choice(7, p=p) for p in softmax(z, axis=1)])
    return scale * z, labels


def test_temperature_fit_lowers_nll_and_ece_on_overconfident_logits():
    logits, labels = overconfident()
    t = fit_temperature(logits, labels)
    report = calibration_report(logits, labels, t)
    assert report["nll_after"] < report["nll_before"] - 0.1
    assert report["ece_after"] < 0.03 < report["ece_before"]
    assert t == pytest.approx(3.0, rel=0.12)  # recovers the scale the logits were inflated by


def test_temperature_fit_leaves_calibrated_logits_alone():
    logits, labels = overconfident(scale=1.0, seed=1)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(1.0, rel=0.1)
    assert nll(logits, labels, t) <= nll(logits, labels, 1.0) + 1e-9


def test_ece_matches_a_hand_computed_example():
    probs = np.array([[0.90, 0.05, 0.05],   # conf 0.90, correct    } one bin: acc 0.5, conf 0.9
                      [0.90, 0.05, 0.05],   # conf 0.90, wrong      }  -> 2/5 * 0.40 = 0.16
                      [0.65, 0.20, 0.15],   # conf 0.65, correct    -> 1/5 * 0.35 = 0.07
                      [0.45, 0.35, 0.20],   # conf 0.45, wrong      -> 1/5 * 0.45 = 0.09
                      [0.03, 0.95, 0.02]])  # conf 0.95, correct    -> 1/5 * 0.05 = 0.01
    labels = np.array([0, 1, 0, 2, 1])
    assert expected_calibration_error(probs, labels, n_bins=15) == pytest.approx(0.33)


# ----------------------------------------------------------------------------- triage
@pytest.mark.parametrize("target", [0.80, 0.95, 0.99])
def test_triage_threshold_meets_the_requested_sensitivity_on_validation(target):
    rng = np.random.default_rng(3)
    positive = rng.random(1000) < 0.2
    scores = np.clip(rng.normal(np.where(positive, 0.6, 0.3), 0.15), 0, 1)
    thr = threshold_for_sensitivity(scores, positive, target)
    point = operating_point(scores, positive, thr)
    assert point["sensitivity"] >= target
    tighter = np.sort(scores[positive & (scores >= thr)])[0] + 1e-9  # drop one more positive
    assert operating_point(scores, positive, tighter)["sensitivity"] < target
    assert point["specificity"] > 0.3


def test_a_cautious_triage_threshold_flags_enough_positives_for_the_lower_confidence_bound():
    """--triage-confidence C: the fewest k of n positives whose one-sided Clopper-Pearson lower bound at C is >= the
    target, so one fewer would not do. 196 malignant validation lesions (the shipped recipe's held-out split): 187
    for the point estimate of 95%, 190 at 0.8, 191 at 0.9, 192 at 0.95; too few positives: all of them."""
    from scipy.stats import beta
    assert positives_needed(196, 0.95) == 187
    for confidence, k in ((0.8, 190), (0.9, 191), (0.95, 192)):
        assert positives_needed(196, 0.95, confidence) == k
        assert beta.ppf(1 - confidence, k, 196 - k + 1) >= 0.95 > beta.ppf(1 - confidence, k - 1, 196 - k + 2)
    assert positives_needed(10, 0.95, 0.9) == 10
    with pytest.raises(ValueError, match="confidence"):
        positives_needed(196, 0.95, 1.0)
    rng = np.random.default_rng(5)
    positive = rng.random(2000) < 0.2
    scores = np.clip(rng.normal(np.where(positive, 0.6, 0.3), 0.15), 0, 1)
    plain = operating_point(scores, positive, threshold_for_sensitivity(scores, positive, 0.95))
    cautious = operating_point(scores, positive, threshold_for_sensitivity(scores, positive, 0.95, 0.9))
    n = int(positive.sum())
    assert cautious["threshold"] < plain["threshold"] and cautious["specificity"] < plain["specificity"]
    assert round(cautious["sensitivity"] * n) == positives_needed(n, 0.95, 0.9)


def test_triage_threshold_refuses_a_split_without_malignant_lesions():
    with pytest.raises(ValueError, match="no malignant"):
        threshold_for_sensitivity(np.array([0.1, 0.2]), np.array([False, False]))


def test_p_malignant_sums_melanoma_bcc_and_akiec():
    probs = np.array([[0.1, 0.2, 0.05, 0.05, 0.3, 0.25, 0.05]])
    assert p_malignant(probs, CLASSES)[0] == pytest.approx(0.6)


def test_sensitivity_at_specificity_on_a_small_roc():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    positive = np.array([1, 1, 0, 1, 0, 0, 0, 0, 1, 0], dtype=bool)
    assert sensitivity_at_specificity(scores, positive, 5 / 6) == pytest.approx(0.75)  # one false alarm allowed
    assert sensitivity_at_specificity(scores, positive, 1.0) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- OOD scorer
def test_mahalanobis_threshold_keeps_the_stated_false_rejection_rate_on_new_samples():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (4, 16))

    def draw(n):
        labels = rng.integers(0, 4, n)
        return centres[labels] + rng.normal(0, 1, (n, 16)), labels

    scorer = MahalanobisScorer.fit(*draw(2000), normalize=False)
    thr = threshold_for_false_rejection(scorer.score(draw(1000)[0]), 0.05)
    rejected = (scorer.score(draw(4000)[0]) > thr).mean()
    assert 0.03 < rejected < 0.07
    far = rng.normal(0, 1, (200, 16)) + 15.0
    assert (scorer.score(far) > thr).all()
    restored = MahalanobisScorer.from_state(scorer.state_dict())
    assert np.allclose(restored.score(far[:5]), scorer.score(far[:5]), rtol=1e-4)


def test_max_scorer_catches_a_far_direction_and_a_far_magnitude_at_the_stated_rate():
    """The normalised part alone misses inputs that point like lesions but are far too large (what noise does
    to a CNN's features); the raw part catches them; the max of both keeps the stated false-rejection rate."""
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 1, (3, 12)) + 6.0

    def draw(n):
        labels = rng.integers(0, 3, n)
        return centres[labels] + rng.normal(0, 0.5, (n, 12)), labels

    train, labels = draw(3000)
    val = draw(1000)[0]
    scorer = MaxScorer.fit(train, labels, val, 0.05)
    thr = threshold_for_false_rejection(scorer.score(val), 0.05)
    assert 0.03 < (scorer.score(draw(4000)[0]) > thr).mean() < 0.08
    scaled = draw(100)[0] * 4.0  # same direction, 4x the size
    turned = rng.normal(0, 1, (100, 12)) * 6.0  # arbitrary directions
    normalised_only = MahalanobisScorer.fit(train, labels, normalize=True)
    n_thr = threshold_for_false_rejection(normalised_only.score(val), 0.05)
    assert (normalised_only.score(scaled) > n_thr).mean() < 0.5
    assert (scorer.score(scaled) > thr).all() and (scorer.score(turned) > thr).all()
    restored = scorer_from_state(scorer.state_dict())
    assert isinstance(restored, MaxScorer)
    np.testing.assert_allclose(restored.score(scaled[:5]), scorer.score(scaled[:5]), rtol=1e-4)


# ----------------------------------------------------------------------------- training outputs (tiny model)
def test_training_stores_trust_in_a_weights_only_bundle_and_metrics(trained):
    bundle = torch.load(trained / "best_model.pt", weights_only=True)
    trust = bundle["trust"]
    assert np.exp(LOG_T_BOUNDS[0]) - 1e-9 <= trust["temperature"] <= np.exp(LOG_T_BOUNDS[1]) + 1e-9  # the search range
    assert trust["ood"]["threshold"] > 0 and trust["ood"]["method"] == "mahalanobis_max"
    assert [part["normalize"] for part in trust["ood"]["parts"]] == [True, False]
    assert all(part["whitener"].ndim == 2 for part in trust["ood"]["parts"])
    calib = json.loads((trained / "metrics.json").read_text())["trust"]["calibration"]
    assert calib["ece_bins"] == 15
    assert {"ece_before", "ece_after", "nll_before", "nll_after"} <= set(calib)
    assert calib["nll_after"] <= calib["nll_before"] + 1e-9  # T minimises validation NLL
    assert (trained / "reliability.png").stat().st_size > 10_000


def test_model_card_contains_the_real_numbers(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    card = (trained / "model_card.md").read_text()
    v, t = metrics["validation"], metrics["trust"]
    assert f"balanced accuracy {v['balanced_accuracy']:.3f}" in card
    assert f"| mel | {v['per_class']['mel']['recall']:.3f} |" in card
    assert f"ECE (15 bins) {t['calibration']['ece_before']:.3f} -> {t['calibration']['ece_after']:.3f}" in card
    assert f"threshold {t['triage']['threshold']:.4f}" in card
    assert "SYNTHETIC" in card and "light skin" in card and "does not diagnose" in card
    assert "larger of two Mahalanobis distances (L2-normalised and raw features)" in card
    assert f"{100 * t['ood']['val_false_rejection']:.1f}% on validation" in card
    bundle_card = torch.load(trained / "best_model.pt", weights_only=True)["model_card"]
    assert bundle_card["metrics"]["validation"]["balanced_accuracy"] == v["balanced_accuracy"]
    assert Predictor.from_bundle(trained).info["model_card"] == bundle_card


def test_predictions_use_the_temperature_and_carry_triage_and_ood(trained, synth_root):
    pred = Predictor.from_bundle(trained)
    images = sorted((synth_root / "dataset_test" / "image").iterdir())[:4]
    one = pred.predict_one(images[0], 50, "male", "back")
    t = pred.trust.temperature
    with torch.no_grad():
        b = pred._batch(pred.image_tensor(images[0])[None], pd.DataFrame({"age": [50], "sex": ["male"],
                                                                          "localization": ["back"]}))
        logits = load_model(pred.bundle)(b["image"], b["age"], b["sex"], b["site"]).numpy()
    assert one.probability == pytest.approx(float(softmax(logits / t, axis=1).max()), abs=1e-5)
    assert one.triage in (INVESTIGATE, ROUTINE) and one.in_distribution is not None
    assert one.p_malignant == pytest.approx(one.probabilities["mel"] + one.probabilities["bcc"]
                                            + one.probabilities["akiec"], abs=1e-5)
    table = pred.predict_frame(pd.DataFrame({"image_id": [p.stem for p in images], "path": [str(p) for p in images]}),
                               progress=False)
    assert {"ood", "ood_score", "p_malignant", "triage"} <= set(table.columns)
    assert table["ood_score"].iloc[0] == pytest.approx(one.ood_score, rel=1e-3)


def test_bundles_without_trust_still_predict(trained, synth_root):
    bundle = torch.load(trained / "best_model.pt", weights_only=True)
    del bundle["trust"], bundle["model_card"]
    pred = Predictor(bundle)
    image = sorted((synth_root / "dataset_test" / "image").iterdir())[0]
    one = pred.predict_one(image)
    assert one.triage is None and one.in_distribution is None and one.ood_score is None
    assert sum(one.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert pred.info["model_card"] is None


# ----------------------------------------------------------------------------- real dermoscopy (slow)
@pytest.mark.slow
def test_ood_rejects_blank_and_noise_but_accepts_held_out_real_dermoscopy(shared_data, tmp_path):
    """A frozen-backbone Lite0 (ImageNet weights) trained briefly on ~240 real HAM10000 images: the OOD
    check built at the end of training must pass unseen real lesions and reject blank frames and noise."""
    from skain.training.train import fit
    meta = pd.read_csv(shared_data / "metadata.csv")
    lesions = meta["lesion_id"].drop_duplicates().sample(frac=1.0, random_state=0)
    used = meta[meta["lesion_id"].isin(lesions.iloc[:180])]
    unseen = meta[meta["lesion_id"].isin(lesions.iloc[-60:])]
    csv = tmp_path / "subset.csv"
    used.to_csv(csv, index=False)
    cfg = tiny_config(tmp_path, tmp_path / "out", tmp_path / "cache", frozen_epochs=2, epochs=0, lr_frozen=1e-3)
    cfg.data.data, cfg.data.csv, cfg.data.images = None, str(csv), [str(shared_data / "images")]
    cfg.model.backbone, cfg.model.pretrained, cfg.model.input_size = "tf_efficientnet_lite0", "offline", 128
    fit(cfg)
    pred = Predictor.from_bundle(tmp_path / "out")
    probes = probe_set(seed=5)
    for kind in ("blank", "noise"):
        verdicts = [pred.predict_one(b).in_distribution for b in probes[kind]]
        assert verdicts == [False] * len(verdicts), (kind, verdicts)
    table = pred.predict_frame(unseen.assign(path=[str(shared_data / "images" / f"{i}.jpg") for i in unseen["image_id"]]),
                               progress=False)
    assert table["ood"].astype(bool).mean() <= 0.10, table["ood_score"].describe()
    # the same unseen lesions as a phone re-saves them (half size, JPEG q70) stay in distribution as often
    from skain.data.degrade import saved_copy
    copies = tmp_path / "phone"
    copies.mkdir()
    for i in unseen["image_id"]:
        with Image.open(shared_data / "images" / f"{i}.jpg") as img:
            (copies / f"{i}.jpg").write_bytes(saved_copy(img.convert("RGB"), "phone"))
    phone = pred.predict_frame(unseen.assign(path=[str(copies / f"{i}.jpg") for i in unseen["image_id"]]),
                               progress=False)
    assert phone["ood"].astype(bool).mean() <= 0.10, phone["ood_score"].describe()
    # text screenshots and everyday photos (scikit-image's samples) are turned away too
    import skimage.data as sk
    for kind, images in (("text", probes["text"]), ("photos", [sk.chelsea(), sk.coffee(), sk.rocket()])):
        verdicts = [pred.predict_one(b if isinstance(b, bytes) else to_png(b)).in_distribution for b in images]
        assert verdicts == [False] * len(verdicts), (kind, verdicts)


# ----------------------------------------------------------------------------- cross-fitting is held out
def _validation_outputs(n: int = 600, seed: int = 0):
    from skain.trust.crossfit import Outputs
    rng = np.random.default_rng(seed)
    labels = rng.choice(7, n, p=[0.05, 0.07, 0.12, 0.03, 0.12, 0.56, 0.05])
    logits = rng.normal(0, 1, (n, 7)) * 2.0
    logits[np.arange(n), labels] += rng.normal(2.5, 1.5, n)  # right class usually on top, overconfident
    features = rng.normal(0, 1, (n, 8)) + labels[:, None] * 0.5
    return Outputs(logits, labels, features)


def _poisoned(va, rows: np.ndarray, rng):
    """The same validation outputs with the labels and features of `rows` replaced by garbage."""
    from skain.trust.crossfit import Outputs
    labels, features = va.labels.copy(), va.features.copy()
    labels[rows] = rng.permutation(labels[rows])[::-1] % 7   # other diagnoses, other malignant share
    labels[rows[: len(rows) // 3]] = 4                       # and many more melanomas
    features[rows[1:]] *= 40.0                               # far out (row 0 of the half kept as it was)
    return Outputs(va.logits.copy(), labels, features)


def test_cross_fit_never_sees_the_labels_or_features_of_the_half_it_scores():
    """Poison half A's labels and features: every held-out decision about half A (its temperature-scaled
    probabilities, triage flags, and the OOD verdict of the one row of A left intact) comes from half B alone,
    so it must stay bit for bit the same. Before the fix A's triage threshold was chosen on softmax(z_B / T_A),
    with a temperature fit on A's own labels, and the OOD scales used all of validation."""
    from skain.trust.crossfit import TrustSettings, cross_fit, halves
    from skain.trust.triage import malignant_columns
    va = _validation_outputs()
    frame = pd.DataFrame({"lesion_id": [f"L{i}" for i in range(len(va.labels))],
                          "dx": np.array(CLASSES)[va.labels]})
    a, b = halves(frame, seed=0)
    s = TrustSettings(false_rejection=0.05)
    scorer = MaxScorer.fit(va.features + 0.1, va.labels, va.features, s.false_rejection)  # stand-in "training" fit
    cols = malignant_columns(CLASSES)
    clean = cross_fit(va, [a, b], cols, scorer, s)
    dirty = cross_fit(_poisoned(va, a, np.random.default_rng(1)), [a, b], cols, scorer, s)
    np.testing.assert_array_equal(clean.probs[a], dirty.probs[a])
    np.testing.assert_array_equal(clean.flagged[a], dirty.flagged[a])
    assert clean.ood_ratio[a[0]] == dirty.ood_ratio[a[0]]  # junk beside it changes neither scales nor threshold
    # the poison does reach half B, whose parameters now come from the poisoned half
    assert not np.array_equal(clean.probs[b], dirty.probs[b])
    assert not np.array_equal(clean.ood_ratio[b], dirty.ood_ratio[b])


def test_cross_fit_scores_each_half_with_the_other_halfs_temperature_on_both_sides():
    """The threshold applied to half A is chosen on softmax(z_B / T_B) and applied to softmax(z_A / T_B)."""
    from skain.trust.crossfit import TrustSettings, cross_fit, halves
    from skain.trust.triage import malignant_columns
    va = _validation_outputs(seed=3)
    frame = pd.DataFrame({"lesion_id": [f"L{i}" for i in range(len(va.labels))],
                          "dx": np.array(CLASSES)[va.labels]})
    a, b = halves(frame, seed=0)
    cols = malignant_columns(CLASSES)
    held = cross_fit(va, [a, b], cols, None, TrustSettings())
    t_b = fit_temperature(va.logits[b], va.labels[b])
    probs_b = softmax(va.logits[b] / t_b, axis=1)
    thr_b = threshold_for_sensitivity(probs_b[:, cols].sum(1), np.isin(va.labels[b], cols), 0.95)
    probs_a = softmax(va.logits[a] / t_b, axis=1)
    np.testing.assert_allclose(held.probs[a], probs_a)
    np.testing.assert_array_equal(held.flagged[a], probs_a[:, cols].sum(1) >= thr_b)
    assert held.ood_ratio is None


def test_tta_predictions_say_triage_and_temperature_do_not_apply(trained, synth_root):
    """The temperature and triage threshold were fit on single-view logits: with --tta the probabilities are
    the plain average of the views' softmax, there is no triage verdict, and the trust summary says why.
    The OOD check still applies (identity view)."""
    from skain.data.transforms import tta_views
    images = sorted((synth_root / "dataset_test" / "image").iterdir())[:3]
    frame = pd.DataFrame({"image_id": [p.stem for p in images], "path": [str(p) for p in images]})
    single, tta = Predictor.from_bundle(trained), Predictor.from_bundle(trained, tta=4)
    assert single.trust.temperature != 1.0 and single.trust.triage_threshold is not None
    table = tta.predict_frame(frame, progress=False)
    assert table["triage"].isna().all() and tta.predict_one(images[0]).triage is None
    assert "not applied with test-time augmentation" in tta.info["trust"]["triage"]["reason"]
    assert "not applied" in tta.info["trust"]["calibration"]
    with torch.no_grad():
        b = tta._batch(tta.image_tensor(images[0])[None], pd.DataFrame({"age": [None], "sex": ["unknown"],
                                                                         "localization": ["unknown"]}))
        model = load_model(tta.bundle).eval()
        views = [model(v, b["age"], b["sex"], b["site"]).softmax(1) for v in tta_views(b["image"], 4)]
    expected = torch.stack(views).mean(0)[0].numpy()
    got = np.array([table.loc[0, f"p_{c}"] for c in tta.classes])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    plain = single.predict_frame(frame, progress=False)
    np.testing.assert_allclose(table["ood_score"], plain["ood_score"], rtol=1e-4)


def test_calibrate_tta_fits_temperature_and_triage_that_predict_tta_applies(trained, synth_root, tmp_path):
    """`skain calibrate --tta 4` fits a temperature and a blank-aware triage threshold on 4-view validation
    predictions (cross-fitted held-out figures too); `--tta 4` predictions then use them (probabilities =
    softmax(log mean / T), a triage verdict per image), while a view count never fitted still says why not."""
    import shutil

    from skain.cli import main
    from skain.data.transforms import tta_views
    from skain.modelfile.load import read_bundle
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["calibrate", "--model", str(run), "--tta", "4", "--device", "cpu"]) == 0
    block = read_bundle(run)["trust"]["views"]["4"]
    triage = block["triage"]
    assert block["held_out_method"].startswith("cross-fitted") and {"held_out", "held_out_all_blank"} <= set(triage)
    assert triage["sensitivity"] >= 0.95 and triage["all_blank"]["sensitivity"] >= 0.95  # present and blank
    assert triage["threshold_holds_for"] == "metadata as entered and all fields blank"
    tta = Predictor.from_bundle(run, tta=4)
    assert tta.trust.temperature == pytest.approx(block["temperature"]) != 1.0
    assert tta.trust.triage_threshold == pytest.approx(triage["threshold"])
    assert "fit for 4 TTA views" in tta.info["trust"]["calibration"]
    images = sorted((synth_root / "dataset_test" / "image").iterdir())[:3]
    frame = pd.DataFrame({"image_id": [p.stem for p in images], "path": [str(p) for p in images]})
    table = tta.predict_frame(frame, progress=False)
    assert table["triage"].notna().all()
    with torch.no_grad():
        b = tta._batch(tta.image_tensor(images[0])[None], pd.DataFrame({"age": [None], "sex": ["unknown"],
                                                                         "localization": ["unknown"]}))
        model = load_model(tta.bundle).eval()
        mean = torch.stack([model(v, b["age"], b["sex"], b["site"]).softmax(1) for v in tta_views(b["image"], 4)]).mean(0)
    expected = softmax(np.log(mean[0].numpy().astype(np.float64)) / block["temperature"])
    np.testing.assert_allclose([table.loc[0, f"p_{c}"] for c in tta.classes], expected, atol=1e-5)
    untouched = Predictor.from_bundle(run, tta=2)
    assert untouched.trust.triage_threshold is None
    assert "skain calibrate --model RUN --tta 2" in untouched.info["trust"]["calibration"]
    rep = tmp_path / "rep"  # skain evaluate --tta 4 shows the 4-view held-out figures as the validation column
    assert main(["evaluate", "--model", str(run), "--data", str(synth_root / "dataset_test"), "--tta", "4",
                 "--report", str(rep), "--no-progress"]) == 0
    validation = json.loads((rep / "metrics.json").read_text())["trust"]["runs"][
        "validation of the training data (held-out lesions)"]
    assert validation["triage_sensitivity"] == pytest.approx(triage["held_out"]["sensitivity"])
    assert validation["ece_after"] == pytest.approx(block["calibration"]["held_out"]["ece_after"])
    assert "fit for that many views" in (rep / "model_card.md").read_text()
    card = (run / "model_card.md").read_text()
    assert "4 views: T = " in card and "Any other view count gets neither" in card


# ----------------------------------------------------------------------------- time budget and progress


def test_calibrate_with_triage_confidence_chooses_a_lower_threshold_and_says_so(trained, tmp_path, capsys):
    """`skain calibrate --triage-confidence 0.9` flags at least as many validation lesions as the default, stores
    the confidence with the threshold and names it on the model card; a confidence out of range is refused
    before anything is written."""
    import shutil

    from skain.cli import main
    from skain.modelfile.load import read_bundle
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = read_bundle(run)["trust"]["triage"]
    assert "confidence" not in before
    untouched = (run / "best_model.pt").read_bytes()
    assert main(["calibrate", "--model", str(run), "--tta", "2", "--triage-confidence", "1.5", "--device", "cpu"]) == 2
    assert "triage confidence must be in [0.5, 1)" in capsys.readouterr().err
    assert (run / "best_model.pt").read_bytes() == untouched
    assert main(["calibrate", "--model", str(run), "--triage-confidence", "0.9", "--device", "cpu"]) == 0
    after = read_bundle(run)["trust"]["triage"]
    assert after["confidence"] == 0.9 and after["threshold"] <= before["threshold"]
    assert after["sensitivity"] >= before["sensitivity"] and after["positives"] == before["positives"]
    card = (run / "model_card.md").read_text()
    assert "Clopper-Pearson lower bound at confidence 0.9" in card


def test_budget_sample_keeps_every_class_and_fits_the_budget():
    from skain.training.trust_fit import MIN_OOD_TRAIN, budget_sample
    rng = np.random.default_rng(0)
    dx = rng.choice(CLASSES, 6000, p=[0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    idx = np.arange(6000)
    assert budget_sample(idx, dx, 50.0, None) is idx and budget_sample(idx, dx, 50.0, 1e6) is idx
    small = budget_sample(idx, dx, 50.0, 40.0)  # 40 s at 50 images/s: 1,800 images fit (0.9 margin)
    assert MIN_OOD_TRAIN <= len(small) <= 2000 and len(np.unique(small)) == len(small)
    assert set(dx[small]) == set(CLASSES) and min(np.bincount(np.unique(dx[small], return_inverse=True)[1])) >= 20
    assert len(budget_sample(idx, dx, 50.0, -100.0)) >= MIN_OOD_TRAIN  # budget spent: still a usable fit


def test_trust_fitting_logs_its_timing_and_respects_a_spent_budget(trained, tmp_path, caplog, monkeypatch):
    import logging

    from skain.data.images import ImageLoader
    from skain.training import trust_fit as fitting
    frame, train_idx, val_idx, cfg = fitting.folder_split(trained)
    monkeypatch.setattr(fitting, "MIN_OOD_TRAIN", 60)
    with caplog.at_level(logging.INFO, logger="skain.training.trust_fit"):
        figures = fitting.fit_trust(trained / "best_model.pt", frame, train_idx, val_idx,
                                    ImageLoader(cfg["preprocess"]["resize"]), out_dir=tmp_path,
                                    save_to=tmp_path / "b.pt", budget_s=0.0)
    assert figures["validation_images"] == len(val_idx) and 60 <= figures["train_images"] < len(train_idx)
    text = caplog.text
    assert "images/s" in text and "training features of" in text and "time budget" in text
    assert figures["fit_seconds"] > 0 and figures["calibration"]["held_out"]


def test_triage_threshold_keeps_its_sensitivity_when_every_field_is_left_blank():
    """Validation logits with metadata and (less confident about malignancy) with every field blank: the
    threshold must reach the target on both, in-sample, and the cross-fit reports the blank figures held out."""
    from skain.trust.crossfit import TrustSettings, cross_fit, halves, triage_part
    from skain.trust.triage import malignant_columns
    va = _validation_outputs()
    cols = malignant_columns(CLASSES)
    blank = va.logits.copy()
    blank[:, cols] -= 1.5  # without age/site the model sees less malignancy
    va.blank_logits = blank
    s = TrustSettings()
    frame = pd.DataFrame({"lesion_id": [f"L{i}" for i in range(len(va.labels))], "dx": np.array(CLASSES)[va.labels]})
    held = cross_fit(va, halves(frame, seed=0), cols, None, s)
    probs, blank_probs = (np.exp(z) / np.exp(z).sum(1, keepdims=True) for z in (va.logits, blank))
    with_blank = triage_part(probs, va.labels, CLASSES, held, s, blank_probs)
    present_only = triage_part(probs, va.labels, CLASSES, None, s)
    assert with_blank["all_blank"]["sensitivity"] >= s.target_sensitivity
    assert with_blank["sensitivity"] >= s.target_sensitivity
    assert with_blank["threshold"] < present_only["threshold"]
    assert {"sensitivity", "specificity"} <= set(with_blank["held_out_all_blank"])


@pytest.mark.parametrize("views", [1, 4])
def test_calibrate_refuses_a_run_without_validation_images_and_leaves_it_as_it_was(trained, tmp_path, views):
    """A split whose validation part is gone (edited split.csv, or images removed since) gets a clear error
    before any inference, not a shape mismatch inside the model; the bundle is left untouched."""
    import shutil

    from skain.data.schema import DataError
    from skain.training.trust_fit import fit_trust_folder, fit_views_folder
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    split = pd.read_csv(run / "split.csv", dtype=str)
    split.loc[split["split"] == "val", "split"] = "train"
    split.to_csv(run / "split.csv", index=False)
    before = (run / "best_model.pt").read_bytes()
    with pytest.raises(DataError, match="at least 10 labelled validation images; the run's split has 0"):
        fit_trust_folder(run) if views == 1 else fit_views_folder(run, views)
    assert (run / "best_model.pt").read_bytes() == before


# ----------------------------------------------------------------------------- re-saved copies stay in distribution
def test_resaved_loader_gives_one_copy_per_file_whatever_the_order_and_leaves_the_rng_alone():
    from skain.data.degrade import ResavedLoader
    rng = np.random.default_rng(0)
    arrays = {f"/data/ISIC_{i}.jpg": rng.integers(0, 255, (40, 52, 3), dtype=np.uint8) for i in range(6)}
    loader = ResavedLoader(arrays.__getitem__, seed=3)
    torch.manual_seed(11)
    before = torch.rand(3)
    torch.manual_seed(11)
    forward = {p: loader(p) for p in arrays}
    assert torch.equal(torch.rand(3), before)  # the caller's random stream is untouched
    backward = {p: loader(p) for p in reversed(list(arrays))}
    for p in arrays:
        np.testing.assert_array_equal(forward[p], backward[p])
        assert forward[p].shape == arrays[p].shape and not np.array_equal(forward[p], arrays[p])
    other = ResavedLoader(arrays.__getitem__, seed=4)
    assert any(not np.array_equal(other(p), forward[p]) for p in arrays)


def test_resaved_copies_join_the_fit_and_are_reported_held_out():
    """Copies shifted off the originals' cloud: without them in the fit most copies are rejected; fit with them,
    the copies pass at about the stated rate while far-away junk is still rejected."""
    from skain.trust.crossfit import (
        Outputs,
        TrustSettings,
        cross_fit,
        halves,
        ood_part,
        ood_scorer,
    )
    rng = np.random.default_rng(2)
    tr, va = _validation_outputs(1200, seed=5), _validation_outputs(600, seed=6)
    shift = np.r_[4.0, -3.5, np.zeros(6)]
    tr_copies = Outputs(tr.logits, tr.labels, tr.features, resaved=tr.features + shift + rng.normal(0, .3, (1200, 8)))
    va_copies = Outputs(va.logits, va.labels, va.features, resaved=va.features + shift + rng.normal(0, .3, (600, 8)))
    s = TrustSettings(false_rejection=0.02)
    frame = pd.DataFrame({"lesion_id": [f"L{i}" for i in range(600)], "dx": np.array(CLASSES)[va.labels]})
    parts = halves(frame, seed=0)
    junk = {"far": rng.normal(0, 1, (20, 8)) * 25.0}

    plain = ood_scorer(tr, va, s)
    thr = threshold_for_false_rejection(plain.score(va.features), s.false_rejection)
    assert (plain.score(va_copies.resaved) > thr).mean() > 0.5  # the problem: copies turned away

    scorer = ood_scorer(tr_copies, va_copies, s)
    held = cross_fit(va_copies, parts, None, scorer, s)
    out = ood_part(scorer, tr_copies, va_copies, junk, held, s)
    assert out["fit_on_resaved_copies"] is True
    assert out["val_false_rejection"] <= 0.05 and out["val_false_rejection_resaved"] <= 0.05
    assert out["held_out_false_rejection_resaved"] <= 0.08 and out["held_out_false_rejection"] <= 0.08
    assert out["probe_detection"]["far"] == 1.0
    assert len(held.ood_ratio_resaved) == 600


# ----------------------------------------------------------------------------- flat frames
def test_a_flat_frame_of_any_colour_has_no_pixel_spread_and_scores_above_the_floor():
    from skain.trust.ood import MAX_FLAT_RATIO, flat_ratio, pixel_spread, spread_floor
    colours = torch.tensor([[0.9, -0.5, 0.2], [-1.0, -1.0, -1.0], [0.3, 0.3, -0.8]])
    flat = colours[:, :, None, None].expand(3, 3, 40, 40)   # three blank frames, each channel its own value
    textured = torch.randn(4, 3, 40, 40, generator=torch.Generator().manual_seed(0)) * 0.3
    spreads = pixel_spread(torch.cat([flat, textured])).numpy()
    assert np.allclose(spreads[:3], 0.0) and (spreads[3:] > 0.25).all()
    floor = spread_floor(np.linspace(0.05, 0.40, 2001))     # training spreads: 0.1% quantile 0.05035
    assert floor == pytest.approx(0.5 * np.quantile(np.linspace(0.05, 0.40, 2001), 0.001))
    ratio = flat_ratio(spreads, floor)
    assert (ratio[:3] == MAX_FLAT_RATIO).all() and (ratio[3:] < 1.0).all()
    assert flat_ratio(np.array([floor * 0.99, floor * 1.01]), floor).tolist() == pytest.approx([1 / 0.99, 1 / 1.01])
    with pytest.raises(ValueError, match="no training images"):
        spread_floor(np.zeros(0))


def test_the_trust_layer_turns_a_flat_frame_away_that_the_feature_check_lets_through():
    from skain.trust.ood import MahalanobisScorer
    from skain.trust.runtime import TrustLayer
    tr = _validation_outputs(800, seed=3)
    scorer = MahalanobisScorer.fit(tr.features, tr.labels, normalize=False)
    threshold = threshold_for_false_rejection(scorer.score(tr.features), 0.02)
    layer = TrustLayer(CLASSES, ood=scorer, ood_threshold=threshold, min_spread=0.04)
    typical = tr.features[:3]                               # features well inside the training cloud
    assert (layer.ood_scores(typical) < 1.0).all()
    scores = layer.ood_scores(typical, np.array([0.0, 0.039, 0.2]))
    assert scores[0] > 1.0 and scores[1] > 1.0 and scores[2] < 1.0
    probs = np.full((3, 7), 1 / 7)
    assert layer.annotate(probs, typical, np.array([0.0, 0.039, 0.2]))["ood"].tolist() == [True, True, False]
    older = TrustLayer(CLASSES, ood=scorer, ood_threshold=threshold)  # a bundle fit before the floor existed
    assert (older.ood_scores(typical, np.zeros(3)) < 1.0).all()


def test_trust_fitting_stores_a_floor_below_every_training_image_and_reports_it(trained, synth_root):
    from skain.modelfile.load import read_bundle
    ood = read_bundle(trained)["trust"]["ood"]
    assert ood["fit_on_resaved_copies"] is True and 0.0 < ood["min_pixel_spread"]
    assert ood["probe_detection"]["blank"] == 1.0
    pred = Predictor.from_bundle(trained)
    assert pred.trust.min_spread == ood["min_pixel_spread"]
    blank = [pred.predict_one(b) for b in probe_set(seed=9)["blank"]]
    assert all(p.in_distribution is False and p.ood_score > 1.0 for p in blank)
