"""Sentinel-1 / Sentinel-2 scenes as providers deliver them, read window by window on the S2 grid.

``open_scene(s1, s2)`` takes
- S2: a GeoTIFF stack (band names from its band descriptions, else 13 = L1C, 12 = L2A without
  B10), or a folder (a SAFE product or any folder of band files): every JPEG 2000 or GeoTIFF file
  whose name holds a band token (B01-B12, B8A, optionally _10m/_20m/_60m), the finest copy of each
  band; bands not on the finest band's grid are resampled by nearest neighbour (digital numbers
  unchanged, as the data sets were exported). Offset: MTD_MSIL1C.xml's RADIO_ADD_OFFSET or
  MTD_MSIL2A.xml's BOA_ADD_OFFSET when the folder holds one, unless ``s2_offset`` is given (default 0).
- S1: a 2-band GeoTIFF (VV, VH), a folder or two files whose names hold VV and VH; any CRS and
  resolution, warped bilinearly in the file's own units onto the S2 grid, then to dB by ``s1_scale``.
Nothing is read whole: ``Scene.read(window)`` reads one window through warped views (WarpedVRT).
Choices and their reasons: docs/predict.md.
"""
from __future__ import annotations

import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from util.labels import L1C_BANDS

from .patches import DEFAULT_S2_BANDS

log = logging.getLogger("datasets")

S1_BANDS = ("VV", "VH")
S1_SCALES = ("db", "power", "amplitude")
RASTER_SUFFIXES = (".jp2", ".tif", ".tiff")
METADATA = {"MTD_MSIL1C.xml": "RADIO_ADD_OFFSET", "MTD_MSIL2A.xml": "BOA_ADD_OFFSET"}
S1_MAX_DB = 30.0  # backscatter above +30 dB is rare (ships, corner reflectors); more than 1 % of the pixels is not dB
SAMPLE = 16  # the S1 units are checked on 16 x 16 windows of 16 px (or a 256 px overview)

_BAND = re.compile(r"(?<![A-Z0-9])B(0?[1-9]|1[0-2]|8A)(?:_(10|20|60)M)?(?![A-Z0-9])", re.IGNORECASE)
_POLARISATION = re.compile(r"(?<![A-Z])(VV|VH)(?![A-Z])", re.IGNORECASE)


class SceneError(ValueError):
    """An S1 / S2 input that cannot be read as asked; the one-line message names the file."""


def band_name(text: str) -> str | None:
    """The canonical S2 band name held in `text` ("B1", "b08", "T32_B8A_20m.jp2" -> "B01", "B08", "B8A")."""
    match = _BAND.search(text)
    if match is None:
        return None
    number = match.group(1).upper()
    return "B8A" if number == "8A" else f"B{int(number):02d}"


def same_grid(a: dict, b: dict) -> bool:
    """Same CRS and size, transforms equal to a millionth of a pixel."""
    pixel = min(abs(a["transform"].a), abs(a["transform"].e)) or 1.0
    return (a["crs"] == b["crs"] and (a["width"], a["height"]) == (b["width"], b["height"])
            and a["transform"].almost_equals(b["transform"], precision=1e-6 * pixel))


def grid_of(src) -> dict:
    return {"crs": src.crs, "transform": src.transform, "width": src.width, "height": src.height}


def read_grid(path: str | Path) -> dict:
    """The grid of the raster at `path`; SceneError naming it when it cannot be read."""
    with _open(Path(path)) as src:
        return grid_of(src)


def describe_grid(grid: dict) -> str:
    return f"{grid['height']} x {grid['width']} px, {grid['crs']}, transform {tuple(grid['transform'])[:6]}"


def _open(path: Path):
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as error:
        raise SceneError(f"{path} cannot be read as a raster: {error}") from None


def _data_bands(src) -> list[int]:
    """1-based indexes of the bands that are not alpha bands."""
    return [i for i, c in zip(src.indexes, src.colorinterp) if c != ColorInterp.alpha]


# ----------------------------------------------------------------------------- what the inputs hold

@dataclass
class Source:
    """One file and the bands read from it: `names[i]` is its band `indexes[i]`; `offsets` S2 only."""

    path: Path
    indexes: list[int]
    names: list[str]
    offsets: list[float]
    nodata: float | None = None  # the product's NODATA value, for band files that carry no mask
    dtype: str | None = None  # the file's data type, S2 only


