"""Tests of models.py: shapes, the released key layouts (tests/data/*.txt), checkpoints, helpers."""
import ast
import logging
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from helpers import ssl4eo_file
from models import (
    BandCountError,
    DualEncoder,
    DualResNet,
    SharedNet,
    SmallAlexNet,
    count_trainable,
    freeze_all_but,
    load_backbone_weights,
    load_checkpoint,
    param_groups,
    save_checkpoint,
    set_frozen_bn_eval,
)
from util import checkpoint

DATA = Path(__file__).parent / "data"


def read_listing(name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """A checkpoint listing: lines `key<TAB>shape<TAB>dtype`, `#` lines are comments."""
    listing = {}
    for line in (DATA / name).read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            listing[key] = (ast.literal_eval(shape), getattr(torch, dtype))
    return listing


def layout(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def random_state(listing: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the listed shapes and dtypes; positive BN variances, so it can run."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, (shape, dtype) in listing.items():
        if dtype == torch.int64:
            state[key] = torch.randint(0, 1000, shape, generator=g)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


def assert_holds(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    model_state = model.state_dict()
    for key, value in state.items():
        assert torch.equal(model_state[key], value), key


def images(batch: int, channels: int, size: int = 72, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def shared_net() -> SharedNet:
    return SharedNet().eval()


@pytest.fixture(scope="module")
def dual_encoder() -> DualEncoder:
    return DualEncoder().eval()


@pytest.fixture(scope="module")
def resnet50() -> DualResNet:
    return DualResNet("resnet50")


@pytest.fixture
def resnet18() -> DualResNet:
    return DualResNet("resnet18").eval()


# ----------------------------------------------------------------------------------------------
# Shapes and norms


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
def test_small_alexnet_gives_unit_features(batch):
    model = SmallAlexNet(in_channel=3, feat_dim=16).eval()
    with torch.no_grad():
        z = model(images(batch, 3))
    assert z.shape == (batch, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(batch))


@pytest.mark.slow
def test_small_alexnet_rejects_other_sizes():
    with pytest.raises(ValueError, match=r"\(B, C, 72, 72\).*\(2, 3, 64, 64\)"):
        SmallAlexNet(in_channel=3)(images(2, 3, size=64))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shared_net", "dual_encoder"])
@pytest.mark.parametrize("channels", [2, 4])
@pytest.mark.parametrize("batch", [1, 4])
def test_encoders_give_unit_features(request, name, channels, batch):
    model = request.getfixturevalue(name)
    with torch.no_grad():
        z = model(images(batch, channels))
    assert z.shape == (batch, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(batch))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shared_net", "dual_encoder"])
def test_encoders_reject_other_channel_counts(request, name):
    with pytest.raises(ValueError, match=r"C in \(2, 4\).*\(1, 13, 72, 72\)"):
        request.getfixturevalue(name)(images(1, 13))


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 256])
@pytest.mark.parametrize("batch", [1, 4])
def test_dual_resnet_shapes(resnet18, batch, size):
    s1, s2 = images(batch, 2, size, seed=1), images(batch, 13, size, seed=2)
    with torch.no_grad():
        z1, z2 = resnet18.embed(s1, s2)
        logits = resnet18(s1, s2)
    assert z1.shape == z2.shape == (batch, 128)
    assert logits.shape == (batch, 8)
    # The classifier reads the S1 projection first, then the S2 one.
    w, b = resnet18.fc.weight, resnet18.fc.bias
    torch.testing.assert_close(logits, z1 @ w[:, :128].T + z2 @ w[:, 128:].T + b)


@pytest.mark.slow
def test_initialisation():
    """SmallAlexNet: N(0, 0.02), zero biases, unit BN scales; the new first convs of the ResNets:
    PyTorch's default, as the original (kaiming uniform with a = sqrt(5): uniform within
    +-1 / sqrt(fan_in), fan_in = bands * 7 * 7), not torchvision's kaiming normal."""
    alexnet = SmallAlexNet(in_channel=3, feat_dim=16)
    assert alexnet.blocks[5][1].weight.std().item() == pytest.approx(0.02, rel=0.01)
    assert torch.equal(alexnet.blocks[7][0].bias, torch.zeros(16))
    assert torch.equal(alexnet.blocks[6][1].weight, torch.ones(4096))
    torch.manual_seed(0)
    resnet = DualResNet("resnet18")
    for conv, bands in ((resnet.backbone1.conv1, 2), (resnet.backbone2.conv1, 13)):
        bound = 1 / (bands * 7 * 7) ** 0.5
        assert bound * 0.98 < conv.weight.abs().max().item() <= bound
        assert conv.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)


def test_dual_resnet_rejects_wrong_bands(resnet18):
    with pytest.raises(ValueError, match=r"s2 of shape \(B, 13, H, W\), got \(1, 4, 64, 64\)"):
        resnet18(images(1, 2, 64), images(1, 4, 64))


def test_dual_resnet_rejects_unknown_arch():
    with pytest.raises(ValueError, match="resnet50"):
        DualResNet("vgg16")


# ----------------------------------------------------------------------------------------------
# The released layouts


def test_released_listings_agree():
    """The fine-tuned dual ResNet-50 is the pre-trained one plus the classifier fc (256 -> 8)."""
    finetuned = read_listing("dualresnet50_dfc_finetuned.txt")
    head = {"fc.weight": ((8, 256), torch.float32), "fc.bias": ((8,), torch.float32)}
    assert read_listing("dualresnet50_sen12ms_pretrained.txt") | head == finetuned


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, listing",
    [
        ("shared_net", "smallalexnet_shared.txt"),
        ("dual_encoder", "smallalexnet_dual.txt"),
        ("resnet50", "dualresnet50_dfc_finetuned.txt"),
    ],
)
def test_layout_matches_listing(request, name, listing):
    assert layout(request.getfixturevalue(name)) == read_listing(listing)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, listing, wrapped, missing",
    [
        ("shared_net", "smallalexnet_shared.txt", False, []),
        ("dual_encoder", "smallalexnet_dual.txt", False, []),
        ("resnet50", "dualresnet50_sen12ms_pretrained.txt", True, ["fc.weight", "fc.bias"]),
        ("resnet50", "dualresnet50_dfc_finetuned.txt", True, []),
    ],
)
def test_load_released_layout(request, tmp_path, name, listing, wrapped, missing):
    """Each file as released: a bare state dict, or {'epoch', 'arch', 'state_dict', 'optimizer'}."""
    model = request.getfixturevalue(name)
    head_before = model.fc.weight.clone() if missing else None
    state = random_state(read_listing(listing))
    if wrapped:
        optimizer = {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]}
        torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": optimizer},
                   tmp_path / "ckpt.pth")
    else:
        torch.save(state, tmp_path / "ckpt.pth")

    assert load_checkpoint(model, tmp_path / "ckpt.pth") == (missing, [])
    assert_holds(model, state)
    if missing:  # the pre-trained file has no classifier: it stays as it was
        assert torch.equal(model.fc.weight, head_before)


