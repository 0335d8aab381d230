"""Fine-tune the dual ResNet on DFC2020 with CE on the fused projections and optional SupCon.

    python dfc_finetune.py --data_root DATA --model_path DualResnet50.pth [--use_sup_con] [--finetune]

Trains on the DFC2020 `validation` split (986 patches) with random 224 px crops, each crop
seed-normalised on its own, and evaluates on the `test` split (5,128 patches). Evaluation reads
one 224 px window per test patch, labelled by the window's majority class, as the original; the
original drew the window anew at every evaluation, here its offset comes once from
--eval_offset_seed, so every evaluation and every run sees the same windows (--eval_crop 0: whole
patches instead). The classifier reads the concatenated 128-d S1 and S2 projections of the
original crops; SupCon reads the L2-normalised projections of (augmented, original) views, S1
and S2 stacked along the batch (models.MultiModalNet, losses.SupConCELoss).

Without --finetune (the original's recorded run) only the classifier trains; the frozen backbones
stay in training mode, so with --use_sup_con the joint (augmented, original) pass still moves the
batch-norm running statistics that evaluation uses: that is all SupCon changes there.

Instead of --model_path, the backbones may start from --backbones ssl4eo-moco or --s1_backbone /
--s2_backbone files, with --normalize ssl4eo (docs/backbones.md); weights whose first layer does
not fit the data's band counts are refused unless --fresh_first_conv.
"""
import argparse
import logging
from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributed.elastic.multiprocessing.errors import record

from augment import AUGMENT_IMPLS, Views, dfc_augment
from datasets import CropError, PatchDataset, balanced_indices, is_manifest, patch_dataset, seed_normalize
from engine import data_record, data_report, epoch_summary, train_one_epoch
from losses import SupConCELoss
from models import (
    PRETRAINED_ARCH,
    PRETRAINED_BACKBONES,
    RESNETS,
    BandCountError,
    DualResNet,
    MultiModalNet,
    count_trainable,
    freeze_all_but,
    load_backbone_weights,
    load_checkpoint,
    param_groups,
    pretrained_backbone_files,
)
from util import cli, flags, metrics, process
from util.checkpoint import checkpoint_meta
from util.rundir import RunDir, Saved, default_run_path

log = logging.getLogger("dfc_finetune")


