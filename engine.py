"""The training-loop pieces the three scripts share.

Read top to bottom: command-line flags common to every script, the process context (device,
torchrun ranks), data loading with epoch-keyed randomness, the multi-view model wrapper and the
loss composition of the method, metrics, the run folder (config, metrics, checkpoints, results)
and `fit`, the epoch loop.

Randomness is keyed, not streamed: the sample order of epoch e comes from (seed, e), a sample's
crop from (seed, e, index), a batch's augmentation from (seed, e, step). A run resumed from the
checkpoint of epoch e therefore replays exactly what an uninterrupted run would have done.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, recall_score
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from augment import TwoViews, key_seed, keyed_generator
from losses import IGNORE, SupConLoss, multimodal_views
from models import set_frozen_bn_eval

log = logging.getLogger("engine")



# ----------------------------------------------------------------------------- flags

def add_common_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float) -> None:
    """Flags every script takes; the defaults given are the script's published settings."""
    g = parser.add_argument_group("run")
    g.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    g.add_argument("--batch_size", type=int, default=batch_size, help=f"per-process batch size (default {batch_size})")
    g.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, sample order, crops, augmentations (default 0)")
    g.add_argument("--save_path", type=Path, default=None, help="run folder (default runs/<script>-<time>)")
    g.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue a killed run from RUN_DIR/last.pt with RUN_DIR's config; "
                        "--epochs may extend it, --device and --workers may change")
    g = parser.add_argument_group("hardware")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the networks, losses stay float32 (default: on with CUDA)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format for the conv nets (default: on with CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers per process (default: CPU count / processes, at most 8; 1 on CPU)")
    g.add_argument("--augment_on", choices=["device", "loader"], default="device",
                   help="make augmented views on the training device in batches (default), "
                        "or per sample in the DataLoader workers (the original style)")


def resolve_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags; with --resume, take the run's own config and keep only what may change."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.resume is None:
        return args
    config_path = args.resume / "config.json"
    if not config_path.is_file():
        parser.error(f"--resume {args.resume}: no config.json there; is it a run folder?")
    saved = json.loads(config_path.read_text())
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}
    explicit = {a.dest for a in parser._actions if given & set(a.option_strings)}
    resumed = argparse.Namespace(**{**vars(args), **saved})
    for key in ("device", "workers", "epochs"):
        if key in explicit:
            setattr(resumed, key, getattr(args, key))
    resumed.resume, resumed.save_path = args.resume, args.resume
    return resumed


# ----------------------------------------------------------------------------- process context

