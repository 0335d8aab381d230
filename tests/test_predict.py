"""predict.py on a tiny dfc_finetune.py run: patches reproduce the run's evaluation, a scene tiled from
known patches is predicted as those patches, on the scene's grid; bad scenes are refused."""
import csv
import json
import logging
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS

import dfc_finetune
import predict
import prepare_scene
import products
import summarize
from datasets import DFC2020Dataset
from datasets.scenes import describe_grid, open_scene, read_grid
from models import DualResNet, load_checkpoint
from synthetic_data import write_dfc2020, write_scene
from util import maps
from util.labels import L1C_BANDS, L2A_BANDS
from util.metrics import classification_metrics
from util.runs import RunInfo

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

    windows = predict.SceneWindows(open_scene(s1, s2), PATCH, PATCH, "seed")
    loader = torch.utils.data.DataLoader(windows, batch_size=4)
    ctx = predict.process.Context(device=torch.device("cpu"))
    index, logits = (torch.cat(t) for t in list(zip(*predict.window_logits(net, loader, ctx)))[:2])
    torch.testing.assert_close(logits.softmax(1)[index.argsort()], expected, atol=1e-5, rtol=1e-4)


def test_the_map_keeps_the_scenes_grid_and_opens_named_in_a_gis(run, mosaic, tmp_path):
    s1, s2, _ = mosaic
    out = tmp_path / "sub" / "map.tif"
    info = predict.main([str(run), "--s1", str(s1), "--s2", str(s2), "--out", str(out), "--window", "32", "--stride",
                         "24", "--probabilities", "--device", "cpu", "--workers", "0"])
    classes = json.loads((run / "results.json").read_text())["last"]["classes"]
    with rasterio.open(s1) as scene, rasterio.open(out) as src:
        assert src.crs == scene.crs and src.transform == scene.transform
        assert src.bounds == scene.bounds and src.shape == scene.shape
        assert src.count == 1 and src.dtypes[0] == "uint8" and src.nodata == 255
        assert json.loads(src.tags()["classes"]) == classes
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and src.block_shapes == [(256, 256)]
        assert src.colormap(1)[0][:3] == (0, 153, 0)  # DFC2020's legend: Forest
        image = src.read(1)
    # 96 x 144 px, windows of 32 every 24 px and flush with the edges: 4 x 6 windows, every pixel classified.
    assert (image != 255).all() and info["grid"] == [4, 6] and info["nodata_pixels"] == 0
    with rasterio.open(out.with_name("map_prob.tif")) as prob:
        assert prob.descriptions == tuple(classes) and prob.transform == scene.transform
        assert prob.count == len(classes) and (prob.read().argmax(0) == image).all()
    entries = ET.parse(out.with_suffix(".qml")).getroot().findall("./pipe/rasterrenderer/colorPalette/paletteEntry")
    assert [(e.get("value"), e.get("label")) for e in entries] == [(str(i), c) for i, c in enumerate(classes)]
    assert out.with_suffix(".png").stat().st_size > 0
    assert json.loads(out.with_suffix(".json").read_text())["grid"] == [4, 6]
    assert sorted(p.name for p in out.parent.iterdir()) == ["map.json", "map.png", "map.qml", "map.tif",
                                                            "map_prob.tif"]  # no temporary file left


@pytest.mark.parametrize("change", [
    {"crs": CRS.from_epsg(32634)},
    {"transform": TRANSFORM @ rasterio.Affine.translation(1e-3, 0)},  # a thousandth of a pixel
    {"size": 1},
])
def test_scenes_on_different_grids_are_refused_naming_both_in_full(run, mosaic, tmp_path, change):
    s1, _, arrays = mosaic
    s2 = write_tif(tmp_path / "other_s2.tif", arrays["s2"][:, :, :-PATCH] if "size" in change else arrays["s2"],
                   crs=change.get("crs", CRS_UTM), transform=change.get("transform", TRANSFORM))
    out = tmp_path / "map.tif"
    with pytest.raises(SystemExit) as error:
        predict.main([str(run), "--s1", str(s1), "--s2", str(s2), "--out", str(out), "--device", "cpu"])
    message = str(error.value)
    assert (f"{s1} is on {describe_grid(read_grid(s1))}, "
            f"{s2} on {describe_grid(read_grid(s2))}") in message, message
    assert list(tmp_path.iterdir()) == [s2]  # nothing written


