"""Contrastive pre-training of the dual ResNet on SEN12MS S1 / S2 pairs (SSLTransformerRS).

    python sen12ms_pretrain.py --data_root SEN12MS [--arch resnet50] [--augment] [--supervised_lc]
    torchrun --nproc_per_node 8 sen12ms_pretrain.py --data_root SEN12MS --batch_size 25

The first stage of the DFC2020 pipeline, as the original `train_resnet_backbone.py`: two ResNets
(`models.DualResNet`'s backbone1 for S1, 2 bands, and backbone2 for S2, 13 bands, each with its
projection head Linear(F, F), ReLU, Linear(F, 128)) read random 128 px crops of the 256 px
patches, each crop seed-normalised on its own. Loss: cross-modal NT-Xent at temperature 0.07: the
S1 and S2 projections of one patch are the positive pair, the other 2B - 2 projections of the
batch its negatives (under torchrun, of the global batch: 8 processes x 25 = the published 200).
Adam lr 3e-5, weight decay 1e-4, 201 epochs; the original's learning-rate schedule (`learning_rate`).
Not augmented, as the original; `--augment` adds two augmented views per modality, `--supervised_lc`
turns the loss into SupCon with the patch's majority land-cover class as label.

The run folder holds `checkpoint-epoch<E>.pth` after the 0-based epochs E = 0, 25, 50, ... and the
last (--snapshot_every), as the original, each the backbones in the released layout {"epoch": E,
"arch", "state_dict": backbone1.* / backbone2.*}, and `checkpoint.pth`, the last of them under a
fixed name (a hard link). `dfc_finetune.py --model_path` fine-tunes from any of them; the
original's DFC2020 fine-tuning read `checkpoint-epoch100.pth`. `last.pt` holds what resuming needs.
"""
import argparse
import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

import engine
from augment import Augment, RandomFlipRotation, RandomResizedCrop
from datasets import SEN12MSDataset, seed_normalize
from losses import NTXent, PairwiseNTXent, SupConLoss, multimodal_views, supcon_labels
from models import RESNETS, DualResNet, MultiModalNet, count_trainable

log = logging.getLogger("sen12ms_pretrain")

SEASONS = ("spring", "summer", "fall", "winter")
SCHEDULES = ("original", "cosine", "constant")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", type=Path, default=Path("data/sen12ms"),
                   help="folder holding the four season folders ROIs1158_spring ..., or a packed copy (datasets.py pack; default data/sen12ms)")
    p.add_argument("--seasons", nargs="+", choices=SEASONS, default=list(SEASONS), help="seasons to read (default: all four)")
    p.add_argument("--arch", choices=RESNETS, default="resnet50", help="backbone (default resnet50, as the released checkpoint)")
    p.add_argument("--crop", type=engine.positive_int, default=128, help="random crop of each patch, px (default 128)")
    p.add_argument("--temperature", "--tau", dest="temperature", type=engine.positive, default=0.07,
                   help="NT-Xent (or SupCon) temperature (default 0.07)")
    p.add_argument("--weight_decay", type=engine.non_negative, default=1e-4, help="Adam weight decay (default 1e-4)")
    p.add_argument("--schedule", choices=SCHEDULES, default="original",
                   help="learning rate per epoch: original (constant through --warmup_epochs, then the original's "
                        "cosine whose period is the steps of one epoch), cosine (linear warm-up over --warmup_epochs, "
                        "then a half cosine to 0 at the last epoch), constant (default original)")
    p.add_argument("--warmup_epochs", type=engine.non_negative_int, default=10,
                   help="epochs before the cosine of --schedule starts (default 10)")
    engine.add_subset_args(p)
    p.add_argument("--snapshot_every", type=engine.positive_int, default=25,
                   help="also write the weights after every 0-based epoch that is a multiple of N, and after the last, "
                        "as checkpoint-epoch<E>.pth (default 25, as the original: epoch0, epoch25, ..., epoch200; "
                        "the original's DFC2020 fine-tuning read epoch100)")
    p.add_argument("--sync_bn", action="store_true",
                   help="under torchrun, batch norm over the global batch (SyncBatchNorm, CUDA only; off as the original)")
    p.add_argument("--augment", action="store_true",
                   help="two augmented views per modality (random resized crop, scale 0.2-1, flips, rotation up to "
                        "20 degrees), each seed-normalised: four views, all of one patch positives (PairwiseNTXent)")
    p.add_argument("--supervised_lc", action="store_true",
                   help="SupCon across modalities with the patch's majority land-cover class (8 DFC classes from "
                        "the lc band 1) as label; unlabelled patches (255) are classes of their own")
    engine.add_common_args(p, epochs=201, batch_size=200, lr=3e-5)
    return p


