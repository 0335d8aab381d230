"""Paired Sentinel-1 / Sentinel-2 datasets: METER-ML, DFC2020 and SEN12MS, as distributed.

Every item is a dict with ``"s1"`` (2, H, W) and ``"s2"`` (C, H, W) float32 tensors, a ``"label"``,
a ``"multilabel"`` float32 multi-hot vector and the sample's ``"id"``.

Randomness (random crops, ``transform``) comes from a ``torch.Generator`` seeded from
(seed, epoch, index) only: the draws do not depend on the DataLoader worker that loads the item,
differ between items and epochs, and a fixed seed reproduces a run. Call ``set_epoch`` before each
epoch; the epoch lives in shared memory, so persistent workers see it too. ``transform`` is called
as ``transform(x, generator=g)`` on S1 and on S2 separately (independent draws per modality);
when it returns a tuple (``augment.TwoViews``), the item holds that tuple for ``"s1"`` and
``"s2"``. METER-ML applies it after the standardisation; DFC2020 / SEN12MS apply it to the
clipped crop and seed-normalise each returned view afterwards (``seed_normalize``), as the
original code does.

Problems with the data are reported, never silently absorbed: samples whose files are missing
(and METER-ML metadata entries repeated or contradicting each other) are counted in ``skipped``
and logged once when the dataset is built; non-finite pixels (NaN, +-inf) are replaced, counted in
``nonfinite_pixels`` (``nan_pixels`` for NaN alone; summed over worker processes) and logged once
per process; patches with an all-zero S1 or S2 image are counted in ``all_zero_patches`` and logged
once per process; a file that cannot be read, has the wrong shape or holds undocumented label
codes raises ``DataFileError`` naming the file.

Packed data sets: ``python datasets.py pack {dfc2020,sen12ms,meterml} ROOT OUT`` (``pack``) copies a
data set once into a few large .npy arrays per split plus ``OUT/index.json``; every dataset class
accepts such a folder as ``root`` and returns the same items, reading only the crop window from
the memory-mapped arrays instead of opening three or four files per sample. Files that could not
be read when packing raise the same ``DataFileError`` (SEN12MS: substitute the next patch) when
their item is loaded, so a packed set behaves like its source, broken files included.
"""
import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NamedTuple

import numpy as np
import rasterio
import rasterio.errors
import torch
from PIL import Image
from rasterio.windows import Window
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from augment import keyed_generator
from losses import IGNORE

logger = logging.getLogger(__name__)

Transform = Callable[..., Tensor | tuple[Tensor, ...]]


class DataFileError(ValueError):
    """A data file that cannot be read or has the wrong shape; the message names the file."""


class _SharedCounter:
    """An integer that DataLoader workers add to and the main process reads.

    One shared-memory slot per worker (slot 0: the main process), so that concurrent adds never
    race; ``value`` sums the slots.
    """

    def __init__(self, slots: int = 64) -> None:
        self._slots = torch.zeros(slots, dtype=torch.int64).share_memory_()

    def add(self, n: int) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (len(self._slots) - 1)
        self._slots[slot] += n

    @property
    def value(self) -> int:
        return int(self._slots.sum())


def seed_normalize(x: Tensor) -> Tensor:
    """Divide every channel of every image by that channel's maximum over the image (+ 1e-5).

    The last step of the seed normalisation of DFC2020 / SEN12MS, applied to the image the network
    sees (the crop, or each augmented view after its augmentation). ``x``: (C, H, W) or
    (B, C, H, W) float, non-negative (clipped S1 + 25 dB, clipped S2 reflectance x 10000), on any
    device. Returns the same shape and dtype; each channel's maximum becomes max / (max + 1e-5),
    just below 1 (an all-zero channel stays 0).
    """
    if x.ndim not in (3, 4):
        raise ValueError(f"seed_normalize expects an image (C, H, W) or a batch (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"seed_normalize expects a floating-point tensor, got {x.dtype}")
    return x / (x.amax(dim=(-2, -1), keepdim=True) + 1e-5)


class _PairedDataset(Dataset):
    """What all datasets share: epoch, per-item generator, per-modality transform, fault counting."""

    def __init__(self, transform: Transform | None, seed: int) -> None:
        self.transform = transform
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._nan_pixels = _SharedCounter()
        self._inf_pixels = _SharedCounter()
        self._all_zero_patches = _SharedCounter()
        self._nonfinite_logged = False
        self._all_zero_logged = False

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws of ``epoch``; seen by DataLoader workers, persistent ones too."""
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @property
    def nonfinite_pixels(self) -> int:
        """Non-finite values (NaN, +inf, -inf) replaced so far, over all modalities, bands and
        worker processes."""
        return self._nan_pixels.value + self._inf_pixels.value

    @property
    def nan_pixels(self) -> int:
        """The NaN values among ``nonfinite_pixels``."""
        return self._nan_pixels.value

    @property
    def all_zero_patches(self) -> int:
        """Samples read so far (all worker processes) whose S1 or S2 image was zero everywhere;
        DFC2020 / SEN12MS look at the window that was read."""
        return self._all_zero_patches.value

    def _generator(self, index: int) -> torch.Generator:
        return keyed_generator(self.seed, self.epoch, index)

    def _count_nonfinite(self, x: Tensor, path: str | Path, replacement: str) -> Tensor:
        """Mask (same shape as x) of the non-finite values of ``x`` read from ``path``, counted and
        logged (the first time in this process)."""
        nonfinite = ~torch.isfinite(x)
        count = int(nonfinite.sum())
        if count:
            nan = int(torch.isnan(x).sum())
            self._nan_pixels.add(nan)
            self._inf_pixels.add(count - nan)
            if not self._nonfinite_logged:
                self._nonfinite_logged = True
                logger.warning(
                    "%d non-finite values (NaN: %d, +-inf: %d) in %s, replaced by %s; further ones are "
                    "replaced and counted in %s.nonfinite_pixels without more messages",
                    count, nan, count - nan, path, replacement, type(self).__name__,
                )
        return nonfinite

    def _count_all_zero(self, zero: Sequence[str | Path]) -> None:
        """Count a sample once when some of its images are zero everywhere (``zero``: their files,
        possibly none); log the first such file of this process."""
        if zero:
            self._all_zero_patches.add(1)
            if not self._all_zero_logged:
                self._all_zero_logged = True
                logger.warning(
                    "all-zero image %s (kept: such images occur at scene edges); further ones are "
                    "counted in %s.all_zero_patches without more messages",
                    zero[0], type(self).__name__,
                )

    def _apply_transform(self, item: dict[str, Any], generator: torch.Generator) -> None:
        if self.transform is not None:
            item["s1"] = self.transform(item["s1"], generator=generator)
            item["s2"] = self.transform(item["s2"], generator=generator)


def _log_summary(name: str, kept: int, total: int, skipped: dict[str, int], detail: str = "") -> None:
    """The one report of a dataset: samples kept, and what was skipped and why."""
    if any(skipped.values()):
        reasons = ", ".join(f"{reason}: {count}" for reason, count in skipped.items())
        logger.warning("%s: %d of %d samples kept; skipped %s%s", name, kept, total, reasons, detail)
    else:
        logger.info("%s: %d samples", name, kept)


# ---------------------------------------------------------------------------------------------
# Packed data sets (reading side; the packing step is at the end of the module)


PACK_INDEX = "index.json"
PACK_FORMAT = "packed S1/S2 data set (datasets.py pack)"
PACK_VERSION = 1
# Present while a pack is under way or was interrupted: the index appears only once it is complete.
_PACK_PROGRESS = ".pack_progress.json"
_PACK_DATASETS = ("dfc2020", "sen12ms", "meterml")


def _pack_hint(dataset: str) -> str:
    return f"  or a folder written by `python datasets.py pack {dataset} ROOT OUT` (holding {PACK_INDEX})"


def packed_index(root: str | Path, dataset: str | None = None) -> dict[str, Any] | None:
    """The index of the packed data set in ``root``, or None when ``root`` holds no ``index.json``.

    ``dataset`` (``"dfc2020"``, ``"sen12ms"``, ``"meterml"``): refuse a pack of another data set.
    Raises ``DataFileError`` for an index of another format or version, and for an interrupted
    pack (a progress marker without an index), naming the folder and what to do.
    """
    root = Path(root)
    path = root / PACK_INDEX
    if not path.is_file():
        if (root / _PACK_PROGRESS).is_file():
            raise DataFileError(
                f"{root} holds an unfinished pack (no {PACK_INDEX} yet, only {_PACK_PROGRESS}): run the same "
                f"`python datasets.py pack ...` command again to finish it"
            )
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataFileError(f"cannot read {path}: {error}") from error
    if not isinstance(index, dict) or index.get("format") != PACK_FORMAT:
        raise DataFileError(f"{path}: not the index of a packed data set (expected format {PACK_FORMAT!r})")
    if index.get("version") != PACK_VERSION:
        raise DataFileError(
            f"{path}: packed with format version {index.get('version')}, this code reads version {PACK_VERSION}; pack again"
        )
    if dataset is not None and index.get("dataset") != dataset:
        raise DataFileError(f"{path}: a packed {index.get('dataset')} data set, not {dataset}")
    return index


class _PackedSplit:
    """The arrays of one packed split, memory-mapped read-only on first use in each process.

    ``entry``: the split's record in the index (``arrays``: column -> file, shape, dtype, with
    the rows first; ``unreadable``: column -> row -> the message of the file that could not be
    packed). The maps are not pickled: a DataLoader worker started by spawn opens its own.
    """

    def __init__(self, root: Path, entry: dict[str, Any]) -> None:
        self.root = root
        self.specs: dict[str, dict[str, Any]] = entry["arrays"]
        self.unreadable = {
            column: {int(row): message for row, message in rows.items()} for column, rows in entry["unreadable"].items()
        }
        self._maps: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def array(self, column: str) -> np.ndarray:
        """The whole column (rows, ...), memory-mapped: slicing it reads only the pages sliced."""
        found = self._maps.get(column)
        if found is None:
            spec = self.specs[column]
            path = self.root / spec["file"]
            try:
                found = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as error:
                raise DataFileError(f"cannot read {path}: {error}") from error
            if list(found.shape) != spec["shape"] or str(found.dtype) != spec["dtype"]:
                raise DataFileError(
                    f"{path}: {PACK_INDEX} promises shape {spec['shape']} {spec['dtype']}, the file holds "
                    f"{list(found.shape)} {found.dtype}; pack again"
                )
            self._maps[column] = found
        return found

    def name(self, column: str, row: int, source: str) -> str:
        """How messages name a packed sample: the array file, the row and the sample's source."""
        return f"{self.root / self.specs[column]['file']}[{row}] ({source})"

    def check(self, column: str, row: int) -> None:
        """Raise the packing-time ``DataFileError`` of a file that could not be packed."""
        message = self.unreadable.get(column, {}).get(row)
        if message is not None:
            raise DataFileError(message)

    def unreadable_rows(self, columns: Sequence[str], rows: Sequence[int]) -> int:
        """How many of ``rows`` have an unpacked file among ``columns``."""
        bad = set().union(*(self.unreadable.get(column, {}) for column in columns))
        return sum(row in bad for row in rows)


