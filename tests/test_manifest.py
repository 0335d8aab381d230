"""Manifests of the researcher's own pairs: columns by name, classes by their names, bad rows
refused before a run starts, packed copies equal to their source."""
import csv
import json
import logging
import shutil

import numpy as np
import pytest
import rasterio
import torch

import datasets
import dfc_finetune
import pack
import predict
import sen12ms_pretrain
import summarize
from datasets import DataFileError, ManifestDataset, is_manifest, patch_dataset
from datasets.manifest import read_manifest
from helpers import ssl4eo_file
from models import DualResNet, load_backbone_weights
from synthetic_data import MANIFEST_CLASSES, write_manifest


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("own"), n=20, seed=0, size=24)


def _rewrite(csv, tmp_path, edit):
    """A copy of the manifest with its files, the CSV's lines passed through ``edit``."""
    folder = tmp_path / "copy"
    shutil.copytree(csv.parent, folder)
    lines = csv.read_text().splitlines()
    (folder / csv.name).write_text("\n".join(edit(lines)) + "\n")
    return folder / csv.name


def test_columns_by_name_classes_by_label_and_splits(pairs):
    train, val = ManifestDataset(pairs, "train", crop=16, train=True), ManifestDataset(pairs, "val")
    assert train.classes == val.classes == sorted(MANIFEST_CLASSES)
    assert (len(train), len(val)) == (15, 5) and train.bands == {"s1": 2, "s2": 12}
    item = val[3]
    assert item["s1"].shape == (2, 24, 24) and item["s2"].shape == (12, 24, 24) and item["id"] == "pair0018"
    assert val.classes[item["label"]] == sorted(MANIFEST_CLASSES)[18 % 5]
    assert item["multilabel"].tolist() == [float(k == item["label"]) for k in range(5)]
    assert train[0]["s2"].shape == (12, 16, 16) and is_manifest(pairs) and isinstance(patch_dataset(pairs, "val"), ManifestDataset)


def test_pixels_are_read_as_dfc2020s(pairs):
    item = ManifestDataset(pairs, "train")[0]
    with rasterio.open(pairs.parent / "s2" / "pair0000.tif") as src:
        s2 = np.clip(src.read().astype(np.float32), 0, 10000)
    assert torch.equal(item["s2"], torch.from_numpy(s2 / (s2.max(axis=(1, 2), keepdims=True) + np.float32(1e-5))))


@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines[:3] + [lines[3].replace("s1/pair0002.tif", "s1/gone.tif")] + lines[4:],
     r"line 4: cannot read s1 file .*gone.tif"),
    (lambda lines: [lines[0]] + [lines[1].replace("barley", "")] + lines[2:], r"line 2: no label"),
    (lambda lines: [lines[0].replace("s1", "sar")] + lines[1:], r"no column s1"),
])
def test_bad_rows_are_refused_naming_the_line_and_file(pairs, tmp_path, edit, message):
    with pytest.raises(DataFileError, match=message):
        ManifestDataset(_rewrite(pairs, tmp_path, edit), "train")


def test_a_band_count_other_than_the_first_rows_is_refused(pairs, tmp_path):
    csv = _rewrite(pairs, tmp_path, lambda lines: lines)
    with rasterio.open(csv.parent / "s2" / "pair0001.tif") as src:
        profile, data = src.profile, src.read()
    profile["count"] = 13
    with rasterio.open(csv.parent / "s2" / "pair0001.tif", "w", **profile) as dst:
        dst.write(np.concatenate([data, data[:1]]))
    with pytest.raises(DataFileError, match=r"line 3: .* have 2 / 13 bands, the first row 2 / 12"):
        ManifestDataset(csv, "train")


def test_a_split_it_does_not_have_names_the_ones_it_has(pairs):
    with pytest.raises(DataFileError, match=r"no row of split 'test'; its splits: 'train', 'val'"):
        ManifestDataset(pairs, "test")


def test_unlabelled_rows_are_ignored_where_labels_are_optional(pairs, tmp_path):
    csv = _rewrite(pairs, tmp_path, lambda lines: [lines[0]] + [lines[1].replace("barley", "")] + lines[2:])
    item = ManifestDataset(csv, "train", require_labels=False)[0]
    assert item["label"] == 255 and item["multilabel"].sum() == 0


def test_a_packed_manifest_gives_the_same_items(pairs, tmp_path):
    pack.pack("manifest", pairs, tmp_path / "packed")
    for split in ("train", "val"):
        a = ManifestDataset(pairs, split, crop=16, offset_seed=3)
        b = ManifestDataset(tmp_path / "packed", split, crop=16, offset_seed=3)
        assert a.classes == b.classes and a.patch_ids == b.patch_ids
        for i in range(len(a)):
            x, y = a[i], b[i]
            assert all(torch.equal(x[k], y[k]) for k in ("s1", "s2", "multilabel")) and x["label"] == y["label"]


