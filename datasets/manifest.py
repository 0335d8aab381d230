"""The researcher's own labelled S1 / S2 pairs, listed in a CSV file (a manifest).

Columns found by name in the header, in any order: ``s1``, ``s2`` (GeoTIFF paths, relative to
the CSV's folder or absolute), ``label`` (a class name, any string), optional ``split`` and
``id``; other columns are ignored. S1 and S2 of a row share their size, all rows share the band
counts. The classes are the distinct labels of the whole file in sorted order, so every split
numbers them alike (or a trained run's ``classes``, matched by name). Pixels are read as DFC2020's
(``patches.PatchDataset``): S1 backscatter in dB, S2 reflectance x 10000, its bands named by
``s2_bands`` or by their count (docs/data.md).
"""
import csv
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import rasterio
import rasterio.errors
import torch

from .base import IGNORE, DataFileError
from .packed import INDEX, PackedSource, PackedSplit, SplitPlan, check_rows, packed_index, patch_columns
from .patches import DEFAULT_S2_BANDS, L1C_BANDS, PatchDataset
from .scenes import describe_grid, s1_db_problem, same_grid
from .sources import GDAL_OPTIONS, TiffSource

logger = logging.getLogger("datasets")


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
    """Every row of the CSV (UTF-8, a byte-order mark and CRLF line ends fine), paths resolved; a missing
    column, an empty path or more fields than the header names the line; two rows with one id, or labels
    spelt two ways (case; surrounding spaces are stripped), are refused naming both lines."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [name for name in ("s1", "s2") if name not in header]
            if missing:
                raise DataFileError(f"{path}: the header has no column {' or '.join(missing)} (found: {header}); "
                                    "expected columns s1, s2, label and optionally split, id")
            rows, ids, spellings = [], {}, {}
            for line, raw in enumerate(reader, start=2):
                if None in raw:  # csv.DictReader's key of the fields beyond the header's
                    raise DataFileError(f"{path}, line {line}: {len(header) + len(raw[None])} fields, the header "
                                        f"names {len(header)}; quote a field that holds a comma")
                record = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
                for key in ("s1", "s2"):
                    if not record[key]:
                        raise DataFileError(f"{path}, line {line}: empty {key} path")
                label = record.get("label", "")
                if label and spellings.setdefault(label.casefold(), (label, line))[0] != label:
                    first, first_line = spellings[label.casefold()]
                    raise DataFileError(f"{path}: labels {first!r} (line {first_line}) and {label!r} (line {line}) "
                                        "differ only in case; spell each class one way")
                s1, s2 = (Path(record[key]) if Path(record[key]).is_absolute() else path.parent / record[key]
                          for key in ("s1", "s2"))
                row = Row(line, s1, s2, label, record.get("split", ""),
                          record.get("id") or Path(record["s2"]).stem)
                if ids.setdefault(row.id, line) != line:
                    raise DataFileError(f"{path}: lines {ids[row.id]} and {line} have the same id {row.id!r} (the id "
                                        "column, else the S2 file's name); predictions could not be told apart")
                rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataFileError(f"cannot read the manifest {path}: {error}") from error
    if not rows:
        raise DataFileError(f"{path}: the manifest lists no row")
    return rows


class Grid(NamedTuple):
    crs: Any
    transform: Any
    width: int
    height: int
    count: int


S1_CHECKED_ROWS = 4


def check_s1_units(path: Path, files: Sequence[Path]) -> None:
    """Refuse an S1 file that does not look like backscatter in dB (``scenes.s1_db_problem``: no negative
    value, or more than 1 % of its pixels above +30 dB); missing pixels (nodata, NaN) and zeros left out."""
    for file in files:
        with rasterio.open(file) as src:
            x = src.read(masked=True).astype(np.float64).filled(np.nan)
        problem = s1_db_problem(x[np.isfinite(x) & (x != 0)])  # 0: the fill value of swath edges, not a measurement
        if problem is not None:
            raise DataFileError(f"{path}: S1 {file}: {problem}: it does not look like backscatter in dB (linear power "
                                "or amplitude?); convert it to dB, 10 log10(power) or 20 log10(amplitude)")


def check_files(path: Path, rows: Sequence[Row]) -> tuple[int, int]:
    """Open every file's header: readable, S2 on its S1's grid (CRS, transform, size), the band counts of
    the first row; S1 in dB (``check_s1_units`` on the first rows). Returns (S1 bands, S2 bands); a bad
    row raises naming the CSV line and the files."""
    bands: tuple[int, int] | None = None
    with rasterio.Env(**GDAL_OPTIONS):
        for row in rows:
            found = []
            for key in ("s1", "s2"):
                file = getattr(row, key)
                try:
                    with rasterio.open(file) as src:
                        found.append(Grid(src.crs, src.transform, src.width, src.height, src.count))
                except (rasterio.errors.RasterioError, OSError) as error:
                    raise DataFileError(f"{path}, line {row.line}: cannot read {key} file {file}: {error}") from None
            a, b = found
            if (a.height, a.width) != (b.height, b.width):
                raise DataFileError(f"{path}, line {row.line}: {row.s2} is {b.height} x {b.width} px, its S1 {row.s1} "
                                    f"{a.height} x {a.width}")
            if not same_grid(a._asdict(), b._asdict()):
                raise DataFileError(f"{path}, line {row.line}: S1 and S2 are not co-registered: {row.s1} on "
                                    f"{describe_grid(a._asdict())}, {row.s2} on {describe_grid(b._asdict())}; "
                                    "resample them onto one grid")
            if bands is None:
                bands = (a.count, b.count)
            elif (a.count, b.count) != bands:
                raise DataFileError(f"{path}, line {row.line}: {row.s1} / {row.s2} have {a.count} / {b.count} bands, "
                                    f"the first row {bands[0]} / {bands[1]}; every row needs the same band counts")
        check_s1_units(path, [row.s1 for row in rows[:S1_CHECKED_ROWS]])
    return bands


def _band_name(name: str) -> str:
    """A stripped --s2_bands name, an S2 band's made canonical ("B2", "b8a" -> "B02", "B8A"), others as given."""
    match = re.fullmatch(r"B(0?[1-9]|1[0-2]|8A)", name.strip(), re.IGNORECASE)
    if match is None:
        return name.strip()
    return "B8A" if match.group(1).upper() == "8A" else f"B{int(match.group(1)):02d}"


