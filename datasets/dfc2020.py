"""DFC2020 (IEEE GRSS Data Fusion Contest 2020): 256 px S1 / S2 / label patches, 8 classes."""
from pathlib import Path
from typing import Any, Literal

from .labels import LABEL_CODES
from .packed import INDEX, PackedSource, PackedSplit, SplitPlan, check_rows, hint, packed_index, patch_columns
from .patches import PatchDataset
from .sources import TiffSource, pair_patches

FOLDERS = {
    "validation": ("ROIs0000_validation", {m: f"{m}_validation" for m in ("s1", "s2", "lc", "dfc")}),
    "test": ("ROIs0000_test", {m: f"{m}_0" for m in ("s1", "s2", "lc", "dfc")}),
}


def layout(root: Path) -> str:
    lines = [f"{root}/"]
    for top, folders in FOLDERS.values():
        lines.append(f"  {top}/")
        lines += [f"    {folders[m]}/{top}_{m}_0_p<N>.tif" for m in ("s1", "s2", "lc", "dfc")]
    return "\n".join(lines + [hint("dfc2020")])


def folders_of(root: Path, split: str, label_source: str) -> dict[str, Path]:
    """The "s1", "s2" and "label" folders of a split, labels from ``label_source``."""
    top, names = FOLDERS[split]
    return {"s1": root / top / names["s1"], "s2": root / top / names["s2"], "label": root / top / names[label_source]}


def _incomplete(skipped: dict[str, int]) -> dict[str, int]:
    return {reason: count for reason, count in skipped.items() if reason.startswith("patch without a file")}


class DFC2020Dataset(PatchDataset):
    """DFC2020 patches with the 8 classes of SSLTransformerRS; items, windows and normalisation as
    ``patches.PatchDataset`` (``"id"``: the patch number N of ``_p{N}.tif``; with
    ``return_label_map`` also ``"label_map"`` (h, w) int64).

    Args:
        root: the folder holding ``ROIs0000_validation`` and ``ROIs0000_test``, or a packed copy.
        split: ``"validation"`` (986 patches, the method's training set) or ``"test"`` (5,128).
        label_source: ``"dfc"`` (codes 0-10, 255) or ``"lc"`` (MODIS IGBP band 1 mapped to DFC).
        strict: raise when a patch lacks one of its files, instead of skipping it.
        offset_seed: evaluation windows at an offset drawn from ``keyed_generator(offset_seed, N)``
            instead of the centre (the original evaluates a random 224 px window).
    """

    def __init__(self, root: str | Path, split: Literal["validation", "test"] = "validation", crop: int | None = None,
                 train: bool = False, *, label_source: Literal["dfc", "lc"] = "dfc",
                 normalize: Literal["seed", "ssl4eo", "stats", "none"] = "seed", return_label_map: bool = False,
                 seed: int = 0, strict: bool = False, offset_seed: int | None = None,
                 norm_stats: dict[str, list[float]] | None = None) -> None:
        super().__init__(crop, train, normalize, return_label_map, seed, offset_seed, norm_stats)
        if split not in FOLDERS:
            raise ValueError(f"split must be one of {tuple(FOLDERS)}, got {split!r}")
        if label_source not in LABEL_CODES:
            raise ValueError(f"label_source must be 'dfc' or 'lc', got {label_source!r}")
        self.root, self.split, self.label_source = Path(root), split, label_source
        if not self.root.is_dir():
            raise FileNotFoundError(f"DFC2020 root {self.root} does not exist; expected:\n{layout(self.root)}")
        self.label_codes = LABEL_CODES[label_source]
        index = packed_index(self.root, "dfc2020")
        if index is None:
            self.patch_ids, files, skipped, total = pair_patches(folders_of(self.root, split, label_source), strict,
                                                                 layout(self.root))
            self.source = TiffSource(files, {"s1": 2, "s2": 13, "label": 1 if label_source == "dfc" else 4})
        else:
            entry = index["splits"].get(split)
            packed = None if entry is None else entry["label_sources"].get(label_source)
            if packed is None:
                raise FileNotFoundError(f"{self.root / INDEX}: the {split} split with {label_source} labels was not "
                                        f"packed (their folder was missing under {index['source_root']}; see 'absent')")
            skipped, total = dict(packed["skipped"]), packed["patches_seen"]
            if strict and _incomplete(skipped):
                raise FileNotFoundError(f"{self.root / INDEX}: patches of {split} lacked a file when packed from "
                                        f"{index['source_root']}: {_incomplete(skipped)}")
            split_arrays = PackedSplit(self.root, entry)
            rows = check_rows(self.root, f"split {split}, {label_source} labels", packed["rows"], split_arrays.rows,
                              total - sum(_incomplete(skipped).values()))
            self.patch_ids = [entry["ids"][row] for row in rows]
            self.source = PackedSource(split_arrays, rows, {"s1": "s1", "s2": "s2", "label": label_source},
                                       [f"patch {n}" for n in self.patch_ids])
        self._offset_keys = [(number,) for number in self.patch_ids]
        self._finish(self.root, f"DFC2020Dataset({split})", total, skipped)


def plan_pack(root: Path, seasons: Any = ()) -> tuple[dict[str, SplitPlan], list[str]]:
    """Both splits that exist, with dfc and lc labels where their folders exist. A row is a patch
    complete for at least one label source; each source keeps its own rows and skip counts."""
    plans: dict[str, SplitPlan] = {}
    absent: list[str] = []
    for split, (top, _) in FOLDERS.items():
        if not (root / top).is_dir():
            absent.append(f"split {split} ({root / top})")
            continue
        paired = {}
        for label in ("dfc", "lc"):
            folders = folders_of(root, split, label)
            if folders["label"].is_dir():
                paired[label] = pair_patches(folders, strict=False, layout=layout(root))
            else:
                absent.append(f"{label} labels of {split} ({folders['label']})")
        if not paired:
            raise FileNotFoundError(f"{root / top}: neither dfc nor lc label folder found; expected:\n{layout(root)}")
        files_of: dict[int, dict[str, str]] = {}
        for label, (numbers, files, _, _) in paired.items():
            for number, paths in zip(numbers, files):
                files_of.setdefault(number, {"s1": str(paths["s1"]), "s2": str(paths["s2"])})[label] = str(
                    paths["label"])
        numbers = sorted(files_of)
        row_of = {number: row for row, number in enumerate(numbers)}
        sources = [files_of[number] for number in numbers]
        record = {
            "ids": numbers,
            "label_sources": {label: {"rows": [row_of[n] for n in found], "skipped": skipped, "patches_seen": seen}
                              for label, (found, _, skipped, seen) in paired.items()},
            "skipped": {f"{label} labels: {reason}": n for label, p in paired.items() for reason, n in p[2].items()},
        }
        if sources:
            plans[split] = SplitPlan(patch_columns(sources, list(paired), split), sources, record)
        else:
            absent.append(f"split {split} (no complete patch)")
    if not plans:
        raise FileNotFoundError(f"no DFC2020 split with complete patches under {root}; expected:\n{layout(root)}")
    return plans, absent