@dataclass
class View:
    """An opened Source and what its reads need, worked out once: `dataset` the file itself, or its warped
    view (float32, NaN where missing, `opened` both). On the file itself: `masked` whether GDAL gives it a
    mask (nodata, alpha, internal mask), `alpha` the alpha band that mask leaves out (files of other than 2
    or 4 bands), `nodata` a value marking a pixel missing where any band read holds it."""

    dataset: object
    opened: tuple
    masked: bool = False
    alpha: int | None = None
    nodata: float | None = None


def product_metadata(folder: Path) -> tuple[Path, dict[str, float], float | None] | None:
    """(file, band -> offset, NODATA value) from the MTD_MSIL1C.xml / MTD_MSIL2A.xml under `folder`."""
    for name, tag in METADATA.items():
        found = sorted(folder.rglob(name))
        if not found:
            continue
        try:
            root = ET.parse(found[0]).getroot()
        except (ET.ParseError, OSError) as error:
            raise SceneError(f"{found[0]} cannot be read as XML: {error}") from None
        offsets = {}
        for element in root.iter():
            if element.tag.split("}")[-1] == tag:
                offsets[L1C_BANDS[int(element.get("band_id"))]] = float(element.text)
        nodata = None
        for special in root.iter():
            if special.tag.split("}")[-1] == "Special_Values":
                values = {child.tag.split("}")[-1]: (child.text or "").strip() for child in special}
                if values.get("SPECIAL_VALUE_TEXT") == "NODATA":
                    nodata = float(values["SPECIAL_VALUE_INDEX"])
        return found[0], offsets, nodata
    return None


def band_files(folder: Path) -> dict[str, tuple[Path, dict, str]]:
    """Band name -> (its finest-resolution file under `folder`, that file's grid, data type); quality masks
    under QI_DATA and MSK_* skipped."""
    candidates: dict[str, list[tuple[float, Path, dict, str]]] = {}
    for path in sorted(folder.rglob("*")):
        if (path.suffix.lower() not in RASTER_SUFFIXES or not path.is_file() or "QI_DATA" in path.parts
                or path.name.upper().startswith("MSK_")):
            continue
        name = band_name(path.stem)
        if name is not None:
            with _open(path) as src:
                candidates.setdefault(name, []).append((abs(src.transform.a), path, grid_of(src), src.dtypes[0]))
    if not candidates:
        raise SceneError(f"{folder} holds no JPEG 2000 or GeoTIFF file named with an S2 band (B01 ... B12, B8A)")
    files = {}
    for name, found in candidates.items():
        found.sort(key=lambda c: c[:2])
        if len(found) > 1 and np.isclose(found[0][0], found[1][0]):
            raise SceneError(f"{folder} holds two files of band {name} at {found[0][0]:g} m: {found[0][1]} and "
                             f"{found[1][1]}; keep one")
        files[name] = found[0][1:]
    return {name: files[name] for name in L1C_BANDS if name in files}


def stack_band_names(src, path: Path, asked: Sequence[str] | None) -> list[str]:
    """Band names of an S2 stack: its descriptions when every band has one naming a band, else
    `asked` when it has the stack's band count (the stack is in the model's order), else by count."""
    indexes = _data_bands(src)
    described = [band_name(src.descriptions[i - 1] or "") for i in indexes]
    if all(described) and len(set(described)) == len(described):
        return described
    if asked is not None and len(asked) == len(indexes):
        return list(asked)
    by_count = DEFAULT_S2_BANDS.get(len(indexes))
    if by_count is None:
        raise SceneError(f"{path} has {len(indexes)} bands without band descriptions naming them (B01 ... B12); "
                         f"13 are read as L1C, 12 as L2A (no B10); name the bands in the file's descriptions")
    return list(by_count)