@pytest.mark.slow
def test_the_dfc2020_recipe_trains_on_a_manifest_under_its_class_names(pairs, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    dfc_finetune.main(["--data_root", str(pairs), "--train_split", "train", "--eval_split", "val", "--model_path",
                       "random", "--finetune", "--arch", "resnet18", "--crop", "16", "--eval_crop", "16",
                       "--epochs", "1", "--batch_size", "8", "--workers", "0", "--device", "cpu",
                       "--save_path", str(run)])
    results = json.loads((run / "results.json").read_text())
    assert results["last"]["classes"] == sorted(MANIFEST_CLASSES)
    assert set(results["last"]["per_class"]) == set(MANIFEST_CLASSES)
    assert sum(map(sum, results["last"]["confusion"])) == 5
    assert (results["dataset"], results["manifest"], results["config"]["normalize"]) == ("manifest", "pairs.csv", "stats")
    assert results["s2_band_names"] == list(datasets.L2A_BANDS) and len(results["norm_stats"]["s1_std"]) == 2
    summarize.main([str(run)])
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in MANIFEST_CLASSES)  # a row per class, under its own name
    assert "### manifest pairs.csv: last epoch" in table and "DFC2020" not in table
    predict.main([str(run), "--data_root", str(pairs), "--split", "val", "--out", str(tmp_path / "p.csv"),
                  "--device", "cpu", "--workers", "0"])
    with open(tmp_path / "p.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    names = sorted(MANIFEST_CLASSES)
    assert [r["id"] for r in rows] == [f"pair{i:04d}" for i in range(15, 20)]
    assert [r["label"] for r in rows] == [names[i % 5] for i in range(15, 20)]
    confusion = np.zeros((5, 5), dtype=int)
    for r in rows:
        confusion[names.index(r["label"]), names.index(r["prediction"])] += 1
    assert confusion.tolist() == results["last"]["confusion"]
    # Another area: its own labels, one the run never learnt, numbered by the run's classes by name.
    other = _rewrite(pairs, tmp_path, lambda lines: [lines[0]] + [line.replace("barley", "paddy").replace("scrub", "barley")
                                                                   for line in lines[1:]])
    printed = predict.main([str(run), "--data_root", str(other), "--split", "val", "--out", str(tmp_path / "o.csv"),
                            "--device", "cpu", "--workers", "0"])
    with open(tmp_path / "o.csv", newline="") as file:
        relabelled = list(csv.DictReader(file))
    own = [{"barley": "paddy", "scrub": "barley"}.get(names[i % 5], names[i % 5]) for i in range(15, 20)]
    assert [r["label"] for r in relabelled] == own
    known = [(r["label"], r["prediction"]) for r in relabelled if r["label"] != "paddy"]
    accuracy = 100 * sum(a == b for a, b in known) / len(known)
    assert printed["OA"] == pytest.approx(accuracy) and "paddy: 1" in caplog.text


def _write_like(path, array, template):
    """``array`` as a GeoTIFF on ``template``'s grid (CRS, transform) unless the caller changes it."""
    with rasterio.open(template) as src:
        profile = {**src.profile, "count": array.shape[0], "dtype": array.dtype}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)


def _first_bands(csv, modality, n, pairs=20):
    """Every pair's ``modality`` file cut to its first ``n`` bands, in place."""
    for i in range(pairs):
        path = csv.parent / modality / f"pair{i:04d}.tif"
        with rasterio.open(path) as src:
            bands = src.read()[:n]
        _write_like(path, bands, path)


def test_a_spreadsheets_bom_and_crlf_line_ends_are_read(pairs, tmp_path):
    csv = _rewrite(pairs, tmp_path, lambda lines: lines)
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes().replace(b"\n", b"\r\n"))
    ds = ManifestDataset(csv, "val")
    assert ds.patch_ids == [f"pair{i:04d}" for i in range(15, 20)] and ds.classes == sorted(MANIFEST_CLASSES)


@pytest.mark.parametrize("edit, message", [
    (lambda lines: [lines[0], lines[1].replace("barley", "Barley")] + lines[2:],
     r"labels 'Barley' \(line 2\) and 'barley' \(line 7\) differ only in case; spell"),
    (lambda lines: [lines[0], lines[1].replace(",barley,", ",Barley ,")] + lines[2:],
     r"labels 'Barley' \(line 2\) and 'barley' \(line 7\) differ only in case"),
    (lambda lines: [lines[0], lines[1] + ",one too many"] + lines[2:], r"line 2: 7 fields, the header names 6"),
    (lambda lines: [lines[0], lines[1], lines[2].replace("pair0001,", "pair0000,", 1)] + lines[3:],
     r"lines 2 and 3 have the same id 'pair0000'"),
])
def test_labels_spelt_two_ways_and_repeated_ids_are_refused_naming_both_lines(pairs, tmp_path, edit, message):
    with pytest.raises(DataFileError, match=message):
        ManifestDataset(_rewrite(pairs, tmp_path, edit), "train")


