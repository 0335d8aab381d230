"""Apply a trained dfc_finetune.py run to new data: patches to a CSV, S1 / S2 scenes to class maps.

    python predict.py RUN --data_root ROOT --split SPLIT --out PRED.csv [--weights last|best]
    python predict.py RUN --s1 S1 --s2 S2 --out MAP.tif [--s1_scale db|power|amplitude] [--s2_offset N]
        [--window PX] [--stride PX] [--probabilities]
    python predict.py RUN --scenes scenes.csv --out_dir DIR [--overwrite]     # columns s1, s2, name[, truth]

Patches: every patch of SPLIT under ROOT (default: the run's data_root and eval_split), read as
the run's evaluations read it (dfc_finetune.build_eval_set on the run's config.json: the same
window, offset and normalisation; a manifest's labels numbered by the run's classes, by name). One CSV
row per patch: id, label (the patch's own class name; empty where ignored; a label the run never learnt
kept by name, out of the printed accuracy), prediction, and p_<class> (softmax) per class. With the run's split and
weights, its confusion matrix is results.json's last.confusion.

Scene: what prepare_scene.py takes, read lazily through the same code (datasets.scenes.open_scene: warped
views, no intermediate file), so the map is the one of prepare_scene.py's stacks. --s2: a GeoTIFF stack or a
folder of band files (a SAFE product, L1C or L2A); --s1: a 2-band GeoTIFF (VV, VH), a folder or two files
named VV and VH, in any CRS, warped bilinearly onto the S2 grid, to dB by --s1_scale. The run's S2 bands (its
checkpoint's s2_band_names, else results.json's, else 13 = L1C, 12 = L2A) are taken by name; a band the input
lacks is refused, naming it. Two stacks (S1 and S2 GeoTIFFs) must share one grid (CRS, size, transform within
a millionth of a pixel). Scenes of any size are read one window at a time, never whole. A WINDOW px window
(default: the run's --eval_crop, else its --crop) is taken every STRIDE px (default WINDOW, at most WINDOW),
and also flush with the right and bottom edges; its class goes to the STRIDE x STRIDE cell centred in it (the
flush window's cell takes the pixels the one before leaves; the outer margins take the nearest window's
class): docs/flags.md draws it. MAP.tif has the scene's size, CRS and transform: a cloud-optimised GeoTIFF of
uint8 class indices in results.json's order (last.classes), 255 nodata, class names in its tags, a colour
table (the DFC2020 legend for its classes); MAP.qml beside it, a QGIS style. Nodata: the cells of windows with
more than half of their pixels missing in S1 or in S2 (the file's dataset mask: nodata value, alpha, internal
mask; or a NaN band); missing pixels are NaN before the run's normalisation (config.json "normalize", default
"seed"). Also MAP.png, a preview (beside --truth, a class raster on the scene's grid), MAP.json, its numbers,
and with --probabilities MAP_prob.tif, a uint8 band per class (probability x 200, 255 nodata). Every file is
written under a temporary name and renamed; an output that is an input, or lies in the run or an input folder
(a SAFE product), is refused.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
import rasterio.env
import rasterio.errors
import torch
from rasterio.windows import Window
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets import NORMALIZATIONS, CropError, normalize, patch_dataset
from datasets.patches import DEFAULT_S2_BANDS
from datasets.scenes import S1_SCALES, describe_grid, open_scene, read_grid, same_grid
from models import DualResNet, load_checkpoint
from util import cli, flags, maps, process
from util.checkpoint import read_meta
from util.io import atomic_write, atomic_write_json, same_file
from util.labels import IGNORE
from util.lock import RunFolderError
from util.runs import NotARunError, RunInfo, checkpoint_path, read_run

log = logging.getLogger("predict")

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
    ctx = process.plan_context(hardware, os.environ, torch.cuda.is_available(), torch.cuda.device_count(),
                               os.cpu_count() or 1, sys.stderr.isatty())
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
        torch.backends.cudnn.benchmark = True  # one window size throughout
    return ctx


# dfc_finetune.py's defaults of the flags predict.py reads, for a config.json written before one of them existed.
RUN_DEFAULTS = {"arch": "resnet50", "crop": 224, "eval_crop": 224, "eval_offset_seed": 0, "normalize": "seed",
                "eval_batch_size": None, "batch_size": 32, "amp": False, "name": None, "data_root": None,
                "eval_split": "test"}
# What a checkpoint's "meta" says in the names of config.json.
META_FLAGS = ("arch", "crop", "eval_crop", "eval_offset_seed", "normalize", "norm_stats", "eval_batch_size", "amp",
              "name", "s2_band_names")


def run_args(run: RunInfo) -> argparse.Namespace:
    """The run's flags: RUN_DEFAULTS overlaid with its config.json (or its checkpoint's meta)."""
    return argparse.Namespace(**{**RUN_DEFAULTS, **run.config})


def open_run(path: Path, weights: str) -> RunInfo:
    """RUN: a checkpoint file, described by its "meta" (an older one without it by the config.json of the run
    folder it lies in), or a run folder, its `weights` checkpoint described by its meta, else by config.json and
    results.json. Data defaults (data_root, eval_split) come from a run folder only."""
    if path.is_file():
        if weights != "last":
            raise PredictError(f"--weights {weights} picks a checkpoint of a run folder; {path} is a checkpoint file")
        meta = read_meta(path)
        if meta is None:
            if not (path.parent / "config.json").is_file():
                raise PredictError(f"{path} does not describe itself (no 'meta': written before checkpoints did, or "
                                   "not by dfc_finetune.py) and lies in no run folder: give its run folder")
            return RunInfo(**{**vars(read_run(path.parent)), "checkpoint": path})
        return RunInfo(path.parent, meta.get("script"), "DFC2020", {k: meta[k] for k in META_FLAGS if k in meta},
                       {"last": {"classes": meta.get("classes")}}, checkpoint=path)
    run = read_run(path)
    checkpoint = run.path / f"{weights}.pt"  # a missing one is named by checkpoint_path when it is read
    meta = read_meta(checkpoint) if checkpoint.is_file() else None
    if meta is None:
        return run
    config = {**run.config, **{k: meta[k] for k in META_FLAGS if k in meta}}
    return RunInfo(run.path, meta.get("script"), run.dataset, config, {"last": {"classes": meta.get("classes")}})


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
    """PRED.csv: the `label` column is each patch's own label name (`names`; None: the class of `labels`, empty
    where ignored), also for labels the run never learnt."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["id", "label", "prediction", *(f"p_{c}" for c in classes)])
            for i, label, pred, p, own in zip(ids, labels.tolist(), preds.tolist(), probs.tolist(), names):
                name = own if own is not None else classes[label] if 0 <= label < len(classes) else ""
                out.writerow([i, name, classes[pred], *(f"{v:.6f}" for v in p)])

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def main_patches(args: argparse.Namespace, run: RunInfo, classes: list[str]) -> dict:
    config = run_args(run)
    if args.data_root is None and config.data_root is None:
        raise PredictError(f"{run.checkpoint} is a checkpoint alone: pass --data_root (and --split) to predict patches")
    root = args.data_root or Path(config.data_root)
    split = args.split or config.eval_split
    stats = getattr(config, "norm_stats", None) or (run.results or {}).get("norm_stats")
    bands = getattr(config, "s2_band_names", None) or getattr(config, "s2_bands", None)
    try:  # the windows the run's evaluations read (dfc_finetune.build_eval_set), labels matched by name
        dataset = patch_dataset(root, split, crop=config.eval_crop or None, offset_seed=config.eval_offset_seed,
                                normalize=config.normalize, norm_stats=stats, classes=classes, s2_bands=bands)
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


