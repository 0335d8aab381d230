"""SupCon and the NT-Xent forms of pre-training. They compute in float32 also under autocast (float64 stays float64,
for gradcheck) and build no (N, N) mask; `gather_distributed` contrasts each rank's anchors with the features of every
rank, which needs equal batch sizes on all ranks (docs/modules.md)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as dist_fc
import torch.nn.functional as F
from torch import Tensor, nn

from util.labels import IGNORE


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _gather(x: Tensor) -> Tensor:
    """`x` of every rank along dim 0 in rank order, differentiable when floating. Not the legacy
    torch.distributed.nn.functional.all_gather: wrong gradients on gloo for the transposed layouts here (torch 2.14)."""
    if x.is_floating_point():
        return dist_fc.all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _logsumexp_without_self(anchors: Tensor, contrast: Tensor, self_idx: Tensor, temperature: float) -> Tensor:
    """(A,) log sum_{k != self} exp(a . c_k / T) of anchors (A, D) against contrast (N, D), which holds anchor a at
    row self_idx[a]. The self term is set to -inf in place: the (A, N) logits are the loss's only quadratic tensor."""
    logits = (anchors / temperature) @ contrast.T  # scaling the (A, D) side saves an (A, N) temporary
    logits.scatter_(1, self_idx[:, None], float("-inf"))
    return torch.logsumexp(logits, dim=1)


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020); SimCLR when neither labels nor mask is given. Per anchor i,
    loss_i = -(T / T_base) / |P(i)| * sum_{p in P(i)} log(exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T)), with P(i)
    the other views of the samples sharing i's label (or as `mask` says), averaged over the anchors: every view, or
    view 0 alone with contrast_mode "one". An anchor without positives adds 0 and still counts, as the public reference
    implementation (never NaN). Features are used as given: L2-normalise them first."""

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
        """features (B, V, ...) flattened to (B, V, D); labels (B,), or mask (B, B) float/bool with mask[i, j] = 1 when
        sample j is a positive of anchor i (need not be symmetric; (B, W * B) against the global batch in rank order
        under `gather_distributed` with W ranks). Returns the scalar float32 loss."""
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

            # Positive logits without an (N, N) mask: view sums per sample, summed over the positives, minus self.
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
            positive_logits = ((anchors * positive_sum).sum(1)
                               - self_weight * (anchors * anchors).sum(1)) / self.temperature
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
    """Mean over ALL rows as the original NT-Xent: a flagged row (or one without a positive) counts with the constant
    log(n_rows - 1 + e) that the original's masked logits give it (similarities 0, its own 1), without gradient."""
    constant = math.log(n_rows - 1 + math.e)
    return torch.where(valid, per_anchor, per_anchor.new_tensor(constant)).mean()


class _NTXentLoss(nn.Module):
    def __init__(self, *, tau: float, blocks: int, gather_distributed: bool) -> None:
        super().__init__()
        self.tau = tau
        self.blocks = blocks
        self.gather_distributed = gather_distributed

    def forward(self, z: Tensor, negatives: Tensor | None = None) -> Tensor:
        """z (b * blocks, D) block-major; negatives (b * blocks,) bool marks rows that are only negatives."""
        with torch.autocast(z.device.type, enabled=False):
            x = _ntxent_blocks(z, self.blocks, negatives, self.gather_distributed, self.tau)
            per_anchor, valid = self._per_anchor(x)
            return _mean_over_rows(per_anchor, valid, x.every.shape[0] * x.every.shape[1])

    def _per_anchor(self, x: _Blocks) -> tuple[Tensor, Tensor]:
        """Each anchor's loss (A,), and whether it counts as computed (A,) bool."""
        raise NotImplementedError


