"""Paired Sentinel-1 / Sentinel-2 datasets: METER-ML, DFC2020 and SEN12MS, as distributed.

One module of about 1,300 lines, on purpose: the outside checks import the readers as
``datasets.<name>`` (../shared/specs/contract.md), and the three readers share the fault counting,
crop windows, label rules and the packed-format reader. Its sections, in order: the shared base,
the packed-format reader, METER-ML (with ``split_overlap`` and ``balanced_indices``), DFC2020 and
SEN12MS. The packer is ``pack.py``.

Every item is a dict with ``"s1"`` (2, H, W) and ``"s2"`` (C, H, W) float32 tensors, a ``"label"``,
a ``"multilabel"`` float32 multi-hot vector and the sample's ``"id"``.

Randomness (random crops) comes from a ``torch.Generator`` seeded from (seed, epoch, index)
only: the draws do not depend on the DataLoader worker that loads the item, differ between items
and epochs, and a fixed seed reproduces a run. Call ``set_epoch`` before each epoch; the epoch
lives in shared memory, so persistent workers see it too. Augmentation is not done here: the
scripts augment whole batches on the device (``augment.Views``).

Problems with the data are reported, never silently absorbed: samples whose files are missing
(and METER-ML metadata entries repeated or contradicting each other) are counted in ``skipped``
and logged once when the dataset is built; non-finite pixels (NaN, +-inf) are replaced (S1 +-inf
clipped as the original clips them), counted per item, modality and kind in ``nonfinite_counts``
(summed over worker processes; ``nonfinite_by_file`` names the files) and logged once per process; patches with an all-zero S1 or S2 image are counted in ``all_zero_patches`` and logged
once per process; a file that cannot be read, has the wrong shape or holds undocumented label
codes raises ``DataFileError`` naming the file.

Packed data sets: ``python datasets.py pack {dfc2020,sen12ms,meterml} ROOT OUT`` (``pack``) copies a
data set once into a few large .npy arrays per split plus ``OUT/index.json``; every dataset class
accepts such a folder as ``root`` and returns the same items, reading only the crop window from
the memory-mapped arrays instead of opening three or four files per sample. Files that could not
be read when packing raise the same ``DataFileError`` (SEN12MS: substitute the next patch) when
their item is loaded, so a packed set behaves like its source, broken files included.
"""
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NamedTuple

import numpy as np
import rasterio
import rasterio.errors
import torch
from rasterio.windows import Window
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info
from tqdm import tqdm

from augment import keyed_generator
from losses import IGNORE

logger = logging.getLogger(__name__)

class DataFileError(ValueError):
    """A data file that cannot be read or has the wrong shape; the message names the file."""


class CropError(ValueError):
    """A crop larger than the data set's patches; the message names both sizes."""


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
    """What all datasets share: epoch, per-item generator, fault counting."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._nonfinite = torch.zeros((0, 2, 3), dtype=torch.int64)  # sized by _init_counts
        self._all_zero_patches = _SharedCounter()
        self._nonfinite_logged = False
        self._all_zero_logged = False

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws of ``epoch``; seen by DataLoader workers, persistent ones too."""
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    NONFINITE_KINDS = ("nan", "+inf", "-inf")

    def _init_counts(self, n: int) -> None:
        """Per item and modality (S1, S2), the non-finite values met, by kind: (n, 2, 3) int64 in
        shared memory, so that DataLoader workers add to it and the main process reads it. Two
        workers add to one cell only when they read the same item at the same moment (an item
        repeated within an epoch): then a count may come out low."""
        self._nonfinite = torch.zeros((n, 2, len(self.NONFINITE_KINDS)), dtype=torch.int64).share_memory_()

    @property
    def nonfinite_counts(self) -> Tensor:
        """(items, 2, 3) int64: NaN, +inf and -inf values met so far in each item's S1 and S2
        files (every read counted: a file read in three epochs counts three times)."""
        return self._nonfinite

    @property
    def nonfinite_pixels(self) -> int:
        """Non-finite values (NaN, +inf, -inf) met so far, over all modalities, bands and
        worker processes."""
        return int(self._nonfinite.sum())

    @property
    def nan_pixels(self) -> int:
        """The NaN values among ``nonfinite_pixels``."""
        return int(self._nonfinite[..., 0].sum())

    def _source_name(self, index: int, modality: int) -> str:
        """The file of item ``index``'s S1 (modality 0) or S2 (1) image, for reports."""
        raise NotImplementedError

    def nonfinite_by_file(self, counts: Tensor | None = None) -> dict[str, dict[str, int]]:
        """file -> {"nan", "+inf", "-inf"} for every file with a non-finite value met, from
        ``counts`` (default ``nonfinite_counts``; pass the sum over torchrun ranks)."""
        counts = self._nonfinite if counts is None else counts
        found = {}
        for index, modality in (counts.sum(-1) > 0).nonzero().tolist():
            found[self._source_name(index, modality)] = dict(zip(self.NONFINITE_KINDS, counts[index, modality].tolist()))
        return found

    @property
    def all_zero_patches(self) -> int:
        """Samples read so far (all worker processes) whose S1 or S2 image was zero everywhere;
        DFC2020 / SEN12MS look at the window that was read."""
        return self._all_zero_patches.value

    def _generator(self, index: int) -> torch.Generator:
        return keyed_generator(self.seed, self.epoch, index)

    def _count_nonfinite(self, x: Tensor, path: str | Path, replacement: str, index: int, modality: int) -> Tensor:
        """Mask (same shape as x) of the non-finite values of ``x``, item ``index``'s S1
        (``modality`` 0) or S2 (1) read from ``path``: counted by kind, and logged the first time
        in this process."""
        nonfinite = ~torch.isfinite(x)
        count = int(nonfinite.sum())
        if count:
            nan = int(torch.isnan(x).sum())
            positive = int((x == float("inf")).sum())
            self._nonfinite[index, modality] += torch.tensor([nan, positive, count - nan - positive])
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
        # The index lists one id (folder, scene and patch) per row of every array: an edited index
        # would silently pair items with other rows, or leave rows out.
        listed = {key: len(entry[key]) for key in ("ids", "folders", "scene", "patch") if key in entry}
        rows = {column: spec["shape"][0] for column, spec in self.specs.items()}
        if len(set(listed.values()) | set(rows.values())) > 1:
            raise DataFileError(f"{root / PACK_INDEX}: the index lists {listed} rows but the arrays hold {rows}: the "
                                f"index was edited or the pack is damaged; pack again into an empty folder")
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
        "                      (sentinel-2-20m.npy, sentinel-2-60m.npy, naip.png: not read)",
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
}


