"""The shared training pieces: loss composition, views, sampling, metrics, schedules."""
import argparse
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine
from losses import SupConLoss
from test_losses import naive_supcon


def naive_ce(logits, labels, ignore=255):
    """Mean over non-ignored samples of -log softmax, one sample at a time."""
    terms = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits.tolist(), labels.tolist()) if y != ignore]
    return sum(terms) / max(1, len(terms))


def fixed_outputs(heads):
    g = torch.Generator().manual_seed(0)
    features = {m: F.normalize(torch.randn(6, 2, 4, generator=g), dim=-1) for m in ("s1", "s2")}
    logits = {h: torch.randn(6, 5, generator=g) for h in heads}
    return {"features": features, "logits": logits}


LABELS = torch.tensor([0, 1, 0, 2, 1, 255])


def test_fused_composition_is_ce_plus_cross_modal_supcon():
    out = fixed_outputs(["fused"])
    terms = engine.compose_loss(out, LABELS, supcon=SupConLoss(), ce_weight=0.5, sup_weight=2.0)
    # The ignored sample is its own class in SupCon: label it with something unique.
    sup_ids = torch.tensor([0, 1, 0, 2, 1, 99])
    stacked = torch.cat([out["features"]["s1"], out["features"]["s2"]])
    expected_sup = naive_supcon(stacked, torch.cat([sup_ids, sup_ids]))
    expected_ce = naive_ce(out["logits"]["fused"], LABELS)
    assert terms["supcon"].item() == pytest.approx(expected_sup, abs=1e-5)
    assert terms["ce"].item() == pytest.approx(expected_ce, abs=1e-5)
    assert terms["loss"].item() == pytest.approx(0.5 * expected_ce + 2.0 * expected_sup, abs=1e-5)


def test_separate_heads_sum_ce_and_supcon_per_modality():
    out = fixed_outputs(["s1", "s2"])
    terms = engine.compose_loss(out, LABELS, supcon=SupConLoss())
    sup_ids = torch.tensor([0, 1, 0, 2, 1, 99])
    expected_sup = naive_supcon(out["features"]["s1"], sup_ids) + naive_supcon(out["features"]["s2"], sup_ids)
    expected_ce = naive_ce(out["logits"]["s1"], LABELS) + naive_ce(out["logits"]["s2"], LABELS)
    assert terms["supcon"].item() == pytest.approx(expected_sup, abs=1e-5)
    assert terms["loss"].item() == pytest.approx(expected_ce + expected_sup, abs=1e-5)


def test_single_modality_and_ce_only():
    out = fixed_outputs(["s1"])
    del out["features"]["s2"]
    terms = engine.compose_loss(out, LABELS, supcon=SupConLoss())
    expected = naive_ce(out["logits"]["s1"], LABELS) + naive_supcon(out["features"]["s1"], torch.tensor([0, 1, 0, 2, 1, 99]))
    assert terms["loss"].item() == pytest.approx(expected, abs=1e-5)
    ce_only = engine.compose_loss(out, LABELS)
    assert set(ce_only) == {"ce", "loss"}
    assert ce_only["loss"].item() == pytest.approx(naive_ce(out["logits"]["s1"], LABELS), abs=1e-6)


def test_ce_labels_ignore_negatives_while_supcon_keeps_them():
    out = fixed_outputs(["fused"])
    labels = torch.tensor([0, 3, 0, 3, 1, 1])
    ce_labels = torch.where(labels == 3, 255, labels)
    terms = engine.compose_loss(out, labels, ce_labels=ce_labels, supcon=SupConLoss())
    assert terms["ce"].item() == pytest.approx(naive_ce(out["logits"]["fused"], ce_labels), abs=1e-6)
    stacked = torch.cat([out["features"]["s1"], out["features"]["s2"]])
    assert terms["supcon"].item() == pytest.approx(naive_supcon(stacked, torch.cat([labels, labels])), abs=1e-5)


def test_all_ignored_batch_gives_zero_ce_not_nan():
    out = fixed_outputs(["fused"])
    terms = engine.compose_loss(out, torch.full((6,), 255))
    assert terms["loss"].item() == 0.0


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(float(factor)))

    def forward(self, x):
        return x.flatten(1) * self.factor


