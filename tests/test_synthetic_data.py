"""synthetic_data.py: exact layouts, determinism, the CLI, and a class signal that needs both modalities."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import synthetic_data
from datasets import DFC2020Dataset
from datasets.labels import LABEL_CODES

REPO = Path(__file__).resolve().parents[1]
METERML_CLASSES = ["CAFOs", "Landfills", "Mines", "Negative", "ProcessingPlants", "RefineriesAndTerminals", "WWTreatment"]
IGBP_TO_DFC = np.array([0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 6, 8, 9, 10])
DFC_FOLDERS = {
    "validation": ("ROIs0000_validation", "validation"),
    "test": ("ROIs0000_test", "0"),
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _meterml_folder(root: Path, image_folder: str) -> Path:
    """The folder an Image_Folder names: as written, else the same id under train_images_1..3."""
    written = root / image_folder
    if written.is_dir():
        return written
    (found,) = list(root.glob(f"train_images_[123]/{Path(image_folder).name}"))
    return found


def test_meterml_layout(tmp_path):
    synthetic_data.write_meterml(tmp_path, n=60, seed=0, val_fraction=0.25)
    train = json.loads((tmp_path / "train_dataset.geojson").read_text())
    val = json.loads((tmp_path / "val_dataset.geojson").read_text())
    assert train["type"] == val["type"] == "FeatureCollection"
    assert (len(train["features"]), len(val["features"])) == (45, 15)
    written = [f["properties"]["Image_Folder"] for f in train["features"]]
    assert {folder.split("/")[0] for folder in written} == {"train_images", "train_images_1", "train_images_2", "train_images_3"}
    assert not (tmp_path / "train_images").exists()  # the quirk: metadata says train_images/<id>
    assert all(f["properties"]["Image_Folder"].startswith("val_images/") for f in val["features"])

    types = [f["properties"]["Type"] for f in train["features"] + val["features"]]
    assert any("-" in t for t in types) and "Negative" in types
    assert {name for t in types for name in t.split("-")} <= set(METERML_CLASSES)
    for feature in train["features"] + val["features"]:
        assert feature["geometry"]["type"] == "Point" and len(feature["geometry"]["coordinates"]) == 2
        folder = _meterml_folder(tmp_path, feature["properties"]["Image_Folder"])
        for name, shape in [
            ("sentinel-1.npy", (72, 72, 2)),
            ("sentinel-2-10m.npy", (72, 72, 4)),
            ("sentinel-2-20m.npy", (36, 36, 6)),
            ("sentinel-2-60m.npy", (12, 12, 3)),
        ]:
            array = np.load(folder / name)
            assert array.shape == shape and array.dtype == np.uint16, (folder / name, array.shape, array.dtype)
        assert np.load(folder / "sentinel-1.npy").max() <= 4095
        naip = Image.open(folder / "naip.png")
        assert naip.mode == "RGBA" and naip.size == (72, 72)


def test_meterml_is_deterministic_per_seed(tmp_path):
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        synthetic_data.write_meterml(tmp_path / name, n=12, seed=seed)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_dfc2020_layout(tmp_path):
    synthetic_data.write_dfc2020(tmp_path, n_validation=24, n_test=6, seed=0, size=32)
    seen = {m: set() for m in ("0/255", "savanna/snow", "nan")}
    for split, n in [("validation", 24), ("test", 6)]:
        top, suffix = DFC_FOLDERS[split]
        numbers = {}
        for modality in ("s1", "s2", "lc", "dfc"):
            folder = tmp_path / top / f"{modality}_{suffix}"
            names = sorted(p.name for p in folder.iterdir())
            assert all(name.startswith(f"{top}_{modality}_0_p") and name.endswith(".tif") for name in names)
            numbers[modality] = {int(name.split("_p")[1][:-4]) for name in names}
            assert len(numbers[modality]) == n
        assert len({frozenset(v) for v in numbers.values()}) == 1
        for number in numbers["s1"]:
            arrays = {}
            for modality, bands, dtype in [("s1", 2, "float32"), ("s2", 13, "uint16"), ("lc", 4, "uint8"), ("dfc", 1, "uint8")]:
                with rasterio.open(tmp_path / top / f"{modality}_{suffix}" / f"{top}_{modality}_0_p{number}.tif") as src:
                    assert (src.count, src.dtypes[0], src.shape) == (bands, dtype, (32, 32))
                    assert src.crs.is_projected and src.transform.a == 10.0
                    arrays[modality] = src.read()
            dfc = arrays["dfc"][0]
            labelled = (dfc >= 1) & (dfc <= 10)
            np.testing.assert_array_equal(IGBP_TO_DFC[arrays["lc"][0][labelled]], dfc[labelled])
            assert np.bincount(dfc.ravel(), minlength=256).max() > 0.5 * dfc.size  # a dominant class
            s1 = arrays["s1"]
            finite = s1[np.isfinite(s1)]
            assert finite.min() >= -50 and finite.max() <= 10
            seen["0/255"].add(bool(np.isin(dfc, [0, 255]).any()))
            seen["savanna/snow"].add(bool(np.isin(dfc, [3, 8]).any()))
            seen["nan"].add(bool(np.isnan(s1).any()))
    assert all(True in flags for flags in seen.values()), seen


def test_dfc2020_is_deterministic_and_skips_empty_splits(tmp_path):
    synthetic_data.write_dfc2020(tmp_path / "a", 3, 0, seed=1, size=16)
    synthetic_data.write_dfc2020(tmp_path / "b", 3, 0, seed=1, size=16)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert not (tmp_path / "a" / "ROIs0000_test").exists()


def test_sen12ms_layout(tmp_path):
    synthetic_data.write_sen12ms(tmp_path, n_per_season=3, seed=0, size=16, scenes_per_season=2)
    for season in ["ROIs1158_spring", "ROIs1868_summer", "ROIs1970_fall", "ROIs2017_winter"]:
        folders = sorted(p.name for p in (tmp_path / season).iterdir())
        scenes = sorted({name.split("_")[1] for name in folders})
        assert len(scenes) == 2 and folders == sorted(f"{m}_{s}" for m in ("lc", "s1", "s2") for s in scenes)
        files = list((tmp_path / season).rglob("*.tif"))
        assert len(files) == 9
        for path in files:
            modality, scene = path.parent.name.split("_")
            assert path.name.startswith(f"{season}_{modality}_{scene}_p")
            with rasterio.open(path) as src:
                assert src.count == {"s1": 2, "s2": 13, "lc": 4}[modality]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["meterml", "--n", "5", "--seed", "2"], "train_dataset.geojson"),
        (["dfc2020", "--n", "2", "--seed", "2", "--size", "16"], "ROIs0000_test/s2_0"),
        (["sen12ms", "--n", "1", "--seed", "2", "--size", "16"], "ROIs2017_winter"),
        (["scene", "--rows", "1", "--cols", "2", "--size", "16"], "truth.tif"),
    ],
)
def test_cli(tmp_path, args, expected):
    """Each command through main(argv); test_the_script_runs_from_a_shell starts the script itself once."""
    out = tmp_path / "out"
    synthetic_data.main([args[0], str(out), *args[1:]])
    assert (out / expected).exists()


def test_scene_is_a_mosaic_of_patches_on_one_grid(tmp_path):
    paths = synthetic_data.write_scene(tmp_path, rows=2, cols=3, size=16, seed=0)
    grids, arrays = set(), {}
    for name, path in paths.items():
        with rasterio.open(path) as src:
            grids.add((src.crs, src.transform, src.shape))
            arrays[name] = src.read()
            tags = src.tags()
    assert len(grids) == 1 and grids.pop()[2] == (32, 48)
    assert arrays["s1"].shape == (2, 32, 48) and arrays["s2"].shape == (13, 32, 48) and arrays["s2"].dtype == np.uint16
    truth = arrays["truth"][0]
    assert set(np.unique(truth)) <= set(range(8)) | {255}
    assert json.loads(tags["classes"]) == DFC2020Dataset.classes
    # DFC codes 1-10 -> the 8 classes; Savanna (3), Snow/Ice (8) and no label (0, 255) ignored
    table = dict(enumerate(LABEL_CODES["dfc"].lut.tolist()))
    assert {code: c for code, c in table.items() if c != 255} == {1: 0, 2: 1, 4: 2, 5: 3, 6: 4, 7: 5, 9: 6, 10: 7}
    assert synthetic_data.write_scene(tmp_path / "again", rows=2, cols=3, size=16, seed=0) and all(
        (tmp_path / "again" / p.name).read_bytes() == p.read_bytes() for p in paths.values())


def test_every_class_of_a_class_scene_has_its_own_signature(tmp_path, monkeypatch):
    """The (S1, S2) code pair each field is drawn with, read back per class of truth.tif: one per class, all distinct."""
    drawn, pixels = [], synthetic_data._pixels

    def recording(rng, s1_code, s2_code):
        drawn.append((int(s1_code[0, 0]), int(s2_code[0, 0])))
        return pixels(rng, s1_code, s2_code)

    monkeypatch.setattr(synthetic_data, "_pixels", recording)
    for classes in (DFC2020Dataset.classes, ["a", "b", "c", "d"], ["lake", "Water", "x", *"bcdefg"]):
        drawn.clear()
        paths = synthetic_data.write_class_scene(tmp_path / str(len(classes)), classes, rows=10, cols=10, size=1)
        with rasterio.open(paths["truth"]) as src:
            truth = src.read(1).ravel()
        signatures = {c: {pair for pair, t in zip(drawn, truth) if t == c} for c in range(len(classes))}
        assert all(len(pairs) == 1 for pairs in signatures.values())
        assert len(set.union(*signatures.values())) == len(classes)
    with pytest.raises(ValueError, match="at most 9 classes apart, got 10"):
        synthetic_data.write_class_scene(tmp_path / "ten", list("abcdefghij"))


@pytest.mark.slow
def test_meterml_class_signal_needs_both_modalities(tmp_path):
    """Per-channel means: S1 alone or S2 alone separate only groups of classes; fused, all classes."""
    synthetic_data.write_meterml(tmp_path, n=210, seed=0, val_fraction=0.0)  # 0.38, 0.47, 0.85 with seed 0
    features = json.loads((tmp_path / "train_dataset.geojson").read_text())["features"]
    s1, s2, labels = [], [], []
    for feature in features:
        folder = _meterml_folder(tmp_path, feature["properties"]["Image_Folder"])
        s1.append(np.load(folder / "sentinel-1.npy").reshape(-1, 2).mean(0))
        s2.append(np.load(folder / "sentinel-2-10m.npy").reshape(-1, 4).mean(0))
        labels.append(METERML_CLASSES.index(feature["properties"]["Type"].split("-")[0]))

    def accuracy(x: np.ndarray) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        return cross_val_score(model, x, labels, cv=5).mean()

    s1_acc, s2_acc = accuracy(np.array(s1)), accuracy(np.array(s2))
    fused_acc = accuracy(np.hstack([s1, s2]))
    # One modality tells apart at most 3 groups of the 7 classes: about 3/7 at best.
    assert s1_acc < 0.55 and s2_acc < 0.55
    assert fused_acc > 0.7 and fused_acc > max(s1_acc, s2_acc) + 0.25, (s1_acc, s2_acc, fused_acc)


@pytest.mark.slow
def test_sen12ms_lc_class_is_the_class_of_s1_and_s2_together(tmp_path):
    """The majority class of lc band 1 (IGBP codes, through the IGBP-to-DFC map) is what S1 and S2
    together encode: per-band means of one modality tell apart only groups of classes, both most."""
    synthetic_data.write_sen12ms(tmp_path, n_per_season=60, seed=0, size=32)
    s1, s2, labels = [], [], []
    for lc_path in sorted(tmp_path.rglob("lc_*/*.tif")):
        with rasterio.open(lc_path) as src:
            igbp = src.read(1)
        assert igbp.min() >= 1 and igbp.max() <= 17
        code = np.bincount(IGBP_TO_DFC[igbp].ravel(), minlength=11).argmax()
        if code in (3, 8):  # Savanna, Snow/Ice: no class of the 8
            continue
        arrays = {}
        for modality in ("s1", "s2"):
            folder = lc_path.parent.parent / lc_path.parent.name.replace("lc_", f"{modality}_")
            with rasterio.open(folder / lc_path.name.replace("_lc_", f"_{modality}_")) as src:
                arrays[modality] = src.read().reshape(src.count, -1)
        s1.append(np.nanmean(arrays["s1"], axis=1))
        s2.append(arrays["s2"].mean(axis=1))
        labels.append(code)
    assert len(set(labels)) == 8 and len(labels) > 200

    def accuracy(x: np.ndarray) -> float:
        return cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), x, labels, cv=5).mean()

    s1_acc, s2_acc, fused_acc = accuracy(np.array(s1)), accuracy(np.array(s2)), accuracy(np.hstack([s1, s2]))
    # Patches mix their dominant class with blobs of others: less separable than METER-ML's uniform images.
    assert s1_acc < 0.5 and s2_acc < 0.5
    assert fused_acc > 0.6 and fused_acc > max(s1_acc, s2_acc) + 0.2, (s1_acc, s2_acc, fused_acc)


@pytest.mark.parametrize("spelling", ["--n_test", "--n-test"])  # underscores as every script; hyphens kept as aliases
def test_cli_flag_spellings(tmp_path, spelling):
    out = tmp_path / "out"
    synthetic_data.main(["dfc2020", str(out), "--n", "2", spelling, "1", "--size", "16", "--seed", "3"])
    assert len(list((out / "ROIs0000_test" / "s1_0").glob("*.tif"))) == 1


@pytest.mark.slow
def test_the_script_runs_from_a_shell(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(REPO / "synthetic_data.py"), "dfc2020", str(out), "--n", "2", "--n-test", "1",
                    "--size", "16", "--seed", "3"], check=True, cwd=tmp_path)
    assert len(list((out / "ROIs0000_test" / "s1_0").glob("*.tif"))) == 1
