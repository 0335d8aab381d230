"""Contrastive losses: supervised contrastive (SupCon) and the NT-Xent forms of pre-training.

All losses compute in float32 whatever the input dtype (bf16 / fp16 features from autocast are
upcast; float64 stays float64), never build a `(N, N)` mask, and can gather features from every rank of a
torch.distributed job (`gather_distributed=True`) so that the loss sees the global batch.

Distributed convention (as in SimCLR / MoCo v3 practice): each rank uses ITS OWN samples as
anchors and the features of EVERY rank as the contrast set, and returns the mean over its own
anchors. The mean of that value over ranks is the loss of the global batch, and DDP's gradient
averaging then yields exactly the parameter gradients of the global-batch loss. All ranks must
pass batches of the same size (drop the last incomplete batch, or use a DistributedSampler).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as dist_fc
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = 255  # label that cross-entropy and the metrics skip (unlabelled DFC2020 / SEN12MS samples, excluded classes)


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision and float32 inputs; float64 stays float64 (for gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def _gather(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0, in rank order; gradients flow back to each rank.

    Integer and boolean tensors are gathered without autograd.
    """
    if x.is_floating_point():
        # The functional collective's backward is a reduce-scatter. The legacy
        # torch.distributed.nn.functional.all_gather returned wrong gradients on gloo for the
        # transposed layouts used here (torch 2.14; tests/test_distributed.py catches it).
        return dist_fc.all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _logsumexp_without_self(anchors: Tensor, contrast: Tensor, self_idx: Tensor, temperature: float) -> Tensor:
    """log sum_{k != self} exp(a . c_k / T) for every anchor.

    Args:
        anchors: (A, D) float32.
        contrast: (N, D) float32, containing every anchor at row `self_idx`.
        self_idx: (A,) int64, the row of each anchor in `contrast`.
    Returns:
        (A,) float32.
    """
    logits = (anchors / temperature) @ contrast.T  # scaling the (A, D) side saves an (A, N) temporary
    # The anchor's similarity with itself is excluded from the denominator (set to -inf in place:
    # the (A, N) logits are the only quadratic tensor the loss holds).
    logits.scatter_(1, self_idx[:, None], float("-inf"))
    return torch.logsumexp(logits, dim=1)


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020), with the SimCLR loss as the unsupervised case.

    For anchor i with positive set P(i) (all other views of samples sharing i's label, or as
    `mask` says; never i itself) and contrast set A(i) (every view but i itself)::

        loss_i = -(T / T_base) * 1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a in A(i)} exp(z_i.z_a / T) )

    and the loss is the mean over anchors. An anchor without positives contributes 0 and still
    counts in the mean, as in the public reference implementation (the loss never becomes NaN).
    Features are used as given: L2-normalise them first (the method does).

    Args:
        temperature: T.
        contrast_mode: "all" (every view is an anchor) or "one" (only view 0 is).
        base_temperature: T_base; the loss is scaled by T / T_base.
        gather_distributed: compute against the features of every rank (see module docstring).
    """

    def __init__(
        self,
        temperature: float = 0.07,
        contrast_mode: str = "all",
        base_temperature: float = 0.07,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if contrast_mode not in ("all", "one"):
            raise ValueError(f"contrast_mode must be 'all' or 'one', got {contrast_mode!r}")
        self.temperature = temperature
        self.contrast_mode = contrast_mode
        self.base_temperature = base_temperature
        self.gather_distributed = gather_distributed

    def forward(self, features: Tensor, labels: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            features: (B, V, ...) views of each sample; dims after V are flattened to D.
            labels: (B,) class ids; samples with equal labels are positives. Exclusive with `mask`.
            mask: (B, B) float/bool, mask[i, j] = 1 if sample j is a positive of anchor sample i
                (need not be symmetric). Under `gather_distributed` with W ranks: (B, W * B), the
                rows of this rank's samples against the global batch in rank order.
                Neither labels nor mask: each sample is only its own positive (SimCLR).
        Returns:
            Scalar float32 loss.
        """
        if features.dim() < 3:
            raise ValueError(
                f"features must be (batch, views, ...) with at least 3 dims, got shape {tuple(features.shape)}"
            )
        if labels is not None and mask is not None:
            raise ValueError("pass labels or mask, not both")
        batch, views = features.shape[:2]
        if labels is not None and labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},) to match features, got {tuple(labels.shape)}")

        rank, world = _world() if self.gather_distributed else (0, 1)
        if mask is not None and mask.shape != (batch, world * batch):
            raise ValueError(
                f"mask must have shape ({batch}, {world * batch}) for {batch} samples on {world} rank(s), "
                f"got {tuple(mask.shape)}"
            )

        with torch.autocast(features.device.type, enabled=False):
            local = features.flatten(2).to(_compute_dtype(features))  # (B, V, D)
            every = _gather(local) if world > 1 else local  # (G, V, D), G = world * batch
            total, offset = every.shape[0], rank * batch
            contrast = every.transpose(0, 1).reshape(views * total, -1)  # view-major: row v * G + g

            anchor_views = 1 if self.contrast_mode == "one" else views
            anchors = local[:, :anchor_views].transpose(0, 1).reshape(anchor_views * batch, -1)
            sample = offset + torch.arange(batch, device=local.device).repeat(anchor_views)  # global id
            view = torch.arange(anchor_views, device=local.device).repeat_interleave(batch)
            lse = _logsumexp_without_self(anchors, contrast, view * total + sample, self.temperature)

            # Sum of positive logits without a (N, N) mask: the contrast views of sample g summed,
            # `view_sum[g]`, then per anchor the sum over its positive samples, minus its own term.
            view_sum = every.sum(1)  # (G, D)
            if mask is None:
                if labels is None:
                    group = torch.arange(total, device=local.device)
                else:
                    every_labels = _gather(labels) if world > 1 else labels
                    group = torch.unique(every_labels, return_inverse=True)[1]
                group_sum = every.new_zeros(int(group.max()) + 1, every.shape[2])
                group_sum.index_add_(0, group, view_sum)
                positive_sum = group_sum[group[sample]]  # (A, D)
                positive_count = views * torch.bincount(group)[group[sample]].to(local.dtype)
                self_weight = torch.ones_like(positive_count)
            else:
                rows = mask.to(local.dtype)[sample - offset]  # (A, G)
                positive_sum = rows @ view_sum
                positive_count = views * rows.sum(1)
                self_weight = rows.gather(1, sample[:, None]).squeeze(1)
            positive_count = positive_count - self_weight
            positive_logits = ((anchors * positive_sum).sum(1) - self_weight * (anchors * anchors).sum(1)) / self.temperature
            denominator = torch.where(positive_count < 1e-6, torch.ones_like(positive_count), positive_count)
            mean_log_prob_pos = (positive_logits - positive_count * lse) / denominator
            return -(self.temperature / self.base_temperature) * mean_log_prob_pos.mean()


