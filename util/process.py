"""Where and how a script runs (`plan_context`, `setup`, `wrap`), and how it reads its data (`make_loader`).

Randomness is keyed, not streamed: epoch e's sample order comes from (seed, e), a sample's crop from (seed, e, index),
a batch's augmentation from (seed, e, step, rank); a run resumed after epoch e replays the uninterrupted run exactly.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import platform
import random
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from util import flags
from util.seeding import key_seed

log = logging.getLogger("process")


@dataclass(frozen=True)
class Context:
    """Where this process runs and how: every CUDA-dependent decision, made by `plan_context`."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # torch.distributed backend, None for a single process
    amp: bool = False
    channels_last: bool = False
    workers: int = 0
    pin_memory: bool = False
    progress: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def to_device(self, x: Tensor) -> Tensor:
        """(B, C, H, W) to the device in its memory format. non_blocking (pinned memory) is safe: the stream orders the
        copy before any kernel that reads it, and the host never reads it."""
        return self.memory_format(x.to(self.device, non_blocking=self.pin_memory))

    def memory_format(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


class DeviceError(ValueError):
    """A --device that this machine or this torchrun job cannot give."""


def plan_context(args: argparse.Namespace, env: Mapping[str, str], cuda_available: bool, device_count: int,
                 cpu_count: int, stderr_is_terminal: bool = False) -> Context:
    """Every CUDA-dependent choice, as a pure function (no CUDA call). An index-less cuda is cuda:LOCAL_RANK under
    torchrun, else cuda:0 (set_device refuses an index-less device); an explicit index is refused under torchrun with
    several processes. amp off unless asked (float32, as the original); channels_last on with CUDA unless a flag says
    otherwise (the same float32 arithmetic); workers: CPU count / processes per node, at most 8, with CUDA, else 1."""
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    requested = args.device or ("cuda" if cuda_available else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise DeviceError(f"--device {requested!r}: {error}") from None
    if device.type == "cuda":
        if not cuda_available or device_count == 0:
            raise DeviceError(f"--device {requested}: this PyTorch sees no CUDA device "
                              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
        if world > 1:
            if device.index is not None:
                raise DeviceError(f"--device {requested} under torchrun: each of the {world} processes takes "
                                  f"cuda:LOCAL_RANK; pass --device cuda (or set CUDA_VISIBLE_DEVICES)")
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", 0)
        if device.index >= device_count:
            raise DeviceError(f"--device {requested} resolves to {device}, but only {device_count} CUDA device(s) "
                              "are visible")
    elif device.type != "cpu":
        raise DeviceError(f"--device {requested!r}: expected cpu, cuda or cuda:N")
    cuda = device.type == "cuda"
    workers = args.workers
    if workers is None:
        workers = min(8, max(1, cpu_count // max(1, local_world))) if cuda else 1
    progress = stderr_is_terminal if args.progress is None else args.progress
    return Context(device=device, rank=rank, world=world, local_rank=local_rank,
                   backend=("nccl" if cuda else "gloo") if world > 1 else None,
                   amp=bool(args.amp),
                   channels_last=cuda if args.channels_last is None else args.channels_last,
                   workers=workers, pin_memory=cuda, progress=progress and rank == 0)


def setup(args: argparse.Namespace) -> Context:
    """Logging, `plan_context` applied (CUDA device, process group), seeds."""
    rank = int(os.environ.get("RANK", "0"))
    if getattr(args, "tensorboard", False) and importlib.util.find_spec("tensorboard") is None:
        raise SystemExit("--tensorboard needs the tensorboard package, which is not installed: pip install tensorboard")
    # Under torchrun every rank reads data: only rank 0 reports data warnings, the others only errors.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    ctx = plan_context(args, os.environ, torch.cuda.is_available(), torch.cuda.device_count(), os.cpu_count() or 1,
                       sys.stderr.isatty())
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
        torch.backends.cudnn.benchmark = True  # fixed training shapes; evaluation adds one or two more
    if ctx.backend is not None and not dist.is_initialized():
        dist.init_process_group(ctx.backend, device_id=ctx.device if ctx.device.type == "cuda" else None)
    if ctx.amp and ctx.device.type != "cuda":
        log.warning("--amp on %s: bf16 autocast on CPU is slow and only useful for debugging", ctx.device)
    seed_everything(args.seed)
    return ctx


def start(parser: argparse.ArgumentParser, argv: Sequence[str] | None, check, script: str | None = None
          ) -> tuple[argparse.Namespace, Context]:
    """`flags.resolve` (--resume refuses a run of another `script`), the script's `check(parser, args)`, `setup`."""
    args = flags.resolve(parser, argv, script)
    check(parser, args)
    return args, setup(args)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def wrap(model: nn.Module, ctx: Context, args: argparse.Namespace, *, find_unused: bool = False,
         sync_bn: bool = False) -> nn.Module:
    """Device, memory format, DDP under torchrun, torch.compile if asked. sync_bn: under torchrun every BatchNorm
    becomes a SyncBatchNorm in place (checkpointed submodules keep their keys); DDP refuses it on CPU, and so do the
    scripts, before they start."""
    if sync_bn and ctx.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device)
    if ctx.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ctx.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=find_unused)
    if args.compile:
        model = torch.compile(model)
    return model


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(ctx: Context) -> dict:
    """What actually ran: versions, device, numeric options, host, commit."""
    return {"device": str(ctx.device),
            "device_name": (torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda"
                            else platform.processor() or "cpu"),
            "world": ctx.world, "amp": ctx.amp, "channels_last": ctx.channels_last, "workers": ctx.workers,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "host": socket.gethostname(), "git_commit": _git_commit()}


# ----------------------------------------------------------------------------- data

class EpochSampler(Sampler):
    """Epoch-seeded order sharded over ranks, yielding `(index, epoch)` keys: a data set in a persistent worker learns
    the epoch from them. weights: (n,) draws with replacement (class balance); shuffle=False keeps the order; drop_last
    drops the tail that fills no `batch_size` batch on every rank; drop_single leaves out the one sample a last batch
    would hold alone (the last of the epoch's order)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, *, shuffle: bool = True,
                 weights: Tensor | None = None, drop_last: bool = False, batch_size: int = 1,
                 drop_single: bool = False) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.shuffle, self.weights, self.epoch = shuffle, weights, 0
        if drop_last:
            per_rank = n // world
            self.per_rank = per_rank - per_rank % batch_size
        else:
            per_rank = math.ceil(n / world)
            self.per_rank = per_rank - (drop_single and batch_size > 1 and per_rank % batch_size == 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(key_seed(self.seed, self.epoch))
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        # Evaluation pads with the first indices so that every rank has as many; `evaluate` drops the repeats.
        order = (torch.cat([order, order[: self.per_rank * self.world - self.n]])
                 if self.per_rank * self.world > self.n else order)
        for index in order[self.rank: self.per_rank * self.world: self.world].tolist():
            yield index, self.epoch


class EpochKeyed(Dataset):
    """Items of a data set with `set_epoch` by `(index, epoch)` keys; `indices`: positions -> indices into `dataset`
    (a --data_ratio subset, --balanced_class repeats)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        position, epoch = key
        self.dataset.set_epoch(epoch)
        item = self.dataset[self.indices[position]]
        item["index"] = position
        return item


def subset_indices(n: int, ratio: float, how: str = "first", seed: int = 0) -> list[int]:
    """The int(ratio * n) indices a run trains on, ascending: the first ones, as the original's `LimitedDataset` (also
    when it shuffles), or with how="random" a fixed random subset drawn from `seed`."""
    if not 0 < ratio <= 1:
        raise ValueError(f"--data_ratio must be in (0, 1], got {ratio}")
    if how not in ("first", "random"):
        raise ValueError(f"--subset must be 'first' or 'random', got {how!r}")
    keep = int(ratio * n)
    if keep == 0:
        raise ValueError(f"--data_ratio {ratio} of {n} samples keeps int({ratio} * {n}) = 0 of them; "
                         "raise --data_ratio")
    return subset(n, keep, how, seed)


def subset(n: int, keep: int, how: str = "first", seed: int = 0) -> list[int]:
    """``keep`` of ``range(n)`` in ascending order: the first ones, or a random draw from ``seed``."""
    if how == "first":
        return list(range(keep))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].tolist())