def test_grids_equal_within_a_millionth_of_a_pixel_are_one_grid(run, mosaic, tmp_path):
    s1, _, arrays = mosaic
    shifted = TRANSFORM @ rasterio.Affine.translation(1e-10, 0)  # 1e-9 m: once refused, printed alike
    s2 = write_tif(tmp_path / "s2.tif", arrays["s2"], transform=shifted)
    labels = np.zeros((1, *arrays["s2"].shape[1:]), np.uint8)
    truth = write_tif(tmp_path / "truth.tif", labels, transform=shifted)
    info = predict.main([str(run), "--s1", str(s1), "--s2", str(s2), "--truth", str(truth), "--out",
                         str(tmp_path / "map.tif"), "--window", str(PATCH), "--device", "cpu", "--workers", "0"])
    assert info["grid"] == [2, 3]
    elsewhere = write_tif(tmp_path / "t2.tif", labels, transform=TRANSFORM @ rasterio.Affine.translation(0.5, 0))
    with pytest.raises(SystemExit) as error:
        predict.main([str(run), "--s1", str(s1), "--s2", str(s2), "--truth", str(elsewhere), "--out",
                      str(tmp_path / "map2.tif"), "--window", str(PATCH), "--device", "cpu", "--workers", "0"])
    assert (f"--truth {elsewhere} is on another grid than the scene: "
            f"{describe_grid(read_grid(elsewhere))}; the scene is on "
            f"{describe_grid(read_grid(s2))}") in str(error.value)
    assert "500005.0" in str(error.value) and not (tmp_path / "map2.tif").exists()


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
    assert info["nodata_cells"] == 2 and info["nodata_pixels"] == 2 * PATCH * PATCH


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


def test_a_checkpoint_alone_predicts_as_its_run_folder_and_an_older_one_by_its_config(run, dfc_root, tmp_path):
    """last.pt copied anywhere describes itself (meta); a checkpoint without meta is read beside its config.json."""
    alone = tmp_path / "shared" / "model.pt"
    alone.parent.mkdir()
    alone.write_bytes((run / "last.pt").read_bytes())
    common = ["--data_root", str(dfc_root), "--split", "test", "--device", "cpu", "--workers", "0"]
    predict.main([str(run), "--out", str(tmp_path / "folder.csv"), *common])
    predict.main([str(alone), "--out", str(tmp_path / "alone.csv"), *common])
    assert (tmp_path / "alone.csv").read_text() == (tmp_path / "folder.csv").read_text()
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "results.json"):
        (old / name).write_text((run / name).read_text())
    state = torch.load(run / "last.pt", weights_only=True)
    meta = state.pop("meta")
    assert meta["classes"] == json.loads((run / "results.json").read_text())["last"]["classes"]
    assert (meta["script"], meta["bands"], meta["window"]) == ("dfc_finetune", {"s1": 2, "s2": 13}, 32)
    torch.save(state, old / "last.pt")
    predict.main([str(old / "last.pt"), "--out", str(tmp_path / "old.csv"), *common])
    assert (tmp_path / "old.csv").read_text() == (tmp_path / "folder.csv").read_text()
    torch.save(state, alone)
    with pytest.raises(SystemExit, match="does not describe itself .* give its run folder"):
        predict.main([str(alone), "--out", str(tmp_path / "x.csv"), *common])