def s2_sources(s2: Path, asked: Sequence[str] | None, s2_offset: float | None) -> tuple[list[Source], dict, list]:
    """The S2 sources of the bands asked (all when None), the grid, and the band names in output order."""
    if s2.is_dir():
        files = band_files(s2)
        metadata = product_metadata(s2)
        offsets = {name: 0.0 if s2_offset is None else float(s2_offset) for name in files}
        nodata = None
        if metadata is not None:
            xml, found, nodata = metadata
            if s2_offset is not None and any(found.get(b, 0.0) != s2_offset for b in files):
                log.warning("%s: --s2_offset %g replaces the product's offsets %s", s2, s2_offset, found)
            else:
                offsets = {name: found.get(name, 0.0) for name in files}
                log.info("%s: S2 offsets from %s: %s", s2, xml.name, sorted(set(offsets.values())))
        available = list(files)
        sources = {name: Source(path, [1], [name], [offsets[name]], nodata, dtype)
                   for name, (path, _, dtype) in files.items()}
        finest = min(abs(g["transform"].a) for _, g, _ in files.values())
        on_finest = {name: g for name, (_, g, _) in files.items() if np.isclose(abs(g["transform"].a), finest)}
        grid = next(iter(on_finest.values()))
        for name, other in on_finest.items():
            if not same_grid(grid, other):
                raise SceneError(f"{s2}: the {finest:g} m bands lie on different grids: {files[name][0]} is "
                                 f"{describe_grid(other)}, {next(iter(on_finest))} {describe_grid(grid)}")
    elif s2.is_file():
        with _open(s2) as src:
            grid = grid_of(src)
            available = stack_band_names(src, s2, asked)
            indexes = dict(zip(available, _data_bands(src)))
            dtype = src.dtypes[0]
        offset = 0.0 if s2_offset is None else float(s2_offset)
        sources = None
    else:
        raise SceneError(f"{s2} not found: --s2 takes a GeoTIFF stack or a folder of band files (a SAFE product)")
    names = list(available if asked is None else asked)
    absent = [b for b in names if b not in available]
    if absent:
        way_out = ("an L2A product has no B10: train a 12-band run (--s2_bands without B10) or give an L1C product"
                   if "B10" in absent else "train a run on the bands the input holds (--s2_bands)")
        raise SceneError(f"{s2} lacks S2 band {', '.join(absent)} (it holds {', '.join(available)}); {way_out}")
    if sources is None:
        return [Source(s2, [indexes[b] for b in names], names, [offset] * len(names), dtype=dtype)], grid, names
    return [sources[b] for b in names], grid, names


def s1_sources(s1: Path | Sequence[Path]) -> list[Source]:
    """VV and VH: one 2-band file (descriptions VV / VH when present, else in that order), or two files
    (given, or in a folder) whose names hold VV and VH."""
    paths = [Path(p) for p in s1] if isinstance(s1, (list, tuple)) else [Path(s1)]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        paths = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in RASTER_SUFFIXES and p.is_file()
                 and _POLARISATION.search(p.stem)]
        if not paths:
            raise SceneError(f"{folder} holds no GeoTIFF named with VV or VH (--s1: a 2-band GeoTIFF, a folder or "
                             f"two files whose names hold VV and VH)")
    for path in paths:
        if not path.is_file():
            raise SceneError(f"{path} not found (--s1: a 2-band GeoTIFF, a folder or two files named VV and VH)")
    if len(paths) == 1:
        with _open(paths[0]) as src:
            indexes = _data_bands(src)
            described = [(src.descriptions[i - 1] or "").upper() for i in indexes]
        if len(indexes) != 2:
            raise SceneError(f"{paths[0]} has {len(indexes)} bands; an S1 GeoTIFF holds 2 (VV, VH), or give a folder "
                             f"or two files whose names hold VV and VH")
        if sorted(described) == sorted(S1_BANDS):
            indexes = [indexes[described.index(b)] for b in S1_BANDS]
        return [Source(paths[0], indexes, list(S1_BANDS), [0.0, 0.0])]
    found: dict[str, list[Path]] = {}
    for path in paths:
        polarisations = {m.upper() for m in _POLARISATION.findall(path.stem)}
        if len(polarisations) == 1:
            found.setdefault(polarisations.pop(), []).append(path)
    if sorted(found) != sorted(S1_BANDS) or any(len(v) != 1 for v in found.values()):
        raise SceneError(f"S1 files {', '.join(map(str, paths))}: expected one file named with VV and one with VH")
    return [Source(found[b][0], [1], [b], [0.0]) for b in S1_BANDS]


def s1_db_problem(values: np.ndarray) -> str | None:
    """Why S1 pixel values (finite, any shape) are not backscatter in dB, or None: no negative value (linear
    power and amplitude never are), or more than 1 % of them above +S1_MAX_DB dB."""
    high = float((values > S1_MAX_DB).mean()) if values.size else 0.0
    if values.size and not (values < 0).any():
        return f"no negative value among the {values.size} S1 pixels read (largest {values.max():g})"
    if high > 0.01:
        return f"{high:.1%} of the S1 pixels read above +{S1_MAX_DB:g} dB (largest {values.max():g})"
    return None


