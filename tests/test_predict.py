"""predict.py on a tiny dfc_finetune.py run: patches reproduce the run's evaluation, a scene tiled from
known patches is predicted as those patches, on the scene's grid; bad scenes are refused."""
import csv
import json

import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS

import dfc_finetune
import predict
import summarize
from datasets import DFC2020Dataset
from models import DualResNet, load_checkpoint
from synthetic_data import write_dfc2020, write_scene
from util.metrics import classification_metrics

PATCH = 48
CRS_UTM = CRS.from_epsg(32633)
TRANSFORM = rasterio.Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)


@pytest.fixture(scope="module")
def dfc_root(tmp_path_factory):
    return write_dfc2020(tmp_path_factory.mktemp("dfc"), n_validation=8, n_test=6, seed=0, size=PATCH)


@pytest.fixture(scope="module")
def run(dfc_root, tmp_path_factory):
    """Random 32 px evaluation windows inside the 48 px patches (--eval_offset_seed), best.pt kept."""
    path = tmp_path_factory.mktemp("runs") / "run"
    dfc_finetune.main(["--data_root", str(dfc_root), "--save_path", str(path), "--arch", "resnet18", "--crop", "32",
                       "--eval_crop", "32", "--finetune", "--lr", "1e-3", "--head_lr", "1e-3", "--workers", "0",
                       "--batch_size", "4", "--epochs", "1", "--device", "cpu"])
    return path


def write_tif(path, array, crs=CRS_UTM, transform=TRANSFORM, nodata=None):
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype=array.dtype, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(array)
    return path


@pytest.fixture(scope="module")
def mosaic(dfc_root, tmp_path_factory):
    """The 6 test patches tiled 2 x 3 in data set order, as S1 and S2 scenes; returns (s1, s2, arrays)."""
    test = DFC2020Dataset(dfc_root, "test")
    arrays = {}
    for m in ("s1", "s2"):
        patches = []
        for files in test.source.files:
            with rasterio.open(files[m]) as src:
                patches.append(src.read())
        arrays[m] = np.block([patches[:3], patches[3:]])
    folder = tmp_path_factory.mktemp("scene")
    return write_tif(folder / "s1.tif", arrays["s1"]), write_tif(folder / "s2.tif", arrays["s2"]), arrays


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_patch_predictions_reproduce_the_runs_evaluation(run, dfc_root, tmp_path):
    results = json.loads((run / "results.json").read_text())["last"]
    classes = results["classes"]
    predict.main([str(run), "--data_root", str(dfc_root), "--split", "test", "--out", str(tmp_path / "p.csv"),
                  "--device", "cpu", "--workers", "0"])
    rows = read_csv(tmp_path / "p.csv")
    assert list(rows[0]) == ["id", "label", "prediction", *(f"p_{c}" for c in classes)]
    assert [int(r["id"]) for r in rows] == DFC2020Dataset(dfc_root, "test").patch_ids
    truth = np.array([classes.index(r["label"]) if r["label"] else 255 for r in rows])
    pred = np.array([classes.index(r["prediction"]) for r in rows])
    assert classification_metrics(truth, pred, classes)["confusion"] == results["confusion"]
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == pred).all()


def test_best_weights_and_other_runs(run, dfc_root, tmp_path):
    predict.main([str(run), "--weights", "best", "--out", str(tmp_path / "b.csv"), "--device", "cpu", "--workers", "0"])
    assert len(read_csv(tmp_path / "b.csv")) == 6  # the run's data_root and eval_split by default
    other = tmp_path / "pretrain"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"script": "sen12ms_pretrain"}))
    with pytest.raises(SystemExit, match="sen12ms_pretrain.py; predict.py applies runs of dfc_finetune.py"):
        predict.main([str(other), "--out", str(tmp_path / "x.csv")])
    with pytest.raises(predict.PredictError, match="'imagenet'.*knows \\(seed, ssl4eo, stats, none\\)"):
        predict.check_recipe("imagenet")


def test_a_mosaic_of_patches_is_predicted_as_each_patch_alone(run, dfc_root, mosaic, tmp_path):
    s1, s2, _ = mosaic
    out = tmp_path / "map.tif"
    info = predict.main([str(run), "--s1", str(s1), "--s2", str(s2), "--out", str(out), "--window", str(PATCH),
                         "--device", "cpu", "--workers", "0", "--batch_size", "4"])
    # Expected: each whole patch as the data set reads and normalises it, through the checkpoint.
    net = DualResNet("resnet18")
    load_checkpoint(net, run / "last.pt")
    patches = DFC2020Dataset(dfc_root, "test")
    batch = torch.utils.data.default_collate([patches[i] for i in range(len(patches))])
    with torch.no_grad():
        expected = net.eval()(batch["s1"], batch["s2"]).softmax(1)
    with rasterio.open(out) as src:
        classes_map = src.read(1)
    cells = classes_map[::PATCH, ::PATCH].ravel()
    assert cells.tolist() == expected.argmax(1).tolist()
    assert (classes_map.reshape(2, PATCH, 3, PATCH) == cells.reshape(2, 1, 3, 1)).all()  # a cell fills its pixels
    assert info["grid"] == [2, 3] and info["nodata_cells"] == 0

    windows = predict.SceneWindows(s1, s2, predict.check_grids(s1, s2, (2, 13), PATCH), PATCH, PATCH, "seed")
    loader = torch.utils.data.DataLoader(windows, batch_size=4)
    ctx = predict.process.Context(device=torch.device("cpu"))
    index, logits = (torch.cat(t) for t in zip(*predict.window_logits(net, loader, ctx)))
    torch.testing.assert_close(logits.softmax(1)[index.argsort()], expected, atol=1e-5, rtol=1e-4)


