"""Fine-tune (or linearly evaluate) SmallAlexNet encoders on METER-ML with CE and optional SupCon.

    python meterml_finetune.py --model_path WEIGHTS|random --data_root DATA [--scenario s1s2_fused]
                               [--use_sup_con] [--augment]
    python meterml_finetune.py WEIGHTS --data_root DATA ...      (the original's spelling)

Scenarios: `s1`, `s2` (one modality, one linear head), `s1s2` (a head per modality, SupCon per
modality, predictions by the mean of the two heads' probabilities) and `s1s2_fused` (one head on
the concatenated S1 + S2 features, SupCon across both modalities: the method). CE reads the
original images. SupCon reads one view per modality without --augment (the S1 and S2 features
of a sample, and every other feature of its class, are its positives) and (augmented, original)
views with it, both encoded in one joint pass (models.MultiModalNet). Trains on the `train`
split, evaluates on `val`. The encoder in `last.pt` / `best.pt` ("state_dict") has the released
SmallAlexNet layout; the heads are under "heads".
"""
import argparse
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributed.elastic.multiprocessing.errors import record

from augment import AUGMENT_IMPLS, Views, meterml_augment
from datasets import IGNORE, MeterMLDataset, split_overlap
from engine import data_report, epoch_summary, train_one_epoch
from losses import SupConCELoss
from models import (
    S1_CHANNELS,
    S2_CHANNELS,
    DualEncoder,
    MultiModalNet,
    SharedNet,
    count_trainable,
    freeze_all_but,
    linear_head,
    load_checkpoint,
    param_groups,
)
from util import cli, flags, metrics, process
from util.checkpoint import checkpoint_meta
from util.rundir import RunDir, Saved, default_run_path

log = logging.getLogger("meterml_finetune")

MODALITIES = {"s1": ["s1"], "s2": ["s2"], "s1s2": ["s1", "s2"], "s1s2_fused": ["s1", "s2"]}


