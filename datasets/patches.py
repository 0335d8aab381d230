"""Windows of S1 / S2 / label-map patches (DFC2020, SEN12MS, manifests) from any source.

``"label"``: the window's majority class (IGNORE when ignore pixels win); ``"multilabel"``: the
classes covering >= 10 % of it. Windows: random per (seed, epoch, index) in training, else centred,
or at an offset drawn once per patch from ``offset_seed``. Pixels become the network's inputs by
``normalization.normalize`` (``normalize=``: "seed", the original's, by default).
"""
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.windows import Window
from torch import Tensor
from tqdm import tqdm

from util.labels import L1C_BANDS, L2A_BANDS
from util.seeding import keyed_generator

from .base import IGNORE, CropError, DataFileError, PairedDataset, log_summary
from .labels import DFC_CLASSES, LabelCodes, class_map, labels_of_map
from .normalization import NORMALIZATIONS, REPLACEMENTS, band_statistics, check_recipe, normalize
from .packed import INDEX

logger = logging.getLogger("datasets")
# Sentinel-2 band names in the order of DFC2020 / SEN12MS (L1C); L2A products have no B10.
DEFAULT_S2_BANDS = {13: L1C_BANDS, 12: L2A_BANDS}
STATS_PATCHES = 1000  # at most this many whole patches, evenly spread, give --normalize stats