# ---------------------------------------------------------------------------------------------
# METER-ML


_METERML_IMAGE_DIRS = ("train_images_1", "train_images_2", "train_images_3", "val_images", "test_images")


def _meterml_layout(root: Path) -> str:
    return "\n".join([
        f"{root}/",
        "  train_dataset.geojson   (or train_dataset.json; likewise val_, test_)",
        "  train_images_1/<id>/sentinel-1.npy           72 x 72 x 2",
        "                      sentinel-2-10m.npy       72 x 72 x 4",
        "                      sentinel-2-20m.npy       36 x 36 x 6",
        "                      sentinel-2-60m.npy       12 x 12 x 3",
        "                      naip.png",
        "  train_images_2/  train_images_3/  val_images/  test_images/",
        _pack_hint("meterml"),
    ])


def _subfolders(folder: Path) -> set[str]:
    """Names of the directories in ``folder`` (empty when it does not exist): one directory scan."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name for entry in entries if entry.is_dir()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _resolve_image_folders(
    root: Path, written: Sequence[str], packed: dict[str, set[str]] | None = None
) -> list[Path | None]:
    """The folder of every ``Image_Folder`` value, or None when it is nowhere.

    The path as written wins; otherwise the same folder name under ``train_images_1..3``,
    ``val_images``, ``test_images`` (the archives extract there while the metadata may say
    ``train_images/<id>``). Each candidate parent is listed once, so no stat per sample.
    ``packed``: the folders of a packed set (parent, relative to ``root`` -> names) instead of
    the directories on disk, so that a packed set resolves exactly as its source did.
    """
    paths = [PurePosixPath(folder.replace("\\", "/")) for folder in written]
    parents = dict.fromkeys([str(path.parent) for path in paths] + list(_METERML_IMAGE_DIRS))
    listing = {
        parent: _subfolders(root / parent) if packed is None else packed.get(parent, set()) for parent in parents
    }
    resolved: list[Path | None] = []
    for path in paths:
        if path.name in listing[str(path.parent)]:
            resolved.append(root / path)
        else:
            parent = next((p for p in _METERML_IMAGE_DIRS if path.name in listing[p]), None)
            resolved.append(None if parent is None else root / parent / path.name)
    return resolved


def _folder_id(written: str) -> str:
    """The image set's id: the last part of an ``Image_Folder`` value (either slash)."""
    return PurePosixPath(written.replace("\\", "/")).name


def _first_entries(folders: Sequence[str], types: Sequence[str]) -> tuple[list[int], dict[str, int], dict[str, list[str]]]:
    """Keep one metadata entry per image set id (the first).

    Returns the indices of the kept entries (in file order); every id listed more than once ->
    its number of extra (dropped) entries; the ids among them listed with different ``Type``
    values -> those values in order of appearance (the first is kept).
    """
    first: dict[str, int] = {}
    entries: Counter[str] = Counter()
    found: dict[str, list[str]] = {}
    for i, (folder, type_) in enumerate(zip(folders, types)):
        sample_id = _folder_id(folder)
        entries[sample_id] += 1
        if sample_id not in first:
            first[sample_id] = i
            found[sample_id] = [type_]
        elif type_ not in found[sample_id]:
            found[sample_id].append(type_)
    extra = {k: entries[k] - 1 for k in first if entries[k] > 1}
    conflicting = {k: found[k] for k in first if len(found[k]) > 1}
    return list(first.values()), extra, conflicting


def _read_npy(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """A (height, width, bands) numeric .npy file as stored; errors name the file."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataFileError(f"cannot read {path}: {error}") from error
    if array.shape != shape:
        raise DataFileError(f"{path}: expected shape {shape} (height, width, bands), found {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataFileError(f"{path}: expected a numeric array, found dtype {array.dtype}")
    return array


def _as_bands(array: np.ndarray) -> Tensor:
    """(height, width, bands) of any real dtype -> a new float32 tensor (bands, height, width).
    Always a copy (bands >= 2 makes the transposed layout non-contiguous), so packed read-only
    views never reach in-place operations."""
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))


# The packed columns of the METER-ML arrays the loader reads: file -> (column, (height, width, bands)).
_METERML_ARRAYS = {
    "sentinel-1.npy": ("s1", (72, 72, 2)),
    "sentinel-2-10m.npy": ("s2_10m", (72, 72, 4)),
    "sentinel-2-20m.npy": ("s2_20m", (36, 36, 6)),
    "sentinel-2-60m.npy": ("s2_60m", (12, 12, 3)),
}


def _load_naip(path: Path) -> Tensor:
    """``naip.png`` as float32 (4, H, W) in [0, 1]: R, G, B and NIR (stored as the alpha channel)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except OSError as error:
        raise DataFileError(f"cannot read {path}: {error}") from error
    if array.ndim != 3 or array.shape[2] != 4:
        raise DataFileError(f"{path}: expected 4 bands (RGB + NIR as alpha), found shape {array.shape}")
    return torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32) / 255)


