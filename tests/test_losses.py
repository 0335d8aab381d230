"""Losses against independent, deliberately naive formulas (explicit loops, float64)."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import naive_supcon
from losses import NTXent, PairwiseNTXent, SupConLoss, multimodal_views


def normalized(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


@pytest.mark.parametrize("views", [1, 2, 4])
@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_supcon_matches_naive_with_labels(views, mode, temperature):
    features = normalized(6, views, 5, seed=views)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    loss = SupConLoss(temperature, mode, base_temperature=0.07)(features, labels=labels)
    expected = naive_supcon(features, labels=labels, temperature=temperature, mode=mode)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("mode", ["all", "one"])
def test_supcon_matches_naive_with_asymmetric_mask(mode):
    features = normalized(5, 2, 8, seed=1)
    mask = torch.tensor(
        [[1, 1, 0, 0, 1], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [1, 0, 0, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.float32
    )
    loss = SupConLoss(0.1, mode)(features, mask=mask)
    assert loss.item() == pytest.approx(naive_supcon(features, mask=mask, temperature=0.1, mode=mode), abs=1e-5)


def test_supcon_flattens_trailing_dims():
    features = normalized(4, 2, 3, 4, seed=2)
    labels = torch.tensor([1, 1, 0, 0])
    loss = SupConLoss()(features, labels=labels)
    assert loss.item() == pytest.approx(naive_supcon(features, labels), abs=1e-5)


def test_simclr_case_equals_ntxent_with_the_same_pairs():
    a, b = normalized(2, 7, 16, seed=3)
    supcon = SupConLoss(temperature=0.2, base_temperature=0.2)(torch.stack([a, b], dim=1))
    ntxent = NTXent(tau=0.2, blocks=2)(torch.cat([a, b]))
    assert supcon.item() == pytest.approx(ntxent.item(), abs=1e-6)
    assert supcon.item() == pytest.approx(naive_supcon(torch.stack([a, b], 1), temperature=0.2, base_temperature=0.2), abs=1e-5)


@pytest.mark.parametrize("mode", ["all", "one"])
def test_supcon_gradcheck_float64(mode):
    features = normalized(4, 2, 3, seed=4, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([0, 1, 0, 3])
    loss = SupConLoss(0.5, mode)
    assert torch.autograd.gradcheck(lambda f: loss(f, labels=labels), (features,))
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: loss(f, mask=mask), (features,))


def test_anchor_without_positive_adds_zero_and_counts():
    # One view: samples 1 and 3 have unique labels, so they have no positive at all.
    features = F.normalize(torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]], [[0.0, 1.0]], [[-1.0, 0.2]]]), dim=-1)
    features.requires_grad_()
    labels = torch.tensor([0, 1, 0, 2])
    loss = SupConLoss(temperature=0.5, base_temperature=0.5)(features, labels=labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all()
    # By hand: anchors 0 and 2 (cos with their positive: 0) each add -log(e^0 / sum of their 3 others).
    flat = features.detach().squeeze(1)
    sim = flat @ flat.T / 0.5
    terms = [torch.logsumexp(sim[i, [k for k in range(4) if k != i]], 0) - sim[i, p] for i, p in ((0, 2), (2, 0))]
    assert loss.item() == pytest.approx(float(sum(terms)) / 4, abs=1e-6)  # mean over all 4 anchors
    assert loss.item() == pytest.approx(naive_supcon(features.detach(), labels, temperature=0.5, base_temperature=0.5), abs=1e-6)


def test_no_positive_anywhere_is_zero_with_zero_gradient():
    features = normalized(3, 1, 4, seed=6).requires_grad_()
    loss = SupConLoss()(features, labels=torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert features.grad.abs().max().item() < 1e-5


def test_half_precision_inputs_are_computed_in_float32():
    features = normalized(16, 2, 32, seed=7)
    labels = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(0))
    reference = SupConLoss()(features, labels=labels)
    for dtype in (torch.bfloat16, torch.float16):
        low = SupConLoss()(features.to(dtype), labels=labels)
        assert low.dtype == torch.float32
        assert low.item() == pytest.approx(reference.item(), abs=1e-2)


def test_supcon_bad_inputs_raise():
    loss = SupConLoss()
    with pytest.raises(ValueError, match="at least 3 dims"):
        loss(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        loss(torch.randn(4, 2, 8), labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="not both"):
        loss(torch.randn(4, 2, 8), labels=torch.zeros(4, dtype=torch.long), mask=torch.eye(4))
    with pytest.raises(ValueError, match=r"mask must have shape \(4, 4\)"):
        loss(torch.randn(4, 2, 8), mask=torch.eye(3))
    with pytest.raises(ValueError, match="contrast_mode"):
        SupConLoss(contrast_mode="some")


def cosine_matrix(rows):
    z = F.normalize(torch.tensor(rows, dtype=torch.float64), dim=1)
    return (z @ z.T).tolist()


def hand_ntxent(rows, positives, tau, anchors=None):
    """Mean over anchors of the mean over their positives of -log softmax (self excluded)."""
    sim = cosine_matrix(rows)
    anchors = range(len(rows)) if anchors is None else anchors
    total = 0.0
    for i in anchors:
        denominator = sum(math.exp(sim[i][k] / tau) for k in range(len(rows)) if k != i)
        total += sum(-math.log(math.exp(sim[i][p] / tau) / denominator) for p in positives[i]) / len(positives[i])
    return total / len(anchors)


TOY_2 = [[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, -0.8]]  # blocks of b = 2
TOY_4 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.1, 0.0], [0.1, 0.9, 0.2],
         [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.2, 0.0, 0.9], [0.7, 0.7, 0.1]]


def test_ntxent_two_blocks_by_hand():
    # b = 2: rows 0/2 and 1/3 are the pairs. Row 0 by hand: cosines 0 (row 1), 0.8 (row 2), 0.6 (row 3).
    tau = 0.5
    row0 = -math.log(math.exp(0.8 / tau) / (math.exp(0.0) + math.exp(0.8 / tau) + math.exp(0.6 / tau)))
    assert row0 == pytest.approx(-math.log(4.9530 / (1 + 4.9530 + 3.3201)), abs=1e-4)  # e^1.6, e^1.2 = 0.6271
    expected = hand_ntxent(TOY_2, {0: [2], 1: [3], 2: [0], 3: [1]}, tau)
    assert hand_ntxent(TOY_2, {0: [2]}, tau, anchors=[0]) == pytest.approx(row0)
    assert NTXent(tau=tau, blocks=2)(torch.tensor(TOY_2)).item() == pytest.approx(expected, abs=1e-6)
    assert PairwiseNTXent(blocks=2, tau=tau)(torch.tensor(TOY_2)).item() == pytest.approx(expected, abs=1e-6)


def test_ntxent_four_blocks_pairs_by_hand():
    tau = 0.2
    # b = 2, blocks (0, 1) and (2, 3) paired: row r of block i is index 2 * i + r.
    pairs = {0: [2], 1: [3], 2: [0], 3: [1], 4: [6], 5: [7], 6: [4], 7: [5]}
    expected = hand_ntxent(TOY_4, pairs, tau)
    assert NTXent(tau=tau, blocks=4)(torch.tensor(TOY_4)).item() == pytest.approx(expected, abs=1e-5)


def test_pairwise_ntxent_four_blocks_by_hand():
    tau = 0.2
    same_row = {i: [j for j in range(8) if j != i and j % 2 == i % 2] for i in range(8)}
    expected = hand_ntxent(TOY_4, same_row, tau)
    assert PairwiseNTXent(blocks=4, tau=tau)(torch.tensor(TOY_4)).item() == pytest.approx(expected, abs=1e-5)


def original_ntxent(z, negatives, blocks, tau, pairwise=False):
    """The original NT-Xent / PairwiseNTXent with its negative-row masking, typed from its description:
    logits z z^T / tau, the diagonal pushed to -1e9; a flagged row's logits set to 0 and its own
    to 1; cross-entropy against the partner row (NT-Xent), or the mean -log-probability of every
    other block's row (pairwise), averaged over ALL rows."""
    b = z.shape[0] // blocks
    S = z @ z.T / tau
    S.diagonal().sub_(1e9)
    S[negatives, :] = 0.0
    S[negatives, negatives] = 1.0
    if not pairwise:
        partner = (torch.arange(blocks) ^ 1).repeat_interleave(b) * b + torch.arange(b).repeat(blocks)
        return F.cross_entropy(S, partner)
    logprobs = F.log_softmax(S, dim=-1)
    loss = -sum(logprobs.diagonal(offset=k * b).sum() for k in range(1 - blocks, blocks) if k != 0)
    return loss / (blocks * (blocks - 1) * b)