def test_window_placement_by_hand():
    # 100 px, windows of 32 every 8: origins 0 .. 64, then 68 flush with the edge; each paints the 8 px centred
    # in it (from 12 px in), the first from the edge, the flush one what the one at 64 left (84 ..) to the edge.
    assert maps.window_origins(100, 32, 8) == [0, 8, 16, 24, 32, 40, 48, 56, 64, 68]
    assert maps.paint_spans(100, 32, 8) == [(0, 20), *((s, s + 8) for s in range(20, 84, 8)), (84, 100)]
    assert maps.window_origins(96, 48, 48) == [0, 48] and maps.paint_spans(96, 48, 48) == [(0, 48), (48, 96)]
    assert maps.paint_spans(100, 48, 48) == [(0, 48), (48, 96), (96, 100)]  # the flush window at 52
    assert maps.paint_spans(40, 32, 7) == [(0, 19), (19, 26), (26, 40)]  # 12 px in ((32 - 7) // 2); flush at 8
    assert maps.pixel_cells(10, 4, 2).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]


class ArrayScene:
    """A scene held in memory, with the interface predict reads scenes through."""

    def __init__(self, s1, s2):
        self.s1, self.s2 = s1, s2
        self.grid = {"crs": CRS_UTM, "transform": TRANSFORM, "width": s1.shape[2], "height": s1.shape[1]}

    def read(self, w):
        rows, cols = slice(w.row_off, w.row_off + w.height), slice(w.col_off, w.col_off + w.width)
        return self.s1[:, rows, cols].copy(), self.s2[:, rows, cols].copy()

    def close(self):
        pass


class MajorityNet(torch.nn.Module):
    """Classifies a window by the majority of its pixels' truth (S2 band 0: 0 or 1); logits (1 - f, f)."""

    def forward(self, s1, s2):
        share = (s2[:, 0] > 0.5).float().mean((1, 2))
        return torch.stack([1 - share, share], 1)


@pytest.mark.parametrize("boundary, tolerance", [(132, 0), (128, 4)])
def test_a_boundary_lands_where_it_is(tmp_path, boundary, tolerance):
    # Cells of 8 px start 12 px into windows placed every 8 px: at 4, 12, ... mod 8. A boundary at 132 is a cell
    # edge and lands exactly; at 128 the window at 112 is split 16 / 16, so it lands half a cell away at most.
    truth = np.zeros((100, 160), np.float32)
    truth[:, boundary:] = 1
    truth[60:] = 1 - truth[60:]  # a horizontal boundary too, at y = 60 (a cell edge)
    scene = ArrayScene(np.zeros((2, 100, 160), np.float32), np.repeat(truth[None], 3, 0))
    windows = predict.SceneWindows(scene, 32, 8, "none")
    ctx = predict.process.Context(device=torch.device("cpu"))
    cells, probs, _, _ = predict.classify_scene(MajorityNet(), torch.utils.data.DataLoader(windows, batch_size=64),
                                                ctx, probabilities=2)
    out = tmp_path / "map.tif"
    maps.write_map(out, cells, scene.grid, 32, 8, ["left", "right"], {}, probs)
    with rasterio.open(out) as src, rasterio.open(maps.probabilities_path(out)) as prob:
        image, bands = src.read(1), prob.read()
    assert (image != 255).all()  # every pixel some window covers has a class, margins included
    row = image[20]
    edges = np.flatnonzero(np.diff(row.astype(int))) + 1
    assert len(edges) == 1 and abs(edges[0] - boundary) <= tolerance, edges
    column = np.flatnonzero(np.diff(image[:, 10].astype(int))) + 1
    assert column.tolist() == [60]
    assert (bands.argmax(0) == image).all() and bands.max() <= 201  # ties in rounding go to the map's class
    assert (np.abs(bands.astype(int).sum(0) - 200) <= 2).all()


