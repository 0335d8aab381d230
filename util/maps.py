"""A class map as files: where each window's class lands on the scene's grid (window_origins, paint_spans,
pixel_cells, value_pixels), the map and its probabilities as cloud-optimised GeoTIFFs (write_map), a QGIS
style (write_qml), a PNG preview beside the true classes, and their agreement. Maps hold uint8 class indices,
NODATA where none."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
import rasterio.env
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.windows import Window

from util.io import atomic_write

NODATA = 255
GDAL_CACHE = 64 * 2**20  # bytes of GDAL block cache per process: windows are read and map rows written once
TILE = 256  # map tile side, px; the map is written TILE rows at a time
# The DFC2020 / SEN12MS legend (IEEE GRSS Data Fusion Contest 2020), for runs on those classes.
DFC_COLORS = {"Forest": "#009900", "Shrubland": "#c6b044", "Grassland": "#b6ff05", "Wetlands": "#27ff87",
              "Croplands": "#c24f44", "Urban/Built-up": "#a5a5a5", "Barren": "#f9ffa4", "Water": "#1c0dff"}


@contextmanager
def gdal_cache(nbytes: int = GDAL_CACHE) -> Iterator[None]:
    """GDAL's block cache capped at `nbytes` bytes inside, its previous size back after: rasterio.Env alone
    leaves the cap set when an outer environment is active (datasets.sources.gdal_env's never exits)."""
    before = rasterio.env.get_gdal_config("GDAL_CACHEMAX")
    try:
        with rasterio.Env(GDAL_CACHEMAX=nbytes):
            yield
    finally:
        rasterio.env.set_gdal_config("GDAL_CACHEMAX", before)


def window_origins(size: int, window: int, stride: int) -> list[int]:
    """Offsets (px) of the windows along an axis of `size` px: every `stride` px from 0, and one more flush with
    the far edge when those stop short of it (size >= window)."""
    origins = list(range(0, size - window + 1, stride))
    return origins if origins[-1] == size - window else [*origins, size - window]


def paint_spans(size: int, window: int, stride: int) -> list[tuple[int, int]]:
    """The pixels [start, stop) that each window of `window_origins` paints with its class along the axis: the
    `stride` px centred in it (from (window - stride) // 2 px in); the flush last window takes what the one before
    leaves, and the first and last windows the margins to the edges. The spans tile 0 .. size."""
    origins = window_origins(size, window, stride)
    offset = (window - stride) // 2
    stops = [o + offset + stride for o in origins[:-1]] + [size]
    return list(zip([0, *stops[:-1]], stops))


def pixel_cells(size: int, window: int, stride: int) -> np.ndarray:
    """(size,) int: the window (cell) index that paints each pixel along the axis."""
    spans = paint_spans(size, window, stride)
    return np.repeat(np.arange(len(spans)), [stop - start for start, stop in spans])


def value_pixels(cells: np.ndarray, grid: dict, window: int, stride: int) -> np.ndarray:
    """(256,) int64: how many pixels of the map (`write_map`) hold each value of `cells` (rows, cols) uint8."""
    heights = np.diff([s for s, _ in paint_spans(grid["height"], window, stride)] + [grid["height"]])
    widths = np.diff([s for s, _ in paint_spans(grid["width"], window, stride)] + [grid["width"]])
    return np.bincount(cells.ravel(), weights=np.outer(heights, widths).ravel(), minlength=256).astype(np.int64)


def class_colors(classes: list[str]) -> list[tuple[int, int, int]]:
    """One RGB colour per class: the DFC2020 legend when every class is one of DFC2020's, else a fixed
    qualitative palette (matplotlib's tab10 up to 10 classes, tab20 up to 20, then repeated)."""
    if set(classes) <= set(DFC_COLORS):
        return [tuple(int(DFC_COLORS[c][i:i + 2], 16) for i in (1, 3, 5)) for c in classes]
    import matplotlib

    colors = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"].colors
    return [tuple(round(255 * v) for v in colors[i % len(colors)][:3]) for i in range(len(classes))]


def write_cog(path: Path, grid: dict, bands: int, block: Callable[[int, int], np.ndarray], resampling: str,
              colormap: dict | None = None, descriptions: list[str] | None = None, tags: dict | None = None) -> None:
    """A cloud-optimised GeoTIFF of `bands` uint8 bands on `grid` (NODATA nodata): `block(top, bottom)` gives its
    rows (bands, bottom - top, width), asked TILE rows at a time into a tiled GTiff beside `path`, then copied by
    GDAL's COG driver (deflate, overviews by `resampling`) with GDAL's cache capped (GDAL_CACHE)."""
    height, width = grid["height"], grid["width"]
    staging = path.with_name(path.name + ".staging.tif")
    try:
        with gdal_cache(), rasterio.open(
                staging, "w", driver="GTiff", width=width, height=height, count=bands, dtype="uint8",
                crs=grid["crs"], transform=grid["transform"], nodata=NODATA, tiled=True, blockxsize=TILE,
                blockysize=TILE, compress="deflate", BIGTIFF="IF_SAFER") as dst:
            if colormap is not None:
                dst.write_colormap(1, colormap)
            for i, name in enumerate(descriptions or ()):
                dst.set_band_description(i + 1, name)
            dst.update_tags(**(tags or {}))
            for top in range(0, height, TILE):
                bottom = min(top + TILE, height)
                dst.write(block(top, bottom), window=Window(0, top, width, bottom - top))
        with gdal_cache():
            rasterio.shutil.copy(staging, path, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=TILE,
                                 RESAMPLING=resampling.upper(), BIGTIFF="IF_SAFER")
    finally:
        staging.unlink(missing_ok=True)


def write_map(path: Path, cells: np.ndarray, grid: dict, window: int, stride: int, classes: list[str], tags: dict,
              probs: np.ndarray | None = None) -> None:
    """MAP.tif at the scene's resolution, each window's class (`cells` (rows, cols)) over the pixels it paints
    (`paint_spans`), a COG with the class colours, names in its tags, overviews by mode; with `probs`
    (rows, cols, K) also MAP_prob.tif, one band per class named by it, overviews by average. Each file is
    written under a temporary name and renamed."""
    row_of = pixel_cells(grid["height"], window, stride)
    col_of = pixel_cells(grid["width"], window, stride)
    colormap = {i: (*rgb, 255) for i, rgb in enumerate(class_colors(classes))} | {NODATA: (0, 0, 0, 0)}
    tags = {"classes": json.dumps(classes), **{f"class_{i}": name for i, name in enumerate(classes)}, **tags}

    def class_rows(top: int, bottom: int) -> np.ndarray:
        return cells[row_of[top:bottom]][None, :, col_of]

    def probability_rows(top: int, bottom: int) -> np.ndarray:
        return probs[row_of[top:bottom]][:, col_of].transpose(2, 0, 1)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: write_cog(tmp, grid, 1, class_rows, "mode", colormap, ["class"], tags))
    if probs is not None:
        atomic_write(probabilities_path(path), lambda tmp: write_cog(
            tmp, grid, len(classes), probability_rows, "average", None, classes,
            {**tags, "scale": "probability x 200, 255 nodata"}))


