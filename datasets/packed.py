"""The packed format, reader and writer: a data set copied once into a few .npy arrays per split.

``OUT/<split>/<column>.npy`` holds one row per sample (rows first), ``OUT/index.json`` the ids,
shapes, dtypes, skip counts, the files that could not be read (row -> message) and each source
file's size and modification time. A packed item equals its source item, broken files included:
reading a row whose file could not be packed raises that file's ``DataFileError``. Packing is
resumable (``.pack_progress.json`` until the index is written last, atomically). docs/data.md
gives the layout per data set; ``python pack.py DATASET ROOT OUT`` is the command.
"""
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import rasterio
from tqdm import tqdm

from util.io import atomic_write_json, read_json

from .base import DataFileError
from .labels import LABEL_CODES, class_map
from .sources import GDAL_OPTIONS, Read, WindowOf, open_tif, read_npy

logger = logging.getLogger("datasets")

INDEX = "index.json"
FORMAT = "packed S1/S2 data set (pack.py)"
VERSION = 1
PROGRESS = ".pack_progress.json"  # present while a pack is under way or was interrupted


def hint(dataset: str) -> str:
    return f"  or a folder written by `python pack.py {dataset} ROOT OUT` (holding {INDEX})"


def packed_index(root: str | Path, dataset: str | None = None) -> dict[str, Any] | None:
    """The index of the packed data set in ``root``, or None when there is none; ``dataset``
    refuses a pack of another data set. Another format or version, or an interrupted pack, raise
    ``DataFileError`` naming the folder and what to do."""
    root = Path(root)
    path = root / INDEX
    if not path.is_file():
        if (root / PROGRESS).is_file():
            raise DataFileError(f"{root} holds an unfinished pack (no {INDEX} yet, only {PROGRESS}): run the same "
                                "`python pack.py ...` command again to finish it")
        return None
    index = read_json(path, DataFileError)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataFileError(f"{path}: not the index of a packed data set (expected format {FORMAT!r})")
    if index.get("version") != VERSION:
        raise DataFileError(f"{path}: packed with format version {index.get('version')}, this code reads "
                            f"version {VERSION}; pack again")
    if dataset is not None and index.get("dataset") != dataset:
        raise DataFileError(f"{path}: a packed {index.get('dataset')} data set, not {dataset}")
    return index


def check_rows(root: Path, where: str, rows: Sequence[int], total: int, expected: int) -> list[int]:
    """``rows`` of a split as the index lists them, refused unless they are ``expected`` distinct
    rows below ``total``: an index edited by hand would silently shrink or reorder the data."""
    rows = [int(row) for row in rows]
    if len(rows) != expected or len(set(rows)) != len(rows) or any(not 0 <= row < total for row in rows):
        raise DataFileError(f"{root / INDEX}: {where} lists {len(rows)} rows, but the pack holds {expected} of "
                            f"{total}: the index disagrees with the arrays; pack again into an empty folder")
    return rows


class PackedSplit:
    """The arrays of one packed split, memory-mapped read-only on first use in each process (the
    maps are not pickled: a worker started by spawn opens its own)."""

    def __init__(self, root: Path, entry: dict[str, Any]) -> None:
        self.root = root
        self.specs: dict[str, dict[str, Any]] = entry["arrays"]
        listed = {key: len(entry[key]) for key in ("ids", "folders", "scene", "patch") if key in entry}
        rows = {column: spec["shape"][0] for column, spec in self.specs.items()}
        if len(set(listed.values()) | set(rows.values())) > 1:
            raise DataFileError(f"{root / INDEX}: the index lists {listed} rows but the arrays hold {rows}: the "
                                "index was edited or the pack is damaged; pack again into an empty folder")
        self.rows = next(iter(rows.values()), 0)
        self.unreadable = {column: {int(row): message for row, message in found.items()}
                           for column, found in entry["unreadable"].items()}
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
                raise DataFileError(f"{path}: {INDEX} promises shape {spec['shape']} {spec['dtype']}, the file "
                                    f"holds {list(found.shape)} {found.dtype}; pack again")
            self._maps[column] = found
        return found