class _Blocks(NamedTuple):
    """NT-Xent input laid out for the loss; A = blocks * b anchors (this rank's rows)."""

    anchors: Tensor  # (A, D) L2-normalised, float32 (float64 for float64 input)
    every: Tensor  # (blocks, G, D): the rows of every rank, G = world * b
    local_neg: Tensor  # (blocks, b) bool
    every_neg: Tensor  # (blocks, G) bool
    block: Tensor  # (A,) block of each anchor
    sample: Tensor  # (A,) row of each anchor in G
    lse: Tensor  # (A,) log-sum-exp of the anchor's logits against every other row


def _ntxent_blocks(z: Tensor, blocks: int, negatives: Tensor | None, gather: bool, tau: float) -> _Blocks:
    """Validate the NT-Xent input, gather it across ranks if asked, and compute the denominators."""
    if z.dim() != 2 or z.shape[0] % blocks:
        raise ValueError(f"z must be (b * {blocks}, D), got shape {tuple(z.shape)}")
    b = z.shape[0] // blocks
    if negatives is None:
        negatives = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    if negatives.shape != (z.shape[0],):
        raise ValueError(f"negatives must be a bool tensor of shape ({z.shape[0]},), got {tuple(negatives.shape)}")
    rank, world = _world() if gather else (0, 1)
    local = F.normalize(z.to(_compute_dtype(z)), dim=1).view(blocks, b, -1)
    local_neg = negatives.bool().view(blocks, b)
    every, every_neg = local, local_neg
    if world > 1:
        every, every_neg = _gather(local.transpose(0, 1)).transpose(0, 1), _gather(local_neg.T).T
    total = every.shape[1]
    anchors = local.reshape(blocks * b, -1)
    block = torch.arange(blocks, device=z.device).repeat_interleave(b)
    sample = rank * b + torch.arange(b, device=z.device).repeat(blocks)
    lse = _logsumexp_without_self(anchors, every.reshape(blocks * total, -1), block * total + sample, tau)
    return _Blocks(anchors, every, local_neg, every_neg, block, sample, lse)


def _mean_over_rows(per_anchor: Tensor, valid: Tensor, n_rows: int) -> Tensor:
    """Mean over ALL rows, as the original NT-Xent: a flagged row (or one without a positive)
    counts with the constant loss log(n_rows - 1 + e) that the original's masked logits give it
    (its similarities set to 0 and its own to 1); it carries no gradient."""
    constant = math.log(n_rows - 1 + math.e)
    return torch.where(valid, per_anchor, per_anchor.new_tensor(constant)).mean()


