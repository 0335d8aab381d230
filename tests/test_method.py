"""The method's step: MultiModalNet + SupConCELoss against a literal transcription of the original.

The transcription follows bakiuzun/SupCon_SSL (utils.dfc_return_feature,
utils.meterml_return_feature and the training loops of dfc_finetune.py / meterml_finetune.py):
per modality one pass over cat([augmented, original]) whose halves feed SupCon, a second pass
over the originals for CE, `delta_lin * CE + delta_sup * SupCon`. Its SupCon is the public
reference formula (dense masks), typed from the paper's reference code.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import naive_supcon
from losses import SupConCELoss, supcon_labels
from models import MultiModalNet, freeze_all_but, linear_head, param_groups


def reference_supcon(features, labels, temperature=0.07, base_temperature=0.07):
    """The public SupConLoss (Khosla et al.), contrast mode 'all', with its dense masks."""
    batch, views = features.shape[:2]
    mask = torch.eq(labels.view(-1, 1), labels.view(1, -1)).to(features.dtype)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(views, views)
    logits_mask = torch.ones_like(mask).scatter(1, torch.arange(batch * views).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).view(views, batch).mean()


class Encoder(nn.Module):
    """A tiny conv net with batch norm in 2-D and 1-D, as the real encoders have."""

    def __init__(self, channels, normalize):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5))
        self.normalize = normalize  # SmallAlexNet ends with an L2 norm; the ResNets' projections do not

    def forward(self, x):
        z = self.net(x)
        return F.normalize(z, dim=1) if self.normalize else z


def original_step(enc1, enc2, heads, batch, scenario, delta_lin, delta_sup):
    """Literal transcription of the original's SupCon step with augmentation (float64)."""
    s1_aug, s1, s2_aug, s2, y = batch
    bsz = y.shape[0]
    features_s1 = enc1(torch.cat([s1_aug, s1], dim=0))
    features_s2 = enc2(torch.cat([s2_aug, s2], dim=0))
    f1_z1, f1_z2 = torch.split(features_s1, [bsz, bsz], dim=0)
    f2_z1, f2_z2 = torch.split(features_s2, [bsz, bsz], dim=0)
    features_z1 = torch.cat([f1_z1.unsqueeze(1), f1_z2.unsqueeze(1)], dim=1)
    features_z2 = torch.cat([f2_z1.unsqueeze(1), f2_z2.unsqueeze(1)], dim=1)
    cross_s1, cross_s2 = enc1(s1), enc2(s2)  # the second pass, over the originals
    criterion = nn.CrossEntropyLoss(ignore_index=255, reduction="mean")
    if scenario == "dfc":  # dfc_finetune.py: normalise, then SupCon across modalities
        linear = heads["fused"](torch.cat([cross_s1, cross_s2], dim=1))
        feature_fused = F.normalize(torch.cat([features_z1, features_z2], dim=0), dim=-1)
        return delta_lin * criterion(linear, y) + delta_sup * reference_supcon(feature_fused, torch.cat([y, y]))
    if scenario == "meterml_fused":  # meterml_finetune.py, s1s2_fused with augmentation
        z = heads["fused"](torch.cat([cross_s1, cross_s2], dim=1))
        loss = delta_lin * criterion(z, y)
        return loss + delta_sup * reference_supcon(torch.cat([features_z1, features_z2], dim=0), torch.cat([y, y]))
    # meterml_finetune.py, s1s2 with augmentation: a head and a SupCon per modality
    loss = delta_lin * criterion(heads["s1"](cross_s1), y) + delta_lin * criterion(heads["s2"](cross_s2), y)
    return loss + delta_sup * reference_supcon(features_z1, y) + delta_sup * reference_supcon(features_z2, y)


def make_batch(seed, b=6):
    g = torch.Generator().manual_seed(seed)
    s1, s2 = torch.randn(b, 2, 6, 6, generator=g, dtype=torch.float64), torch.randn(b, 3, 6, 6, generator=g, dtype=torch.float64) + 1
    s1_aug, s2_aug = s1.flip(-1) + 0.1 * torch.randn_like(s1), s2.flip(-2) * 0.9
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    return s1_aug, s1, s2_aug, s2, y


