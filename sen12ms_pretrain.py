"""Contrastive pre-training of the dual ResNet on SEN12MS S1 / S2 pairs: the first stage of the DFC2020 pipeline, the
recipe of SSLTransformerRS's `train_resnet_backbone.py` (docs/flags.md, docs/method.md).

    python sen12ms_pretrain.py --data_root SEN12MS [--arch resnet50] [--augment] [--supervised_lc]
    torchrun --nproc_per_node 8 sen12ms_pretrain.py --data_root SEN12MS --batch_size 25   # the published 200

Writes `checkpoint-epoch<E>.pth` after the 0-based epochs E = 0, 25, ..., and the last, in the released layout, and
`checkpoint.pth`, the last of them, for `dfc_finetune.py --model_path`; `last.pt` holds what resuming needs.
"""

import argparse
import logging
import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.elastic.multiprocessing.errors import record

from augment import AUGMENT_IMPLS, Augment, RandomFlipRotation, RandomResizedCrop, Views
from datasets import SEASONS, CropError, ManifestDataset, SEN12MSDataset, is_manifest, seed_normalize
from engine import data_record, data_report, epoch_summary, train_one_epoch
from losses import NTXent, PairwiseNTXent, SupConLoss, multimodal_views, supcon_labels
from models import (
    PRETRAINED_ARCH,
    PRETRAINED_BACKBONES,
    RESNETS,
    BandCountError,
    DualResNet,
    MultiModalNet,
    count_trainable,
    load_backbone_weights,
    pretrained_backbone_files,
)
from util import cli, flags, process
from util.checkpoint import checkpoint_meta
from util.rundir import RunDir, Saved, default_run_path

log = logging.getLogger("sen12ms_pretrain")

SCHEDULES = ("original", "cosine", "constant")


def build_parser() -> argparse.ArgumentParser:
    p = flags.parser(__doc__)
    g = flags.add_data_args(p, root="data/sen12ms",
                            what="folder holding the four season folders ROIs1158_spring ..., a manifest CSV of your "
                            "own pairs (every row, labels optional), or a packed copy of either (pack.py)")
    g.add_argument("--seasons", nargs="+", choices=tuple(SEASONS), default=list(SEASONS),
                   help="seasons to read (default: all four; not for a manifest)")
    g.add_argument("--crop", type=flags.positive_int, default=128, help="random crop of each patch, px (default 128)")
    flags.add_normalize_arg(g)
    flags.add_s2_bands_arg(g)
    g = flags.add_model_args(p, archs=RESNETS, arch="resnet50", weights=False)
    flags.add_backbone_args(g, backbones=PRETRAINED_BACKBONES)
    g.add_argument("--sync_bn", action="store_true",
                   help="under torchrun, batch norm over the global batch (SyncBatchNorm, CUDA only; off as the "
                        "original)")
    g = p.add_argument_group("method")
    flags.add_temperature_arg(g, 0.07, "NT-Xent (or SupCon) temperature")
    flags.add_augment_args(g, default=False, impls=AUGMENT_IMPLS,
                           what="two augmented views per modality (random resized crop, scale 0.2-1, flips, rotation "
                                "up to 20 degrees, one bilinear resampling), each seed-normalised: four views, all of "
                                "one patch positives (PairwiseNTXent)")
    g.add_argument("--supervised_lc", action="store_true",
                   help="SupCon across modalities with the patch's majority land-cover class (8 DFC classes from "
                        "the lc band 1) as label; unlabelled patches (255) are classes of their own")
    flags.add_optimizer_args(g, weight_decay=1e-4, momentum=False)
    g.add_argument("--schedule", choices=SCHEDULES, default="original",
                   help="learning rate per epoch: original (constant through --warmup_epochs, then the original's "
                        "cosine whose period is the steps of one epoch), cosine (linear warm-up over --warmup_epochs, "
                        "then a half cosine to 0 at the last epoch), constant (default original)")
    g.add_argument("--warmup_epochs", type=flags.non_negative_int, default=10,
                   help="epochs before the cosine of --schedule starts (default 10)")
    g.add_argument("--snapshot_every", type=flags.positive_int, default=25,
                   help="also write the weights after every 0-based epoch that is a multiple of N, and after the last, "
                        "as checkpoint-epoch<E>.pth (default 25, as the original: epoch0, epoch25, ..., epoch200; "
                        "SSLTransformerRS's DFC2020 scripts read epoch100)")
    flags.add_run_args(p, epochs=201, batch_size=200, lr=3e-5)
    return p


