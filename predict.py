"""Apply a trained dfc_finetune.py run to new data: patches to a CSV, or an S1 / S2 scene to a class map.

    python predict.py RUN --data_root ROOT --split SPLIT --out PRED.csv [--weights last|best]
    python predict.py RUN --s1 S1.tif --s2 S2.tif --out MAP.tif [--window PX] [--stride PX] [--weights last|best]

Patches: every patch of SPLIT under ROOT (default: the run's data_root and eval_split), read as
the run's evaluations read it (dfc_finetune.build_eval_set on the run's config.json: the same
window, offset and normalisation; a manifest's labels numbered by the run's classes, by name). One CSV
row per patch: id, label (the patch's own class name; empty where ignored; a label the run never learnt
kept by name, out of the printed accuracy), prediction, and p_<class> (softmax) per class. With the run's split and
weights, its confusion matrix is results.json's last.confusion.

Scene: co-registered S1 and S2 GeoTIFFs (same CRS, transform and size) of any size, read one
window at a time, never whole. A WINDOW px window (default: the run's --eval_crop, else its --crop)
is taken every STRIDE px (default WINDOW) from the top-left corner and gives its class to the
STRIDE x STRIDE cell it starts at. MAP.tif has the scene's size, CRS and transform: uint8 class
indices in results.json's order (last.classes), 255 nodata, the class names in its tags, a
colour table. Nodata: the pixels no cell covers (right and bottom edges where the windows do not
tile the scene), and the cells of windows that are mostly missing: more than half of their pixels
missing in S1 or in S2, a pixel missing when one of its bands is NaN or the file's nodata value.
Each window is normalised on its own by the run's recipe (config.json "normalize", default
"seed": the original's per-crop channel maxima). Also written: MAP.png, a preview with a legend
(beside the classes of --truth, a class raster on the scene's grid, when given), and MAP.json,
its numbers (cells per class, windows/s, agreement with --truth).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
import torch
from rasterio.enums import Resampling
from rasterio.windows import Window
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

import dfc_finetune
from datasets import NORMALIZATIONS, CropError, PatchDataset
from embed import NotARunError, RunInfo, checkpoint_path, read_run
from losses import IGNORE
from models import DualResNet, load_checkpoint
from util import cli, flags, process
from util.rundir import RunFolderError

log = logging.getLogger("predict")

NODATA = 255
MISSING_SHARE = 0.5  # a window with more than this share of missing pixels (S1 or S2) is nodata


class PredictError(ValueError):
    """Data or a run that predict.py cannot use as asked; the message says what and where."""


# ----------------------------------------------------------------------------- the run

def run_classes(run: RunInfo) -> list[str]:
    if not run.results or not (run.results.get("last") or {}).get("classes"):
        raise PredictError(f"{run.path} has no results.json with last.classes (an unfinished run?): predict.py "
                           f"names its classes from it")
    return list(run.results["last"]["classes"])


def checkpoint_bands(path: Path) -> tuple[int, int]:
    """The S1 and S2 band counts of a DualResNet checkpoint's first layers; (2, 13) when the file
    does not tell (load_checkpoint then names what is wrong with it)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = state.get("state_dict", state)
        return tuple(int(state[f"{b}.conv1.weight"].shape[1]) for b in ("backbone1", "backbone2"))
    except Exception:  # noqa: BLE001 - any damage is reported by load_checkpoint below
        return 2, 13


def load_net(run: RunInfo, path: Path, num_classes: int) -> DualResNet:
    """The run's DualResNet with the checkpoint `path` loaded, in eval mode, on the CPU."""
    s1_bands, s2_bands = checkpoint_bands(path)
    net = DualResNet(run.config.get("arch", "resnet50"), num_classes=num_classes, s1_channels=s1_bands,
                     s2_channels=s2_bands)
    try:
        missing, _ = load_checkpoint(net, path)
    except ValueError as error:
        raise PredictError(str(error)) from None
    if missing:
        raise PredictError(f"{path} holds no classifier ({', '.join(missing)}): it is not a trained run's checkpoint")
    return net.eval()