class _NTXentLoss(nn.Module):
    """What the two NT-Xent forms share: the block layout, the temperature, the gathering."""

    def __init__(self, *, tau: float, blocks: int, gather_distributed: bool) -> None:
        super().__init__()
        self.tau = tau
        self.blocks = blocks
        self.gather_distributed = gather_distributed

    def forward(self, z: Tensor, negatives: Tensor | None = None) -> Tensor:
        """
        Args:
            z: (b * blocks, D) features, block-major.
            negatives: optional (b * blocks,) bool, True for rows that act only as negatives.
        Returns:
            Scalar float32 loss.
        """
        with torch.autocast(z.device.type, enabled=False):
            x = _ntxent_blocks(z, self.blocks, negatives, self.gather_distributed, self.tau)
            per_anchor, valid = self._per_anchor(x)
            return _mean_over_rows(per_anchor, valid, x.every.shape[0] * x.every.shape[1])

    def _per_anchor(self, x: _Blocks) -> tuple[Tensor, Tensor]:
        """Each anchor's loss (A,), and whether it counts as computed (A,) bool."""
        raise NotImplementedError


class NTXent(_NTXentLoss):
    """NT-Xent (SimCLR) loss on `blocks` blocks of paired views, cosine similarity.

    `z` holds `blocks` blocks of b rows; row k of block i and row k of its paired block are
    positives ((0, 1) for 2 blocks; (0, 1) and (2, 3) for 4). For each anchor row::

        loss_i = -log( exp(cos(z_i, z_p) / tau) / sum_{k != i} exp(cos(z_i, z_k) / tau) )

    averaged over all rows. Rows flagged in `negatives` (samples of the Negative class) are no
    anchors and no positives: they appear in the denominators, and their own term is the
    constant log(N - 1 + e) of the original (N rows in all), which keeps the original's mean
    over all rows (the gradient of the unflagged rows is scaled by their share of the rows).

    Args:
        tau: temperature.
        blocks: 2 or 4.
        gather_distributed: contrast against the rows of every rank (see module docstring).
    """

    def __init__(self, *, tau: float = 0.2, blocks: int = 4, gather_distributed: bool = False) -> None:
        if blocks not in (2, 4):
            raise ValueError(f"blocks must be 2 or 4, got {blocks}")
        super().__init__(tau=tau, blocks=blocks, gather_distributed=gather_distributed)

    def _per_anchor(self, x: _Blocks) -> tuple[Tensor, Tensor]:
        partner = (torch.arange(self.blocks, device=x.block.device) ^ 1)[x.block]  # 0 <-> 1, 2 <-> 3
        per_anchor = x.lse - (x.anchors * x.every[partner, x.sample]).sum(1) / self.tau
        return per_anchor, ~x.local_neg.reshape(-1) & ~x.every_neg[partner, x.sample]


class PairwiseNTXent(_NTXentLoss):
    """NT-Xent where row k of EVERY other block is a positive of row k (multi-positive form).

    For anchor i with positives P(i) (row k of the other blocks, unflagged)::

        loss_i = -1/|P(i)| * sum_{p in P(i)} log( exp(cos(z_i, z_p) / tau) / sum_{k != i} exp(cos(z_i, z_k) / tau) )

    averaged over all rows. With 2 blocks it equals `NTXent`. Flagged rows (`negatives`) appear
    in the denominators and count with the constant of `NTXent`.

    Args:
        blocks: number of blocks (views) in `z`, at least 2.
        tau: temperature.
        gather_distributed: contrast against the rows of every rank (see module docstring).
    """

    def __init__(self, *, blocks: int = 4, tau: float = 0.2, gather_distributed: bool = False) -> None:
        if blocks < 2:
            raise ValueError(f"blocks must be at least 2, got {blocks}")
        super().__init__(tau=tau, blocks=blocks, gather_distributed=gather_distributed)

    def _per_anchor(self, x: _Blocks) -> tuple[Tensor, Tensor]:
        kept = (~x.every_neg).to(x.anchors.dtype)  # (blocks, G)
        kept_sum = (x.every * kept[..., None]).sum(0)[x.sample]  # (A, D), the anchor itself included
        anchor_kept = (~x.local_neg.reshape(-1)).to(x.anchors.dtype)
        count = kept.sum(0)[x.sample] - anchor_kept
        positive_logits = ((x.anchors * kept_sum).sum(1) - anchor_kept * (x.anchors * x.anchors).sum(1)) / self.tau
        return x.lse - positive_logits / count.clamp(min=1), (anchor_kept > 0) & (count > 0)