def check_s1_units(sources: list[Source], scale: str) -> None:
    """Refuses S1 whose values do not fit `scale`, from a sample of each file: its overview when it has
    one, else SAMPLE windows x SAMPLE windows of SAMPLE px spread over it (cheap on any size)."""
    for source in sources:
        with _open(source.path) as src:
            if src.overviews(source.indexes[0]):
                shape = (min(src.height, SAMPLE ** 2), min(src.width, SAMPLE ** 2))
                windows = [Window(0, 0, src.width, src.height)]
            else:
                shape = None
                windows = [Window(col, row, min(SAMPLE, src.width - col), min(SAMPLE, src.height - row))
                           for row in np.linspace(0, max(src.height - SAMPLE, 0), SAMPLE).astype(int)
                           for col in np.linspace(0, max(src.width - SAMPLE, 0), SAMPLE).astype(int)]
            values = np.concatenate([
                src.read(source.indexes, window=w, masked=True, out_shape=shape and (len(source.indexes), *shape))
                .astype("float64").filled(np.nan).ravel() for w in windows])
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise SceneError(f"{source.path}: no valid S1 pixel among the {len(windows)} windows read")
        negative = float((values < 0).mean())
        if scale == "db":
            problem = s1_db_problem(values)
            if problem is not None:
                raise SceneError(f"{source.path}: {problem}: not backscatter in dB; pass --s1_scale power or "
                                 f"amplitude for linear values")
        elif negative > 0.5:
            raise SceneError(f"{source.path}: {negative:.0%} of the S1 pixels read are negative: values in dB, not "
                             f"linear {scale}; pass --s1_scale db")


def check_overlap(sources: list[Source], grid: dict, s2: Path) -> None:
    left, top = grid["transform"] @ (0, 0)
    right, bottom = grid["transform"] @ (grid["width"], grid["height"])
    box = (min(left, right), min(top, bottom), max(left, right), max(top, bottom))
    for source in sources:
        with _open(source.path) as src:
            if src.crs is None:
                continue  # GCPs only: the warper places it
            b = transform_bounds(src.crs, grid["crs"], *src.bounds)
        if b[0] >= box[2] or b[2] <= box[0] or b[1] >= box[3] or b[3] <= box[1]:
            raise SceneError(f"{source.path} does not overlap the S2 scene {s2} ({describe_grid(grid)})")


# ----------------------------------------------------------------------------- the scene