def run_s2_bands(run: RunInfo, count: int) -> list[str]:
    """The names of the run's `count` S2 bands, in its model's order: its checkpoint's meta (or config.json)
    "s2_band_names", else results.json's, else a manifest run's --s2_bands, else by the count (13: L1C, 12: L2A)."""
    config, results = run.config or {}, run.results or {}
    names = config.get("s2_band_names") or results.get("s2_band_names") or config.get("s2_bands")
    if not names:
        names = DEFAULT_S2_BANDS.get(count)
        if names is None:
            raise PredictError(f"{run.path} does not name its {count} S2 bands (no s2_band_names in its checkpoint or "
                               f"results.json): predict.py takes a scene's bands by name")
    if len(names) != count:
        raise PredictError(f"{run.path} names {len(names)} S2 bands ({', '.join(names)}); its model takes {count}")
    return list(names)


def check_stacks(s1: Path | list[Path], s2: Path) -> None:
    """Refuses an S1 and an S2 GeoTIFF stack on different grids (same CRS, size, transform within a millionth of a
    pixel), naming both in full: two stacks are taken as the model's, co-registered. Provider files (a folder, VV
    and VH files) are warped onto the S2 grid instead."""
    if isinstance(s1, list) or not Path(s1).is_file() or not Path(s2).is_file():
        return
    grids = read_grid(s1), read_grid(s2)
    if not same_grid(*grids):
        raise PredictError(f"the S1 and S2 stacks are not co-registered: {s1} is on {describe_grid(grids[0])}, {s2} "
                           f"on {describe_grid(grids[1])}; warp S1 onto the S2 grid first (prepare_scene.py)")