def test_multiview_classifier_routes_views_and_heads():
    shared = Scale(2.0)
    head = nn.Linear(3, 3)
    net = engine.MultiViewClassifier({"s1": shared, "s2": shared}, {"fused": head})
    assert len(list(net.parameters())) == 3  # the shared encoder counted once
    s1 = [torch.randn(4, 1, 1, 1), torch.randn(4, 1, 1, 1)]
    s2 = [torch.randn(4, 2, 1, 1), torch.randn(4, 2, 1, 1)]
    out = net({"s1": s1, "s2": s2})
    assert out["features"]["s1"].shape == (4, 2, 1) and out["features"]["s2"].shape == (4, 2, 2)
    torch.testing.assert_close(out["features"]["s2"][:, 0], 2 * s2[0].flatten(1))
    expected = head(torch.cat([2 * s1[1].flatten(1), 2 * s2[1].flatten(1)], 1))  # the ORIGINAL (last) views
    torch.testing.assert_close(out["logits"]["fused"], expected)
    again = engine.MultiViewClassifier({"s1": shared, "s2": shared}, {"fused": head}, separate_ce_pass=True)
    torch.testing.assert_close(again({"s1": s1, "s2": s2})["logits"]["fused"], expected)


def test_predict_single_head_and_late_fusion():
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert engine.predict({"fused": a}).tolist() == [0, 1]
    b = torch.tensor([[0.0, 5.0], [0.0, 1.0]])  # sample 0: the confident head wins the mean probability
    assert engine.predict({"s1": a, "s2": b}).tolist() == [1, 1]


def test_views_on_device_augment_first_view_only():
    ctx = engine.Context(torch.device("cpu"), 0, 1, amp=False, channels_last=False)
    flip = lambda x, generator=None: x.flip(-1)  # noqa: E731
    x = torch.arange(8.0).view(1, 2, 2, 2)
    pair = engine.Views(["s1"], flip, 2, "device", ctx, seed=0)({"s1": x}, 0, 0)["s1"]
    assert torch.equal(pair[0], x.flip(-1)) and torch.equal(pair[1], x)
    single = engine.Views(["s1"], flip, 1, "device", ctx, seed=0)({"s1": x}, 0, 0)["s1"]
    assert len(single) == 1 and torch.equal(single[0], x.flip(-1))
    two_augmented = engine.Views(["s1"], flip, 2, "device", ctx, seed=0, keep_original=False)({"s1": x}, 0, 0)["s1"]
    assert all(torch.equal(v, x.flip(-1)) for v in two_augmented)
    with pytest.raises(ValueError, match="device only"):
        engine.Views(["s1"], flip, 2, "loader", ctx, seed=0, keep_original=False)


def test_epoch_sampler_shards_cover_the_data_and_change_per_epoch():
    shards = [list(engine.EpochSampler(10, seed=3, rank=r, world=2, shuffle=True)) for r in range(2)]
    indices = [i for shard in shards for i, _ in shard]
    assert sorted(indices) == list(range(10))
    sampler = engine.EpochSampler(10, seed=3)
    first = [i for i, _ in sampler]
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(i for i, _ in second) == list(range(10)) and [i for i, _ in second] != first
    assert {e for _, e in second} == {1}
    again = engine.EpochSampler(10, seed=3)
    assert [i for i, _ in again] == first  # keyed by (seed, epoch), not by history


def test_epoch_sampler_drop_last_pads_eval_and_weights():
    assert len(engine.EpochSampler(10, 0, 0, 3, drop_last=True, batch_size=2)) == 2
    padded = [list(engine.EpochSampler(10, 0, r, 3, shuffle=False)) for r in range(3)]
    assert [len(p) for p in padded] == [4, 4, 4]
    assert sorted({i for p in padded for i, _ in p}) == list(range(10))
    weights = torch.tensor([0.0, 1.0, 3.0])
    drawn = [i for i, _ in engine.EpochSampler(3000, 0, weights=weights.repeat_interleave(1000))]
    counts = np.bincount(np.array(drawn) // 1000, minlength=3)
    assert counts[0] == 0 and 2.5 < counts[2] / counts[1] < 3.5


def test_subset_indices_fixed_and_sized():
    a = engine.subset_indices(100, 0.25, seed=1)
    assert len(a) == 25 and a == sorted(a) and a == engine.subset_indices(100, 0.25, seed=1)
    assert a != engine.subset_indices(100, 0.25, seed=2)
    with pytest.raises(ValueError, match="data_ratio"):
        engine.subset_indices(100, 0.0, seed=1)


def test_classification_metrics_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2, 255, 3])
    y_pred = np.array([0, 0, 1, 1, 0, 2, 0, 2])
    m = engine.classification_metrics(y_true, y_pred, ["a", "b", "c", "d", "e"], ignore=(255, 3))
    assert m["per_class"] == pytest.approx({"a": 200 / 3, "b": 50.0, "c": 100.0, "e": None})
    assert "d" not in m["per_class"]
    assert m["AA"] == pytest.approx((200 / 3 + 50 + 100) / 3)
    assert m["OA"] == pytest.approx(100 * 4 / 6) and m["n"] == 6


