"""Windows per second of predict.py's scene path against dfc_finetune.py's evaluation loop, side by side.

Both classify WINDOW px windows with one dual ResNet in eval mode, batch --batch_size, the same
DataLoader workers, float32:

    evaluation  metrics.evaluate over dfc_finetune.build_eval_set's data through process.make_loader:
                one window per synthetic DFC2020 test patch (cycled to as many windows as the
                scene's), three GeoTIFFs opened per patch, seed-normalised: the run's loop
    scene       predict.classify_scene over a mosaic of the same patches as one S1 and one S2
                GeoTIFF: windows every WINDOW px, read from the open files, seed-normalised

Both loaders keep their workers between passes (as the training scripts' evaluation loader
does), so the figures are steady-state throughput: worker start-up is in the untimed pass.

After one untimed pass of each, --passes timed passes of each alternate (which goes first
alternates too); a figure is the
best pass's windows per second (the least disturbed by other processes on a shared machine).

    python bench/bench_predict.py                 # resnet50, 224 px windows of 256 px patches (sized for a GPU)
    python bench/bench_predict.py --tiny          # resnet18, 32 px: CPU, seconds
    python bench/bench_predict.py --device cpu --patches 16 --mosaic 4 --passes 2   # resnet50 on a CPU

Predict stage (--predict_scene PX): predict.py itself, in a subprocess, on a PX x PX stacked scene (the
test patches tiled) with a tiny run (resnet18, 32 px windows, one epoch of dfc_finetune.py on the
synthetic patches): its seconds and its peak memory, the proportional set size (PSS) summed over
the process and its loader workers, sampled every 0.1 s.

    python bench/bench_predict.py --tiny --predict_scene 2048 --passes 1

Prepare stage (--prepare): prepare_scene.py, in its own process, on a synthetic L1C product of
--size px at 10 m (JPEG 2000 at 10/20/60 m, baseline 04.00; S1 linear power in EPSG:4326): seconds,
and peak memory as the proportional set size summed over its process tree (sampled every 0.1 s).

    python bench/bench_predict.py --prepare --size 2048
"""
import argparse
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dfc_finetune  # noqa: E402
import predict  # noqa: E402
import synthetic_data  # noqa: E402
from augment import Views  # noqa: E402
from datasets.scenes import open_scene  # noqa: E402
from models import DualResNet, MultiModalNet  # noqa: E402
from util import flags, maps, metrics, process  # noqa: E402

PRESETS = {
    "gpu": dict(arch="resnet50", window=224, patch_size=256, patches=64, mosaic=16, batch_size=128, passes=3,
                workers=min(16, os.cpu_count() or 1)),
    "tiny": dict(arch="resnet18", window=32, patch_size=40, patches=8, mosaic=4, batch_size=8, passes=1, workers=1),
}


def build_parser() -> argparse.ArgumentParser:
    p = flags.parser(__doc__)
    p.add_argument("--tiny", action="store_true", help="toy sizes for a CPU: every default takes its --tiny value")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available")
    p.add_argument("--arch", default=None, help="backbone (default resnet50; --tiny resnet18)")
    p.add_argument("--window", type=flags.positive_int, default=None, help="window side, px (default 224; --tiny 32)")
    p.add_argument("--patch_size", type=flags.positive_int, default=None,
                   help="synthetic patch side, px (default 256; --tiny 40)")
    p.add_argument("--patches", type=flags.positive_int, default=None,
                   help="synthetic test patches (default 64; --tiny 8)")
    p.add_argument("--mosaic", type=flags.positive_int, default=None,
                   help="the scene is MOSAIC x MOSAIC patches, the written ones repeated (default 16; --tiny 4)")
    p.add_argument("--batch_size", type=flags.positive_int, default=None,
                   help="windows per batch (default 128; --tiny 8)")
    p.add_argument("--passes", type=flags.positive_int, default=None, help="timed passes of each (default 3; --tiny 1)")
    p.add_argument("--workers", type=flags.non_negative_int, default=None,
                   help="DataLoader workers (default: CPUs, at most 16; --tiny 1)")
    p.add_argument("--predict_scene", type=flags.non_negative_int, default=0, metavar="PX",
                   help="also time predict.py on a PX x PX scene with a tiny run, with its peak memory (0: no)")
    p.add_argument("--prepare", action="store_true", help="measure prepare_scene.py instead (the prepare stage)")
    p.add_argument("--size", type=flags.positive_int, default=10980,
                   help="--prepare: the synthetic tile's side at 10 m, px (default 10980, a Sentinel-2 tile)")
    return p


