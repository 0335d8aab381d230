"""The training-loop pieces the three scripts share: flags, devices, loaders, views, metrics,
run folders and the epoch loop. The method itself (the multi-modal forward pass and its loss)
lives in `models.MultiModalNet` and `losses.SupConCELoss`; each script's `step` ties them together.

Read top to bottom: command-line flags (validated by argparse), the process context (device,
torchrun ranks, numeric options; decided by the pure function `plan_context`), data loading
with epoch-keyed randomness, the views of a batch, metrics, the run folder (lock, config,
metrics, checkpoints, results) and `fit`, the epoch loop.

Randomness is keyed, not streamed: the sample order of epoch e comes from (seed, e), a sample's
crop from (seed, e, index), a batch's augmentation from (seed, e, step, rank). A run resumed from
the checkpoint of epoch e therefore replays exactly what an uninterrupted run would have done.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import math
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import confusion_matrix
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from augment import AUGMENT_IMPLS, key_seed, keyed_generator
from losses import IGNORE
from models import atomic_save, set_frozen_bn_eval

log = logging.getLogger("engine")


# ----------------------------------------------------------------------------- flags

def _number(kind: type, low: float | None = None, *, low_open: bool = False, high: float | None = None) -> Callable[[str], float]:
    """An argparse `type` for a finite number within bounds; argparse names the flag on error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'above' if low_open else 'at least'} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
        return value

    return parse


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
non_negative = _number(float, 0.0)
positive = _number(float, 0.0, low_open=True)
fraction = _number(float, 0.0, low_open=True, high=1.0)
seed_int = _number(int, 0, high=2**32 - 1)  # numpy's seed range

# Flags that describe the machine, not the experiment: a resumed run takes them from its own
# command line, never from the saved config.
HARDWARE_FLAGS = ("device", "amp", "channels_last", "compile", "workers", "progress")
# What --resume accepts besides the hardware flags.
RESUMABLE_FLAGS = ("epochs", "resume", "tensorboard", "save_best")


def add_common_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float) -> None:
    """Flags every script takes; the defaults given are the script's published settings."""
    g = parser.add_argument_group("run")
    g.add_argument("--epochs", "--n_epochs", dest="epochs", type=positive_int, default=epochs, help=f"training epochs (default {epochs})")
    g.add_argument("--batch_size", type=positive_int, default=batch_size, help=f"per-process batch size (default {batch_size})")
    g.add_argument("--lr", type=non_negative, default=lr, help=f"learning rate (default {lr})")
    g.add_argument("--seed", type=seed_int, default=0, help="seed of initialisation, sample order, crops, augmentations (default 0)")
    g.add_argument("--save_path", type=Path, default=None, help="run folder (default runs/<script>-<time>); refused if it holds a run")
    g.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR with its own config; --epochs may extend it, hardware flags may change")
    g.add_argument("--overwrite", action="store_true", help="start over in a --save_path that holds a run, removing its files first")
    g.add_argument("--save_best", action=argparse.BooleanOptionalAction, default=True,
                   help="keep best.pt, the weights of the best evaluation, beside last.pt (default on; a METER-ML "
                        "checkpoint is about 560 MB)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars into RUN/tensorboard (needs: pip install tensorboard)")
    g = parser.add_argument_group("hardware")
    g.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu; under torchrun cuda:LOCAL_RANK)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast for the networks, losses stay float32 (default off: float32, as the original)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format for the conv nets (default: on with CUDA; a memory layout, "
                        "the numerics stay float32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    g.add_argument("--workers", type=non_negative_int, default=None,
                   help="DataLoader workers per process (default: CPU count / processes, at most 8, with CUDA; 1 on CPU)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: only when stderr is a terminal, so log files get clean lines)")


