"""Synthetic Sentinel products in their providers' layouts, tiny and seeded, for the scene tests and the benchmark.

Each writer returns what it wrote as arrays, so tests build their expectations independently:
- `l1c`: S2A_MSIL1C_*.SAFE/GRANULE/L1C_*/IMG_DATA/T33TWM_*_B01.jp2 ... (13 bands at 10/20/60 m),
  MTD_MSIL1C.xml with RADIO_ADD_OFFSET -1000 and DN = value + 1000 for baseline 04.00, plus the files a
  product also holds with a band token or none (QI_DATA/MSK_DETFOO_B01.jp2, *_TCI.jp2);
- `l2a`: S2A_MSIL2A_*.SAFE/.../IMG_DATA/R10m, R20m, R60m/T33TWM_*_B02_10m.jp2 ... with the coarser copies
  of the finer bands (block means, so that a wrong pick shows), MTD_MSIL2A.xml (BOA_ADD_OFFSET);
- `s1_power`: VV and VH in EPSG:4326, linear power, covering the S2 tile with a margin.
"""
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import rasterio.windows
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds

CRS = "EPSG:32633"
ORIGIN = (600000.0, 5000040.0)
TILE = "T33TWM_20240101T100000"
RESOLUTION = {"B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10, "B8A": 20,
              "B09": 60, "B10": 60, "B11": 20, "B12": 20}
BANDS = tuple(RESOLUTION)
# L2A: the resolutions each band is delivered at (R10m, R20m, R60m).
L2A_COPIES = {"B01": (20, 60), "B02": (10, 20, 60), "B03": (10, 20, 60), "B04": (10, 20, 60), "B05": (20, 60),
              "B06": (20, 60), "B07": (20, 60), "B08": (10,), "B8A": (20, 60), "B09": (60,), "B11": (20, 60),
              "B12": (20, 60)}


def write_raster(path: Path, array: np.ndarray, transform, crs: str = CRS, **profile) -> Path:
    """(bands, H, W) or (H, W) array; JPEG 2000 losslessly for .jp2, else GeoTIFF."""
    array = array[None] if array.ndim == 2 else array
    jp2 = path.suffix == ".jp2"
    options = dict(driver="JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES") if jp2 else dict(driver="GTiff")
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype=array.dtype, crs=crs, transform=transform, **options, **profile) as dst:
        dst.write(array)
    return path


def smooth_field(rng: np.random.Generator, size: int, low: int, high: int) -> np.ndarray:
    """A (size, size) uint16 field with structure and noise (compresses like imagery, not like noise)."""
    y, x = np.mgrid[0:size, 0:size] / max(size, 1)
    phase = rng.uniform(0, 6, 3)
    field = np.sin(6 * x + phase[0]) * np.cos(5 * y + phase[1]) + 0.3 * np.sin(20 * (x + y) + phase[2])
    noisy = (field + 1.3) / 2.6 * (high - low) + low + rng.integers(0, 50, (size, size))
    return np.clip(noisy, 1, 65535).astype(np.uint16)