def bench_prepare(size: int) -> None:
    """The prepare stage: prepare_scene.py on a synthetic product of `size` px, timed and sampled."""
    sys.path.insert(0, str(ROOT / "tests"))
    import products

    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        safe, s1 = products.l1c_large(Path(tmp), size)
        print(f"bench_predict: wrote a {size} px L1C product and S1 in {time.perf_counter() - began:.1f} s", flush=True)
        command = [sys.executable, str(ROOT / "prepare_scene.py"), "--s1", str(s1), "--s2", str(safe), "--out_s1",
                   str(Path(tmp) / "S1.tif"), "--out_s2", str(Path(tmp) / "S2.tif"), "--s1_scale", "power"]
        seconds, peak = measured(command)
        sizes = {p.name: p.stat().st_size / 2**20 for p in (Path(tmp) / "S1.tif", Path(tmp) / "S2.tif")}
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import prepare_scene; "
            "print(open('/proc/self/smaps_rollup').read())")
    imports = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, check=True).stdout
    baseline = next(int(line.split()[1]) for line in imports.splitlines() if line.startswith("Pss:")) / 1024
    print(f"prepare {size} px: {seconds:.1f} s ({usage.ru_utime + usage.ru_stime:.1f} CPU s), peak {peak / 2**20:.0f} "
          f"MB (PSS summed over its processes, of which {baseline:.0f} MB the interpreter and its imports; max RSS "
          f"{usage.ru_maxrss / 1024:.0f} MB); S1.tif {sizes['S1.tif']:.0f} MB, S2.tif {sizes['S2.tif']:.0f} MB",
          flush=True)


def write_mosaic(root: Path, folder: Path, n: int) -> tuple[Path, Path]:
    """S1 and S2 scenes of n x n test patches of `root`, repeated in data set order, on one grid."""
    test = dfc_finetune.build_eval_set(argparse.Namespace(eval_crop=0, eval_offset_seed=0, normalize="seed"), root,
                                       "test")
    arrays = {}
    for m in ("s1", "s2"):
        patches = []
        for files in test.source.files:
            with rasterio.open(files[m]) as src:
                patches.append(src.read())
        tiles = [patches[i % len(patches)] for i in range(n * n)]
        arrays[m] = np.block([tiles[r * n:(r + 1) * n] for r in range(n)])
    transform = rasterio.Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)
    for m, array in arrays.items():
        with rasterio.open(folder / f"{m}.tif", "w", driver="GTiff", width=array.shape[2], height=array.shape[1],
                           count=array.shape[0], dtype=array.dtype, crs="EPSG:32633", transform=transform) as dst:
            dst.write(array)
    return folder / "s1.tif", folder / "s2.tif"


