"""Throughput of dfc_finetune.py's SupCon+CE training step and of its evaluation: four configurations side by side.

The objects and the step are dfc_finetune.py's own (its parser's defaults, build_model, build_loss, build_optimizer,
build_views, make_step), followed by what engine.train_one_epoch does with the loss (non-finite check, zero_grad,
backward, optimizer.step).

    original  the original's arithmetic: float32, NCHW, --ce_from separate (3B images encoded per modality and step)
    default   the repository's default: the same float32 computation, channels_last where CUDA
    bf16      --amp: bf16 autocast (losses float32), channels_last where CUDA; --ce_from separate
    fast      --amp --ce_from joint (CE reads the original half of the joint pass: 2B images), the scripts' FAST=1

Measurements, in this order, each printed the moment it is taken (a run stopped by a time limit keeps them):

    step      the training step (views, forward, loss, backward, Adam) on a fixed batch on the device: the model alone
    eval      model.eval(), no gradients, originals only, --eval_batch_size, predictions copied to the host as
              metrics.evaluate does (fast evaluates as bf16 does)
    loader    the training step fed by process.make_loader (--workers, pinned memory on CUDA) over synthetic DFC2020
              GeoTIFFs: random crops read from disk, seed-normalised
    compile   the fast step under torch.compile (compilation is in the warm-up)

Each: a warm-up of at most --warmup steps and --warmup_s seconds (at least one step), then --steps timed steps. Peak
memory: torch.cuda.max_memory_allocated on CUDA (weights, Adam state, activations); on CPU the peak RSS of this
process (VmHWM, reset before each measurement; DataLoader workers not counted). A markdown table ends the run.

    python bench/bench_train.py                        # resnet50, 224 px, batch 128 (sized for a GPU)
    python bench/bench_train.py --tiny                 # resnet18, 32 px, batch 4, 2 steps: CPU, seconds
    python bench/bench_train.py --data_root DATA --workers 16 --parts step loader
"""
import argparse
import gc
import itertools
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dfc_finetune  # noqa: E402
import synthetic_data  # noqa: E402
from augment import Views  # noqa: E402
from datasets import DFC2020Dataset  # noqa: E402
from util import flags, metrics, process  # noqa: E402

# name -> (--ce_from, bf16 autocast, channels_last where CUDA)
CONFIGS = {"original": ("separate", False, False), "default": ("separate", False, True),
           "bf16": ("separate", True, True), "fast": ("joint", True, True)}
PARTS = ("step", "eval", "loader", "compile")
# Flag defaults: sized for a GPU, and the --tiny preset (CPU, seconds). Explicit flags win over both.
PRESETS = {
    "gpu": dict(arch="resnet50", crop=224, batch_size=128, eval_batch_size=128, patch_size=256, patches=64,
                warmup=3, steps=10, workers=min(16, os.cpu_count() or 1)),
    "tiny": dict(arch="resnet18", crop=32, batch_size=4, eval_batch_size=8, patch_size=40, patches=8,
                 warmup=1, steps=2, workers=1),
}


@dataclass
class Figure:
    """One measurement: samples/s and peak memory (GiB on CUDA, MiB RSS on CPU); rate None: out of memory."""

    part: str
    config: str
    batch: int
    rate: float | None
    peak: float | None
    warmup_s: float | None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--tiny", action="store_true",
                   help="toy sizes for a CPU: every default below takes its --tiny value")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--arch", default=None, help="backbone (default resnet50; --tiny resnet18)")
    p.add_argument("--crop", type=flags.positive_int, default=None,
                   help="training crop and evaluation input, px (default 224, as dfc_finetune.py; --tiny 32)")
    p.add_argument("--batch_size", type=flags.positive_int, default=None, help="training batch (default 128; --tiny 4)")
    p.add_argument("--eval_batch_size", type=flags.positive_int, default=None,
                   help="evaluation batch (default 128; --tiny 8)")
    p.add_argument("--warmup", type=flags.positive_int, default=None,
                   help="untimed warm-up steps at most, see --warmup_s (default 3; --tiny 1)")
    p.add_argument("--warmup_s", type=flags.positive, default=20.0,
                   help="stop the warm-up after the step that passes this many seconds (default 20)")
    p.add_argument("--steps", type=flags.positive_int, default=None,
                   help="timed steps per measurement (default 10; --tiny 2)")
    p.add_argument("--workers", type=flags.non_negative_int, default=None,
                   help="DataLoader workers of the loader measurements (default: CPU count, at most 16; --tiny 1)")
    p.add_argument("--data_root", type=Path, default=None,
                   help="DFC2020 root whose validation split feeds the loader (default: synthetic patches in a "
                        "temporary folder)")
    p.add_argument("--patches", type=flags.positive_int, default=None,
                   help="synthetic patches written without --data_root; the loader cycles over them (default 64; "
                        "--tiny 8)")
    p.add_argument("--patch_size", type=flags.positive_int, default=None,
                   help="side of the synthetic patches, px (default 256; --tiny 40)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                   help="configurations (default: all four)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=None,
                   help="measurements, run in the order step, eval, loader, compile (default: all on CUDA; without "
                        "compile on CPU)")
    return p


