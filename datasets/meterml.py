"""METER-ML (Zhu et al. 2022): 72 x 72 px S1 / S2 image sets of methane source facilities."""
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .base import PairedDataset, log_summary
from .packed import INDEX, Column, PackedSource, PackedSplit, SplitPlan, hint, packed_index
from .sources import NpySource, subfolders

logger = logging.getLogger("datasets")

IMAGE_DIRS = ("train_images_1", "train_images_2", "train_images_3", "val_images", "test_images")
# key -> (file, (height, width, bands)) of the arrays the method reads, and their packed columns
FILES = {"s1": ("sentinel-1.npy", (72, 72, 2)), "s2": ("sentinel-2-10m.npy", (72, 72, 4))}
COLUMNS = {"s1": "s1", "s2": "s2_10m"}


def layout(root: Path) -> str:
    return "\n".join([
        f"{root}/",
        "  train_dataset.geojson   (or train_dataset.json; likewise val_, test_)",
        "  train_images_1/<id>/sentinel-1.npy           72 x 72 x 2",
        "                      sentinel-2-10m.npy       72 x 72 x 4",
        "                      (sentinel-2-20m.npy, sentinel-2-60m.npy, naip.png: not read)",
        "  train_images_2/  train_images_3/  val_images/  test_images/",
        hint("meterml"),
    ])


def resolve_image_folders(root: Path, written: Sequence[str], listing: dict[str, set[str]] | None = None
                          ) -> list[Path | None]:
    """The folder of every ``Image_Folder`` value, or None when it is nowhere: the path as written
    wins, else the same name under ``IMAGE_DIRS`` (the archives extract there while the metadata may
    say ``train_images/<id>``). ``listing`` (parent -> names): a packed set's folders instead of
    the disk, so that it resolves as its source did. Each parent is listed once."""
    paths = [PurePosixPath(folder.replace("\\", "/")) for folder in written]
    parents = dict.fromkeys([str(path.parent) for path in paths] + list(IMAGE_DIRS))
    found = {p: subfolders(root / p) if listing is None else listing.get(p, set()) for p in parents}
    resolved: list[Path | None] = []
    for path in paths:
        if path.name in found[str(path.parent)]:
            resolved.append(root / path)
        else:
            parent = next((p for p in IMAGE_DIRS if path.name in found[p]), None)
            resolved.append(None if parent is None else root / parent / path.name)
    return resolved


def _first_entries(ids: Sequence[str], types: Sequence[str]) -> tuple[list[int], dict[str, int], dict[str, list[str]]]:
    """One metadata entry per image set id (the first): the kept indices, id -> extra entries,
    and the ids listed with different ``Type`` values -> those values in order of appearance."""
    first: dict[str, int] = {}
    entries: Counter[str] = Counter()
    found: dict[str, list[str]] = {}
    for i, (sample_id, type_) in enumerate(zip(ids, types)):
        entries[sample_id] += 1
        if sample_id not in first:
            first[sample_id], found[sample_id] = i, [type_]
        elif type_ not in found[sample_id]:
            found[sample_id].append(type_)
    extra = {k: entries[k] - 1 for k in first if entries[k] > 1}
    return list(first.values()), extra, {k: found[k] for k in first if len(found[k]) > 1}


def read_features(path: Path) -> tuple[list[str], list[str]]:
    """``Image_Folder`` and ``Type`` of every feature of a GeoJSON FeatureCollection."""
    try:
        features = json.loads(path.read_text())["features"]
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
            raise ValueError(f"{path}: feature {i} lacks properties 'Image_Folder' and 'Type': "
                             f"{str(feature)[:200]}") from error
    return folders, types


def find_metadata(root: Path, split: str, geojson: str | Path | None = None) -> Path | None:
    candidates = ([root / geojson] if geojson is not None
                  else [root / f"{split}_dataset.{e}" for e in ("geojson", "json")])
    return next((c for c in candidates if c.is_file()), None)