def add_supervised_args(parser: argparse.ArgumentParser, *, head_lr: float | None, eval_dense_after: int) -> None:
    """Flags both fine-tuning scripts take, under the same names; the original's spellings are aliases."""
    g = parser.add_argument_group("method")
    g.add_argument("--use_sup_con", action="store_true", help="add the supervised contrastive loss")
    g.add_argument("--sup_weight", "--sup_delta", "--delta_sup", dest="sup_weight", type=non_negative, default=1.0,
                   help="weight of SupCon (default 1.0)")
    g.add_argument("--ce_weight", "--cross_delta", "--delta_lin", dest="ce_weight", type=non_negative, default=1.0,
                   help="weight of cross-entropy (default 1.0)")
    g.add_argument("--temperature", type=positive, default=0.07, help="SupCon temperature and base temperature (default 0.07)")
    g.add_argument("--ce_from", choices=["separate", "joint"], default="separate",
                   help="separate: CE reads a second encoder pass over the originals, as the original (default); "
                        "joint: CE reads the original half of the joint (augmented, original) pass, a third less compute")
    g.add_argument("--head_lr", "--classifier_lr", dest="head_lr", type=non_negative, default=head_lr,
                   help="learning rate of the classifier head(s) (default: " + ("--lr" if head_lr is None else str(head_lr)) + ")")
    add_subset_args(g)
    add_augment_impl_arg(g)
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval_batch_size", type=positive_int, default=None, help="evaluation batch size (default 2 x --batch_size)")
    g.add_argument("--eval_every", type=non_negative_int, default=10,
                   help="evaluate after 0-based epochs that are multiples of N (0: never), and after the last (default 10)")
    g.add_argument("--eval_dense_after", type=int, default=eval_dense_after,
                   help=f"and after every 0-based epoch above this one (default {eval_dense_after}, the original's)")
    g.add_argument("--name", default=None, help="configuration label for summaries (default: derived from the flags)")


def add_subset_args(group: argparse._ArgumentGroup) -> None:
    """--data_ratio, --subset, --subset_seed: which part of the training set a run reads."""
    group.add_argument("--data_ratio", type=fraction, default=1.0,
                       help="fraction of the training set: its first int(ratio * N) items, as the original (default 1.0)")
    group.add_argument("--subset", choices=["first", "random"], default="first",
                       help="first: the data set's first items, as the original (default); random: a fixed random "
                            "subset drawn from --subset_seed")
    group.add_argument("--subset_seed", type=seed_int, default=0, help="seed of --subset random, fixed across --seed (default 0)")


def add_augment_impl_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--augment_impl", choices=AUGMENT_IMPLS, default="torchvision",
                       help="torchvision: the original's augmented pixels (nearest-neighbour rotation, antialiased "
                            "resized crop; default); fused: one bilinear resampling per batch, smoother views")


def resolve_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags; with --resume, take the run's own config and refuse flags that cannot change."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.resume is None:
        return args
    if args.overwrite:
        parser.error("--resume continues a run and --overwrite starts one over: choose one")
    config_path = args.resume / "config.json"
    if not config_path.is_file():
        parser.error(f"--resume {args.resume}: no config.json there; is it a run folder?")
    saved = json.loads(config_path.read_text())
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}
    explicit = {a.dest for a in parser._actions if given & set(a.option_strings)}
    refused = sorted(explicit - set(HARDWARE_FLAGS) - set(RESUMABLE_FLAGS))
    if refused:
        parser.error(f"--resume continues {args.resume} with its own config.json; these flags cannot change: "
                     f"{', '.join('--' + r for r in refused)}. Drop them, or start a new run")
    resumed = argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k not in HARDWARE_FLAGS}})
    if "epochs" in explicit:
        resumed.epochs = args.epochs
    resumed.resume, resumed.save_path, resumed.overwrite = args.resume, args.resume, False
    return resumed


