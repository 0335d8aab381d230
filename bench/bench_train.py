"""The DFC2020 SupCon+CE fine-tuning step of dfc_finetune.py: original style against the fast path.

Original style: float32, NCHW, three backbone passes per step (two views, then the original again
for CE), the SupCon view made per sample in the DataLoader workers, a plain DataLoader.
Fast path: bf16 autocast for the backbones with the losses in float32, channels_last (both CUDA
only), one pass per view, views made in batches on the device, engine.make_loader (pinned memory,
persistent workers, prefetch). Both are assembled from engine's pieces, as dfc_finetune.py does.

Three measurements, each configuration in a fresh process (peak memory, cuDNN autotuning and
compile caches start clean): the training step with its inputs already on the device; the
training step fed by the DataLoader from synthetic DFC2020 GeoTIFFs in a temporary folder;
evaluation without gradients on whole patches. Peak memory: torch.cuda.max_memory_allocated on
CUDA (weights, Adam state and activations), growth of the main process's max RSS on CPU (the
DataLoader workers' memory is not counted).

    python bench/bench_train.py                      # cuda when available: resnet50, 224 px
    python bench/bench_train.py --device cpu --steps 10 --batch-sizes 8 16
"""
import argparse
import itertools
import logging
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
import synthetic_data  # noqa: E402
from augment import TwoViews, dfc_augment  # noqa: E402
from datasets import DFC2020Dataset  # noqa: E402
from losses import SupConLoss  # noqa: E402
from models import DualResNet, param_groups  # noqa: E402

log = logging.getLogger("bench_train")

# The CUDA sizes are dfc_finetune.py's; the CPU ones keep the whole bench within a few minutes on
# 2 cores. 512 patches of 256 px take about 1.3 GB of disk and hold 4 batches of 128.
DEFAULTS = {
    "cuda": dict(arch="resnet50", crop=224, patch_size=256, patches=512, batch_sizes=[32, 128], warmup=5, steps=20),
    "cpu": dict(arch="resnet18", crop=64, patch_size=96, patches=64, batch_sizes=[8, 16], warmup=2, steps=8,
                threads=max(1, (os.cpu_count() or 1) - 1)),
}
SUPCON_TEMPERATURE = 0.07


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, views: engine.Views, supcon: SupConLoss,
               ctx: engine.Context, batch: dict, epoch: int, step: int) -> None:
    """One step of engine.fit running dfc_finetune.py's step: forward, compose_loss, backward, Adam."""
    labels = batch["label"].to(ctx.device, non_blocking=True)
    with ctx.autocast():
        terms = engine.compose_loss(model(views(batch, epoch, step)), labels, supcon=supcon)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()


def device_batch(style: str, batch_size: int, size: int, device: torch.device) -> dict:
    """A training batch on the device: crops (B, C, size, size) for the fast path, which augments
    them itself; (augmented, original) pairs of them for the original style, as its workers yield."""
    g = torch.Generator().manual_seed(0)
    batch = {"s1": torch.rand(batch_size, 2, size, size, generator=g),
             "s2": torch.rand(batch_size, 13, size, size, generator=g),
             "label": torch.randint(0, 8, (batch_size,), generator=g)}
    if style == "original":
        for m in ("s1", "s2"):
            batch[m] = list(TwoViews(dfc_augment())(batch[m], generator=g))
    return {k: [x.to(device) for x in v] if isinstance(v, list) else v.to(device) for k, v in batch.items()}