class MeterMLDataset(_PairedDataset):
    """METER-ML image sets (Zhu et al. 2022): S1 and S2 at 10 m, 72 x 72 px, methane source classes.

    Item: ``"s1"`` (2, 72, 72) VV, VH; ``"s2"`` (4, 72, 72) B2, B3, B4, B8, or with
    ``s2_bands="all"`` (13, 72, 72) B1, B2, B3, B4, B5, B6, B7, B8, B8A, B9, B10, B11, B12 (the
    band order of DFC2020 / SEN12MS; the 20 m and 60 m bands upsampled bilinearly); ``"label"``
    the 7-class seed index (a compound ``Type`` takes its first name), or with
    ``label_scheme="multilabel"`` the 6-facility multi-hot vector; ``"multilabel"`` (6,) float32
    over ``FACILITIES`` (zeros for a negative); ``"id"`` the image folder's name; with
    ``naip=True``, ``"naip"`` (4, H, W) in [0, 1] (not transformed).

    ``normalize="seed"``: per-channel standardisation with the seed's constants of the raw values;
    the nine 20 m / 60 m bands have no published constants and are standardised per patch and
    channel instead (over the finite values). Non-finite values (NaN, +-inf) become 0 after
    normalisation (the channel mean under standardisation), counted in ``nonfinite_pixels``.
    ``normalize="none"``: raw values. An all-zero ``sentinel-1.npy`` or ``sentinel-2-10m.npy`` is
    kept and counted in ``all_zero_patches``.

    Metadata faults: an image folder listed more than once is kept once per entry, as the
    original keeps every feature (``repeated="first"`` keeps its first entry and counts the others
    in ``skipped``); either way the folder ids are listed in ``problems`` (reason -> ids) under
    ``"repeated Image_Folder"`` (same ``Type``) or ``"conflicting Type"`` (with "keep", each entry
    keeps its own ``Type``; with "first", the first); ``problems["image folder missing"]`` lists
    the ids whose folder is absent. All of it is in the one summary log line. ``ids``: the folder
    ids of the samples; ``split_overlap`` compares two splits.

    Args:
        root: dataset root (the folder holding the GeoJSON files and the image folders), or a folder written by ``pack`` (same items; see ``pack``).
        split: ``"train"``, ``"val"`` or ``"test"``: reads ``{split}_dataset.geojson`` or ``.json``.
        geojson: explicit metadata path instead (relative paths are taken from ``root``).
        exclude_negatives: drop the Negative samples (``Negative`` and ``Roundabout``), counted
            in ``skipped``.
        strict: raise when a feature's image folder is missing, instead of skipping it.
        seed: seed of the per-item generator passed to ``transform``.
        repeated: ``"keep"`` every entry of a folder listed several times (the original), or
            ``"first"`` only its first entry.
    """

    classes = ["CAFOs", "Landfills", "Mines", "Negative", "ProcessingPlants", "RefineriesAndTerminals", "WWTreatment"]
    FACILITIES = ["CAFOs", "Landfills", "Mines", "ProcessingPlants", "RefineriesAndTerminals", "WWTreatment"]
    NEGATIVE = 3
    S1_MEAN = (1652.7944, 1258.3584)
    S1_STD = (290.2874, 280.4149)
    S2_MEAN = (1025.2214, 1138.3673, 1194.6796, 2637.0828)
    S2_STD = (724.7973, 545.1207, 514.9276, 1051.9325)
    # Position of each standard-order band in cat([10 m, 20 m, 60 m]) = B2 B3 B4 B8 | B5 B6 B7 B8A B11 B12 | B1 B9 B10.
    _S2_ALL_ORDER = [10, 0, 1, 2, 4, 5, 6, 3, 7, 11, 12, 8, 9]

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "val", "test"] = "train",
        geojson: str | Path | None = None,
        *,
        exclude_negatives: bool = False,
        label_scheme: Literal["seed", "multilabel"] = "seed",
        normalize: Literal["seed", "none"] = "seed",
        s2_bands: Literal["10m", "all"] = "10m",
        naip: bool = False,
        transform: Transform | None = None,
        seed: int = 0,
        strict: bool = False,
        repeated: Literal["keep", "first"] = "keep",
    ) -> None:
        super().__init__(transform, seed)
        for name, value, allowed in [
            ("split", split, ("train", "val", "test")),
            ("repeated", repeated, ("keep", "first")),
            ("label_scheme", label_scheme, ("seed", "multilabel")),
            ("normalize", normalize, ("seed", "none")),
            ("s2_bands", s2_bands, ("10m", "all")),
        ]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.root = Path(root)
        self.split = split
        self.label_scheme = label_scheme
        self.normalize = normalize
        self.s2_bands = s2_bands
        self.naip = naip
        if not self.root.is_dir():
            raise FileNotFoundError(f"METER-ML root {self.root} does not exist; expected:\n{_meterml_layout(self.root)}")
        index = packed_index(self.root, "meterml")
        if index is not None and naip:
            raise ValueError(
                f"{self.root} is a packed METER-ML set, which holds no naip.png images (about 2 MB each): "
                f"read them from the original root ({index['source_root']}) or pass naip=False"
            )
        self.metadata = self._find_metadata(split, geojson)
        folders, types = self._read_features(self.metadata)
        total = len(folders)
        labels, multilabels = self._encode_types(types)
        first, extra, conflicting = _first_entries(folders, types)
        duplicated = {k: n for k, n in extra.items() if k not in conflicting}
        if repeated == "first":
            folders = [folders[i] for i in first]
            labels, multilabels = labels[first], multilabels[first]
        packed_splits: dict[str, _PackedSplit] = {}
        location: dict[str, tuple[str, int]] = {}
        if index is not None:
            # Every packed folder of every split, first occurrence wins (a folder in two splits is packed twice).
            for name, entry in index["splits"].items():
                packed_splits[name] = _PackedSplit(self.root, entry)
                for row, folder in enumerate(entry["folders"]):
                    location.setdefault(folder, (name, row))
            children: dict[str, set[str]] = {}
            for folder in location:
                path = PurePosixPath(folder)
                children.setdefault(str(path.parent), set()).add(path.name)
            resolved = _resolve_image_folders(self.root, folders, children)
        else:
            resolved = _resolve_image_folders(self.root, folders)
        missing = [folder for folder, path in zip(folders, resolved) if path is None]
        if missing and strict:
            raise FileNotFoundError(
                f"{len(missing)} image folders of {self.metadata} not found under {self.root}, "
                f"e.g. {missing[:5]}; expected:\n{_meterml_layout(self.root)}"
            )
        keep = torch.tensor([path is not None for path in resolved], dtype=torch.bool)
        self.skipped: dict[str, int] = {}
        self.problems: dict[str, list[str]] = {}
        details = []
        kept_how = "every entry kept, as the original" if repeated == "keep" else "first entry kept"
        if duplicated:
            if repeated == "first":
                self.skipped["repeated Image_Folder entry (same Type)"] = sum(duplicated.values())
            self.problems["repeated Image_Folder"] = list(duplicated)
            details.append(f"repeated Image_Folder ({len(duplicated)} folders, {sum(duplicated.values())} extra "
                           f"entries; {kept_how}), e.g. {list(duplicated)[:5]}")
        if conflicting:
            if repeated == "first":
                self.skipped["Image_Folder listed again with another Type (first kept)"] = sum(
                    extra[k] for k in conflicting
                )
            self.problems["conflicting Type"] = list(conflicting)
            examples = "; ".join(f"{name}: {' vs '.join(found)}" for name, found in list(conflicting.items())[:5])
            details.append(f"Image_Folder with conflicting Types ({len(conflicting)} folders; {kept_how}), e.g. {examples}")
        if missing:
            self.skipped["image folder missing"] = len(missing)
            self.problems["image folder missing"] = [_folder_id(folder) for folder in missing]
            details.append(f"missing image folders, e.g. {missing[:5]}")
        if exclude_negatives:
            negative = keep & (labels == self.NEGATIVE)
            self.skipped["negative (exclude_negatives)"] = int(negative.sum())
            keep &= ~negative
        self._folders: list[Path] = [path for path, kept in zip(resolved, keep.tolist()) if kept]
        self.labels: Tensor = labels[keep]
        self.multilabels: Tensor = multilabels[keep]
        # Packed: the split and row of every sample.
        self._packed: list[tuple[_PackedSplit, int]] | None = None
        if index is not None:
            self._packed = []
            for path in self._folders:
                name, row = location[path.relative_to(self.root).as_posix()]
                self._packed.append((packed_splits[name], row))
            columns = [column for column, _ in _METERML_ARRAYS.values()]
            bad = sum(packed.unreadable_rows(columns, [row]) for packed, row in self._packed)
            if bad:
                logger.warning(
                    "%s: %d of %d samples had a file that could not be read when packed; loading them raises "
                    "the packing-time error, as the files themselves would (messages in %s)",
                    self.root, bad, len(self._packed), self.root / PACK_INDEX,
                )
        if not self._folders:
            raise ValueError(f"{self.metadata}: no sample left of {total} features (skipped: {self.skipped})")
        detail = "".join(f"; {text}" for text in details)
        _log_summary(f"MeterMLDataset({self.split})", len(self._folders), total, self.skipped, detail)
        if details and not any(self.skipped.values()):
            logger.warning("MeterMLDataset(%s): %d samples%s", self.split, len(self._folders), detail)

    @property
    def ids(self) -> list[str]:
        """The image folder name of every sample, in item order (a repeated entry repeats its id)."""
        return [folder.name for folder in self._folders]

    def _find_metadata(self, split: str, geojson: str | Path | None) -> Path:
        candidates = (
            [self.root / geojson]
            if geojson is not None
            else [self.root / f"{split}_dataset.geojson", self.root / f"{split}_dataset.json"]
        )
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"METER-ML metadata of split {split!r} not found: tried {', '.join(map(str, candidates))}; "
            f"expected:\n{_meterml_layout(self.root)}"
        )

    @staticmethod
    def _read_features(path: Path) -> tuple[list[str], list[str]]:
        """``Image_Folder`` and ``Type`` of every feature of a GeoJSON FeatureCollection."""
        try:
            collection = json.loads(path.read_text())
            features = collection["features"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: expected a GeoJSON FeatureCollection with 'features' ({error})") from error
        if not features:
            raise ValueError(f"{path}: the split is empty (no features)")
        folders, types = [], []
        for i, feature in enumerate(features):
            try:
                folders.append(str(feature["properties"]["Image_Folder"]))
                types.append(str(feature["properties"]["Type"]))
            except (KeyError, TypeError) as error:
                raise ValueError(
                    f"{path}: feature {i} lacks properties 'Image_Folder' and 'Type': {str(feature)[:200]}"
                ) from error
        return folders, types

    def _encode_types(self, types: list[str]) -> tuple[Tensor, Tensor]:
        """Seed labels (N,) int64 and facility multi-hot (N, 6) float32 of the ``Type`` strings."""
        known = set(self.classes) | {"Roundabout"}
        names = [[name.strip() for name in t.split("-")] for t in types]
        unknown = Counter(name for split_names in names for name in split_names if name not in known)
        if unknown:
            raise ValueError(
                f"{self.metadata}: unknown Type names (count): {dict(unknown)}; "
                f"expected {sorted(known)}, several joined by '-'"
            )
        # Some releases label negatives "Roundabout".
        index = {name: i for i, name in enumerate(self.classes)} | {"Roundabout": self.NEGATIVE}
        labels = torch.tensor([index[n[0]] for n in names], dtype=torch.int64)
        facility = {name: i for i, name in enumerate(self.FACILITIES)}
        multilabels = torch.zeros(len(names), len(self.FACILITIES))
        for row, sample_names in enumerate(names):
            for name in sample_names:
                if name in facility:
                    multilabels[row, facility[name]] = 1.0
        return labels, multilabels

    def __len__(self) -> int:
        return len(self._folders)

    def _raw(self, index: int, file: str) -> tuple[np.ndarray, str | Path]:
        """The array (height, width, bands) of ``file`` (e.g. ``"sentinel-1.npy"``) of sample
        ``index`` as stored, from its folder or packed (a read-only view), and its name for messages."""
        column, shape = _METERML_ARRAYS[file]
        if self._packed is None:
            path = self._folders[index] / file
            return _read_npy(path, shape), path
        packed, row = self._packed[index]
        packed.check(column, row)
        return packed.array(column)[row], packed.name(column, row, f"{self._folders[index].name}/{file}")

    def _read(
        self, index: int, file: str, mean: Sequence[float] | None, std: Sequence[float] | None
    ) -> tuple[Tensor, str | Path | None]:
        """One .npy file of sample ``index`` as (bands, H, W), normalised (``mean`` None:
        per-patch standardisation over the finite values), and its name when it held only zeros."""
        raw, name = self._raw(index, file)
        x = _as_bands(raw)
        nonfinite = self._count_nonfinite(x, name, "0 after normalisation")
        all_zero = not bool(x.any())
        if self.normalize == "seed":
            if mean is None:
                finite = x.masked_fill(nonfinite, float("nan"))
                mean_t = torch.nanmean(finite, dim=(1, 2), keepdim=True)
                std_t = (finite - mean_t).square().nanmean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-6)
            else:
                mean_t = torch.tensor(mean).view(-1, 1, 1)
                std_t = torch.tensor(std).view(-1, 1, 1)
            x = (x - mean_t) / std_t
        return x.masked_fill_(nonfinite, 0.0), name if all_zero else None

    def __getitem__(self, index: int) -> dict[str, Any]:
        folder = self._folders[index]
        s1, s1_zero = self._read(index, "sentinel-1.npy", self.S1_MEAN, self.S1_STD)
        s2, s2_zero = self._read(index, "sentinel-2-10m.npy", self.S2_MEAN, self.S2_STD)
        self._count_all_zero([name for name in (s1_zero, s2_zero) if name is not None])
        if self.s2_bands == "all":
            s2_20m, _ = self._read(index, "sentinel-2-20m.npy", None, None)
            s2_60m, _ = self._read(index, "sentinel-2-60m.npy", None, None)
            upsample = [TF.resize(x, [72, 72], interpolation=TF.InterpolationMode.BILINEAR) for x in (s2_20m, s2_60m)]
            s2 = torch.cat([s2, *upsample])[self._S2_ALL_ORDER]
        multilabel = self.multilabels[index].clone()
        item: dict[str, Any] = {
            "s1": s1,
            "s2": s2,
            "label": int(self.labels[index]) if self.label_scheme == "seed" else multilabel.clone(),
            "multilabel": multilabel,
            "id": folder.name,
        }
        if self.naip:
            item["naip"] = _load_naip(folder / "naip.png")
        self._apply_transform(item, self._generator(index))
        return item