def test_negatives_average_over_all_rows_as_the_original():
    tau = 0.2
    negatives = torch.tensor([False, True] * 4)  # row 1 of every block is a Negative-class sample
    z = F.normalize(torch.tensor(TOY_4), dim=1).requires_grad_()
    loss = NTXent(tau=tau, blocks=4)(z, negatives=negatives)
    assert loss.item() == pytest.approx(original_ntxent(z.detach(), negatives, 4, tau).item(), abs=1e-5)
    # The unflagged rows by hand, the flagged ones with the original's constant log(N - 1 + e).
    kept = [0, 2, 4, 6]
    by_hand = (4 * hand_ntxent(TOY_4, {0: [2], 2: [0], 4: [6], 6: [4]}, tau, anchors=kept) + 4 * math.log(7 + math.e)) / 8
    assert loss.item() == pytest.approx(by_hand, abs=1e-5)
    loss.backward()
    assert z.grad[1].abs().sum() > 0  # flagged rows still shape the denominators
    pairwise = PairwiseNTXent(blocks=4, tau=tau)(z.detach(), negatives=negatives)
    assert pairwise.item() == pytest.approx(original_ntxent(z.detach(), negatives, 4, tau, pairwise=True).item(), abs=1e-5)
    assert NTXent(tau=tau, blocks=4)(z.detach()).item() == pytest.approx(original_ntxent(z.detach(), torch.zeros(8, dtype=torch.bool), 4, tau).item(), abs=1e-5)


