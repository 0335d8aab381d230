"""Paired Sentinel-1 / Sentinel-2 data sets: METER-ML, DFC2020, SEN12MS, manifests (docs/modules.md)."""
from pathlib import Path

from .base import IGNORE, CropError, DataFileError, balanced_indices
from .dfc2020 import DFC2020Dataset
from .labels import DFC_CLASSES
from .manifest import ManifestDataset, is_manifest
from .meterml import MeterMLDataset, split_overlap
from .normalization import NORMALIZATIONS, band_statistics, normalize, seed_normalize, ssl4eo_normalize
from .packed import packed_index
from .patches import L1C_BANDS, L2A_BANDS, PatchDataset
from .sen12ms import SEASONS, SEN12MSDataset

__all__ = [
    "IGNORE", "CropError", "DataFileError", "balanced_indices", "DFC2020Dataset", "DFC_CLASSES", "ManifestDataset",
    "is_manifest", "MeterMLDataset", "split_overlap", "packed_index", "NORMALIZATIONS", "PatchDataset",
    "seed_normalize", "ssl4eo_normalize", "normalize", "band_statistics", "L1C_BANDS", "L2A_BANDS",
    "SEASONS", "SEN12MSDataset", "patch_dataset",
]


def patch_dataset(root: str | Path, split: str | None, *, classes: list[str] | None = None,
                  s2_bands: list[str] | None = None, **kwargs) -> PatchDataset:
    """A manifest's split when ``root`` is a CSV (or a packed one), its labels numbered by ``classes`` when
    given and its S2 bands named by ``s2_bands``; else DFC2020's (fixed classes and bands)."""
    if is_manifest(root):
        return ManifestDataset(root, split, classes=classes, s2_bands=s2_bands, **kwargs)
    return DFC2020Dataset(root, split, **kwargs)