def split_overlap(a: MeterMLDataset, b: MeterMLDataset) -> list[str]:
    """The image set ids (folder names) that are samples of both ``a`` and ``b``, in ``a``'s order:
    empty for disjoint splits."""
    in_b = set(b.ids)
    return [sample_id for sample_id in dict.fromkeys(a.ids) if sample_id in in_b]


def balanced_indices(labels: Tensor, ignore: int = IGNORE) -> Tensor:
    """The item indices of one epoch of ``--balanced_class``: each item repeated by its class's
    number of copies, in item order (the sampler shuffles them every epoch).

    copies of class c = max(1, round(N / (2.9 * n_c))), rounding halves up, with N the labelled
    items and n_c those of class c: every class fills about N / 2.9 rows. On the DFC2020
    validation split (N = 986) that is round(340 / n_c), the original's list
    (``splits/validation_observations_balanced_classes.csv``): Forest 4, Shrubland 9, Grassland 3,
    Wetlands 2, Croplands 2, Urban/Built-up 5, Barren 15, Water 1 copies, 2,618 rows.
    Items labelled ``ignore`` appear once.

    Args:
        labels: (N,) int class ids.
    Returns:
        (M,) int64 indices into ``labels``.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
    labelled = labels != ignore
    total = int(labelled.sum())
    counts = torch.bincount(labels[labelled], minlength=1)
    # round(10 N / (29 n_c)) with halves up, in integers: (20 N + 29 n_c) // (58 n_c)
    copies = ((20 * total + 29 * counts) // (58 * counts.clamp(min=1))).clamp(min=1)
    per_item = torch.where(labelled, copies[labels.clamp(0, len(copies) - 1)], torch.ones_like(labels))
    return torch.repeat_interleave(torch.arange(len(labels)), per_item)


# ---------------------------------------------------------------------------------------------
# DFC2020 and SEN12MS: 256 x 256 GeoTIFF patches, S1 in dB, S2 L1C, label maps.


DFC_CLASSES = ["Forest", "Shrubland", "Grassland", "Wetlands", "Croplands", "Urban/Built-up", "Barren", "Water"]
# DFC codes 1-10 -> 8-class index; Savanna (3), Snow/Ice (8), 0 and 255 -> ignore.
_DFC_TO_CLASS = np.full(256, IGNORE, dtype=np.uint8)
_DFC_TO_CLASS[[1, 2, 4, 5, 6, 7, 9, 10]] = np.arange(8)
_IGBP_TO_DFC = np.array([0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 6, 8, 9, 10])
_IGBP_TO_CLASS = np.full(256, IGNORE, dtype=np.uint8)
_IGBP_TO_CLASS[: len(_IGBP_TO_DFC)] = _DFC_TO_CLASS[_IGBP_TO_DFC]


class _LabelCodes(NamedTuple):
    """A label source: raw code -> 8-class lookup (256,) uint8, and which raw codes it documents."""

    lut: np.ndarray
    codes: np.ndarray
    description: str


# Codes outside these sets mean a foreign or broken file: they are refused rather than ignored.
_DFC_LABELS = _LabelCodes(_DFC_TO_CLASS, np.r_[0:11, 255], "DFC codes 1-10, or 0 / 255 for no label")
_IGBP_LABELS = _LabelCodes(_IGBP_TO_CLASS, np.r_[0:18, 255], "IGBP codes 1-17, or 0 / 255 for no data")


def _class_map(raw: np.ndarray, path: Path, labels: _LabelCodes) -> np.ndarray:
    """The 8-class map (h, w) uint8 of a raw label band (h, w) read from ``path``.

    Raises ``DataFileError`` for a non-integer dtype or for codes outside ``labels.codes``,
    listing the codes found (with their pixel counts).
    """
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

_PATCH_NUMBER = re.compile(r"_p(\d+)\.tif$")
# GDAL would list the patch's folder (thousands of files) on every open to look for side-car
# files that these data sets do not have; memory-mapped reads of uncompressed strips are faster.
_GDAL_OPTIONS = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GTIFF_VIRTUAL_MEM_IO": "IF_ENOUGH_RAM"}


@contextmanager
def _open_tif(path: Path, bands: int, size: tuple[int, int] | None = None) -> Iterator[rasterio.DatasetReader]:
    """Open a GeoTIFF, checking its band count and (height, width); read errors name the file."""
    try:
        with rasterio.open(path) as src:
            if src.count != bands:
                raise DataFileError(f"{path}: expected {bands} bands, found {src.count}")
            if size is not None and (src.height, src.width) != size:
                raise DataFileError(
                    f"{path}: expected {size[0]} x {size[1]} px like the patch's S1 file, found {src.height} x {src.width}"
                )
            yield src
    except rasterio.errors.RasterioError as error:
        raise DataFileError(f"cannot read {path}: {error}") from error


def _scan_patches(folder: Path) -> tuple[dict[int, Path], int]:
    """Patch number N -> path of the ``*_p{N}.tif`` files of ``folder``, and the count of other .tif names."""
    found: dict[int, Path] = {}
    unrecognised = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(".tif"):
                match = _PATCH_NUMBER.search(entry.name)
                if match:
                    found[int(match.group(1))] = Path(entry.path)
                else:
                    unrecognised += 1
    return found, unrecognised


def _pair_patches(
    folders: dict[str, Path], strict: bool, layout: str
) -> tuple[list[int], list[dict[str, Path]], dict[str, int], int]:
    """Pair the files of several modality folders by patch number N (never by sort order).

    Returns the sorted numbers of the complete patches, their files (modality -> path), the skip
    counts (reason -> count) and the number of patches seen; ``strict`` raises on an incomplete
    patch instead of skipping it.
    """
    scans: dict[str, dict[int, Path]] = {}
    skipped: Counter[str] = Counter()
    for modality, folder in folders.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"folder {folder} not found; expected:\n{layout}")
        scans[modality], unrecognised = _scan_patches(folder)
        if unrecognised:
            skipped[f".tif files in {folder.name} not named *_p<N>.tif"] += unrecognised
    numbers = sorted(set().union(*scans.values()))
    complete = []
    for number in numbers:
        absent = [folders[modality].name for modality, scan in scans.items() if number not in scan]
        if not absent:
            complete.append(number)
        elif strict:
            raise FileNotFoundError(f"patch {number} has no file in {', '.join(absent)} (under {folders['s1'].parent})")
        else:
            skipped[f"patch without a file in {', '.join(absent)}"] += 1
    files = [{modality: scans[modality][n] for modality in folders} for n in complete]
    return complete, files, dict(skipped), len(numbers)


def _labels_of_map(label_map: np.ndarray) -> tuple[int, Tensor]:
    """Majority label (ignore included: 255 if it wins; ties go to the lower index) and the
    multi-hot (8,) of the classes covering at least 10 % of all pixels."""
    counts = np.bincount(label_map.ravel(), minlength=256)
    multilabel = torch.from_numpy(counts[: len(DFC_CLASSES)] >= 0.1 * label_map.size).float()
    return int(counts.argmax()), multilabel


class _PatchDataset(_PairedDataset):
    """Shared reader of S1 / S2 / label-map patches (DFC2020, SEN12MS), from GeoTIFFs or packed.

    Subclasses set ``patch_ids``, ``_offset_keys`` (non-negative integers naming each patch, for
    ``offset_seed``) and ``_labels`` (the label source), and either ``_files`` (one dict "s1",
    "s2", "label" -> GeoTIFF path per patch) with ``_label_bands`` (band count of the label file),
    or with ``_use_packed`` the packed split, its rows and its label column; then they call
    ``_learn_patch_size``. Only ``_read_windows`` knows where the pixels come from.
    """

    classes = DFC_CLASSES
    IGNORE = IGNORE
    _files: list[dict[str, Path]]
    patch_ids: list[Any]
    _offset_keys: list[tuple[int, ...]]
    _label_bands: int
    _labels: _LabelCodes

    def __init__(
        self,
        crop: int | None,
        train: bool,
        normalize: str,
        return_label_map: bool,
        transform: Transform | None,
        seed: int,
        offset_seed: int | None,
    ) -> None:
        super().__init__(transform, seed)
        if crop is not None and crop <= 0:
            raise ValueError(f"crop must be a positive number of pixels or None, got {crop}")
        if normalize not in ("seed", "none"):
            raise ValueError(f"normalize must be 'seed' or 'none', got {normalize!r}")
        if offset_seed is not None and (train or not isinstance(offset_seed, int) or offset_seed < 0):
            raise ValueError(
                f"offset_seed must be None or a non-negative int, and only with train=False (training "
                f"windows are random per seed, epoch and index); got offset_seed={offset_seed!r}, train={train}"
            )
        self.crop = crop
        self.train = train
        self.normalize = normalize
        self.return_label_map = return_label_map
        self.offset_seed = offset_seed
        self._patch_size: tuple[int, int] | None = None
        self._patch_size_source: str | Path | None = None
        self._files = []
        self._packed: _PackedSplit | None = None
        self._rows: list[int] = []
        self._label_column = "label"

    def __len__(self) -> int:
        return len(self.patch_ids)

    def _use_packed(self, root: Path, entry: dict[str, Any], rows: list[int], label_column: str) -> None:
        """Read the items from the packed split ``entry`` of ``root``: item i is row ``rows[i]``,
        labels from ``label_column``. Logs how many of them could not be packed."""
        self._packed = _PackedSplit(root, entry)
        self._rows = rows
        self._label_column = label_column
        bad = self._packed.unreadable_rows(("s1", "s2", label_column), rows)
        if bad:
            logger.warning(
                "%s: %d of %d patches had a file that could not be read when packed; loading them raises "
                "the packing-time error, as the files themselves would (messages in %s)",
                root, bad, len(rows), root / PACK_INDEX,
            )

    def _learn_patch_size(self) -> None:
        """Without a crop, items are whole patches that a DataLoader stacks: take their
        (height, width) from the first S1 file (one open; packed: the array shape), so that
        another size names its file. An unreadable file is passed over here (its item reports
        it); ten in a row raise."""
        if self.crop is None:
            if self._packed is not None:
                self._patch_size = tuple(self._packed.specs["s1"]["shape"][-2:])
                self._patch_size_source = self._packed.root / self._packed.specs["s1"]["file"]
                return
            with rasterio.Env(**_GDAL_OPTIONS):
                for paths in self._files[:10]:
                    try:
                        with _open_tif(paths["s1"], 2) as src:
                            self._patch_size = (src.height, src.width)
                            self._patch_size_source = paths["s1"]
                            return
                    except DataFileError as error:
                        last_error = error
            raise DataFileError(f"none of the first S1 files gives the patch size; the last: {last_error}")

    def _window(self, index: int, height: int, width: int, generator: torch.Generator, path: str | Path) -> Window:
        """The crop window of patch ``index`` (``height`` x ``width`` px): the whole patch without
        a crop; random from ``generator`` in training; otherwise centred, or with ``offset_seed``
        at the patch's own fixed random offset."""
        if self.crop is None:
            if (height, width) != self._patch_size:
                raise DataFileError(
                    f"{path}: patch of {height} x {width} px, but the data set's patches are "
                    f"{self._patch_size} px (height, width; from {self._patch_size_source}); whole "
                    f"patches must share one size (or pass crop=)"
                )
            return Window(0, 0, width, height)
        if self.crop > min(height, width):
            raise DataFileError(f"{path}: patch of {height} x {width} px is smaller than crop={self.crop}")
        if self.train or self.offset_seed is not None:
            draws = generator if self.train else keyed_generator(self.offset_seed, *self._offset_keys[index])
            # The original's np.random.randint(0, 256 - crop): offsets 0 .. size - crop - 1, never
            # the last one (0 when the crop is the whole patch).
            top = int(torch.randint(max(1, height - self.crop), (1,), generator=draws))
            left = int(torch.randint(max(1, width - self.crop), (1,), generator=draws))
        else:
            top, left = (height - self.crop) // 2, (width - self.crop) // 2
        return Window(left, top, self.crop, self.crop)

    def _prepared(self, raw: np.ndarray, path: str | Path, s1: bool) -> Tensor:
        """(bands, h, w) float32 of a window read from ``path``: non-finite values -> 0 (dB for
        S1), then with ``normalize="seed"`` S1 clipped to [-25, 0] dB + 25 and S2 to [0, 10000].
        The per-channel maximum division is left to ``seed_normalize``, after any transform."""
        # Always a copy: packed windows are read-only views of the memory map.
        x = torch.from_numpy(np.array(raw, dtype=np.float32))
        # A finite sum rules out NaN and +-inf in one vectorised pass, cheaper than the mask.
        if np.issubdtype(raw.dtype, np.floating) and not torch.isfinite(x.sum()):
            x.masked_fill_(self._count_nonfinite(x, path, "0 dB" if s1 else "0"), 0.0)
        if self.normalize == "none":
            return x
        return x.clamp_(-25.0, 0.0).add_(25.0) if s1 else x.clamp_(0.0, 10000.0)

    def _read_windows(
        self, index: int, generator: torch.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, str | Path]]:
        """The raw crop window of patch ``index``: S1 (2, h, w) as stored (float32 dB), S2
        (13, h, w) (uint16), the label band (h, w) with its raw codes, and the name of each one's
        source for messages ("s1", "s2", "label"). Only the window is read, from the GeoTIFFs or
        from the packed arrays (then as read-only views)."""
        if self._packed is not None:
            packed, row, column = self._packed, self._rows[index], self._label_column
            source = f"patch {self.patch_ids[index]}"
            names: dict[str, str | Path] = {
                "s1": packed.name("s1", row, source), "s2": packed.name("s2", row, source),
                "label": packed.name(column, row, source),
            }
            for name in ("s1", "s2", column):
                packed.check(name, row)
            s1 = packed.array("s1")
            window = self._window(index, *s1.shape[-2:], generator, names["s1"])
            rows = slice(window.row_off, window.row_off + window.height)
            cols = slice(window.col_off, window.col_off + window.width)
            return s1[row, :, rows, cols], packed.array("s2")[row, :, rows, cols], packed.array(column)[row, rows, cols], names
        paths = self._files[index]
        with rasterio.Env(**_GDAL_OPTIONS):
            with _open_tif(paths["s1"], 2) as src:
                size = (src.height, src.width)
                window = self._window(index, *size, generator, paths["s1"])
                s1_raw = src.read(window=window)
            with _open_tif(paths["s2"], 13, size) as src:
                s2_raw = src.read(window=window)
            with _open_tif(paths["label"], self._label_bands, size) as src:
                label_raw = src.read(1, window=window)
        return s1_raw, s2_raw, label_raw, dict(paths)

    def _read_patch(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor, np.ndarray]:
        """S1 (2, h, w), S2 (13, h, w) (clipped, not yet divided by their maxima) and the 8-class
        label map (h, w) uint8 of one crop window."""
        s1_raw, s2_raw, label_raw, names = self._read_windows(index, generator)
        label_map = _class_map(label_raw, names["label"], self._labels)
        s1 = self._prepared(s1_raw, names["s1"], s1=True)
        s2 = self._prepared(s2_raw, names["s2"], s1=False)
        # Judged before clipping: clipped S1 is 25 where the file holds 0 dB.
        zero = [names[m] for m, x in (("s1", s1_raw), ("s2", s2_raw)) if not x.any()]
        self._count_all_zero(zero)
        return s1, s2, label_map

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = self._generator(index)
        s1, s2, label_map = self._read_patch(index, generator)
        label, multilabel = _labels_of_map(label_map)
        item: dict[str, Any] = {
            "s1": s1, "s2": s2, "label": label, "multilabel": multilabel, "id": self.patch_ids[index]
        }
        if self.return_label_map:
            item["label_map"] = torch.from_numpy(label_map.astype(np.int64))
        self._apply_transform(item, generator)
        if self.normalize == "seed":
            for modality in ("s1", "s2"):
                views = item[modality]
                item[modality] = (
                    tuple(seed_normalize(view) for view in views) if isinstance(views, (tuple, list))
                    else seed_normalize(views)
                )
        return item

    def patch_labels(self) -> Tensor:
        """Majority label (N,) int64 of every whole patch (0-7 or 255), e.g. for class-balanced
        sampling. Reads only the label files (packed: the label column)."""
        labels = torch.empty(len(self), dtype=torch.int64)
        if self._packed is not None:
            packed, column = self._packed, self._label_column
            for i, row in enumerate(tqdm(self._rows, desc="patch labels", leave=False, disable=None)):
                packed.check(column, row)
                name = packed.name(column, row, f"patch {self.patch_ids[i]}")
                labels[i] = _labels_of_map(_class_map(packed.array(column)[row], name, self._labels))[0]
            return labels
        with rasterio.Env(**_GDAL_OPTIONS):
            for i, paths in enumerate(tqdm(self._files, desc="patch labels", leave=False, disable=None)):
                with _open_tif(paths["label"], self._label_bands) as src:
                    labels[i] = _labels_of_map(_class_map(src.read(1), paths["label"], self._labels))[0]
        return labels


