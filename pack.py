"""Packing: `python datasets.py pack {dfc2020,sen12ms,meterml} ROOT OUT` (or `python pack.py ...`).

Copies a data set once into a few large .npy arrays per split plus OUT/index.json; every dataset
class of datasets.py accepts such a folder as its root and returns the same items, reading only
the crop window from the memory-mapped arrays instead of opening three or four files per sample.
Files that could not be read when packing keep their row, and reading it raises the same
DataFileError (SEN12MS: substitute the next patch), so a packed set behaves like its source,
broken files included. Packing is resumable: run the same command again after a kill.

This is the writer of the format that datasets.py reads (`packed_index`, `_PackedSplit`); it
uses the readers' own layouts, pairing and checks, so that a packed item equals its source item.
"""
import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import rasterio
from tqdm import tqdm

from datasets import (
    _DFC_FOLDERS,
    _DFC_LABELS,
    _GDAL_OPTIONS,
    _IGBP_LABELS,
    _METERML_ARRAYS,
    _PACK_DATASETS,
    _PACK_PROGRESS,
    _SEN12MS_SEASONS,
    PACK_FORMAT,
    PACK_INDEX,
    PACK_VERSION,
    DataFileError,
    MeterMLDataset,
    _class_map,
    _dfc_folders,
    _dfc_layout,
    _meterml_layout,
    _open_tif,
    _pair_patches,
    _read_npy,
    _resolve_image_folders,
    _sen12ms_layout,
    _sen12ms_season,
    packed_index,
)

logger = logging.getLogger("datasets")


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


def _file_stamps(plans: dict[str, _SplitPlan]) -> dict[str, list[int]]:
    """path -> [size in bytes, modification time in ns] of every source file of the plans."""
    stamps = {}
    for plan in plans.values():
        for files in plan.sources:
            for path in files.values():
                if path not in stamps:
                    try:
                        stat = os.stat(path)
                        stamps[path] = [stat.st_size, stat.st_mtime_ns]
                    except OSError:
                        stamps[path] = [-1, -1]  # unreadable when packed: its row holds the error
    return stamps


def _changed_sources(index: dict[str, Any]) -> list[str]:
    """The source files of a pack whose size or modification time differ from the index's."""
    changed = []
    for path, (size, mtime) in index.get("source_files", {}).items():
        try:
            stat = os.stat(path)
            now = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            now = [-1, -1]
        if now != [size, mtime]:
            changed.append(path)
    return changed


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
    ``dfc`` / ``lc`` (N, H, W) uint8 raw codes (lc: band 1, IGBP); METER-ML ``s1``, ``s2_10m``
    (N, h, w, bands) as stored (the 20 m and 60 m bands and naip.png are not read, not packed). ``out/index.json``
    holds the format version, source root, ids, array shapes and dtypes, the files that could
    not be read (row -> message), what was skipped before packing and why, the final check's
    counts, and each source file's size and modification time. METER-ML metadata files are
    copied beside it.

    Resumable: a run that is killed leaves ``out/.pack_progress.json``; the same command resumes
    at the last checkpoint (every ``checkpoint_every`` rows). ``index.json`` is written last, in
    one atomic step, so a folder with an index is a complete pack. A complete ``out`` is left as
    it is, unless a source file changed since (then a FileExistsError says which; pack again
    into a new folder). Unreadable files are logged, counted and recorded, never silently dropped; their
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
        changed = _changed_sources(existing)
        if changed:
            raise FileExistsError(f"{out} is a complete pack of {existing['source_root']}, but {len(changed)} of its "
                                  f"source files changed since it was packed (e.g. {changed[:3]}): delete {out} and "
                                  f"pack again")
        logger.info("%s is already a complete pack of %s, whose files have not changed; nothing to do",
                    out, existing["source_root"])
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
        "source_files": _file_stamps(plans),
        "check": check,
        "packed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds_of_last_run": round(time.perf_counter() - started, 3),
    }
    _write_json(out / PACK_INDEX, index)
    progress.unlink()
    return index


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python datasets.py pack {dfc2020,sen12ms,meterml} ROOT OUT``."""
    parser = argparse.ArgumentParser(prog="datasets.py", description="Tools for the data sets of this project.",
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    pack_parser = commands.add_parser(
        "pack",
        help="copy a data set once into memory-mappable .npy arrays (resumable: rerun after a kill)",
        allow_abbrev=False,
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
        "--checkpoint_every", "--checkpoint-every", type=int, default=256, metavar="ROWS",
        help="rows between progress checkpoints; default 256"
    )
    args = parser.parse_args(argv)
    if args.checkpoint_every < 1:
        parser.error(f"--checkpoint_every must be a positive number of rows, got {args.checkpoint_every}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        pack(args.dataset, args.root, args.out, seasons=args.seasons, checkpoint_every=args.checkpoint_every)
    except (OSError, ValueError) as error:
        parser.exit(1, f"datasets.py pack: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