def s2_band_names(count: int, names: Sequence[str] | None, where: str) -> list[str]:
    """The names of a manifest's S2 bands: ``names`` (their count checked), else the 13 L1C names for
    13 bands, the 12 L2A names (no B10) for 12; other counts must be named."""
    if names is not None:
        names = [_band_name(name) for name in names]
        if len(names) != count or len(set(names)) != count:
            raise DataFileError(f"{where}: S2 has {count} bands, but --s2_bands names {len(names)} "
                                f"({', '.join(names)}){'' if len(set(names)) == len(names) else ', some twice'}")
        return names
    if count in DEFAULT_S2_BANDS:
        return list(DEFAULT_S2_BANDS[count])
    raise DataFileError(f"{where}: S2 has {count} bands; name them in order with --s2_bands (e.g. "
                        f"--s2_bands {','.join(L1C_BANDS[1:1 + count])}); only 13 (L1C) and 12 (L2A, no B10) "
                        "bands are named by default")


class ManifestDataset(PatchDataset):
    """The rows of one split of a manifest (or all rows, ``split=None``); items as DFC2020's, with
    ``"label"`` the index in ``classes`` of the row's label (IGNORE where it has none and
    ``require_labels=False``, or where ``classes`` lacks it), ``"label_name"`` the row's own label,
    ``"multilabel"`` its one-hot and ``"id"`` the ``id`` column (default: the S2 file's stem). ``root``
    is the CSV, or a folder written by ``pack.py manifest``. Evaluation windows with ``offset_seed``
    are keyed by the CSV line.

    Args:
        classes: the class names to number labels by (a trained run's); default the file's labels, sorted.
        s2_bands: the names of the S2 bands in file order (default: ``s2_band_names``).
        norm_stats: ``normalize="stats"``'s band statistics (default: computed on these rows).
    """

    def __init__(self, root: str | Path, split: str | None = None, crop: int | None = None, train: bool = False, *,
                 normalize: str = "seed", return_label_map: bool = False, seed: int = 0,
                 offset_seed: int | None = None, require_labels: bool = True, classes: Sequence[str] | None = None,
                 s2_bands: Sequence[str] | None = None, norm_stats: dict[str, list[float]] | None = None) -> None:
        super().__init__(crop, train, normalize, return_label_map, seed, offset_seed, norm_stats)
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
        self.classes = list(classes) if classes is not None else sorted({row.label for row in rows if row.label})
        self.split_counts = Counter(row.split for row in rows)  # every row's split, for the scripts' warnings
        chosen = [row for row in rows if split is None or row.split == split]
        if not chosen:
            splits = sorted(self.split_counts)
            raise DataFileError(f"{where}: no row of split {split!r}; its splits: "
                                f"{', '.join(repr(s) for s in splits) if splits != [''] else 'none (no split column)'}")
        unlabelled = [row for row in chosen if not row.label]
        if unlabelled and require_labels:
            raise DataFileError(f"{where}, line {unlabelled[0].line}: no label ({len(unlabelled)} rows of split "
                                f"{split!r} have none), and this run needs labels")
        self.split = split
        self.patch_ids = [row.id for row in chosen]
        self._offset_keys = [(row.line,) for row in chosen]
        self.label_names = [row.label for row in chosen]
        class_index = {name: i for i, name in enumerate(self.classes)}
        self._row_labels = [class_index.get(row.label, IGNORE) for row in chosen]
        self.unknown_labels = dict(sorted(Counter(n for n in self.label_names if n and n not in class_index).items()))
        if self.unknown_labels:
            logger.warning("%s (%s): labels outside the %d classes %s, kept by name and left out of the accuracy "
                           "(rows): %s", where, split or "all rows", len(self.classes), self.classes,
                           ", ".join(f"{name}: {n}" for name, n in self.unknown_labels.items()))
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
        self.s2_band_names = s2_band_names(self.bands["s2"], s2_bands, where)
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
        item = {"s1": s1, "s2": s2, "label": label, "label_name": self.label_names[index], "multilabel": multilabel,
                "id": self.patch_ids[index]}
        if self.return_label_map:
            item["label_map"] = torch.full(item["s1"].shape[-2:], label, dtype=torch.int64)
        return item

    def label_report(self) -> dict[str, Any]:
        self.label_summary = {"patches": len(self), "ignored_label_patches": int((self._majority == IGNORE).sum()),
                              "classes": self.classes, "unknown_labels": self.unknown_labels}
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