def networks(scenario, seed=0):
    torch.manual_seed(seed)
    normalize = scenario != "dfc"
    enc1, enc2 = Encoder(2, normalize).double(), Encoder(3, normalize).double()
    if scenario == "meterml_s1s2":
        heads = nn.ModuleDict({"s1": linear_head(5, 3), "s2": linear_head(5, 3)}).double()
    else:
        heads = nn.ModuleDict({"fused": nn.Linear(10, 3)}).double()
    return enc1, enc2, heads


def project_step(enc1, enc2, heads, batch, scenario, delta_lin, delta_sup, ce_from="separate"):
    s1_aug, s1, s2_aug, s2, y = batch
    fused = scenario != "meterml_s1s2"
    model = MultiModalNet({"s1": enc1, "s2": enc2}, fused_head=heads["fused"] if fused else None,
                          modality_heads=None if fused else dict(heads), ce_from=ce_from)
    criterion = SupConCELoss(temperature=0.07, ce_weight=delta_lin, sup_weight=delta_sup, cross_modal=fused)
    out = model.train()({"s1": s1, "s2": s2}, {"s1": s1_aug, "s2": s2_aug})
    return criterion(out["features"], out["logits"], y)["loss"]


def one_sgd_step(step_fn, scenario, **kwargs):
    enc1, enc2, heads = networks(scenario)
    params = [*enc1.parameters(), *enc2.parameters(), *heads.parameters()]
    loss = step_fn(enc1, enc2, heads, make_batch(1), scenario, 0.7, 1.3, **kwargs)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= 0.1 * g
    state = {**{f"s1.{k}": v for k, v in enc1.state_dict().items()}, **{f"s2.{k}": v for k, v in enc2.state_dict().items()},
             **{f"head.{k}": v for k, v in heads.state_dict().items()}}
    return loss.detach(), grads, state


@pytest.mark.parametrize("scenario", ["dfc", "meterml_fused", "meterml_s1s2"])
def test_default_step_equals_the_original_step(scenario):
    ref_loss, ref_grads, ref_state = one_sgd_step(original_step, scenario)
    loss, grads, state = one_sgd_step(project_step, scenario)
    assert abs(loss.item() - ref_loss.item()) < 1e-10
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
    assert state.keys() == ref_state.keys()
    for key in state:  # weights after the step, and every running mean / var / count of batch norm
        torch.testing.assert_close(state[key].double(), ref_state[key].double(), rtol=0, atol=1e-10, msg=key)
    assert any(k.endswith("num_batches_tracked") and state[k].item() == 2 for k in state)  # two passes, two updates


def test_frozen_supcon_changes_only_the_batch_norm_statistics():
    """The original's recorded DFC2020 run: backbones frozen (requires_grad False) but in training
    mode, only the classifier trains. SupCon then reaches no parameter: the classifier's gradient
    is the CE-only one, the backbones do not move, and the running statistics are those of the
    original's two passes (joint [augmented; original], then the originals)."""
    batch = make_batch(3)
    s1_aug, s1, s2_aug, s2, y = batch

    def frozen_step(use_supcon):
        enc1, enc2, heads = networks("dfc")
        model = MultiModalNet({"s1": enc1, "s2": enc2}, fused_head=heads["fused"])
        freeze_all_but(model, heads["fused"])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.Adam(param_groups(model, heads["fused"], 1e-5, 1e-5, 1e-3), betas=(0.9, 0.999))
        out = model.train()({"s1": s1, "s2": s2}, {"s1": s1_aug, "s2": s2_aug} if use_supcon else None)
        terms = SupConCELoss(use_supcon=use_supcon)(out["features"], out["logits"], y)
        optimizer.zero_grad()
        terms["loss"].backward()
        grad = heads["fused"].weight.grad.clone()
        optimizer.step()
        return before, model.state_dict(), grad, terms

    before, after, grad, terms = frozen_step(use_supcon=True)
    _, ce_after, ce_grad, _ = frozen_step(use_supcon=False)
    assert terms["supcon"].item() > 0
    torch.testing.assert_close(grad, ce_grad, rtol=0, atol=1e-12)
    for key, value in after.items():
        if "encoders" in key and not ("running" in key or "num_batches" in key):
            assert torch.equal(value, before[key]), key  # no backbone parameter moved
    enc1, enc2, _ = networks("dfc")
    with torch.no_grad():  # the original's two passes, in training mode
        for enc, original, augmented in ((enc1, s1, s1_aug), (enc2, s2, s2_aug)):
            enc.train()(torch.cat([augmented, original]))
            enc(original)
    for prefix, enc in (("encoders.0.", enc1), ("encoders.1.", enc2)):
        for key, value in enc.state_dict().items():
            if "running" in key or "num_batches" in key:
                torch.testing.assert_close(after[prefix + key], value, rtol=0, atol=1e-12, msg=key)
    assert not torch.equal(after["encoders.0.net.1.running_mean"], ce_after["encoders.0.net.1.running_mean"])


