"""Write small synthetic data sets in the exact layouts of METER-ML, DFC2020 and SEN12MS.

Tests and the demo use them: file names, shapes, dtypes and value ranges follow the real data.
Class c carries the code pair (c % 3, c // 3): S1 the first (backscatter level, speckle), S2 the
second (band ratios, texture), so only S1 and S2 together tell all classes apart. Seeded.

    python synthetic_data.py meterml OUT --n 1000 --seed 0
    python synthetic_data.py dfc2020 OUT --n 100 --seed 0
    python synthetic_data.py sen12ms OUT --n 20 --seed 0
    python synthetic_data.py manifest OUT --n 40 --seed 0
    python synthetic_data.py scene OUT --rows 4 --cols 4 --size 64 --seed 0
    python synthetic_data.py scene OUT --like own/pairs.csv   # or --classes a,b,c --bands 12
"""
import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.crs import CRS

from datasets.labels import DFC_CLASSES, LABEL_CODES
from datasets.manifest import read_manifest
from datasets.sen12ms import SEASONS
from util import cli

logger = logging.getLogger(__name__)

# S2 L1C reflectance x 10000 per S2 code, bands B1-B8, B8A, B9-B12: vegetation (red edge, high NIR),
# bare / built (flat, bright SWIR), dark / wet (falling towards the infrared).
_S2_SIGNATURE = np.array([
    [1300, 1000, 900, 700, 1200, 2300, 2700, 2900, 3000, 1000, 30, 1900, 1000],
    [1500, 1350, 1400, 1500, 1700, 1900, 2000, 2100, 2200, 800, 30, 2700, 2200],
    [1350, 1150, 1000, 850, 800, 750, 700, 650, 620, 300, 20, 500, 300],
], dtype=np.float32)
# Relative pixel-to-pixel variation per band, which survives the per-patch max normalisation of DFC2020.
_S2_TEXTURE = np.array([
    [0.06] * 5 + [0.18] * 8,
    [0.12] * 13,
    [0.20] * 5 + [0.05] * 8,
], dtype=np.float32)
_S1_VV_DB = np.array([-16.0, -12.5, -9.0], dtype=np.float32)  # backscatter level per S1 code
_S1_LOOKS = np.array([12.0, 5.0, 2.0], dtype=np.float32)  # speckle: fewer looks, rougher texture
_VH_MINUS_VV_DB = -7.0

# METER-ML
_METERML_CLASSES = ["CAFOs", "Landfills", "Mines", "Negative", "ProcessingPlants", "RefineriesAndTerminals",
                    "WWTreatment"]
_NEGATIVE = 3
_BANDS_10M = [1, 2, 3, 7]  # B2, B3, B4, B8
_BANDS_20M = [4, 5, 6, 8, 11, 12]  # B5, B6, B7, B8A, B11, B12
_BANDS_60M = [0, 9, 10]  # B1, B9, B10

# DFC2020 / SEN12MS: DFC codes 1-10; Savanna (3) and Snow/Ice (8) are rare and ignored by the 8 classes.
_DFC_CODES = np.arange(1, 11)
_DFC_WEIGHTS = np.array([3, 3, 1, 3, 2, 3, 3, 1, 2, 3])
# (s1_code, s2_code) indexed by DFC code 0-10: the 8 classes k (Forest 0 ... Water 7) get
# (k % 3, k // 3); Savanna and Snow/Ice share (2, 2); code 0 is never drawn as land.
_S1_CODE = np.array([0, 0, 1, 2, 2, 0, 1, 2, 2, 0, 1])
_S2_CODE = np.array([0, 0, 0, 2, 0, 1, 1, 1, 2, 2, 2])
# IGBP codes that map to each DFC code through [0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 6, 8, 9, 10].
_IGBP_OF_DFC = {1: [1, 2, 3, 4, 5], 2: [6, 7], 3: [8, 9], 4: [10], 5: [11], 6: [12, 14], 7: [13], 8: [15], 9: [16],
                10: [17]}