def write_large_scene(root: Path, folder: Path, size: int) -> tuple[Path, Path]:
    """S1 and S2 scenes of size x size px: the test patches of `root` tiled, written by rows of patches (tiled,
    deflate), never whole."""
    patches = {m: [] for m in ("s1", "s2")}
    test = dfc_finetune.build_eval_set(argparse.Namespace(eval_crop=0, eval_offset_seed=0, normalize="seed"), root,
                                       "test")
    for files in test.source.files:
        for m in patches:
            with rasterio.open(files[m]) as src:
                patches[m].append(src.read())
    paths = []
    for m, tiles in patches.items():
        side = tiles[0].shape[1]
        profile = dict(driver="GTiff", width=size, height=size, count=tiles[0].shape[0], dtype=tiles[0].dtype,
                       crs="EPSG:32633", transform=rasterio.Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0),
                       tiled=True, compress="deflate", BIGTIFF="IF_SAFER")
        with rasterio.open(folder / f"big_{m}.tif", "w", **profile) as dst:
            for r, top in enumerate(range(0, size, side)):
                rows = min(side, size - top)
                row = np.concatenate([tiles[(r + c) % len(tiles)] for c in range(-(-size // side))], axis=2)
                dst.write(row[:, :rows, :size], window=rasterio.windows.Window(0, top, size, rows))
        paths.append(folder / f"big_{m}.tif")
    return paths[0], paths[1]


def tree_pss(pid: int) -> int:
    """Bytes of proportional set size of process `pid` and of its descendants (0 for those gone)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, grown = {pid}, True
    while grown:
        children = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= children
        grown = bool(children)
    total = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
        except (OSError, StopIteration):
            continue
    return total


def measured(command: list[str]) -> tuple[float, int]:
    """Seconds and peak summed PSS (bytes) of `command` run to its end (an error if it fails)."""
    with tempfile.TemporaryFile("w+") as stderr:  # a pipe unread while polling would block a chatty child
        began = time.perf_counter()
        process_ = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        peak = 0
        while process_.poll() is None:
            peak = max(peak, tree_pss(process_.pid))
            time.sleep(0.1)
        seconds = time.perf_counter() - began
        if process_.returncode:
            stderr.seek(0)
            raise SystemExit(f"bench_predict: {' '.join(command)} failed:\n{stderr.read()[-3000:]}")
    return seconds, peak


def predict_stage(root: Path, folder: Path, size: int, args: argparse.Namespace) -> None:
    """predict.py on a size x size scene with a tiny run trained here: seconds and peak memory, printed."""
    run = folder / "tiny_run"
    data = synthetic_data.write_dfc2020(folder / "dfc_run", 8, 4, seed=0, size=40)
    measured([sys.executable, str(ROOT / "dfc_finetune.py"), "--data_root", str(data), "--save_path", str(run),
              "--arch", "resnet18", "--crop", "32", "--eval_crop", "32", "--epochs", "1", "--batch_size", "4",
              "--workers", "0", "--device", "cpu", "--lr", "1e-3", "--head_lr", "1e-3", "--finetune"])
    began = time.perf_counter()
    with maps.gdal_cache():
        s1, s2 = write_large_scene(root, folder, size)
    print(f"bench_predict: wrote a {size} x {size} px scene in {time.perf_counter() - began:.1f} s", flush=True)
    command = [sys.executable, str(ROOT / "predict.py"), str(run), "--s1", str(s1), "--s2", str(s2), "--out",
               str(folder / "map.tif"), "--device", args.device, "--batch_size", str(args.batch_size), "--workers",
               str(args.workers)]
    seconds, peak = measured(command)
    with rasterio.open(folder / "map.tif") as src:
        windows = (-(-(src.width - 32) // 32) + 1) ** 2
    print(f"predict stage: {size} x {size} px, {windows} windows of 32 px, resnet18 (tiny run), {args.device}, "
          f"batch {args.batch_size}, workers {args.workers}: {seconds:.1f} s, peak memory {peak / 2**20:.0f} MB "
          f"(PSS summed over predict.py and its workers)", flush=True)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.prepare:
        return bench_prepare(args.size)
    for key, value in PRESETS["tiny" if args.tiny else "gpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    logging.getLogger("datasets").setLevel(logging.ERROR)  # the synthetic patches hold NaN pixels on purpose
    hardware = argparse.Namespace(device=args.device, workers=args.workers, progress=False, amp=False,
                                  channels_last=None)
    ctx = process.plan_context(hardware, {}, torch.cuda.is_available(), torch.cuda.device_count(),
                               os.cpu_count() or 1)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    net = DualResNet(args.arch).eval().to(ctx.device)
    if ctx.channels_last:
        net.to(memory_format=torch.channels_last)
    model = MultiModalNet({"s1": net.backbone1, "s2": net.backbone2}, fused_head=net.fc)
    views = Views(["s1", "s2"], None, ctx, 0)
    print(f"bench_predict: {ctx.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"dual {args.arch}, {args.window} px windows, batch {args.batch_size}, {ctx.workers} workers", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        root = synthetic_data.write_dfc2020(Path(tmp) / "dfc", 0, args.patches, seed=0, size=args.patch_size)
        s1, s2 = write_mosaic(root, Path(tmp), args.mosaic)
        print(f"bench_predict: wrote {args.patches} patches of {args.patch_size} px and a "
              f"{args.mosaic} x {args.mosaic} patch mosaic in {time.perf_counter() - began:.1f} s", flush=True)
        run = argparse.Namespace(eval_crop=args.window, eval_offset_seed=0, normalize="seed")
        eval_set = dfc_finetune.build_eval_set(run, root, "test")
        windows = predict.SceneWindows(open_scene(s1, s2), args.window, args.window, "seed")
        cycled = [i % len(eval_set) for i in range(len(windows))]
        loader = process.make_loader(eval_set, args.batch_size, ctx, argparse.Namespace(seed=0), train=False,
                                     indices=cycled)
        scene_loader = predict.scene_loader(windows, ctx, args.batch_size, persistent=True)

        def evaluation() -> int:
            metrics.evaluate(model, loader, views, ctx, eval_set.classes)
            return len(cycled)

        def scene() -> int:
            predict.classify_scene(net, scene_loader, ctx)
            return len(windows)

        rates = {"evaluation": [], "scene": []}
        for p in range(args.passes + 1):
            timed = p > 0
            for name, measure in (("evaluation", evaluation), ("scene", scene))[::1 if p % 2 else -1]:
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize()
                began = time.perf_counter()
                n = measure()
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize()
                if timed:
                    rates[name].append(n / (time.perf_counter() - began))
                    print(f"bench_predict: {name} pass {len(rates[name])}: {rates[name][-1]:.1f} windows/s", flush=True)
        if args.predict_scene:
            predict_stage(root, Path(tmp), args.predict_scene, args)
    best = {name: max(r) for name, r in rates.items()}
    print(f"predict windows/s: scene {best['scene']:.1f} ({len(windows)} windows) | evaluation loop "
          f"{best['evaluation']:.1f} ({len(cycled)} windows) | scene / evaluation "
          f"{best['scene'] / best['evaluation']:.2f} | {ctx.device}, dual {args.arch}, {args.window} px, "
          f"batch {args.batch_size}, best of {args.passes}", flush=True)


if __name__ == "__main__":
    main()