_DFC_FOLDERS = {
    "validation": ("ROIs0000_validation", {m: f"{m}_validation" for m in ("s1", "s2", "lc", "dfc")}),
    "test": ("ROIs0000_test", {m: f"{m}_0" for m in ("s1", "s2", "lc", "dfc")}),
}


def _dfc_layout(root: Path) -> str:
    lines = [f"{root}/"]
    for top, folders in _DFC_FOLDERS.values():
        lines.append(f"  {top}/")
        lines += [f"    {folders[m]}/{top}_{m}_0_p<N>.tif" for m in ("s1", "s2", "lc", "dfc")]
    return "\n".join(lines + [_pack_hint("dfc2020")])


def _dfc_folders(root: Path, split: str, label_source: str) -> dict[str, Path]:
    """The "s1", "s2" and "label" folders of a DFC2020 split, labels from ``label_source``."""
    top, names = _DFC_FOLDERS[split]
    return {"s1": root / top / names["s1"], "s2": root / top / names["s2"], "label": root / top / names[label_source]}


def _incomplete(skipped: dict[str, int]) -> dict[str, int]:
    """The skip counts of patches that lack a file (what ``strict`` refuses)."""
    return {reason: count for reason, count in skipped.items() if reason.startswith("patch without a file")}


class DFC2020Dataset(_PatchDataset):
    """IEEE GRSS DFC2020 patches: S1, S2 and the 8-class land-cover labels of SSLTransformerRS.

    Item: ``"s1"`` (2, H, W) VV, VH; ``"s2"`` (13, H, W) B1-B12; ``"label"`` the majority
    8-class label of the crop window (ignore pixels count; 255 when they win); ``"multilabel"``
    (8,) the classes covering at least 10 % of the window's pixels; ``"id"`` the patch number N
    of ``_p{N}.tif``; with ``return_label_map``, ``"label_map"`` (H, W) int64, 0-7 or 255 (not
    transformed). ``crop=None``: the whole patch (every patch must have the size of the first);
    ``crop=224``: a 224 x 224 window, random per (seed, epoch, index) when ``train``, else
    centred, or with ``offset_seed`` at a random offset drawn once per patch number (the same
    windows in every evaluation, epoch and run, whatever the DataLoader order or worker). S1, S2
    and labels share the window; only the window is read from disk.

    ``normalize="seed"`` (what the released DualResNet50 checkpoints were trained with, per crop):
    S1 non-finite -> 0 dB (NaN -> 0 is what ``np.nan_to_num`` gives in the public SEN12MS
    loaders), clip to [-25, 0] dB, + 25; S2 clip to [0, 10000]; ``transform`` (if any) on this
    clipped crop; then every channel of the crop, or of each returned view, divided by its own
    maximum (+ 1e-5) (``seed_normalize``). ``normalize="none"``: S1 in dB (non-finite -> 0 dB)
    and S2 raw, as float32, transformed as they are.

    Label maps: ``dfc`` files may hold codes 0-10 and 255, ``lc`` band 1 IGBP codes 1-17 with 0
    and 255 accepted as no data (ignore); other codes, or a non-integer dtype, raise
    ``DataFileError`` naming the file and the codes (an item checks its window only).

    Args:
        root: the folder holding ``ROIs0000_validation`` and ``ROIs0000_test``, or a folder written by ``pack`` (same items; see ``pack``).
        split: ``"validation"`` (986 patches, the training set of the method) or ``"test"``.
        label_source: ``"dfc"`` (the DFC labels) or ``"lc"`` (MODIS IGBP, band 1, mapped to DFC).
            Only the label file of the chosen source is read.
        strict: raise when a patch lacks one of its files, instead of skipping it.
        offset_seed: with ``train=False`` and a crop, place each patch's evaluation window at an
            offset drawn from ``keyed_generator(offset_seed, N)`` (N the patch number) instead of
            the centre, as the original evaluates a random 224 px window; refused with ``train``.
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["validation", "test"] = "validation",
        crop: int | None = None,
        train: bool = False,
        *,
        label_source: Literal["dfc", "lc"] = "dfc",
        normalize: Literal["seed", "none"] = "seed",
        return_label_map: bool = False,
        transform: Transform | None = None,
        seed: int = 0,
        strict: bool = False,
        offset_seed: int | None = None,
    ) -> None:
        super().__init__(crop, train, normalize, return_label_map, transform, seed, offset_seed)
        if split not in _DFC_FOLDERS:
            raise ValueError(f"split must be one of {tuple(_DFC_FOLDERS)}, got {split!r}")
        if label_source not in ("dfc", "lc"):
            raise ValueError(f"label_source must be 'dfc' or 'lc', got {label_source!r}")
        self.root = Path(root)
        self.split = split
        self.label_source = label_source
        layout = _dfc_layout(self.root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"DFC2020 root {self.root} does not exist; expected:\n{layout}")
        top = _DFC_FOLDERS[split][0]
        self._label_bands = 1 if label_source == "dfc" else 4
        self._labels = _DFC_LABELS if label_source == "dfc" else _IGBP_LABELS
        index = packed_index(self.root, "dfc2020")
        if index is None:
            self.patch_ids, self._files, self.skipped, total = _pair_patches(
                _dfc_folders(self.root, split, label_source), strict, layout
            )
        else:
            entry = index["splits"].get(split)
            source = None if entry is None else entry["label_sources"].get(label_source)
            if source is None:
                raise FileNotFoundError(
                    f"{self.root / PACK_INDEX}: the {split} split with {label_source} labels was not packed "
                    f"(their folder was missing under {index['source_root']}; see 'absent' in the index)"
                )
            if strict and _incomplete(source["skipped"]):
                raise FileNotFoundError(
                    f"{self.root / PACK_INDEX}: patches of {split} lacked a file when packed from "
                    f"{index['source_root']}: {_incomplete(source['skipped'])}"
                )
            self._use_packed(self.root, entry, source["rows"], label_source)
            self.patch_ids = [entry["ids"][row] for row in source["rows"]]
            self.skipped, total = dict(source["skipped"]), source["patches_seen"]
        self._offset_keys = [(number,) for number in self.patch_ids]
        if not self.patch_ids:
            raise ValueError(
                f"DFC2020 split {split!r} under {self.root / top} has no complete patch (skipped: {self.skipped})"
            )
        self._learn_patch_size()
        _log_summary(f"DFC2020Dataset({split})", len(self.patch_ids), total, self.skipped)


_SEN12MS_SEASONS = {
    "spring": "ROIs1158_spring",
    "summer": "ROIs1868_summer",
    "fall": "ROIs1970_fall",
    "winter": "ROIs2017_winter",
}
# The ROI number of each season folder (ROIs1158_spring -> 1158): part of a patch's offset key.
_SEASON_ROI = {season: int(folder[4:8]) for season, folder in _SEN12MS_SEASONS.items()}
_SCENE_FOLDER = re.compile(r"^(s1|s2|lc)_(\d+)$")


def _sen12ms_layout(root: Path) -> str:
    return "\n".join(
        [f"{root}/"]
        + [
            f"  {folder}/{{s1,s2,lc}}_<scene>/{folder}_{{s1,s2,lc}}_<scene>_p<N>.tif"
            for folder in _SEN12MS_SEASONS.values()
        ]
        + [_pack_hint("sen12ms")]
    )


class _SeasonPatches(NamedTuple):
    """The complete triplets of one SEN12MS season, in scene then patch number order."""

    files: list[dict[str, Path]]
    scenes: list[int]
    numbers: list[int]
    skipped: dict[str, int]
    seen: int


def _sen12ms_season(root: Path, season: str, layout: str) -> _SeasonPatches:
    """Pair the s1 / s2 / lc files of every scene of ``season`` by patch number."""
    season_folder = root / _SEN12MS_SEASONS[season]
    scenes = sorted({int(m.group(2)) for m in map(_SCENE_FOLDER.match, _subfolders(season_folder)) if m})
    if not scenes:
        raise FileNotFoundError(f"no scene folders in {season_folder}; expected:\n{layout}")
    files: list[dict[str, Path]] = []
    scene_of: list[int] = []
    numbers: list[int] = []
    skipped: Counter[str] = Counter()
    seen = 0
    for scene in scenes:
        folders = {"s1": f"s1_{scene}", "s2": f"s2_{scene}", "label": f"lc_{scene}"}
        scene_numbers, scene_files, scene_skipped, scene_seen = _pair_patches(
            {m: season_folder / name for m, name in folders.items()}, strict=False, layout=layout
        )
        files += scene_files
        scene_of += [scene] * len(scene_numbers)
        numbers += scene_numbers
        skipped.update(scene_skipped)
        seen += scene_seen
    return _SeasonPatches(files, scene_of, numbers, dict(skipped), seen)


class SEN12MSDataset(_PatchDataset):
    """SEN12MS triplets (S1, S2, MODIS land cover) over the four season folders.

    Item layout, windows and normalisation as ``DFC2020Dataset``, labels from the ``lc`` band 1
    (IGBP 1-17 -> DFC -> 8 classes; 0 and 255 accepted as no data, i.e. ignore), ``"id"`` a str
    such as ``"ROIs1158_spring_106_p42"``. A file that turns out unreadable when its item is
    loaded (the public release has one), or that fails a check (bands, size, label codes), is
    logged once per process and message, counted in ``unreadable``, and the next patch is
    returned in its place.

    Args:
        root: the folder holding ``ROIs1158_spring``, ``ROIs1868_summer``, ``ROIs1970_fall``, ``ROIs2017_winter``, or a folder written by ``pack`` (same items; see ``pack``).
        seasons: the seasons to read.
        offset_seed: as in ``DFC2020Dataset``; a patch's offset is drawn from
            ``keyed_generator(offset_seed, ROI, scene, N)``, e.g. (offset_seed, 1158, 106, 42).
    """

    _MAX_SUBSTITUTES = 10

    def __init__(
        self,
        root: str | Path,
        seasons: Sequence[str] = ("spring", "summer", "fall", "winter"),
        crop: int | None = None,
        train: bool = False,
        *,
        normalize: Literal["seed", "none"] = "seed",
        return_label_map: bool = False,
        transform: Transform | None = None,
        seed: int = 0,
        offset_seed: int | None = None,
    ) -> None:
        super().__init__(crop, train, normalize, return_label_map, transform, seed, offset_seed)
        unknown = [season for season in seasons if season not in _SEN12MS_SEASONS]
        if unknown or not seasons:
            raise ValueError(f"seasons must be a non-empty subset of {tuple(_SEN12MS_SEASONS)}, got {tuple(seasons)}")
        self.root = Path(root)
        self.seasons = tuple(seasons)
        layout = _sen12ms_layout(self.root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"SEN12MS root {self.root} does not exist; expected:\n{layout}")
        self.patch_ids: list[str] = []
        self._offset_keys: list[tuple[int, ...]] = []
        skipped: Counter[str] = Counter()
        total = 0
        index = packed_index(self.root, "sen12ms")
        rows: list[int] = []
        for season in self.seasons:
            if index is None:
                found = _sen12ms_season(self.root, season, layout)
                self._files += found.files
                scenes, numbers = found.scenes, found.numbers
                season_skipped, seen = found.skipped, found.seen
            else:
                entry = index["splits"]["all"]
                packed = entry["seasons"].get(season)
                if packed is None:
                    raise FileNotFoundError(
                        f"{self.root / PACK_INDEX}: season {season} was not packed (packed: {tuple(entry['seasons'])})"
                    )
                start, stop = packed["rows"]
                rows += range(start, stop)
                scenes, numbers = entry["scene"][start:stop], entry["patch"][start:stop]
                season_skipped, seen = packed["skipped"], packed["patches_seen"]
            self.patch_ids += [f"{_SEN12MS_SEASONS[season]}_{scene}_p{n}" for scene, n in zip(scenes, numbers)]
            self._offset_keys += [(_SEASON_ROI[season], scene, n) for scene, n in zip(scenes, numbers)]
            skipped.update(season_skipped)
            total += seen
        if index is not None:
            self._use_packed(self.root, index["splits"]["all"], rows, "lc")
        self.skipped = dict(skipped)
        self._label_bands = 4
        self._labels = _IGBP_LABELS
        self._unreadable = _SharedCounter()
        self._logged_errors: set[str] = set()
        if not self.patch_ids:
            raise ValueError(
                f"SEN12MS under {self.root}, seasons {self.seasons}: no complete patch (skipped: {self.skipped})"
            )
        self._learn_patch_size()
        _log_summary(f"SEN12MSDataset({','.join(self.seasons)})", len(self.patch_ids), total, self.skipped)

    @property
    def unreadable(self) -> int:
        """Loads that failed on an unreadable file and were replaced by the next patch (all workers)."""
        return self._unreadable.value

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(min(self._MAX_SUBSTITUTES, len(self))):
            try:
                return super().__getitem__((index + attempt) % len(self))
            except DataFileError as error:
                self._unreadable.add(1)
                if str(error) not in self._logged_errors:
                    self._logged_errors.add(str(error))
                    patch = self.patch_ids[(index + attempt) % len(self)]
                    logger.warning("skipping SEN12MS patch %s: %s", patch, error)
        raise DataFileError(f"{self._MAX_SUBSTITUTES} consecutive SEN12MS patches from index {index} are unreadable")


# ---------------------------------------------------------------------------------------------
# Packing: python datasets.py pack {dfc2020,sen12ms,meterml} ROOT OUT


class _Column(NamedTuple):
    """One packed array, ``OUT/<split>/<name>.npy``: the shape of one row, the dtype, and the
    band count of its GeoTIFF source files (0: .npy source files)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    tif_bands: int = 0