def check_scene(scene, bands: tuple[int, int], window: int) -> None:
    """Refuses a scene smaller than one window, or a run whose model takes other than VV and VH."""
    grid = scene.grid
    if min(grid["width"], grid["height"]) < window:
        raise PredictError(f"the scene ({scene.name}) is {grid['height']} x {grid['width']} px, smaller than one "
                           f"window of {window} px; pass a smaller --window")
    if bands[0] != len(scene.s1_band_names):
        raise PredictError(f"the run's model takes {bands[0]} S1 bands; a scene gives {len(scene.s1_band_names)} "
                           f"({', '.join(scene.s1_band_names)})")


def missing_share(x: np.ndarray) -> float:
    """Share of the pixels of a window (C, h, w) with a band NaN (missing)."""
    return float(np.isnan(x).any(0).mean())


class SceneWindows(Dataset):
    """The windows of a scene (an object with `grid` and `read(window) -> (s1, s2)`, NaN where missing), row by
    row: item i is window (row, col) = divmod(i, cols) at pixel (tops[row], lefts[col]) (`maps.window_origins`). Item:
    "s1", "s2" the network's inputs (zeros for a nodata window: more than MISSING_SHARE of its pixels missing in S1
    or in S2), "valid", "index" i, "counts" (2, 3) the NaN, +inf, -inf values of S1 and S2 normalised."""

    def __init__(self, scene, window: int, stride: int, recipe: str, norm_stats: dict | None = None) -> None:
        self.scene, self.window, self.stride, self.recipe = scene, window, stride, check_recipe(recipe)
        self.norm_stats = norm_stats
        self.grid = scene.grid
        self.tops = maps.window_origins(self.grid["height"], window, stride)
        self.lefts = maps.window_origins(self.grid["width"], window, stride)
        self.rows, self.cols = len(self.tops), len(self.lefts)
        self._pid = None

    def __len__(self) -> int:
        return self.rows * self.cols

    def __getitem__(self, index: int) -> dict:
        if self._pid != os.getpid():
            rasterio.env.set_gdal_config("GDAL_CACHEMAX", maps.GDAL_CACHE)  # each loader worker has its own cache
            self._pid = os.getpid()
        row, col = divmod(index, self.cols)
        s1, s2 = self.scene.read(Window(self.lefts[col], self.tops[row], self.window, self.window))
        valid = missing_share(s1) <= MISSING_SHARE and missing_share(s2) <= MISSING_SHARE
        if valid:
            s1, s2, counts = normalize(s1, s2, self.recipe, self.norm_stats)
        else:
            s1, s2, counts = torch.zeros(s1.shape), torch.zeros(s2.shape), np.zeros((2, 3), np.int64)
        return {"s1": s1, "s2": s2, "valid": valid, "index": index, "counts": torch.as_tensor(counts)}

    def close(self) -> None:
        self.scene.close()


