"""Real-product inputs (datasets/scenes.py, prepare_scene.py) against stacks built independently here:
nearest upsampling by np.repeat, bilinear by hand from the pixel centres' coordinates, dB by log10."""
import importlib.util
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp
from rasterio.env import get_gdal_config
from rasterio.warp import transform
from rasterio.windows import Window

import prepare_scene
import products
from datasets.scenes import SceneError, open_scene
from util.labels import L1C_BANDS, L2A_BANDS

ROOT = Path(__file__).resolve().parents[1]
SIZE = 60


def upsampled(stored: dict, resolution: dict) -> np.ndarray:
    """(bands, SIZE, SIZE) float32: each band repeated to 10 m (nearest neighbour of an aligned grid)."""
    return np.stack([np.repeat(np.repeat(stored[b], resolution[b] // 10, 0), resolution[b] // 10, 1)
                     for b in stored]).astype(np.float32)


def bilinear_db(power: np.ndarray, src_transform, scale: float = 10.0) -> np.ndarray:
    """(2, SIZE, SIZE): `power` (EPSG:4326) at each S2 pixel centre by the 4 nearest pixels' bilinear
    weights, then scale * log10."""
    grid = products.s2_grid(SIZE)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    x, y = grid["transform"] @ (cols.ravel(), rows.ravel())
    lon, lat = transform(grid["crs"], "EPSG:4326", x, y)
    c, r = ~src_transform @ (np.array(lon), np.array(lat))
    c, r = c - 0.5, r - 0.5
    c0, r0 = np.floor(c).astype(int), np.floor(r).astype(int)
    fc, fr = c - c0, r - r0
    value = (power[:, r0, c0] * (1 - fc) * (1 - fr) + power[:, r0, c0 + 1] * fc * (1 - fr)
             + power[:, r0 + 1, c0] * (1 - fc) * fr + power[:, r0 + 1, c0 + 1] * fc * fr)
    return scale * np.log10(value.reshape(2, SIZE, SIZE))


def write_stack(path: Path, array: np.ndarray, **profile) -> Path:
    return products.write_raster(path, array, products.s2_grid(SIZE)["transform"], **profile)


def test_l1c_product_prepared_as_built_by_hand(tmp_path):
    """An L1C SAFE (JPEG 2000 at 10/20/60 m, baseline 04.00) and S1 power in EPSG:4326 -> COGs on the
    S2 grid: S2 = repeated DNs - 1000 (the metadata's offset), S1 = 10 log10 of bilinear power; GDAL's cache
    size as it was after, inside an outer rasterio.Env."""
    safe, stored = products.l1c(tmp_path, SIZE)
    s1, power, s1_transform = products.s1_power(tmp_path / "s1_power.tif", SIZE)
    out_s1, out_s2 = tmp_path / "out" / "S1.tif", tmp_path / "out" / "S2.tif"
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):  # an outer environment, as gdal_env's
        cache = get_gdal_config("GDAL_CACHEMAX")
        info = prepare_scene.main(["--s1", str(s1), "--s2", str(safe), "--out_s1", str(out_s1), "--out_s2",
                                   str(out_s2), "--s1_scale", "power", "--block", "32"])
        assert get_gdal_config("GDAL_CACHEMAX") == cache  # the cap is lifted on return
    assert info["s2_offsets"] == [-1000.0] and info["s2_bands"] == list(L1C_BANDS)
    with rasterio.open(out_s2) as src:
        assert src.descriptions == L1C_BANDS and src.dtypes[0] == "uint16" and src.nodata == 0
        assert src.crs == products.s2_grid()["crs"] and src.transform == products.s2_grid()["transform"]
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        np.testing.assert_array_equal(src.read(), upsampled(stored, products.RESOLUTION) - 1000)
    with rasterio.open(out_s1) as src:
        assert src.descriptions == ("VV", "VH") and src.dtypes[0] == "float32"
        np.testing.assert_allclose(src.read(), bilinear_db(power, s1_transform), atol=0.01)
    assert sorted(p.name for p in out_s1.parent.iterdir()) == ["S1.tif", "S2.tif"]  # no temporary file left


def test_l2a_finest_copy_offset_bands_by_name_and_pickling(tmp_path):
    """L2A R10m/R20m/R60m: the finest copy of each band wins, BOA_ADD_OFFSET applies, DN 0 (the
    product's NODATA) is missing; bands are taken by name; B10 asked of L2A is refused naming it."""
    safe, stored = products.l2a(tmp_path, SIZE)
    first = next(safe.rglob("*_B02_10m.jp2"))
    with rasterio.open(first) as src:  # JPEG 2000 cannot be updated in place: rewrite it
        array = src.read(1)
    array[:4, :4] = 0
    products.write_raster(first, array, products.s2_grid()["transform"])
    s1, power, s1_transform = products.s1_power(tmp_path / "s1.tif", SIZE)
    finest = {b: products.L2A_COPIES[b][0] for b in L2A_BANDS}
    expected = upsampled(stored, finest) - 1000
    expected[:, :4, :4] = np.nan
    window = Window(7, 3, 41, 50)
    with open_scene(s1, safe, s1_scale="power") as scene:
        assert scene.s2_band_names == list(L2A_BANDS)
        s1_read, s2_read = scene.read(window)
        np.testing.assert_array_equal(s2_read, expected[:, 3:53, 7:48])
        again = pickle.loads(pickle.dumps(scene))
        np.testing.assert_array_equal(again.read(window)[1], s2_read)
        np.testing.assert_array_equal(again.read(window)[0], s1_read)
        again.close()
    asked = ["B04", "B03", "B02", "B8A"]
    with open_scene(s1, safe, s1_scale="power", s2_bands=asked) as scene:
        assert scene.s2_band_names == asked
        np.testing.assert_array_equal(scene.read(window)[1], expected[[3, 2, 1, 8], 3:53, 7:48])
    with pytest.raises(SceneError, match=r"S2A_MSIL2A.*SAFE lacks S2 band B10 .*train a 12-band run"):
        open_scene(s1, safe, s1_scale="power", s2_bands=L1C_BANDS)


def test_band_files_folder_offset_flag_and_12_of_13(tmp_path):
    """A plain folder of GeoTIFF band files (no metadata): --s2_offset applies, clipped at 0; a 12-band
    run takes its 12 from a 13-band stack, by the stack's band descriptions; S1 as a folder of a VH
    and a VV file."""
    values = products.band_values(SIZE, 1)
    for band, array in values.items():
        res = products.RESOLUTION[band]
        products.write_raster(tmp_path / "bands" / f"S2_{band}.tif", array, products.from_origin(*products.ORIGIN, res, res))
    s1 = write_stack(tmp_path / "s1_db.tif", np.full((2, SIZE, SIZE), -12.0, np.float32))
    with open_scene(s1, tmp_path / "bands", s2_offset=-300) as scene:
        _, s2 = scene.read(Window(0, 0, SIZE, SIZE))
    np.testing.assert_array_equal(s2, np.maximum(upsampled(values, products.RESOLUTION) - 300, 0))
    stack = np.stack([np.full((SIZE, SIZE), i + 1, np.uint16) for i in range(13)])[::-1]
    path = write_stack(tmp_path / "s2_13.tif", stack)
    with rasterio.open(path, "r+") as dst:
        dst.descriptions = L1C_BANDS[::-1]  # stored in reverse: names, not positions, decide
    with open_scene(s1, path, s2_bands=L2A_BANDS) as scene:
        s1_read, s2 = scene.read(Window(5, 5, 10, 10))
    assert s2[:, 0, 0].tolist() == [L1C_BANDS.index(b) + 1 for b in L2A_BANDS]
    assert np.all(s1_read == -12.0)
    for name, value in (("s1a-iw-grd-vh-001.tif", -20.0), ("s1a-iw-grd-vv-001.tif", -10.0)):
        write_stack(tmp_path / "s1" / name, np.full((1, SIZE, SIZE), value, np.float32))
    with open_scene(tmp_path / "s1", path) as scene:
        assert scene.read(Window(0, 0, 4, 4))[0][:, 0, 0].tolist() == [-10.0, -20.0]


def test_missing_pixels_become_nan(tmp_path):
    """nodata (S2: a per-dataset mask: a zero-padded B10 with nodata 0 is not all missing; S1: in any band),
    an alpha band, an internal mask, NaN, and S1 nodata warped from EPSG:4326 -> NaN in every band of those
    pixels."""
    rng = np.random.default_rng(0)
    s2 = rng.integers(1, 5000, (13, SIZE, SIZE)).astype(np.uint16)
    s2[10] = 0  # B10 padded
    s2[:, :5, :7] = 0
    padded = write_stack(tmp_path / "padded.tif", s2, nodata=0)
    with_alpha = write_stack(tmp_path / "alpha.tif", np.concatenate([s2, np.full((1, SIZE, SIZE), 255, np.uint16)]))
    with rasterio.open(with_alpha, "r+") as dst:
        alpha = np.full((SIZE, SIZE), 255, np.uint16)
        alpha[40:, 50:] = 0
        dst.write(alpha, 14)
        dst.colorinterp = [ColorInterp.gray] + [ColorInterp.undefined] * 12 + [ColorInterp.alpha]
    db = rng.uniform(-25, -5, (2, SIZE, SIZE)).astype(np.float32)
    db[1, 30, 30] = np.nan
    masked = write_stack(tmp_path / "s1_masked.tif", db)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(masked, "r+") as dst:
        mask = np.full((SIZE, SIZE), 255, np.uint8)
        mask[10:20, :] = 0
        dst.write_mask(mask)
    window = Window(0, 0, SIZE, SIZE)
    with open_scene(masked, padded) as scene:
        s1, s2_read = scene.read(window)
    missing = np.zeros((SIZE, SIZE), bool)
    missing[:5, :7] = True
    np.testing.assert_array_equal(np.isnan(s2_read), np.broadcast_to(missing, s2_read.shape))
    np.testing.assert_array_equal(s2_read[:, ~missing], s2[:, ~missing])
    s1_missing = np.zeros((SIZE, SIZE), bool)
    s1_missing[10:20] = True
    s1_missing[30, 30] = True
    np.testing.assert_array_equal(np.isnan(s1), np.broadcast_to(s1_missing, s1.shape))
    with open_scene(masked, with_alpha) as scene:
        assert len(scene.s2_band_names) == 13
        s2_read = scene.read(window)[1]
    alpha_missing = np.zeros((SIZE, SIZE), bool)  # no nodata value: the zeros are data
    alpha_missing[40:, 50:] = True
    np.testing.assert_array_equal(np.isnan(s2_read).all(0), alpha_missing)
    db = rng.uniform(-25, -5, (2, SIZE, SIZE)).astype(np.float32)
    db[1, 2:4] = -9999.0  # VH only: the pixel is missing in both bands
    with open_scene(write_stack(tmp_path / "s1_vh_nodata.tif", db, nodata=-9999.0), padded) as scene:
        s1 = scene.read(window)[0]
    vh_missing = np.zeros((SIZE, SIZE), bool)
    vh_missing[2:4] = True
    np.testing.assert_array_equal(np.isnan(s1), np.broadcast_to(vh_missing, s1.shape))
    np.testing.assert_array_equal(s1[:, ~vh_missing], db[:, ~vh_missing])
    s1_path, power, s1_transform = products.s1_power(tmp_path / "s1_nodata.tif", SIZE, nodata=-9999.0)
    power[:, :, : power.shape[2] // 2] = -9999.0  # the western half missing
    with rasterio.open(s1_path, "r+") as dst:
        dst.write(power)
    with open_scene(s1_path, padded, s1_scale="power") as scene:
        s1 = scene.read(window)[0]
    expected = bilinear_db(np.where(power > 0, power, np.nan), s1_transform)
    assert np.isnan(s1[:, :, :20]).all() and np.isfinite(s1[:, :, 40:]).all()
    both = np.isfinite(expected)
    np.testing.assert_allclose(s1[both], expected[both], atol=0.01)


def test_s1_units_and_outputs_refused(tmp_path):
    """Linear power under the default --s1_scale db, dB under power, values above +30 dB: refused
    naming the file and --s1_scale; an output that is an input is refused and the input kept."""
    s2 = write_stack(tmp_path / "s2.tif", np.ones((13, SIZE, SIZE), np.uint16))
    power = products.s1_power(tmp_path / "power.tif", SIZE)[0]
    with pytest.raises(SceneError, match=r"power\.tif: no negative value among the \d+ S1 pixels read .*--s1_scale"):
        open_scene(power, s2)
    db = write_stack(tmp_path / "db.tif", np.full((2, SIZE, SIZE), -15.0, np.float32))
    with pytest.raises(SceneError, match=r"db\.tif: 100% of the S1 pixels read are negative.*--s1_scale db"):
        open_scene(db, s2, s1_scale="power")
    hot = write_stack(tmp_path / "hot.tif", np.where(np.arange(SIZE) % 2, 45.0, -10.0).astype(np.float32)
                      * np.ones((2, SIZE, 1), np.float32))
    with pytest.raises(SceneError, match=r"hot\.tif: 50.0% of the S1 pixels read above \+30 dB.*--s1_scale"):
        open_scene(hot, s2)
    before = s2.read_bytes()
    with pytest.raises(SceneError, match=r"s2\.tif is one of the inputs"):
        prepare_scene.main(["--s1", str(db), "--s2", str(s2), "--out_s1", str(tmp_path / "x.tif"), "--out_s2",
                            str(tmp_path / "." / "s2.tif")])
    assert s2.read_bytes() == before and not (tmp_path / "x.tif").exists()


@pytest.mark.slow
def test_script_one_line_error(tmp_path):
    """python prepare_scene.py on S1 power without --s1_scale: exit 1, one line naming the flag."""
    s2 = write_stack(tmp_path / "s2.tif", np.ones((13, SIZE, SIZE), np.uint16))
    power = products.s1_power(tmp_path / "power.tif", SIZE)[0]
    done = subprocess.run([sys.executable, "prepare_scene.py", "--s1", str(power), "--s2", str(s2), "--out_s1",
                           str(tmp_path / "a.tif"), "--out_s2", str(tmp_path / "b.tif")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("prepare_scene.py: error: ") and "--s1_scale" in done.stderr.splitlines()[0]


@pytest.mark.slow
def test_bench_measured_reads_a_chatty_childs_stderr():
    """bench_predict.measured on a failing child that writes 200 KB to stderr (past a pipe's buffer): it ends,
    quoting the tail; `timeout` ends the child should the bench leave its stderr unread."""
    spec = importlib.util.spec_from_file_location("bench_predict", ROOT / "bench" / "bench_predict.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = "import sys; sys.stderr.write('x' * 200000 + 'END'); sys.exit(3)"
    with pytest.raises(SystemExit, match=r"failed:\nx+END$"):
        bench.measured(["timeout", "20", sys.executable, "-c", code])