def test_a_label_with_surrounding_spaces_is_its_class(pairs, tmp_path):
    csv = _rewrite(pairs, tmp_path, lambda lines: [lines[0], lines[1].replace(",barley,", ", barley ,")] + lines[2:])
    assert [row.label for row in read_manifest(csv)] == [row.label for row in read_manifest(pairs)]


def test_pairs_on_other_grids_are_refused_naming_both_files(pairs, tmp_path):
    csv = _rewrite(pairs, tmp_path, lambda lines: lines)
    s2 = csv.parent / "s2" / "pair0003.tif"
    with rasterio.open(s2, "r+") as dst:  # a billionth of a metre: the same grid
        dst.transform = dst.transform @ rasterio.Affine.translation(1e-10, 0)
    ManifestDataset(csv, "train")
    with rasterio.open(s2, "r+") as dst:  # half a pixel: another grid
        dst.transform = dst.transform @ rasterio.Affine.translation(0.5, 0)
    with pytest.raises(DataFileError, match=r"line 5: S1 and S2 are not co-registered: .*s1/pair0003.tif on .*"
                                            r"s2/pair0003.tif on"):
        ManifestDataset(csv, "train")


def test_s1_that_is_not_in_db_is_refused_naming_the_file(pairs, tmp_path):
    csv = _rewrite(pairs, tmp_path, lambda lines: lines)
    for i in range(4):
        path = csv.parent / "s1" / f"pair{i:04d}.tif"
        with rasterio.open(path) as src:
            db = src.read()
        _write_like(path, (10 ** (db / 10)).astype(np.float32), path)  # linear power
    with pytest.raises(DataFileError, match=r"S1 .*pair0000.tif: no negative value among the 1152 S1 pixels .*not "
                                            r"look like backscatter in dB"):
        ManifestDataset(csv, "train")
    for i in range(4):  # back to dB, a ship at +45 dB in one: backscatter still (scenes.check_s1_units' rule)
        path = csv.parent / "s1" / f"pair{i:04d}.tif"
        ship = np.full((2, 24, 24), -15.0, np.float32)
        ship[:, 5, 5] = 45.0
        _write_like(path, ship, path)
    ManifestDataset(csv, "train")
    ship[:, :6] = 40.0  # a quarter of the pixels: amplitude or DN, not dB
    _write_like(path, ship, path)
    with pytest.raises(DataFileError, match=r"S1 .*pair0003.tif: 25.0% of the S1 pixels read above \+30 dB"):
        ManifestDataset(csv, "train")


def test_labels_are_numbered_by_a_runs_classes_by_name_and_unknown_ones_kept_by_name(pairs, tmp_path, caplog):
    run_classes = ["town", "barley", "forest"]  # a run that never learnt lake and scrub, in its own order
    ds = ManifestDataset(pairs, "val", classes=run_classes)
    names = [sorted(MANIFEST_CLASSES)[i % 5] for i in range(15, 20)]
    items = [ds[i] for i in range(len(ds))]
    assert [item["label_name"] for item in items] == names
    assert [item["label"] for item in items] == [run_classes.index(n) if n in run_classes else 255 for n in names]
    assert ds.unknown_labels == {"lake": 1, "scrub": 1}
    assert "labels outside the 3 classes" in caplog.text and "lake: 1, scrub: 1" in caplog.text


def test_s2_bands_are_named_by_count_or_by_the_flag(pairs, tmp_path):
    assert ManifestDataset(pairs, "val").s2_band_names == [b for b in datasets.L1C_BANDS if b != "B10"]
    named = ManifestDataset(pairs, "val", s2_bands=[f"X{i}" for i in range(12)])
    assert named.s2_band_names[-1] == "X11"
    loose = [f" {b.lower().replace('b0', 'b')}" for b in datasets.L2A_BANDS]  # " b1", ..., " b8a", " b11"
    assert ManifestDataset(pairs, "val", s2_bands=loose).s2_band_names == list(datasets.L2A_BANDS)
    with pytest.raises(DataFileError, match=r"S2 has 12 bands, but --s2_bands names 2"):
        ManifestDataset(pairs, "val", s2_bands=["B02", "B03"])
    csv = _rewrite(pairs, tmp_path, lambda lines: lines)
    _first_bands(csv, "s2", 4)
    with pytest.raises(DataFileError, match=r"S2 has 4 bands; name them in order with --s2_bands"):
        ManifestDataset(csv, "val")


