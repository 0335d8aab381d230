"""SEN12MS (pre-training data of the dual ResNet): S1 / S2 / MODIS land-cover triplets in four seasons."""
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from .base import DataFileError, SharedCounter
from .labels import LABEL_CODES
from .packed import INDEX, PackedSource, PackedSplit, SplitPlan, check_rows, hint, packed_index, patch_columns
from .patches import PatchDataset
from .sources import TiffSource, pair_patches, subfolders

logger = logging.getLogger("datasets")

SEASONS = {"spring": "ROIs1158_spring", "summer": "ROIs1868_summer", "fall": "ROIs1970_fall",
           "winter": "ROIs2017_winter"}
_SEASON_ROI = {season: int(folder[4:8]) for season, folder in SEASONS.items()}  # part of a patch's offset key
_SCENE_FOLDER = re.compile(r"^(s1|s2|lc)_(\d+)$")


def layout(root: Path) -> str:
    return "\n".join([f"{root}/"] + [f"  {folder}/{{s1,s2,lc}}_<scene>/{folder}_{{s1,s2,lc}}_<scene>_p<N>.tif"
                                     for folder in SEASONS.values()] + [hint("sen12ms")])


def check_seasons(seasons: Sequence[str]) -> None:
    if not seasons or any(season not in SEASONS for season in seasons):
        raise ValueError(f"seasons must be a non-empty subset of {tuple(SEASONS)}, got {tuple(seasons)}")


class _Season(NamedTuple):
    """The complete triplets of one season, in scene then patch number order."""

    files: list[dict[str, Path]]
    scenes: list[int]
    numbers: list[int]
    skipped: dict[str, int]
    seen: int


def _scan_season(root: Path, season: str) -> _Season:
    folder = root / SEASONS[season]
    scenes = sorted({int(m.group(2)) for m in map(_SCENE_FOLDER.match, subfolders(folder)) if m})
    if not scenes:
        raise FileNotFoundError(f"no scene folders in {folder}; expected:\n{layout(root)}")
    found = _Season([], [], [], {}, 0)
    skipped: Counter[str] = Counter()
    seen = 0
    for scene in scenes:
        names = {"s1": f"s1_{scene}", "s2": f"s2_{scene}", "label": f"lc_{scene}"}
        numbers, files, scene_skipped, scene_seen = pair_patches({m: folder / n for m, n in names.items()},
                                                                 strict=False, layout=layout(root))
        found.files.extend(files)
        found.scenes.extend([scene] * len(numbers))
        found.numbers.extend(numbers)
        skipped.update(scene_skipped)
        seen += scene_seen
    return found._replace(skipped=dict(skipped), seen=seen)


class SEN12MSDataset(PatchDataset):
    """SEN12MS triplets; items, windows and normalisation as ``patches.PatchDataset``, labels from
    ``lc`` band 1 (IGBP -> DFC -> 8 classes; 0 and 255 no data), ``"id"`` e.g.
    ``"ROIs1158_spring_106_p42"``. A file found unreadable when its item loads (the public release
    has one), or failing a check, is logged once per message, counted in ``unreadable``, and the
    next patch is returned instead. ``offset_seed``: offsets from (offset_seed, ROI, scene, N).
    """

    _MAX_SUBSTITUTES = 10

    def __init__(self, root: str | Path, seasons: Sequence[str] = tuple(SEASONS), crop: int | None = None,
                 train: bool = False, *, normalize: Literal["seed", "ssl4eo", "stats", "none"] = "seed",
                 return_label_map: bool = False, seed: int = 0, offset_seed: int | None = None,
                 norm_stats: dict[str, list[float]] | None = None) -> None:
        super().__init__(crop, train, normalize, return_label_map, seed, offset_seed, norm_stats)
        check_seasons(seasons)
        self.root, self.seasons = Path(root), tuple(seasons)
        if not self.root.is_dir():
            raise FileNotFoundError(f"SEN12MS root {self.root} does not exist; expected:\n{layout(self.root)}")
        self.label_codes = LABEL_CODES["lc"]
        self.patch_ids: list[str] = []
        self._offset_keys: list[tuple[int, ...]] = []
        skipped: Counter[str] = Counter()
        total = 0
        index = packed_index(self.root, "sen12ms")
        files: list[dict[str, Path]] = []
        rows: list[int] = []
        for season in self.seasons:
            if index is None:
                found = _scan_season(self.root, season)
                files += found.files
                scenes, numbers, season_skipped, seen = found.scenes, found.numbers, found.skipped, found.seen
            else:
                entry = index["splits"]["all"]
                packed = entry["seasons"].get(season)
                if packed is None:
                    raise FileNotFoundError(f"{self.root / INDEX}: season {season} was not packed "
                                            f"(packed: {tuple(entry['seasons'])})")
                start, stop = packed["rows"]
                rows += range(start, stop)
                scenes, numbers = entry["scene"][start:stop], entry["patch"][start:stop]
                season_skipped, seen = packed["skipped"], packed["patches_seen"]
            self.patch_ids += [f"{SEASONS[season]}_{scene}_p{n}" for scene, n in zip(scenes, numbers)]
            self._offset_keys += [(_SEASON_ROI[season], scene, n) for scene, n in zip(scenes, numbers)]
            skipped.update(season_skipped)
            total += seen
        if index is None:
            self.source = TiffSource(files, {"s1": 2, "s2": 13, "label": 4})
        else:
            split = PackedSplit(self.root, index["splits"]["all"])
            check_rows(self.root, f"seasons {self.seasons}", rows, split.rows, len(rows))
            self.source = PackedSource(split, rows, {"s1": "s1", "s2": "s2", "label": "lc"},
                                       [f"patch {n}" for n in self.patch_ids])
        self._unreadable = SharedCounter()
        self._logged_errors: set[str] = set()
        self._finish(self.root, f"SEN12MSDataset({','.join(self.seasons)})", total, dict(skipped))

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
                    logger.warning("skipping SEN12MS patch %s: %s", self.patch_ids[(index + attempt) % len(self)],
                                   error)
        raise DataFileError(f"{self._MAX_SUBSTITUTES} consecutive SEN12MS patches from index {index} are unreadable")


def plan_pack(root: Path, seasons: Sequence[str]) -> tuple[dict[str, SplitPlan], list[str]]:
    """One split, "all", over ``seasons`` in the canonical order, scenes and numbers ascending
    (the order of ``SEN12MSDataset``); per row its season, scene and number."""
    check_seasons(seasons)
    sources: list[dict[str, str]] = []
    record: dict[str, Any] = {"season": [], "scene": [], "patch": [], "seasons": {}, "skipped": {}}
    for season in SEASONS:
        if season not in seasons:
            continue
        found = _scan_season(root, season)
        start = len(sources)
        sources += [{"s1": str(f["s1"]), "s2": str(f["s2"]), "lc": str(f["label"])} for f in found.files]
        record["season"] += [season] * len(found.files)
        record["scene"] += found.scenes
        record["patch"] += found.numbers
        record["seasons"][season] = {"rows": [start, len(sources)], "skipped": found.skipped,
                                     "patches_seen": found.seen}
        record["skipped"].update({f"{season}: {reason}": count for reason, count in found.skipped.items()})
    if not sources:
        raise FileNotFoundError(f"no complete SEN12MS triplet under {root}; expected:\n{layout(root)}")
    absent = [f"season {season}" for season in SEASONS if season not in seasons]
    return {"all": SplitPlan(patch_columns(sources, ["lc"], "all"), sources, record)}, absent