# ----------------------------------------------------------------------------- process context

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
        """Move an image batch (B, C, H, W) to the device in the chosen memory format.

        non_blocking: from pinned memory the copy overlaps with compute; the stream orders it
        before any kernel that reads the result, and nothing reads it on the host."""
        return self.memory_format(x.to(self.device, non_blocking=self.pin_memory))

    def memory_format(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


class DeviceError(ValueError):
    """A --device that this machine or this torchrun job cannot give."""


def plan_context(args: argparse.Namespace, env: Mapping[str, str], cuda_available: bool, device_count: int,
                 cpu_count: int, stderr_is_terminal: bool = False) -> Context:
    """Decide device, ranks, backend, numeric options and loader settings. Pure: no CUDA call.

    - Device: `--device` or cuda when available. A CUDA device without an index means the
      current device: cuda:LOCAL_RANK under torchrun, cuda:0 otherwise (torch.cuda.set_device
      refuses an index-less device). An explicit index is kept in a single process and refused
      under torchrun with several processes (each process takes cuda:LOCAL_RANK).
    - Backend: NCCL on CUDA, gloo on CPU, none for one process.
    - amp: off unless asked (float32, as the original); channels_last: on with CUDA unless a flag
      says otherwise (a memory layout: the same float32 arithmetic).
    - workers: `--workers`, or CPU count / processes per node (at most 8) with CUDA, 1 on CPU;
      pinned memory only with CUDA.
    """
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
            raise DeviceError(f"--device {requested} resolves to {device}, but only {device_count} CUDA device(s) are visible")
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
    """Logging, the context of `plan_context` applied (CUDA device, process group), seeds."""
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- data

class EpochSampler(Sampler):
    """Epoch-seeded sample order, sharded over torchrun ranks; optional weighted draws.

    Yields `(index, epoch)` keys for `EpochKeyed`, so that the dataset in a persistent worker
    knows the epoch without being told from the main process.

    Args:
        n: data set size.
        seed: run seed.
        rank, world: this process and the number of processes.
        shuffle: a fresh permutation every epoch (training); False keeps the order (evaluation).
        weights: (n,) draw probabilities for class-balanced oversampling (with replacement).
        drop_last: drop the tail that does not fill a batch of `batch_size` on every rank.
        batch_size: per-process batch size.
        drop_single: without drop_last, leave out the one sample that would form a last batch
            of its own (the last of this epoch's order).
    """

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
        # Evaluation pads by repeating the first indices so every rank has as many samples;
        # `evaluate` drops the repeats again.
        order = torch.cat([order, order[: self.per_rank * self.world - self.n]]) if self.per_rank * self.world > self.n else order
        for index in order[self.rank: self.per_rank * self.world: self.world].tolist():
            yield index, self.epoch


class EpochKeyed(Dataset):
    """Fetches items of a data set with `set_epoch` by `(index, epoch)` keys.

    Args:
        dataset: the data set.
        indices: optional positions -> indices into `dataset` (a subset for --data_ratio, items
            repeated for --balanced_class).
    """

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
    """The indices a run trains on, in ascending order: int(ratio * n) of them.

    how="first": the first int(ratio * n) items, as the original (its `LimitedDataset` keeps
    them, also when it shuffles); how="random": a fixed random subset drawn from `seed`.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"--data_ratio must be in (0, 1], got {ratio}")
    if how not in ("first", "random"):
        raise ValueError(f"--subset must be 'first' or 'random', got {how!r}")
    keep = int(ratio * n)
    if keep == 0:
        raise ValueError(f"--data_ratio {ratio} of {n} samples keeps int({ratio} * {n}) = 0 of them; raise --data_ratio")
    if how == "first":
        return list(range(keep))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].tolist())


def make_loader(dataset: Dataset, batch_size: int, ctx: Context, args: argparse.Namespace, *, train: bool,
                indices: Sequence[int] | None = None, weights: Tensor | None = None,
                drop_last: bool | None = None) -> DataLoader:
    """A DataLoader over `dataset` (or its `indices`) with an EpochSampler.

    Training keeps the last partial batch, as the original (the DataLoader default), except
    under torchrun, where every rank must take the same number of equal steps (gathered losses),
    so the tail is dropped; `drop_last=True` drops it always (SEN12MS pre-training, as its
    original). A last batch of ONE sample is left out (logged): batch norm cannot normalise a
    single value per channel in training mode. Workers and pinning follow the context.
    """
    keyed = EpochKeyed(dataset, indices)
    drop = (train and ctx.world > 1) if drop_last is None else drop_last
    sampler = EpochSampler(len(keyed), args.seed, ctx.rank, ctx.world, shuffle=train, weights=weights,
                           drop_last=drop, batch_size=batch_size, drop_single=train)
    if train and len(sampler) == 0:
        raise ValueError(f"{len(keyed)} training samples give no batch of {batch_size} on {ctx.world} process(es)"
                         f"{' (the tail is dropped)' if drop else ''}; lower --batch_size")
    if train and ctx.is_main:
        left_out = len(keyed) - len(sampler) * ctx.world
        if drop and left_out > 0:
            log.info("training: %d samples an epoch in batches of %d per process; the last %d of each epoch's order "
                     "are dropped so that every process takes the same steps", len(keyed) - left_out, batch_size, left_out)
        elif not drop and len(sampler) < len(keyed):
            log.warning("training: %d samples in batches of %d would leave a last batch of ONE sample, which batch norm "
                        "cannot normalise in training mode: each epoch leaves out the last sample of its order "
                        "(a different one each epoch)", len(keyed), batch_size)
    return DataLoader(keyed, batch_size=batch_size, sampler=sampler, num_workers=ctx.workers,
                      pin_memory=ctx.pin_memory, persistent_workers=ctx.workers > 0,
                      prefetch_factor=4 if ctx.workers > 0 else None)


class Views:
    """The images of a batch on the device: the originals, and the augmented views if any.

    Augmentation runs on whole batches on the training device with per-sample parameters drawn
    from a CPU generator keyed by (seed, epoch, step, rank): the same draws on any device, and a
    resumed run replays them. `renormalize` (e.g. `datasets.seed_normalize`) is applied to each
    augmented view, as the original normalises each view after its augmentation.

    Args:
        modalities: batch keys to read ("s1", "s2").
        augment: an `augment.Augment`, or None for no augmentation.
        ctx: the process context.
        seed: run seed.
        renormalize: per-view normalisation after augmentation, or None.
        second: "original" (the (augmented, original) pairs of fine-tuning and of the original
            pre-training) or "augmented" (two independently augmented views).
    """

    def __init__(self, modalities: Sequence[str], augment: Callable | None, ctx: Context, seed: int,
                 renormalize: Callable[[Tensor], Tensor] | None = None, second: str = "original") -> None:
        if second not in ("original", "augmented"):
            raise ValueError(f"second must be 'original' or 'augmented', got {second!r}")
        self.modalities, self.augment, self.ctx, self.seed = list(modalities), augment, ctx, seed
        self.renormalize, self.second = renormalize, second

    def _augmented(self, x: Tensor, g: torch.Generator) -> Tensor:
        view = self.augment(x, generator=g)
        if self.renormalize is not None:
            view = self.renormalize(view)
        # grid_sample and roi_align return NCHW whatever their input: restore the nets' format.
        return self.ctx.memory_format(view)

    def __call__(self, batch: dict, epoch: int, step: int) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """
        Returns:
            (originals, augmented): modality -> (B, C, H, W) on the device; augmented is None
            without augmentation. With second="augmented", "originals" is a second augmented view.
        """
        originals = self.originals(batch)
        if self.augment is None:
            return originals, None
        g = keyed_generator(self.seed, epoch, step, self.ctx.rank)
        augmented = {m: self._augmented(x, g) for m, x in originals.items()}
        if self.second == "augmented":
            originals = {m: self._augmented(x, g) for m, x in originals.items()}
        return originals, augmented

    def originals(self, batch: dict) -> dict[str, Tensor]:
        """modality -> (B, C, H, W) original images on the device."""
        return {m: self.ctx.to_device(batch[m]) for m in self.modalities}


# ----------------------------------------------------------------------------- metrics

def predict(logits: dict[str, Tensor]) -> Tensor:
    """Class predictions (B,): one head's argmax, or the mean softmax of several (late fusion)."""
    if len(logits) == 1:
        return next(iter(logits.values())).argmax(1)
    return torch.stack([l.float().softmax(1) for l in logits.values()]).mean(0).argmax(1)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str],
                           ignore: Sequence[int] = (IGNORE,)) -> dict:
    """Per-class accuracy (recall), AA (their mean over classes present) and OA, in percent.

    Samples whose true label is in `ignore` count nowhere, and ignored classes get no column.
    Returns:
        {"per_class": {name: % or None when absent}, "AA": %, "OA": %, "n": samples counted,
         "ignored": samples skipped, "classes": all class names, "confusion": (K, K) counts of
         the counted samples over all K classes (rows true, columns predicted)}.
    """
    keep = ~np.isin(y_true, list(ignore))
    y_true, y_pred = y_true[keep], y_pred[keep]
    k = len(class_names)
    confusion = confusion_matrix(y_true, y_pred, labels=list(range(k))) if len(y_true) else np.zeros((k, k), dtype=np.int64)
    classes = [c for c in range(k) if c not in ignore]
    support, hits = confusion.sum(1), np.diag(confusion)
    per_class = {class_names[c]: (100.0 * float(hits[c]) / float(support[c]) if support[c] else None) for c in classes}
    scores = [v for v in per_class.values() if v is not None]
    return {"per_class": per_class,
            "AA": sum(scores) / len(scores) if scores else None,
            "OA": 100.0 * float(hits.sum()) / len(y_true) if len(y_true) else None,
            "n": int(len(y_true)), "ignored": int((~keep).sum()),
            "classes": list(class_names), "confusion": confusion.astype(int).tolist()}