def test_the_scripts_warn_about_unused_splits_and_evaluation_labels_without_training_rows(pairs, tmp_path, caplog):
    def edit(lines):  # a typo in one split value; the last val row a class no training row has
        return ([lines[0], lines[1].replace(",train,", ",Train,")] + lines[2:-1]
                + [lines[-1].replace("town", "paddy")])
    csv = _rewrite(pairs, tmp_path, edit)
    parser = dfc_finetune.build_parser()
    args = parser.parse_args(["--data_root", str(csv), "--train_split", "train", "--eval_split", "val",
                              "--crop", "16", "--eval_crop", "16"])
    dfc_finetune.check_args(parser, args)
    train, val = dfc_finetune.open_data(parser, args)
    assert args.normalize == "stats" and train.norm_stats is val.norm_stats and len(train.norm_stats["s2_mean"]) == 12
    assert "1 rows of other splits than --train_split 'train' and --eval_split 'val' are not used" in caplog.text
    assert "'Train': 1" in caplog.text and "evaluation labels with no training row" in caplog.text
    assert "paddy: 1" in caplog.text


def test_a_data_error_is_one_line_before_the_run_folder(pairs, tmp_path, capsys):
    csv = _rewrite(pairs, tmp_path, lambda lines: lines[:3] + [lines[3].replace("s1/pair0002", "s1/gone")] + lines[4:])
    with pytest.raises(SystemExit) as exit_info:
        dfc_finetune.main(["--data_root", str(csv), "--train_split", "train", "--eval_split", "val",
                           "--save_path", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and not (tmp_path / "run").exists()
    assert len(err.strip().splitlines()) == 1 and "gone.tif" in err and "usage" not in err


@pytest.mark.slow
def test_pretraining_on_a_manifest_finishes_with_its_checkpoint_and_results(pairs, tmp_path):
    run = tmp_path / "pre"
    sen12ms_pretrain.main(["--data_root", str(pairs), "--arch", "resnet18", "--crop", "16", "--epochs", "1",
                           "--batch_size", "8", "--device", "cpu", "--workers", "0", "--save_path", str(run)])
    results = json.loads((run / "results.json").read_text())
    assert (run / "checkpoint.pth").is_file() and results["dataset"] == "manifest"
    assert results["manifest"] == "pairs.csv" and results["config"]["normalize"] == "stats"


def test_a_13_band_pretrained_first_layer_keeps_the_kernels_of_the_datas_bands_by_name(tmp_path, caplog):
    state = ssl4eo_file(tmp_path / "s2.pth", 13)
    l1c = list(datasets.L1C_BANDS)
    for names in (list(datasets.L2A_BANDS), ["B04", "B03", "B02", "B08"], l1c[::-1], l1c):  # 13 reordered: by name
        net = DualResNet("resnet18", s2_channels=len(names))
        with caplog.at_level(logging.INFO, logger="models"):
            assert load_backbone_weights(net, s2=tmp_path / "s2.pth", s2_band_names=names) == []
        kept = state["conv1.weight"][:, [l1c.index(n) for n in names]]
        assert torch.equal(net.backbone2.conv1.weight.detach(), kept)
    assert "dropped B10" in caplog.text
    with pytest.raises(ValueError, match="takes 13 bands, but the data has 12 S2 bands"):  # names unknown: refused
        load_backbone_weights(DualResNet("resnet18", s2_channels=12), s2=tmp_path / "s2.pth")


def test_an_offline_download_names_the_url_the_cache_path_and_the_alternative(tmp_path, monkeypatch):
    import urllib.error

    import models
    from util import checkpoint

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, path, progress):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(checkpoint, "fetch", offline)
    with pytest.raises(ValueError) as error:
        models.pretrained_backbone_files("ssl4eo-moco")
    message = str(error.value)
    url = models.PRETRAINED_BACKBONES["ssl4eo-moco"]["s1"]
    assert url in message and str(tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]) in message
    assert "Name or service not known" in message and "--s1_backbone / --s2_backbone" in message
    assert "\n" not in message


def test_ssl4eo_scaling_of_a_one_band_s1_is_refused_before_the_run_folder(pairs, tmp_path, capsys):
    csv = _rewrite(pairs, tmp_path, lambda lines: lines)
    _first_bands(csv, "s1", 1)
    with pytest.raises(SystemExit) as exit_info:
        dfc_finetune.main(["--data_root", str(csv), "--train_split", "train", "--eval_split", "val", "--normalize",
                           "ssl4eo", "--crop", "16", "--eval_crop", "16", "--save_path", str(tmp_path / "run"), "--device", "cpu"])
    assert exit_info.value.code == 2 and not (tmp_path / "run").exists()
    assert "--normalize ssl4eo standardises S1 VV, VH" in capsys.readouterr().err