def band_values(size: int, seed: int) -> dict[str, np.ndarray]:
    """Each band's values at its own resolution (size px a side at 10 m)."""
    rng = np.random.default_rng(seed)
    return {band: smooth_field(rng, size * 10 // res, 100, 5000) for band, res in RESOLUTION.items()}


def metadata_xml(level: str, offset: int, bands=BANDS) -> str:
    tag = "RADIO_ADD_OFFSET" if level == "L1C" else "BOA_ADD_OFFSET"
    items = "".join(f'<{tag} band_id="{BANDS.index(b)}">{offset}</{tag}>' for b in bands)
    listing = f"<Radiometric_Offset_List>{items}</Radiometric_Offset_List>" if level == "L1C" else \
        f"<BOA_ADD_OFFSET_VALUES_LIST>{items}</BOA_ADD_OFFSET_VALUES_LIST>"
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<n1:Level-{level[1:]}_User_Product '
            f'xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-{level[1:]}.xsd">'
            f"<n1:General_Info><Product_Info><PROCESSING_BASELINE>04.00</PROCESSING_BASELINE></Product_Info>"
            f"<Product_Image_Characteristics><Special_Values><SPECIAL_VALUE_TEXT>NODATA</SPECIAL_VALUE_TEXT>"
            f"<SPECIAL_VALUE_INDEX>0</SPECIAL_VALUE_INDEX></Special_Values>{listing}"
            f"</Product_Image_Characteristics></n1:General_Info></n1:Level-{level[1:]}_User_Product>")


def l1c(root: Path, size: int = 60, seed: int = 0, baseline4: bool = True,
        values: dict[str, np.ndarray] | None = None) -> tuple[Path, dict[str, np.ndarray]]:
    """An L1C SAFE product; returns its folder and each band's digital numbers as stored."""
    values = band_values(size, seed) if values is None else values
    safe = root / "S2A_MSIL1C_20240101T100000_N0510_R122_T33TWM_20240101T120000.SAFE"
    img = safe / "GRANULE" / "L1C_T33TWM_A000001_20240101T100000" / "IMG_DATA"
    stored = {}
    for band, array in values.items():
        stored[band] = array + 1000 if baseline4 else array
        write_raster(img / f"{TILE}_{band}.jp2", stored[band], from_origin(*ORIGIN, RESOLUTION[band],
                                                                         RESOLUTION[band]))
    write_raster(img / f"{TILE}_TCI.jp2", np.zeros((3, size, size), np.uint8), from_origin(*ORIGIN, 10, 10))
    write_raster(img.parent / "QI_DATA" / "MSK_DETFOO_B01.jp2", np.ones((size // 6, size // 6), np.uint8),
                 from_origin(*ORIGIN, 60, 60))
    if baseline4:
        (safe / "MTD_MSIL1C.xml").write_text(metadata_xml("L1C", -1000))
    return safe, stored


def l2a(root: Path, size: int = 60, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """An L2A SAFE product of baseline 04.00 (BOA_ADD_OFFSET -1000); returns its folder and each
    band's finest digital numbers as stored (the coarser copies are block means of the finest)."""
    rng = np.random.default_rng(seed)
    values = {band: smooth_field(rng, size * 10 // res[0], 100, 5000) for band, res in L2A_COPIES.items()}
    safe = root / "S2A_MSIL2A_20240101T100000_N0510_R122_T33TWM_20240101T120000.SAFE"
    img = safe / "GRANULE" / "L2A_T33TWM_A000001_20240101T100000" / "IMG_DATA"
    stored = {}
    for band, resolutions in L2A_COPIES.items():
        finest = values[band] + 1000
        stored[band] = finest
        for res in resolutions:
            f = res // resolutions[0]
            n = finest.shape[0] // f
            copy = finest.reshape(n, f, n, f).mean((1, 3)).astype(np.uint16) + (f > 1)  # differs from the finest
            write_raster(img / f"R{res}m" / f"{TILE}_{band}_{res}m.jp2", copy, from_origin(*ORIGIN, res, res))
    write_raster(img / "R20m" / f"{TILE}_SCL_20m.jp2", np.ones((size // 2, size // 2), np.uint8),
                 from_origin(*ORIGIN, 20, 20))
    (safe / "MTD_MSIL2A.xml").write_text(metadata_xml("L2A", -1000, tuple(L2A_COPIES)))
    return safe, stored


def s2_grid(size: int = 60) -> dict:
    return {"crs": rasterio.crs.CRS.from_string(CRS), "transform": from_origin(*ORIGIN, 10, 10), "width": size,
            "height": size}


def s1_power(path: Path, size: int = 60, seed: int = 0, nodata: float | None = None,
             margin: float = 0.002) -> tuple[Path, np.ndarray, object]:
    """A 2-band (VV, VH) float32 GeoTIFF of linear power in EPSG:4326 over the S2 tile of `size` px,
    with a margin (degrees); returns the path, the array and its transform."""
    west, south, east, north = transform_bounds(CRS, "EPSG:4326", ORIGIN[0], ORIGIN[1] - 10 * size,
                                                ORIGIN[0] + 10 * size, ORIGIN[1])
    res = 0.00011  # about 12 m north-south, 9 m east-west at 45 N
    transform = from_origin(west - margin, north + margin, res, res)
    width, height = int((east - west + 2 * margin) / res) + 1, int((north - south + 2 * margin) / res) + 1
    rng = np.random.default_rng(seed)
    power = np.stack([smooth_field(rng, max(width, height), 10, 3000)[:height, :width] / 10000.0 for _ in range(2)])
    power = power.astype(np.float32)
    profile = {} if nodata is None else {"nodata": nodata}
    write_raster(path, power, transform, "EPSG:4326", **profile)
    with rasterio.open(path, "r+") as dst:
        dst.descriptions = ("VV", "VH")
    return path, power, transform


def _streamed(path: Path, width: int, height: int, count: int, dtype: str, transform, crs: str, fill, **profile):
    """A GeoTIFF written 1024 rows at a time: `fill(band, top, rows)` gives each strip (rows, width)."""
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count, dtype=dtype, crs=crs,
                       transform=transform, tiled=True, compress="zstd", zstd_level=1, bigtiff="if_safer",
                       **profile) as dst:
        for top in range(0, height, 1024):
            rows = min(1024, height - top)
            for band in range(count):
                dst.write(fill(band, top, rows), band + 1, window=rasterio.windows.Window(0, top, width, rows))
    return path


def l1c_large(root: Path, size: int = 10980, seed: int = 0) -> tuple[Path, Path]:
    """An L1C product of `size` px at 10 m (JPEG 2000, lossless, 1024 px tiles, baseline 04.00) and
    S1 linear power in EPSG:4326 over it, written strip by strip (memory does not grow with the size)
    for the benchmark; returns (S2 folder, S1 file)."""
    safe, _ = l1c(root, 6, seed, values={b: np.ones((6 * 10 // r, 6 * 10 // r), np.uint16)
                                         for b, r in RESOLUTION.items() if r == 60 or b == "B02"})
    img = next(safe.rglob("IMG_DATA"))
    for old in img.glob("*_B*.jp2"):
        old.unlink()
    for i, (band, res) in enumerate(RESOLUTION.items()):
        n = size * 10 // res
        rng = np.random.default_rng([seed, i])

        def fill(_, top, rows, n=n, rng=rng, i=i):
            y, x = np.ogrid[top:top + rows, 0:n]
            field = 1000 + 100 * i + (x // 7 + y // 5) % 1500 + ((x * y) >> 10) % 700
            return (field + rng.integers(0, 30, (rows, n))).astype(np.uint16)

        tif = _streamed(root / f"{band}.tif", n, n, 1, "uint16", from_origin(*ORIGIN, res, res), CRS, fill)
        rasterio.shutil.copy(tif, img / f"{TILE}_{band}.jp2", driver="JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES",
                             BLOCKXSIZE=1024, BLOCKYSIZE=1024)
        tif.unlink()
    west, south, east, north = transform_bounds(CRS, "EPSG:4326", ORIGIN[0], ORIGIN[1] - 10 * size,
                                                ORIGIN[0] + 10 * size, ORIGIN[1])
    res = 0.0001
    width, height = int((east - west) / res) + 20, int((north - south) / res) + 20
    rng = np.random.default_rng(seed)

    def power(band, top, rows):
        y, x = np.ogrid[top:top + rows, 0:width]
        return ((1 + (x // 9 + y // 13 + band) % 300) * rng.uniform(0.5, 1.5, (rows, width)) / 1000).astype(np.float32)

    s1 = _streamed(root / "s1_power.tif", width, height, 2, "float32",
                   from_origin(west - 10 * res, north + 10 * res, res, res), "EPSG:4326", power)
    return safe, s1