def make_loader(dataset: Dataset, batch_size: int, ctx: Context, args: argparse.Namespace, *, train: bool,
                indices: Sequence[int] | None = None, weights: Tensor | None = None,
                drop_last: bool | None = None) -> DataLoader:
    """Training keeps the last partial batch, as the original, except under torchrun (every rank takes as many equal
    steps: gathered losses) or with drop_last=True (SEN12MS pre-training, as its original). A last batch of ONE sample
    is left out, logged: batch norm cannot normalise one value per channel in training mode."""
    keyed = EpochKeyed(dataset, indices)
    drop = (train and ctx.world > 1) if drop_last is None else drop_last
    sampler = EpochSampler(len(keyed), args.seed, ctx.rank, ctx.world, shuffle=train, weights=weights,
                           drop_last=drop, batch_size=batch_size, drop_single=train)
    if train and len(sampler) == 0:
        raise ValueError(f"{len(keyed)} training samples give no batch of {batch_size} on {ctx.world} process(es)"
                         f"{' (the tail is dropped)' if drop else ''}; lower --batch_size")
    if train and ctx.is_main:
        if batch_size > len(sampler):
            log.warning("training: --batch_size %d is above the %d training samples: each epoch is one step, on a "
                        "batch of %d", batch_size, len(keyed), len(sampler))
        left_out = len(keyed) - len(sampler) * ctx.world
        if drop and left_out > 0:
            log.info("training: %d samples an epoch in batches of %d per process; the last %d of each epoch's order "
                     "are dropped so that every process takes the same steps", len(keyed) - left_out, batch_size,
                     left_out)
        elif not drop and len(sampler) < len(keyed):
            log.warning("training: %d samples in batches of %d would leave a last batch of ONE sample, which batch "
                        "norm cannot normalise in training mode: each epoch leaves out the last sample of its order "
                        "(a different one each epoch)", len(keyed), batch_size)
    return DataLoader(keyed, batch_size=batch_size, sampler=sampler, num_workers=ctx.workers,
                      pin_memory=ctx.pin_memory, persistent_workers=ctx.workers > 0,
                      prefetch_factor=4 if ctx.workers > 0 else None)