def test_missing_pixels_follow_the_files_masks(tmp_path):
    s1 = np.full((2, 8, 8), -12.0, np.float32)
    s1[:, :, :2] = -9999  # the nodata value along a swath edge
    s2 = np.full((13, 8, 8), 1500, np.uint16)
    s2[10] = 0  # an L2A stack padded with a zero B10, nodata 0: the pixels stay valid
    s2[:, :3] = 0  # every band nodata: missing
    s1_path = write_tif(tmp_path / "s1.tif", s1, nodata=-9999)
    s2_path = write_tif(tmp_path / "s2.tif", s2, nodata=0)
    masked = write_tif(tmp_path / "masked.tif", np.full((13, 8, 8), 1500, np.uint16))
    with rasterio.open(masked, "r+") as dst:
        mask = np.full((8, 8), 255, np.uint8)
        mask[4:] = 0
        dst.write_mask(mask)  # an internal mask
    window = rasterio.windows.Window(0, 0, 8, 8)
    with open_scene(s1_path, s2_path) as scene:
        a, b = scene.read(window)
    assert np.isnan(a[:, :, :2]).all() and not np.isnan(a[:, :, 2:]).any()
    assert np.isnan(b[:, :3]).all() and (b[10, 3:] == 0).all() and not np.isnan(b[:, 3:]).any()
    with open_scene(s1_path, masked) as scene:
        assert np.isnan(scene.read(window)[1][:, 4:]).all() and not np.isnan(scene.read(window)[1][:, :4]).any()
    x1, _, counts = predict.normalize(a, b, "seed")
    assert counts[0, 0] == 2 * 8 * 2 and np.isfinite(x1.numpy()).all()  # missing -> NaN -> the recipe's NaN rule


@pytest.mark.parametrize("target", ["s2", "s1 symlink", "s1 hard link", "truth", "last.pt", "run folder",
                                    "run folder symlink", "manifest", "manifest file", "last.pt, patches"])
def test_an_output_never_overwrites_an_input(run, mosaic, tmp_path, target):
    s1, s2, _ = mosaic
    truth = write_tif(tmp_path / "truth.tif", np.zeros((1, 96, 144), np.uint8))
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("id,s1,s2,label,split\n1,p/s1.tif,p/s2.tif,Forest,val\n")
    out = {"s2": s2, "s1 symlink": tmp_path / "link.tif", "s1 hard link": tmp_path / "hard.tif", "truth": truth,
           "last.pt": run / "last.pt", "run folder": run / "maps" / "map.tif",
           "run folder symlink": tmp_path / "run_link" / "map.tif", "manifest": pairs,
           "manifest file": tmp_path / "p" / "s2.tif", "last.pt, patches": run / "last.pt"}[target]
    if target == "s1 symlink":
        out.symlink_to(s1)
    elif target == "s1 hard link":
        os.link(s1, out)
    elif target == "run folder symlink":
        out.parent.symlink_to(run)
    before = {p: p.stat().st_mtime_ns for p in (s1, s2, truth, pairs, run / "last.pt")}
    if target.startswith("manifest"):
        argv = ["--data_root", str(pairs), "--split", "val"]
    elif target.endswith("patches"):
        argv = []  # the run's own data and split
    else:
        argv = ["--s1", str(s1), "--s2", str(s2), "--truth", str(truth), "--window", str(PATCH)]
    with pytest.raises(SystemExit, match="predict.py: error: the output .* (is the input|lies inside) "):
        predict.main([str(run), *argv, "--out", str(out), "--device", "cpu", "--workers", "0"])
    assert before == {p: p.stat().st_mtime_ns for p in before} and not (run / "maps").exists()


