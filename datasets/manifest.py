"""The researcher's own labelled S1 / S2 pairs, listed in a CSV file (a manifest).

Columns found by name in the header, in any order: ``s1``, ``s2`` (GeoTIFF paths, relative to
the CSV's folder or absolute), ``label`` (a class name, any string), optional ``split`` and
``id``; other columns are ignored. S1 and S2 of a row share their size, all rows share the band
counts. The classes are the distinct labels of the whole file in sorted order, so every split
numbers them alike. Pixels are read and normalised as DFC2020's (``patches.PatchDataset``): S1
backscatter in dB, S2 reflectance x 10000.
"""
import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import rasterio
import rasterio.errors
import torch

from .base import IGNORE, DataFileError
from .packed import INDEX, PackedSource, PackedSplit, SplitPlan, check_rows, packed_index, patch_columns
from .patches import PatchDataset
from .sources import GDAL_OPTIONS, TiffSource


class Row(NamedTuple):
    line: int  # the CSV line, 1 the header
    s1: Path
    s2: Path
    label: str
    split: str
    id: str


def is_manifest(root: str | Path) -> bool:
    """Whether ``root`` is a manifest CSV or a packed copy of one."""
    root = Path(root)
    if root.suffix.lower() == ".csv":
        return True
    return root.is_dir() and (root / INDEX).is_file() and (packed_index(root) or {}).get("dataset") == "manifest"


def read_manifest(path: Path) -> list[Row]:
    """Every row of the CSV, paths resolved; a missing column or an empty path names the line."""
    try:
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [name for name in ("s1", "s2") if name not in header]
            if missing:
                raise DataFileError(f"{path}: the header has no column {' or '.join(missing)} (found: {header}); "
                                    "expected columns s1, s2, label and optionally split, id")
            rows = []
            for line, record in enumerate(reader, start=2):
                record = {(k or "").strip(): (v or "").strip() for k, v in record.items()}
                for key in ("s1", "s2"):
                    if not record[key]:
                        raise DataFileError(f"{path}, line {line}: empty {key} path")
                s1, s2 = (Path(record[key]) if Path(record[key]).is_absolute() else path.parent / record[key]
                          for key in ("s1", "s2"))
                rows.append(Row(line, s1, s2, record.get("label", ""), record.get("split", ""),
                                record.get("id") or Path(record["s2"]).stem))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataFileError(f"cannot read the manifest {path}: {error}") from error
    if not rows:
        raise DataFileError(f"{path}: the manifest lists no row")
    return rows


def check_files(path: Path, rows: Sequence[Row]) -> tuple[int, int]:
    """Open every file's header: readable, S2 of S1's size, the band counts of the first row.
    Returns (S1 bands, S2 bands); a bad row raises naming the CSV line and the file."""
    bands: tuple[int, int] | None = None
    with rasterio.Env(**GDAL_OPTIONS):
        for row in rows:
            found = []
            for key in ("s1", "s2"):
                file = getattr(row, key)
                try:
                    with rasterio.open(file) as src:
                        found.append((src.count, src.height, src.width))
                except (rasterio.errors.RasterioError, OSError) as error:
                    raise DataFileError(f"{path}, line {row.line}: cannot read {key} file {file}: {error}") from None
            (b1, h1, w1), (b2, h2, w2) = found
            if (h1, w1) != (h2, w2):
                raise DataFileError(f"{path}, line {row.line}: {row.s2} is {h2} x {w2} px, its S1 {row.s1} {h1} x {w1}")
            if bands is None:
                bands = (b1, b2)
            elif (b1, b2) != bands:
                raise DataFileError(f"{path}, line {row.line}: {row.s1} / {row.s2} have {b1} / {b2} bands, the first "
                                    f"row {bands[0]} / {bands[1]}; every row needs the same band counts")
    return bands