def test_joint_ce_is_a_different_computation():
    """--ce_from joint reads the original half of the joint pass: other batch statistics."""
    ref_loss, _, ref_state = one_sgd_step(original_step, "dfc")
    loss, _, state = one_sgd_step(project_step, "dfc", ce_from="joint")
    assert abs(loss.item() - ref_loss.item()) > 1e-6
    assert state["s1.net.1.num_batches_tracked"].item() == 1
    assert not torch.allclose(state["s1.net.1.running_mean"], ref_state["s1.net.1.running_mean"])


def test_meterml_supcon_without_augmentation_has_one_view_per_modality():
    """The original stacks ONE view per modality: (2B, 1, D), labels cat([y, y])."""
    enc1, enc2, heads = networks("meterml_fused")
    _, s1, _, s2, y = make_batch(2)
    model = MultiModalNet({"s1": enc1, "s2": enc2}, fused_head=heads["fused"]).eval()
    out = model({"s1": s1, "s2": s2})
    assert out["features"]["s1"].shape == (6, 1, 5)
    f1, f2 = enc1(s1), enc2(s2)
    terms = SupConCELoss(sup_weight=1.0, ce_weight=0.0)(out["features"], out["logits"], y)
    expected = reference_supcon(torch.cat([f1.unsqueeze(1), f2.unsqueeze(1)], dim=0), torch.cat([y, y]))
    assert terms["supcon"].item() == pytest.approx(expected.item(), abs=1e-10)
    duplicated = reference_supcon(torch.cat([torch.stack([f1, f1], 1), torch.stack([f2, f2], 1)]), torch.cat([y, y]))
    assert abs(duplicated.item() - expected.item()) > 0.1  # duplicating the view is another loss


def test_modules_run_once_per_pass():
    calls = []
    enc = Encoder(2, True).double()
    enc.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    head = nn.Linear(5, 2).double()
    for ce_from, expected in (("separate", 2), ("joint", 1)):
        calls.clear()
        MultiModalNet({"s1": enc}, modality_heads={"s1": head}, ce_from=ce_from).train()({"s1": x}, {"s1": x.flip(-1)})
        assert len(calls) == expected
    calls.clear()
    MultiModalNet({"s1": enc}, encode_views="apart").train()({"s1": x}, {"s1": x.flip(-1)})
    assert len(calls) == 2  # pre-training: one pass per view
    calls.clear()
    MultiModalNet({"s1": enc}, modality_heads={"s1": head}).eval()({"s1": x})
    assert len(calls) == 1
    with pytest.raises(ValueError, match="not both"):
        MultiModalNet({"s1": enc}, fused_head=head, modality_heads={"s1": head})


def test_shared_encoder_counted_once_and_fused_order():
    shared = Encoder(2, False).double()
    head = nn.Linear(10, 3).double()
    net = MultiModalNet({"s1": shared, "s2": shared}, fused_head=head).eval()
    assert len(list(net.parameters())) == len(list(shared.parameters())) + 2
    a, b = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randn(3, 2, 6, 6, dtype=torch.float64)
    out = net({"s1": a, "s2": b})
    torch.testing.assert_close(out["logits"]["fused"], head(torch.cat([shared(a), shared(b)], 1)))