def test_many_scenes_one_failing_resumed_and_shared_by_ranks(run, mosaic, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="predict")
    s1, s2, _ = mosaic
    (tmp_path / "in").mkdir()
    for name in ("s1.tif", "s2.tif"):
        (tmp_path / "in" / name).symlink_to(s1 if name == "s1.tif" else s2)
    scenes = tmp_path / "scenes.csv"
    scenes.write_text("name,s1,s2\na,in/s1.tif,in/s2.tif\nbroken,in/s1.tif,in/none.tif\nc,in/s1.tif,in/s2.tif\n")
    out = tmp_path / "maps"
    argv = [str(run), "--scenes", str(scenes), "--out_dir", str(out), "--window", str(PATCH), "--device", "cpu",
            "--workers", "0"]
    with pytest.raises(SystemExit, match="1 of 3 scenes failed: broken"):
        predict.main(argv)
    assert sorted(p.name for p in out.glob("*.json")) == ["a.json", "c.json"]
    assert "scene 2/3 'broken' (line 3): failed: " in caplog.text and "none.tif" in caplog.text
    finished = (out / "a.json").stat().st_mtime_ns
    scenes.write_text("name,s1,s2\na,in/s1.tif,in/s2.tif\nc,in/s1.tif,in/s2.tif\n")
    caplog.clear()
    assert predict.main(argv)["scenes"] == {"a": "skipped", "c": "skipped"}
    assert (out / "a.json").stat().st_mtime_ns == finished
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert predict.main([*argv, "--overwrite"])["scenes"] == {"c": "done"}  # rank 1 of 2: scenes 1, 3, ...
    assert (out / "a.json").stat().st_mtime_ns == finished
    assert "on rank 1 of 2: 1 done, 0 skipped, 0 failed" in caplog.text


def test_a_large_map_has_overviews_by_mode_and_other_classes_a_fixed_palette(tmp_path):
    grid = {"crs": CRS_UTM, "transform": TRANSFORM, "width": 600, "height": 520}
    cells = np.zeros((len(maps.window_origins(520, 16, 8)), len(maps.window_origins(600, 16, 8))), np.uint8)
    cells[:, ::3] = 2  # stripes of 8 px of class 2 every 24 px: a third of the area; the mode keeps class 0
    cells[-1, -1] = 255
    maps.write_map(tmp_path / "map.tif", cells, grid, 16, 8, ["paddy", "maize", "soy"], {})
    with rasterio.open(tmp_path / "map.tif") as src:
        assert src.overviews(1) == [2, 4] and src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.colormap(1)[2][:3] == (44, 160, 44)  # tab10's third colour
        full, coarse = src.read(1), src.read(1, out_shape=(130, 150))  # the 4x overview
    assert (full == 255).sum() == 12 * 12  # the last window's cell: from 508 and 588 to the edges
    assert set(np.unique(coarse)) <= {0, 2, 255} and (coarse == 0).mean() > 0.5


SIZE = 72  # px a side of the synthetic products: 3 x 3 of the run's 32 px windows, the last ones flush


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    """An L1C SAFE product (JPEG 2000 at 10/20/60 m, baseline 04.00) and S1 in linear power in EPSG:4326."""
    folder = tmp_path_factory.mktemp("product")
    safe, _ = products.l1c(folder, SIZE)
    return safe, products.s1_power(folder / "s1_power.tif", SIZE)[0]


def test_a_product_is_predicted_as_its_prepared_stacks(run, product, tmp_path):
    """predict.py on the provider's files gives the map (and the inputs) of prepare_scene.py's stacks."""
    safe, s1 = product
    stacks = tmp_path / "S1.tif", tmp_path / "S2.tif"
    prepare_scene.main(["--s1", str(s1), "--s2", str(safe), "--out_s1", str(stacks[0]), "--out_s2", str(stacks[1]),
                        "--s1_scale", "power", "--block", "40"])  # blocks that cut across predict's windows
    common = ["--probabilities", "--device", "cpu", "--workers", "0"]
    predict.main([str(run), "--s1", str(stacks[0]), "--s2", str(stacks[1]), "--out", str(tmp_path / "stacked.tif"),
                  *common])
    info = predict.main([str(run), "--s1", str(s1), "--s2", str(safe), "--s1_scale", "power", "--out",
                         str(tmp_path / "direct.tif"), *common])
    assert info["grid"] == [3, 3] and info["s2_bands"] == ",".join(L1C_BANDS)
    for name in ("", "_prob"):
        with rasterio.open(tmp_path / f"stacked{name}.tif") as a, rasterio.open(tmp_path / f"direct{name}.tif") as b:
            assert (b.crs, b.transform, b.shape) == (a.crs, a.transform, a.shape)
            np.testing.assert_array_equal(b.read(), a.read())
    grid = products.s2_grid(SIZE)
    assert (a.crs, a.transform, a.shape) == (grid["crs"], grid["transform"], (SIZE, SIZE))
    prepared = predict.SceneWindows(open_scene(*stacks), 32, 20, "seed")
    direct = predict.SceneWindows(open_scene(s1, safe, s1_scale="power", s2_bands=L1C_BANDS), 32, 20, "seed")
    for i in range(len(direct)):
        for m in ("s1", "s2"):
            assert torch.equal(direct[i][m], prepared[i][m])
    assert sorted(p.name for p in tmp_path.glob("direct*")) == [f"direct{s}" for s in (
        ".json", ".png", ".qml", ".tif", "_prob.tif")]  # no intermediate file