def make_context(args: argparse.Namespace, run: RunInfo) -> process.Context:
    """Device and loader settings as the scripts choose them; bf16 autocast as the run evaluated."""
    hardware = argparse.Namespace(device=args.device, workers=args.workers, progress=None,
                                  amp=bool(run.config.get("amp")), channels_last=None)
    ctx = process.plan_context(hardware, {}, torch.cuda.is_available(), torch.cuda.device_count(), os.cpu_count() or 1,
                               sys.stderr.isatty())
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
        torch.backends.cudnn.benchmark = True  # one window size throughout
    return ctx


def run_args(run: RunInfo) -> argparse.Namespace:
    """The run's flags: dfc_finetune.py's defaults overlaid with its config.json."""
    return argparse.Namespace(**{**vars(dfc_finetune.build_parser().parse_args([])), **run.config})


# ----------------------------------------------------------------------------- patches

@torch.inference_mode()
def predict_patches(net: DualResNet, loader: DataLoader, ctx: process.Context) -> tuple[list, Tensor, Tensor, Tensor]:
    """ids, labels (N,), predictions (N,) (the argmax of the logits, as metrics.evaluate takes it)
    and softmax probabilities (N, K) of every item of `loader`, in order."""
    net.to(ctx.device)
    if ctx.channels_last:
        net.to(memory_format=torch.channels_last)
    ids, labels, preds, probs, names = [], [], [], [], []
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not ctx.progress):
        names += batch.get("label_name", [None] * len(batch["label"]))  # a manifest row's own label
        with ctx.autocast():
            logits = net(ctx.to_device(batch["s1"]), ctx.to_device(batch["s2"])).float()
        ids += batch["id"].tolist() if isinstance(batch["id"], Tensor) else list(batch["id"])
        labels.append(torch.as_tensor(batch["label"]))
        preds.append(logits.argmax(1).cpu())
        probs.append(logits.softmax(1).cpu())
    return ids, torch.cat(labels), torch.cat(preds), torch.cat(probs), names


def write_predictions(path: Path, classes: list[str], ids: list, labels: Tensor, preds: Tensor, probs: Tensor,
                      names: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "label", "prediction", *(f"p_{c}" for c in classes)])
        for i, label, pred, p, own in zip(ids, labels.tolist(), preds.tolist(), probs.tolist(), names):
            name = own if own is not None else classes[label] if 0 <= label < len(classes) else ""
            out.writerow([i, name, classes[pred], *(f"{v:.6f}" for v in p)])


def main_patches(args: argparse.Namespace, run: RunInfo, classes: list[str]) -> dict:
    config = run_args(run)
    root = args.data_root or Path(config.data_root)
    split = args.split or config.eval_split
    try:
        dataset = dfc_finetune.build_eval_set(config, root, split, classes=classes,
                                              norm_stats=(run.results or {}).get("norm_stats"))
    except (CropError, ValueError) as error:
        raise PredictError(f"{root} ({split}): {error}") from None
    checkpoint = checkpoint_path(run, f"{args.weights}.pt")
    net = load_net(run, checkpoint, len(classes))
    ctx = make_context(args, run)
    batch_size = args.batch_size or config.eval_batch_size or 2 * config.batch_size
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=ctx.workers, pin_memory=ctx.pin_memory)
    ids, labels, preds, probs, names = predict_patches(net, loader, ctx)
    write_predictions(args.out, classes, ids, labels, preds, probs, names)
    counted = labels != IGNORE
    accuracy = 100.0 * (preds[counted] == labels[counted]).double().mean().item() if counted.any() else None
    log.info("wrote %s: %d patches of %s (%s) by %s; OA %s on %d labelled patches", args.out, len(ids), root, split,
             checkpoint, "-" if accuracy is None else f"{accuracy:.2f}", int(counted.sum()))
    return {"out": str(args.out), "n": len(ids), "OA": accuracy}


# ----------------------------------------------------------------------------- scenes