def _gather_rows(x: Tensor, ctx: Context) -> Tensor:
    """Concatenate equal-length 1-D int64 tensors from every rank, on the device (NCCL needs it)."""
    local = x.to(ctx.device)
    parts = [torch.empty_like(local) for _ in range(ctx.world)]
    dist.all_gather(parts, local)
    return torch.cat(parts).cpu()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, views: Views, ctx: Context, class_names: Sequence[str],
             ignore: Sequence[int] = (IGNORE,)) -> dict:
    """`classification_metrics` of `model` on `loader`, predictions gathered from every rank."""
    model.eval()
    indices, truths, preds = [], [], []
    bar = tqdm(total=len(loader.sampler), desc="eval", unit="sample", leave=False, disable=not ctx.progress)
    for batch in loader:
        bar.update(len(batch["index"]))
        with ctx.autocast():
            out = model(views.originals(batch))
        preds.append(predict(out["logits"]).cpu())
        truths.append(torch.as_tensor(batch["label"]).cpu())
        indices.append(batch["index"])
    bar.close()
    index, truth, pred = (torch.cat(t).long() for t in (indices, truths, preds))
    if ctx.world > 1:  # the sampler gives every rank as many samples: equal lengths
        index, truth, pred = (_gather_rows(t, ctx) for t in (index, truth, pred))
    _, first = np.unique(index.numpy(), return_index=True)  # drop the sampler's padding repeats
    return classification_metrics(truth.numpy()[first], pred.numpy()[first], class_names, ignore)