def learning_rate(epoch: int, base: float, schedule: str, warmup: int, epochs: int, steps_per_epoch: int) -> float:
    """The rate of 0-based `epoch`. original: the original's CosineAnnealingLR(T_max=len(train_loader)), stepped at
    the end of every epoch from epoch `warmup` on, in PyTorch's periodic closed form: constant for epochs 0..warmup,
    then a slow decay. cosine: a linear warm-up, then a half cosine to 0 at the last epoch."""
    if schedule == "original":
        return base * (1 + math.cos(math.pi * max(0, epoch - warmup) / steps_per_epoch)) / 2
    if schedule == "cosine":
        if epoch < warmup:
            return base * (epoch + 1) / warmup
        return base * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup))) / 2
    return base


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.schedule == "cosine" and args.warmup_epochs >= args.epochs:
        p.error(f"--warmup_epochs {args.warmup_epochs} leaves no epoch of the cosine of --schedule cosine "
                f"(--epochs {args.epochs})")
    flags.check_backbone_args(p, args, PRETRAINED_ARCH)
    flags.check_data_args(p, args, is_manifest(args.data_root), "SEN12MS")


def build_net(args: argparse.Namespace, bands: tuple[int, int], s2_band_names: list[str] | None = None) -> DualResNet:
    """The dual ResNet for the data's (S1, S2) `bands`, backbones from the backbone flags if given."""
    net = DualResNet(args.arch, s1_channels=bands[0], s2_channels=bands[1])
    if args.backbones or args.s1_backbone or args.s2_backbone:
        files = (pretrained_backbone_files(args.backbones) if args.backbones
                 else {"s1": args.s1_backbone, "s2": args.s2_backbone})
        load_backbone_weights(net, **files, fresh_first_conv=args.fresh_first_conv, s2_band_names=s2_band_names)
    return net


def build_loss(args: argparse.Namespace, ctx: process.Context) -> nn.Module:
    gather = ctx.world > 1
    if args.supervised_lc:
        return SupConLoss(args.temperature, "all", args.temperature, gather_distributed=gather)
    if args.augment:
        return PairwiseNTXent(blocks=4, tau=args.temperature, gather_distributed=gather)
    return NTXent(tau=args.temperature, blocks=2, gather_distributed=gather)


def make_step(args: argparse.Namespace, views: Views, model: MultiModalNet, loss_fn: nn.Module,
              ctx: process.Context) -> Callable:
    """The crops (or two augmented views of them) on the device, a pass per modality, the cross-modal loss."""

    def step(batch: dict, epoch: int, i: int) -> dict[str, Tensor]:
        if args.augment:  # view 0 the first augmented view, view 1 the second
            first, second = views.two_augmented(batch, epoch, i)
            pair = (second, first)
        else:
            pair = (views.originals(batch), None)
        with ctx.autocast():
            features = model(*pair)["features"]  # "s1", "s2" -> (B, V, 128), V = 1 or 2
        if args.supervised_lc:
            ids = supcon_labels(batch["label"].to(ctx.device), rank=ctx.rank)
            stacked, stacked_ids = multimodal_views(*(F.normalize(features[m].float(), dim=-1) for m in ("s1", "s2")),
                                                    ids)
            return {"loss": loss_fn(stacked, stacked_ids)}
        # Block-major rows: S1 views, then S2 views; row k of every block is patch k.
        z = torch.cat([f.transpose(0, 1).reshape(-1, f.shape[-1]) for f in features.values()])
        return {"loss": loss_fn(z)}

    return step


def snapshot_name(epoch: int) -> str:
    """The file of the weights after 0-based `epoch`, as the original names them (epoch0, epoch25, ...)."""
    return f"checkpoint-epoch{epoch}.pth"