class NTXent(_NTXentLoss):
    """NT-Xent (SimCLR), cosine similarity: row k of block i and of its paired block ((0, 1), (2, 3)) are positives,
    loss_i = -log(exp(cos(z_i, z_p) / tau) / sum_{k != i} exp(cos(z_i, z_k) / tau)), averaged over all N rows. Rows
    flagged in `negatives` (the Negative class) are no anchors or positives but stay in the denominators; each counts
    with the original's constant log(N - 1 + e): its mean over all rows (the others' gradients scale by their share)."""

    def __init__(self, *, tau: float = 0.2, blocks: int = 4, gather_distributed: bool = False) -> None:
        if blocks not in (2, 4):
            raise ValueError(f"blocks must be 2 or 4, got {blocks}")
        super().__init__(tau=tau, blocks=blocks, gather_distributed=gather_distributed)

    def _per_anchor(self, x: _Blocks) -> tuple[Tensor, Tensor]:
        partner = (torch.arange(self.blocks, device=x.block.device) ^ 1)[x.block]  # 0 <-> 1, 2 <-> 3
        per_anchor = x.lse - (x.anchors * x.every[partner, x.sample]).sum(1) / self.tau
        return per_anchor, ~x.local_neg.reshape(-1) & ~x.every_neg[partner, x.sample]


class PairwiseNTXent(_NTXentLoss):
    """Multi-positive NT-Xent: row k of EVERY other block is a positive; loss_i is the mean of NTXent's term over the
    unflagged positives P(i). Equals `NTXent` with 2 blocks; flagged rows are treated as there."""

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
    """(B, V, D) S1 and S2 features, (B,) labels -> (2B, V, D) = cat([s1, s2]) and (2B,) = cat([labels, labels]):
    in SupCon, S1 and S2 features of one class then attract each other, across modalities too."""
    if s1_views.dim() != 3 or s1_views.shape != s2_views.shape:
        raise ValueError(
            "s1_views and s2_views must both be (batch, views, dim) of equal shape, got "
            f"{tuple(s1_views.shape)} and {tuple(s2_views.shape)}"
        )
    if labels.shape != (s1_views.shape[0],):
        raise ValueError(f"labels must have shape ({s1_views.shape[0]},), got {tuple(labels.shape)}")
    return torch.cat([s1_views, s2_views]), torch.cat([labels, labels])


def supcon_labels(labels: Tensor, ignore: int = IGNORE, rank: int = 0) -> Tensor:
    """(B,) labels where each `ignore` sample is a class of its own (its positives are its own views), so unlabelled
    samples never attract each other; `rank` keeps the ids of ranks apart when labels are gathered."""
    unique = -1 - rank * len(labels) - torch.arange(len(labels), device=labels.device)
    return torch.where(labels == ignore, unique, labels)


class SupConCELoss(nn.Module):
    """``ce_weight * CE + sup_weight * SupCon``, the original's delta_lin / cross_delta and delta_sup / sup_delta. CE:
    per head (one fused, or one per modality as the original's `s1s2`) the mean over non-IGNORE targets (0 if none),
    summed. SupCon (T = T_base, mode "all") on L2-normalised features: `cross_modal` stacks two modalities in the order
    of `features` (`multimodal_views`); else one SupCon per modality, summed (the original's `s1s2`, `s1`, `s2`)."""

    def __init__(self, *, temperature: float = 0.07, ce_weight: float = 1.0, sup_weight: float = 1.0,
                 use_supcon: bool = True, cross_modal: bool = True, gather_distributed: bool = False) -> None:
        super().__init__()
        self.ce_weight, self.sup_weight, self.cross_modal = ce_weight, sup_weight, cross_modal
        self.supcon = SupConLoss(temperature, "all", temperature, gather_distributed) if use_supcon else None

    def forward(self, features: dict[str, Tensor], logits: dict[str, Tensor], labels: Tensor,
                ce_labels: Tensor | None = None) -> dict[str, Tensor]:
        """features {modality: (B, V, D)} (normalised here), logits {head: (B, K)}, labels (B,) (IGNORE: own class),
        ce_labels (B,) (default `labels`; IGNORE skipped) -> scalars "loss", "ce", "supcon" if used, "ce_samples"."""
        targets = labels if ce_labels is None else ce_labels
        counted = (targets != IGNORE).sum()
        valid = counted.clamp(min=1)
        ce = sum(F.cross_entropy(x.to(_compute_dtype(x)), targets, ignore_index=IGNORE, reduction="sum") / valid
                 for x in logits.values())
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
