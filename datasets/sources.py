"""Where a sample's pixels come from: one small interface, ``read(index, window)``, over files.

A source holds one entry per sample and returns, for the keys asked (``"s1"``, ``"s2"``,
``"label"``), the arrays as stored, cut to a window, and a name per key for messages. The
GeoTIFF and .npy sources here read the files of the published layouts; ``packed.PackedSource``
reads the packed arrays. Data set classes state their layout and labels and never ask which
source they hold.
"""
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
import rasterio.env
import rasterio.errors
from rasterio.windows import Window

from .base import DataFileError

# (height, width, name of the file that gave them) -> the window to read; None reads everything.
WindowOf = Callable[[int, int, str], Window] | None
Read = tuple[dict[str, np.ndarray], dict[str, str]]

# GDAL would list the patch's folder (thousands of files) on every open to look for side-car files
# these data sets do not have; memory-mapped reads of uncompressed strips are faster.
GDAL_OPTIONS = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GTIFF_VIRTUAL_MEM_IO": "IF_ENOUGH_RAM"}
_PATCH_NUMBER = re.compile(r"_p(\d+)\.tif$")


def gdal_env() -> None:
    """Enter ``GDAL_OPTIONS`` once in this process (and its forked workers) unless an environment is
    active: setting one up for every open costs as much as reading a small window."""
    if rasterio.env.local._env is None:
        rasterio.Env(**GDAL_OPTIONS).__enter__()


@contextmanager
def open_tif(path: Path, bands: int | None, size: tuple[int, int] | None = None) -> Iterator[rasterio.DatasetReader]:
    """Open a GeoTIFF, checking its band count and (height, width); read errors name the file."""
    try:
        with rasterio.open(path) as src:
            if bands is not None and src.count != bands:
                raise DataFileError(f"{path}: expected {bands} bands, found {src.count}")
            if size is not None and (src.height, src.width) != size:
                raise DataFileError(
                    f"{path}: expected {size[0]} x {size[1]} px like the patch's S1 file, "
                    f"found {src.height} x {src.width}"
                )
            yield src
    except rasterio.errors.RasterioError as error:
        raise DataFileError(f"cannot read {path}: {error}") from error


def read_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A numeric .npy file as stored, of ``shape``; errors name the file."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataFileError(f"cannot read {path}: {error}") from error
    if array.shape != shape:
        raise DataFileError(f"{path}: expected shape {shape} (height, width, bands), found {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataFileError(f"{path}: expected a numeric array, found dtype {array.dtype}")
    return array


def subfolders(folder: Path) -> set[str]:
    """Names of the directories in ``folder`` (empty when it does not exist), in one scan."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name for entry in entries if entry.is_dir()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


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


def pair_patches(
    folders: dict[str, Path], strict: bool, layout: str
) -> tuple[list[int], list[dict[str, Path]], dict[str, int], int]:
    """Pair the files of several modality folders by patch number N, never by sort order.

    Returns the sorted numbers of the complete patches, their files (key -> path), the skip counts
    (reason -> count) and the number of patches seen; ``strict`` raises on an incomplete patch.
    """
    scans: dict[str, dict[int, Path]] = {}
    skipped: Counter[str] = Counter()
    for key, folder in folders.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"folder {folder} not found; expected:\n{layout}")
        scans[key], unrecognised = _scan_patches(folder)
        if unrecognised:
            skipped[f".tif files in {folder.name} not named *_p<N>.tif"] += unrecognised
    numbers = sorted(set().union(*scans.values()))
    complete = []
    for number in numbers:
        absent = [folders[key].name for key, scan in scans.items() if number not in scan]
        if not absent:
            complete.append(number)
        elif strict:
            raise FileNotFoundError(f"patch {number} has no file in {', '.join(absent)} (under {folders['s1'].parent})")
        else:
            skipped[f"patch without a file in {', '.join(absent)}"] += 1
    files = [{key: scans[key][n] for key in folders} for n in complete]
    return complete, files, dict(skipped), len(numbers)


class TiffSource:
    """GeoTIFF patches: per sample one file per key; ``bands`` the band count of each key (None:
    any). S2 and label must have S1's size; of the label file only band 1 is read."""

    def __init__(self, files: Sequence[dict[str, Path]], bands: dict[str, int | None]) -> None:
        self.files = list(files)
        self.bands = bands

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int, key: str) -> str:
        return str(self.files[index][key])

    def unreadable(self, keys: Sequence[str]) -> int:
        return 0

    def patch_size(self) -> tuple[tuple[int, int], str]:
        """(height, width) of the first readable S1 file and its name; ten unreadable in a row raise."""
        last_error = None
        gdal_env()
        for paths in self.files[:10]:
            try:
                with open_tif(paths["s1"], self.bands["s1"]) as src:
                    return (src.height, src.width), str(paths["s1"])
            except DataFileError as error:
                last_error = error
        raise DataFileError(f"none of the first S1 files gives the patch size; the last: {last_error}")

    def read(self, index: int, window_of: WindowOf, keys: Sequence[str] = ("s1", "s2", "label")) -> Read:
        paths = self.files[index]
        out: dict[str, np.ndarray] = {}
        size = window = None
        gdal_env()
        for key in keys:
            with open_tif(paths[key], self.bands[key], size) as src:
                if size is None:
                    size = (src.height, src.width)
                    window = None if window_of is None else window_of(*size, str(paths[key]))
                out[key] = src.read(1, window=window) if key == "label" else src.read(window=window)
        return out, {key: str(paths[key]) for key in keys}


class NpySource:
    """One folder per sample holding one .npy file per key: ``files`` key -> (file name, shape)."""

    def __init__(self, folders: Sequence[Path], files: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        self.folders = list(folders)
        self.files = files

    def __len__(self) -> int:
        return len(self.folders)

    def name(self, index: int, key: str) -> str:
        return str(self.folders[index] / self.files[key][0])

    def unreadable(self, keys: Sequence[str]) -> int:
        return 0

    def read(self, index: int, window_of: WindowOf = None, keys: Sequence[str] = ("s1", "s2")) -> Read:
        out = {key: read_npy(self.folders[index] / self.files[key][0], self.files[key][1]) for key in keys}
        return out, {key: self.name(index, key) for key in keys}