def check_recipe(recipe: str) -> str:
    """The run's input normalisation (config.json "normalize"), refused when this code has no such recipe."""
    if recipe not in NORMALIZATIONS:
        raise PredictError(f"the run's input normalisation {recipe!r} (config.json 'normalize') is not one this "
                           f"code knows ({', '.join(NORMALIZATIONS)})")
    return recipe


def check_grids(s1_path: Path, s2_path: Path, bands: tuple[int, int], window: int) -> dict:
    """The scene's grid (crs, transform, width, height) and the files' nodata values, after
    checking that the two files share it, hold the model's band counts and fit one window."""
    grids = []
    for path in (s1_path, s2_path):
        try:
            with rasterio.open(path) as src:
                grids.append({"crs": src.crs, "transform": src.transform, "width": src.width, "height": src.height,
                              "count": src.count, "nodata": src.nodata})
        except rasterio.errors.RasterioIOError as error:
            raise PredictError(f"{path} cannot be read as a raster: {error}") from None
    a, b = grids
    for key, what in (("crs", "CRS"), ("transform", "transform"), ("width", "width"), ("height", "height")):
        if a[key] != b[key]:
            raise PredictError(f"the S1 and S2 scenes are not co-registered: {what} {a[key]} in {s1_path} but "
                               f"{b[key]} in {s2_path}; resample them onto one grid first")
    for grid, path, name, count in ((a, s1_path, "S1", bands[0]), (b, s2_path, "S2", bands[1])):
        if grid["count"] != count:
            raise PredictError(f"{path} has {grid['count']} bands; the run's model takes {count} {name} bands")
    if min(a["width"], a["height"]) < window:
        raise PredictError(f"the scene ({s1_path}, {s2_path}) is {a['height']} x {a['width']} px, smaller than one "
                           f"window of {window} px; pass a smaller --window")
    return {**{k: a[k] for k in ("crs", "transform", "width", "height")}, "nodata": (a["nodata"], b["nodata"])}


class SceneWindows(PatchDataset):
    """The windows of a co-registered S1 / S2 scene pair, row by row: item i is window (i // cols,
    i % cols) at pixel (row * stride, col * stride). Each item reads its window only (the files
    are opened once per process). Item: "s1", "s2" the network's inputs (zeros for a nodata
    window), "valid" False for a nodata window, "index" i."""

    def __init__(self, s1_path: Path, s2_path: Path, grid: dict, window: int, stride: int, recipe: str) -> None:
        super().__init__(window, False, check_recipe(recipe), False, 0, None)
        self.s1_path, self.s2_path, self.grid, self.window, self.stride = s1_path, s2_path, grid, window, stride
        self.rows = (grid["height"] - window) // stride + 1
        self.cols = (grid["width"] - window) // stride + 1
        self._init_counts(len(self))
        self._sources, self._pid = None, None

    def __len__(self) -> int:
        return self.rows * self.cols

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_sources": None, "_pid": None}

    def _open(self) -> tuple:
        if self._pid != os.getpid():  # GDAL handles are never shared with a forked worker
            self._sources, self._pid = (rasterio.open(self.s1_path), rasterio.open(self.s2_path)), os.getpid()
        return self._sources

    def close(self) -> None:
        for src in self._sources or ():
            src.close()
        self._sources, self._pid = None, None

    def missing_share(self, raw: np.ndarray, nodata: float | None) -> float:
        """Share of the window's pixels with a band NaN or equal to the file's nodata value."""
        missing = np.isnan(raw).any(0) if np.issubdtype(raw.dtype, np.floating) else np.zeros(raw.shape[1:], bool)
        if nodata is not None and not np.isnan(nodata):
            missing |= (raw == nodata).any(0)
        return float(missing.mean())

    def __getitem__(self, index: int) -> dict:
        row, col = divmod(index, self.cols)
        window = Window(col * self.stride, row * self.stride, self.window, self.window)
        s1_raw, s2_raw = (src.read(window=window) for src in self._open())
        valid = all(self.missing_share(raw, nodata) <= MISSING_SHARE
                    for raw, nodata in zip((s1_raw, s2_raw), self.grid["nodata"]))
        if valid:
            s1, s2 = self.normalized(s1_raw, s2_raw, (str(self.s1_path), str(self.s2_path)), index)
        else:
            s1, s2 = (torch.zeros(raw.shape, dtype=torch.float32) for raw in (s1_raw, s2_raw))
        return {"s1": s1, "s2": s2, "valid": valid, "index": index}