class _SplitPlan(NamedTuple):
    """One split to pack: its columns, the source files of every row (column -> path) and its
    record for the index (ids, skip counts), to which packing adds arrays and unreadable files."""

    columns: list[_Column]
    sources: list[dict[str, str]]
    record: dict[str, Any]


# Band counts of the GeoTIFF columns. S1 is packed as float32, the dtype of the files: the loader
# computes in float32, and float16 (about 0.01 dB steps between -25 and 0 dB) would change the
# items, which must stay identical; a quantisation would also lose NaN / +-inf, which are counted.
_TIF_BANDS = {"s1": 2, "s2": 13, "dfc": 1, "lc": 4}
_TIF_LABELS = {"dfc": _DFC_LABELS, "lc": _IGBP_LABELS}


def _patch_columns(sources: list[dict[str, str]], labels: Sequence[str], split: str) -> list[_Column]:
    """Columns of a patch split, sized by its first readable S1 file: every patch of a packed
    split has that size (a patch of another size is reported as unreadable)."""
    for files in sources:
        try:
            with _open_tif(Path(files["s1"]), 2) as src:
                size = (src.height, src.width)
                break
        except DataFileError:
            continue
    else:
        raise DataFileError(f"split {split}: none of its {len(sources)} S1 files can be read, so nothing can be packed")
    columns = [_Column("s1", (2, *size), "float32", 2), _Column("s2", (13, *size), "uint16", 13)]
    return columns + [_Column(label, size, "uint8", _TIF_BANDS[label]) for label in labels]