class PatchDataset(PairedDataset):
    """A subclass sets ``source`` (``TiffSource`` or ``PackedSource``: keys "s1", "s2", "label"),
    ``patch_ids``, ``_offset_keys`` (non-negative ints per patch, for ``offset_seed``), ``label_codes``
    and ``classes``, then calls ``_finish``."""

    classes: list[str] = DFC_CLASSES
    IGNORE = IGNORE
    label_codes: LabelCodes
    patch_ids: list[Any]
    _offset_keys: list[tuple[int, ...]]
    _keys = ("s1", "s2", "label")  # what the source holds per patch
    bands = {"s1": 2, "s2": 13}
    s2_band_names: list[str] = list(L1C_BANDS)
    unreadable = 0  # loads replaced by another patch (SEN12MSDataset counts them)

    def __init__(self, crop: int | None, train: bool, normalize: str, return_label_map: bool, seed: int,
                 offset_seed: int | None, norm_stats: dict[str, list[float]] | None = None) -> None:
        super().__init__(seed)
        if crop is not None and crop <= 0:
            raise ValueError(f"crop must be a positive number of pixels or None, got {crop}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if offset_seed is not None and (train or not isinstance(offset_seed, int) or offset_seed < 0):
            raise ValueError(f"offset_seed must be None or a non-negative int, and only with train=False (training "
                             f"windows are random per seed, epoch and index); got offset_seed={offset_seed!r}, "
                             f"train={train}")
        self.crop, self.train, self.normalize = crop, train, normalize
        self.return_label_map, self.offset_seed = return_label_map, offset_seed
        # "stats": given (an evaluation split takes its training split's), else computed in _finish
        self.norm_stats = norm_stats if normalize == "stats" else None
        self._majority: Tensor | None = None
        self.label_summary: dict[str, Any] | None = None  # set by label_report

    def __len__(self) -> int:
        return len(self.patch_ids)

    def _finish(self, root: Path, name: str, total: int, skipped: dict[str, int]) -> None:
        """``CropError`` before any item is read; logs what was skipped and the unreadable packed rows."""
        if not self.patch_ids:
            raise ValueError(f"{name} under {root}: no complete patch (skipped: {skipped})")
        self.skipped = skipped
        self._patch_size, self._patch_size_source = self.source.patch_size()
        if self.crop is not None and self.crop > min(self._patch_size):
            height, width = self._patch_size
            raise CropError(f"a crop of {self.crop} px does not fit the {height} x {width} px patches of {root}")
        bad = self.source.unreadable(self._keys)
        if bad:
            logger.warning("%s: %d of %d patches had a file that could not be read when packed; loading them raises "
                           "the packing-time error, as the files themselves would (messages in %s)",
                           root, bad, len(self), root / INDEX)
        self._init_counts(len(self.patch_ids))
        log_summary(name, len(self.patch_ids), total, skipped)
        check_recipe(self.normalize, self.bands, self.norm_stats)
        if self.normalize == "stats" and self.norm_stats is None:
            self.norm_stats = self.band_statistics()

    def band_statistics(self) -> dict[str, list[float]]:
        """Per-band mean and std of S1 and S2 (``normalization.band_statistics``) over the whole patches,
        up to STATS_PATCHES of them evenly spread; patches whose files cannot be read are left out."""
        picked = np.unique(np.linspace(0, len(self) - 1, min(len(self), STATS_PATCHES)).round().astype(int))
        unreadable: list[str] = []

        def windows():
            for i in tqdm(picked.tolist(), desc="band statistics", leave=False, disable=None):
                try:
                    arrays, _ = self.source.read(i, None, ("s1", "s2"))
                except DataFileError as error:
                    unreadable.append(str(error))
                    continue
                yield arrays["s1"], arrays["s2"]

        stats = band_statistics(windows())
        if unreadable:
            logger.warning("band statistics: %d of %d patches left out, unreadable (first: %s)", len(unreadable),
                           len(picked), unreadable[0])
        logger.info("band statistics of %d whole patches: S1 mean %s, S2 mean %s", len(picked) - len(unreadable),
                    [round(v, 2) for v in stats["s1_mean"]], [round(v, 1) for v in stats["s2_mean"]])
        return stats

    def source_name(self, index: int, modality: int) -> str:
        return self.source.name(index, ("s1", "s2")[modality])

    def _window(self, index: int, generator: torch.Generator, height: int, width: int, path: str) -> Window:
        if self.crop is None:
            if (height, width) != self._patch_size:
                raise DataFileError(f"{path}: patch of {height} x {width} px, but the data set's patches are "
                                    f"{self._patch_size} px (height, width; from {self._patch_size_source}); whole "
                                    "patches must share one size (or pass crop=)")
            return Window(0, 0, width, height)
        if self.crop > min(height, width):
            raise DataFileError(f"{path}: patch of {height} x {width} px is smaller than crop={self.crop}")
        if self.train or self.offset_seed is not None:
            draws = generator if self.train else keyed_generator(self.offset_seed, *self._offset_keys[index])
            # The original's np.random.randint(0, 256 - crop): offsets 0 .. size - crop - 1, never the last.
            top = int(torch.randint(max(1, height - self.crop), (1,), generator=draws))
            left = int(torch.randint(max(1, width - self.crop), (1,), generator=draws))
        else:
            top, left = (height - self.crop) // 2, (width - self.crop) // 2
        return Window(left, top, self.crop, self.crop)

    def normalized(self, s1: np.ndarray, s2: np.ndarray, names: tuple[str, str],
                   index: int) -> tuple[Tensor, Tensor]:
        """The network's inputs (C, h, w) float32 of the windows read from ``names``, by ``normalize``
        (``normalization.normalize``); the non-finite values met are counted for item ``index``."""
        x1, x2, counts = normalize(s1, s2, self.normalize, self.norm_stats)
        self._add_nonfinite(counts, names, REPLACEMENTS[self.normalize], index)
        return x1, x2

    def __getitem__(self, index: int) -> dict[str, Any]:
        arrays, names = self.source.read(index, lambda h, w, path: self._window(index, self._generator(index), h, w,
                                                                                path))
        label_map = class_map(arrays["label"], names["label"], self.label_codes)
        self._count_all_zero([names[m] for m in ("s1", "s2") if not arrays[m].any()])  # before clipping
        label, multilabel = labels_of_map(label_map, len(self.classes))
        s1, s2 = self.normalized(arrays["s1"], arrays["s2"], (names["s1"], names["s2"]), index)
        item: dict[str, Any] = {"s1": s1, "s2": s2, "label": label, "multilabel": multilabel,
                                "id": self.patch_ids[index]}
        if self.return_label_map:
            item["label_map"] = torch.from_numpy(label_map.astype(np.int64))
        return item

    def label_report(self) -> dict[str, Any]:
        """Every whole label map read once: majority labels (``patch_labels``), the patches and pixels
        left out; undocumented codes raise ``DataFileError`` here, before a run starts."""
        majority = torch.empty(len(self), dtype=torch.int64)
        pixels: Counter[int] = Counter()
        ignored_codes = self.label_codes.ignored
        for i in tqdm(range(len(self)), desc="labels", leave=False, disable=None):
            arrays, names = self.source.read(i, None, ("label",))
            raw = arrays["label"]
            label_map = class_map(raw, names["label"], self.label_codes)
            majority[i] = labels_of_map(label_map, len(self.classes))[0]
            codes = np.bincount(raw.ravel().astype(np.int64), minlength=256)
            pixels.update({int(c): int(codes[c]) for c in ignored_codes if c < len(codes) and codes[c]})
        self._majority = majority
        self.label_summary = {"patches": len(self), "ignored_label_patches": int((majority == IGNORE).sum()),
                              "ignored_pixels_by_code": {str(code): n for code, n in sorted(pixels.items())}}
        return self.label_summary

    def patch_labels(self) -> Tensor:
        """Majority label (N,) int64 of every whole patch, e.g. for class-balanced sampling."""
        if self._majority is None:
            self.label_report()
        return self._majority