def test_a_13_band_run_on_an_l2a_product_is_refused_naming_b10(run, tmp_path):
    safe, _ = products.l2a(tmp_path, SIZE)
    s1 = products.s1_power(tmp_path / "s1_power.tif", SIZE)[0]
    with pytest.raises(SystemExit) as error:
        predict.main([str(run), "--s1", str(s1), "--s2", str(safe), "--s1_scale", "power", "--out",
                      str(tmp_path / "map.tif"), "--device", "cpu", "--workers", "0"])
    message = str(error.value)
    assert message.startswith(f"predict.py: error: {safe} lacks S2 band B10 ") and "\n" not in message
    assert "train a 12-band run" in message and not (tmp_path / "map.tif").exists()


@pytest.mark.parametrize("mode", ["--out", "--out_dir"])
def test_a_map_inside_an_input_product_is_refused(run, product, tmp_path, mode, caplog):
    safe, s1 = product
    before = {p: p.stat().st_mtime_ns for p in safe.rglob("*")}
    if mode == "--out":
        argv = ["--s1", str(s1), "--s2", str(safe), "--out", str(safe / "GRANULE" / "map.tif")]
    else:
        scenes = tmp_path / "scenes.csv"
        scenes.write_text(f"name,s1,s2\nmap,{s1},{safe}\n")
        argv = ["--scenes", str(scenes), "--out_dir", str(safe / "maps")]
    refused = f"lies inside {safe}, a folder predict.py reads"
    with pytest.raises(SystemExit, match=re.escape(refused) if mode == "--out" else "1 of 1 scenes failed: map"):
        predict.main([str(run), *argv, "--s1_scale", "power", "--device", "cpu", "--workers", "0"])
    assert mode == "--out" or refused in caplog.text
    assert before == {p: p.stat().st_mtime_ns for p in safe.rglob("*")}


def test_the_runs_s2_bands_come_by_name(run, product):
    """The checkpoint's meta, else results.json, else a manifest's --s2_bands, else by count; a 12-band run
    takes its 12 from a 13-band L1C product."""
    assert predict.run_s2_bands(predict.open_run(run, "last"), 13) == list(L1C_BANDS)
    twelve = RunInfo(run, "dfc_finetune", "manifest", {}, {"s2_band_names": list(L2A_BANDS)})
    assert predict.run_s2_bands(twelve, 12) == list(L2A_BANDS)
    assert predict.run_s2_bands(RunInfo(run, "dfc_finetune", "manifest", {"s2_bands": ["B04", "B08"]}, None),
                                2) == ["B04", "B08"]
    assert predict.run_s2_bands(RunInfo(run, "dfc_finetune", "DFC2020", {}, None), 12) == list(L2A_BANDS)
    with pytest.raises(predict.PredictError, match="does not name its 4 S2 bands"):
        predict.run_s2_bands(RunInfo(run, "dfc_finetune", "manifest", {}, None), 4)
    safe, s1 = product
    with open_scene(s1, safe, s1_scale="power", s2_bands=predict.run_s2_bands(twelve, 12)) as scene:
        _, s2 = scene.read(rasterio.windows.Window(0, 0, 8, 8))
        assert scene.s2_band_names == list(L2A_BANDS) and s2.shape == (12, 8, 8)
