"""--consistency training: paired views that differ only by the re-save, the Jensen-Shannon term, its effect on a
network's agreement, and the flag end to end."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from torch import nn

from conftest import tiny_config
from skain.data.degrade import PhotoDegrade
from skain.data.transforms import DermoscopyAugment, PairedAugment, resolve_preprocess, train_transform
from skain.engine import batch_loss, js_divergence
from skain.training.train import fit

PRE = resolve_preprocess({}, 64)  # input 64, resize 73


@pytest.fixture
def arr():
    """A smooth lesion-like image (a dark blob on skin tones), so a re-save changes it only a little."""
    yy, xx = np.mgrid[0:73, 0:97]
    blob = np.exp(-(((yy - 36) / 20.0) ** 2 + ((xx - 48) / 26.0) ** 2))
    img = np.stack([200 - 120 * blob, 150 - 100 * blob, 130 - 90 * blob], axis=-1)
    return np.clip(img + np.random.default_rng(0).normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def test_without_a_resave_the_two_views_are_identical(arr):
    """The pair shares crop, orientation and colour: with a re-save that does nothing, the views are equal, and the
    first view is exactly what the unpaired augmentation draws from the same seed."""
    paired = PairedAugment(PRE, resave=PhotoDegrade(p=0.0))
    for seed in range(5):
        torch.manual_seed(seed)
        first, second = paired(arr)
        torch.testing.assert_close(first, second, atol=0, rtol=0)
        torch.manual_seed(seed)
        torch.testing.assert_close(DermoscopyAugment(PRE)(arr), first, atol=0, rtol=0)


def test_the_resaved_view_differs_only_by_the_resave(arr):
    """With the default re-save (always re-encoded) the second view differs from the first, but far less than two
    independent augmentations of the same image do: same crop, orientation and colour."""
    paired, plain = PairedAugment(PRE), DermoscopyAugment(PRE)
    torch.manual_seed(0)
    pair_gaps, independent_gaps, changed = [], [], 0
    for _ in range(20):
        first, second = paired(arr)
        changed += not torch.equal(first, second)
        pair_gaps.append((first - second).abs().mean().item())
        independent_gaps.append((plain(arr) - plain(arr)).abs().mean().item())
    assert changed == 20
    assert np.median(pair_gaps) < 0.25 * np.median(independent_gaps)


def test_paired_draws_repeat_with_the_seed(arr):
    paired = train_transform(PRE, paired=True)
    torch.manual_seed(7)
    a = paired(arr)
    torch.manual_seed(7)
    b = paired(arr)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert isinstance(train_transform(PRE), DermoscopyAugment) and not isinstance(train_transform(PRE), PairedAugment)


def test_js_divergence_matches_scipy_and_its_bounds():
    torch.manual_seed(0)
    a, b = torch.randn(6, 7) * 2, torch.randn(6, 7) * 2
    expected = np.mean([jensenshannon(p, q) ** 2 for p, q in zip(a.softmax(1).numpy(), b.softmax(1).numpy())])
    assert js_divergence(a, b).item() == pytest.approx(expected, rel=1e-4)
    assert js_divergence(b, a).item() == pytest.approx(js_divergence(a, b).item(), rel=1e-6)
    assert js_divergence(a, a).item() == pytest.approx(0.0, abs=1e-7)
    far = torch.tensor([[50.0, 0, 0], [0, 50.0, 0]])  # near one-hot on different classes -> ln 2
    assert js_divergence(far, far.flip(0)).item() == pytest.approx(math.log(2), rel=1e-3)


class TinyNet(nn.Module):
    """image + (age, sex, site) -> 7 logits, like SkainNet's call."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 7))

    def forward(self, image, age, sex, site):
        return self.net(image)


def batch(resaved_noise: float | None, n: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 3, 8, 8, generator=g)
    out = {"image": image, "age": torch.zeros(n), "sex": torch.zeros(n, dtype=torch.long),
           "site": torch.zeros(n, dtype=torch.long), "label": torch.randint(0, 7, (n,), generator=g)}
    if resaved_noise is not None:
        out["resaved"] = image + resaved_noise * torch.randn(n, 3, 8, 8, generator=g)
    return out