class MeterMLDataset(PairedDataset):
    """METER-ML image sets: S1 and S2 at 10 m, 72 x 72 px, methane source classes.

    Item: ``"s1"`` (2, 72, 72) VV, VH; ``"s2"`` (4, 72, 72) B2, B3, B4, B8; ``"label"`` the
    7-class seed index (a compound ``Type`` takes its first name); ``"multilabel"`` (6,) over
    ``FACILITIES`` (the METER-ML paper's own multi-label target); ``"id"`` the image folder's name.
    ``normalize="seed"``: the seed's per-channel standardisation; non-finite values become 0 after
    it (the channel mean), counted. ``normalize="none"``: raw values.

    Metadata faults are reported in one log line and in ``skipped`` / ``problems``: missing image
    folders (skipped, or raised with ``strict``); folders listed more than once, kept once per
    entry as the original keeps every feature (``repeated="first"`` keeps the first entry).

    Args:
        root: the folder holding the GeoJSON files and image folders, or a packed copy.
        split: ``"train"``, ``"val"`` or ``"test"``: reads ``{split}_dataset.geojson`` or ``.json``.
        geojson: an explicit metadata path instead (relative to ``root``).
        exclude_negatives: drop the Negative samples (``Negative``, ``Roundabout``), counted.
        image_dirs: keep only the samples whose folder resolves under these top folders of ``root``
            (e.g. ``["train_images_1"]``), the others counted in ``skipped``.
    """

    classes = ["CAFOs", "Landfills", "Mines", "Negative", "ProcessingPlants", "RefineriesAndTerminals", "WWTreatment"]
    FACILITIES = ["CAFOs", "Landfills", "Mines", "ProcessingPlants", "RefineriesAndTerminals", "WWTreatment"]
    NEGATIVE = 3
    S1_MEAN = (1652.7944, 1258.3584)
    S1_STD = (290.2874, 280.4149)
    S2_MEAN = (1025.2214, 1138.3673, 1194.6796, 2637.0828)
    S2_STD = (724.7973, 545.1207, 514.9276, 1051.9325)

    def __init__(self, root: str | Path, split: Literal["train", "val", "test"] = "train",
                 geojson: str | Path | None = None, *, exclude_negatives: bool = False,
                 normalize: Literal["seed", "none"] = "seed", seed: int = 0, strict: bool = False,
                 repeated: Literal["keep", "first"] = "keep", image_dirs: Sequence[str] | None = None) -> None:
        super().__init__(seed)
        for name, value, allowed in [("split", split, ("train", "val", "test")),
                                     ("repeated", repeated, ("keep", "first")),
                                     ("normalize", normalize, ("seed", "none"))]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.root, self.split, self.normalize = Path(root), split, normalize
        if not self.root.is_dir():
            raise FileNotFoundError(f"METER-ML root {self.root} does not exist; expected:\n{layout(self.root)}")
        index = packed_index(self.root, "meterml")
        self.metadata = find_metadata(self.root, split, geojson)
        if self.metadata is None:
            tried = [geojson] if geojson is not None else [f"{split}_dataset.geojson", f"{split}_dataset.json"]
            raise FileNotFoundError(f"METER-ML metadata of split {split!r} not found: tried "
                                    f"{', '.join(str(self.root / t) for t in tried)}; expected:\n{layout(self.root)}")
        folders, types = read_features(self.metadata)
        total = len(folders)
        labels, multilabels = self._encode_types(types)
        ids = [PurePosixPath(folder.replace("\\", "/")).name for folder in folders]
        first, extra, conflicting = _first_entries(ids, types)
        duplicated = {k: n for k, n in extra.items() if k not in conflicting}
        if repeated == "first":
            folders = [folders[i] for i in first]
            labels, multilabels = labels[first], multilabels[first]
        location: dict[str, tuple[str, int]] = {}
        if index is not None:
            # Every packed folder of every split, first occurrence wins (a folder in two splits is packed twice).
            for name, entry in index["splits"].items():
                for row, folder in enumerate(entry["folders"]):
                    location.setdefault(folder, (name, row))
            listing: dict[str, set[str]] = {}
            for folder in location:
                listing.setdefault(str(PurePosixPath(folder).parent), set()).add(PurePosixPath(folder).name)
            resolved = resolve_image_folders(self.root, folders, listing)
        else:
            resolved = resolve_image_folders(self.root, folders)
        missing = [folder for folder, path in zip(folders, resolved) if path is None]
        if missing and strict:
            raise FileNotFoundError(f"{len(missing)} image folders of {self.metadata} not found under {self.root}, "
                                    f"e.g. {missing[:5]}; expected:\n{layout(self.root)}")
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
                    extra[k] for k in conflicting)
            self.problems["conflicting Type"] = list(conflicting)
            examples = "; ".join(f"{name}: {' vs '.join(found)}" for name, found in list(conflicting.items())[:5])
            details.append(f"Image_Folder with conflicting Types ({len(conflicting)} folders; {kept_how}), "
                           f"e.g. {examples}")
        if missing:
            self.skipped["image folder missing"] = len(missing)
            self.problems["image folder missing"] = [PurePosixPath(f.replace("\\", "/")).name for f in missing]
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
        if not self._folders:
            raise ValueError(f"{self.metadata}: no sample left of {total} features (skipped: {self.skipped})")
        if index is None:
            self.source = NpySource(self._folders, FILES)
        else:
            by_split: dict[str, list[int]] = {}  # packed split -> the samples it holds, in item order
            for i, path in enumerate(self._folders):
                by_split.setdefault(location[path.relative_to(self.root).as_posix()][0], []).append(i)
            sources = {}
            for name, samples in by_split.items():
                rows = [location[self._folders[i].relative_to(self.root).as_posix()][1] for i in samples]
                sources[name] = PackedSource(PackedSplit(self.root, index["splits"][name]), rows, COLUMNS,
                                             [self._folders[i].name for i in samples],
                                             {key: file for key, (file, _) in FILES.items()})
            positions = [("", 0)] * len(self._folders)
            for name, samples in by_split.items():
                for position, i in enumerate(samples):
                    positions[i] = (name, position)
            self.source = _MultiSplitSource(sources, positions)
            bad = sum(source.unreadable(("s1", "s2")) for source in self.source.sources.values())
            if bad:
                logger.warning("%s: %d of %d samples had a file that could not be read when packed; loading them "
                               "raises the packing-time error, as the files themselves would (messages in %s)",
                               self.root, bad, len(self._folders), self.root / INDEX)
        self._mean = {"s1": torch.tensor(self.S1_MEAN).view(-1, 1, 1), "s2": torch.tensor(self.S2_MEAN).view(-1, 1, 1)}
        self._std = {"s1": torch.tensor(self.S1_STD).view(-1, 1, 1), "s2": torch.tensor(self.S2_STD).view(-1, 1, 1)}
        self._init_counts(len(self._folders))
        detail = "".join(f"; {text}" for text in details)
        log_summary(f"MeterMLDataset({self.split})", len(self._folders), total, self.skipped, detail)
        if details and not any(self.skipped.values()):
            logger.warning("MeterMLDataset(%s): %d samples%s", self.split, len(self._folders), detail)

    @property
    def ids(self) -> list[str]:
        """The image folder name of every sample, in item order (a repeated entry repeats its id)."""
        return [folder.name for folder in self._folders]

    def _encode_types(self, types: list[str]) -> tuple[Tensor, Tensor]:
        """Seed labels (N,) int64 and facility multi-hot (N, 6) float32 of the ``Type`` strings."""
        known = set(self.classes) | {"Roundabout"}
        names = [[name.strip() for name in t.split("-")] for t in types]
        unknown = Counter(name for split_names in names for name in split_names if name not in known)
        if unknown:
            raise ValueError(f"{self.metadata}: unknown Type names (count): {dict(unknown)}; "
                             f"expected {sorted(known)}, several joined by '-'")
        index = {name: i for i, name in enumerate(self.classes)} | {"Roundabout": self.NEGATIVE}  # some releases
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

    def source_name(self, index: int, modality: int) -> str:
        return self.source.name(index, ("s1", "s2")[modality])

    def _prepared(self, raw: np.ndarray, name: str, key: str, index: int) -> Tensor:
        """(height, width, bands) as stored -> (bands, height, width) float32, standardised; a copy,
        so read-only packed views never reach in-place operations."""
        x = torch.from_numpy(np.ascontiguousarray(raw.transpose(2, 0, 1), dtype=np.float32))
        nonfinite = self._count_nonfinite(x, name, "0 after normalisation", index, int(key == "s2"))
        if self.normalize == "seed":
            x = (x - self._mean[key]) / self._std[key]
        return x.masked_fill_(nonfinite, 0.0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        arrays, names = self.source.read(index)
        self._count_all_zero([names[key] for key in ("s1", "s2") if not arrays[key].any()])
        return {
            "s1": self._prepared(arrays["s1"], names["s1"], "s1", index),
            "s2": self._prepared(arrays["s2"], names["s2"], "s2", index),
            "label": int(self.labels[index]), "multilabel": self.multilabels[index].clone(),
            "id": self._folders[index].name,
        }


class _MultiSplitSource:
    """Samples of one METER-ML split whose packed rows lie in several packed splits (a folder is
    packed once, under the first split that lists it)."""

    def __init__(self, sources: dict[str, PackedSource], positions: list[tuple[str, int]]) -> None:
        self.sources, self.positions = sources, positions

    def name(self, index: int, key: str) -> str:
        name, position = self.positions[index]
        return self.sources[name].name(position, key)

    def read(self, index: int, window_of: Any = None, keys: Sequence[str] = ("s1", "s2")):
        name, position = self.positions[index]
        return self.sources[name].read(position, None, keys)


def split_overlap(a: MeterMLDataset, b: MeterMLDataset) -> list[str]:
    """The image set ids that are samples of both ``a`` and ``b``, in ``a``'s order."""
    in_b = set(b.ids)
    return [sample_id for sample_id in dict.fromkeys(a.ids) if sample_id in in_b]


def _npy_dtype(path: Path) -> np.dtype | None:
    """The dtype in a .npy header (the data is not read), or None when the file cannot be opened."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False).dtype
    except (OSError, ValueError, EOFError):
        return None


def plan_pack(root: Path, seasons: Any = ()) -> tuple[dict[str, SplitPlan], list[str]]:
    """Every split whose metadata exists: its image folders resolved as ``MeterMLDataset`` does,
    each once. Columns keep the files' common dtype (wider than 4 bytes: float32)."""
    plans: dict[str, SplitPlan] = {}
    absent: list[str] = []
    for split in ("train", "val", "test"):
        metadata = find_metadata(root, split)
        if metadata is None:
            absent.append(f"split {split} (no {split}_dataset.geojson or .json)")
            continue
        written, _ = read_features(metadata)
        resolved = resolve_image_folders(root, written)
        folders = list(dict.fromkeys(path.relative_to(root).as_posix() for path in resolved if path is not None))
        columns = []
        for key, (file, shape) in FILES.items():
            found = {dtype for folder in folders if (dtype := _npy_dtype(root / folder / file)) is not None}
            numeric = [dtype for dtype in found if np.issubdtype(dtype, np.number)]
            dtype = np.result_type(*numeric) if numeric else np.dtype(np.float32)
            columns.append(Column(COLUMNS[key], shape, str(dtype if dtype.itemsize <= 4 else np.dtype(np.float32))))
        sources = [{COLUMNS[key]: str(root / folder / file) for key, (file, _) in FILES.items()} for folder in folders]
        missing = sum(path is None for path in resolved)
        record = {"metadata": metadata.name, "folders": folders, "features": len(written),
                  "skipped": {"image folder missing": missing} if missing else {}}
        plans[split] = SplitPlan(columns, sources, record)
    if not plans:
        raise FileNotFoundError(f"no METER-ML metadata under {root}; expected:\n{layout(root)}")
    return plans, absent