class MeterMLDataset(_PairedDataset):
    """METER-ML image sets (Zhu et al. 2022): S1 and S2 at 10 m, 72 x 72 px, methane source classes.

    Item: ``"s1"`` (2, 72, 72) VV, VH; ``"s2"`` (4, 72, 72) B2, B3, B4, B8; ``"label"`` the
    7-class seed index (a compound ``Type`` takes its first name); ``"multilabel"`` (6,) float32
    over ``FACILITIES`` (zeros for a negative), the target of the METER-ML paper's own
    multi-label task; ``"id"`` the image folder's name.

    ``normalize="seed"``: per-channel standardisation with the seed's constants of the raw values.
    Non-finite values (NaN, +-inf) become 0 after
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
        seed: kept for the interface of the other data sets (METER-ML items draw nothing).
        repeated: ``"keep"`` every entry of a folder listed several times (the original), or
            ``"first"`` only its first entry.
        image_dirs: keep only the samples whose folder resolves under these top folders of
            ``root`` (e.g. ``["train_images_1"]``), the others counted in ``skipped``.
    """

    classes = ["CAFOs", "Landfills", "Mines", "Negative", "ProcessingPlants", "RefineriesAndTerminals", "WWTreatment"]
    FACILITIES = ["CAFOs", "Landfills", "Mines", "ProcessingPlants", "RefineriesAndTerminals", "WWTreatment"]
    NEGATIVE = 3
    S1_MEAN = (1652.7944, 1258.3584)
    S1_STD = (290.2874, 280.4149)
    S2_MEAN = (1025.2214, 1138.3673, 1194.6796, 2637.0828)
    S2_STD = (724.7973, 545.1207, 514.9276, 1051.9325)

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "val", "test"] = "train",
        geojson: str | Path | None = None,
        *,
        exclude_negatives: bool = False,
        normalize: Literal["seed", "none"] = "seed",
        seed: int = 0,
        strict: bool = False,
        repeated: Literal["keep", "first"] = "keep",
        image_dirs: Sequence[str] | None = None,
    ) -> None:
        super().__init__(seed)
        for name, value, allowed in [
            ("split", split, ("train", "val", "test")),
            ("repeated", repeated, ("keep", "first")),
            ("normalize", normalize, ("seed", "none")),
        ]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.root = Path(root)
        self.split = split
        self.normalize = normalize
        if not self.root.is_dir():
            raise FileNotFoundError(f"METER-ML root {self.root} does not exist; expected:\n{_meterml_layout(self.root)}")
        index = packed_index(self.root, "meterml")
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
        if image_dirs is not None:
            tops = [path.relative_to(self.root).parts[0] if path is not None and path.is_relative_to(self.root)
                    else None for path in resolved]
            outside = keep & torch.tensor([top not in image_dirs for top in tops], dtype=torch.bool)
            self.skipped[f"image folder outside {', '.join(image_dirs)}"] = int(outside.sum())
            keep &= ~outside
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
        self._init_counts(len(self._folders))
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

    def _source_name(self, index: int, modality: int) -> str:
        file = ("sentinel-1.npy", "sentinel-2-10m.npy")[modality]
        if self._packed is None:
            return str(self._folders[index] / file)
        packed, row = self._packed[index]
        return packed.name(_METERML_ARRAYS[file][0], row, f"{self._folders[index].name}/{file}")

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
        nonfinite = self._count_nonfinite(x, name, "0 after normalisation", index, int(file != "sentinel-1.npy"))
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
        multilabel = self.multilabels[index].clone()
        item: dict[str, Any] = {
            "s1": s1,
            "s2": s2,
            "label": int(self.labels[index]),
            "multilabel": multilabel,
            "id": folder.name,
        }
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
        seed: int,
        offset_seed: int | None,
    ) -> None:
        super().__init__(seed)
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

    def _learn_patch_size(self, root: Path) -> None:
        """Take the patches' (height, width) from the first S1 file (one open; packed: the array
        shape): whole patches, which a DataLoader stacks, must all have it, and a crop must fit
        it (``CropError`` otherwise, before any item is read). An unreadable file is passed over
        here (its item reports it); ten in a row raise."""
        if self._packed is not None:
            self._patch_size = tuple(self._packed.specs["s1"]["shape"][-2:])
            self._patch_size_source = self._packed.root / self._packed.specs["s1"]["file"]
        else:
            last_error = None
            with rasterio.Env(**_GDAL_OPTIONS):
                for paths in self._files[:10]:
                    try:
                        with _open_tif(paths["s1"], 2) as src:
                            self._patch_size = (src.height, src.width)
                            self._patch_size_source = paths["s1"]
                            break
                    except DataFileError as error:
                        last_error = error
            if self._patch_size is None:
                raise DataFileError(f"none of the first S1 files gives the patch size; the last: {last_error}")
        if self.crop is not None and self.crop > min(self._patch_size):
            height, width = self._patch_size
            raise CropError(f"a crop of {self.crop} px does not fit the {height} x {width} px patches of {root}")

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

    def _prepared(self, raw: np.ndarray, path: str | Path, s1: bool, index: int) -> Tensor:
        """(bands, h, w) float32 of a window read from ``path``, non-finite values counted. With
        ``normalize="seed"``: NaN -> 0 dB (S1) or 0, then S1 clipped to [-25, 0] dB + 25 and S2 to
        [0, 10000], which takes -inf and +inf to the ends of the range, as the original's
        ``np.clip``. With ``normalize="none"``: every non-finite value -> 0. The per-channel
        maximum division is left to ``seed_normalize``."""
        # Always a copy: packed windows are read-only views of the memory map.
        x = torch.from_numpy(np.array(raw, dtype=np.float32))
        # A finite sum rules out NaN and +-inf in one vectorised pass, cheaper than the mask.
        if np.issubdtype(raw.dtype, np.floating) and not torch.isfinite(x.sum()):
            clipped = self.normalize == "seed"
            nonfinite = self._count_nonfinite(x, path, ("NaN by 0 dB, +-inf clipped to 0 / -25 dB" if s1 else
                                                        "NaN by 0, +-inf clipped") if clipped else "0", index, int(not s1))
            x.masked_fill_(torch.isnan(x) if clipped else nonfinite, 0.0)
        if self.normalize == "none":
            return x
        return x.clamp_(-25.0, 0.0).add_(25.0) if s1 else x.clamp_(0.0, 10000.0)

    def _source_name(self, index: int, modality: int) -> str:
        name = ("s1", "s2")[modality]
        if self._packed is None:
            return str(self._files[index][name])
        return self._packed.name(name, self._rows[index], f"patch {self.patch_ids[index]}")

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
        s1 = self._prepared(s1_raw, names["s1"], True, index)
        s2 = self._prepared(s2_raw, names["s2"], False, index)
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
        if self.normalize == "seed":
            item["s1"], item["s2"] = seed_normalize(s1), seed_normalize(s2)
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
    augmented). ``crop=None``: the whole patch (every patch must have the size of the first);
    ``crop=224``: a 224 x 224 window, random per (seed, epoch, index) when ``train``, else
    centred, or with ``offset_seed`` at a random offset drawn once per patch number (the same
    windows in every evaluation, epoch and run, whatever the DataLoader order or worker). S1, S2
    and labels share the window; only the window is read from disk.

    ``normalize="seed"`` (what the released DualResNet50 checkpoints were trained with, per crop):
    S1 NaN -> 0 dB (what ``np.nan_to_num`` gives in the public SEN12MS loaders), clip to
    [-25, 0] dB (-inf -> -25, +inf -> 0, as the original's ``np.clip``), + 25; S2 clip to
    [0, 10000]; then every channel of the crop divided by its own maximum (+ 1e-5)
    (``seed_normalize``). ``normalize="none"``: S1 in dB and S2 raw, as float32, non-finite
    values -> 0 (for looking at the data).

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
        seed: int = 0,
        strict: bool = False,
        offset_seed: int | None = None,
    ) -> None:
        super().__init__(crop, train, normalize, return_label_map, seed, offset_seed)
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
        self._learn_patch_size(self.root)
        self._init_counts(len(self.patch_ids))
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
        seed: int = 0,
        offset_seed: int | None = None,
    ) -> None:
        super().__init__(crop, train, normalize, return_label_map, seed, offset_seed)
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
        self._learn_patch_size(self.root)
        self._init_counts(len(self.patch_ids))
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


if __name__ == "__main__":
    # `python datasets.py pack ...` (the documented command) runs the packer of pack.py.
    from pack import main

    sys.exit(main())