def test_eval_schedule_of_the_original_meterml_runs():
    epochs = engine.eval_schedule(121, every=10, dense_after=79)
    one_based = sorted(e + 1 for e in epochs)
    assert one_based == [10, 20, 30, 40, 50, 60, 70] + list(range(80, 122))


def test_resolve_args_resume_keeps_config_but_allows_epochs(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--flag", default="a")
    engine.add_common_args(parser, epochs=5, batch_size=4, lr=0.1)
    (tmp_path / "config.json").write_text('{"flag": "saved", "epochs": 5, "batch_size": 8, "lr": 0.5}')
    args = engine.resolve_args(parser, ["--resume", str(tmp_path), "--epochs", "7", "--flag", "ignored"])
    assert (args.flag, args.epochs, args.batch_size, args.lr) == ("saved", 7, 8, 0.5)
    assert args.save_path == tmp_path
    with pytest.raises(SystemExit):
        engine.resolve_args(parser, ["--resume", str(tmp_path / "nowhere")])


def test_separate_ce_pass_costs_a_pass_in_training_only():
    calls = []
    encoder = Scale(1.0)
    encoder.register_forward_hook(lambda *_: calls.append(1))
    net = engine.MultiViewClassifier({"s1": encoder}, {"s1": nn.Linear(1, 2)}, separate_ce_pass=True)
    views = {"s1": [torch.randn(3, 1, 1, 1), torch.randn(3, 1, 1, 1)]}
    net.train()(views)
    assert len(calls) == 3  # two views, then the original again for CE
    calls.clear()
    net.eval()(views)
    assert len(calls) == 2


def test_bn_updates_count_equals_repeated_updates():
    x = torch.randn(8, 3, 5, 5) * 2 + 1
    twice, counted, unused = nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    twice(x), twice(x)
    with engine.bn_updates_count(nn.ModuleList([counted, unused]), 2):
        out = counted(x)
    assert counted.momentum == unused.momentum == 0.1  # restored
    assert torch.equal(unused.running_mean, torch.zeros(3)) and unused.num_batches_tracked.item() == 0
    torch.testing.assert_close(out, F.batch_norm(x, None, None, training=True))  # normalised as usual
    torch.testing.assert_close(counted.running_mean, twice.running_mean)
    torch.testing.assert_close(counted.running_var, twice.running_var)
    frozen = nn.BatchNorm2d(3).eval()
    with engine.bn_updates_count(frozen, 2):
        frozen(x)
    assert torch.equal(frozen.running_mean, torch.zeros(3)) and frozen.num_batches_tracked.item() == 0
    with pytest.raises(ValueError, match="momentum=None"), engine.bn_updates_count(nn.BatchNorm2d(3, momentum=None), 2):
        pass


def small_encoder(channels):
    return nn.Sequential(nn.Conv2d(channels, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_one_pass_step_matches_the_original_three_pass_step():
    """Reusing the original view's features for CE gives the original style's loss, gradients and
    batch-norm running statistics (which evaluation uses)."""
    torch.manual_seed(0)
    encoders = {"s1": small_encoder(2), "s2": small_encoder(3)}
    head = nn.Linear(6, 3)
    states = []
    for separate in (False, True):
        model = engine.MultiViewClassifier({m: copy.deepcopy(e) for m, e in encoders.items()},
                                           {"fused": copy.deepcopy(head)}, separate_ce_pass=separate).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            views = {"s1": [torch.randn(6, 2, 6, 6, generator=g, dtype=torch.float64) for _ in range(2)],
                     "s2": [torch.randn(6, 3, 6, 6, generator=g, dtype=torch.float64) + 2 for _ in range(2)]}
            labels = torch.randint(0, 3, (6,), generator=g)
            loss = engine.compose_loss(model.train()(views), labels, supcon=SupConLoss(0.5))["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        states.append(model.state_dict())
    fast, original = states
    assert fast.keys() == original.keys()
    for key in fast:
        if not key.endswith("num_batches_tracked"):  # counts passes: 2 a step against 3
            torch.testing.assert_close(fast[key], original[key], msg=key)
    assert fast["encoders.0.1.num_batches_tracked"].item() == 6 and original["encoders.0.1.num_batches_tracked"].item() == 9


def test_views_restore_channels_last_after_augmenting():
    ctx = engine.Context(torch.device("cpu"), 0, 1, amp=False, channels_last=True)
    to_nchw = lambda x, generator=None: x.contiguous() + 1  # noqa: E731  (as grid_sample returns)
    x = torch.randn(2, 3, 4, 4)
    views = engine.Views(["s1"], to_nchw, 2, "device", ctx, seed=0)({"s1": x}, 0, 0)["s1"]
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in views)