@torch.inference_mode()
def window_logits(net: torch.nn.Module, loader: DataLoader, ctx: process.Context):
    """Yields (indices (b,), logits (b, K) float32 on the CPU, counts (2, 3) summed) of the valid windows of each
    batch of `loader` (over a SceneWindows); nodata windows never reach the device."""
    net.to(ctx.device)
    if ctx.channels_last:
        net.to(memory_format=torch.channels_last)
    for batch in loader:
        valid = batch["valid"]
        if valid.any():
            with ctx.autocast():
                logits = net(ctx.to_device(batch["s1"][valid]), ctx.to_device(batch["s2"][valid]))
            yield batch["index"][valid], logits.float().cpu(), batch["counts"].sum(0)


def scene_loader(windows: SceneWindows, ctx: process.Context, batch_size: int, persistent: bool = False) -> DataLoader:
    return DataLoader(windows, batch_size=batch_size, num_workers=ctx.workers, pin_memory=ctx.pin_memory,
                      persistent_workers=persistent and ctx.workers > 0, prefetch_factor=4 if ctx.workers > 0 else None)


def quantize(probs: Tensor, classes: Tensor) -> np.ndarray:
    """Probabilities (b, K) -> uint8 x 200, rounded; where rounding ties the window's class (b,) with another,
    the class gets one step more, so the bands' argmax is the map's class."""
    q = (probs * 200).round().to(torch.uint8)
    win = q.gather(1, classes[:, None])
    others = q.scatter(1, classes[:, None], 0).amax(1, keepdim=True)
    return q.scatter(1, classes[:, None], win + (win <= others).to(torch.uint8)).numpy()


def classify_scene(net: torch.nn.Module, loader: DataLoader, ctx: process.Context, probabilities: int = 0,
                   ) -> tuple[np.ndarray, np.ndarray | None, float, np.ndarray]:
    """Cell classes (rows, cols) uint8 (NODATA for nodata windows) of `loader`'s SceneWindows; with
    `probabilities` (the number of classes K) their quantised probabilities (rows, cols, K) uint8 (`quantize`,
    NODATA for nodata windows), else None; the windows per second; the NaN, +inf, -inf counts (2, 3) of S1 and
    S2 in the windows classified."""
    windows = loader.dataset
    cells = np.full(len(windows), maps.NODATA, dtype=np.uint8)
    probs = np.full((len(windows), probabilities), maps.NODATA, dtype=np.uint8) if probabilities else None
    counts = np.zeros((2, 3), np.int64)
    began = time.perf_counter()
    with tqdm(total=len(windows), desc="windows", unit="window", disable=None) as bar:
        done = 0
        for index, logits, batch_counts in window_logits(net, loader, ctx):
            classes = logits.argmax(1)
            cells[index.numpy()] = classes.numpy().astype(np.uint8)
            if probs is not None:
                probs[index.numpy()] = quantize(logits.softmax(1), classes)
            counts += batch_counts.numpy()
            # the bar counts nodata windows too: every index up to the last one classified
            bar.update(int(index.max()) + 1 - done)
            done = int(index.max()) + 1
        bar.update(len(windows) - done)
    windows.close()
    shape = (windows.rows, windows.cols)
    return (cells.reshape(shape), None if probs is None else probs.reshape(*shape, probabilities),
            len(windows) / max(time.perf_counter() - began, 1e-9), counts)


def check_truth(path: Path, grid: dict, classes: list[str]) -> None:
    """Refuses a --truth raster on another grid than the scene's (naming both in full) or naming other classes."""
    truth = read_grid(path)
    if not same_grid(truth, grid):
        raise PredictError(f"--truth {path} is on another grid than the scene: {describe_grid(truth)}; the scene is "
                           f"on {describe_grid(grid)}")
    with rasterio.open(path) as src:
        named = src.tags().get("classes")
    if named is not None and json.loads(named) != classes:
        raise PredictError(f"--truth {path} names the classes {json.loads(named)}; the run's are {classes}")


# ----------------------------------------------------------------------------- outputs never overwrite inputs

def scene_outputs(out: Path, probabilities: bool) -> list[Path]:
    """The files a scene's map writes: MAP.tif, MAP.png, MAP.json, MAP.qml (and MAP_prob.tif)."""
    return [out, *(out.with_suffix(s) for s in (".png", ".json", ".qml")),
            *([maps.probabilities_path(out)] if probabilities else [])]