@torch.inference_mode()
def window_logits(net: DualResNet, loader: DataLoader, ctx: process.Context):
    """Yields (indices (b,), logits (b, K) float32 on the CPU) of the valid windows of each batch of
    `loader` (over a SceneWindows); nodata windows never reach the device."""
    net.to(ctx.device)
    if ctx.channels_last:
        net.to(memory_format=torch.channels_last)
    for batch in loader:
        valid = batch["valid"]
        if valid.any():
            with ctx.autocast():
                logits = net(ctx.to_device(batch["s1"][valid]), ctx.to_device(batch["s2"][valid]))
            yield batch["index"][valid], logits.float().cpu()


def scene_loader(windows: SceneWindows, ctx: process.Context, batch_size: int, persistent: bool = False) -> DataLoader:
    return DataLoader(windows, batch_size=batch_size, num_workers=ctx.workers, pin_memory=ctx.pin_memory,
                      persistent_workers=persistent and ctx.workers > 0, prefetch_factor=4 if ctx.workers > 0 else None)


def classify_scene(net: DualResNet, loader: DataLoader, ctx: process.Context) -> tuple[np.ndarray, float]:
    """Cell classes (rows, cols) uint8 (NODATA for nodata windows) of `loader`'s SceneWindows, and
    the windows per second."""
    windows = loader.dataset
    cells = np.full(len(windows), NODATA, dtype=np.uint8)
    began = time.perf_counter()
    with tqdm(total=len(windows), desc="windows", unit="window", disable=None) as bar:
        done = 0
        for index, logits in window_logits(net, loader, ctx):
            cells[index.numpy()] = logits.argmax(1).numpy().astype(np.uint8)
            # the bar counts nodata windows too: every index up to the last one classified
            bar.update(int(index.max()) + 1 - done)
            done = int(index.max()) + 1
        bar.update(len(windows) - done)
    windows.close()
    return cells.reshape(windows.rows, windows.cols), len(windows) / max(time.perf_counter() - began, 1e-9)


def palette(k: int) -> list[tuple[int, int, int]]:
    """One RGB colour per class (tab10 up to 10 classes, tab20 up to 20, then repeated)."""
    import matplotlib

    colors = matplotlib.colormaps["tab10" if k <= 10 else "tab20"].colors
    return [tuple(round(255 * v) for v in colors[i % len(colors)][:3]) for i in range(k)]