class PackedSource:
    """The rows ``rows`` of a packed split as a source (``sources.TiffSource``'s interface):
    ``columns`` key -> packed column; messages name a sample by ``labels[index]`` and, with
    ``files``, the key's source file (key -> file name)."""

    def __init__(self, split: PackedSplit, rows: Sequence[int], columns: dict[str, str], labels: Sequence[str],
                 files: dict[str, str] | None = None) -> None:
        self.split, self.rows, self.columns, self.labels, self.files = split, list(rows), columns, list(labels), files

    def __len__(self) -> int:
        return len(self.rows)

    def name(self, index: int, key: str) -> str:
        column = self.columns[key]
        source = self.labels[index] if self.files is None else f"{self.labels[index]}/{self.files[key]}"
        return f"{self.split.root / self.split.specs[column]['file']}[{self.rows[index]}] ({source})"

    def unreadable(self, keys: Sequence[str]) -> int:
        """How many samples have a file among ``keys`` that could not be packed."""
        bad = set().union(*(self.split.unreadable.get(self.columns[key], {}) for key in keys))
        return sum(row in bad for row in self.rows)

    def patch_size(self) -> tuple[tuple[int, int], str]:
        spec = self.split.specs[self.columns["s1"]]
        return tuple(spec["shape"][-2:]), str(self.split.root / spec["file"])

    def read(self, index: int, window_of: WindowOf, keys: Sequence[str] = ("s1", "s2", "label")) -> Read:
        row = self.rows[index]
        for key in keys:
            message = self.split.unreadable.get(self.columns[key], {}).get(row)
            if message is not None:
                raise DataFileError(message)
        names = {key: self.name(index, key) for key in keys}
        arrays = {key: self.split.array(self.columns[key])[row] for key in keys}
        if window_of is not None:
            first = arrays[keys[0]]
            w = window_of(*first.shape[-2:], names[keys[0]])
            cut = (slice(w.row_off, w.row_off + w.height), slice(w.col_off, w.col_off + w.width))
            arrays = {key: array[(..., *cut)] for key, array in arrays.items()}
        return arrays, names


# ---------------------------------------------------------------------------------------------
# The writer. Each data set module plans its splits (its layout); this part copies the files.


class Column(NamedTuple):
    """One packed array: the shape of a row, the dtype, and the band count of its GeoTIFF source
    files (0: .npy sources; None: any count, the row shape's first dimension)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    tif_bands: int | None = 0


class SplitPlan(NamedTuple):
    """One split to pack: its columns, every row's source files (column -> path) and its record
    for the index (ids, skip counts), to which packing adds arrays and unreadable files."""

    columns: list[Column]
    sources: list[dict[str, str]]
    record: dict[str, Any]


Planner = Callable[[Path, Sequence[str]], tuple[dict[str, SplitPlan], list[str]]]
_LABEL_COLUMNS = ("dfc", "lc", "label")


def patch_columns(sources: list[dict[str, str]], labels: Sequence[str], split: str,
                  bands: tuple[int | None, int | None] = (2, 13)) -> list[Column]:
    """Columns of a patch split sized by its first readable S1 file (a patch of another size is
    reported as unreadable). S1 stays float32 (its dtype; float16 would change the items and lose
    NaN / inf, which are counted); ``bands`` None takes the file's band count (manifests)."""
    for files in sources:
        try:
            with open_tif(Path(files["s1"]), bands[0]) as src:
                size, s1_bands = (src.height, src.width), src.count
            with open_tif(Path(files["s2"]), bands[1]) as src:
                s2_bands = src.count
            break
        except DataFileError:
            continue
    else:
        raise DataFileError(f"split {split}: none of its {len(sources)} S1 files can be read, so nothing can be packed")
    columns = [Column("s1", (s1_bands, *size), "float32", bands[0] or s1_bands),
               Column("s2", (s2_bands, *size), "uint16", bands[1] or s2_bands)]
    return columns + [Column(label, size, "uint8", 4 if label == "lc" else 1) for label in labels]