def probabilities_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}_prob.tif")


def write_qml(path: Path, classes: list[str]) -> None:
    """MAP.qml: a QGIS paletted-raster style (band 1: each class value with its name and colour)."""
    qgis = ET.Element("qgis", version="3.28", styleCategories="AllStyleCategories")
    renderer = ET.SubElement(ET.SubElement(qgis, "pipe"), "rasterrenderer", type="paletted", band="1",
                             opacity="1", alphaBand="-1", nodataColor="")
    palette_xml = ET.SubElement(renderer, "colorPalette")
    for i, (name, rgb) in enumerate(zip(classes, class_colors(classes))):
        ET.SubElement(palette_xml, "paletteEntry", value=str(i), label=name, alpha="255",
                      color="#{:02x}{:02x}{:02x}".format(*rgb))
    ET.indent(qgis)
    text = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(qgis, encoding="unicode")
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def read_classes(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Band 1 of a class raster, whole or resampled (nearest) to `shape`."""
    with rasterio.open(path) as src:
        return src.read(1, out_shape=shape, resampling=Resampling.nearest)


def agreement(map_path: Path, truth_path: Path, rows: int = 1024) -> float | None:
    """% of the pixels labelled in both rasters where they agree, read in blocks of rows."""
    hits = total = 0
    with rasterio.open(map_path) as a, rasterio.open(truth_path) as b:
        for top in range(0, a.height, rows):
            window = Window(0, top, a.width, min(rows, a.height - top))
            pred, true = a.read(1, window=window), b.read(1, window=window)
            both = (pred != NODATA) & (true != NODATA)
            hits += int((pred[both] == true[both]).sum())
            total += int(both.sum())
    return 100.0 * hits / total if total else None


def preview(path: Path, map_path: Path, classes: list[str], title: str, truth: Path | None = None, largest: int = 800):
    """MAP.png: the map (beside the true classes when given), at most `largest` px a side, one
    legend for both. Returns the matplotlib Figure (closed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    with rasterio.open(map_path) as src:
        scale = max(src.width, src.height) / largest
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale))) if scale > 1 else None
    panels = [("predicted", read_classes(map_path, shape))]
    if truth is not None:
        panels.append(("true classes", read_classes(truth, shape)))
    colors = [np.array(c) / 255 for c in class_colors(classes)]
    nodata_color = (1.0, 1.0, 1.0)
    cmap = ListedColormap(colors + [nodata_color])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.8, 4.6), squeeze=False,
                             layout="constrained")
    for ax, (name, image) in zip(axes[0], panels):
        shown = np.where(image == NODATA, len(classes), np.minimum(image, len(classes)))
        ax.imshow(shown, cmap=cmap, vmin=-0.5, vmax=len(classes) + 0.5, interpolation="nearest")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    present = set(np.unique(np.concatenate([image.ravel() for _, image in panels])).tolist())
    handles = [Patch(color=colors[i], label=name) for i, name in enumerate(classes) if i in present]
    handles += ([Patch(facecolor=nodata_color, edgecolor="black", label="nodata or ignored")]
                if NODATA in present else [])
    fig.legend(handles=handles, loc="outside right center", fontsize="small", title="class")
    fig.suptitle(title, fontsize="medium")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return fig