class Scene:
    """S1 and S2 on the S2 grid, read window by window.

    `grid` {"crs", "transform", "width", "height"}; `s2_band_names` the S2 bands returned, in order;
    `s1_band_names` ("VV", "VH"); `files` every file read. Picklable: each process opens the files
    anew (DataLoader workers), on its first read."""

    def __init__(self, s1: list[Source], s2: list[Source], grid: dict, s1_scale: str, name: str) -> None:
        self.s1_sources, self.s2_sources, self.grid, self.s1_scale, self.name = s1, s2, grid, s1_scale, name
        self.s2_band_names = [n for source in s2 for n in source.names]
        self.s1_band_names = list(S1_BANDS)
        self.files = [source.path for source in (*s1, *s2)]
        self._offsets = [np.asarray(s.offsets, np.float32)[:, None, None] if any(s.offsets) else None for s in s2]
        self._handles, self._pid = None, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": None, "_pid": None}

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Scene({self.name}: {describe_grid(self.grid)}, S2 {','.join(self.s2_band_names)}, S1 {self.s1_scale})"

    def _view(self, source: Source, resampling: Resampling, per_band: bool) -> View:
        """The file itself when on the grid, else a warped view. `per_band`: the file's nodata value in any
        band marks the pixel missing (S1's two bands are one measurement), not only in all (GDAL's mask)."""
        src = _open(source.path)
        if src.crs is not None and same_grid(grid_of(src), self.grid):
            alpha = [i for i, c in zip(src.indexes, src.colorinterp) if c == ColorInterp.alpha]
            masked = any(flags != [MaskFlags.all_valid] for flags in src.mask_flag_enums)
            nodata = source.nodata if src.nodata is None else src.nodata if per_band else None
            return View(src, (src,), masked, alpha[0] if alpha else None, nodata)
        nodata = {} if source.nodata is None or src.nodata is not None else {"src_nodata": source.nodata}
        # XSCALE = YSCALE = 1: the kernel never widens with the window's scale, so that a pixel's value is the
        # same whatever window reads it
        vrt = WarpedVRT(src, crs=self.grid["crs"], transform=self.grid["transform"], width=self.grid["width"],
                        height=self.grid["height"], resampling=resampling, dtype="float32", nodata=np.nan,
                        XSCALE=1, YSCALE=1, **nodata)
        return View(vrt, (vrt, src))

    def _open(self) -> tuple[list, list]:
        if self._pid != os.getpid():  # GDAL handles are never shared with a forked worker
            s1 = [self._view(s, Resampling.bilinear, True) for s in self.s1_sources]
            s2 = [self._view(s, Resampling.nearest, False) for s in self.s2_sources]
            self._handles, self._pid = (s1, s2), os.getpid()
        return self._handles

    def close(self) -> None:
        for views in self._handles or ():
            for view in views:
                for handle in view.opened:
                    handle.close()
        self._handles, self._pid = None, None

    @staticmethod
    def _read(view: View, source: Source, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(bands, h, w) float32 and the (h, w) missing pixels: the dataset's mask (nodata, alpha,
        internal mask; NaN in warped views), its alpha band, a band NaN or at `view.nodata`."""
        values = view.dataset.read(source.indexes, window=window, out_dtype="float32")
        missing = np.isnan(values).any(0)
        if view.masked:
            missing |= view.dataset.dataset_mask(window=window) == 0
        if view.alpha is not None:
            missing |= view.dataset.read(view.alpha, window=window) == 0
        if view.nodata is not None:
            missing |= (values == view.nodata).any(0)
        return values, missing

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """S1 (2, h, w) float32 dB and S2 (C, h, w) float32 digital numbers + offset (clipped at 0 where
        an offset applies) of `window` (pixels of the S2 grid, inside it); NaN where missing."""
        s1_views, s2_views = self._open()
        h, w = int(window.height), int(window.width)
        s2 = np.empty((len(self.s2_band_names), h, w), np.float32)
        missing = np.zeros((h, w), bool)
        band = 0
        for view, source, offsets in zip(s2_views, self.s2_sources, self._offsets):
            values, gone = self._read(view, source, window)
            if offsets is not None:
                values = np.maximum(values + offsets, 0)
            s2[band:band + len(source.names)] = values
            missing |= gone
            band += len(source.names)
        s2[:, missing] = np.nan
        s1 = np.empty((2, h, w), np.float32)
        missing = np.zeros((h, w), bool)
        band = 0
        for view, source in zip(s1_views, self.s1_sources):
            values, gone = self._read(view, source, window)
            s1[band:band + len(source.names)] = values
            missing |= gone
            band += len(source.names)
        if self.s1_scale != "db":
            with np.errstate(divide="ignore", invalid="ignore"):
                s1 = np.where(s1 > 0, (10 if self.s1_scale == "power" else 20) * np.log10(s1), np.nan)
            missing |= np.isnan(s1).any(0)
        s1[:, missing] = np.nan
        return s1.astype(np.float32, copy=False), s2


def open_scene(s1: str | Path | Sequence[str | Path], s2: str | Path, *, s1_scale: str = "db",
               s2_offset: float | None = None, s2_bands: Sequence[str] | None = None) -> Scene:
    """The scene of S1 `s1` (a 2-band GeoTIFF, a folder or two files named VV / VH) on the grid of S2
    `s2` (a GeoTIFF stack or a folder of band files), returning the S2 bands `s2_bands` by name (all
    the input holds when None). Raises SceneError (one line, naming the file) on what it cannot use."""
    if s1_scale not in S1_SCALES:
        raise SceneError(f"s1_scale must be one of {', '.join(S1_SCALES)}, got {s1_scale!r}")
    asked = None
    if s2_bands is not None:
        asked = [band_name(b) or b for b in s2_bands]
        if len(set(asked)) != len(asked):
            raise SceneError(f"S2 bands asked twice: {', '.join(s2_bands)}")
    s2 = Path(s2)
    s2_list, grid, _ = s2_sources(s2, asked, s2_offset)
    s1_list = s1_sources(s1)
    check_overlap(s1_list, grid, s2)
    check_s1_units(s1_list, s1_scale)
    return Scene(s1_list, s2_list, grid, s1_scale, f"{s1} + {s2}")