def resolve(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    for key, value in PRESETS["tiny" if args.tiny else "gpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = torch.device(args.device)
    if args.parts is None:
        args.parts = list(PARTS) if args.device.type == "cuda" else [p for p in PARTS if p != "compile"]
    if args.data_root is None and args.crop > args.patch_size:
        p.error(f"--crop {args.crop} is larger than --patch_size {args.patch_size}")
    return args


# ----------------------------------------------------------------------------- memory

def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM back to the current RSS
    except OSError:
        pass  # elsewhere the figure is the process's peak so far


def peak(device: torch.device) -> float:
    """GiB allocated by torch on CUDA; MiB of peak RSS of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_text(value: float, device: torch.device) -> str:
    return f"{value:.1f} GiB" if device.type == "cuda" else f"{value:.0f} MiB RSS"


def release(device: torch.device) -> None:
    """Let the next measurement start from an empty device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- what is timed

@dataclass
class Setup:
    """dfc_finetune.py's objects for one configuration."""

    ctx: process.Context
    model: torch.nn.Module
    views: Views
    step: Callable[[dict, int, int], None]


def build(config: str, args: argparse.Namespace, *, compiled: bool = False) -> Setup:
    """dfc_finetune.py's objects for `--finetune --use_sup_con` and the configuration's flags."""
    ce_from, amp, channels_last = CONFIGS[config]
    cuda = args.device.type == "cuda"
    argv = ["--finetune", "--use_sup_con", "--arch", args.arch, "--crop", str(args.crop), "--ce_from", ce_from,
            "--batch_size", str(args.batch_size), *(["--compile"] if compiled else [])]
    script_args = dfc_finetune.build_parser().parse_args(argv)
    ctx = process.Context(device=args.device, amp=amp and cuda, channels_last=channels_last and cuda,
                          workers=args.workers, pin_memory=cuda)
    torch.manual_seed(0)
    net, model = dfc_finetune.build_model(script_args, ctx, num_classes=8, bands=(2, 13))
    optimizer = dfc_finetune.build_optimizer(script_args, net)
    views = dfc_finetune.build_views(script_args, ctx)
    step = dfc_finetune.make_step(views, model, dfc_finetune.build_loss(script_args, ctx), ctx)

    def train_step(batch: dict, epoch: int, i: int) -> None:
        """The script's step and what engine.train_one_epoch does with its loss."""
        loss = step(batch, epoch, i)["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{config}: non-finite loss {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return Setup(ctx, model, views, train_step)


def random_batch(batch_size: int, size: int, device: torch.device) -> dict:
    """A batch as the loader gives it (seed-normalised values in [0, 1)), already on the device."""
    g = torch.Generator().manual_seed(0)
    return {"s1": torch.rand(batch_size, 2, size, size, generator=g).to(device),
            "s2": torch.rand(batch_size, 13, size, size, generator=g).to(device),
            "label": torch.randint(0, 8, (batch_size,), generator=g).to(device)}


def repeated(batch: dict) -> Iterator[tuple[dict, int, int]]:
    """The same batch at every step; the augmentation draws still change with the step."""
    return ((batch, 0, i) for i in itertools.count())


def timed(run: Callable[[dict, int, int], None], batches: Iterator[tuple[dict, int, int]],
          args: argparse.Namespace) -> tuple[float, float]:
    """(timed steps per second, warm-up seconds) of `run` over `batches`."""
    cuda = args.device.type == "cuda"
    began = time.perf_counter()
    for done in itertools.count(1):
        run(*next(batches))
        if cuda:
            torch.cuda.synchronize(args.device)
        if done >= args.warmup or time.perf_counter() - began >= args.warmup_s:
            break
    warm = time.perf_counter()
    for _ in range(args.steps):
        run(*next(batches))
    if cuda:
        torch.cuda.synchronize(args.device)
    return args.steps / (time.perf_counter() - warm), warm - began


def measure_step(config: str, args: argparse.Namespace, *, compiled: bool = False) -> tuple[float, float]:
    setup = build(config, args, compiled=compiled)
    setup.model.train()
    return timed(setup.step, repeated(random_batch(args.batch_size, args.crop, args.device)), args)


def measure_loader(config: str, args: argparse.Namespace, root: Path) -> tuple[float, float]:
    setup = build(config, args)
    setup.model.train()
    dataset = DFC2020Dataset(root, "validation", crop=args.crop, train=True, seed=0)
    # One epoch long enough for every step, cycling over the patches: the pipeline never drains.
    positions = [i % len(dataset) for i in range(args.batch_size * (args.warmup + args.steps))]
    loader = process.make_loader(dataset, args.batch_size, setup.ctx, argparse.Namespace(seed=0), train=True,
                                 indices=positions)
    return timed(setup.step, ((batch, 0, i) for i, batch in enumerate(loader)), args)


def measure_eval(config: str, args: argparse.Namespace) -> tuple[float, float]:
    setup = build(config, args)
    setup.model.eval()

    @torch.no_grad()
    def run(batch: dict, epoch: int, i: int) -> None:
        with setup.ctx.autocast():
            out = setup.model(setup.views.originals(batch))
        metrics.predict(out["logits"]).cpu()

    return timed(run, repeated(random_batch(args.eval_batch_size, args.crop, args.device)), args)


def measure(part: str, config: str, args: argparse.Namespace, root: Path) -> Figure:
    """Take one figure and print its line at once; out of GPU memory gives a line saying so."""
    batch = args.eval_batch_size if part == "eval" else args.batch_size
    label = (f"{part} {config} batch={batch} {args.crop}px {args.arch}"
             + (f" workers={args.workers}" if part == "loader" else ""))
    release(args.device)
    reset_peak(args.device)
    try:
        if part == "step":
            steps_per_s, warm = measure_step(config, args)
        elif part == "compile":
            steps_per_s, warm = measure_step(config, args, compiled=True)
        elif part == "loader":
            steps_per_s, warm = measure_loader(config, args, root)
        else:
            steps_per_s, warm = measure_eval(config, args)
    except torch.OutOfMemoryError:
        print(f"{label}: out of memory", flush=True)
        return Figure(part, config, batch, None, None, None)
    figure = Figure(part, config, batch, steps_per_s * batch, peak(args.device), warm)
    print(f"{label}: {figure.rate:.1f} samples/s, peak {peak_text(figure.peak, args.device)}, warm-up {warm:.1f} s",
          flush=True)
    return figure


def table(figures: list[Figure], device: torch.device) -> str:
    """Markdown: every figure, with its speed-up over the original configuration's figure of the
    same measurement; the compiled fast step's over the uncompiled fast step."""
    cuda = device.type == "cuda"
    unit = "GiB" if cuda else "MiB RSS"
    base = {f.part: f.rate for f in figures if f.config == "original"}
    base["compile"] = next((f.rate for f in figures if f.part == "step" and f.config == "fast"), None)
    lines = [f"| measurement | configuration | batch | samples/s | speed-up | peak {unit} | warm-up s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for f in figures:
        if f.rate is None:
            lines.append(f"| {f.part} | {f.config} | {f.batch} | out of memory | | | |")
            continue
        speed = f"{f.rate / base[f.part]:.2f}x" if base.get(f.part) else "-"
        lines.append(f"| {f.part} | {f.config} | {f.batch} | {f.rate:.1f} | {speed} | {f.peak:.{1 if cuda else 0}f} "
                     f"| {f.warmup_s:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = resolve(build_parser(), argv)
    logging.getLogger("datasets").setLevel(logging.ERROR)  # the synthetic patches hold NaN pixels on purpose
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as process.setup
    name = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
            else f"CPU {platform.processor() or platform.machine()}")
    print(f"bench_train: {args.device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"dual {args.arch}, {args.crop} px, warm-up <= {args.warmup} steps / {args.warmup_s:g} s, "
          f"{args.steps} timed steps", flush=True)
    # Evaluation does not depend on --ce_from: fast evaluates as bf16 does.
    evaluated = [c for c in args.configs if not (c == "fast" and "bf16" in args.configs)]
    work = [(part, config) for part in PARTS if part in args.parts
            for config in {"eval": evaluated, "compile": ["fast"]}.get(part, args.configs)]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root
        if root is None and "loader" in args.parts:
            began = time.perf_counter()
            root = synthetic_data.write_dfc2020(tmp, n_validation=args.patches, n_test=0, seed=0,
                                                size=args.patch_size)
            print(f"bench_train: wrote {args.patches} synthetic DFC2020 patches of {args.patch_size} px in "
                  f"{time.perf_counter() - began:.1f} s", flush=True)
        figures = [measure(part, config, args, root) for part, config in work]
    print()
    print(table(figures, args.device))
    print()
    print("speed-up: over the original configuration's figure of the same measurement; compile: over the uncompiled "
          "fast step")


if __name__ == "__main__":
    main()