def multimodal_views(s1_views: Tensor, s2_views: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Stack the two modalities along the batch axis for SupCon (S1 first).

    S1 and S2 features of the same class then attract each other, across modalities too.

    Args:
        s1_views: (B, V, D) S1 features.
        s2_views: (B, V, D) S2 features.
        labels: (B,) class ids.
    Returns:
        features (2B, V, D) = cat([s1_views, s2_views]) and labels (2B,) = cat([labels, labels]).
    """
    if s1_views.dim() != 3 or s1_views.shape != s2_views.shape:
        raise ValueError(
            "s1_views and s2_views must both be (batch, views, dim) of equal shape, got "
            f"{tuple(s1_views.shape)} and {tuple(s2_views.shape)}"
        )
    if labels.shape != (s1_views.shape[0],):
        raise ValueError(f"labels must have shape ({s1_views.shape[0]},), got {tuple(labels.shape)}")
    return torch.cat([s1_views, s2_views]), torch.cat([labels, labels])


def supcon_labels(labels: Tensor, ignore: int = IGNORE, rank: int = 0) -> Tensor:
    """SupCon labels (B,) from class labels (B,): every sample labelled `ignore` becomes a class
    of its own (its positives are its own views), so unlabelled samples never attract each other.
    `rank` keeps the ids of different ranks apart when the labels are gathered across ranks."""
    unique = -1 - rank * len(labels) - torch.arange(len(labels), device=labels.device)
    return torch.where(labels == ignore, unique, labels)


class SupConCELoss(nn.Module):
    """The method's loss: ``ce_weight * CE + sup_weight * SupCon``.

    CE: summed over the heads (one fused head, or one per modality as the original's `s1s2`
    scenario), each the mean over the samples whose CE label is not IGNORE (0 when there is
    none in the batch; the trainer counts such batches).
    SupCon on L2-normalised features, temperature = base temperature, contrast mode "all":
    ``cross_modal=True`` stacks two modalities along the batch axis (`multimodal_views`, in the
    order of ``features``, labels ``cat([y, y])``), so that S1 and S2 features of one class
    attract each other;
    ``cross_modal=False`` computes one SupCon per modality and sums them (the original's `s1s2`
    and single-modality scenarios).

    Args:
        temperature: SupCon temperature and base temperature.
        ce_weight, sup_weight: the loss weights (the original's delta_lin / cross_delta and
            delta_sup / sup_delta).
        use_supcon: False gives CE alone.
        cross_modal: see above.
        gather_distributed: SupCon over the features of every rank (see `SupConLoss`).
    """

    def __init__(self, *, temperature: float = 0.07, ce_weight: float = 1.0, sup_weight: float = 1.0,
                 use_supcon: bool = True, cross_modal: bool = True, gather_distributed: bool = False) -> None:
        super().__init__()
        self.ce_weight, self.sup_weight, self.cross_modal = ce_weight, sup_weight, cross_modal
        self.supcon = SupConLoss(temperature, "all", temperature, gather_distributed) if use_supcon else None

    def forward(self, features: dict[str, Tensor], logits: dict[str, Tensor], labels: Tensor,
                ce_labels: Tensor | None = None) -> dict[str, Tensor]:
        """
        Args:
            features: modality -> (B, V, D) features (normalised here).
            logits: head -> (B, K).
            labels: (B,) class ids for SupCon; IGNORE entries become classes of their own.
            ce_labels: (B,) CE targets (default `labels`); IGNORE entries are skipped.
        Returns:
            {"loss", "ce", "supcon" (when used)}: scalar float32 tensors (float64 for float64
            inputs), and "ce_samples": the
            number of samples with a CE target (a float tensor, for the trainer's check).
        """
        targets = labels if ce_labels is None else ce_labels
        counted = (targets != IGNORE).sum()
        valid = counted.clamp(min=1)
        ce = sum(F.cross_entropy(l.to(_compute_dtype(l)), targets, ignore_index=IGNORE, reduction="sum") / valid for l in logits.values())
        terms = {"ce": ce}
        total = self.ce_weight * ce
        if self.supcon is not None:
            normed = {m: F.normalize(f.to(_compute_dtype(f)), dim=-1) for m, f in features.items()}
            ids = supcon_labels(labels, rank=_world()[0] if self.supcon.gather_distributed else 0)
            if self.cross_modal and len(normed) == 2:
                stacked, stacked_ids = multimodal_views(*normed.values(), ids)  # in the model's modality order
                sup = self.supcon(stacked, stacked_ids)
            else:
                sup = sum(self.supcon(f, ids) for f in normed.values())
            terms["supcon"] = sup
            total = total + self.sup_weight * sup
        terms["loss"] = total
        terms["ce_samples"] = counted.float()
        return terms
