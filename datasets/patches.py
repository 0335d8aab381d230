"""Windows of S1 / S2 / label-map patches (DFC2020, SEN12MS, manifests) from any source.

``"label"``: the window's majority class (IGNORE when ignore pixels win); ``"multilabel"``: the
classes covering >= 10 % of it. Windows: random per (seed, epoch, index) in training, else centred,
or at an offset drawn once per patch from ``offset_seed``. ``normalize="seed"``, the released
DualResNet50's recipe: S1 NaN -> 0 dB, clip [-25, 0] dB (-inf -> -25, +inf -> 0, as the original's
``np.clip``) + 25, S2 clip [0, 10000], each channel / (its window maximum + 1e-5). ``"none"``: S1 dB
and raw S2, non-finite -> 0.
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

from util.seeding import keyed_generator

from .base import IGNORE, CropError, DataFileError, PairedDataset, log_summary
from .labels import DFC_CLASSES, LabelCodes, class_map, labels_of_map
from .packed import INDEX

logger = logging.getLogger("datasets")
NORMALIZATIONS = ("seed", "ssl4eo", "none")
# The input scaling of TorchGeo's SSL4EO-S12 ResNets (torchgeo/models/resnet.py): S1 VV, VH in dB.
SSL4EO_S1_MEAN = (-12.59, -20.26)
SSL4EO_S1_STD = (5.26, 5.91)
SSL4EO_S2_SCALE = 10000.0


def seed_normalize(x: Tensor) -> Tensor:
    """Each channel of ``x`` (C, H, W) or (B, C, H, W), non-negative, / (its maximum + 1e-5): the last
    step of the seed recipe, on the image the network sees (the crop, or an augmented view)."""
    if x.ndim not in (3, 4):
        raise ValueError(f"seed_normalize expects an image (C, H, W) or a batch (B, C, H, W), "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"seed_normalize expects a floating-point tensor, got {x.dtype}")
    return x / (x.amax(dim=(-2, -1), keepdim=True) + 1e-5)


def ssl4eo_normalize(s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    """S1 dB standardised per band, S2 / 10000, (C, H, W) or batched, as TorchGeo's SSL4EO-S12 weights
    expect; no clipping; non-finite values -> 0 after scaling (S1: the band mean)."""
    if s1.ndim not in (3, 4) or s1.shape[-3] != len(SSL4EO_S1_MEAN):
        raise ValueError(f"ssl4eo_normalize expects S1 of shape (2, H, W) or (B, 2, H, W) (VV, VH), "
                         f"got {tuple(s1.shape)}")
    shape = (len(SSL4EO_S1_MEAN), 1, 1)
    mean = torch.tensor(SSL4EO_S1_MEAN, dtype=s1.dtype, device=s1.device).view(shape)
    std = torch.tensor(SSL4EO_S1_STD, dtype=s1.dtype, device=s1.device).view(shape)
    return (torch.nan_to_num((s1 - mean) / std, nan=0.0, posinf=0.0, neginf=0.0),
            torch.nan_to_num(s2 / SSL4EO_S2_SCALE, nan=0.0, posinf=0.0, neginf=0.0))


def _divide_by_maxima(x: np.ndarray, maxima: np.ndarray) -> Tensor:
    """``seed_normalize`` in place on a fresh float32 array whose channel maxima are known."""
    t = torch.from_numpy(x)
    return t.div_(torch.from_numpy(maxima.astype(np.float32)).view(-1, 1, 1).add_(1e-5))


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

    def __init__(self, crop: int | None, train: bool, normalize: str, return_label_map: bool, seed: int,
                 offset_seed: int | None) -> None:
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

    def _s1(self, raw: np.ndarray, name: str, index: int) -> Tensor:
        """S1 (C, h, w) in dB -> float32, normalised but for ``ssl4eo``; non-finite values counted."""
        x = np.array(raw, dtype=np.float32)
        nan = None
        if raw.dtype.kind == "f" and not np.isfinite(x.sum()):
            how = {"seed": "NaN by 0 dB, +-inf clipped to 0 / -25 dB", "ssl4eo": "0 after SSL4EO scaling", "none": "0"}
            mask = self._count_nonfinite(torch.from_numpy(x), name, how[self.normalize], index, 0).numpy()
            nan = np.isnan(x) if self.normalize == "seed" else mask
        if self.normalize != "seed":
            if nan is not None and self.normalize == "none":
                x[nan] = 0.0
            return torch.from_numpy(x)
        np.clip(x, -25.0, 0.0, out=x)
        x += 25.0
        if nan is not None:
            x[nan] = 25.0  # NaN -> 0 dB before clipping
        return _divide_by_maxima(x, x.max(axis=(1, 2)))

    def _s2(self, raw: np.ndarray, name: str, index: int) -> Tensor:
        """S2 (C, h, w) window (uint16 reflectance x 10000) -> float32, normalised but for ``ssl4eo``."""
        if raw.dtype.kind != "u" or self.normalize != "seed":
            x = np.array(raw, dtype=np.float32)
            if raw.dtype.kind == "f" and not np.isfinite(x.sum()):
                how = {"seed": "NaN by 0, +-inf clipped", "ssl4eo": "0 after SSL4EO scaling", "none": "0"}
                mask = self._count_nonfinite(torch.from_numpy(x), name, how[self.normalize], index, 1).numpy()
                if self.normalize != "ssl4eo":
                    x[np.isnan(x) if self.normalize == "seed" else mask] = 0.0
            if self.normalize != "seed":
                return torch.from_numpy(x)
            np.clip(x, 0.0, 10000.0, out=x)
            return _divide_by_maxima(x, x.max(axis=(1, 2)))
        x = raw.astype(np.float32)
        maxima = x.max(axis=(1, 2))  # on the contiguous copy: faster than on a window of the memory map
        if maxima.max() > 10000:  # a cloud above the L1C range: clip (unsigned: nothing below 0)
            np.minimum(x, 10000.0, out=x)
            maxima = np.minimum(maxima, 10000)
        return _divide_by_maxima(x, maxima)

    def normalized(self, s1: np.ndarray, s2: np.ndarray, names: tuple[str, str],
                   index: int) -> tuple[Tensor, Tensor]:
        """The network's inputs (C, h, w) float32 of the windows read from ``names``, by ``normalize``."""
        x1, x2 = self._s1(s1, names[0], index), self._s2(s2, names[1], index)
        return ssl4eo_normalize(x1, x2) if self.normalize == "ssl4eo" else (x1, x2)

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