def manifest_files(csv_path: Path) -> list[Path]:
    """Every cell of a manifest CSV as a path relative to its folder (the files it names, among other values)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            return [csv_path.parent / value for row in csv.reader(f) for value in row if value.strip()]
    except (OSError, UnicodeDecodeError):
        return []


def check_outputs(outputs: list[Path], inputs: list[Path], folders: list[Path]) -> None:
    """Refuses, before anything is written, an output that is one of `inputs` (also through a link) or lies
    inside one of `folders` (the run folder, a data folder)."""
    for out in outputs:
        for path in inputs:
            if same_file(out, path):
                raise PredictError(f"the output {out} is the input {path}: predict.py never overwrites its inputs; "
                                   f"write elsewhere")
        for folder in folders:
            if out.resolve().is_relative_to(folder.resolve()):
                raise PredictError(f"the output {out} lies inside {folder}, a folder predict.py reads (the run, its "
                                   f"data or a scene's product); write elsewhere")


def run_protected(run_path: Path) -> tuple[list[Path], list[Path]]:
    """(files, folders) of a run given as a folder or as a checkpoint file alone."""
    if run_path.is_dir():
        return [p for p in run_path.rglob("*") if p.is_file()], [run_path]
    return [run_path], []


def check_args_outputs(args: argparse.Namespace, run: RunInfo) -> None:
    """check_outputs on the files of this command (patches or one scene) against its inputs and the run."""
    files, folders = run_protected(Path(args.run))
    if args.s1 is not None:
        outputs, inputs = scene_outputs(args.out, args.probabilities), [*args.s1, args.s2, *filter(None, [args.truth])]
        folders += [p for p in (*args.s1, args.s2) if p.is_dir()]  # a SAFE product, a folder of band files
    else:
        outputs, inputs = [args.out], []
        root = args.data_root or (Path(run.config["data_root"]) if (run.config or {}).get("data_root") else None)
        if root is not None and root.is_dir():
            folders.append(root)
        elif root is not None:
            inputs += [root, *manifest_files(root)]
    check_outputs(outputs, files + inputs, folders)


# ----------------------------------------------------------------------------- one scene, many scenes

@dataclasses.dataclass
class Predictor:
    """What every scene of one command shares: the run, its network and how windows are read."""

    run: RunInfo
    classes: list[str]
    checkpoint: Path
    net: torch.nn.Module
    window: int
    stride: int
    recipe: str
    norm_stats: dict | None  # --normalize stats: the training split's band statistics
    ctx: process.Context
    batch_size: int
    bands: tuple[int, int]
    s2_band_names: list[str]  # the model's S2 bands, taken from each scene by name
    s1_scale: str  # --s1_scale
    s2_offset: float | None  # --s2_offset (None: the product's metadata, else 0)


def make_predictor(args: argparse.Namespace, run: RunInfo, classes: list[str]) -> Predictor:
    config = run_args(run)
    window = args.window or config.eval_crop or config.crop
    stride = args.stride or window
    if stride > window:
        raise PredictError(f"--stride {stride} is larger than the window ({window} px): pixels between windows "
                           f"would be classified unseen; pass a stride of at most the window")
    checkpoint = checkpoint_path(run, f"{args.weights}.pt")
    bands = checkpoint_bands(checkpoint)
    net = load_net(run, checkpoint, len(classes))
    recipe = check_recipe(getattr(config, "normalize", None) or "seed")
    norm_stats = getattr(config, "norm_stats", None) or (run.results or {}).get("norm_stats")
    batch_size = args.batch_size or config.eval_batch_size or 2 * config.batch_size
    return Predictor(run, classes, checkpoint, net, window, stride, recipe, norm_stats, make_context(args, run),
                     batch_size, bands, run_s2_bands(run, bands[1]), args.s1_scale or "db", args.s2_offset)


def predict_scene(p: Predictor, s1: Path | list[Path], s2: Path, out: Path, truth: Path | None = None,
                  probabilities: bool = False, level: int = logging.INFO) -> dict:
    """MAP.tif (+ MAP_prob.tif), MAP.qml, MAP.png and MAP.json of one scene (`s1`, `s2` as open_scene takes them);
    returns MAP.json's content."""
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise PredictError(f"the map {out} must end in .tif or .tiff (its .png, .json and .qml go beside it)")
    check_stacks(s1, s2)
    with open_scene(s1, s2, s1_scale=p.s1_scale, s2_offset=p.s2_offset, s2_bands=p.s2_band_names) as scene:
        check_outputs(scene_outputs(out, probabilities), scene.files, [])  # also the files a folder's links reach
        check_scene(scene, p.bands, p.window)
        grid = scene.grid
        if truth is not None:
            check_truth(truth, grid, p.classes)
        windows = SceneWindows(scene, p.window, p.stride, p.recipe, p.norm_stats)
        log.log(level, "%s: %d x %d windows of %d px every %d px over %d x %d px, normalisation %r, %s", p.run.path,
                windows.rows, windows.cols, p.window, p.stride, grid["height"], grid["width"], p.recipe,
                p.checkpoint)
        cells, probs, rate, counts = classify_scene(p.net, scene_loader(windows, p.ctx, p.batch_size), p.ctx,
                                                    len(p.classes) if probabilities else 0)
    tags = {"run": str(p.run.path), "weights": p.checkpoint.name, "window": p.window, "stride": p.stride,
            "normalize": p.recipe, "s1": ", ".join(map(str, s1 if isinstance(s1, list) else [s1])), "s2": str(s2),
            "s1_scale": p.s1_scale, "s2_bands": ",".join(p.s2_band_names),
            "placement": "each window's class over the stride x stride cell centred in it; windows also flush with "
                         "the right and bottom edges; the margins take the nearest window's class",
            "nodata_rule": f"255: a window with over {MISSING_SHARE:.0%} of its pixels missing in S1 or S2 (dataset "
                           f"mask or NaN)"}
    maps.write_map(out, cells, grid, p.window, p.stride, p.classes, tags, probs)
    maps.write_qml(out.with_suffix(".qml"), p.classes)
    agree = maps.agreement(out, truth) if truth else None
    pixels = maps.value_pixels(cells, grid, p.window, p.stride)
    info = {**tags, "out": str(out), "classes": p.classes, "grid": list(cells.shape), "cells": int(cells.size),
            "nodata_cells": int((cells == maps.NODATA).sum()), "pixels": grid["height"] * grid["width"],
            "nodata_pixels": int(pixels[maps.NODATA]),
            "class_pixels": {n: int(pixels[i]) for i, n in enumerate(p.classes)},
            "probabilities": str(maps.probabilities_path(out)) if probabilities else None,
            "windows_per_s": rate, "device": str(p.ctx.device),
            "nonfinite_values": {m: dict(zip(("nan", "+inf", "-inf"), c)) for m, c in zip(("s1", "s2"),
                                                                                          counts.tolist())},
            "truth": str(truth) if truth else None, "agreement": agree}
    title = (f"{p.run.config.get('name') or p.run.path.name} ({p.checkpoint.name}): {p.window} px windows every "
             f"{p.stride} px" + (f"\n{agree:.1f} % of the labelled pixels agree with the true classes"
                                 if agree is not None else ""))
    maps.preview(out.with_suffix(".png"), out, p.classes, title, truth)
    atomic_write_json(out.with_suffix(".json"), info)  # last: its presence marks a finished map
    log.log(level, "wrote %s (+ .png, .json, .qml%s): %d x %d windows, %d of %d px nodata, %.1f windows/s on %s%s",
            out, ", _prob.tif" if probabilities else "", *cells.shape, info["nodata_pixels"], info["pixels"], rate,
            p.ctx.device, "" if agree is None else f"; {agree:.1f} % agree with {truth}")
    return info