def _plan_dfc2020(root: Path, seasons: Sequence[str]) -> tuple[dict[str, _SplitPlan], list[str]]:
    """Both splits that exist, with dfc and lc labels where their folders exist. A row is a patch
    complete for at least one label source; each source keeps its own rows and skip counts, as
    ``DFC2020Dataset`` pairs them."""
    layout = _dfc_layout(root)
    plans: dict[str, _SplitPlan] = {}
    absent: list[str] = []
    for split, (top, _) in _DFC_FOLDERS.items():
        if not (root / top).is_dir():
            absent.append(f"split {split} ({root / top})")
            continue
        paired = {}
        for label in ("dfc", "lc"):
            folders = _dfc_folders(root, split, label)
            if folders["label"].is_dir():
                paired[label] = _pair_patches(folders, strict=False, layout=layout)
            else:
                absent.append(f"{label} labels of {split} ({folders['label']})")
        if not paired:
            raise FileNotFoundError(f"{root / top}: neither dfc nor lc label folder found; expected:\n{layout}")
        files_of: dict[int, dict[str, str]] = {}
        for label, (numbers, files, _, _) in paired.items():
            for number, paths in zip(numbers, files):
                files_of.setdefault(number, {"s1": str(paths["s1"]), "s2": str(paths["s2"])})[label] = str(paths["label"])
        numbers = sorted(files_of)
        row_of = {number: row for row, number in enumerate(numbers)}
        sources = [files_of[number] for number in numbers]
        record = {
            "ids": numbers,
            "label_sources": {
                label: {"rows": [row_of[n] for n in found], "skipped": skipped, "patches_seen": seen}
                for label, (found, _, skipped, seen) in paired.items()
            },
            "skipped": {f"{label} labels: {reason}": n for label, p in paired.items() for reason, n in p[2].items()},
        }
        if sources:
            plans[split] = _SplitPlan(_patch_columns(sources, list(paired), split), sources, record)
        else:
            absent.append(f"split {split} (no complete patch)")
    if not plans:
        raise FileNotFoundError(f"no DFC2020 split with complete patches under {root}; expected:\n{layout}")
    return plans, absent


def _plan_sen12ms(root: Path, seasons: Sequence[str]) -> tuple[dict[str, _SplitPlan], list[str]]:
    """One split, "all", over ``seasons`` in the canonical season order, scenes and patch
    numbers ascending (the order of ``SEN12MSDataset``); per row its season, scene and number."""
    layout = _sen12ms_layout(root)
    sources: list[dict[str, str]] = []
    record: dict[str, Any] = {"season": [], "scene": [], "patch": [], "seasons": {}, "skipped": {}}
    for season in _SEN12MS_SEASONS:
        if season not in seasons:
            continue
        found = _sen12ms_season(root, season, layout)
        start = len(sources)
        sources += [{"s1": str(f["s1"]), "s2": str(f["s2"]), "lc": str(f["label"])} for f in found.files]
        record["season"] += [season] * len(found.files)
        record["scene"] += found.scenes
        record["patch"] += found.numbers
        record["seasons"][season] = {"rows": [start, len(sources)], "skipped": found.skipped, "patches_seen": found.seen}
        for reason, count in found.skipped.items():
            record["skipped"][f"{season}: {reason}"] = count
    if not sources:
        raise FileNotFoundError(f"no complete SEN12MS triplet under {root}; expected:\n{layout}")
    absent = [f"season {season}" for season in _SEN12MS_SEASONS if season not in seasons]
    return {"all": _SplitPlan(_patch_columns(sources, ["lc"], "all"), sources, record)}, absent