def pack_value(column: Column, path: Path) -> np.ndarray:
    """One row of ``column`` read from its source file, in the column's dtype and shape; errors
    (unreadable, wrong bands, size or shape, S2 beyond uint16, labels outside 0-255) name the file.
    Documented-code checks of label maps are left to the loader, per window as for GeoTIFFs."""
    if not column.tif_bands:
        return read_npy(path, column.shape).astype(column.dtype)
    size = column.shape[-2:]
    with open_tif(path, column.tif_bands) as src:
        if (src.height, src.width) != size:
            raise DataFileError(f"{path}: patch of {src.height} x {src.width} px; the packed split holds {size[0]} x "
                                f"{size[1]} px patches (the size of its first readable S1 file)")
        data = src.read(1) if column.name in _LABEL_COLUMNS else src.read()
    if column.name == "s1":
        return data.astype(np.float32)
    if column.name == "s2":
        if not np.can_cast(data.dtype, np.uint16, "safe"):
            raise DataFileError(f"{path}: expected uint16 S2 reflectance x 10000, found dtype {data.dtype}")
        return data.astype(np.uint16)
    if data.dtype.kind not in "ui" or (data.size and (int(data.min()) < 0 or int(data.max()) > 255)):
        class_map(data, path, LABEL_CODES.get(column.name, LABEL_CODES["dfc"]))  # raises the loader's own message
    return data.astype(np.uint8)


_FAULT_KINDS = (("cannot read", "unreadable file"), ("bands", "wrong band count"),
                ("label codes", "undocumented label codes"), ("dtype", "wrong dtype"), (" px", "wrong size"),
                ("shape", "wrong shape"))


def _pack_split(out: Path, split: str, plan: SplitPlan, state: dict[str, Any], progress: Path, every: int) -> None:
    """Fill the arrays of ``split`` from the row done last on; every ``every`` rows flush the arrays,
    then save the progress marker, so a killed run resumes at the last checkpoint."""
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
                raise DataFileError(f"{path}: an unfinished pack left another shape or dtype; delete {out} and "
                                    f"pack again")
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
                    arrays[column.name][row] = pack_value(column, Path(path))
                except DataFileError as error:
                    # Zeros rather than what a killed run may have left: a resumed pack equals an uninterrupted one.
                    arrays[column.name][row] = 0
                    unreadable.setdefault(column.name, {})[str(row)] = str(error)
                    logger.warning("not packed: %s", error)
            bar.update()
            if (row + 1) % every == 0 or row + 1 == rows:
                for array in arrays.values():
                    array.flush()
                split_state["done"] = row + 1
                atomic_write_json(progress, state, indent=None)


def _check_pack(out: Path, plans: dict[str, SplitPlan], splits: dict[str, Any]) -> dict[str, Any]:
    """Reopen every array (shape and dtype as the index says) and count per split what was packed,
    what could not be read and why, and what was skipped before packing and why."""
    check: dict[str, Any] = {}
    for split, plan in plans.items():
        entry = splits[split]
        for spec in entry["arrays"].values():
            array = np.load(out / spec["file"], mmap_mode="r")
            if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                raise DataFileError(f"{out / spec['file']}: holds {array.shape} {array.dtype}, expected {spec}")
        bad_rows = set().union(*(rows.keys() for rows in entry["unreadable"].values()))
        reasons = Counter(f"{column}: {next((k for key, k in _FAULT_KINDS if key in message), 'other')}"
                          for column, rows in entry["unreadable"].items() for message in rows.values())
        check[split] = {
            "rows": len(plan.sources), "packed": len(plan.sources) - len(bad_rows),
            "with unreadable files": len(bad_rows), "unreadable files by reason": dict(reasons),
            "skipped before packing": plan.record["skipped"],
        }
    return check