class ManifestDataset(PatchDataset):
    """The rows of one split of a manifest (or all rows, ``split=None``); items as DFC2020's, with
    ``"label"`` the class index of the row's label (IGNORE where it has none and
    ``require_labels=False``), ``"multilabel"`` its one-hot and ``"id"`` the ``id`` column (default:
    the S2 file's stem). ``root`` is the CSV, or a folder written by ``pack.py manifest``.
    Evaluation windows with ``offset_seed`` are keyed by the CSV line."""

    def __init__(self, root: str | Path, split: str | None = None, crop: int | None = None, train: bool = False, *,
                 normalize: str = "seed", return_label_map: bool = False, seed: int = 0,
                 offset_seed: int | None = None, require_labels: bool = True) -> None:
        super().__init__(crop, train, normalize, return_label_map, seed, offset_seed)
        self.root = Path(root)
        index = packed_index(self.root, "manifest") if self.root.is_dir() else None
        if index is None:
            if not self.root.is_file():
                raise FileNotFoundError(f"manifest {self.root} does not exist")
            rows = read_manifest(self.root)
            where = str(self.root)
        else:
            record = index["splits"]["all"]
            rows = [Row(line, Path(s1), Path(s2), label, split_, id_) for line, s1, s2, label, split_, id_ in
                    zip(record["lines"], record["s1"], record["s2"], record["labels"], record["splits"], record["ids"])]
            where = index["source_root"]
        self.classes = sorted({row.label for row in rows if row.label})
        chosen = [row for row in rows if split is None or row.split == split]
        if not chosen:
            splits = sorted({row.split for row in rows})
            raise DataFileError(f"{where}: no row of split {split!r}; its splits: "
                                f"{', '.join(repr(s) for s in splits) if splits != [''] else 'none (no split column)'}")
        unlabelled = [row for row in chosen if not row.label]
        if unlabelled and require_labels:
            raise DataFileError(f"{where}, line {unlabelled[0].line}: no label ({len(unlabelled)} rows of split "
                                f"{split!r} have none), and this run needs labels")
        self.split = split
        self.patch_ids = [row.id for row in chosen]
        self._offset_keys = [(row.line,) for row in chosen]
        class_index = {name: i for i, name in enumerate(self.classes)}
        self._row_labels = [class_index.get(row.label, IGNORE) for row in chosen]
        if index is None:
            self.bands = dict(zip(("s1", "s2"), check_files(self.root, chosen)))
            self.source = TiffSource([{"s1": row.s1, "s2": row.s2} for row in chosen], {**self.bands, "label": 1})
        else:
            packed = PackedSplit(self.root, record)
            positions = {line: i for i, line in enumerate(record["lines"])}
            rows_of = check_rows(self.root, f"split {split!r}", [positions[row.line] for row in chosen], packed.rows,
                                 len(chosen))
            self.bands = {key: packed.specs[key]["shape"][1] for key in ("s1", "s2")}
            self.source = PackedSource(packed, rows_of, {"s1": "s1", "s2": "s2"}, [str(n) for n in self.patch_ids])
        self._majority = torch.tensor(self._row_labels, dtype=torch.int64)
        self._keys = ("s1", "s2")
        self._finish(self.root, f"ManifestDataset({split or 'all rows'})", len(chosen), {})

    def __getitem__(self, index: int) -> dict[str, Any]:
        window = lambda h, w, path: self._window(index, self._generator(index), h, w, path)  # noqa: E731
        arrays, names = self.source.read(index, window, ("s1", "s2"))
        self._count_all_zero([names[m] for m in ("s1", "s2") if not arrays[m].any()])
        label = self._row_labels[index]
        multilabel = torch.zeros(len(self.classes))
        if label != IGNORE:
            multilabel[label] = 1.0
        s1, s2 = self.normalized(arrays["s1"], arrays["s2"], (names["s1"], names["s2"]), index)
        item = {"s1": s1, "s2": s2, "label": label, "multilabel": multilabel, "id": self.patch_ids[index]}
        if self.return_label_map:
            item["label_map"] = torch.full(item["s1"].shape[-2:], label, dtype=torch.int64)
        return item

    def label_report(self) -> dict[str, Any]:
        self.label_summary = {"patches": len(self), "ignored_label_patches": int((self._majority == IGNORE).sum()),
                              "classes": self.classes}
        return self.label_summary


def plan_pack(root: Path, seasons: Any = ()) -> tuple[dict[str, SplitPlan], list[str]]:
    """One packed split, "all", of every row in CSV order; the rows' labels, splits and ids in the index."""
    rows = read_manifest(root)
    check_files(root, rows)
    sources = [{"s1": str(row.s1), "s2": str(row.s2)} for row in rows]
    record = {"lines": [row.line for row in rows], "s1": [str(row.s1) for row in rows],
              "s2": [str(row.s2) for row in rows], "labels": [row.label for row in rows],
              "splits": [row.split for row in rows], "ids": [row.id for row in rows], "skipped": {}}
    return {"all": SplitPlan(patch_columns(sources, [], "all", bands=(None, None)), sources, record)}, []