def build_parser() -> argparse.ArgumentParser:
    p = flags.parser(__doc__)
    g = flags.add_data_args(p, root="data/dfc2020", what="folder holding ROIs0000_validation and ROIs0000_test, a "
                            "manifest CSV of your own pairs (docs/data.md), or a packed copy of either")
    g.add_argument("--crop", type=flags.positive_int, default=224, help="training crop, px (default 224)")
    g.add_argument("--eval_crop", type=flags.non_negative_int, default=224,
                   help="evaluation window, px, labelled by its majority class (default 224, as the original; "
                        "0: whole patches)")
    g.add_argument("--eval_offset_seed", type=flags.seed_int, default=0,
                   help="seed of the evaluation windows' offsets, drawn once per patch (default 0)")
    g.add_argument("--train_split", default="validation",
                   help="split to train on: DFC2020 validation or test, or a manifest's split column "
                        "(default validation)")
    g.add_argument("--eval_split", default="test", help="split to evaluate on, as --train_split (default test)")
    g.add_argument("--allow_same_split", action="store_true", help="allow training and evaluating on the same split")
    g.add_argument("--balanced_class", nargs="?", const="copies", choices=["copies", "weighted"], default=None,
                   help="oversample small classes: copies (the flag alone) repeats every patch by its class's "
                        "number of copies, the original's list (datasets.balanced_indices); weighted draws "
                        "with replacement weighted by 1 / class frequency")
    flags.add_normalize_arg(g)
    flags.add_s2_bands_arg(g)
    g = flags.add_model_args(p, archs=RESNETS, arch="resnet50")
    flags.add_backbone_args(g, backbones=PRETRAINED_BACKBONES)
    flags.add_finetune_flag(g, default=False)
    g.add_argument("--frozen_bn_eval", action="store_true",
                   help="without --finetune, keep the frozen backbone's batch norm in eval mode (a fixed encoder); "
                        "the original left it in training mode")
    g = flags.add_method_args(p, head_lr=3e-6)
    g.add_argument("--degrees", type=flags.non_negative, default=20.0,
                   help="largest rotation of the SupCon view, degrees (default 20)")
    flags.add_augment_args(g, default=None, impls=AUGMENT_IMPLS)
    flags.add_optimizer_args(g, weight_decay=1e-3, momentum=False)
    flags.add_eval_args(p, dense_after=150)
    flags.add_run_args(p, epochs=201, batch_size=32, lr=1e-5)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every refusal and warning about the flags, before any data is read: refuse combinations that cannot run or
    would change nothing, warn of weights that stay random or frozen; name the run."""
    if args.use_sup_con and not args.finetune and args.frozen_bn_eval:
        p.error("--use_sup_con with a frozen backbone and --frozen_bn_eval: SupCon trains no parameter and, with batch "
                "norm in eval mode, moves no running statistic either, so it would change nothing. Drop "
                "--frozen_bn_eval (the original's frozen run), add --finetune, or drop --use_sup_con.")
    if args.train_split == args.eval_split and not args.allow_same_split:
        p.error(f"--train_split and --eval_split are both {args.train_split!r}: the evaluation would measure the "
                "training data; pass --allow_same_split if that is what you want")
    flags.check_backbone_args(p, args, PRETRAINED_ARCH)
    flags.check_data_args(p, args, is_manifest(args.data_root), "DFC2020")
    backbones = args.backbones or args.s1_backbone or args.s2_backbone
    if backbones and not args.finetune:
        log.warning("the projection heads start fresh and stay frozen without --finetune: the classifier reads random "
                    "projections of the pre-trained features")
    if args.model_path in (None, "random") and not backbones and not args.finetune:
        log.warning("--model_path %s without --finetune: the backbones keep their RANDOM initialisation, frozen, and "
                    "only the classifier trains, on random features: a lower bound, not the method (the original "
                    "always loads pre-trained weights); pass the pre-trained weights, or add --finetune",
                    args.model_path or "(not given)")
    if args.use_sup_con and not args.finetune:
        log.info("--use_sup_con with the backbones frozen (no --finetune), as the original's recorded run: SupCon "
                 "trains no parameter; it changes the run only through the batch-norm running statistics that the "
                 "joint (augmented, original) pass updates, which evaluation uses")
    args.name = args.name or config_name(args)


def config_name(args: argparse.Namespace) -> str:
    """'frozen CE', 'fine-tuned SupCon+CE', ...: which parameters train, and the loss."""
    return f"{'fine-tuned' if args.finetune else 'frozen'} {'SupCon+CE' if args.use_sup_con else 'CE'}"


def training_items(args: argparse.Namespace, train_set: PatchDataset) -> tuple[list[int], Tensor | None]:
    """The patches an epoch draws from (--data_ratio, --balanced_class copies) and, for
    --balanced_class weighted, their draw weights."""
    indices = process.subset_indices(len(train_set), args.data_ratio, args.subset, args.subset_seed)
    if not args.balanced_class:
        return indices, None
    labels = train_set.patch_labels()[indices]
    if args.balanced_class == "copies":
        return [indices[i] for i in balanced_indices(labels).tolist()], None
    return indices, 1.0 / torch.bincount(labels)[labels].float()


def build_eval_set(args: argparse.Namespace, root, split: str, *, classes: list[str] | None = None,
                   norm_stats: dict | None = None) -> PatchDataset:
    """The evaluation data as the run reads it: one --eval_crop window per patch at its fixed
    --eval_offset_seed offset (whole patches with --eval_crop 0), the run's --normalize (stats: the
    training split's, `norm_stats`); DFC2020 or a manifest, whose labels are numbered by `classes` (a run's)
    when given. predict.py reads the same windows, from the checkpoint's meta (`describe`)."""
    return patch_dataset(root, split, crop=args.eval_crop or None, offset_seed=args.eval_offset_seed,
                         normalize=args.normalize or "seed", norm_stats=norm_stats, classes=classes,
                         s2_bands=getattr(args, "s2_bands", None))