def test_all_negative_batch_gives_the_constant_and_no_gradient():
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss = NTXent(tau=0.2, blocks=4)(z, negatives=torch.ones(8, dtype=torch.bool))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(7 + math.e)) and torch.all(z.grad == 0)


def test_ntxent_bad_inputs_raise():
    with pytest.raises(ValueError, match="blocks must be 2 or 4"):
        NTXent(blocks=3)
    with pytest.raises(ValueError, match=r"\(b \* 4, D\)"):
        NTXent(blocks=4)(torch.randn(6, 3))
    with pytest.raises(ValueError, match="negatives"):
        PairwiseNTXent(blocks=2)(torch.randn(6, 3), negatives=torch.zeros(5, dtype=torch.bool))


def test_multimodal_views_order_and_shapes():
    s1 = torch.arange(12.0).view(2, 2, 3)
    s2 = -torch.arange(12.0).view(2, 2, 3)
    labels = torch.tensor([4, 7])
    features, both = multimodal_views(s1, s2, labels)
    assert features.shape == (4, 2, 3)
    assert torch.equal(features[:2], s1) and torch.equal(features[2:], s2)
    assert both.tolist() == [4, 7, 4, 7]
    # S1 and S2 of one class are positives of each other: the fused SupCon is the naive one on the stack.
    f1, f2 = normalized(2, 3, 2, 8, seed=8)
    y = torch.tensor([0, 1, 0])
    stacked, y2 = multimodal_views(f1, f2, y)
    assert SupConLoss()(stacked, labels=y2).item() == pytest.approx(naive_supcon(torch.cat([f1, f2]), torch.cat([y, y])), abs=1e-5)


def test_multimodal_views_rejects_mismatches():
    with pytest.raises(ValueError, match="equal shape"):
        multimodal_views(torch.randn(2, 2, 3), torch.randn(3, 2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="equal shape"):
        multimodal_views(torch.randn(2, 2, 3), torch.randn(2, 1, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        multimodal_views(torch.randn(2, 2, 3), torch.randn(2, 2, 3), torch.zeros(3))