def eval_schedule(epochs: int, every: int, dense_after: int | None = None) -> frozenset[int]:
    """0-based epochs to evaluate after: the original's `epoch % every == 0 or epoch > dense_after`,
    and the last epoch (the original evaluated once more after its loop)."""
    chosen = {e for e in range(epochs) if (every > 0 and e % every == 0) or (dense_after is not None and e > dense_after)}
    return frozenset(chosen | {epochs - 1})


# ----------------------------------------------------------------------------- run folder

class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked (holds a run, locked, damaged checkpoint)."""


RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "results.json")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`RUN/run.lock`, held for the life of a run: a second writer is refused with the holder's
    pid and host; a lock whose process is gone (killed) on this host is stale and taken over."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "run.lock"
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and (host != me["host"] or _process_alive(pid)):
                    raise RunFolderError(f"{self.path.parent} is in use by process {pid} on {host} (since "
                                         f"{holder.get('started')}); wait for it, or use another --save_path") from None
                log.warning("taking over the stale lock %s of process %s (no longer running)", self.path, pid)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunFolderError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(ctx: Context) -> dict:
    """What actually ran: versions, device, numeric options, host, commit."""
    return {"device": str(ctx.device), "device_name": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else platform.processor() or "cpu",
            "world": ctx.world, "amp": ctx.amp, "channels_last": ctx.channels_last, "workers": ctx.workers,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "host": socket.gethostname(), "git_commit": _git_commit()}


class RunDir:
    """A run's folder: config.json, metrics.jsonl, last.pt, best.pt, results.json, run.lock.

    A folder that holds a run is refused unless `resume` (continue it) or `overwrite` (its run
    files are removed first). The lock refuses a second writer. Only rank 0 writes; checkpoints
    go through a temporary file unique to the writer and a rename, so a kill during a save
    leaves the previous checkpoint intact. Call `close` when the run ends (fit does).
    """

    def __init__(self, path: Path, args: argparse.Namespace, ctx: Context) -> None:
        self.path, self.ctx = Path(path), ctx
        self.lock = RunLock(self.path)
        self.started = time.time()
        if not ctx.is_main:
            return
        existing = [name for name in RUN_FILES if (self.path / name).exists()]
        if existing and not (args.resume or args.overwrite):
            raise RunFolderError(f"{self.path} holds a run ({', '.join(existing)}); pass --resume {self.path} to continue "
                                 f"it, --overwrite to start it over, or choose another --save_path")
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            if args.overwrite:
                for name in existing:
                    (self.path / name).unlink()
                shutil.rmtree(self.path / "eval", ignore_errors=True)
            if not args.resume:
                config = {k: v for k, v in vars_json(args).items() if k not in ("resume", "overwrite")}
                config.update({"device": str(ctx.device), "amp": ctx.amp, "channels_last": ctx.channels_last, "workers": ctx.workers})
                (self.path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        self.lock.release()

    def log_metrics(self, record: dict) -> None:
        if self.ctx.is_main:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, epoch: int) -> None:
        """Forget metric records from `epoch` on (written before a kill, replayed on resume)."""
        file = self.path / "metrics.jsonl"
        if self.ctx.is_main and file.exists():
            kept = [l for l in file.read_text().splitlines() if l.strip() and json.loads(l)["epoch"] < epoch]
            file.write_text("".join(l + "\n" for l in kept))

    def save(self, name: str, state: dict) -> Path:
        target = self.path / name
        if self.ctx.is_main:
            atomic_save(state, target)
        return target

    def load_last(self) -> dict | None:
        """The state in last.pt, or None when the run was killed before its first epoch ended."""
        path = self.path / "last.pt"
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # torch raises several types for a damaged zip / pickle
            raise RunFolderError(f"{path} is damaged and cannot be read ({type(error).__name__}: {error}). The "
                                 f"previous checkpoint is not kept; start the run again with --overwrite") from error

    def write_results(self, results: dict) -> None:
        if self.ctx.is_main:
            (self.path / "results.json").write_text(json.dumps(results, indent=2))


def default_run_path(script: str) -> Path:
    return Path("runs") / f"{script}-{time.strftime('%Y%m%d-%H%M%S')}"


def wrap(model: nn.Module, ctx: Context, args: argparse.Namespace, *, find_unused: bool = False,
         sync_bn: bool = False) -> nn.Module:
    """Device, memory format, DDP under torchrun, and torch.compile if asked.

    sync_bn: under torchrun, batch norm normalises with the statistics of the global batch
    (every BatchNorm becomes a SyncBatchNorm, in place: the submodules that checkpoints save keep
    their parameters, buffers and state-dict keys). CUDA only: DDP refuses SyncBatchNorm on CPU,
    so scripts refuse sync_bn on CPU before they start.
    """
    if sync_bn and ctx.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device)
    if ctx.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ctx.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                                    find_unused_parameters=find_unused)
    if args.compile:
        model = torch.compile(model)
    return model


# ----------------------------------------------------------------------------- the epoch loop

class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped."""


