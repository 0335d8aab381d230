"""datasets.py on tiny synthetic sets written into tmp_path, checked against naive re-implementations."""
import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from torch.utils.data import DataLoader

import datasets
import synthetic_data
from helpers import write_tif as _write_tif

METERML_CLASSES = ["CAFOs", "Landfills", "Mines", "Negative", "ProcessingPlants", "RefineriesAndTerminals", "WWTreatment"]
FACILITIES = ["CAFOs", "Landfills", "Mines", "ProcessingPlants", "RefineriesAndTerminals", "WWTreatment"]
DFC_TO_CLASS = {1: 0, 2: 1, 4: 2, 5: 3, 6: 4, 7: 5, 9: 6, 10: 7}  # every other value: ignore (255)
IGBP_TO_DFC = [0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 6, 8, 9, 10]


# ---------------------------------------------------------------------------------------------
# helpers


def _read_geojson(root: Path, split: str = "train") -> dict:
    return json.loads((root / f"{split}_dataset.geojson").read_text())


def _write_geojson(root: Path, collection: dict, split: str = "train") -> None:
    (root / f"{split}_dataset.geojson").write_text(json.dumps(collection))


def _folder(root: Path, sample_id: str) -> Path:
    (found,) = list(root.glob(f"*_images*/{sample_id}"))
    return found