def loader_batches(style: str, root: Path, batch_size: int, crop: int, ctx: engine.Context,
                   views: engine.Views, workers: int | None) -> Iterator[tuple[int, int, dict]]:
    """(epoch, step, batch) over as many epochs as asked, read from the GeoTIFFs under `root`."""
    dataset = DFC2020Dataset(root, "validation", crop=crop, train=True, transform=views.dataset_transform())
    loader = engine.make_loader(dataset, batch_size, ctx, argparse.Namespace(seed=0, workers=workers), train=True)
    if style == "original":
        # As many workers as make_loader picks, so the comparison is of what each worker does
        # and of pinning, persistence and prefetch, not of the worker count.
        loader = DataLoader(dataset, batch_size, shuffle=True, drop_last=True, num_workers=loader.num_workers)
    for epoch in itertools.count():
        dataset.set_epoch(epoch)
        if isinstance(loader.sampler, engine.EpochSampler):
            loader.sampler.set_epoch(epoch)
        for step, batch in enumerate(loader):
            yield epoch, step, batch


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(kind: str, style: str, batch_size: int, args: argparse.Namespace, root: Path,
            start_method: str) -> dict[str, float]:
    """Samples/s after warm-up, peak memory (MiB) and warm-up time (s) of one configuration.

    Args:
        kind: "step" (inputs on the device), "loader" (end to end) or "eval" (no grad, whole patches).
        style: "original", "fast" or "compiled" (the fast step under torch.compile).
        start_method: how the DataLoader workers start, as in a script run directly (a spawned
            process would spawn them too, re-importing everything at every epoch of the original style).
    """
    mp.set_start_method(start_method, force=True)
    logging.getLogger("datasets").setLevel(logging.ERROR)  # the synthetic NaN pixels are on purpose
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = max_rss()
    fast = style != "original"
    ctx = engine.Context(device, rank=0, world=1, amp=fast and cuda, channels_last=fast and cuda)
    net = DualResNet(args.arch)
    model = engine.wrap(engine.MultiViewClassifier({"s1": net.backbone1, "s2": net.backbone2}, {"fused": net.fc},
                                                   separate_ce_pass=style == "original"), ctx, argparse.Namespace(compile=style == "compiled"))
    views = engine.Views(["s1", "s2"], dfc_augment(), 2, "device" if fast else "loader", ctx, seed=0)

    if kind == "eval":
        model.eval()
        patches = {"s1": torch.rand(batch_size, 2, args.patch_size, args.patch_size, device=device),
                   "s2": torch.rand(batch_size, 13, args.patch_size, args.patch_size, device=device)}
        batches = itertools.repeat((0, 0, patches))

        @torch.no_grad()
        def run(batch: dict, epoch: int, step: int) -> None:
            with ctx.autocast():
                out = model(views.originals(batch))
            engine.predict(out["logits"]).cpu()  # what engine.evaluate collects, a sync per batch
    else:
        model.train()
        optimizer = torch.optim.Adam(param_groups(net, net.fc, lr=1e-5, head_lr=3e-6, weight_decay=1e-3))
        supcon = SupConLoss(SUPCON_TEMPERATURE, "all", SUPCON_TEMPERATURE)
        if kind == "step":
            batches = itertools.repeat((0, 0, device_batch(style, batch_size, args.crop, device)))
        else:
            batches = loader_batches(style, root, batch_size, args.crop, ctx, views, args.workers)

        def run(batch: dict, epoch: int, step: int) -> None:
            train_step(model, optimizer, views, supcon, ctx, batch, epoch, step)

    start = time.perf_counter()
    for i, (epoch, step, batch) in enumerate(itertools.islice(batches, args.warmup + args.steps)):
        if i == args.warmup:
            if cuda:
                torch.cuda.synchronize(device)
            warm = time.perf_counter()
        run(batch, epoch, step)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - warm
    peak = torch.cuda.max_memory_allocated(device) if cuda else max_rss() - rss_before
    return {"rate": batch_size * args.steps / seconds, "peak": peak / 2**20, "warmup": warm - start}


def fresh(kind: str, style: str, batch_size: int, args: argparse.Namespace, root: Path) -> dict[str, float] | None:
    """`measure` in a new process, so that nothing of the previous configuration carries over;
    None when the configuration does not fit in GPU memory (the other rows are still worth having)."""
    log.info("%s, %s, batch %d", kind, style, batch_size)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(measure, kind, style, batch_size, args, root, mp.get_start_method()).result()
        except torch.OutOfMemoryError:
            log.warning("%s, %s, batch %d: out of GPU memory", kind, style, batch_size)
            return None


def cell(result: dict[str, float] | None, key: str, digits: int) -> str:
    return "OOM" if result is None else f"{result[key]:.{digits}f}"


def ratio(new: dict[str, float] | None, old: dict[str, float] | None, key: str) -> str:
    return "-" if new is None or old is None else f"{new[key] / old[key]:.2f}"