def _smooth_field(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(height, width), about unit amplitude: three random plane waves."""
    y, x = np.mgrid[:height, :width].astype(np.float32)
    field = np.zeros((height, width), dtype=np.float32)
    for _ in range(3):
        fy, fx = rng.uniform(-4, 4, 2) * 2 * math.pi
        field += np.sin(fy * y / height + fx * x / width + rng.uniform(0, 2 * math.pi)).astype(np.float32)
    return field / math.sqrt(1.5)


def _pixels(rng: np.random.Generator, s1_code: np.ndarray,
            s2_code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """S1 backscatter (2, H, W) in dB and S2 reflectance x 10000 (13, H, W), float32, of code maps (H, W)."""
    height, width = s1_code.shape
    looks = _S1_LOOKS[s1_code]
    speckle = rng.gamma(looks, 1.0 / looks, size=(2, height, width)).astype(np.float32)
    vv = _S1_VV_DB[s1_code] + rng.normal(0.0, 1.5) + _smooth_field(rng, height, width)
    s1 = np.stack([vv, vv + _VH_MINUS_VV_DB]) + 10 * np.log10(speckle)

    signature = _S2_SIGNATURE[s2_code].transpose(2, 0, 1) * rng.lognormal(0.0, 0.08, size=(13, 1, 1))
    texture = 1 + _S2_TEXTURE[s2_code].transpose(2, 0, 1) * rng.standard_normal((13, height, width),
                                                                                 dtype=np.float32)
    brightness = rng.lognormal(0.0, 0.15) * (1 + 0.06 * _smooth_field(rng, height, width))
    s2 = signature * texture * brightness
    return s1.astype(np.float32), s2.astype(np.float32)


# ----------------------------------------------------------------------------------------------------- METER-ML


def write_meterml(root: str | Path, n: int = 1000, seed: int = 0, *, val_fraction: float = 0.2) -> Path:
    """``{train,val}_dataset.geojson`` (Points with ``Image_Folder``, ``Type``), train folders over
    ``train_images_1..3``, every fourth written ``train_images/<id>`` (the real metadata's quirk).
    A folder: ``sentinel-1.npy`` (72, 72, 2) uint16 0-4095, ``sentinel-2-{10,20,60}m.npy`` (72, 72, 4),
    (36, 36, 6), (12, 12, 3) uint16, ``naip.png`` RGBA 72 px (real: about 720) of the S2 10 m bands.
    About 20 % of the facilities get a compound ``Type``, the signal following its first name."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    n_val = round(n * val_fraction)
    classes = rng.integers(0, len(_METERML_CLASSES), n)
    facilities = [name for name in _METERML_CLASSES if name != "Negative"]
    features: dict[str, list[dict]] = {"train": [], "val": []}
    for i, label in enumerate(classes):
        split = "val" if i >= n - n_val else "train"
        sample_id = f"site_{i:06d}"
        if split == "val":
            folder = written = f"val_images/{sample_id}"
        else:
            folder = f"train_images_{1 + i % 3}/{sample_id}"
            written = f"train_images/{sample_id}" if i % 4 == 0 else folder
        names = [_METERML_CLASSES[label]]
        if label != _NEGATIVE and rng.random() < 0.2:
            others = [name for name in facilities if name != names[0]]
            names += list(rng.choice(others, size=rng.integers(1, 3), replace=False))
        lon, lat = rng.uniform(-124.0, -67.0), rng.uniform(25.0, 49.0)
        features[split].append({
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [round(lon, 6), round(lat, 6)]},
            "properties": {"Image_Folder": written, "Type": "-".join(names)},
        })

        code_map = np.zeros((72, 72), dtype=np.int64)
        s1_db, s2 = _pixels(rng, code_map + label % 3, code_map + label // 3)
        # The archive's S1 is 0..4095, not dB: (dB + 40) * 70 puts VV near the per-channel mean (1653).
        s1 = np.clip((s1_db + 40) * 70, 0, 4095)
        s2_20m = s2[_BANDS_20M].reshape(6, 36, 2, 36, 2).mean(axis=(2, 4))
        s2_60m = s2[_BANDS_60M].reshape(3, 12, 6, 12, 6).mean(axis=(2, 4))
        path = root / folder
        path.mkdir(parents=True, exist_ok=True)
        for name, array in [
            ("sentinel-1.npy", s1),
            ("sentinel-2-10m.npy", s2[_BANDS_10M]),
            ("sentinel-2-20m.npy", s2_20m),
            ("sentinel-2-60m.npy", s2_60m),
        ]:
            np.save(path / name, np.clip(array, 0, 65535).astype(np.uint16).transpose(1, 2, 0))
        rgbn = np.clip(s2[[3, 2, 1, 7]] / 16, 0, 255).astype(np.uint8)  # B4, B3, B2, B8
        Image.fromarray(rgbn.transpose(1, 2, 0), mode="RGBA").save(path / "naip.png")

    for split, split_features in features.items():
        (root / f"{split}_dataset.geojson").write_text(
            json.dumps({"type": "FeatureCollection", "features": split_features})
        )
    return root


# -------------------------------------------------------------------------------------- DFC2020 and SEN12MS


def _label_map(rng: np.random.Generator, size: int) -> np.ndarray:
    """DFC codes (size, size) uint8: a dominant class, round blobs of others, sometimes unlabelled pixels."""
    dominant = rng.choice(_DFC_CODES, p=_DFC_WEIGHTS / _DFC_WEIGHTS.sum())
    label_map = np.full((size, size), dominant, dtype=np.uint8)
    y, x = np.mgrid[:size, :size]
    # 1-4 blobs over 10-45 % of the area: the dominant class keeps 55-90 % (over 50 % by an unlabelled blob).
    shares = rng.uniform(0.5, 1.5, rng.integers(1, 5))
    radii = np.sqrt(rng.uniform(0.10, 0.45) * size * size / math.pi * shares / shares.sum())
    others = _DFC_CODES != dominant
    for radius in radii:
        cy, cx = rng.uniform(0, size, 2)
        code = rng.choice(_DFC_CODES[others], p=_DFC_WEIGHTS[others] / _DFC_WEIGHTS[others].sum())
        label_map[(y - cy) ** 2 + (x - cx) ** 2 < radius**2] = code
    if rng.random() < 0.3:
        cy, cx = rng.uniform(0, size, 2)
        radius = size * rng.uniform(0.05, 0.12)
        label_map[(y - cy) ** 2 + (x - cx) ** 2 < radius**2] = rng.choice([0, 255])
    return label_map


def _patch(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """One patch: "s1" (2, size, size) float32 dB, a few NaN; "s2" (13, ...) uint16; "lc" (4, ...)
    uint8, IGBP in band 1; "dfc" (1, ...) uint8."""
    dfc = _label_map(rng, size)
    labelled = (dfc >= 1) & (dfc <= 10)
    dominant = np.bincount(dfc[labelled], minlength=11).argmax()
    # Unlabelled pixels show the land of the dominant class.
    land = np.where(labelled, dfc, dominant)
    s1, s2 = _pixels(rng, _S1_CODE[land], _S2_CODE[land])
    s1 = np.clip(s1, -50.0, 10.0)
    if rng.random() < 0.3:
        s1[:, rng.integers(0, size, 10), rng.integers(0, size, 10)] = np.nan
    if rng.random() < 0.03:  # a small cloud, above the 10000 that the seed normalisation clips
        cy, cx = rng.integers(0, size, 2)
        s2[:, max(cy - 3, 0) : cy + 3, max(cx - 3, 0) : cx + 3] = rng.uniform(10000, 16000)
    igbp = np.zeros(256, dtype=np.uint8)
    for code, choices in _IGBP_OF_DFC.items():
        igbp[code] = rng.choice(choices)
    lccs = np.stack([10 + 2 * land, 20 + land, 30 + land]).astype(np.uint8)
    return {
        "s1": s1,
        "s2": np.clip(s2, 0, 65535).astype(np.uint16),
        "lc": np.concatenate([igbp[land][None], lccs]),
        "dfc": dfc[None],
    }


def _write_tif(path: Path, array: np.ndarray, crs: CRS, transform: rasterio.Affine) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    bands, height, width = array.shape
    with rasterio.open(
        path, "w", driver="GTiff", height=height, width=width, count=bands, dtype=array.dtype, crs=crs,
        transform=transform
    ) as dst:
        dst.write(array)


def _georeference(rng: np.random.Generator) -> tuple[CRS, rasterio.Affine]:
    """A UTM zone and a 10 m pixel grid, as the real patches have."""
    crs = CRS.from_epsg(32600 + int(rng.integers(10, 40)))
    west, north = rng.uniform(2e5, 8e5), rng.uniform(1e6, 6e6)
    return crs, rasterio.Affine(10.0, 0.0, west, 0.0, -10.0, north)


def _patch_numbers(rng: np.random.Generator, n: int) -> list[int]:
    """Distinct, non-contiguous, as in the real releases."""
    return sorted(int(k) for k in rng.choice(np.arange(1, 10 * n + 2), n, replace=False))


def write_dfc2020(root: str | Path, n_validation: int, n_test: int, seed: int = 0, size: int = 256) -> Path:
    """The real layout (docs/data.md; a split of 0 patches not written). S1 has a few NaN in some
    patches, S2 a small cloud above 10000 in a few, lc's IGBP band agrees with the dfc map (1-10,
    some 0 / 255 pixels, Savanna and Snow/Ice). UTM, 10 m."""
    root = Path(root)
    for stream, (split, n, suffix) in enumerate([("validation", n_validation, "validation"),
                                                 ("test", n_test, "0")]):
        rng = np.random.default_rng([seed, stream])
        top = f"ROIs0000_{split}"
        for number in _patch_numbers(rng, n) if n else []:
            crs, transform = _georeference(rng)
            for modality, array in _patch(rng, size).items():
                path = root / top / f"{modality}_{suffix}" / f"{top}_{modality}_0_p{number}.tif"
                _write_tif(path, array, crs, transform)
    return root


def write_sen12ms(root: str | Path, n_per_season: int, seed: int = 0, size: int = 256,
                  scenes_per_season: int = 2) -> Path:
    """The real layout, four seasons, as ``write_dfc2020`` without the dfc file: S1, S2 and lc's IGBP
    band share the patch's class map, so a pair shares its structure and majority class."""
    root = Path(root)
    for stream, season in enumerate(SEASONS.values()):
        rng = np.random.default_rng([seed, 100 + stream])
        scenes = sorted(int(s) for s in rng.choice(np.arange(1, 150), scenes_per_season, replace=False))
        for i, number in enumerate(_patch_numbers(rng, n_per_season)):
            scene = scenes[i % scenes_per_season]
            crs, transform = _georeference(rng)
            patch = _patch(rng, size)
            for modality in ("s1", "s2", "lc"):
                path = root / season / f"{modality}_{scene}" / f"{season}_{modality}_{scene}_p{number}.tif"
                _write_tif(path, patch[modality], crs, transform)
    return root


# Five classes of a researcher's own, drawn with the pixels of these DFC codes.
MANIFEST_CLASSES = {"barley": 5, "forest": 1, "lake": 10, "scrub": 2, "town": 7}
_L2A_BANDS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12]  # the 13 L1C bands without B10 (index 10)


def write_manifest(root: str | Path, n: int = 40, seed: int = 0, size: int = 32, *,
                   val_fraction: float = 0.25) -> Path:
    """Pairs with 12-band S2 and ``root/pairs.csv`` (returned): ``id, split, s2, label, s1, notes``
    (``notes``: a column the readers ignore), splits ``train`` and ``val``."""
    root = Path(root)
    rng = np.random.default_rng([seed, 300])
    names = sorted(MANIFEST_CLASSES)
    rows = []
    for i in range(n):
        label = names[i % len(names)]
        code = np.full((size, size), MANIFEST_CLASSES[label], dtype=np.int64)
        s1, s2 = _pixels(rng, _S1_CODE[code], _S2_CODE[code])
        crs, transform = _georeference(rng)
        split = "val" if i >= round(n * (1 - val_fraction)) else "train"
        for modality, array in (("s1", s1), ("s2", np.clip(s2[_L2A_BANDS], 0, 65535).astype(np.uint16))):
            _write_tif(root / modality / f"pair{i:04d}.tif", array, crs, transform)
        rows.append(f"pair{i:04d},{split},s2/pair{i:04d}.tif,{label},s1/pair{i:04d}.tif,"
                    f"drawn as DFC code {code[0, 0]}")
    csv = root / "pairs.csv"
    csv.write_text("id,split,s2,label,s1,notes\n" + "\n".join(rows) + "\n")
    return csv


def write_scene(root: str | Path, rows: int = 4, cols: int = 4, size: int = 64, seed: int = 0) -> dict[str, Path]:
    """``s1.tif``, ``s2.tif``: a mosaic of rows x cols DFC2020-like patches on one UTM 10 m grid;
    ``truth.tif``: uint8 classes 0-7, 255 ignored, the names in its ``classes`` tag."""
    root = Path(root)
    rng = np.random.default_rng([seed, 200])
    crs, transform = _georeference(rng)
    patches = [[_patch(rng, size) for _ in range(cols)] for _ in range(rows)]
    mosaic = {m: np.block([[p[m] for p in row] for row in patches]) for m in ("s1", "s2", "dfc")}
    paths = {m: root / f"{m}.tif" for m in ("s1", "s2", "truth")}
    _write_tif(paths["s1"], mosaic["s1"], crs, transform)
    _write_tif(paths["s2"], mosaic["s2"], crs, transform)
    _write_tif(paths["truth"], LABEL_CODES["dfc"].lut[mosaic["dfc"]], crs, transform)
    with rasterio.open(paths["truth"], "r+") as dst:
        dst.update_tags(classes=json.dumps(DFC_CLASSES))
    return paths


def manifest_like(csv: str | Path) -> tuple[list[str], int]:
    """The sorted class names of a manifest and its first row's S2 band count (what a run on it learns)."""
    rows = read_manifest(Path(csv))
    with rasterio.open(rows[0].s2) as src:
        return sorted({row.label for row in rows if row.label}), src.count


def _class_codes(classes: list[str]) -> list[int]:
    """A DFC code per class, each with its own (S1, S2) signature: `write_manifest`'s names and the DFC class names
    their own code where not taken yet, others the free ones (those `write_manifest` leaves unused first)."""
    dfc = {name: int(np.flatnonzero(LABEL_CODES["dfc"].lut == k)[0]) for k, name in enumerate(DFC_CLASSES)}
    distinct = [*dfc.values(), 3]  # Savanna (3) and Snow/Ice (8) share a signature: one of them
    if len(classes) > len(distinct):
        raise ValueError(f"a synthetic scene tells at most {len(distinct)} classes apart, got {len(classes)}")
    named = {**dfc, **MANIFEST_CLASSES}
    codes: list[int | None] = []
    for name in classes:
        code = named.get(name)
        codes.append(None if code in codes else code)
    free = iter(sorted((c for c in distinct if c not in codes), key=lambda c: c in MANIFEST_CLASSES.values()))
    return [int(next(free)) if code is None else int(code) for code in codes]


def write_class_scene(root: str | Path, classes: list[str], bands: int = 12, rows: int = 4, cols: int = 4,
                      size: int = 32, seed: int = 0) -> dict[str, Path]:
    """A scene for a run on your own pairs: ``s1.tif``, ``s2.tif`` (``bands``: 13 L1C or 12 L2A, no B10) of
    rows x cols uniform fields of ``size`` px, one of ``classes`` each, drawn as ``write_manifest`` draws the
    class of that name, a DFC class name as its DFC code, other names as distinct unused codes (9 classes at most);
    ``truth.tif``: the class indices, names in its tags."""
    if bands not in (12, 13):
        raise ValueError(f"--bands must be 12 (L2A) or 13 (L1C), got {bands}")
    root = Path(root)
    rng = np.random.default_rng([seed, 400])
    crs, transform = _georeference(rng)
    codes = _class_codes(classes)
    picked = rng.integers(0, len(classes), (rows, cols))
    s1 = np.empty((2, rows * size, cols * size), np.float32)
    s2 = np.empty((13, rows * size, cols * size), np.float32)
    for r in range(rows):
        for c in range(cols):
            code = np.full((size, size), codes[picked[r, c]], dtype=np.int64)
            cell = (slice(None), slice(r * size, (r + 1) * size), slice(c * size, (c + 1) * size))
            s1[cell], s2[cell] = _pixels(rng, _S1_CODE[code], _S2_CODE[code])
    paths = {m: root / f"{m}.tif" for m in ("s1", "s2", "truth")}
    _write_tif(paths["s1"], s1, crs, transform)
    _write_tif(paths["s2"], np.clip(s2[_L2A_BANDS] if bands == 12 else s2, 0, 65535).astype(np.uint16), crs, transform)
    truth = np.kron(picked, np.ones((size, size), dtype=np.int64)).astype(np.uint8)[None]
    _write_tif(paths["truth"], truth, crs, transform)
    with rasterio.open(paths["truth"], "r+") as dst:
        dst.update_tags(classes=json.dumps(list(classes)))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="dataset", required=True)
    meterml = commands.add_parser("meterml", help="METER-ML: GeoJSON metadata and per-folder .npy / naip.png",
                                  allow_abbrev=False)
    meterml.add_argument("out", type=Path)
    meterml.add_argument("--n", type=int, default=1000, help="image sets in all (train + val); default 1000")
    meterml.add_argument("--val_fraction", "--val-fraction", dest="val_fraction", type=float, default=0.2,
                         help="share of them in the val split; default 0.2")
    meterml.add_argument("--seed", type=int, default=0)
    dfc = commands.add_parser("dfc2020", help="DFC2020: validation and test splits of s1/s2/lc/dfc GeoTIFFs",
                              allow_abbrev=False)
    dfc.add_argument("out", type=Path)
    dfc.add_argument("--n", type=int, default=100,
                     help="patches PER SPLIT: N validation and N test patches; default 100")
    dfc.add_argument("--n_test", "--n-test", dest="n_test", type=int, default=None, help="test patches, when not N")
    dfc.add_argument("--size", type=int, default=256, help="patch size in px; default 256 as the real data")
    dfc.add_argument("--seed", type=int, default=0)
    sen12ms = commands.add_parser("sen12ms", help="SEN12MS: four season folders of s1/s2/lc GeoTIFFs",
                                  allow_abbrev=False)
    sen12ms.add_argument("out", type=Path)
    sen12ms.add_argument("--n", type=int, default=25, help="patches PER SEASON; default 25")
    sen12ms.add_argument("--size", type=int, default=256, help="patch size in px; default 256 as the real data")
    sen12ms.add_argument("--seed", type=int, default=0)
    manifest = commands.add_parser("manifest", help="your own pairs: 12-band S2, five named classes, pairs.csv",
                                   allow_abbrev=False)
    manifest.add_argument("out", type=Path)
    manifest.add_argument("--n", type=int, default=40, help="pairs; default 40")
    manifest.add_argument("--size", type=int, default=32, help="patch size in px; default 32")
    manifest.add_argument("--seed", type=int, default=0)
    scene = commands.add_parser("scene", allow_abbrev=False,
                                help="an S1 / S2 scene pair tiled from DFC2020-like patches, and its true classes")
    scene.add_argument("out", type=Path)
    scene.add_argument("--rows", type=int, default=4, help="patches down; default 4")
    scene.add_argument("--cols", type=int, default=4, help="patches across; default 4")
    scene.add_argument("--size", type=int, default=64, help="patch size in px; default 64")
    scene.add_argument("--seed", type=int, default=0)
    scene.add_argument("--like", type=Path, default=None, metavar="PAIRS.csv",
                       help="a scene for a run on this manifest: its classes and S2 band count (uniform fields)")
    scene.add_argument("--classes", default=None, help="or name the classes: a comma list (uniform fields)")
    scene.add_argument("--bands", type=int, choices=[12, 13], default=None,
                       help="S2 bands with --classes: 12 (L2A, no B10) or 13 (L1C); default 13")
    args = parser.parse_args(argv)
    if args.dataset == "scene" and args.like is not None and (args.classes or args.bands):
        parser.error("--like takes the classes and bands from the manifest: give it, or --classes / --bands")

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dataset == "meterml":
        write_meterml(args.out, args.n, args.seed, val_fraction=args.val_fraction)
    elif args.dataset == "dfc2020":
        write_dfc2020(args.out, args.n, args.n if args.n_test is None else args.n_test, args.seed, args.size)
    elif args.dataset == "manifest":
        write_manifest(args.out, args.n, args.seed, args.size)
    elif args.dataset == "sen12ms":
        write_sen12ms(args.out, args.n, args.seed, args.size)
    elif args.like is not None:
        classes, bands = manifest_like(args.like)
        write_class_scene(args.out, classes, bands, args.rows, args.cols, args.size, args.seed)
    elif args.classes or args.bands:
        classes = [name.strip() for name in (args.classes or ",".join(DFC_CLASSES)).split(",") if name.strip()]
        write_class_scene(args.out, classes, args.bands or 13, args.rows, args.cols, args.size, args.seed)
    else:
        write_scene(args.out, args.rows, args.cols, args.size, args.seed)
    logger.info("wrote a synthetic %s data set to %s", args.dataset, args.out)


if __name__ == "__main__":
    cli.run(main)
