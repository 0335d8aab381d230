"""Packed data sets (``python pack.py DATASET ROOT OUT``): the items of a packed folder equal, tensor for
tensor, those of the data set it was packed from; packing resumes after a kill, counts unreadable
files and refuses folders it cannot use."""
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch

import datasets
import pack
import synthetic_data
from helpers import write_tif as _write_tif
from util import cli

REPO = Path(__file__).resolve().parents[1]


def _equal(a: Any, b: Any) -> bool:
    """Exact equality of item values: tensors (NaN-free after loading) with torch.equal, views
    (tuples) element by element, everything else with ==."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _assert_same_items(original: Any, packed: Any, epochs: tuple[int, ...] = (0,)) -> None:
    """Every item of every epoch, the ids, the skip counts and the fault counters agree."""
    assert len(packed) == len(original) > 0
    assert packed.skipped == original.skipped
    for epoch in epochs:
        original.set_epoch(epoch)
        packed.set_epoch(epoch)
        for i in range(len(original)):
            expected, found = original[i], packed[i]
            assert found.keys() == expected.keys()
            for key in expected:
                assert _equal(found[key], expected[key]), (epoch, i, key)
    assert packed.nonfinite_pixels == original.nonfinite_pixels
    assert packed.nan_pixels == original.nan_pixels
    assert packed.all_zero_patches == original.all_zero_patches


@pytest.fixture(scope="module")
def dfc(tmp_path_factory) -> tuple[Path, Path]:
    """A DFC2020 set (32 px patches) with an all-zero S2 image, and its pack."""
    root = synthetic_data.write_dfc2020(tmp_path_factory.mktemp("dfc") / "dfc", n_validation=6, n_test=3, seed=1, size=32)
    number = datasets.DFC2020Dataset(root).patch_ids[2]
    zero = root / "ROIs0000_validation" / "s2_validation" / f"ROIs0000_validation_s2_0_p{number}.tif"
    _write_tif(zero, np.zeros((13, 32, 32), np.uint16))
    out = root.parent / "packed"
    pack.pack("dfc2020", root, out)
    return root, out


@pytest.fixture
def sen12ms(tmp_path) -> Path:
    return synthetic_data.write_sen12ms(tmp_path / "sen12ms", n_per_season=3, seed=2, size=24, scenes_per_season=2)


@pytest.mark.parametrize(
    "options",
    [
        {"return_label_map": True},
        {"crop": 24, "train": True, "seed": 7},
        {"crop": 20},
        {"crop": 20, "offset_seed": 3, "return_label_map": True},
        {"crop": 16, "train": True, "label_source": "lc", "normalize": "none"},
    ],
)
@pytest.mark.parametrize("split", ["validation", "test"])
def test_dfc2020_packed_items_equal_the_geotiff_items(dfc, split, options):
    root, out = dfc
    original = datasets.DFC2020Dataset(root, split, **options)
    packed = datasets.DFC2020Dataset(out, split, **options)
    assert packed.patch_ids == original.patch_ids
    _assert_same_items(original, packed, epochs=(0, 1) if options.get("train") else (0,))
    assert torch.equal(packed.patch_labels(), original.patch_labels())


def test_dfc2020_pack_layout_dtypes_and_raw_codes(dfc):
    root, out = dfc
    index = json.loads((out / "index.json").read_text())
    assert index["version"] == datasets.packed.VERSION and index["dataset"] == "dfc2020"
    assert index["source_root"] == str(root.resolve())
    validation = index["splits"]["validation"]
    assert {c: (s["shape"], s["dtype"]) for c, s in validation["arrays"].items()} == {
        "s1": ([6, 2, 32, 32], "float32"), "s2": ([6, 13, 32, 32], "uint16"),
        "dfc": ([6, 32, 32], "uint8"), "lc": ([6, 32, 32], "uint8"),
    }
    number = validation["ids"][4]
    for column, folder, band in [("s1", "s1", slice(None)), ("dfc", "dfc", 0), ("lc", "lc", 0)]:
        path = root / "ROIs0000_validation" / f"{folder}_validation" / f"ROIs0000_validation_{folder}_0_p{number}.tif"
        with rasterio.open(path) as src:
            expected = src.read()[band]
        np.testing.assert_array_equal(np.load(out / "validation" / f"{column}.npy")[4], expected)  # NaN == NaN here
    assert index["check"]["validation"] == {
        "rows": 6, "packed": 6, "with unreadable files": 0, "unreadable files by reason": {}, "skipped before packing": {}
    }


def test_dfc2020_packed_sets_pickle_without_their_arrays(dfc):
    _, out = dfc
    packed = datasets.DFC2020Dataset(out, crop=24)
    expected = packed[0]
    clone = pickle.loads(pickle.dumps(packed))
    assert len(pickle.dumps(packed)) < 20_000  # the maps are reopened, not copied, in a spawned worker
    assert all(_equal(clone[0][key], expected[key]) for key in expected)


def test_sen12ms_packed_items_equal_the_geotiff_items(sen12ms, tmp_path):
    out = tmp_path / "packed"
    index = pack.pack("sen12ms", sen12ms, out)
    entry = index["splits"]["all"]
    assert entry["season"] == ["spring"] * 3 + ["summer"] * 3 + ["fall"] * 3 + ["winter"] * 3
    for options in [
        {"return_label_map": True},
        {"crop": 16, "train": True, "seed": 1},
        {"seasons": ("fall", "spring"), "crop": 12, "offset_seed": 5},
    ]:
        original = datasets.SEN12MSDataset(sen12ms, **options)
        packed = datasets.SEN12MSDataset(out, **options)
        assert packed.patch_ids == original.patch_ids
        _assert_same_items(original, packed, epochs=(0, 2))


def test_sen12ms_broken_file_is_skipped_counted_and_behaves_as_in_the_source(sen12ms, tmp_path, caplog):
    ids = datasets.SEN12MSDataset(sen12ms).patch_ids
    season, scene, patch = ids[4].rsplit("_", 2)
    broken = sen12ms / season / f"s2_{scene}" / f"{season}_s2_{scene}_{patch}.tif"
    broken.write_bytes(b"broken")
    with caplog.at_level(logging.WARNING, logger="datasets"):
        index = pack.pack("sen12ms", sen12ms, tmp_path / "packed")
    assert index["check"]["all"] == {
        "rows": 12, "packed": 11, "with unreadable files": 1,
        "unreadable files by reason": {"s2: unreadable file": 1}, "skipped before packing": {},
    }
    (message,) = index["splits"]["all"]["unreadable"]["s2"].values()
    assert message.startswith(f"cannot read {broken}")
    assert json.loads((tmp_path / "packed" / "index.json").read_text())["check"] == index["check"]
    assert any(str(broken) in r.message for r in caplog.records) and any("11 of 12" in r.message for r in caplog.records)
    # The packed set keeps the row: loading it substitutes the next patch, as the GeoTIFF set does.
    original = datasets.SEN12MSDataset(sen12ms, crop=16, train=True)
    packed = datasets.SEN12MSDataset(tmp_path / "packed", crop=16, train=True)
    _assert_same_items(original, packed)
    assert packed.unreadable == original.unreadable == 1
    assert packed[4]["id"] == ids[5]


def test_meterml_packed_items_equal_the_npy_items(tmp_path):
    root = synthetic_data.write_meterml(tmp_path / "meterml", n=16, seed=3, val_fraction=0.25)
    nan = root / "train_images_2" / "site_000001" / "sentinel-1.npy"
    np.save(nan, np.where(np.arange(72 * 72 * 2).reshape(72, 72, 2) % 97 == 0, np.nan, np.load(nan)).astype(np.float32))
    missing = next((root / "train_images_3").iterdir())
    for file in missing.iterdir():
        file.unlink()
    missing.rmdir()
    index = pack.pack("meterml", root, tmp_path / "packed")
    assert set(index["splits"]) == {"train", "val"} and index["check"]["train"]["skipped before packing"] == {
        "image folder missing": 1
    }
    assert index["splits"]["train"]["arrays"]["s1"]["dtype"] == "float32"  # uint16 and float32 files
    assert index["splits"]["val"]["arrays"]["s2_10m"]["dtype"] == "uint16"
    for split, options in [
        ("train", {}),
        ("train", {"normalize": "none", "repeated": "first"}),
        ("val", {"exclude_negatives": True}),
    ]:
        original = datasets.MeterMLDataset(root, split, **options)
        packed = datasets.MeterMLDataset(tmp_path / "packed", split, **options)
        assert packed.ids == original.ids and packed.problems == original.problems
        _assert_same_items(original, packed, epochs=(0, 1))
    probe = datasets.MeterMLDataset(tmp_path / "packed")
    probe[probe.ids.index("site_000001")]
    assert probe.nan_pixels == int((np.arange(72 * 72 * 2) % 97 == 0).sum())  # the NaN survive packing


def test_a_killed_pack_resumes_at_its_checkpoint_and_equals_an_uninterrupted_one(sen12ms, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    pack.pack("sen12ms", sen12ms, whole, checkpoint_every=2)
    read = datasets.packed.pack_value
    calls: list[str] = []

    def killed_in_row_5(column, path):
        if len(calls) == 5 * 3:  # three columns per row: rows 0-4 read, the kill comes in row 5
            raise KeyboardInterrupt
        calls.append(str(path))
        return read(column, path)

    out = tmp_path / "resumed"
    monkeypatch.setattr(datasets.packed, "pack_value", killed_in_row_5)
    with pytest.raises(KeyboardInterrupt):
        pack.pack("sen12ms", sen12ms, out, checkpoint_every=2)
    assert not (out / "index.json").exists() and (out / ".pack_progress.json").exists()
    with pytest.raises(datasets.DataFileError, match="unfinished pack"):
        datasets.SEN12MSDataset(out)

    def counted(column, path):
        calls.append(str(path))
        return read(column, path)

    calls.clear()
    monkeypatch.setattr(datasets.packed, "pack_value", counted)
    index = pack.pack("sen12ms", sen12ms, out, checkpoint_every=2)
    assert len(calls) == (12 - 4) * 3  # resumed at the checkpoint after row 3
    assert not (out / ".pack_progress.json").exists()
    for column in ("s1", "s2", "lc"):
        assert (out / "all" / f"{column}.npy").read_bytes() == (whole / "all" / f"{column}.npy").read_bytes()
    expected = json.loads((whole / "index.json").read_text())
    for varying in ("packed_at", "seconds_of_last_run"):
        index.pop(varying), expected.pop(varying)
    assert index == expected
    calls.clear()
    assert pack.pack("sen12ms", sen12ms, out)["splits"] == expected["splits"] and not calls  # complete: left alone


def test_pack_refuses_folders_it_cannot_use(sen12ms, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        pack.pack("sen12ms", sen12ms, tmp_path / "busy")
    with pytest.raises(FileNotFoundError, match="no scene folders"):
        pack.pack("sen12ms", tmp_path / "busy", tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".pack_progress.json").write_text(json.dumps({"plan": "another source", "splits": {}}))
    with pytest.raises(FileExistsError, match="unfinished pack of other files"):
        pack.pack("sen12ms", sen12ms, tmp_path / "out")


def test_neither_a_data_set_nor_a_pack_is_a_clear_error(tmp_path, dfc):
    _, out = dfc
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)ROIs0000_validation.*or a folder written by `python pack.py dfc2020"):
        datasets.DFC2020Dataset(empty)
    with pytest.raises(FileNotFoundError, match=r"(?s)ROIs1158_spring.*python pack.py sen12ms"):
        datasets.SEN12MSDataset(empty)
    with pytest.raises(FileNotFoundError, match=r"(?s)train_dataset.geojson.*python pack.py meterml"):
        datasets.MeterMLDataset(empty)
    with pytest.raises(datasets.DataFileError, match="a packed dfc2020 data set, not sen12ms"):
        datasets.SEN12MSDataset(out)
    (empty / "index.json").write_text('{"something": "else"}')
    with pytest.raises(datasets.DataFileError, match=rf"{empty / 'index.json'}: not the index of a packed data set"):
        datasets.DFC2020Dataset(empty)


@pytest.mark.slow
def test_command_line_packs_and_reports(tmp_path, capsys):
    root = synthetic_data.write_dfc2020(tmp_path / "dfc", n_validation=3, n_test=0, seed=4, size=16)
    command = [sys.executable, str(REPO / "pack.py"), "dfc2020", str(root), str(tmp_path / "out")]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "packed dfc2020 validation: 3 of 3 rows complete" in done.stderr
    assert "split test" in done.stderr  # the absent split is named
    original, packed = datasets.DFC2020Dataset(root, crop=8, train=True), datasets.DFC2020Dataset(tmp_path / "out", crop=8, train=True)
    _assert_same_items(original, packed)
    with pytest.raises(SystemExit) as failed:  # the same entry in-process: one start-up less
        cli.run(pack.main, ["dfc2020", str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert failed.value.code == 1 and f"{tmp_path / 'nothing'} does not exist" in capsys.readouterr().err


def test_an_edited_index_and_a_changed_source_are_refused(tmp_path):
    root = synthetic_data.write_dfc2020(tmp_path / "dfc", n_validation=4, n_test=2, seed=3, size=16)
    out = tmp_path / "packed"
    pack.pack("dfc2020", root, out)
    index = json.loads((out / "index.json").read_text())
    edited = json.loads(json.dumps(index))
    edited["splits"]["validation"]["ids"] = edited["splits"]["validation"]["ids"][:-1]  # one row left out
    (out / "index.json").write_text(json.dumps(edited))
    with pytest.raises(datasets.DataFileError, match="the index lists .* rows but the arrays hold"):
        datasets.DFC2020Dataset(out)
    edited = json.loads(json.dumps(index))
    edited["splits"]["validation"]["label_sources"]["dfc"]["rows"].pop()  # the last patch of a split left out
    (out / "index.json").write_text(json.dumps(edited))
    with pytest.raises(datasets.DataFileError, match="lists 3 rows, but the pack holds 4 of 4: the index disagrees"):
        datasets.DFC2020Dataset(out)
    (out / "index.json").write_text(json.dumps(index))
    assert len(datasets.DFC2020Dataset(out)) == len(index["splits"]["validation"]["ids"])
    changed = sorted((root / "ROIs0000_validation" / "s2_validation").glob("*.tif"))[0]
    os.utime(changed, ns=(0, 0))  # the file changed since it was packed
    with pytest.raises(FileExistsError, match="1 of its source files changed since it was packed"):
        pack.pack("dfc2020", root, out)