def comparison_table(rows: list[tuple[str, dict | None, dict | None]], first: str) -> None:
    print(f"| {first} | original samples/s | fast samples/s | speed-up | original peak MiB | fast peak MiB | fast / original memory |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for label, orig, fast in rows:
        print(f"| {label} | {cell(orig, 'rate', 1)} | {cell(fast, 'rate', 1)} | {ratio(fast, orig, 'rate')}x "
              f"| {cell(orig, 'peak', 0)} | {cell(fast, 'peak', 0)} | {ratio(fast, orig, 'peak')} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--arch", default=None, help="backbone (default resnet50 on CUDA, resnet18 on CPU)")
    parser.add_argument("--crop", type=int, default=None, help="training crop, px (default 224 on CUDA, 64 on CPU)")
    parser.add_argument("--patch-size", type=int, default=None, help="synthetic patch side and evaluation input, px (default 256 / 96)")
    parser.add_argument("--patches", type=int, default=None, help="synthetic patches written for the loader (default 512 / 64)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="training batch sizes (default 32 128 / 8 16)")
    parser.add_argument("--eval-batch-sizes", type=int, nargs=2, default=[32, 128], metavar=("ORIGINAL", "FAST"),
                        help="evaluation batch of the original style and of the fast path (default 32 128)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 / 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 / 8)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: engine.make_loader's choice)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the training process (default on CPU: one core less than the machine's, "
                             "left to the DataLoader worker; more threads than free cores stall on CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the fast step under torch.compile (default: on with CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    for key, value in DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    if args.crop > args.patch_size:
        parser.error(f"--crop {args.crop} is larger than --patch-size {args.patch_size}")
    if args.warmup < 1 or args.steps < 1:
        parser.error(f"--warmup and --steps must be at least 1, got {args.warmup} and {args.steps}")
    if args.patches < max(args.batch_sizes):
        parser.error(f"--patches {args.patches} holds no batch of {max(args.batch_sizes)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    with tempfile.TemporaryDirectory() as tmp:
        log.info("writing %d synthetic DFC2020 patches of %d px to %s", args.patches, args.patch_size, tmp)
        root = synthetic_data.write_dfc2020(tmp, n_validation=args.patches, n_test=0, seed=0, size=args.patch_size)
        step = {(s, b): fresh("step", s, b, args, root) for b in args.batch_sizes for s in ("original", "fast")}
        compiled = {b: fresh("step", "compiled", b, args, root) for b in args.batch_sizes} if args.compile else {}
        loader = {(s, b): fresh("loader", s, b, args, root) for b in args.batch_sizes for s in ("original", "fast")}
        evaluation = {s: fresh("eval", s, b, args, root) for s, b in zip(("original", "fast"), args.eval_batch_sizes)}

    # Named only now: the measuring processes should have the GPU's memory to themselves.
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({os.cpu_count()} cores, {args.threads} torch threads)")
    print(f"# DFC2020 SupCon+CE fine-tuning step, original style vs fast path: {name}")
    print()
    print(f"Dual {args.arch}, {args.crop} px training crops of {args.patch_size} px patches; {args.steps} timed steps "
          f"after {args.warmup} warm-up steps; peak memory: "
          + ("torch.cuda.max_memory_allocated." if device.type == "cuda" else "max RSS growth of the main process."))
    print()
    print("## Training step, inputs on the device (forward, compose_loss, backward, Adam)")
    print()
    comparison_table([(str(b), step["original", b], step["fast", b]) for b in args.batch_sizes], "batch")
    if compiled:
        print("## Fast step under torch.compile (compile time: the warm-up steps, compilation included)")
        print()
        print("| batch | fast samples/s | compiled samples/s | speed-up | compile + warm-up s | compiled peak MiB |")
        print("|---:|---:|---:|---:|---:|---:|")
        for b, c in compiled.items():
            fast = step["fast", b]
            print(f"| {b} | {cell(fast, 'rate', 1)} | {cell(c, 'rate', 1)} | {ratio(c, fast, 'rate')}x "
                  f"| {cell(c, 'warmup', 1)} | {cell(c, 'peak', 0)} |")
        print()
    print(f"## End to end: DataLoader over {args.patches} synthetic GeoTIFF patches on local disk")
    print()
    comparison_table([(str(b), loader["original", b], loader["fast", b]) for b in args.batch_sizes], "batch")
    print(f"## Evaluation without gradients, whole {args.patch_size} px patches, inputs on the device")
    print()
    comparison_table([("{} / {}".format(*args.eval_batch_sizes), evaluation["original"], evaluation["fast"])],
                     "batch original / fast")


if __name__ == "__main__":
    main()