def open_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[PatchDataset, PatchDataset]:
    """The training and evaluation data, every label map read once, before the run folder exists: a
    data error (a missing or unreadable file, undocumented label codes, a bad manifest row) ends the
    script in one line. Warns about a manifest's rows that neither split takes and evaluation labels without a
    training row."""
    manifest = is_manifest(args.data_root)
    try:
        train_set = patch_dataset(args.data_root, args.train_split, crop=args.crop, train=True, seed=args.seed,
                                  normalize=args.normalize, s2_bands=args.s2_bands)
        eval_set = build_eval_set(args, args.data_root, args.eval_split, norm_stats=train_set.norm_stats)
        found = {split: dataset.label_report() for split, dataset in ((args.train_split, train_set),
                                                                       (args.eval_split, eval_set))}
    except CropError as error:
        parser.exit(2, f"{parser.prog}: error: {error} (--crop {args.crop}, --eval_crop {args.eval_crop})\n")
    except ValueError as error:  # an unknown split, a bad manifest row, undocumented label codes
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for split, report in found.items():
        if report["ignored_label_patches"]:
            log.warning("%s split: %d of %d patches have an ignored majority label (no label, or a class outside "
                        "%s: DFC2020 Savanna 3 and Snow/Ice 8); cross-entropy and the metrics skip them; pixels of "
                        "ignored codes: %s", split, report["ignored_label_patches"], report["patches"],
                        ", ".join(eval_set.classes), report.get("ignored_pixels_by_code", {}))
    if manifest:
        other = {s: n for s, n in train_set.split_counts.items() if s not in (args.train_split, args.eval_split)}
        if other:
            log.warning("%s: %d rows of other splits than --train_split %r and --eval_split %r are not used (split: "
                        "rows): %s", args.data_root, sum(other.values()), args.train_split, args.eval_split,
                        ", ".join(f"{s!r}: {n}" for s, n in sorted(other.items())))
        trained = set(train_set.label_names)
        unseen = Counter(n for n in eval_set.label_names if n and n not in trained)
        if unseen:
            log.warning("evaluation labels with no training row (their per-class accuracy is 0 by construction; "
                        "label: rows): %s", ", ".join(f"{n}: {k}" for n, k in sorted(unseen.items())))
    return train_set, eval_set


def describe(args: argparse.Namespace, ctx: process.Context, train_set: PatchDataset, eval_set: PatchDataset) -> dict:
    """The checkpoints' "meta": what predict.py needs to apply them alone (docs/modules.md). The evaluation window:
    --eval_crop, or with 0 the patches' size (None where they differ in height and width)."""
    height, width = getattr(eval_set, "_patch_size", (None, None))
    return checkpoint_meta("dfc_finetune", args.arch, train_set.bands, train_set, classes=list(eval_set.classes),
                           normalize=args.normalize, window=args.eval_crop or (height if height == width else None),
                           eval_crop=args.eval_crop, eval_offset_seed=args.eval_offset_seed, crop=args.crop,
                           eval_batch_size=args.eval_batch_size or 2 * args.batch_size, amp=ctx.amp, name=args.name)


def build_model(args: argparse.Namespace, ctx: process.Context, num_classes: int,
                bands: tuple[int, int], s2_band_names: list[str] | None = None) -> tuple[DualResNet, MultiModalNet]:
    """The dual ResNet for the data's (S1, S2) `bands` (weights from --model_path or the backbone flags; only
    the classifier trains without --finetune; warns of a first layer --fresh_first_conv left random and frozen) and
    the method's forward pass over it, on the device."""
    net = DualResNet(args.arch, num_classes=num_classes, s1_channels=bands[0], s2_channels=bands[1])
    fresh = []
    if args.model_path not in (None, "random"):
        missing, _ = load_checkpoint(net, args.model_path, fresh_first_conv=args.fresh_first_conv)
        fresh = [k for k in missing if k in ("backbone1.conv1.weight", "backbone2.conv1.weight")]
    if args.backbones or args.s1_backbone or args.s2_backbone:
        files = (pretrained_backbone_files(args.backbones) if args.backbones
                 else {"s1": args.s1_backbone, "s2": args.s2_backbone})
        fresh = load_backbone_weights(net, **files, fresh_first_conv=args.fresh_first_conv,
                                      s2_band_names=s2_band_names)
    if not args.finetune:
        freeze_all_but(net, net.fc)
        if fresh:  # what --fresh_first_conv did, known only now
            log.warning("%s started fresh and stay frozen without --finetune: a random first layer", ", ".join(fresh))
    model = MultiModalNet({"s1": net.backbone1, "s2": net.backbone2}, fused_head=net.fc, ce_from=args.ce_from)
    return net, process.wrap(model, ctx, args)


