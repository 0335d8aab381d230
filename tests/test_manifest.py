"""Manifests of the researcher's own pairs: columns by name, classes by their names, bad rows
refused before a run starts, packed copies equal to their source."""
import csv
import json
import shutil

import numpy as np
import pytest
import rasterio
import torch

import dfc_finetune
import pack
import predict
import summarize
from datasets import DataFileError, ManifestDataset, is_manifest, patch_dataset
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
def test_the_dfc2020_recipe_trains_on_a_manifest_under_its_class_names(pairs, tmp_path, capsys):
    run = tmp_path / "run"
    dfc_finetune.main(["--data_root", str(pairs), "--train_split", "train", "--eval_split", "val", "--model_path",
                       "random", "--finetune", "--arch", "resnet18", "--crop", "16", "--eval_crop", "16",
                       "--epochs", "1", "--batch_size", "8", "--workers", "0", "--device", "cpu",
                       "--save_path", str(run)])
    results = json.loads((run / "results.json").read_text())
    assert results["last"]["classes"] == sorted(MANIFEST_CLASSES)
    assert set(results["last"]["per_class"]) == set(MANIFEST_CLASSES)
    assert sum(map(sum, results["last"]["confusion"])) == 5
    summarize.main([str(run)])
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in MANIFEST_CLASSES)  # a row per class, under its own name
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