def build_parser() -> argparse.ArgumentParser:
    p = flags.parser(__doc__)
    g = flags.add_data_args(p, root="data/meter-ml", what="METER-ML root")
    g.add_argument("--exclude_negatives", action=argparse.BooleanOptionalAction, default=True,
                   help="CE ignores the Negative class and the metrics leave it out; negatives stay in SupCon (default "
                        "on, as the original's recorded run; --no-exclude_negatives: the original's argparse default)")
    g.add_argument("--dont_include_negatives", dest="exclude_negatives", action="store_true",
                   help="the original's spelling of --exclude_negatives")
    flags.add_image_dirs_arg(g)
    g.add_argument("--allow_split_overlap", action="store_true", help="allow image sets present in both train and val")
    g.add_argument("--drop_repeated", action="store_true",
                   help="keep only the first entry of an image folder listed several times in the metadata "
                        "(default: every entry, as the original)")
    g = flags.add_model_args(p, archs=["dual", "shared"], arch="dual", original_spellings=True)
    flags.add_finetune_flag(g, default=True, eval_mode_alias=True)
    g.add_argument("--scenario", choices=list(MODALITIES), default="s1s2_fused",
                   help="modalities and heads (default s1s2_fused)")
    g = flags.add_method_args(p, head_lr=None)
    flags.add_augment_args(g, default=False, impls=AUGMENT_IMPLS, use_augs=True,
                           what="augmented views: random resized crop 72 px (scale 0.9-1.0) and flips, encoded jointly "
                                "with the originals; SupCon reads both, CE the originals (as the original, also "
                                "without SupCon)")
    flags.add_optimizer_args(g, weight_decay=0.0, momentum=True)
    flags.add_eval_args(p, dense_after=79)
    flags.add_run_args(p, epochs=121, batch_size=32, lr=0.01)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flag combinations that cannot run or would change nothing; name the run."""
    if args.model_path is None:
        p.error("--model_path (or the positional MODEL_WEIGHTS) is required: a checkpoint path, or 'random' for a "
                "randomly initialised encoder")
    if args.use_sup_con and not args.finetune:
        p.error("--use_sup_con with a frozen encoder (--no-finetune, --eval_mode linear): SupCon can change nothing "
                "(it has no parameters of its own, and the encoder's batch norm is fixed). Use --finetune, or drop "
                "--use_sup_con.")
    args.name = args.name or config_name(args)


def config_name(args: argparse.Namespace) -> str:
    loss = "SupCon+CE" if args.use_sup_con else "CE"
    return f"{args.scenario} {loss}" + (" aug" if args.augment else "")


def route(encoder: nn.Module, modality: str) -> nn.Module:
    """The module that encodes `modality` (the per-modality encoder of a DualEncoder)."""
    if isinstance(encoder, DualEncoder):
        return encoder.encoder_1 if modality == "s1" else encoder.encoder_2
    return encoder


def build_heads(scenario: str, num_classes: int, feat_dim: int = 128) -> nn.ModuleDict:
    """"fused" (one head on the concatenated features) or one head per modality."""
    if scenario == "s1s2_fused":
        return nn.ModuleDict({"fused": linear_head(2 * feat_dim, num_classes)})
    return nn.ModuleDict({m: linear_head(feat_dim, num_classes) for m in MODALITIES[scenario]})


def build_model(args: argparse.Namespace, ctx: process.Context) -> tuple[nn.Module, nn.ModuleDict, MultiModalNet]:
    """The encoder (weights from --model_path), the heads of the scenario, and the method's
    forward pass over them, on the device; with --no-finetune only the heads train."""
    encoder = SharedNet() if args.arch == "shared" else DualEncoder()
    if args.model_path != "random":
        load_checkpoint(encoder, args.model_path)
    heads = build_heads(args.scenario, len(MeterMLDataset.classes))
    modalities = MODALITIES[args.scenario]
    fused = args.scenario == "s1s2_fused"
    net = MultiModalNet({m: route(encoder, m) for m in modalities}, fused_head=heads["fused"] if fused else None,
                        modality_heads=None if fused else dict(heads), ce_from=args.ce_from)
    if not args.finetune:
        freeze_all_but(net, heads)
    # A forward pass never uses every stem of a SharedNet, so DDP must tolerate unused parameters.
    return encoder, heads, process.wrap(net, ctx, args, find_unused=True)


def build_optimizer(args: argparse.Namespace, model: nn.Module, heads: nn.ModuleDict) -> torch.optim.SGD:
    groups = param_groups(model, heads, args.lr, args.head_lr or args.lr, args.weight_decay)
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def build_loss(args: argparse.Namespace, ctx: process.Context) -> SupConCELoss:
    return SupConCELoss(temperature=args.temperature, ce_weight=args.ce_weight, sup_weight=args.sup_weight,
                        use_supcon=args.use_sup_con, cross_modal=args.scenario == "s1s2_fused",
                        gather_distributed=ctx.world > 1)


def make_step(views: Views, model: MultiModalNet, criterion: SupConCELoss, ctx: process.Context,
              exclude_negatives: bool) -> Callable:
    """The training step: the batch's views on the device, the forward pass, the loss terms (CE
    without the Negative class when it is excluded; SupCon keeps it)."""

    def step(batch: dict, epoch: int, i: int) -> dict[str, Tensor]:
        originals, augmented = views.with_augmented(batch, epoch, i)
        labels = batch["label"].to(ctx.device, non_blocking=ctx.pin_memory)
        ce_labels = torch.where(labels == MeterMLDataset.NEGATIVE, IGNORE, labels) if exclude_negatives else labels
        with ctx.autocast():
            out = model(originals, augmented)
        return criterion(out["features"], out["logits"], labels, ce_labels)

    return step


@record
def main(argv=None) -> dict:
    parser = build_parser()
    args, ctx = process.start(parser, argv, check_args, script="meterml_finetune")

    repeated = "first" if args.drop_repeated else "keep"
    train_set = MeterMLDataset(args.data_root, "train", seed=args.seed, repeated=repeated,
                               image_dirs=args.train_image_dirs)
    val_set = MeterMLDataset(args.data_root, "val", repeated=repeated)
    overlap = split_overlap(train_set, val_set)
    if overlap and not args.allow_split_overlap:
        raise ValueError(f"{len(overlap)} image sets are in both the train and the val split of {args.data_root}, e.g. "
                         f"{overlap[:5]}: the evaluation would measure training data. Fix the metadata, or pass "
                         "--allow_split_overlap")
    indices = process.subset_indices(len(train_set), args.data_ratio, args.subset, args.subset_seed)
    loader = process.make_loader(train_set, args.batch_size, ctx, args, train=True, indices=indices)
    val_loader = process.make_loader(val_set, args.eval_batch_size or 2 * args.batch_size, ctx, args, train=False)

    encoder, heads, model = build_model(args, ctx)
    criterion = build_loss(args, ctx)
    optimizer = build_optimizer(args, model, heads)
    views = Views(MODALITIES[args.scenario], meterml_augment(72, args.augment_impl) if args.augment else None, ctx,
                  args.seed)
    step = make_step(views, model, criterion, ctx, args.exclude_negatives)
    ignore = (IGNORE, MeterMLDataset.NEGATIVE) if args.exclude_negatives else (IGNORE,)
    log.info("%s: %d training samples, %d validation samples; %d trainable parameters",
             args.name, len(loader.dataset), len(val_set), count_trainable(model))

    eval_epochs = metrics.eval_schedule(args.epochs, args.eval_every, args.eval_dense_after)
    # select: the original's running best, the overall accuracy (without negatives when they are excluded)
    meta = checkpoint_meta("meterml_finetune", args.arch, {"s1": S1_CHANNELS, "s2": S2_CHANNELS}, train_set,
                           classes=list(MeterMLDataset.classes), scenario=args.scenario)
    saved = Saved({"state_dict": encoder, "heads": heads}, optimizer, select="OA", meta=meta)
    with RunDir(args.save_path or default_run_path("meterml_finetune"), args, ctx, "meterml_finetune", saved) as run:
        for epoch in range(run.start, args.epochs):
            row = train_one_epoch(step, model, loader, optimizer, ctx, epoch, args.epochs, board=run.board(len(loader)),
                                  run_path=run.path)
            if epoch in eval_epochs:
                row |= run.evaluated(epoch, metrics.evaluate(model, val_loader, views, ctx, MeterMLDataset.classes,
                                                             ignore))
            run.end_epoch(epoch, row, epoch_summary(row))
        data = data_report(run, {"train": train_set, "val": val_set}, ctx)
        return run.finish(process.environment(ctx), "METER-ML", data=data)


if __name__ == "__main__":
    cli.run(main)