class NoTargetError(RuntimeError):
    """A training epoch in which no sample had a cross-entropy target."""


@dataclass
class Task:
    """What a script plugs into `fit`.

    Attributes:
        step: (batch, epoch, step index) -> loss terms {"loss": total, ...}; "ce_samples", when
            present, counts the samples with a CE target (an epoch without any is an error).
        modules: checkpoint key -> module saved under it. "state_dict" holds the network in its
            released layout (so that `models.load_checkpoint` reads our checkpoints); further
            keys hold what that layout lacks (the METER-ML heads).
        evaluate: None, or a function returning `classification_metrics` of the current model.
        eval_epochs: 0-based epochs after which to evaluate.
        checkpoint: extra entries for every checkpoint (e.g. {"arch": "resnet50"}).
        select: metric that picks the best evaluation ("AA" or "OA").
        dataset: data set name written to results.json, for `summarize.py`.
        frozen_bn_eval: keep the batch-norm layers of frozen parameters in eval mode during
            training (a fixed encoder for linear evaluation); False leaves them in training mode.
        snapshot_every: also save "state_dict" in the released layout after every 0-based epoch
            that is a multiple of this, and after the last (`snapshot_name`); 0: never.
    """

    step: Callable[[dict, int, int], dict[str, Tensor]]
    modules: dict[str, nn.Module]
    evaluate: Callable[[], dict] | None = None
    eval_epochs: frozenset[int] = frozenset()
    checkpoint: dict | None = None
    select: str = "AA"
    dataset: str = ""
    frozen_bn_eval: bool = True
    snapshot_every: int = 0


