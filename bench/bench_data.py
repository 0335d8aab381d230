"""Samples per second of DFC2020Dataset, on GeoTIFFs and packed, against a naive loader, in one process.

All three loaders read the same synthetic DFC2020 validation split (written by synthetic_data.py
into a temporary folder; the packed loader reads it after ``datasets.pack``, from the page cache as
the GeoTIFFs are), take 224 x 224 training crops and return the seed-normalised S1 / S2 crops
with the majority and multi-label targets (the scripts augment on the device, so a loader item is
one view). Torch runs on one thread, as in a DataLoader worker.

Usage: python bench/bench_data.py [--patches 64] [--repeats 3]
Also prints how long packing the patches took.
"""
import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import pack  # noqa: E402
import synthetic_data  # noqa: E402

CROP = 224
PATCH = 256
# DFC codes 1-10 to the 8 classes; Savanna, Snow/Ice and no-label to ignore (255).
DFC_TO_CLASS = np.full(256, 255, dtype=np.uint8)
DFC_TO_CLASS[[1, 2, 4, 5, 6, 7, 9, 10]] = np.arange(8)


class NaiveDFC2020(Dataset):
    """The straightforward loader, in the original code's order: opens all four GeoTIFFs of a
    patch, reads the crop window of each, clips, then divides every channel of each image by its
    maximum in a Python loop."""

    def __init__(self, root: Path) -> None:
        folder = root / "ROIs0000_validation"
        self.patches = sorted(int(p.stem.split("_p")[1]) for p in (folder / "s1_validation").iterdir())
        self.folder = folder

    def __len__(self) -> int:
        return len(self.patches)

    def _read(self, modality: str, patch: int, window: Window) -> np.ndarray:
        with rasterio.open(self.folder / f"{modality}_validation"
                           / f"ROIs0000_validation_{modality}_0_p{patch}.tif") as src:
            return src.read(window=window)

    @staticmethod
    def _normalise(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for c in range(x.shape[0]):
            x[c] /= x[c].max() + 1e-5
        return x

    def __getitem__(self, index: int) -> dict:
        patch = self.patches[index]
        top, left = np.random.randint(0, PATCH - CROP + 1, 2)
        window = Window(left, top, CROP, CROP)
        s1, s2, lc, dfc = (self._read(m, patch, window) for m in ("s1", "s2", "lc", "dfc"))
        s1 = torch.from_numpy(np.clip(np.nan_to_num(s1.astype(np.float32)), -25, 0) + 25)
        s2 = torch.from_numpy(np.clip(s2.astype(np.float32), 0, 10000))
        label_map = DFC_TO_CLASS[dfc[0]]
        counts = np.bincount(label_map.ravel(), minlength=256)
        item = {
            "s1": self._normalise(s1),
            "s2": self._normalise(s2),
            "label": int(counts.argmax()),
            "multilabel": torch.from_numpy(counts[:8] >= 0.1 * label_map.size).float(),
            "id": patch,
        }
        return item


def samples_per_second(dataset: Dataset, repeats: int) -> float:
    """Median over ``repeats`` passes over the whole dataset."""
    rates = []
    for epoch in range(repeats):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        rates.append(len(dataset) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--patches", type=int, default=64, help="256 x 256 patches to write and read")
    parser.add_argument("--repeats", type=int, default=3, help="passes per loader; the median is reported")
    args = parser.parse_args()
    # The synthetic set holds NaN pixels on purpose; their one-off warnings are not part of the table.
    logging.getLogger("datasets").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_data.write_dfc2020(Path(tmp) / "dfc", n_validation=args.patches, n_test=0, seed=0, size=PATCH)
        packed = Path(tmp) / "packed"
        started = time.perf_counter()
        pack.pack("dfc2020", root, packed)
        pack_seconds = time.perf_counter() - started
        trio = (NaiveDFC2020(root), datasets.DFC2020Dataset(root, crop=CROP, train=True),
                datasets.DFC2020Dataset(packed, crop=CROP, train=True))
        for loader in trio:  # warm the page cache and the imports
            loader[0]
        naive_rate, tif_rate, packed_rate = (samples_per_second(loader, args.repeats) for loader in trio)

    print(f"DFC2020, {args.patches} synthetic patches of {PATCH} px, {CROP} px training crops, one process, "
          "1 torch thread")
    print(f"packing them (pack.pack, all four files of each patch): {pack_seconds:.2f} s, "
          f"{1000 * pack_seconds / args.patches:.1f} s per 1,000 patches")
    print()
    print("| original-style loader (samples/s) | GeoTIFF | packed | GeoTIFF / original | packed / GeoTIFF "
          "| ms per item: original, GeoTIFF, packed |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {naive_rate:.0f} | {tif_rate:.0f} | {packed_rate:.0f} | {tif_rate / naive_rate:.2f}x | "
          f"{packed_rate / tif_rate:.2f}x | {1e3 / naive_rate:.2f}, {1e3 / tif_rate:.2f}, {1e3 / packed_rate:.2f} |")


if __name__ == "__main__":
    main()