def main_scene(args: argparse.Namespace, run: RunInfo, classes: list[str]) -> dict:
    with maps.gdal_cache():
        return predict_scene(make_predictor(args, run, classes), args.s1[0] if len(args.s1) == 1 else args.s1,
                             args.s2, args.out, args.truth, args.probabilities)


def read_scenes(path: Path) -> list[dict]:
    """The rows of a --scenes CSV (columns s1, s2, name, optional truth; paths relative to its folder)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError) as error:
        raise PredictError(f"--scenes {path} cannot be read: {error}") from None
    missing = [c for c in ("s1", "s2", "name") if c not in columns]
    if missing or not rows:
        raise PredictError(f"--scenes {path}: expected a CSV with columns s1, s2, name (and optionally truth) and a "
                           f"row per scene; {'no column ' + ', '.join(missing) if missing else 'no row'}")
    scenes, lines = [], {}
    for line, row in enumerate(rows, start=2):
        name = (row.get("name") or "").strip()
        if not name or Path(name).name != name or name in (".", ".."):
            raise PredictError(f"--scenes {path} line {line}: name {row['name']!r} is not a plain file name")
        if name in lines:
            raise PredictError(f"--scenes {path}: the name {name!r} is on lines {lines[name]} and {line}")
        lines[name] = line
        files = {key: (row.get(key) or "").strip() for key in ("s1", "s2", "truth")}
        if not files["s1"] or not files["s2"]:
            raise PredictError(f"--scenes {path} line {line}: scene {name!r} needs both an s1 and an s2 file")
        scenes.append({"name": name, "line": line, **{k: path.parent / v if v else None for k, v in files.items()}})
    return scenes


def main_scenes(args: argparse.Namespace, run: RunInfo, classes: list[str]) -> dict:
    """Every scene of --scenes (this rank's: scenes rank, rank + world, ... under torchrun) into --out_dir/NAME.tif;
    a failing scene is logged and the others go on; a map whose JSON exists is skipped unless --overwrite."""
    scenes = read_scenes(args.scenes)
    files, folders = run_protected(Path(args.run))
    with maps.gdal_cache():
        p = make_predictor(args, run, classes)
        mine = scenes[p.ctx.rank::p.ctx.world]
        status = {}
        for i, scene in enumerate(mine, start=1):
            out = args.out_dir / f"{scene['name']}.tif"
            label = f"scene {i}/{len(mine)} {scene['name']!r} (line {scene['line']})"
            if out.with_suffix(".json").exists() and not args.overwrite:
                status[scene["name"]] = "skipped"
                log.info("%s: skipped, %s exists (--overwrite to redo it)", label, out.with_suffix(".json"))
                continue
            try:
                inputs = [args.scenes, scene["s1"], scene["s2"], *([scene["truth"]] if scene["truth"] else [])]
                check_outputs(scene_outputs(out, args.probabilities), files + inputs,
                              folders + [p for p in (scene["s1"], scene["s2"]) if p.is_dir()])
                info = predict_scene(p, scene["s1"], scene["s2"], out, scene["truth"], args.probabilities,
                                     level=logging.DEBUG)
            except (PredictError, OSError, ValueError, rasterio.errors.RasterioError) as error:
                status[scene["name"]] = "failed"
                log.error("%s: failed: %s", label, error)
                continue
            status[scene["name"]] = "done"
            log.info("%s: wrote %s, %d of %d px nodata, %.1f windows/s%s", label, out, info["nodata_pixels"],
                     info["pixels"], info["windows_per_s"],
                     "" if info["agreement"] is None else f", {info['agreement']:.1f} % agree with the truth")
    counts = {s: sum(v == s for v in status.values()) for s in ("done", "skipped", "failed")}
    failed = [name for name, s in status.items() if s == "failed"]
    log.info("%d scene(s) of %s on rank %d of %d: %d done, %d skipped, %d failed%s", len(mine), args.scenes,
             p.ctx.rank, p.ctx.world, *counts.values(), f" ({', '.join(failed)})" if failed else "")
    if failed:
        raise PredictError(f"{len(failed)} of {len(mine)} scenes failed: {', '.join(failed)} (their errors are "
                           f"logged above); rerun to redo only those")
    return {"out_dir": str(args.out_dir), "scenes": status}


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = flags.parser(__doc__)
    p.add_argument("run", type=Path, metavar="RUN",
                   help="a run folder of dfc_finetune.py, or one of its checkpoints (last.pt, best.pt) alone")
    p.add_argument("--out", type=Path, default=None, help="PRED.csv (patches) or MAP.tif (scene)")
    p.add_argument("--weights", choices=["last", "best"], default="last",
                   help="last.pt or best.pt of RUN (default last)")
    g = p.add_argument_group("patches")
    g.add_argument("--data_root", type=Path, default=None, help="data the run's script reads (default: the run's)")
    g.add_argument("--split", default=None, help="split to predict (default: the run's eval_split)")
    g = p.add_argument_group("scene")
    g.add_argument("--s1", type=Path, nargs="+", default=None, metavar="S1",
                   help="a 2-band GeoTIFF (VV, VH), a folder, or two files whose names hold VV and VH")
    g.add_argument("--s2", type=Path, default=None, help="a GeoTIFF stack, or a folder of band files (SAFE)")
    g.add_argument("--s1_scale", choices=S1_SCALES, default=None,
                   help="what S1 holds: db (default), power (dB = 10 log10), amplitude (dB = 20 log10)")
    g.add_argument("--s2_offset", type=float, default=None,
                   help="added to S2 digital numbers, in place of the product's metadata offsets when given "
                        "(default: the metadata's, else 0; -1000 for processing baseline 04.00 and later)")
    g.add_argument("--window", type=flags.positive_int, default=None,
                   help="window side, px (default: the run's --eval_crop, else its --crop)")
    g.add_argument("--stride", type=flags.positive_int, default=None,
                   help="step between windows, px (default: the window)")
    g.add_argument("--truth", type=Path, default=None,
                   help="a class raster on the scene's grid (255 nodata), shown beside the map and compared")
    g.add_argument("--probabilities", action="store_true",
                   help="also MAP_prob.tif: a uint8 band per class, probability x 200 (255 nodata)")
    g = p.add_argument_group("many scenes")
    g.add_argument("--scenes", type=Path, default=None,
                   help="a CSV of scenes (columns s1, s2, name, optional truth; paths relative to it)")
    g.add_argument("--out_dir", type=Path, default=None, help="with --scenes: where NAME.tif and its files go")
    g.add_argument("--overwrite", action="store_true", help="with --scenes: redo the maps already finished")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--batch_size", type=flags.positive_int, default=None,
                   help="windows or patches per batch (default: the run's evaluation batch)")
    g.add_argument("--workers", type=flags.non_negative_int, default=None,
                   help="DataLoader workers (default: as the training scripts choose)")
    return p


def check_modes(parser: argparse.ArgumentParser, args: argparse.Namespace, scene: bool) -> None:
    """parser.error for flags that do not apply to the mode asked (patches, a scene, --scenes)."""
    many = args.scenes is not None
    mode = "--scenes" if many else "a scene (--s1, --s2)" if scene else "patches (--data_root, --split)"
    foreign = {"--data_root": scene or many, "--split": scene or many, "--s1": many, "--s2": many, "--out": many,
               "--s1_scale": not (scene or many), "--s2_offset": not (scene or many),
               "--window": not (scene or many), "--stride": not (scene or many), "--truth": not scene,
               "--probabilities": not (scene or many), "--out_dir": not many, "--overwrite": not many}
    wrong = [f for f, bad in foreign.items() if bad and getattr(args, f[2:]) not in (None, False)]
    if wrong:
        parser.error(f"{', '.join(wrong)} {'do' if len(wrong) > 1 else 'does'} not apply to {mode}")
    if many and args.out_dir is None:
        parser.error("--scenes needs --out_dir")
    if not many and args.out is None:
        parser.error("--out is required (PRED.csv for patches, MAP.tif for a scene)")


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    scene = args.s1 is not None or args.s2 is not None
    if scene and (args.s1 is None or args.s2 is None):
        parser.error("a scene needs both --s1 and --s2")
    if scene and len(args.s1) > 2:
        parser.error("--s1 takes one file or folder, or two files (VV and VH)")
    check_modes(parser, args, scene)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        run = open_run(args.run, args.weights)
        if run.kind != "dfc_finetune":
            raise PredictError(f"{args.run} is a run of {run.kind}.py; predict.py applies runs of dfc_finetune.py")
        classes = run_classes(run)
        if args.scenes is not None:
            return main_scenes(args, run, classes)
        check_args_outputs(args, run)
        return (main_scene if scene else main_patches)(args, run, classes)
    except (PredictError, NotARunError, RunFolderError, OSError, ValueError, process.DeviceError) as error:
        sys.exit(f"predict.py: error: {error}")


if __name__ == "__main__":
    cli.run(main)