def write_map(path: Path, cells: np.ndarray, grid: dict, stride: int, classes: list[str], tags: dict) -> None:
    """MAP.tif at the scene's resolution: each cell's class over its stride x stride pixels, written
    one row of cells at a time; NODATA where no cell reaches."""
    height, width = grid["height"], grid["width"]
    covered = min(cells.shape[1] * stride, width)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=1, dtype="uint8", crs=grid["crs"],
                       transform=grid["transform"], nodata=NODATA, compress="deflate") as dst:
        dst.write_colormap(1, {i: (*rgb, 255) for i, rgb in enumerate(palette(len(classes)))} | {NODATA: (0, 0, 0, 0)})
        for top in range(0, height, stride):
            rows = min(stride, height - top)
            block = np.full((rows, width), NODATA, dtype=np.uint8)
            if top // stride < cells.shape[0]:
                block[:, :covered] = np.repeat(cells[top // stride], stride)[:covered]
            dst.write(block, 1, window=Window(0, top, width, rows))
        dst.update_tags(classes=json.dumps(classes), **{f"class_{i}": name for i, name in enumerate(classes)}, **tags)


def read_classes(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Band 1 of a class raster, whole or resampled (nearest) to `shape`."""
    with rasterio.open(path) as src:
        return src.read(1, out_shape=shape, resampling=Resampling.nearest)


def check_truth(path: Path, grid: dict, classes: list[str]) -> None:
    with rasterio.open(path) as src:
        if (src.width, src.height) != (grid["width"], grid["height"]) or src.transform != grid["transform"]:
            raise PredictError(f"--truth {path} is {src.height} x {src.width} px with transform {src.transform}; "
                               f"the scene is {grid['height']} x {grid['width']} px with {grid['transform']}")
        named = src.tags().get("classes")
    if named is not None and json.loads(named) != classes:
        raise PredictError(f"--truth {path} names the classes {json.loads(named)}; the run's are {classes}")


def agreement(map_path: Path, truth_path: Path, rows: int = 1024) -> float | None:
    """% of the pixels labelled in both rasters where they agree, read in blocks of rows."""
    hits = total = 0
    with rasterio.open(map_path) as a, rasterio.open(truth_path) as b:
        for top in range(0, a.height, rows):
            window = Window(0, top, a.width, min(rows, a.height - top))
            pred, true = a.read(1, window=window), b.read(1, window=window)
            both = (pred != NODATA) & (true != NODATA)
            hits += int((pred[both] == true[both]).sum())
            total += int(both.sum())
    return 100.0 * hits / total if total else None


def preview(path: Path, map_path: Path, classes: list[str], title: str, truth: Path | None = None, largest: int = 800):
    """MAP.png: the map (beside the true classes when given), at most `largest` px a side, one
    legend for both. Returns the matplotlib Figure (closed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    with rasterio.open(map_path) as src:
        scale = max(src.width, src.height) / largest
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale))) if scale > 1 else None
    panels = [("predicted", read_classes(map_path, shape))]
    if truth is not None:
        panels.append(("true classes", read_classes(truth, shape)))
    colors = [np.array(c) / 255 for c in palette(len(classes))]
    nodata_color = (1.0, 1.0, 1.0)
    cmap = ListedColormap(colors + [nodata_color])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.8, 4.6), squeeze=False,
                             layout="constrained")
    for ax, (name, image) in zip(axes[0], panels):
        shown = np.where(image == NODATA, len(classes), np.minimum(image, len(classes)))
        ax.imshow(shown, cmap=cmap, vmin=-0.5, vmax=len(classes) + 0.5, interpolation="nearest")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    present = set(np.unique(np.concatenate([image.ravel() for _, image in panels])).tolist())
    handles = [Patch(color=colors[i], label=name) for i, name in enumerate(classes) if i in present]
    handles += ([Patch(facecolor=nodata_color, edgecolor="black", label="nodata or ignored")]
                if NODATA in present else [])
    fig.legend(handles=handles, loc="outside right center", fontsize="small", title="class")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def main_scene(args: argparse.Namespace, run: RunInfo, classes: list[str]) -> dict:
    config = run_args(run)
    window = args.window or config.eval_crop or config.crop
    stride = args.stride or window
    checkpoint = checkpoint_path(run, f"{args.weights}.pt")
    grid = check_grids(args.s1, args.s2, checkpoint_bands(checkpoint), window)
    if args.truth is not None:
        check_truth(args.truth, grid, classes)
    net = load_net(run, checkpoint, len(classes))
    recipe = getattr(config, "normalize", None) or "seed"
    windows = SceneWindows(args.s1, args.s2, grid, window, stride, recipe)
    windows.norm_stats = (run.results or {}).get("norm_stats")  # --normalize stats: the training split's
    ctx = make_context(args, run)
    log.info("%s: %d x %d windows of %d px every %d px over %d x %d px, normalisation %r, %s", run.path, windows.rows,
             windows.cols, window, stride, grid["height"], grid["width"], recipe, checkpoint)
    batch_size = args.batch_size or config.eval_batch_size or 2 * config.batch_size
    cells, rate = classify_scene(net, scene_loader(windows, ctx, batch_size), ctx)

    tags = {"run": str(run.path), "weights": checkpoint.name, "window": window, "stride": stride, "normalize": recipe,
            "s1": str(args.s1), "s2": str(args.s2),
            "nodata_rule": f"255: no cell, or a window with over {MISSING_SHARE:.0%} of its pixels NaN or nodata "
                           f"in S1 or S2"}
    write_map(args.out, cells, grid, stride, classes, tags)
    agree = agreement(args.out, args.truth) if args.truth else None
    counts = np.bincount(cells.ravel(), minlength=256)
    info = {**tags, "out": str(args.out), "classes": classes, "grid": [windows.rows, windows.cols],
            "cells": int(cells.size), "nodata_cells": int(counts[NODATA]),
            "class_cells": {name: int(counts[i]) for i, name in enumerate(classes)},
            "windows_per_s": rate, "device": str(ctx.device), "nonfinite_values": windows.nonfinite_pixels,
            "truth": str(args.truth) if args.truth else None, "agreement": agree}
    title = (f"{run.config.get('name') or run.path.name} ({checkpoint.name}): {window} px windows every {stride} px"
             + (f"\n{agree:.1f} % of the labelled pixels agree with the true classes" if agree is not None else ""))
    preview(args.out.with_suffix(".png"), args.out, classes, title, args.truth)
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=2))
    log.info("wrote %s, %s and %s: %d cells (%d nodata), %.1f windows/s on %s%s", args.out,
             args.out.with_suffix(".png"), args.out.with_suffix(".json"), cells.size, info["nodata_cells"], rate,
             ctx.device, "" if agree is None else f"; {agree:.1f} % agree with {args.truth}")
    return info


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = flags.parser(__doc__)
    p.add_argument("run", type=Path, metavar="RUN", help="a run folder of dfc_finetune.py")
    p.add_argument("--out", type=Path, required=True, help="PRED.csv (patches) or MAP.tif (scene)")
    p.add_argument("--weights", choices=["last", "best"], default="last",
                   help="last.pt or best.pt of RUN (default last)")
    g = p.add_argument_group("patches")
    g.add_argument("--data_root", type=Path, default=None, help="data the run's script reads (default: the run's)")
    g.add_argument("--split", default=None, help="split to predict (default: the run's eval_split)")
    g = p.add_argument_group("scene")
    g.add_argument("--s1", type=Path, default=None, help="S1 GeoTIFF scene (VV, VH in dB)")
    g.add_argument("--s2", type=Path, default=None, help="S2 GeoTIFF scene on the same grid")
    g.add_argument("--window", type=flags.positive_int, default=None,
                   help="window side, px (default: the run's --eval_crop, else its --crop)")
    g.add_argument("--stride", type=flags.positive_int, default=None,
                   help="step between windows, px (default: the window)")
    g.add_argument("--truth", type=Path, default=None,
                   help="a class raster on the scene's grid (255 nodata), shown beside the map and compared")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--batch_size", type=flags.positive_int, default=None,
                   help="windows or patches per batch (default: the run's evaluation batch)")
    g.add_argument("--workers", type=flags.non_negative_int, default=None,
                   help="DataLoader workers (default: as the training scripts choose)")
    return p


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    scene = args.s1 is not None or args.s2 is not None
    if scene and (args.s1 is None or args.s2 is None):
        parser.error("a scene needs both --s1 and --s2")
    wrong = [f for f in (["--data_root", "--split"] if scene else ["--window", "--stride", "--truth"])
             if getattr(args, f[2:]) is not None]
    if wrong:
        parser.error(f"{', '.join(wrong)} {'do' if len(wrong) > 1 else 'does'} not apply to "
                     f"{'a scene (--s1, --s2)' if scene else 'patches (--data_root, --split)'}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        run = read_run(args.run)
        if run.kind != "dfc_finetune":
            raise PredictError(f"{args.run} is a run of {run.kind}.py; predict.py applies runs of dfc_finetune.py")
        classes = run_classes(run)
        return (main_scene if scene else main_patches)(args, run, classes)
    except (PredictError, NotARunError, RunFolderError, OSError, ValueError, process.DeviceError) as error:
        sys.exit(f"predict.py: error: {error}")


if __name__ == "__main__":
    cli.run(main)