def _stamp(path: str) -> list[int]:
    try:
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns]
    except OSError:
        return [-1, -1]  # unreadable when packed: its row holds the error


def write(dataset: str, plan: Planner, root: str | Path, out: str | Path, *, seasons: Sequence[str] = (),
          checkpoint_every: int = 256, copy: Sequence[str] = ()) -> dict[str, Any]:
    """Pack ``root`` into ``out`` with the splits that ``plan(root, seasons)`` finds; returns the
    index. A complete ``out`` is left as it is unless a source file changed since (FileExistsError
    naming them); ``copy``: files of ``root`` copied beside the index (METER-ML's metadata)."""
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive number of rows, got {checkpoint_every}")
    root, out = Path(root), Path(out)
    if not root.exists():
        raise FileNotFoundError(f"{dataset} root {root} does not exist")
    if root.is_dir() and packed_index(root) is not None:
        raise ValueError(f"{root} is already a packed data set ({root / INDEX})")
    existing = packed_index(out, dataset) if (out / INDEX).is_file() else None
    if existing is not None:
        changed = [path for path, stamp in existing.get("source_files", {}).items() if _stamp(path) != stamp]
        if changed:
            raise FileExistsError(f"{out} is a complete pack of {existing['source_root']}, but {len(changed)} of its "
                                  f"source files changed since it was packed (e.g. {changed[:3]}): delete {out} and "
                                  "pack again")
        logger.info("%s is already a complete pack of %s, whose files have not changed; nothing to do",
                    out, existing["source_root"])
        return existing
    progress = out / PROGRESS
    if out.is_dir() and not progress.is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no unfinished pack: choose a new or empty folder")
    started = time.perf_counter()
    plans, absent = plan(root, seasons)
    plan_text = json.dumps({name: {"columns": p.columns, "sources": p.sources} for name, p in plans.items()},
                           sort_keys=True)
    state: dict[str, Any] = {"plan": hashlib.sha256(plan_text.encode()).hexdigest(), "splits": {}}
    if progress.is_file():
        previous = read_json(progress, DataFileError)
        if previous.get("plan") != state["plan"]:
            raise FileExistsError(f"{out} holds an unfinished pack of other files (the source changed since, or "
                                  f"another ROOT); delete {out} or choose another OUT")
        state = previous
        logger.info("resuming the unfinished pack in %s", out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(progress, state, indent=None)
    for name in absent:
        logger.warning("%s: not found, not packed: %s", root, name)
    splits: dict[str, Any] = {}
    with rasterio.Env(**GDAL_OPTIONS):
        for name, split_plan in plans.items():
            _pack_split(out, name, split_plan, state, progress, checkpoint_every)
            rows = len(split_plan.sources)
            splits[name] = {
                **split_plan.record, "rows": rows,
                "arrays": {c.name: {"file": f"{name}/{c.name}.npy", "shape": [rows, *c.shape], "dtype": c.dtype}
                           for c in split_plan.columns},
                "unreadable": state["splits"][name]["unreadable"],
            }
    check = _check_pack(out, plans, splits)
    for name, counts in check.items():
        bad = counts["with unreadable files"] or any(counts["skipped before packing"].values())
        (logger.warning if bad else logger.info)(
            "packed %s %s: %d of %d rows complete; rows with unreadable files: %d %s; skipped before packing: %s",
            dataset, name, counts["packed"], counts["rows"], counts["with unreadable files"],
            counts["unreadable files by reason"], counts["skipped before packing"] or "none",
        )
    for name in copy:
        (out / name).write_bytes((root.parent if root.is_file() else root).joinpath(name).read_bytes())
    stamps = {path: _stamp(path) for p in plans.values() for files in p.sources for path in files.values()}
    index = {
        "format": FORMAT, "version": VERSION, "dataset": dataset, "source_root": str(root.resolve()),
        "absent": absent, "splits": splits, "source_files": stamps, "check": check,
        "packed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds_of_last_run": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(out / INDEX, index, indent=None)
    progress.unlink()
    return index