@record
def main(argv=None) -> dict:
    parser = build_parser()
    args, ctx = process.start(parser, argv, check_args, script="sen12ms_pretrain")
    if args.sync_bn and ctx.world > 1 and ctx.device.type != "cuda":
        parser.error(f"--sync_bn on {ctx.device}: torch.nn.SyncBatchNorm synchronises CUDA tensors only")

    manifest = is_manifest(args.data_root)
    try:
        if manifest:
            dataset = ManifestDataset(args.data_root, None, crop=args.crop, train=True, seed=args.seed,
                                      normalize=args.normalize, require_labels=args.supervised_lc,
                                      s2_bands=args.s2_bands)
        else:
            dataset = SEN12MSDataset(args.data_root, args.seasons, crop=args.crop, train=True, seed=args.seed,
                                     normalize=args.normalize)
    except CropError as error:
        parser.exit(2, f"{parser.prog}: error: {error} (--crop {args.crop})\n")
    except ValueError as error:  # a bad manifest row: one line, no usage text
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    dataset[0]  # one item read now: unreadable data stops here
    indices = process.subset_indices(len(dataset), args.data_ratio, args.subset, args.subset_seed)
    # The original drops the last partial batch of every epoch.
    loader = process.make_loader(dataset, args.batch_size, ctx, args, train=True, indices=indices, drop_last=True)

    try:
        net = build_net(args, (dataset.bands["s1"], dataset.bands["s2"]), dataset.s2_band_names)
    except BandCountError as error:
        parser.error(f"{error}; --fresh_first_conv starts that layer afresh")
    # What the checkpoints hold: the two backbones with their projection heads, no classifier.
    backbones = nn.ModuleDict({"backbone1": net.backbone1, "backbone2": net.backbone2})
    # With --augment, one pass per modality over both views (batch norm sees 2B images).
    model = process.wrap(MultiModalNet({"s1": net.backbone1, "s2": net.backbone2}), ctx, args, sync_bn=args.sync_bn)
    loss_fn = build_loss(args, ctx)
    optimizer = torch.optim.Adam(backbones.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    augment = (Augment(RandomResizedCrop(args.crop, scale=(0.2, 1.0)), RandomFlipRotation(20.0)) if args.augment
               else None)
    # seed: every augmented view divided by its own maxima, as the original; ssl4eo scales by constants
    renormalize = seed_normalize if args.normalize == "seed" else None
    views = Views(["s1", "s2"], augment, ctx, args.seed, renormalize=renormalize)
    step = make_step(args, views, model, loss_fn, ctx)
    log.info("%d patches (%s), %d per epoch; %d trainable parameters", len(dataset), ", ".join(args.seasons),
             len(loader.dataset), count_trainable(backbones))

    meta = checkpoint_meta("sen12ms_pretrain", args.arch, dataset.bands, dataset, normalize=args.normalize)
    with RunDir(args.save_path or default_run_path("sen12ms_pretrain"), args, ctx, "sen12ms_pretrain",
                Saved({"state_dict": backbones}, optimizer, {"arch": args.arch}, meta=meta)) as run:
        for epoch in range(run.start, args.epochs):
            # the schedule is a function of the epoch: a resumed run gets the same rates
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(epoch, args.lr, args.schedule, args.warmup_epochs, args.epochs,
                                            len(loader))
            row = train_one_epoch(step, model, loader, optimizer, ctx, epoch, args.epochs, board=run.board(len(loader)),
                                  run_path=run.path)
            if epoch % args.snapshot_every == 0 or epoch == args.epochs - 1:
                run.save_weights(snapshot_name(epoch), epoch)
            run.end_epoch(epoch, row, epoch_summary(row))

        # Counted in every process and its loader workers; the original skipped each batch holding a NaN.
        data = data_report(run, {"train": dataset}, ctx)
        counts = torch.tensor([dataset.unreadable, dataset.all_zero_patches], device=ctx.device)
        if ctx.world > 1:
            dist.all_reduce(counts)
        data.update(zip(["unreadable_patches_substituted", "all_zero_patches"], counts.tolist()))
        log.info("data problems met in this run: %s", data)
        if ctx.is_main and run.start < args.epochs:
            (run.path / "checkpoint.pth").unlink(missing_ok=True)
            os.link(run.path / snapshot_name(args.epochs - 1), run.path / "checkpoint.pth")  # the last weights, no copy
        return run.finish(process.environment(ctx), "manifest" if manifest else "SEN12MS pre-training", data=data,
                          **data_record(args.data_root, dataset, manifest))


if __name__ == "__main__":
    cli.run(main)