def test_the_map_keeps_the_scenes_grid(run, mosaic, tmp_path):
    s1, s2, _ = mosaic
    out = tmp_path / "sub" / "map.tif"
    predict.main([str(run), "--s1", str(s1), "--s2", str(s2), "--out", str(out), "--window", "32", "--stride", "40",
                  "--device", "cpu", "--workers", "0"])
    classes = json.loads((run / "results.json").read_text())["last"]["classes"]
    with rasterio.open(s1) as scene, rasterio.open(out) as src:
        assert src.crs == scene.crs and src.transform == scene.transform
        assert src.bounds == scene.bounds and src.shape == scene.shape
        assert src.count == 1 and src.dtypes[0] == "uint8" and src.nodata == 255
        assert json.loads(src.tags()["classes"]) == classes
        image = src.read(1)
    # 96 x 144 px, windows of 32 every 40 px: 2 x 3 windows; cells of 40 px, nodata past them.
    assert (image[:80, :120] != 255).all() and (image[80:] == 255).all() and (image[:, 120:] == 255).all()
    assert len(np.unique(image[:40, :40])) == 1
    assert out.with_suffix(".png").stat().st_size > 0
    assert json.loads(out.with_suffix(".json").read_text())["grid"] == [2, 3]


@pytest.mark.parametrize("change, named", [
    ({"crs": CRS.from_epsg(32634)}, "CRS"),
    ({"transform": TRANSFORM @ rasterio.Affine.translation(1, 0)}, "transform"),
    ({"size": 1}, "width"),
])
def test_scenes_on_different_grids_are_refused_naming_both(run, mosaic, tmp_path, change, named):
    s1, _, arrays = mosaic
    s2 = write_tif(tmp_path / "other_s2.tif", arrays["s2"][:, :, :-PATCH] if "size" in change else arrays["s2"],
                   crs=change.get("crs", CRS_UTM), transform=change.get("transform", TRANSFORM))
    out = tmp_path / "map.tif"
    with pytest.raises(SystemExit) as error:
        predict.main([str(run), "--s1", str(s1), "--s2", str(s2), "--out", str(out), "--device", "cpu"])
    message = str(error.value)
    assert f"{named} " in message and str(s1) in message and str(s2) in message, message
    assert list(tmp_path.iterdir()) == [s2]  # nothing written


def test_a_scene_smaller_than_a_window_is_refused(run, mosaic, tmp_path):
    _, _, arrays = mosaic
    s1 = write_tif(tmp_path / "s1.tif", arrays["s1"][:, :20, :])
    s2 = write_tif(tmp_path / "s2.tif", arrays["s2"][:, :20, :])
    with pytest.raises(SystemExit, match="20 x 144 px, smaller than one window of 32 px"):
        predict.main([str(run), "--s1", str(s1), "--s2", str(s2), "--out", str(tmp_path / "map.tif"),
                      "--device", "cpu"])
    assert not (tmp_path / "map.tif").exists()


def test_mostly_missing_windows_are_nodata(run, mosaic, tmp_path):
    _, _, arrays = mosaic
    s1, s2 = arrays["s1"].copy(), arrays["s2"].copy()
    s1[:, :30, PATCH:2 * PATCH] = np.nan  # 30 of 48 rows of cell (0, 1): 62 % missing
    s1[:, PATCH:PATCH + 20, :PATCH] = np.nan  # 20 of 48 rows of cell (1, 0): 42 %, still classified
    s2[:, PATCH:, 2 * PATCH:] = 0  # cell (1, 2): the S2 file's nodata value everywhere
    s1_path = write_tif(tmp_path / "s1.tif", s1)
    s2_path = write_tif(tmp_path / "s2.tif", s2, nodata=0)
    info = predict.main([str(run), "--s1", str(s1_path), "--s2", str(s2_path), "--out", str(tmp_path / "map.tif"),
                         "--window", str(PATCH), "--device", "cpu", "--workers", "0"])
    with rasterio.open(tmp_path / "map.tif") as src:
        cells = src.read(1)[::PATCH, ::PATCH]
    assert (cells == 255).tolist() == [[False, True, False], [False, False, True]]
    assert info["nodata_cells"] == 2


def test_the_synthetic_scene_is_predicted_beside_its_true_classes_and_reported(run, tmp_path, capsys):
    paths = write_scene(tmp_path / "scene", rows=2, cols=2, size=32, seed=0)
    out = tmp_path / "map.tif"
    info = predict.main([str(run), "--s1", str(paths["s1"]), "--s2", str(paths["s2"]), "--truth", str(paths["truth"]),
                         "--out", str(out), "--device", "cpu", "--workers", "0"])
    with rasterio.open(out) as pred, rasterio.open(paths["truth"]) as true:
        both = (pred.read(1) != 255) & (true.read(1) != 255)
        expected = 100 * (pred.read(1)[both] == true.read(1)[both]).mean()
    assert info["agreement"] == pytest.approx(expected) and info["grid"] == [2, 2]
    assert json.loads(out.with_suffix(".json").read_text())["agreement"] == pytest.approx(expected)

    summarize.main([str(run), "--report", str(tmp_path / "report"), "--maps", str(out)])
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Predicted maps" in report and "![predicted map map.tif](map_1_map.png)" in report
    assert f"{expected:.1f} % of the pixels labelled in both agree" in report
    assert (tmp_path / "report" / "map_1_map.png").read_bytes() == out.with_suffix(".png").read_bytes()
    with pytest.raises(SystemExit):
        summarize.main([str(run), "--maps", str(out)])
    assert "--maps needs --report" in capsys.readouterr().err
