"""Label maps of DFC2020 and SEN12MS: raw codes -> the 8 classes of SSLTransformerRS, and the
sample labels of a window (the original's majority rule, and the multi-label rule)."""
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .base import IGNORE, DataFileError

DFC_CLASSES = ["Forest", "Shrubland", "Grassland", "Wetlands", "Croplands", "Urban/Built-up", "Barren", "Water"]
# DFC codes 1-10 -> 8-class index; Savanna (3), Snow/Ice (8), 0 and 255 -> ignore.
_DFC_TO_CLASS = np.full(256, IGNORE, dtype=np.uint8)
_DFC_TO_CLASS[[1, 2, 4, 5, 6, 7, 9, 10]] = np.arange(8)
_IGBP_TO_DFC = np.array([0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 6, 8, 9, 10])
_IGBP_TO_CLASS = np.full(256, IGNORE, dtype=np.uint8)
_IGBP_TO_CLASS[: len(_IGBP_TO_DFC)] = _DFC_TO_CLASS[_IGBP_TO_DFC]


_UNDOCUMENTED = 254  # never a class index: marks undocumented codes in ``LabelCodes.checked``


class LabelCodes(NamedTuple):
    """A label source: raw code -> class lookup (256,) uint8, and the raw codes it documents
    (others mean a foreign or broken file, refused rather than ignored)."""

    lut: np.ndarray
    codes: np.ndarray
    description: str
    checked: np.ndarray  # ``lut`` with undocumented codes -> _UNDOCUMENTED: one lookup maps and checks

    @property
    def ignored(self) -> np.ndarray:
        """The documented codes that map to IGNORE (e.g. DFC Savanna 3 and Snow/Ice 8)."""
        return self.codes[self.lut[self.codes] == IGNORE]


def _codes(lut: np.ndarray, codes: np.ndarray, description: str) -> LabelCodes:
    checked = np.full(256, _UNDOCUMENTED, dtype=np.uint8)
    checked[codes] = lut[codes]
    return LabelCodes(lut, codes, description, checked)


LABEL_CODES = {
    "dfc": _codes(_DFC_TO_CLASS, np.r_[0:11, 255], "DFC codes 1-10, or 0 / 255 for no label"),
    "lc": _codes(_IGBP_TO_CLASS, np.r_[0:18, 255], "IGBP codes 1-17, or 0 / 255 for no data"),
}


def class_map(raw: np.ndarray, path: str, labels: LabelCodes) -> np.ndarray:
    """The class map (h, w) uint8 of a raw label band (h, w) read from ``path``; a non-integer dtype
    or codes outside ``labels.codes`` raise ``DataFileError`` listing the codes and pixel counts."""
    if raw.dtype == np.uint8:
        mapped = labels.checked.take(raw)
        if not (mapped == _UNDOCUMENTED).any():
            return mapped
    if raw.dtype.kind not in "ui":
        raise DataFileError(f"{path}: expected an integer label map ({labels.description}), found dtype {raw.dtype}")
    if raw.size and (int(raw.min()) < 0 or int(raw.max()) >= len(labels.lut)):
        bad = ~np.isin(raw, labels.codes)
    else:
        valid = np.zeros(len(labels.lut), dtype=bool)
        valid[labels.codes] = True
        bad = ~valid[raw]
    if bad.any():
        codes, counts = np.unique(raw[bad], return_counts=True)
        found = ", ".join(f"{code}: {count}" for code, count in zip(codes[:10].tolist(), counts[:10].tolist()))
        more = f" and {len(codes) - 10} more codes" if len(codes) > 10 else ""
        raise DataFileError(f"{path}: label codes outside {labels.description} (code: pixels): {found}{more}")
    return labels.lut[raw]


def labels_of_map(label_map: np.ndarray, classes: int = len(DFC_CLASSES)) -> tuple[int, Tensor]:
    """Majority label (ignore included: IGNORE if it wins; ties to the lower index) and the
    multi-hot (classes,) of the classes covering at least 10 % of all pixels."""
    counts = np.bincount(label_map.ravel(), minlength=256)
    multilabel = torch.from_numpy(counts[:classes] >= 0.1 * label_map.size).float()
    return int(counts.argmax()), multilabel