def snapshot_name(epoch: int) -> str:
    """The file of the weights after 0-based `epoch`, as the original names them (epoch0, epoch25, ...)."""
    return f"checkpoint-epoch{epoch}.pth"


def _batch_ids(batch: dict) -> list:
    ids = batch.get("id", batch["index"])
    return ids.tolist() if isinstance(ids, Tensor) else list(ids)


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, task: Task, run: RunDir,
        ctx: Context, args: argparse.Namespace) -> dict:
    """Train for args.epochs, evaluating on `task.eval_epochs`, checkpointing every epoch.

    Resumes from `run.path / "last.pt"` when args.resume is set (from the beginning, with a
    message, when the run never finished an epoch). A non-finite loss stops the run with the
    batch's sample ids. Returns the results written to results.json: the last evaluation and,
    separately, the best one with its epoch, selected on the evaluation split.
    """
    try:
        return _fit(model, optimizer, loader, task, run, ctx, args)
    finally:
        run.close()


def _fit(model, optimizer, loader, task, run, ctx, args) -> dict:
    start, best, last_eval = 0, None, None
    if args.resume is not None:
        state = run.load_last()
        if state is None:
            log.warning("%s has no last.pt (killed before its first epoch ended): starting the run from the beginning", run.path)
            run.truncate_metrics(1)
        else:
            for key, module in task.modules.items():
                module.load_state_dict(state[key])
            optimizer.load_state_dict(state["optimizer"])
            start, best, last_eval = state["epoch"], state["best"], state["last_eval"]
            restore_rng(state["rng"])
            run.truncate_metrics(start + 1)
            log.info("resumed %s after epoch %d of %d", run.path, start, args.epochs)

    per_epoch = len(loader.sampler) * ctx.world  # samples of every process
    timings: list[float] = []
    board = None
    if getattr(args, "tensorboard", False) and ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency, checked in setup

        board = SummaryWriter(str(run.path / "tensorboard"), purge_step=start * len(loader))
    for epoch in range(start, args.epochs):
        loader.sampler.set_epoch(epoch)
        model.train()
        if task.frozen_bn_eval:
            set_frozen_bn_eval(model)
        sums: dict[str, Tensor] = {}
        began = time.perf_counter()
        bar = tqdm(total=len(loader.sampler), desc=f"epoch {epoch + 1}/{args.epochs}", unit="sample",
                   leave=False, disable=not ctx.progress)  # samples of this process
        for step, batch in enumerate(loader):
            terms = task.step(batch, epoch, step)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                saved = run.path / "last.pt"
                where = (f"Last good checkpoint: {saved} (after epoch {epoch}); resume with --resume {run.path} after "
                         f"fixing the cause") if saved.exists() else "No checkpoint was written (the first epoch never ended)"
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {epoch + 1}, batch {step} "
                    f"({', '.join(f'{k} {v.item():.4g}' for k, v in terms.items())}); sample ids {_batch_ids(batch)}. {where}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            if board is not None:
                for k, v in terms.items():
                    board.add_scalar(f"step/{k}", v.item(), epoch * len(loader) + step)
            bar.update(len(_batch_ids(batch)))
        bar.close()
        seconds = time.perf_counter() - began
        timings.append(seconds)
        ce_samples = sums.pop("ce_samples", None)
        if ce_samples is not None and ce_samples.item() == 0:
            raise NoTargetError(f"epoch {epoch + 1}: no training sample had a cross-entropy target (every label was "
                                f"ignore = {IGNORE} or an excluded class); check the labels of {getattr(args, 'data_root', 'the data')}")
        record = {"epoch": epoch + 1, **{f"train_{k}": (v / max(1, len(loader))).item() for k, v in sums.items()},
                  "samples_per_s": per_epoch / seconds, "epoch_s": seconds, "lr": optimizer.param_groups[0]["lr"]}
        left = (args.epochs - epoch - 1) * sum(timings[-3:]) / len(timings[-3:])
        line = (f"epoch {epoch + 1}/{args.epochs}: loss {record['train_loss']:.4f}, {record['samples_per_s']:.0f} samples/s, "
                f"{seconds:.1f} s, about {datetime.timedelta(seconds=round(left))} left")
        if task.evaluate is not None and epoch in task.eval_epochs:
            last_eval = {"epoch": epoch + 1, **task.evaluate()}
            record.update({k: last_eval[k] for k in ("AA", "OA", "per_class", "n", "ignored", "classes", "confusion")})
            line += f"; AA {_pct(last_eval['AA'])}, OA {_pct(last_eval['OA'])} on {last_eval['n']} samples ({last_eval['ignored']} ignored)"
            if last_eval[task.select] is not None and (best is None or last_eval[task.select] > best[task.select]):
                best = last_eval
                if getattr(args, "save_best", True):
                    run.save("best.pt", checkpoint_state(task, None, epoch + 1, best, last_eval))
        log.info(line)
        if board is not None:
            for k in ("train_loss", "train_ce", "train_supcon", "samples_per_s", "lr", "AA", "OA"):
                if record.get(k) is not None:
                    board.add_scalar(f"epoch/{k}", record[k], epoch + 1)
            board.flush()
        run.log_metrics(record)
        if task.snapshot_every and (epoch % task.snapshot_every == 0 or epoch == args.epochs - 1):
            weights = {k: v.cpu() for k, v in task.modules["state_dict"].state_dict().items()}
            run.save(snapshot_name(epoch), {"epoch": epoch, **(task.checkpoint or {}), "state_dict": weights})
        run.save("last.pt", checkpoint_state(task, optimizer, epoch + 1, best, last_eval))

    if board is not None:
        board.close()
    results = {"dataset": task.dataset, "name": getattr(args, "name", None), "config": vars_json(args),
               "last": last_eval, "best_selected_on_eval_split": best, "select": task.select, "environment": environment(ctx),
               "started": datetime.datetime.fromtimestamp(run.started).astimezone().isoformat(timespec="seconds"),
               "finished": _now(), "wall_s": time.time() - run.started,
               "note": "'last' is the last evaluation; 'best_selected_on_eval_split' is the best evaluation, chosen on the "
                       "evaluation split itself (as the original reported its best evaluation): optimistic"}
    run.write_results(results)
    return results


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def vars_json(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def checkpoint_state(task: Task, optimizer: torch.optim.Optimizer | None, epoch: int, best: dict | None,
                     last_eval: dict | None) -> dict:
    """The networks in their released layout ("epoch", "state_dict", ...), plus, with an
    optimizer, everything needed to resume."""
    state = {"epoch": epoch, **(task.checkpoint or {})}
    state.update({key: module.state_dict() for key, module in task.modules.items()})
    state.update({"best": best, "last_eval": last_eval})
    if optimizer is not None:
        state.update({"optimizer": optimizer.state_dict(), "rng": capture_rng()})
    return state


def capture_rng() -> dict:
    """Torch RNG states (training draws from keyed generators; these cover anything else)."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