@dataclass
class Context:
    """Where this process runs: device, torchrun rank and world size, numeric options."""

    device: torch.device
    rank: int
    world: int
    amp: bool
    channels_last: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def to_device(self, x: Tensor) -> Tensor:
        """Move an image batch (B, C, H, W) to the device in the chosen memory format."""
        return self.memory_format(x.to(self.device, non_blocking=True))

    def memory_format(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def setup(args: argparse.Namespace) -> Context:
    """Logging, torchrun process group (NCCL on GPU, gloo on CPU), device, seeds."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    cuda = device.type == "cuda"
    ctx = Context(device, rank, world,
                  amp=cuda if args.amp is None else args.amp,
                  channels_last=cuda if args.channels_last is None else args.channels_last)
    if ctx.amp and not cuda:
        log.warning("--amp on %s: bf16 autocast on CPU is slow and only useful for debugging", device)
    seed_everything(args.seed)
    return ctx


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def generator(device: torch.device, *parts: int) -> torch.Generator:
    return keyed_generator(*parts, device=device)


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
        batch_size: per-process batch size, used with drop_last.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, *, shuffle: bool = True,
                 weights: Tensor | None = None, drop_last: bool = False, batch_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.shuffle, self.weights, self.epoch = shuffle, weights, 0
        per_rank = math.ceil(n / world) if not drop_last else n // world
        self.per_rank = per_rank - per_rank % batch_size if drop_last else per_rank

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
        indices: optional subset (position -> index into `dataset`), e.g. for --data_ratio.
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


def subset_indices(n: int, ratio: float, seed: int) -> list[int]:
    """A fixed, seeded subset of round(ratio * n) indices (at least one), in ascending order."""
    if not 0 < ratio <= 1:
        raise ValueError(f"--data_ratio must be in (0, 1], got {ratio}")
    keep = max(1, round(ratio * n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].tolist())


def make_loader(dataset: Dataset, batch_size: int, ctx: Context, args: argparse.Namespace, *, train: bool,
                indices: Sequence[int] | None = None, weights: Tensor | None = None) -> DataLoader:
    """A DataLoader over `dataset` (or its `indices`) with an EpochSampler.

    Training drops the last incomplete batch (BatchNorm needs more than one sample, and
    gathered losses need equal batches on every rank). Workers, pinning and prefetch follow
    the context.
    """
    keyed = EpochKeyed(dataset, indices)
    sampler = EpochSampler(len(keyed), args.seed, ctx.rank, ctx.world, shuffle=train, weights=weights,
                           drop_last=train, batch_size=batch_size)
    if train and len(sampler) == 0:
        raise ValueError(f"{len(keyed)} training samples give no full batch of {batch_size} on {ctx.world} process(es); "
                         "lower --batch_size")
    workers = args.workers
    if workers is None:
        workers = min(8, max(1, (os.cpu_count() or 1) // ctx.world)) if ctx.device.type == "cuda" else 1
    return DataLoader(keyed, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


class Views:
    """Turns a batch into the views of each modality, on the training device.

    Fine-tuning uses (augmented, original) pairs (`n_views=2`) or a single image, augmented if
    `augment` is set; pre-training uses two augmented views (`keep_original=False`).
    `on="device"` augments whole batches on the device with per-sample random parameters from a
    (seed, epoch, step, rank) generator; `on="loader"` has the DataLoader workers do it per
    sample (`dataset_transform`), the original style, kept for comparison.

    Args:
        modalities: batch keys to read ("s1", "s2").
        augment: an `augment.Augment`, or None for no augmentation.
        n_views: 1 or 2.
        on: "device" or "loader".
        keep_original: whether the last of two views is the original image.
    """

    def __init__(self, modalities: Sequence[str], augment: Callable | None, n_views: int, on: str, ctx: Context,
                 seed: int, keep_original: bool = True) -> None:
        self.modalities, self.augment, self.n_views, self.on, self.ctx, self.seed = list(modalities), augment, n_views, on, ctx, seed
        self.n_augmented = 0 if augment is None else n_views - (keep_original and n_views == 2)
        if on == "loader" and self.n_augmented == 2:
            raise ValueError("two augmented views are made on the device only; use --augment_on device")

    def dataset_transform(self) -> Callable | None:
        """The per-sample transform for the data set (None when views are made on the device)."""
        if self.on == "device" or self.augment is None:
            return None
        return TwoViews(self.augment) if self.n_views == 2 else self.augment

    def __call__(self, batch: dict, epoch: int, step: int) -> dict[str, list[Tensor]]:
        """
        Returns:
            modality -> list of n_views image batches (B, C, H, W); with an original view, it
            is the last.
        """
        if self.on == "loader" or self.augment is None:
            views = {}
            for m in self.modalities:
                item = batch[m]
                views[m] = [self.ctx.to_device(v) for v in item] if isinstance(item, (list, tuple)) else [self.ctx.to_device(item)] * self.n_views
            return views
        g = generator(self.ctx.device, self.seed, epoch, step, self.ctx.rank)
        views = {}
        for m in self.modalities:
            x = self.ctx.to_device(batch[m])
            # grid_sample returns NCHW whatever its input: restore the conv nets' memory format.
            augmented = [self.ctx.memory_format(self.augment(x, generator=g)) for _ in range(self.n_augmented)]
            views[m] = augmented + [x] * (self.n_views - self.n_augmented)
        return views

    def originals(self, batch: dict) -> dict[str, list[Tensor]]:
        """Evaluation views: the originals only."""
        return {m: [self.ctx.to_device(batch[m])] for m in self.modalities}


# ----------------------------------------------------------------------------- model and loss

@contextmanager
def bn_updates_count(module: nn.Module, times: int) -> Iterator[None]:
    """Inside the block, each running-statistics update of `module`'s training batch-norm layers
    counts as `times` updates with the same batch statistics.

    With momentum m, `times` updates of the running mean r with batch mean b give
    (1 - m)^times * r + (1 - (1 - m)^times) * b: one update with momentum 1 - (1 - m)^times.
    The variance follows the same recursion. `num_batches_tracked` still advances once per pass:
    it enters the update only with momentum=None, which is refused here.
    """
    layers = [bn for bn in module.modules()
              if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training and bn.track_running_stats]
    if times == 1 or not layers:
        yield
        return
    for bn in layers:
        if bn.momentum is None:
            raise ValueError(f"{type(bn).__name__} with momentum=None (a cumulative average) cannot count one update "
                             f"as {times}; give it a momentum, or use --separate_ce_pass")
    saved = [bn.momentum for bn in layers]
    for bn, m in zip(layers, saved):
        bn.momentum = 1.0 - (1.0 - m) ** times
    try:
        yield
    finally:
        for bn, m in zip(layers, saved):
            bn.momentum = m


class MultiViewClassifier(nn.Module):
    """Per-modality encoders, run once per view; classifier heads on the original views.

    It owns no parameters of its own: the encoders and heads are the modules that checkpoints
    save (in their released layouts); this wrapper routes views through them, in one forward
    call, as DDP needs.

    The original work encodes the original view twice in training (once as a SupCon view, once
    more for the heads). Here it is encoded once, and its batch-norm update counts twice
    (`bn_updates_count`), so the running statistics, and hence evaluation, follow the same
    recursion as the original's (augmented, original, original) updates.

    Args:
        encoders: modality ("s1", "s2") -> module mapping (B, C, H, W) to (B, D). One module may
            serve several modalities (a shared trunk).
        heads: head name -> classifier. "fused" reads the original features of every modality
            concatenated in `encoders` order; a modality name reads that modality only. Empty
            for pre-training.
        separate_ce_pass: the original style: in a training step with two views, encode the
            original view once more for the heads instead of reusing its features (same values
            and running statistics, a third more compute).
    """

    def __init__(self, encoders: dict[str, nn.Module], heads: dict[str, nn.Module] | None = None,
                 separate_ce_pass: bool = False) -> None:
        super().__init__()
        unique = list({id(e): e for e in encoders.values()}.values())
        self.encoders = nn.ModuleList(unique)
        self.route = {m: next(i for i, u in enumerate(unique) if u is e) for m, e in encoders.items()}
        self.heads = nn.ModuleDict(heads or {})
        self.separate_ce_pass = separate_ce_pass

    def encode(self, modality: str, x: Tensor) -> Tensor:
        return self.encoders[self.route[modality]](x)

    def forward(self, views: dict[str, list[Tensor]]) -> dict[str, dict[str, Tensor]]:
        """
        Args:
            views: modality -> list of V image batches (B, C, H, W); the last is the original.
        Returns:
            {"features": modality -> (B, V, D), "logits": head -> (B, num_classes)}.
        """
        # Only a training step with heads and (augmented, original) views has the extra CE pass.
        ce_pass = self.training and len(self.heads) > 0 and all(len(vs) > 1 for vs in views.values())
        reuse = ce_pass and not self.separate_ce_pass
        features = {}
        for m, vs in views.items():
            encoded = [self.encode(m, v) for v in vs[:-1]]
            with bn_updates_count(self.encoders[self.route[m]], 2 if reuse else 1):
                encoded.append(self.encode(m, vs[-1]))
            features[m] = torch.stack(encoded, dim=1)
        if ce_pass and self.separate_ce_pass:
            original = {m: self.encode(m, vs[-1]) for m, vs in views.items()}
        else:
            original = {m: f[:, -1] for m, f in features.items()}
        logits = {}
        for name, head in self.heads.items():
            x = torch.cat([original[m] for m in self.route], dim=1) if name == "fused" else original[name]
            logits[name] = head(x)
        return {"features": features, "logits": logits}


def predict(logits: dict[str, Tensor]) -> Tensor:
    """Class predictions (B,): one head's argmax, or the mean softmax of several (late fusion)."""
    if len(logits) == 1:
        return next(iter(logits.values())).argmax(1)
    return torch.stack([l.float().softmax(1) for l in logits.values()]).mean(0).argmax(1)


def supcon_labels(labels: Tensor, ignore: int = IGNORE) -> Tensor:
    """Labels for SupCon: an ignored sample becomes a class of its own (positives: its own views)."""
    unique = -1 - torch.arange(len(labels), device=labels.device)
    return torch.where(labels == ignore, unique, labels)


def compose_loss(out: dict[str, dict[str, Tensor]], labels: Tensor, *, ce_labels: Tensor | None = None,
                 supcon: SupConLoss | None = None, ce_weight: float = 1.0, sup_weight: float = 1.0) -> dict[str, Tensor]:
    """The method's loss: `ce_weight * CE + sup_weight * SupCon`.

    CE: sum over heads, each the mean over samples whose label is not IGNORE (0 if none).
    SupCon on L2-normalised features: across modalities on the batch axis
    (`multimodal_views`, S1 first) when a fused head exists, otherwise one SupCon per modality,
    summed.

    Args:
        out: output of MultiViewClassifier.
        labels: (B,) class ids for SupCon; IGNORE entries become classes of their own.
        ce_labels: (B,) targets for CE (default `labels`); IGNORE entries are skipped.
    Returns:
        {"loss", "ce", and "supcon" if used}: scalar tensors.
    """
    targets = labels if ce_labels is None else ce_labels
    valid = (targets != IGNORE).sum().clamp(min=1)
    ce = sum(F.cross_entropy(l.float(), targets, ignore_index=IGNORE, reduction="sum") / valid for l in out["logits"].values())
    terms = {"ce": ce}
    total = ce_weight * ce
    if supcon is not None:
        features = {m: F.normalize(f.float(), dim=-1) for m, f in out["features"].items()}
        ids = supcon_labels(labels)
        if "fused" in out["logits"] and len(features) == 2:
            stacked, stacked_ids = multimodal_views(features["s1"], features["s2"], ids)
            sup = supcon(stacked, stacked_ids)
        else:
            sup = sum(supcon(f, ids) for f in features.values())
        terms["supcon"] = sup
        total = total + sup_weight * sup
    terms["loss"] = total
    return terms


# ----------------------------------------------------------------------------- metrics

def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str],
                           ignore: Sequence[int] = (IGNORE,)) -> dict:
    """Per-class accuracy (recall), AA (their mean over classes present) and OA, in percent.

    Samples whose true label is in `ignore` count nowhere, and ignored classes get no column.
    Returns:
        {"per_class": {name: % or None when absent}, "AA": %, "OA": %, "n": samples counted}.
    """
    keep = ~np.isin(y_true, list(ignore))
    y_true, y_pred = y_true[keep], y_pred[keep]
    classes = [c for c in range(len(class_names)) if c not in ignore]
    if len(y_true) == 0:
        return {"per_class": {class_names[c]: None for c in classes}, "AA": None, "OA": None, "n": 0}
    recall = recall_score(y_true, y_pred, labels=classes, average=None, zero_division=0)
    present = set(np.unique(y_true).tolist())
    per_class = {class_names[c]: (100.0 * float(r) if c in present else None) for c, r in zip(classes, recall)}
    # AA is sklearn's balanced accuracy: the mean recall over the classes present.
    scores = [v for v in per_class.values() if v is not None]
    return {"per_class": per_class, "AA": sum(scores) / len(scores),
            "OA": 100.0 * float(accuracy_score(y_true, y_pred)), "n": int(len(y_true))}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, views_of: Callable[[dict], dict[str, list[Tensor]]],
             ctx: Context, class_names: Sequence[str], ignore: Sequence[int] = (IGNORE,),
             label_of: Callable[[dict], Tensor] = lambda batch: batch["label"]) -> dict:
    """Metrics of `model` on `loader`, predictions gathered from every rank."""
    model.eval()
    indices, truths, preds = [], [], []
    for batch in tqdm(loader, desc="eval", leave=False, disable=not ctx.is_main):
        with ctx.autocast():
            out = model(views_of(batch))
        preds.append(predict(out["logits"]).cpu())
        truths.append(label_of(batch).cpu())
        indices.append(batch["index"])
    index, truth, pred = torch.cat(indices), torch.cat(truths), torch.cat(preds)
    if ctx.world > 1:
        gathered = [None] * ctx.world
        dist.all_gather_object(gathered, (index, truth, pred))
        index, truth, pred = (torch.cat(parts) for parts in zip(*gathered))
    _, first = np.unique(index.numpy(), return_index=True)  # drop the sampler's padding repeats
    return classification_metrics(truth.numpy()[first], pred.numpy()[first], class_names, ignore)


