"""What every data set shares: errors, the ignore label, the epoch, per-item draws, fault counts."""
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from util.labels import IGNORE
from util.seeding import keyed_generator

logger = logging.getLogger("datasets")


class DataFileError(ValueError):
    """A data file that cannot be read or has the wrong shape; the message names the file."""


class CropError(ValueError):
    """A crop larger than the data set's patches; the message names both sizes."""


class SharedCounter:
    """A count DataLoader workers add to: a shared-memory slot per worker (0: main), so adds never race."""

    def __init__(self, slots: int = 64) -> None:
        self._slots = torch.zeros(slots, dtype=torch.int64).share_memory_()

    def add(self, n: int) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (len(self._slots) - 1)
        self._slots[slot] += n

    @property
    def value(self) -> int:
        return int(self._slots.sum())


def log_summary(name: str, kept: int, total: int, skipped: dict[str, int], detail: str = "") -> None:
    if any(skipped.values()):
        reasons = ", ".join(f"{reason}: {count}" for reason, count in skipped.items())
        logger.warning("%s: %d of %d samples kept; skipped %s%s", name, kept, total, reasons, detail)
    else:
        logger.info("%s: %d samples", name, kept)


class PairedDataset(Dataset):
    """Epoch, per-item generator and fault counts of the S1 / S2 data sets.

    Draws come from ``keyed_generator(seed, epoch, index)``, whichever worker loads the item; the
    epoch is in shared memory, so persistent workers see ``set_epoch``. Non-finite counts are shared
    too; two workers reading one item at once may undercount its cell.
    """

    NONFINITE_KINDS = ("nan", "+inf", "-inf")

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._nonfinite = torch.zeros((0, 2, 3), dtype=torch.int64)
        self._all_zero_patches = SharedCounter()
        self._nonfinite_logged = False
        self._all_zero_logged = False

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def _init_counts(self, n: int) -> None:
        self._nonfinite = torch.zeros((n, 2, len(self.NONFINITE_KINDS)), dtype=torch.int64).share_memory_()

    @property
    def nonfinite_counts(self) -> Tensor:
        """(items, 2, 3) int64: NaN, +inf, -inf values met so far in each item's S1 and S2 (every read)."""
        return self._nonfinite

    @property
    def nonfinite_pixels(self) -> int:
        return int(self._nonfinite.sum())

    @property
    def nan_pixels(self) -> int:
        return int(self._nonfinite[..., 0].sum())

    def source_name(self, index: int, modality: int) -> str:
        """The file of item ``index``'s S1 (modality 0) or S2 (1) image, for reports."""
        raise NotImplementedError

    def nonfinite_by_file(self, counts: Tensor | None = None) -> dict[str, dict[str, int]]:
        """file -> {"nan", "+inf", "-inf"} of the files with one met (``counts``: the sum over ranks)."""
        counts = self._nonfinite if counts is None else counts
        return {
            self.source_name(index, modality): dict(zip(self.NONFINITE_KINDS, counts[index, modality].tolist()))
            for index, modality in (counts.sum(-1) > 0).nonzero().tolist()
        }

    @property
    def all_zero_patches(self) -> int:
        """Samples read so far (all workers) whose S1 or S2 window was zero everywhere."""
        return self._all_zero_patches.value

    def _generator(self, index: int) -> torch.Generator:
        return keyed_generator(self.seed, self.epoch, index)

    def _count_nonfinite(self, x: Tensor, path: str | Path, replacement: str, index: int, modality: int) -> Tensor:
        """Mask of the non-finite values of ``x`` (``modality`` 0 S1, 1 S2, read from ``path``), counted by kind
        (``_add_nonfinite``)."""
        nonfinite = ~torch.isfinite(x)
        count = int(nonfinite.sum())
        if count:
            nan = int(torch.isnan(x).sum())
            positive = int((x == float("inf")).sum())
            counts = np.zeros((2, 3), dtype=np.int64)
            counts[modality] = nan, positive, count - nan - positive
            self._add_nonfinite(counts, [path] * 2, [replacement] * 2, index)
        return nonfinite

    def _add_nonfinite(self, counts: np.ndarray, names: Sequence[str], replacements: Sequence[str],
                       index: int) -> None:
        """Add a window's (2, 3) NaN, +inf, -inf counts of S1, S2 (read from ``names``) to item ``index``;
        logged the first time in this process."""
        if not counts.any():
            return
        self._nonfinite[index] += torch.from_numpy(counts)
        if not self._nonfinite_logged:
            self._nonfinite_logged = True
            modality = 0 if counts[0].any() else 1
            count, nan = int(counts[modality].sum()), int(counts[modality, 0])
            logger.warning(
                "%d non-finite values (NaN: %d, +-inf: %d) in %s, replaced by %s; further ones are "
                "replaced and counted in %s.nonfinite_pixels without more messages",
                count, nan, count - nan, names[modality], replacements[modality], type(self).__name__,
            )

    def _count_all_zero(self, zero: Sequence[str | Path]) -> None:
        """Count a sample once when some of its images (``zero``: their files) are zero everywhere."""
        if zero:
            self._all_zero_patches.add(1)
            if not self._all_zero_logged:
                self._all_zero_logged = True
                logger.warning(
                    "all-zero image %s (kept: such images occur at scene edges); further ones are "
                    "counted in %s.all_zero_patches without more messages",
                    zero[0], type(self).__name__,
                )


def balanced_indices(labels: Tensor, ignore: int = IGNORE) -> Tensor:
    """Indices (M,) of one ``--balanced_class`` epoch: an item of class c max(1, round(N / (2.9 n_c)))
    times (halves up; N, n_c: labelled items, of class c), an ``ignore`` item once. On DFC2020's validation
    split: the original's ``splits/validation_observations_balanced_classes.csv`` (2,618 rows)."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
    labelled = labels != ignore
    total = int(labelled.sum())
    counts = torch.bincount(labels[labelled], minlength=1)
    # round(10 N / (29 n_c)) with halves up, in integers
    copies = ((20 * total + 29 * counts) // (58 * counts.clamp(min=1))).clamp(min=1)
    per_item = torch.where(labelled, copies[labels.clamp(0, len(copies) - 1)], torch.ones_like(labels))
    return torch.repeat_interleave(torch.arange(len(labels)), per_item)