def reference_encoder(state: dict[str, torch.Tensor], x: torch.Tensor, prefix: str) -> torch.Tensor:
    """The SmallAlexNet encoder written out from the spec, on the weights under `prefix`."""
    w = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    def bn(x, key):
        return F.batch_norm(x, w[f"{key}.running_mean"], w[f"{key}.running_var"],
                            w[f"{key}.weight"], w[f"{key}.bias"], training=False)

    stem = "sentinel1_block" if x.shape[1] == 2 else "sentinel2_block"
    for block, pool in ((stem, True), ("encoder.blocks.1", True), ("encoder.blocks.2", False),
                        ("encoder.blocks.3", False), ("encoder.blocks.4", True)):
        x = F.relu(bn(F.conv2d(x, w[f"{block}.0.weight"], padding=1), f"{block}.1"))
        if pool:
            x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = x.flatten(1)
    x = F.relu(bn(x @ w["encoder.blocks.5.1.weight"].T, "encoder.blocks.5.2"))
    x = F.relu(bn(x @ w["encoder.blocks.6.0.weight"].T, "encoder.blocks.6.1"))
    x = x @ w["encoder.blocks.7.0.weight"].T + w["encoder.blocks.7.0.bias"]
    return F.normalize(x, dim=1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, listing, prefixes",
    [
        ("shared_net", "smallalexnet_shared.txt", {2: "", 4: ""}),
        ("dual_encoder", "smallalexnet_dual.txt", {2: "encoder_1.", 4: "encoder_2."}),
    ],
)
def test_loaded_encoder_computes_the_original(request, tmp_path, name, listing, prefixes):
    model = request.getfixturevalue(name)
    state = random_state(read_listing(listing), seed=1)
    torch.save(state, tmp_path / "ckpt.pth")
    load_checkpoint(model, tmp_path / "ckpt.pth")
    for channels, prefix in prefixes.items():
        x = images(3, channels, seed=channels)
        with torch.no_grad():
            z = model(x)
        torch.testing.assert_close(z, reference_encoder(state, x, prefix), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Saving and loading


@pytest.mark.slow
def test_encoder_round_trip_is_bare_state_dict(shared_net, tmp_path):
    x = images(2, 4, seed=3)
    with torch.no_grad():
        shared_net.encoder.blocks[7][0].bias.add_(1.0)  # differ from any fresh model
        expected = shared_net(x)
    save_checkpoint(shared_net, tmp_path / "run" / "encoder.pth")

    released = torch.load(tmp_path / "run" / "encoder.pth", weights_only=True)
    assert list(released) == list(shared_net.state_dict())  # what the original code loads
    fresh = SharedNet().eval()
    assert load_checkpoint(fresh, tmp_path / "run" / "encoder.pth") == ([], [])
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


@pytest.mark.slow
def test_encoder_save_refuses_extra(shared_net, tmp_path):
    with pytest.raises(ValueError, match=r"bare state dicts.*\['epoch'\]"):
        save_checkpoint(shared_net, tmp_path / "encoder.pth", epoch=3)
    assert not (tmp_path / "encoder.pth").exists()


def test_dual_resnet_round_trip_in_released_format(resnet18, tmp_path):
    s1, s2 = images(2, 2, 64, seed=4), images(2, 13, 64, seed=5)
    with torch.no_grad():
        expected = resnet18(s1, s2)
    save_checkpoint(resnet18, tmp_path / "dual.pth", epoch=7)

    released = torch.load(tmp_path / "dual.pth", weights_only=True)
    assert released.keys() == {"epoch", "arch", "state_dict"}
    assert (released["epoch"], released["arch"]) == (7, "resnet18")
    fresh = DualResNet("resnet18").eval()
    with torch.no_grad():
        assert not torch.equal(fresh(s1, s2), expected)
        assert load_checkpoint(fresh, tmp_path / "dual.pth") == ([], [])
        assert torch.equal(fresh(s1, s2), expected)


def test_module_prefix_is_stripped(resnet18, tmp_path, caplog):
    state = {k: v + 1 if v.is_floating_point() else v for k, v in resnet18.state_dict().items()}
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "ddp.pth")
    fresh = DualResNet("resnet18")
    with caplog.at_level(logging.INFO, logger="util.checkpoint"):
        assert load_checkpoint(fresh, tmp_path / "ddp.pth") == ([], [])
    assert_holds(fresh, state)
    assert "ddp.pth" in caplog.text