def _npy_dtype(path: Path) -> np.dtype | None:
    """The dtype in a .npy header (the data is not read), or None when the file cannot be opened."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False).dtype
    except (OSError, ValueError, EOFError):
        return None


def _plan_meterml(root: Path, seasons: Sequence[str]) -> tuple[dict[str, _SplitPlan], list[str]]:
    """Every split whose metadata exists: its image folders, resolved as ``MeterMLDataset``
    resolves them, each once. Columns keep the files' dtype (their common type; wider than 4
    bytes becomes float32, what the loader computes in anyway)."""
    plans: dict[str, _SplitPlan] = {}
    absent: list[str] = []
    for split in ("train", "val", "test"):
        metadata = next((p for p in (root / f"{split}_dataset.geojson", root / f"{split}_dataset.json") if p.is_file()), None)
        if metadata is None:
            absent.append(f"split {split} (no {split}_dataset.geojson or .json)")
            continue
        written, _ = MeterMLDataset._read_features(metadata)
        resolved = _resolve_image_folders(root, written)
        folders = list(dict.fromkeys(path.relative_to(root).as_posix() for path in resolved if path is not None))
        missing = sum(path is None for path in resolved)
        columns = []
        for file, (column, shape) in _METERML_ARRAYS.items():
            found = {dtype for folder in folders if (dtype := _npy_dtype(root / folder / file)) is not None}
            numeric = [dtype for dtype in found if np.issubdtype(dtype, np.number)]
            dtype = np.result_type(*numeric) if numeric else np.dtype(np.float32)
            columns.append(_Column(column, shape, str(dtype if dtype.itemsize <= 4 else np.dtype(np.float32))))
        sources = [{column: str(root / folder / file) for file, (column, _) in _METERML_ARRAYS.items()} for folder in folders]
        record = {
            "metadata": metadata.name,
            "folders": folders,
            "features": len(written),
            "skipped": {"image folder missing": missing} if missing else {},
        }
        plans[split] = _SplitPlan(columns, sources, record)
    if not plans:
        raise FileNotFoundError(f"no METER-ML metadata under {root}; expected:\n{_meterml_layout(root)}")
    return plans, absent


_PLANNERS = {"dfc2020": _plan_dfc2020, "sen12ms": _plan_sen12ms, "meterml": _plan_meterml}


def _pack_value(column: _Column, path: Path) -> np.ndarray:
    """One row of ``column`` read from its source file, in the column's dtype and shape.

    Raises ``DataFileError`` naming the file: unreadable, wrong band count, size or shape, an S2
    that uint16 cannot hold, a label map that is not integer codes 0-255. Documented-code checks
    of label maps are left to the loader (``_class_map``), per window as for GeoTIFFs.
    """
    if not column.tif_bands:
        return _read_npy(path, column.shape).astype(column.dtype)
    size = column.shape[-2:]
    with _open_tif(path, column.tif_bands) as src:
        if (src.height, src.width) != size:
            raise DataFileError(
                f"{path}: patch of {src.height} x {src.width} px; the packed split holds {size[0]} x {size[1]} px "
                f"patches (the size of its first readable S1 file)"
            )
        data = src.read(1) if column.name in _TIF_LABELS else src.read()
    if column.name == "s1":
        return data.astype(np.float32)
    if column.name == "s2":
        if not np.can_cast(data.dtype, np.uint16, "safe"):
            raise DataFileError(f"{path}: expected uint16 S2 reflectance x 10000, found dtype {data.dtype}")
        return data.astype(np.uint16)
    if data.dtype.kind not in "ui" or (data.size and (int(data.min()) < 0 or int(data.max()) > 255)):
        _class_map(data, path, _TIF_LABELS[column.name])  # raises the loader's own message
    return data.astype(np.uint8)


_FAULT_KINDS = (
    ("cannot read", "unreadable file"),
    ("bands", "wrong band count"),
    ("label codes", "undocumented label codes"),
    ("dtype", "wrong dtype"),
    (" px", "wrong size"),
    ("shape", "wrong shape"),
)


def _fault_kind(message: str) -> str:
    return next((kind for key, kind in _FAULT_KINDS if key in message), "other")


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """Replace ``path`` atomically: a reader (or a later run after a kill) sees the old or the new file."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as file:
        json.dump(content, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


def _pack_split(
    out: Path, split: str, plan: _SplitPlan, state: dict[str, Any], progress: Path, checkpoint_every: int
) -> None:
    """Fill the arrays of ``split`` from row ``state["splits"][split]["done"]`` on, recording the
    files that cannot be read; every ``checkpoint_every`` rows the arrays are flushed to disk and
    then the progress marker saved, so that a killed run resumes at the last checkpoint."""
    split_state = state["splits"].setdefault(split, {"done": 0, "unreadable": {}})
    done, rows = split_state["done"], len(plan.sources)
    (out / split).mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for column in plan.columns:
        path = out / split / f"{column.name}.npy"
        shape = (rows, *column.shape)
        if done:
            arrays[column.name] = np.load(path, mmap_mode="r+")
            if arrays[column.name].shape != shape or str(arrays[column.name].dtype) != column.dtype:
                raise DataFileError(f"{path}: an unfinished pack left another shape or dtype; delete {out} and pack again")
        else:
            arrays[column.name] = np.lib.format.open_memmap(path, mode="w+", dtype=column.dtype, shape=shape)
    unreadable: dict[str, dict[str, str]] = split_state["unreadable"]
    with tqdm(total=rows, initial=done, desc=f"pack {split}", unit="patch", disable=None) as bar:
        for row in range(done, rows):
            for column in plan.columns:
                path = plan.sources[row].get(column.name)
                if path is None:  # a DFC2020 patch without a file of this label source
                    continue
                try:
                    arrays[column.name][row] = _pack_value(column, Path(path))
                except DataFileError as error:
                    # Zeros rather than what a killed run may have left: a resumed pack equals an uninterrupted one.
                    arrays[column.name][row] = 0
                    unreadable.setdefault(column.name, {})[str(row)] = str(error)
                    logger.warning("not packed: %s", error)
            bar.update()
            if (row + 1) % checkpoint_every == 0 or row + 1 == rows:
                for array in arrays.values():
                    array.flush()
                split_state["done"] = row + 1
                _write_json(progress, state)


def _check_pack(out: Path, plans: dict[str, _SplitPlan], splits: dict[str, Any]) -> dict[str, Any]:
    """Reopen every packed array (shape and dtype as the index says) and count per split what
    was packed, what could not be read and why, and what was skipped before packing and why."""
    check: dict[str, Any] = {}
    for split, plan in plans.items():
        entry = splits[split]
        for column, spec in entry["arrays"].items():
            array = np.load(out / spec["file"], mmap_mode="r")
            if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                raise DataFileError(f"{out / spec['file']}: holds {array.shape} {array.dtype}, expected {spec}")
        bad_rows = set().union(*(rows.keys() for rows in entry["unreadable"].values()))
        reasons = Counter(
            f"{column}: {_fault_kind(message)}" for column, rows in entry["unreadable"].items() for message in rows.values()
        )
        check[split] = {
            "rows": len(plan.sources),
            "packed": len(plan.sources) - len(bad_rows),
            "with unreadable files": len(bad_rows),
            "unreadable files by reason": dict(reasons),
            "skipped before packing": plan.record["skipped"],
        }
    return check


def pack(
    dataset: Literal["dfc2020", "sen12ms", "meterml"],
    root: str | Path,
    out: str | Path,
    *,
    seasons: Sequence[str] = tuple(_SEN12MS_SEASONS),
    checkpoint_every: int = 256,
) -> dict[str, Any]:
    """Pack the data set in ``root`` into ``out`` once, for fast reading; returns the index.

    Per split (DFC2020: ``validation``, ``test``; SEN12MS: ``all``, the ``seasons`` in one set;
    METER-ML: ``train``, ``val``, ``test``; those present) one .npy array per column, rows
    first, in ``out/<split>/``: ``s1`` (N, 2, H, W) float32 dB, ``s2`` (N, 13, H, W) uint16,
    ``dfc`` / ``lc`` (N, H, W) uint8 raw codes (lc: band 1, IGBP); METER-ML ``s1``, ``s2_10m``,
    ``s2_20m``, ``s2_60m`` (N, h, w, bands) as stored (naip.png is not packed). ``out/index.json``
    holds the format version, source root, ids, array shapes and dtypes, the files that could
    not be read (row -> message), what was skipped before packing and why, and the final check's
    counts. METER-ML metadata files are copied beside it.

    Resumable: a run that is killed leaves ``out/.pack_progress.json``; the same command resumes
    at the last checkpoint (every ``checkpoint_every`` rows). ``index.json`` is written last, in
    one atomic step, so a folder with an index is a complete pack. A complete ``out`` is left as
    it is. Unreadable files are logged, counted and recorded, never silently dropped; their
    rows stay (zeros) so that loading them raises the error their file gave.
    """
    if dataset not in _PLANNERS:
        raise ValueError(f"dataset must be one of {_PACK_DATASETS}, got {dataset!r}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive number of rows, got {checkpoint_every}")
    unknown = [season for season in seasons if season not in _SEN12MS_SEASONS]
    if unknown or not seasons:
        raise ValueError(f"seasons must be a non-empty subset of {tuple(_SEN12MS_SEASONS)}, got {tuple(seasons)}")
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset} root {root} does not exist")
    if packed_index(root) is not None:
        raise ValueError(f"{root} is already a packed data set ({root / PACK_INDEX})")
    existing = packed_index(out, dataset) if (out / PACK_INDEX).is_file() else None
    if existing is not None:
        logger.info("%s is already a complete pack of %s; nothing to do", out, existing["source_root"])
        return existing
    progress = out / _PACK_PROGRESS
    if out.is_dir() and not progress.is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no unfinished pack: choose a new or empty folder")
    started = time.perf_counter()
    plans, absent = _PLANNERS[dataset](root, seasons)
    plan_text = json.dumps(
        {name: {"columns": plan.columns, "sources": plan.sources} for name, plan in plans.items()}, sort_keys=True
    )
    state: dict[str, Any] = {"plan": hashlib.sha256(plan_text.encode()).hexdigest(), "splits": {}}
    if progress.is_file():
        previous = json.loads(progress.read_text())
        if previous.get("plan") != state["plan"]:
            raise FileExistsError(
                f"{out} holds an unfinished pack of other files (the source changed since, or another ROOT); "
                f"delete {out} or choose another OUT"
            )
        state = previous
        logger.info("resuming the unfinished pack in %s", out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(progress, state)
    for name in absent:
        logger.warning("%s: not found, not packed: %s", root, name)
    splits: dict[str, Any] = {}
    with rasterio.Env(**_GDAL_OPTIONS):
        for name, plan in plans.items():
            _pack_split(out, name, plan, state, progress, checkpoint_every)
            rows = len(plan.sources)
            splits[name] = {
                **plan.record,
                "rows": rows,
                "arrays": {
                    c.name: {"file": f"{name}/{c.name}.npy", "shape": [rows, *c.shape], "dtype": c.dtype}
                    for c in plan.columns
                },
                "unreadable": state["splits"][name]["unreadable"],
            }
    check = _check_pack(out, plans, splits)
    for name, counts in check.items():
        report = logger.warning if counts["with unreadable files"] or any(counts["skipped before packing"].values()) else logger.info
        report(
            "packed %s %s: %d of %d rows complete; rows with unreadable files: %d %s; skipped before packing: %s",
            dataset, name, counts["packed"], counts["rows"], counts["with unreadable files"],
            counts["unreadable files by reason"], counts["skipped before packing"] or "none",
        )
    if dataset == "meterml":
        for plan in plans.values():
            shutil.copyfile(root / plan.record["metadata"], out / plan.record["metadata"])
    index = {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "dataset": dataset,
        "source_root": str(root.resolve()),
        "absent": absent,
        "splits": splits,
        "check": check,
        "packed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds_of_last_run": round(time.perf_counter() - started, 3),
    }
    _write_json(out / PACK_INDEX, index)
    progress.unlink()
    return index


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python datasets.py pack {dfc2020,sen12ms,meterml} ROOT OUT``."""
    parser = argparse.ArgumentParser(prog="datasets.py", description="Tools for the data sets of this project.")
    commands = parser.add_subparsers(dest="command", required=True)
    pack_parser = commands.add_parser(
        "pack",
        help="copy a data set once into memory-mappable .npy arrays (resumable: rerun after a kill)",
        description=pack.__doc__.split("\n\n")[0],
    )
    pack_parser.add_argument("dataset", choices=_PACK_DATASETS)
    pack_parser.add_argument("root", type=Path, help="the data set as distributed")
    pack_parser.add_argument("out", type=Path, help="new or empty folder, or an unfinished pack to resume")
    pack_parser.add_argument(
        "--seasons", nargs="+", choices=tuple(_SEN12MS_SEASONS), default=tuple(_SEN12MS_SEASONS),
        help="SEN12MS seasons to pack; default all four",
    )
    pack_parser.add_argument(
        "--checkpoint-every", type=int, default=256, metavar="ROWS", help="rows between progress checkpoints; default 256"
    )
    args = parser.parse_args(argv)
    if args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be a positive number of rows, got {args.checkpoint_every}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        pack(args.dataset, args.root, args.out, seasons=args.seasons, checkpoint_every=args.checkpoint_every)
    except (OSError, ValueError) as error:
        parser.exit(1, f"datasets.py pack: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