def build_optimizer(args: argparse.Namespace, net: DualResNet) -> torch.optim.Adam:
    # Frozen backbone: the original trains the classifier at the base rate; fine-tuning gives it its own.
    groups = param_groups(net, net.fc, args.lr, args.head_lr if args.finetune else args.lr, args.weight_decay)
    return torch.optim.Adam(groups, betas=(0.9, 0.999))


def build_loss(args: argparse.Namespace, ctx: process.Context) -> SupConCELoss:
    return SupConCELoss(temperature=args.temperature, ce_weight=args.ce_weight, sup_weight=args.sup_weight,
                        use_supcon=args.use_sup_con, cross_modal=True, gather_distributed=ctx.world > 1)


def build_views(args: argparse.Namespace, ctx: process.Context) -> Views:
    """Originals, and with SupCon the original's augmented view, each seed-normalised after it
    (--normalize seed); --normalize ssl4eo scales by fixed constants, so a view needs no renormalising."""
    augment = dfc_augment(args.degrees, args.augment_impl) if args.use_sup_con else None
    renormalize = seed_normalize if args.normalize == "seed" else None
    return Views(["s1", "s2"], augment, ctx, args.seed, renormalize=renormalize)


def make_step(views: Views, model: MultiModalNet, criterion: SupConCELoss, ctx: process.Context) -> Callable:
    """The training step: the batch's views on the device, the forward pass, the loss terms."""

    def step(batch: dict, epoch: int, i: int) -> dict[str, Tensor]:
        originals, augmented = views.with_augmented(batch, epoch, i)
        labels = batch["label"].to(ctx.device, non_blocking=ctx.pin_memory)
        with ctx.autocast():
            out = model(originals, augmented)
        return criterion(out["features"], out["logits"], labels)

    return step


@record
def main(argv=None) -> dict:
    parser = build_parser()
    args, ctx = process.start(parser, argv, check_args, script="dfc_finetune")

    train_set, eval_set = open_data(parser, args)
    indices, weights = training_items(args, train_set)
    loader = process.make_loader(train_set, args.batch_size, ctx, args, train=True, indices=indices, weights=weights)
    eval_loader = process.make_loader(eval_set, args.eval_batch_size or 2 * args.batch_size, ctx, args, train=False)

    try:
        net, model = build_model(args, ctx, len(eval_set.classes), (train_set.bands["s1"], train_set.bands["s2"]),
                                 train_set.s2_band_names)
    except BandCountError as error:
        parser.error(f"{error}; --fresh_first_conv starts that layer afresh")
    criterion = build_loss(args, ctx)
    optimizer = build_optimizer(args, net)
    views = build_views(args, ctx)
    step = make_step(views, model, criterion, ctx)
    log.info("%s: %d training patches an epoch, %d evaluation patches; %d trainable parameters",
             args.name, len(loader.dataset), len(eval_set), count_trainable(net))

    eval_epochs = metrics.eval_schedule(args.epochs, args.eval_every, args.eval_dense_after)
    saved = Saved({"state_dict": net}, optimizer, {"arch": args.arch}, meta=describe(args, ctx, train_set, eval_set))
    with RunDir(args.save_path or default_run_path("dfc_finetune"), args, ctx, "dfc_finetune", saved) as run:
        for epoch in range(run.start, args.epochs):
            row = train_one_epoch(step, model, loader, optimizer, ctx, epoch, args.epochs, board=run.board(len(loader)),
                                  frozen_bn_eval=args.finetune or args.frozen_bn_eval, run_path=run.path)
            if epoch in eval_epochs:
                row |= run.evaluated(epoch, metrics.evaluate(model, eval_loader, views, ctx, eval_set.classes))
            run.end_epoch(epoch, row, epoch_summary(row))
        data = data_report(run, {args.train_split: train_set, args.eval_split: eval_set}, ctx)
        manifest = is_manifest(args.data_root)
        return run.finish(process.environment(ctx), "manifest" if manifest else "DFC2020",
                          data=data, **data_record(args.data_root, train_set, manifest))


if __name__ == "__main__":
    cli.run(main)