def test_pickled_object_gives_readable_error(tmp_path):
    torch.save(nn.Linear(3, 2), tmp_path / "whole_model.pth")
    expected = r"whole_model\.pth holds pickled.*Linear.*re-save its state dict"
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(nn.Linear(3, 2), tmp_path / "whole_model.pth")


def test_not_a_state_dict_is_refused(tmp_path):
    torch.save({"epoch": 1, "model": {"weight": torch.zeros(2, 3)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth.*'state_dict'.*keys epoch, model"):
        load_checkpoint(nn.Linear(3, 2), tmp_path / "other.pth")


def test_shape_mismatch_names_keys_and_shapes(resnet18, tmp_path):
    save_checkpoint(resnet18, tmp_path / "proj_128.pth")
    with pytest.raises(ValueError) as err:
        load_checkpoint(DualResNet("resnet18", proj_dim=64), tmp_path / "proj_128.pth")
    message = str(err.value)
    assert "proj_128.pth" in message
    assert "backbone1.fc.2.weight (file (128, 512), model (64, 512))" in message


@pytest.mark.slow
def test_a_checkpoint_for_other_band_counts_is_refused_or_its_first_layer_starts_fresh(resnet18, tmp_path, caplog):
    save_checkpoint(resnet18, tmp_path / "s2_13_bands.pth")
    with pytest.raises(BandCountError) as err:
        load_checkpoint(DualResNet("resnet18", s2_channels=12), tmp_path / "s2_13_bands.pth")
    assert str(err.value) == (f"{tmp_path / 's2_13_bands.pth'}: its S2 first layer (backbone2.conv1.weight) takes 13 "
                              "bands, but the data has 12 S2 bands")
    torch.manual_seed(1)
    model = DualResNet("resnet18", s2_channels=12)
    init = model.backbone2.conv1.weight.clone()
    with caplog.at_level(logging.WARNING, logger="models"):
        missing, _ = load_checkpoint(model, tmp_path / "s2_13_bands.pth", fresh_first_conv=True)
    assert missing == ["backbone2.conv1.weight"] and "that layer starts fresh" in caplog.text
    assert torch.equal(model.backbone2.conv1.weight, init)
    for key, value in resnet18.state_dict().items():
        if key != "backbone2.conv1.weight":
            assert torch.equal(model.state_dict()[key], value), key


def test_missing_and_unexpected_keys_raise_unless_not_strict(resnet18, tmp_path):
    state = resnet18.state_dict()
    del state["backbone1.bn1.weight"]
    state["backbone3.conv1.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pth")
    expected = r"missing keys \(1\): backbone1\.bn1\.weight; unexpected keys \(1\): backbone3"
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(DualResNet("resnet18"), tmp_path / "odd.pth")
    loaded = load_checkpoint(DualResNet("resnet18"), tmp_path / "odd.pth", strict=False)
    assert loaded == (["backbone1.bn1.weight"], ["backbone3.conv1.weight"])


def test_a_dual_resnet_may_miss_its_whole_classifier_only(resnet18, tmp_path):
    state = resnet18.state_dict()
    del state["fc.weight"]
    torch.save(state, tmp_path / "half_head.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): fc\.weight$"):
        load_checkpoint(DualResNet("resnet18"), tmp_path / "half_head.pth")


def test_only_a_dual_resnet_may_miss_its_classifier(tmp_path):
    model = nn.Sequential()
    model.fc = nn.Linear(3, 2)
    torch.save({}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match=r"missing keys \(2\): fc\.weight, fc\.bias"):
        load_checkpoint(model, tmp_path / "empty.pth")


# ----------------------------------------------------------------------------------------------
# Training helpers


def test_freeze_leaves_exactly_the_classifier_trainable(resnet18):
    freeze_all_but(resnet18, resnet18.fc)
    trainable = {name for name, p in resnet18.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    assert count_trainable(resnet18) == 2 * 128 * 8 + 8


def test_freeze_with_a_separate_head(resnet18):
    head = nn.Linear(256, 6)
    freeze_all_but(resnet18, [head])
    assert count_trainable(resnet18) == 0
    assert count_trainable(head) == 256 * 6 + 6


def test_frozen_batch_norm_keeps_its_statistics(resnet18):
    freeze_all_but(resnet18, resnet18.fc)
    resnet18.train()
    set_frozen_bn_eval(resnet18)
    before = resnet18.backbone1.bn1.running_mean.clone()
    resnet18(images(2, 2, 64), images(2, 13, 64))
    assert torch.equal(resnet18.backbone1.bn1.running_mean, before)
    assert resnet18.training and resnet18.fc.training


def test_trainable_batch_norm_stays_in_train_mode(resnet18):
    resnet18.train()
    set_frozen_bn_eval(resnet18)
    assert all(m.training for m in resnet18.modules())


@pytest.mark.parametrize("frozen", [False, True])
def test_param_groups_cover_each_trainable_parameter_once(resnet18, frozen):
    if frozen:
        freeze_all_but(resnet18, resnet18.fc)
    groups = param_groups(resnet18, resnet18.fc, lr=1e-5, head_lr=3e-6, weight_decay=1e-3)

    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in resnet18.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)
    expected_lrs = {"head": 3e-6} if frozen else {"backbone": 1e-5, "head": 3e-6}
    assert {g["name"]: g["lr"] for g in groups} == expected_lrs
    assert [id(p) for p in groups[-1]["params"]] == [id(resnet18.fc.weight), id(resnet18.fc.bias)]
    torch.optim.Adam(groups)


@pytest.mark.slow
def test_initialisation_follows_the_original():
    """Trunk N(0, 0.02); stems PyTorch's default (kaiming uniform, bound 1/sqrt(fan_in)); heads N(0, 0.01), bias 0."""
    from models import linear_head
    torch.manual_seed(0)
    net = SharedNet()
    trunk = net.encoder.blocks[1][0].weight
    assert abs(trunk.std().item() - 0.02) < 0.001
    stem = net.sentinel2_block[0].weight  # fan_in 4 * 3 * 3 = 36: uniform within +-1/6
    assert stem.abs().max().item() <= 1 / 6 and stem.abs().max().item() > 0.15 and abs(stem.std().item() - 1 / 6 / 3**0.5) < 0.01
    head = linear_head(256, 7)
    assert abs(head.weight.std().item() - 0.01) < 0.001 and torch.equal(head.bias, torch.zeros(7))


@pytest.mark.slow
def test_checkpoints_with_non_finite_weights_or_random_bytes_are_named(tmp_path):
    net = SharedNet()
    state = net.state_dict()
    state["encoder.blocks.1.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in 1 tensors: encoder.blocks.1.0.weight"):
        load_checkpoint(SharedNet(), tmp_path / "nan.pth")
    model = SharedNet()
    for seed in range(30):  # random bytes: named, without advice to load them unsafely
        (tmp_path / "random.pth").write_bytes(random.Random(seed).randbytes(1024))
        with pytest.raises(ValueError, match="is not a (readable )?PyTorch") as error:
            load_checkpoint(model, tmp_path / "random.pth")
        assert "weights_only=False" not in str(error.value)


# ----------------------------------------------------------------------------------------------
# Single-modality backbones (TorchGeo's SSL4EO-S12 layout)


@pytest.mark.slow
def test_ssl4eo_backbones_load_tensor_for_tensor_and_the_heads_start_fresh(tmp_path, caplog):
    s1, s2 = ssl4eo_file(tmp_path / "s1.pth", 2, seed=1), ssl4eo_file(tmp_path / "s2.pth", 13, seed=2)
    net = DualResNet("resnet18")
    heads = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(("fc.", "backbone1.fc", "backbone2.fc"))}
    with caplog.at_level(logging.INFO, logger="models"):
        load_backbone_weights(net, s1=tmp_path / "s1.pth", s2=str(tmp_path / "s2.pth"))
    for backbone, state in ((net.backbone1, s1), (net.backbone2, s2)):
        loaded = backbone.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert all(torch.equal(net.state_dict()[k], v) for k, v in heads.items())
    assert "projection head starts fresh" in caplog.text and "The classifier (fc) starts fresh" in caplog.text

    only_s2 = DualResNet("resnet18")
    before = {k: v.clone() for k, v in only_s2.backbone1.state_dict().items()}
    load_backbone_weights(only_s2, s2=tmp_path / "s2.pth")
    assert all(torch.equal(only_s2.backbone1.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(only_s2.backbone2.conv1.weight, s2["conv1.weight"])


@pytest.mark.slow
def test_a_backbone_file_for_another_band_count_is_refused_naming_it(tmp_path):
    state = ssl4eo_file(tmp_path / "l2a_12.pth", 12)
    with pytest.raises(BandCountError) as err:
        load_backbone_weights(DualResNet("resnet18"), s2=tmp_path / "l2a_12.pth")
    assert str(err.value) == (f"{tmp_path / 'l2a_12.pth'}: its S2 first layer (conv1.weight) takes 12 bands, "
                              "but the data has 13 S2 bands")
    net = DualResNet("resnet18")
    init = net.backbone2.conv1.weight.clone()
    assert load_backbone_weights(net, s2=tmp_path / "l2a_12.pth", fresh_first_conv=True) == ["backbone2.conv1.weight"]
    assert torch.equal(net.backbone2.conv1.weight, init)
    assert torch.equal(net.backbone2.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    matching = DualResNet("resnet18", s2_channels=12)
    load_backbone_weights(matching, s2=tmp_path / "l2a_12.pth")
    assert torch.equal(matching.backbone2.conv1.weight, state["conv1.weight"])


@pytest.mark.slow
def test_backbone_files_with_other_keys(tmp_path, caplog):
    state = ssl4eo_file(tmp_path / "s1.pth", 2)
    # a whole torchvision classifier net: its fc is ignored; batch-norm counters may be missing
    with_fc = ssl4eo_file(tmp_path / "with_fc.pth", 2, fc=True)
    torch.save({k: v for k, v in with_fc.items() if not k.endswith("num_batches_tracked")}, tmp_path / "with_fc.pth")
    net = DualResNet("resnet18")
    head = net.backbone1.fc[0].weight.clone()
    with caplog.at_level(logging.INFO, logger="models"):
        load_backbone_weights(net, s1=tmp_path / "with_fc.pth")
    assert torch.equal(net.backbone1.fc[0].weight, head)
    assert torch.equal(net.backbone1.bn1.weight, with_fc["bn1.weight"])
    assert "ignored the file's classifier fc.weight, fc.bias" in caplog.text

    torch.save({**state, "extra.x": torch.zeros(1), "layer9.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra\.pth is not a resnet18 S1 backbone .*unexpected keys \(2\): extra\.x"):
        load_backbone_weights(DualResNet("resnet18"), s1=tmp_path / "extra.pth")
    torch.save({k: v for k, v in state.items() if k != "layer4.1.bn2.weight"}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"short\.pth .*missing keys \(1\): layer4\.1\.bn2\.weight$"):
        load_backbone_weights(DualResNet("resnet18"), s1=tmp_path / "short.pth")
    ssl4eo_file(tmp_path / "r34.pth", 2, arch="resnet34")
    with pytest.raises(ValueError, match=r"r34\.pth is not a resnet18 S1 backbone .*unexpected keys"):
        load_backbone_weights(DualResNet("resnet18"), s1=tmp_path / "r34.pth")
    nan = {**state, "bn1.weight": torch.full_like(state["bn1.weight"], float("nan"))}
    torch.save({"state_dict": {f"module.{k}": v for k, v in nan.items()}}, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"nan\.pth: non-finite values .*bn1\.weight"):
        load_backbone_weights(DualResNet("resnet18"), s1=tmp_path / "nan.pth")


def test_named_backbones_download_into_torch_hubs_cache_and_check_the_hash(tmp_path, monkeypatch):
    import hashlib

    contents = {"s1": b"s1 weights", "s2": b"s2 weights"}
    urls = {m: f"https://example.org/{m}-{hashlib.sha256(c).hexdigest()[:8]}.pth" for m, c in contents.items()}
    monkeypatch.setitem(models.PRETRAINED_BACKBONES, "fake", urls)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    fetched = []

    def fetch(url, path, progress):
        fetched.append(url)
        path.write_bytes(contents[url.split("/")[-1][:2]] if "example.org" in url else b"not the published file")

    monkeypatch.setattr(checkpoint, "fetch", fetch)
    files = models.pretrained_backbone_files("fake")
    assert files == {m: tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1] for m, url in urls.items()}
    assert fetched == [urls["s1"], urls["s2"]] and files["s2"].read_bytes() == b"s2 weights"
    assert models.pretrained_backbone_files("fake") == files and len(fetched) == 2  # cached: no second download

    # TorchGeo's MoCo pair: a download whose hash differs is deleted and refused, naming the URL
    with pytest.raises(ValueError, match=r"resnet50_sentinel1_all_moco-906e4356\.pth: the download has SHA-256 .*"
                                         r"expected 906e4356"):
        models.pretrained_backbone_files("ssl4eo-moco")
    assert fetched[-1].startswith("https://hf.co/torchgeo/resnet50_sentinel1_all_moco/resolve/")
    assert not (tmp_path / "hub" / "checkpoints" / "resnet50_sentinel1_all_moco-906e4356.pth").exists()
    # a damaged cached file is refused, not silently replaced
    files["s1"].write_bytes(b"damaged")
    with pytest.raises(ValueError, match=r"s1-[0-9a-f]{8}\.pth: SHA-256 .* delete it to download it again"):
        models.pretrained_backbone_files("fake")
    with pytest.raises(ValueError, match="unknown pre-trained backbones 'moco'; known: ssl4eo-moco, ssl4eo-decur"):
        models.pretrained_backbone_files("moco")