def test_batch_loss_is_the_criterion_when_the_views_agree():
    torch.manual_seed(0)
    model, criterion, cpu = TinyNet(), nn.CrossEntropyLoss(), torch.device("cpu")
    plain = batch(None)
    same = {**plain, "resaved": plain["image"].clone()}
    loss, js = batch_loss(model, plain, criterion, cpu, None, consistency=10.0)
    assert js.item() == 0.0 and loss.item() == pytest.approx(criterion(model(plain["image"], *[None] * 3),
                                                                       plain["label"]).item())
    loss2, js2 = batch_loss(model, same, criterion, cpu, None, consistency=10.0)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-5) and js2.item() == pytest.approx(0.0, abs=1e-6)
    differ = {**plain, "resaved": plain["image"] + torch.randn_like(plain["image"])}
    loss3, js3 = batch_loss(model, differ, criterion, cpu, None, consistency=10.0)
    loss0, _ = batch_loss(model, differ, criterion, cpu, None, consistency=0.0)
    assert js3.item() > 0 and loss3.item() == pytest.approx(loss0.item() + 10.0 * js3.item(), rel=1e-5)


def agreement_after_training(consistency: float) -> float:
    """Train TinyNet on noisy pairs; return the JS divergence between its answers on fresh pairs."""
    torch.manual_seed(0)
    model, criterion, cpu = TinyNet(), nn.CrossEntropyLoss(), torch.device("cpu")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        loss, _ = batch_loss(model, batch(0.8, seed=step), criterion, cpu, None, consistency)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        fresh = batch(0.8, n=256, seed=10_000)
        return js_divergence(model(fresh["image"], *[None] * 3), model(fresh["resaved"], *[None] * 3)).item()


def test_the_consistency_term_makes_a_network_agree_with_itself_on_resaved_inputs():
    """Same data, same steps: with the term the two views' answers disagree several times less on unseen pairs."""
    assert agreement_after_training(20.0) < 0.3 * agreement_after_training(0.0)


def test_training_with_consistency_runs_end_to_end_and_records_it(synth_root, tmp_path):
    cfg = tiny_config(synth_root / "dataset_train", tmp_path / "cons", epochs=2, consistency=5.0, fit_trust=False,
                      test_tta=1)
    summary = fit(cfg)
    history = pd.read_csv(tmp_path / "cons" / "train_history.csv")
    assert "train_consistency_js" in history and (history["train_consistency_js"] > 0).all()
    assert summary["validation"]["balanced_accuracy"] > 0
    bundle = torch.load(tmp_path / "cons" / "best_model.pt", map_location="cpu", weights_only=True)
    assert bundle["training"]["config"]["train"]["consistency"] == 5.0


def test_a_negative_consistency_weight_is_refused_before_anything_is_written(synth_root, tmp_path):
    cfg = tiny_config(synth_root / "dataset_train", tmp_path / "neg", consistency=-1.0)
    with pytest.raises(ValueError, match="consistency"):
        fit(cfg)
    assert not (tmp_path / "neg").exists()


def test_the_cli_passes_the_flag(tmp_path):
    from skain.cli import build_parser, config_from_args
    ns = build_parser().parse_args(["train", "--data", str(tmp_path), "--consistency", "10", "--preset", "cpu"])
    assert config_from_args(ns).train.consistency == 10.0
    ns = build_parser().parse_args(["train", "--data", str(tmp_path), "--preset", "cpu"])
    assert config_from_args(ns).train.consistency == 0.0



def test_the_model_card_says_how_the_network_was_taught_to_ignore_resaves():
    from skain.trust.modelcard import resave_line, resave_training
    training = {"config": {"train": {"photo_augment": 0.0, "consistency": 10.0, "seed": 1}}}
    assert resave_training(training) == {"photo_augment": 0.0, "consistency": 10.0}
    line = resave_line(resave_training(training))[0]
    assert "0.0% of training images" in line and "consistency weight 10" in line
    assert "consistency" not in resave_line(resave_training({"config": {"train": {"photo_augment": 0.5}}}))[0]
    assert resave_line(resave_training({})) == []  # bundles that did not record it say nothing