# ----------------------------------------------------------------------------- the loss composition

def naive_ce(logits, labels, ignore=255):
    """Mean over non-ignored samples of -log softmax, one sample at a time."""
    terms = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits.tolist(), labels.tolist()) if y != ignore]
    return sum(terms) / max(1, len(terms))


def fixed_outputs(heads):
    g = torch.Generator().manual_seed(0)
    features = {m: F.normalize(torch.randn(6, 2, 4, generator=g), dim=-1) for m in ("s1", "s2")}
    logits = {h: torch.randn(6, 5, generator=g) for h in heads}
    return features, logits


LABELS = torch.tensor([0, 1, 0, 2, 1, 255])
SUP_IDS = torch.tensor([0, 1, 0, 2, 1, 99])  # the ignored sample is a class of its own in SupCon


def test_fused_composition_is_ce_plus_cross_modal_supcon():
    features, logits = fixed_outputs(["fused"])
    terms = SupConCELoss(ce_weight=0.5, sup_weight=2.0)(features, logits, LABELS)
    expected_sup = naive_supcon(torch.cat([features["s1"], features["s2"]]), torch.cat([SUP_IDS, SUP_IDS]))
    expected_ce = naive_ce(logits["fused"], LABELS)
    assert terms["supcon"].item() == pytest.approx(expected_sup, abs=1e-5)
    assert terms["ce"].item() == pytest.approx(expected_ce, abs=1e-5)
    assert terms["loss"].item() == pytest.approx(0.5 * expected_ce + 2.0 * expected_sup, abs=1e-5)
    assert terms["ce_samples"].item() == 5


def test_per_modality_composition_sums_ce_and_supcon():
    features, logits = fixed_outputs(["s1", "s2"])
    terms = SupConCELoss(cross_modal=False)(features, logits, LABELS)
    expected_sup = naive_supcon(features["s1"], SUP_IDS) + naive_supcon(features["s2"], SUP_IDS)
    expected_ce = naive_ce(logits["s1"], LABELS) + naive_ce(logits["s2"], LABELS)
    assert terms["loss"].item() == pytest.approx(expected_ce + expected_sup, abs=1e-5)


def test_ce_labels_ignore_negatives_while_supcon_keeps_them():
    features, logits = fixed_outputs(["fused"])
    labels = torch.tensor([0, 3, 0, 3, 1, 1])
    ce_labels = torch.where(labels == 3, 255, labels)
    terms = SupConCELoss()(features, logits, labels, ce_labels)
    assert terms["ce"].item() == pytest.approx(naive_ce(logits["fused"], ce_labels), abs=1e-6)
    stacked = torch.cat([features["s1"], features["s2"]])
    assert terms["supcon"].item() == pytest.approx(naive_supcon(stacked, torch.cat([labels, labels])), abs=1e-5)


def test_ce_only_and_all_ignored_batch():
    features, logits = fixed_outputs(["fused"])
    ce_only = SupConCELoss(use_supcon=False)(features, logits, LABELS)
    assert set(ce_only) == {"ce", "loss", "ce_samples"}
    terms = SupConCELoss(use_supcon=False)(features, logits, torch.full((6,), 255))
    assert terms["loss"].item() == 0.0 and terms["ce_samples"].item() == 0  # counted: the trainer refuses such an epoch


def test_supcon_labels_make_ignored_samples_unique():
    ids = supcon_labels(torch.tensor([3, 255, 3, 255]))
    assert ids[0] == ids[2] and len({ids[1].item(), ids[3].item(), ids[0].item()}) == 3


def test_supcon_labels_of_different_ranks_never_collide():
    labels = torch.tensor([255, 1, 255])
    gathered = torch.cat([supcon_labels(labels, rank=0), supcon_labels(labels, rank=1)])
    unlabelled = gathered[gathered < 0]
    assert len(unlabelled) == 4 and len(set(unlabelled.tolist())) == 4