def learning_rate(epoch: int, base: float, schedule: str, warmup: int, epochs: int, steps_per_epoch: int) -> float:
    """The learning rate of 0-based `epoch`.

    original: the original builds CosineAnnealingLR(T_max=len(train_loader)) and steps it once at
        the end of every epoch from epoch `warmup` on, so epoch e trains at
        base * (1 + cos(pi * max(0, e - warmup) / steps_per_epoch)) / 2
        (periodic, as PyTorch's closed form): constant for epochs 0..warmup, then a slow decay.
    cosine: base * (e + 1) / warmup during the warm-up epochs, then
        base * (1 + cos(pi * (e - warmup) / (epochs - warmup))) / 2.
    constant: base.
    """
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


@record
def main(argv=None) -> dict:
    parser = build_parser()
    args = engine.resolve_args(parser, argv)
    check_args(parser, args)
    ctx = engine.setup(args)
    if args.sync_bn and ctx.world > 1 and ctx.device.type != "cuda":
        parser.error(f"--sync_bn on {ctx.device}: torch.nn.SyncBatchNorm synchronises CUDA tensors only")

    dataset = SEN12MSDataset(args.data_root, args.seasons, crop=args.crop, train=True, seed=args.seed)
    dataset[0]  # one item read now: a crop larger than the patches, or unreadable data, stop here
    subset = engine.subset_indices(len(dataset), args.data_ratio, args.subset, args.subset_seed)
    loader = engine.make_loader(dataset, args.batch_size, ctx, args, train=True, indices=subset, drop_last=True)
    net = DualResNet(args.arch)
    # What the checkpoints hold: the two backbones with their projection heads, no classifier.
    backbones = nn.ModuleDict({"backbone1": net.backbone1, "backbone2": net.backbone2})
    augment = Augment(RandomResizedCrop(args.crop, scale=(0.2, 1.0)), RandomFlipRotation(20.0)) if args.augment else None
    views = engine.Views(["s1", "s2"], augment, ctx, args.seed, renormalize=seed_normalize, second="augmented")
    # With --augment, one pass per modality over both views (batch norm sees 2B images).
    model = engine.wrap(MultiModalNet({"s1": net.backbone1, "s2": net.backbone2}), ctx, args, sync_bn=args.sync_bn)
    optimizer = torch.optim.Adam(backbones.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gather = ctx.world > 1
    if args.supervised_lc:
        loss_fn = SupConLoss(args.temperature, "all", args.temperature, gather_distributed=gather)
    elif args.augment:
        loss_fn = PairwiseNTXent(4, args.temperature, gather_distributed=gather)
    else:
        loss_fn = NTXent(args.temperature, 2, gather_distributed=gather)
    run = engine.RunDir(args.save_path or engine.default_run_path("sen12ms_pretrain"), args, ctx)
    log.info("%d patches (%s), %d per epoch; %d trainable parameters", len(dataset), ", ".join(args.seasons),
             len(loader.dataset), count_trainable(backbones))

    def step(batch: dict, epoch: int, i: int) -> dict:
        if i == 0:  # the schedule is a function of the epoch: a resumed run gets the same rates
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(epoch, args.lr, args.schedule, args.warmup_epochs, args.epochs, len(loader))
        originals, augmented = views(batch, epoch, i)
        with ctx.autocast():
            features = model(originals, augmented)["features"]  # "s1", "s2" -> (B, V, 128), V = 1 or 2
        if args.supervised_lc:
            ids = supcon_labels(batch["label"].to(ctx.device), rank=ctx.rank)
            stacked, stacked_ids = multimodal_views(*(F.normalize(features[m].float(), dim=-1) for m in ("s1", "s2")), ids)
            return {"loss": loss_fn(stacked, stacked_ids)}
        # Block-major rows: S1 views, then S2 views; row k of every block is patch k.
        z = torch.cat([f.transpose(0, 1).reshape(-1, f.shape[-1]) for f in features.values()])
        return {"loss": loss_fn(z)}

    task = engine.Task(step, {"state_dict": backbones}, checkpoint={"arch": args.arch}, dataset="SEN12MS pre-training",
                       snapshot_every=args.snapshot_every)
    results = engine.fit(model, optimizer, loader, task, run, ctx, args)

    # Counted in every process and its loader workers; the original skipped each batch holding a NaN.
    counts = torch.tensor([dataset.nan_pixels, dataset.nonfinite_pixels - dataset.nan_pixels, dataset.unreadable,
                           dataset.all_zero_patches], device=ctx.device)
    if ctx.world > 1:
        dist.all_reduce(counts)
    data = dict(zip(["nan_pixels_replaced", "inf_pixels_replaced", "unreadable_patches_substituted", "all_zero_patches"],
                    counts.tolist()))
    log.info("data problems met in this run: %s", data)
    if ctx.is_main:
        final = run.path / engine.snapshot_name(args.epochs - 1)
        (run.path / "checkpoint.pth").unlink(missing_ok=True)
        os.link(final, run.path / "checkpoint.pth")  # the final weights under a fixed name, no second copy
        results["data"] = data
        run.write_results(results)
    return results


if __name__ == "__main__":
    main()