# ----------------------------------------------------------------------------- run folder

class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped."""


class RunDir:
    """A run's folder: config.json, metrics.jsonl, last.pt, best.pt, results.json.

    Only rank 0 writes. Checkpoints are written to a temporary file and renamed, so a kill
    during a save leaves the previous checkpoint intact.
    """

    def __init__(self, path: Path, args: argparse.Namespace, ctx: Context) -> None:
        self.path, self.ctx = Path(path), ctx
        if ctx.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "config.json").write_text(json.dumps(vars_json(args), indent=2, sort_keys=True))

    def log_metrics(self, record: dict) -> None:
        if self.ctx.is_main:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, epoch: int) -> None:
        """Forget metric records from `epoch` on (written before a kill, replayed on resume)."""
        file = self.path / "metrics.jsonl"
        if self.ctx.is_main and file.exists():
            kept = [l for l in file.read_text().splitlines() if json.loads(l)["epoch"] < epoch]
            file.write_text("".join(l + "\n" for l in kept))

    def save(self, name: str, state: dict) -> Path:
        target = self.path / name
        if self.ctx.is_main:
            tmp = target.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, target)
        return target

    def write_results(self, results: dict) -> None:
        if self.ctx.is_main:
            (self.path / "results.json").write_text(json.dumps(results, indent=2))


def default_run_path(script: str) -> Path:
    return Path("runs") / f"{script}-{time.strftime('%Y%m%d-%H%M%S')}"


def wrap(model: nn.Module, ctx: Context, args: argparse.Namespace, *, find_unused: bool = False) -> nn.Module:
    """Device, memory format, DDP under torchrun, and torch.compile if asked."""
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

@dataclass
class Task:
    """What a script plugs into `fit`.

    Attributes:
        step: (batch, epoch, step index) -> loss terms {"loss": total, ...}; runs under autocast.
        modules: checkpoint key -> module saved under it. "state_dict" holds the network in its
            released layout (so that `models.load_checkpoint` reads our checkpoints); further
            keys hold what that layout lacks (the METER-ML heads).
        evaluate: None, or a function returning `classification_metrics` of the current model.
        eval_epochs: 0-based epochs after which to evaluate.
        checkpoint: extra entries for every checkpoint (e.g. {"arch": "resnet50"}).
        select: metric that picks the best checkpoint ("AA" or "OA").
        dataset: data set name written to results.json, for `summarize.py`.
    """

    step: Callable[[dict, int, int], dict[str, Tensor]]
    modules: dict[str, nn.Module]
    evaluate: Callable[[], dict] | None = None
    eval_epochs: frozenset[int] = frozenset()
    checkpoint: dict | None = None
    select: str = "AA"
    dataset: str = ""


def eval_schedule(epochs: int, every: int, dense_after: int | None = None) -> frozenset[int]:
    """0-based epochs to evaluate after: every `every` epochs, every epoch after `dense_after`, the last."""
    chosen = {e for e in range(epochs) if (every > 0 and (e + 1) % every == 0) or (dense_after is not None and e + 1 > dense_after)}
    return frozenset(chosen | {epochs - 1})


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, task: Task, run: RunDir,
        ctx: Context, args: argparse.Namespace) -> dict:
    """Train for args.epochs, evaluating on `task.eval_epochs`, checkpointing every epoch.

    Resumes from `run.path / "last.pt"` when args.resume is set. A non-finite loss stops the
    run with the batch's sample ids; `last.pt` then still holds the last good epoch. Returns the
    results written to results.json: the last evaluation (the reported result) and,
    separately, the best one with its epoch, labelled as selected on the evaluation split.
    """
    start, best, last_eval = 0, None, None
    if args.resume is not None:
        state = torch.load(run.path / "last.pt", map_location="cpu", weights_only=False)
        for key, module in task.modules.items():
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        start, best, last_eval = state["epoch"], state["best"], state["last_eval"]
        restore_rng(state["rng"])
        run.truncate_metrics(start + 1)
        log.info("resumed %s after epoch %d of %d", run.path, start, args.epochs)

    for epoch in range(start, args.epochs):
        loader.sampler.set_epoch(epoch)
        model.train()
        set_frozen_bn_eval(model)
        sums: dict[str, Tensor] = {}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=not ctx.is_main)
        for step, batch in enumerate(bar):
            with ctx.autocast():
                terms = task.step(batch, epoch, step)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                ids = batch.get("id", batch["index"])
                ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {epoch + 1}, batch {step} "
                    f"({', '.join(f'{k} {v.item():.4g}' for k, v in terms.items())}); sample ids {ids}. "
                    f"Last good checkpoint: {run.path / 'last.pt'} (after epoch {epoch}); "
                    f"resume with --resume {run.path} after fixing the cause")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        record = {"epoch": epoch + 1, **{f"train_{k}": (v / max(1, len(loader))).item() for k, v in sums.items()}}
        if task.evaluate is not None and epoch in task.eval_epochs:
            last_eval = {"epoch": epoch + 1, **task.evaluate()}
            record.update({k: last_eval[k] for k in ("AA", "OA", "per_class")})
            log.info("epoch %d: loss %.4f  AA %.2f  OA %.2f", epoch + 1, record["train_loss"], last_eval["AA"] or 0, last_eval["OA"] or 0)
            if last_eval[task.select] is not None and (best is None or last_eval[task.select] > best[task.select]):
                best = last_eval
                run.save("best.pt", checkpoint_state(task, None, epoch + 1, best, last_eval))
        else:
            log.info("epoch %d: loss %.4f", epoch + 1, record["train_loss"])
        run.log_metrics(record)
        run.save("last.pt", checkpoint_state(task, optimizer, epoch + 1, best, last_eval))

    results = {"dataset": task.dataset, "config": vars_json(args), "last": last_eval, "best_selected_on_eval_split": best,
               "note": "'last' is the reported result; 'best_selected_on_eval_split' was chosen on the "
                       "evaluation split itself, which is optimistic"}
    run.write_results(results)
    return results


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