def _tif(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def _dfc_path(root: Path, modality: str, number: int, split: str = "validation") -> Path:
    suffix = "validation" if split == "validation" else "0"
    return root / f"ROIs0000_{split}" / f"{modality}_{suffix}" / f"ROIs0000_{split}_{modality}_0_p{number}.tif"


def _naive_seed_normalisation(raw: np.ndarray, s1: bool) -> np.ndarray:
    """The seed normalisation written out channel by channel, as data_formats.md states it."""
    out = np.empty(raw.shape, dtype=np.float64)
    for c in range(raw.shape[0]):
        band = raw[c].astype(np.float64)
        band = np.clip(np.nan_to_num(band, nan=0.0), -25, 0) + 25 if s1 else np.clip(band, 0, 10000)
        out[c] = band / (band.max() + 1e-5)
    return out


def _naive_labels(dfc_window: np.ndarray) -> tuple[int, list[float]]:
    mapped = [DFC_TO_CLASS.get(int(v), 255) for v in dfc_window.ravel()]
    counts = Counter(mapped)
    top = max(counts.values())
    label = min(k for k, v in counts.items() if v == top)
    return label, [float(counts[k] >= 0.1 * len(mapped)) for k in range(8)]


@pytest.fixture
def meterml(tmp_path) -> Path:
    return synthetic_data.write_meterml(tmp_path / "meterml", n=16, seed=0, val_fraction=0.25)


@pytest.fixture
def dfc(tmp_path) -> Path:
    return synthetic_data.write_dfc2020(tmp_path / "dfc", n_validation=6, n_test=3, seed=0, size=32)


# ---------------------------------------------------------------------------------------------
# METER-ML


def test_meterml_items_and_labels_follow_the_metadata(meterml):
    ds = datasets.MeterMLDataset(meterml, "train")
    features = _read_geojson(meterml)["features"]
    assert len(ds) == 12 and ds.classes == METERML_CLASSES and ds.NEGATIVE == 3
    for i, feature in enumerate(features):
        item = ds[i]
        names = feature["properties"]["Type"].split("-")
        assert item["id"] == Path(feature["properties"]["Image_Folder"]).name
        assert item["s1"].shape == (2, 72, 72) and item["s1"].dtype == torch.float32
        assert item["s2"].shape == (4, 72, 72) and item["s2"].dtype == torch.float32
        assert item["label"] == METERML_CLASSES.index(names[0]) == ds.labels[i]
        expected = torch.tensor([float(name in names) for name in FACILITIES])
        assert torch.equal(item["multilabel"], expected) and torch.equal(ds.multilabels[i], expected)
    assert ds.labels.dtype == torch.int64 and ds.multilabels.shape == (12, 6)
    assert len(datasets.MeterMLDataset(meterml, "val")) == 4


def test_meterml_seed_normalisation_uses_the_published_constants(meterml):
    folder = _folder(meterml, "site_000000")
    s1 = np.load(folder / "sentinel-1.npy").astype(np.float64)
    s2 = np.load(folder / "sentinel-2-10m.npy").astype(np.float64)
    item = datasets.MeterMLDataset(meterml)[0]
    expected_s1 = (s1 - [1652.7944, 1258.3584]) / [290.2874, 280.4149]
    expected_s2 = (s2 - [1025.2214, 1138.3673, 1194.6796, 2637.0828]) / [724.7973, 545.1207, 514.9276, 1051.9325]
    np.testing.assert_allclose(item["s1"].numpy(), expected_s1.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(item["s2"].numpy(), expected_s2.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
    raw = datasets.MeterMLDataset(meterml, normalize="none")[0]
    np.testing.assert_array_equal(raw["s1"].numpy(), s1.transpose(2, 0, 1))


def test_meterml_resolves_folders_with_one_scan_per_parent(meterml, monkeypatch):
    scans, stats = [], []
    real_scandir, real_stat = os.scandir, os.stat
    monkeypatch.setattr(os, "scandir", lambda path: scans.append(path) or real_scandir(path))
    monkeypatch.setattr(os, "stat", lambda *a, **k: stats.append(a) or real_stat(*a, **k))
    ds = datasets.MeterMLDataset(meterml, "train")
    monkeypatch.undo()
    # Parents: train_images (written, absent), train_images_1..3, val_images, test_images.
    assert len(scans) <= 6 and len(stats) < len(ds)
    assert ds.skipped == {}
    written = [f["properties"]["Image_Folder"] for f in _read_geojson(meterml)["features"]]
    assert any(folder.startswith("train_images/") for folder in written)
    assert [ds[i]["id"] for i in range(len(ds))] == [Path(folder).name for folder in written]


def test_meterml_accepts_json_names_and_an_explicit_path(meterml):
    (meterml / "train_dataset.geojson").rename(meterml / "train_dataset.json")
    assert len(datasets.MeterMLDataset(meterml, "train")) == 12
    (meterml / "meta").mkdir()
    (meterml / "val_dataset.geojson").rename(meterml / "meta" / "other.geojson")
    assert len(datasets.MeterMLDataset(meterml, "train", geojson="meta/other.geojson")) == 4


def test_meterml_missing_folders_are_counted_and_reported_once(meterml, caplog):
    features = _read_geojson(meterml)["features"]
    missing = [Path(f["properties"]["Image_Folder"]).name for f in features[:2]]
    for sample_id in missing:
        for file in _folder(meterml, sample_id).iterdir():
            file.unlink()
        _folder(meterml, sample_id).rmdir()
    with caplog.at_level(logging.INFO, logger="datasets"):
        ds = datasets.MeterMLDataset(meterml, "train")
    assert len(ds) == 10 and ds.skipped == {"image folder missing": 2} and ds.problems == {"image folder missing": missing}
    assert [ds[i]["id"] for i in range(len(ds))] == [Path(f["properties"]["Image_Folder"]).name for f in features[2:]]
    (record,) = [r for r in caplog.records if r.name == "datasets"]
    assert record.levelno == logging.WARNING and "10 of 12" in record.message and missing[0] in record.message
    with pytest.raises(FileNotFoundError, match=missing[0]):
        datasets.MeterMLDataset(meterml, "train", strict=True)


def test_meterml_unknown_types_are_listed_with_counts(meterml):
    collection = _read_geojson(meterml)
    for feature, bad in zip(collection["features"], ["Foo", "Foo", "CAFOs-Bar"]):
        feature["properties"]["Type"] = bad
    _write_geojson(meterml, collection)
    with pytest.raises(ValueError, match=r"unknown Type names.*'Foo': 2.*'Bar': 1"):
        datasets.MeterMLDataset(meterml, "train")


def test_meterml_roundabout_is_negative_and_negatives_can_be_excluded(meterml):
    collection = _read_geojson(meterml)
    collection["features"][0]["properties"]["Type"] = "Roundabout"
    _write_geojson(meterml, collection)
    ds = datasets.MeterMLDataset(meterml, "train")
    assert ds[0]["label"] == 3 and ds[0]["multilabel"].sum() == 0
    negatives = int((ds.labels == 3).sum())
    assert negatives >= 2
    kept = datasets.MeterMLDataset(meterml, "train", exclude_negatives=True)
    assert len(kept) == 12 - negatives and kept.skipped == {"negative (exclude_negatives)": negatives}
    assert not (kept.labels == 3).any()
    assert all(kept[i]["label"] != 3 for i in range(len(kept)))


def test_meterml_multilabel_target(meterml):
    """The METER-ML paper's own task: every facility named in Type, beside the first-name label."""
    ds = datasets.MeterMLDataset(meterml, "train")
    compound = [i for i, f in enumerate(_read_geojson(meterml)["features"]) if "-" in f["properties"]["Type"]]
    assert compound
    assert all(ds[i]["multilabel"].sum() >= 2 for i in compound)
    assert all(ds[i]["multilabel"].sum() == 0 for i in range(len(ds)) if ds[i]["label"] == 3)


def test_meterml_nan_is_replaced_counted_and_logged_once(meterml, caplog):
    for sample_id, count in [("site_000000", 5), ("site_000001", 3)]:
        path = _folder(meterml, sample_id) / "sentinel-1.npy"
        s1 = np.load(path).astype(np.float32)
        s1.reshape(-1)[:count] = np.nan
        np.save(path, s1)
    ds = datasets.MeterMLDataset(meterml)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        items = [ds[0], ds[1], ds[2]]
    assert all(torch.isfinite(item["s1"]).all() for item in items)
    assert items[0]["s1"][0, 0, 0] == 0  # the channel mean after standardisation
    assert ds.nan_pixels == 8
    (record,) = [r for r in caplog.records if r.name == "datasets"]
    assert "NaN" in record.message and "sentinel-1.npy" in record.message


def test_meterml_corrupt_or_misshaped_arrays_name_the_file(meterml):
    ds = datasets.MeterMLDataset(meterml)
    path = _folder(meterml, ds[0]["id"]) / "sentinel-1.npy"
    path.write_bytes(b"not a numpy file")
    with pytest.raises(datasets.DataFileError, match=f"cannot read {path}"):
        ds[0]
    path = _folder(meterml, ds[1]["id"]) / "sentinel-2-10m.npy"
    np.save(path, np.zeros((72, 72, 3), np.uint16))
    with pytest.raises(ValueError, match=rf"{path}: expected shape \(72, 72, 4\).*found \(72, 72, 3\)"):
        ds[1]


def test_meterml_bad_roots_and_empty_splits(tmp_path, meterml):
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*train_dataset.geojson.*train_images_1/<id>/sentinel-1.npy"):
        datasets.MeterMLDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"test_dataset.geojson.*test_dataset.json"):
        datasets.MeterMLDataset(meterml, "test")
    _write_geojson(meterml, {"type": "FeatureCollection", "features": []}, split="val")
    with pytest.raises(ValueError, match="empty"):
        datasets.MeterMLDataset(meterml, "val")
    collection = _read_geojson(meterml)
    for feature in collection["features"]:
        feature["properties"]["Type"] = "Negative"
    _write_geojson(meterml, collection)
    with pytest.raises(ValueError, match="no sample left"):
        datasets.MeterMLDataset(meterml, exclude_negatives=True)
    with pytest.raises(ValueError, match="split"):
        datasets.MeterMLDataset(meterml, "validation")


# ---------------------------------------------------------------------------------------------
# DFC2020


def test_dfc_items_match_the_naive_seed_normalisation(dfc):
    ds = datasets.DFC2020Dataset(dfc, "validation")
    numbers = sorted(int(p.name.split("_p")[1][:-4]) for p in (dfc / "ROIs0000_validation" / "s1_validation").iterdir())
    assert ds.patch_ids == numbers and len(ds) == 6 and ds.classes[7] == "Water" and ds.IGNORE == 255
    for i, number in enumerate(numbers):
        item = ds[i]
        assert item["id"] == number
        assert item["s1"].shape == (2, 32, 32) and item["s2"].shape == (13, 32, 32) and item["multilabel"].shape == (8,)
        expected_s1 = _naive_seed_normalisation(_tif(_dfc_path(dfc, "s1", number)), s1=True)
        expected_s2 = _naive_seed_normalisation(_tif(_dfc_path(dfc, "s2", number)), s1=False)
        np.testing.assert_allclose(item["s1"].numpy(), expected_s1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(item["s2"].numpy(), expected_s2, rtol=1e-5, atol=1e-6)
        label, multilabel = _naive_labels(_tif(_dfc_path(dfc, "dfc", number))[0])
        assert item["label"] == label and item["multilabel"].tolist() == multilabel
    assert len(datasets.DFC2020Dataset(dfc, "test")) == 3


def test_dfc_without_normalisation_returns_db_and_raw_values(dfc):
    item = datasets.DFC2020Dataset(dfc, normalize="none")[0]
    number = item["id"]
    np.testing.assert_array_equal(item["s1"].numpy(), np.nan_to_num(_tif(_dfc_path(dfc, "s1", number)), nan=0.0))
    np.testing.assert_array_equal(item["s2"].numpy(), _tif(_dfc_path(dfc, "s2", number)).astype(np.float32))


def test_dfc_evaluation_crop_is_the_centre_of_the_whole_patch(dfc):
    whole = datasets.DFC2020Dataset(dfc, normalize="none", return_label_map=True)
    crop = datasets.DFC2020Dataset(dfc, crop=20, normalize="none", return_label_map=True)
    for i in range(len(whole)):
        full, item = whole[i], crop[i]
        for key in ("s1", "s2"):
            assert torch.equal(item[key], full[key][:, 6:26, 6:26])
        assert torch.equal(item["label_map"], full["label_map"][6:26, 6:26])
        label, multilabel = _naive_labels(_tif(_dfc_path(dfc, "dfc", item["id"]))[0, 6:26, 6:26])
        assert item["label"] == label and item["multilabel"].tolist() == multilabel


def test_dfc_crop_is_seed_normalised_on_its_own(dfc):
    ds = datasets.DFC2020Dataset(dfc, crop=20)
    for i in range(len(ds)):
        item = ds[i]
        for modality, s1 in (("s1", True), ("s2", False)):
            window = _tif(_dfc_path(dfc, modality, item["id"]))[:, 6:26, 6:26]
            expected = _naive_seed_normalisation(window, s1=s1)
            np.testing.assert_allclose(item[modality].numpy(), expected, rtol=1e-5, atol=1e-6)
            # Each channel's own maximum m becomes m / (m + 1e-5), within 1e-4 of 1 for m >= 0.1.
            maxima = item[modality].amax(dim=(1, 2))
            assert ((maxima <= 1) & (maxima > 1 - 1e-4)).all()
    # Whole-patch maxima would leave the crop's maxima below 1 wherever the crop misses the patch maximum.
    whole = torch.from_numpy(_naive_seed_normalisation(_tif(_dfc_path(dfc, "s2", ds[0]["id"])), s1=False))
    assert (whole[:, 6:26, 6:26].amax(dim=(1, 2)) < 1 - 1e-3).any()


def test_dfc_reads_only_the_window_from_disk(dfc, monkeypatch):
    shapes = []
    real_read = rasterio.io.DatasetReader.read

    def read(self, *args, **kwargs):
        array = real_read(self, *args, **kwargs)
        shapes.append(array.shape)
        return array

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", read)
    datasets.DFC2020Dataset(dfc, crop=12, train=True)[0]
    assert shapes == [(2, 12, 12), (13, 12, 12), (12, 12)]


def _channel_max_normalisation(x: np.ndarray) -> np.ndarray:
    return x / (x.max(axis=(1, 2), keepdims=True) + 1e-5)


def test_dfc_crop_is_clipped_then_normalised_by_its_own_maxima(dfc):
    item = datasets.DFC2020Dataset(dfc, crop=20)[0]
    for modality, s1 in (("s1", True), ("s2", False)):
        window = _tif(_dfc_path(dfc, modality, item["id"]))[:, 6:26, 6:26].astype(np.float64)
        clipped = np.clip(np.nan_to_num(window, nan=0.0), -25, 0) + 25 if s1 else np.clip(window, 0, 10000)
        np.testing.assert_allclose(item[modality].numpy(), _channel_max_normalisation(clipped), rtol=1e-5, atol=1e-6)


def test_seed_normalize_hand_computed():
    image = torch.tensor(
        [[[0.0, 5.0], [10.0, 20.0]], [[2.0, 2.0], [2.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64
    )
    expected = torch.tensor(
        [[[0.0, 5 / 20.00001], [10 / 20.00001, 20 / 20.00001]], [[2 / 2.00001] * 2] * 2, [[0.0, 0.0], [0.0, 0.0]]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(datasets.seed_normalize(image), expected, rtol=1e-12, atol=0)
    # A batch: every image by its own maxima (the second image's channel 0 peaks at 60).
    batch = datasets.seed_normalize(torch.stack([image, 3 * image]))
    torch.testing.assert_close(batch[0], expected, rtol=1e-12, atol=0)
    assert batch[1, 0, 0, 1].item() == pytest.approx(15 / 60.00001, rel=1e-12)
    with pytest.raises(ValueError, match=r"\(C, H, W\).*got shape \(2, 2\)"):
        datasets.seed_normalize(image[0])
    with pytest.raises(TypeError, match="floating-point"):
        datasets.seed_normalize(image.long())


def test_ssl4eo_normalize_hand_computed():
    # VV: the mean and one std above it; VH: the mean and two stds below it
    s1 = torch.tensor([[[-12.59, -12.59 + 5.26]], [[-20.26, -20.26 - 2 * 5.91]]], dtype=torch.float64)
    s2 = torch.tensor([[[10000.0, 2500.0]], [[0.0, 12000.0]], [[float("nan"), float("inf")]]], dtype=torch.float64)
    out1, out2 = datasets.ssl4eo_normalize(s1, s2)
    torch.testing.assert_close(out1, torch.tensor([[[0.0, 1.0]], [[0.0, -2.0]]], dtype=torch.float64))
    torch.testing.assert_close(out2, torch.tensor([[[1.0, 0.25]], [[0.0, 1.2]], [[0.0, 0.0]]], dtype=torch.float64))
    batch1, _ = datasets.ssl4eo_normalize(torch.stack([s1, s1.masked_fill(s1 > -13, float("nan"))]), s2[None])
    # NaN -> 0 after standardising: the band mean
    torch.testing.assert_close(batch1[1], torch.tensor([[[0.0, 0.0]], [[0.0, -2.0]]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"S1 of shape \(2, H, W\).*got \(3, 1, 2\)"):
        datasets.ssl4eo_normalize(s2[:1].expand(3, 1, 2), s2)


def test_dfc_items_with_ssl4eo_normalisation_are_standardised_db_and_reflectance(dfc):
    number = datasets.DFC2020Dataset(dfc).patch_ids[0]
    s1 = _tif(_dfc_path(dfc, "s1", number))
    s1[0, 10, 10:12] = [np.nan, -40.0]  # -40 dB stays -40 dB: no clipping
    _write_tif(_dfc_path(dfc, "s1", number), s1)
    ds = datasets.DFC2020Dataset(dfc, crop=20, normalize="ssl4eo")
    item = ds[0]
    window = s1[:, 6:26, 6:26].astype(np.float64)
    expected = np.nan_to_num(np.stack([(window[0] + 12.59) / 5.26, (window[1] + 20.26) / 5.91]), nan=0.0)
    np.testing.assert_allclose(item["s1"].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert item["s1"][0, 4, 4] == 0 and item["s1"][0, 4, 5].item() == pytest.approx((-40 + 12.59) / 5.26, rel=1e-6)
    assert ds.nan_pixels == np.isnan(window).sum() >= 1
    s2 = _tif(_dfc_path(dfc, "s2", number))[:, 6:26, 6:26].astype(np.float64)
    np.testing.assert_allclose(item["s2"].numpy(), s2 / 10000, rtol=1e-6)
    with pytest.raises(ValueError, match=r"normalize must be one of \('seed', 'ssl4eo', 'stats', 'none'\)"):
        datasets.DFC2020Dataset(dfc, normalize="imagenet")


def _old_recipe(s1: np.ndarray, s2: np.ndarray, recipe: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The data sets' recipes as PatchDataset._s1 / _s2 wrote them before normalize(), float32 step by step."""
    x1, x2 = s1.astype(np.float32), s2.astype(np.float32)
    bad1, bad2 = ~np.isfinite(x1), ~np.isfinite(x2)
    if recipe == "none":
        x1[bad1], x2[bad2] = 0, 0
        return torch.from_numpy(x1), torch.from_numpy(x2)
    if recipe == "ssl4eo":
        return datasets.ssl4eo_normalize(torch.from_numpy(x1), torch.from_numpy(x2))
    nan1 = np.isnan(x1)
    x1 = np.clip(x1, np.float32(-25), np.float32(0)) + np.float32(25)
    x1[nan1] = 25
    x2[np.isnan(x2)] = 0
    x2 = np.clip(x2, np.float32(0), np.float32(10000))
    return tuple(torch.from_numpy(x) / (torch.from_numpy(x.max(axis=(1, 2))).view(-1, 1, 1) + 1e-5) for x in (x1, x2))


def test_normalize_is_the_data_sets_old_recipes_bit_for_bit_and_counts_nonfinite_values():
    rng = np.random.default_rng(0)
    for trial in range(40):
        h, w = rng.integers(1, 9, 2)
        s1 = rng.normal(-12, 8, (2, h, w)).astype(np.float32)
        s2 = rng.integers(0, 13000, (13, h, w))  # some above 10000: clouds
        s2 = s2.astype(np.uint16) if trial % 2 else (s2 - 500).astype(np.float32)
        expected = np.zeros((2, 3), np.int64)
        for m, x in enumerate([s1] + ([s2] if trial % 2 == 0 else [])):
            draw = rng.random(x.shape)
            x[draw < 0.05], x[(draw > 0.05) & (draw < 0.08)], x[draw > 0.97] = np.nan, np.inf, -np.inf
            expected[m] = np.isnan(x).sum(), np.isposinf(x).sum(), np.isneginf(x).sum()
        for recipe in ("seed", "ssl4eo", "none"):
            out1, out2, counts = datasets.normalize(s1, s2, recipe)
            old1, old2 = _old_recipe(s1, s2, recipe)
            assert out1.dtype == out2.dtype == torch.float32 and torch.equal(out1, old1) and torch.equal(out2, old2)
            assert counts.tolist() == expected.tolist()


def test_stats_standardises_by_the_training_splits_band_statistics(dfc):
    train = datasets.DFC2020Dataset(dfc, normalize="stats")
    whole = [(_tif(_dfc_path(dfc, "s1", n)).astype(np.float64), _tif(_dfc_path(dfc, "s2", n)).astype(np.float64))
             for n in train.patch_ids]
    for m, key in enumerate(("s1", "s2")):
        pixels = np.concatenate([pair[m].reshape(pair[m].shape[0], -1) for pair in whole], axis=1)
        pixels = np.where(np.isfinite(pixels), pixels, np.nan)
        np.testing.assert_allclose(train.norm_stats[f"{key}_mean"], np.nanmean(pixels, 1), rtol=1e-9)
        np.testing.assert_allclose(train.norm_stats[f"{key}_std"], np.nanstd(pixels, 1), rtol=1e-9)
    test = datasets.DFC2020Dataset(dfc, "test", crop=16, normalize="stats", norm_stats=train.norm_stats)
    item, raw = test[0], _tif(_dfc_path(dfc, "s2", test[0]["id"], "test"))[:, 8:24, 8:24]
    mean, std = (np.array(train.norm_stats[k])[:, None, None] for k in ("s2_mean", "s2_std"))
    np.testing.assert_allclose(item["s2"].numpy(), (raw - mean) / std, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="s2_mean hold 12 values for 13 S2 bands"):
        datasets.DFC2020Dataset(dfc, normalize="stats", norm_stats={**train.norm_stats, "s2_mean": [0.0] * 12})


def test_stats_keeps_the_spectra_that_seed_erases():
    """Three classes of uniform fields told apart by their mean spectrum only (issue: 3 crop classes)."""
    spectra = np.array([[800, 900, 3000], [1600, 1800, 3000], [400, 450, 1500]], np.float32)  # x2 and /2 of class 0
    fields = [(np.full((2, 8, 8), -10, np.float32), np.broadcast_to(sp[:, None, None], (3, 8, 8)).copy())
              for sp in spectra]
    stats = datasets.band_statistics(fields)
    seed = [datasets.normalize(s1, s2, "seed")[1][:, 0, 0] for s1, s2 in fields]
    standardised = [datasets.normalize(s1, s2, "stats", stats)[1][:, 0, 0] for s1, s2 in fields]
    assert all(torch.allclose(seed[0], x, atol=1e-6) for x in seed)  # every band ~1: the classes look alike
    assert min((a - b).abs().max() for i, a in enumerate(standardised) for b in standardised[i + 1:]) > 0.5


def _window_offset(full: torch.Tensor, crop: torch.Tensor) -> tuple[int, int]:
    size = crop.shape[-1]
    for top in range(full.shape[-2] - size + 1):
        for left in range(full.shape[-1] - size + 1):
            if torch.equal(full[:, top : top + size, left : left + size], crop):
                return top, left
    raise AssertionError("crop not found in the patch")


def test_dfc_training_crops_share_one_random_window(dfc):
    whole = datasets.DFC2020Dataset(dfc, normalize="none", return_label_map=True)
    ds = datasets.DFC2020Dataset(dfc, crop=16, train=True, normalize="none", return_label_map=True, seed=3)
    windows = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            full, item = whole[i], ds[i]
            top, left = _window_offset(full["s1"], item["s1"])
            windows.add((top, left))
            torch.testing.assert_close(item["s2"], full["s2"][:, top : top + 16, left : left + 16])
            dfc_window = _tif(_dfc_path(dfc, "dfc", item["id"]))[0, top : top + 16, left : left + 16]
            label, multilabel = _naive_labels(dfc_window)
            assert item["label"] == label and item["multilabel"].tolist() == multilabel
            assert torch.equal(item["label_map"], full["label_map"][top : top + 16, left : left + 16])
    assert len(windows) > 10
    ds.set_epoch(1)
    again = datasets.DFC2020Dataset(dfc, crop=16, train=True, normalize="none", seed=3)
    again.set_epoch(1)
    assert torch.equal(ds[2]["s1"], again[2]["s1"])


@pytest.mark.slow
def test_dfc_evaluation_windows_with_offset_seed_are_fixed_per_patch(dfc):
    whole = datasets.DFC2020Dataset(dfc, normalize="none", return_label_map=True)

    def windows(dataset) -> dict[int, tuple[int, int]]:
        found = {}
        for i in range(len(dataset)):
            item = dataset[i]
            full = whole[whole.patch_ids.index(item["id"])]
            top, left = _window_offset(full["s1"], item["s1"])
            assert 0 <= top <= 15 and 0 <= left <= 15  # the original's randint(0, 32 - 16): never 16
            assert torch.equal(item["s2"], full["s2"][:, top : top + 16, left : left + 16])
            assert torch.equal(item["label_map"], full["label_map"][top : top + 16, left : left + 16])
            label, multilabel = _naive_labels(_tif(_dfc_path(dfc, "dfc", item["id"]))[0, top : top + 16, left : left + 16])
            assert item["label"] == label and item["multilabel"].tolist() == multilabel
            found[item["id"]] = (top, left)
        return found

    def dataset(offset_seed: int) -> datasets.DFC2020Dataset:
        return datasets.DFC2020Dataset(dfc, crop=16, normalize="none", return_label_map=True, offset_seed=offset_seed)

    ds = dataset(7)
    first = windows(ds)
    assert len(set(first.values())) >= len(ds) - 1 and (8, 8) not in first.values()  # per patch, not the centre
    for epoch in (1, 5):
        ds.set_epoch(epoch)
        assert windows(ds) == first
    assert windows(dataset(7)) == first
    assert windows(dataset(8)) != first
    # Keyed by the patch number, not by the index: dropping a patch leaves the others' windows.
    _dfc_path(dfc, "s2", ds.patch_ids[0]).unlink()
    fewer = dataset(7)
    assert len(fewer) == len(ds) - 1 and windows(fewer) == {n: w for n, w in first.items() if n != ds.patch_ids[0]}
    loader = DataLoader(fewer, batch_size=2, num_workers=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = {}
    for batch in loader:
        for number, s1 in zip(batch["id"].tolist(), batch["s1"]):
            full = whole[whole.patch_ids.index(number)]
            seen[number] = _window_offset(full["s1"], s1)
    assert seen == windows(fewer)
    seed_normalised = datasets.DFC2020Dataset(dfc, crop=16, offset_seed=7)[0]
    top, left = first[seed_normalised["id"]]
    raw = _tif(_dfc_path(dfc, "s1", seed_normalised["id"]))[:, top : top + 16, left : left + 16]
    np.testing.assert_allclose(seed_normalised["s1"].numpy(), _naive_seed_normalisation(raw, s1=True), rtol=1e-5, atol=1e-6)


def test_offset_seed_is_for_evaluation_only(dfc):
    with pytest.raises(ValueError, match="offset_seed.*train=False"):
        datasets.DFC2020Dataset(dfc, crop=16, train=True, offset_seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        datasets.DFC2020Dataset(dfc, crop=16, offset_seed=-1)


def test_dfc_label_rules_on_hand_made_maps(dfc):
    ds = datasets.DFC2020Dataset(dfc)
    first, second = ds.patch_ids[:2]
    # 1024 px: Forest 600, Water 260, Savanna (ignored) 90, Urban 74 (7.2 %: not a multi-label).
    labels = np.repeat(np.array([1, 10, 3, 7], np.uint8), [600, 260, 90, 74]).reshape(1, 32, 32)
    _write_tif(_dfc_path(dfc, "dfc", first), labels)
    # Ignore wins: 0 (300) + 255 (200) + Snow/Ice (100) against Croplands 424.
    labels = np.repeat(np.array([0, 255, 8, 6], np.uint8), [300, 200, 100, 424]).reshape(1, 32, 32)
    _write_tif(_dfc_path(dfc, "dfc", second), labels)
    ds = datasets.DFC2020Dataset(dfc, return_label_map=True)
    assert ds[0]["label"] == 0 and ds[0]["multilabel"].tolist() == [1, 0, 0, 0, 0, 0, 0, 1]
    assert set(ds[0]["label_map"].unique().tolist()) == {0, 7, 255, 5}
    assert ds[1]["label"] == 255 and ds[1]["multilabel"].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    assert ds.patch_labels()[:2].tolist() == [0, 255]


def test_label_report_counts_ignored_patches_and_pixels_by_code(dfc):
    # A whole class of a relabelled data set in code 3 (Savanna) is ignored: the report says so.
    ds = datasets.DFC2020Dataset(dfc)
    first, second = ds.patch_ids[:2]
    _write_tif(_dfc_path(dfc, "dfc", first), np.full((1, 32, 32), 3, np.uint8))
    _write_tif(_dfc_path(dfc, "dfc", second), np.repeat(np.array([8, 0, 1], np.uint8), [500, 300, 224]).reshape(1, 32, 32))
    raw = [_tif(_dfc_path(dfc, "dfc", n))[0] for n in ds.patch_ids]
    expected_pixels = {str(code): int(sum((r == code).sum() for r in raw)) for code in (0, 3, 8, 255)}
    report = datasets.DFC2020Dataset(dfc).label_report()
    assert report["patches"] == 6
    assert report["ignored_label_patches"] == sum(_naive_labels(r)[0] == 255 for r in raw) >= 2
    assert report["ignored_pixels_by_code"] == {k: v for k, v in expected_pixels.items() if v}


def test_label_report_finds_undocumented_codes_in_any_patch(dfc):
    ds = datasets.DFC2020Dataset(dfc, "test")
    labels = _tif(_dfc_path(dfc, "dfc", ds.patch_ids[-1], "test"))
    labels[0, -1, -1] = 42
    _write_tif(_dfc_path(dfc, "dfc", ds.patch_ids[-1], "test"), labels)
    with pytest.raises(datasets.DataFileError, match=r"label codes outside DFC codes 1-10.*42: 1"):
        datasets.DFC2020Dataset(dfc, "test", crop=8).label_report()


def test_dfc_patch_labels_are_the_whole_patch_majorities(dfc):
    ds = datasets.DFC2020Dataset(dfc, "test", crop=8, train=True)
    whole = datasets.DFC2020Dataset(dfc, "test")
    assert ds.patch_labels().tolist() == [whole[i]["label"] for i in range(len(whole))]
    assert ds.patch_labels().dtype == torch.int64


def test_dfc_label_sources_read_only_their_files(dfc):
    number = datasets.DFC2020Dataset(dfc).patch_ids[0]
    lc = _tif(_dfc_path(dfc, "lc", number))
    lc[0] = np.repeat(np.array([12, 14, 17, 8], np.uint8), [500, 150, 300, 74]).reshape(32, 32)
    _write_tif(_dfc_path(dfc, "lc", number), lc)
    for file in (dfc / "ROIs0000_validation" / "dfc_validation").iterdir():
        file.unlink()
    ds = datasets.DFC2020Dataset(dfc, label_source="lc", return_label_map=True)
    # IGBP 12 and 14: Croplands (650 px), 17: Water (300), 8: Savanna -> ignore.
    assert ds[0]["label"] == 4 and ds[0]["multilabel"].tolist() == [0, 0, 0, 0, 1, 0, 0, 1]
    for i in range(1, len(ds)):
        igbp = _tif(_dfc_path(dfc, "lc", ds.patch_ids[i]))[0]
        expected = [DFC_TO_CLASS.get(IGBP_TO_DFC[v], 255) for v in igbp.ravel()]
        assert ds[i]["label_map"].ravel().tolist() == expected
    for file in (dfc / "ROIs0000_validation" / "lc_validation").iterdir():
        file.unlink()
    with pytest.raises(ValueError, match="no complete patch"):
        datasets.DFC2020Dataset(dfc, label_source="lc")


def test_dfc_default_labels_never_open_lc_files(dfc):
    for file in (dfc / "ROIs0000_test" / "lc_0").iterdir():
        file.unlink()
    ds = datasets.DFC2020Dataset(dfc, "test", crop=16, train=True)
    assert len(ds) == 3 and all(ds[i]["s2"].shape == (13, 16, 16) for i in range(3))


def test_dfc_pairs_by_patch_number_and_counts_incomplete_patches(dfc, caplog):
    ds = datasets.DFC2020Dataset(dfc)
    missing = ds.patch_ids[2]
    _dfc_path(dfc, "s2", missing).unlink()
    (dfc / "ROIs0000_validation" / "s1_validation" / "notes.tif").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="datasets"):
        ds = datasets.DFC2020Dataset(dfc)
    assert missing not in ds.patch_ids and len(ds) == 5
    assert ds.skipped == {".tif files in s1_validation not named *_p<N>.tif": 1, "patch without a file in s2_validation": 1}
    (record,) = [r for r in caplog.records if r.name == "datasets"]
    assert record.levelno == logging.WARNING and "5 of 6" in record.message
    with pytest.raises(FileNotFoundError, match=rf"patch {missing} has no file in s2_validation"):
        datasets.DFC2020Dataset(dfc, strict=True)


def test_dfc_nan_in_s1_is_replaced_counted_and_logged_once(dfc, caplog):
    ds = datasets.DFC2020Dataset(dfc)
    counts = {}
    for number in ds.patch_ids[:2]:
        s1 = _tif(_dfc_path(dfc, "s1", number))
        s1[0, :3, :5] = np.nan
        _write_tif(_dfc_path(dfc, "s1", number), s1)
    for number in ds.patch_ids:
        counts[number] = int(np.isnan(_tif(_dfc_path(dfc, "s1", number))).sum())
    ds = datasets.DFC2020Dataset(dfc)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        items = [ds[i] for i in range(len(ds))]
    assert all(torch.isfinite(item["s1"]).all() for item in items)
    assert ds.nan_pixels == sum(counts.values()) >= 30
    (record,) = [r for r in caplog.records if r.name == "datasets"]
    assert "NaN" in record.message and "0 dB" in record.message


def test_dfc_corrupt_or_misshaped_files_name_the_file(dfc):
    ds = datasets.DFC2020Dataset(dfc, "test")
    corrupt = _dfc_path(dfc, "s2", ds.patch_ids[0], "test")
    corrupt.write_bytes(b"II*\x00garbage")
    with pytest.raises(datasets.DataFileError, match=f"cannot read {corrupt}"):
        ds[0]
    bands = _dfc_path(dfc, "s2", ds.patch_ids[1], "test")
    _write_tif(bands, _tif(bands)[:12])
    with pytest.raises(ValueError, match=f"{bands}: expected 13 bands, found 12"):
        ds[1]
    size = _dfc_path(dfc, "dfc", ds.patch_ids[2], "test")
    _write_tif(size, _tif(size)[:, :30])
    with pytest.raises(ValueError, match=f"{size}: expected 32 x 32 px.*found 30 x 32"):
        ds[2]
    with pytest.raises(datasets.CropError, match="a crop of 40 px does not fit the 32 x 32 px patches of"):
        datasets.DFC2020Dataset(dfc, "validation", crop=40)  # found when the data set is built, before any item


def test_dfc_bad_roots_and_empty_splits(tmp_path, dfc):
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*ROIs0000_test/.*s1_0/ROIs0000_test_s1_0_p<N>.tif"):
        datasets.DFC2020Dataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"(?s)s1_validation.*expected.*ROIs0000_validation_dfc_0_p<N>.tif"):
        datasets.DFC2020Dataset(tmp_path)
    for file in (dfc / "ROIs0000_test" / "s1_0").iterdir():
        file.unlink()
    with pytest.raises(ValueError, match="no complete patch"):
        datasets.DFC2020Dataset(dfc, "test")
    with pytest.raises(ValueError, match="split"):
        datasets.DFC2020Dataset(dfc, "train")


def test_dfc_crops_do_not_depend_on_workers_and_change_with_the_epoch(dfc):
    ds = datasets.DFC2020Dataset(dfc, crop=12, train=True, seed=5)
    expected = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        expected[epoch] = torch.stack([ds[i]["s1"] for i in range(len(ds))])
    assert not torch.equal(expected[0], expected[1])
    loader = DataLoader(ds, batch_size=2, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        torch.testing.assert_close(torch.cat([batch["s1"] for batch in loader]), expected[epoch], rtol=0, atol=0)


def test_nan_count_sums_over_worker_processes(dfc):
    ds = datasets.DFC2020Dataset(dfc)
    for number in ds.patch_ids[-2:]:
        s1 = _tif(_dfc_path(dfc, "s1", number))
        s1[1, 4:6, :7] = np.nan
        _write_tif(_dfc_path(dfc, "s1", number), s1)
    serial = sum(int(np.isnan(_tif(_dfc_path(dfc, "s1", n))).sum()) for n in ds.patch_ids)
    assert serial > 0
    for _ in DataLoader(ds, batch_size=1, num_workers=2):
        pass
    assert ds.nan_pixels == serial


# ---------------------------------------------------------------------------------------------
# SEN12MS


@pytest.fixture
def sen12ms(tmp_path) -> Path:
    return synthetic_data.write_sen12ms(tmp_path / "sen12ms", n_per_season=3, seed=0, size=16, scenes_per_season=2)


def test_sen12ms_items_patch_ids_and_lc_labels(sen12ms):
    ds = datasets.SEN12MSDataset(sen12ms, return_label_map=True)
    assert len(ds) == 12 and len(set(ds.patch_ids)) == 12
    for i in range(len(ds)):
        item = ds[i]
        season, scene, patch = item["id"].rsplit("_", 2)
        lc = sen12ms / season / f"lc_{scene}" / f"{season}_lc_{scene}_{patch}.tif"
        igbp = _tif(lc)[0]
        expected = [DFC_TO_CLASS.get(IGBP_TO_DFC[v], 255) for v in igbp.ravel()]
        assert item["label_map"].ravel().tolist() == expected
        assert item["s1"].shape == (2, 16, 16) and item["s2"].shape == (13, 16, 16)
        s1 = _tif(sen12ms / season / f"s1_{scene}" / f"{season}_s1_{scene}_{patch}.tif")
        np.testing.assert_allclose(item["s1"].numpy(), _naive_seed_normalisation(s1, s1=True), rtol=1e-5, atol=1e-6)
    summer = datasets.SEN12MSDataset(sen12ms, seasons=("summer",), crop=8, train=True)
    assert len(summer) == 3 and all(i.startswith("ROIs1868_summer_") for i in summer.patch_ids)
    assert summer[0]["s2"].shape == (13, 8, 8)


def test_sen12ms_skips_unreadable_files(sen12ms, caplog):
    ds = datasets.SEN12MSDataset(sen12ms, seasons=("fall",))
    season, scene, patch = ds.patch_ids[1].rsplit("_", 2)
    (sen12ms / season / f"s2_{scene}" / f"{season}_s2_{scene}_{patch}.tif").write_bytes(b"broken")
    with caplog.at_level(logging.WARNING, logger="datasets"):
        ids = [ds[i]["id"] for i in range(len(ds))] + [ds[1]["id"]]
    assert ids == [ds.patch_ids[0], ds.patch_ids[2], ds.patch_ids[2], ds.patch_ids[2]]
    assert ds.unreadable == 2
    (record,) = [r for r in caplog.records if "skipping" in r.message]
    assert ds.patch_ids[1] in record.message and "cannot read" in record.message
    # A broken first patch: the whole-patch size comes from the next S1 file that opens.
    season, scene, patch = ds.patch_ids[0].rsplit("_", 2)
    (sen12ms / season / f"s1_{scene}" / f"{season}_s1_{scene}_{patch}.tif").write_bytes(b"broken")
    ds = datasets.SEN12MSDataset(sen12ms, seasons=("fall",))
    assert ds[0]["id"] == ds.patch_ids[2] and ds[0]["s1"].shape == (2, 16, 16)


def test_sen12ms_bad_roots_and_seasons(tmp_path, sen12ms):
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*ROIs1158_spring/\{s1,s2,lc\}_<scene>"):
        datasets.SEN12MSDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="seasons"):
        datasets.SEN12MSDataset(sen12ms, seasons=("monsoon",))
    for folder in (sen12ms / "ROIs2017_winter").iterdir():
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    with pytest.raises(FileNotFoundError, match="no scene folders in .*ROIs2017_winter"):
        datasets.SEN12MSDataset(sen12ms)
    assert len(datasets.SEN12MSDataset(sen12ms, seasons=("spring", "fall"))) == 6


def test_sen12ms_evaluation_windows_with_offset_seed(sen12ms):
    whole = datasets.SEN12MSDataset(sen12ms, normalize="none")
    ds = datasets.SEN12MSDataset(sen12ms, crop=8, normalize="none", offset_seed=3)
    offsets = [_window_offset(whole[i]["s2"], ds[i]["s2"]) for i in range(len(ds))]
    ds.set_epoch(2)
    again = datasets.SEN12MSDataset(sen12ms, crop=8, normalize="none", offset_seed=3)
    for dataset in (ds, again):
        assert [_window_offset(whole[i]["s2"], dataset[i]["s2"]) for i in range(len(ds))] == offsets
    assert len(set(offsets)) > 6 and all(0 <= top <= 8 and 0 <= left <= 8 for top, left in offsets)


# ---------------------------------------------------------------------------------------------
# Data faults


@pytest.mark.parametrize(
    "source, bad_codes, dtype, found",
    [
        ("dfc", {300: 5}, np.uint16, "300: 5"),
        ("dfc", {17: 2, 42: 3}, np.uint8, "17: 2, 42: 3"),
        ("dfc", {-1: 4}, np.int16, "-1: 4"),
        ("lc", {18: 2, 200: 1}, np.uint8, "18: 2, 200: 1"),
        ("dfc", {}, np.float32, "dtype float32"),
    ],
)
def test_label_maps_with_undocumented_codes_or_dtype_name_the_file(dfc, source, bad_codes, dtype, found):
    number = datasets.DFC2020Dataset(dfc).patch_ids[1]
    path = _dfc_path(dfc, source, number)
    raw = _tif(path)
    band = raw[0].astype(dtype).ravel()
    start = 0
    for code, count in bad_codes.items():
        band[start : start + count] = code
        start += count
    raw = raw.astype(dtype)
    raw[0] = band.reshape(raw.shape[1:])
    _write_tif(path, raw)
    ds = datasets.DFC2020Dataset(dfc, label_source=source)
    with pytest.raises(datasets.DataFileError, match=rf"{path}: .*{found}"):
        ds[1]
    with pytest.raises(datasets.DataFileError, match=rf"{path}: .*{found}"):
        ds.patch_labels()
    assert ds[0]["s1"].shape == (2, 32, 32)


def test_label_maps_accept_every_documented_code(dfc):
    number = datasets.DFC2020Dataset(dfc).patch_ids[0]
    dfc_codes = np.repeat(np.array([0, 10, 255, 1], np.uint16), [300, 400, 200, 124]).reshape(1, 32, 32)
    _write_tif(_dfc_path(dfc, "dfc", number), dfc_codes)
    item = datasets.DFC2020Dataset(dfc, return_label_map=True)[0]
    # Ignore 500 (codes 0 and 255) wins over Water 400; Forest 124 is 12 %.
    assert item["label"] == 255 and item["multilabel"].tolist() == [1, 0, 0, 0, 0, 0, 0, 1]
    assert Counter(item["label_map"].ravel().tolist()) == {255: 500, 7: 400, 0: 124}
    lc = _tif(_dfc_path(dfc, "lc", number))
    lc[0] = np.repeat(np.array([0, 17, 255, 1], np.uint8), [300, 400, 200, 124]).reshape(32, 32)
    _write_tif(_dfc_path(dfc, "lc", number), lc)
    item = datasets.DFC2020Dataset(dfc, label_source="lc", return_label_map=True)[0]
    assert Counter(item["label_map"].ravel().tolist()) == {255: 500, 7: 400, 0: 124}


def test_sen12ms_undocumented_lc_codes_are_skipped_counted_and_named(sen12ms, caplog):
    ds = datasets.SEN12MSDataset(sen12ms, seasons=("spring",))
    season, scene, patch = ds.patch_ids[0].rsplit("_", 2)
    path = sen12ms / season / f"lc_{scene}" / f"{season}_lc_{scene}_{patch}.tif"
    lc = _tif(path)
    lc[0, 0, :3] = 99
    _write_tif(path, lc)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        assert ds[0]["id"] == ds.patch_ids[1]
    assert ds.unreadable == 1
    (record,) = [r for r in caplog.records if "skipping" in r.message]
    assert str(path) in record.message and "99: 3" in record.message


def test_dfc_infinities_are_replaced_and_counted_like_nan(dfc, caplog):
    first, second = datasets.DFC2020Dataset(dfc).patch_ids[:2]
    s1 = _tif(_dfc_path(dfc, "s1", first))
    s1[0, 0, :3] = np.nan
    s1[0, 1, :2] = np.inf
    s1[1, 2, :1] = -np.inf
    _write_tif(_dfc_path(dfc, "s1", first), s1)
    s2 = _tif(_dfc_path(dfc, "s2", second)).astype(np.float32)
    s2[4, 5, :2] = np.inf
    _write_tif(_dfc_path(dfc, "s2", second), s2)
    nan = sum(int(np.isnan(_tif(_dfc_path(dfc, m, n))).sum()) for n in (first, second) for m in ("s1", "s2"))
    inf = sum(int(np.isinf(_tif(_dfc_path(dfc, m, n))).sum()) for n in (first, second) for m in ("s1", "s2"))
    assert inf == 5 and nan >= 3
    ds = datasets.DFC2020Dataset(dfc, normalize="none")
    with caplog.at_level(logging.WARNING, logger="datasets"):
        items = [ds[0], ds[1]]
    assert ds.nonfinite_pixels == nan + inf and ds.nan_pixels == nan
    assert items[0]["s1"][0, 1, :2].tolist() == [0, 0] and items[0]["s1"][1, 2, 0] == 0
    assert items[1]["s2"][4, 5, :2].tolist() == [0, 0]
    (record,) = [r for r in caplog.records if r.name == "datasets"]
    assert "non-finite" in record.message and str(_dfc_path(dfc, "s1", first)) in record.message
    seeded = datasets.DFC2020Dataset(dfc)
    assert all(torch.isfinite(seeded[i][m]).all() for i in (0, 1) for m in ("s1", "s2"))


def test_meterml_infinities_are_replaced_and_counted(meterml):
    folder = _folder(meterml, "site_000000")
    s1 = np.load(folder / "sentinel-1.npy").astype(np.float32)
    s1[0, 0, 0], s1[0, 1, 1] = np.inf, -np.inf
    np.save(folder / "sentinel-1.npy", s1)
    ds = datasets.MeterMLDataset(meterml)
    item = ds[0]
    assert ds.nonfinite_pixels == 2 and ds.nan_pixels == 0
    assert item["s1"][0, 0, 0] == 0 and item["s1"][1, 0, 1] == 0 and torch.isfinite(item["s1"]).all()


def test_whole_patches_of_another_size_name_the_file(dfc):
    number = datasets.DFC2020Dataset(dfc).patch_ids[2]
    for modality in ("s1", "s2", "dfc"):
        path = _dfc_path(dfc, modality, number)
        _write_tif(path, _tif(path)[:, :30, :30])
    ds = datasets.DFC2020Dataset(dfc)
    with pytest.raises(datasets.DataFileError, match=rf"{_dfc_path(dfc, 's1', number)}: patch of 30 x 30 px.*\(32, 32\)"):
        ds[2]
    assert ds[3]["s1"].shape == (2, 32, 32)
    assert datasets.DFC2020Dataset(dfc, crop=16)[2]["s1"].shape == (2, 16, 16)


def test_all_zero_images_are_counted_and_logged_once(dfc, meterml, caplog):
    first, second = datasets.DFC2020Dataset(dfc).patch_ids[:2]
    _write_tif(_dfc_path(dfc, "s2", first), np.zeros((13, 32, 32), np.uint16))
    _write_tif(_dfc_path(dfc, "s1", second), np.zeros((2, 32, 32), np.float32))
    _write_tif(_dfc_path(dfc, "s2", second), np.zeros((13, 32, 32), np.uint16))
    ds = datasets.DFC2020Dataset(dfc)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.all_zero_patches == 2
    assert torch.equal(items[0]["s2"], torch.zeros(13, 32, 32)) and torch.equal(items[1]["s2"], torch.zeros(13, 32, 32))
    (record,) = [r for r in caplog.records if "all-zero" in r.message]
    assert str(_dfc_path(dfc, "s2", first)) in record.message
    np.save(_folder(meterml, "site_000001") / "sentinel-2-10m.npy", np.zeros((72, 72, 4), np.uint16))
    meter = datasets.MeterMLDataset(meterml)
    for i in range(len(meter)):
        meter[i]
    assert meter.all_zero_patches == 1


def test_meterml_repeated_and_conflicting_entries_are_reported(meterml, caplog):
    collection = _read_geojson(meterml)
    features = collection["features"]
    first, second = (Path(f["properties"]["Image_Folder"]).name for f in features[:2])
    repeat = json.loads(json.dumps(features[0]))
    repeat["properties"]["Image_Folder"] = f"train_images_1/{first}"  # the same image set, another parent
    conflict = json.loads(json.dumps(features[1]))
    other_type = "Mines" if features[1]["properties"]["Type"] != "Mines" else "Landfills"
    conflict["properties"]["Type"] = other_type
    features += [repeat, json.loads(json.dumps(features[0])), conflict]
    _write_geojson(meterml, collection)
    with caplog.at_level(logging.INFO, logger="datasets"):
        kept = datasets.MeterMLDataset(meterml)  # the original keeps every entry
    assert len(kept) == 15 and kept.ids == [Path(f["properties"]["Image_Folder"]).name for f in features]
    assert kept.skipped == {} and kept.problems == {"repeated Image_Folder": [first], "conflicting Type": [second]}
    assert kept.labels[14] == METERML_CLASSES.index(other_type)  # each entry keeps its own Type
    (record,) = [r for r in caplog.records if r.name == "datasets" and r.levelno == logging.WARNING]
    assert "15 samples" in record.message and "every entry kept" in record.message and first in record.message
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="datasets"):
        ds = datasets.MeterMLDataset(meterml, repeated="first")
    assert len(ds) == 12 and ds.ids == [Path(f["properties"]["Image_Folder"]).name for f in features[:12]]
    assert ds.skipped == {
        "repeated Image_Folder entry (same Type)": 2,
        "Image_Folder listed again with another Type (first kept)": 1,
    }
    assert ds.problems == {"repeated Image_Folder": [first], "conflicting Type": [second]}
    assert ds.labels[1] == METERML_CLASSES.index(features[1]["properties"]["Type"].split("-")[0])
    (record,) = [r for r in caplog.records if r.name == "datasets"]
    assert "12 of 15" in record.message and first in record.message and other_type in record.message


def test_split_overlap_lists_the_shared_ids(meterml):
    train, val = datasets.MeterMLDataset(meterml, "train"), datasets.MeterMLDataset(meterml, "val")
    assert datasets.split_overlap(train, val) == [] and len(train.ids) == 12 and len(val.ids) == 4
    collection = _read_geojson(meterml)
    collection["features"] += _read_geojson(meterml, "val")["features"][2:]
    _write_geojson(meterml, collection)
    leaky = datasets.MeterMLDataset(meterml, "train")
    assert datasets.split_overlap(leaky, val) == val.ids[2:] == datasets.split_overlap(val, leaky)


def test_balanced_indices_reproduce_the_originals_list():
    # The DFC2020 validation split's class counts (majority labels of its 986 patches, from the
    # original's splits/validation_observations_balanced_classes.csv) and the copies it lists.
    counts = [76, 37, 101, 180, 156, 62, 23, 351]
    copies = [4, 9, 3, 2, 2, 5, 15, 1]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])[torch.randperm(986, generator=torch.Generator().manual_seed(0))]
    indices = datasets.balanced_indices(labels)
    assert len(indices) == 2618 and indices.tolist() == sorted(indices.tolist())
    per_item = torch.bincount(indices, minlength=986)
    assert per_item.tolist() == [copies[c] for c in labels.tolist()]
    # another split, one rule: round(N / (2.9 n_c)) halves up, at least 1; unlabelled items once
    small = torch.tensor([0, 0, 0, 0, 0, 0, 1, 255])
    assert torch.bincount(datasets.balanced_indices(small), minlength=8).tolist() == [1] * 6 + [2, 1]
    with pytest.raises(ValueError, match="1-D"):
        datasets.balanced_indices(torch.zeros(2, 2, dtype=torch.int64))


def test_training_crop_offsets_follow_the_originals_range(dfc):
    """np.random.randint(0, size - crop): offsets 0 .. size - crop - 1, and 0 for a whole-patch crop."""
    whole = datasets.DFC2020Dataset(dfc, normalize="none")
    seen = set()
    ds = datasets.DFC2020Dataset(dfc, crop=28, train=True, normalize="none")
    for epoch in range(40):
        ds.set_epoch(epoch)
        item = ds[0]
        seen.add(_window_offset(whole[whole.patch_ids.index(item["id"])]["s1"], item["s1"]))
    assert {top for top, _ in seen} == {0, 1, 2, 3} == {left for _, left in seen}  # 32 - 28 = 4 offsets, never 4
    full = datasets.DFC2020Dataset(dfc, crop=32, train=True, normalize="none")
    assert torch.equal(full[0]["s1"], whole[whole.patch_ids.index(full[0]["id"])]["s1"])


def test_s1_infinities_are_clipped_as_the_original_and_counted_per_file(dfc):
    whole = datasets.DFC2020Dataset(dfc, normalize="none")
    number = whole.patch_ids[0]
    path = _dfc_path(dfc, "s1", number)
    s1 = _tif(path)
    s1[0, 0, :3] = [-np.inf, np.inf, np.nan]
    _write_tif(path, s1)
    ds = datasets.DFC2020Dataset(dfc)
    raw = datasets.DFC2020Dataset(dfc, normalize="seed")
    item = raw[0]
    maximum = item["s1"][0].max()
    # the original's np.clip(x, -25, 0) + 25: -inf -> 0 (the minimum), +inf -> 25; NaN -> 0 dB -> 25
    assert item["s1"][0, 0, 0] == 0 and item["s1"][0, 0, 1] == maximum and item["s1"][0, 0, 2] == maximum
    assert raw.nonfinite_by_file() == {str(path): {"nan": int(np.isnan(_tif(path)).sum()), "+inf": 1, "-inf": 1}}
    assert ds.nonfinite_counts.shape == (len(ds), 2, 3)


def test_meterml_image_dirs_keeps_the_sets_under_those_top_folders_as_written_or_found(meterml, tmp_path):
    """The original's download_all.sh fetched train_images_1 only: image_dirs=["train_images_1"]
    keeps what resolves there (also an Image_Folder written train_images/<id>), in metadata order,
    packed or not; the others are counted."""
    import pack

    there = {p.name for p in (meterml / "train_images_1").iterdir()}
    written = [Path(f["properties"]["Image_Folder"]).name for f in _read_geojson(meterml)["features"]]
    expected = [sample_id for sample_id in written if sample_id in there]
    assert 0 < len(expected) < len(written)
    pack.pack("meterml", meterml, tmp_path / "packed")
    for root in (meterml, tmp_path / "packed"):
        ds = datasets.MeterMLDataset(root, "train", image_dirs=["train_images_1"])
        assert ds.ids == expected
        assert ds.skipped == {"image folder outside train_images_1": len(written) - len(expected)}
    both = datasets.MeterMLDataset(meterml, "train", image_dirs=["train_images_1", "train_images_2"])
    assert len(both) == len(expected) + len(list((meterml / "train_images_2").iterdir()))
