"""Fine-tune (or linearly evaluate) SmallAlexNet encoders on METER-ML with CE and optional SupCon.

    python meterml_finetune.py MODEL_WEIGHTS --data_root DATA [--scenario s1s2_fused] [--use_sup_con] [--use_augs]

Scenarios: `s1`, `s2` (one modality, one linear head), `s1s2` (a head per modality, SupCon per
modality, predictions by the mean of the two heads' probabilities) and `s1s2_fused` (one head on
the concatenated S1 + S2 features, SupCon across both modalities: the method). CE reads the
original images. SupCon reads one view per modality without --use_augs (the S1 and S2 features
of a sample, and every other feature of its class, are its positives) and (augmented, original)
views with it, both encoded in one joint pass (models.MultiModalNet). Trains on the `train`
split, evaluates on `val`. The encoder in `last.pt` / `best.pt` ("state_dict") has the released
SmallAlexNet layout; the heads are under "heads".
"""
import argparse
import logging
from pathlib import Path

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

import engine
from augment import meterml_augment
from datasets import MeterMLDataset, split_overlap
from losses import IGNORE, SupConCELoss
from models import DualEncoder, MultiModalNet, SharedNet, count_trainable, freeze_all_but, linear_head, load_checkpoint, param_groups

log = logging.getLogger("meterml_finetune")

MODALITIES = {"s1": ["s1"], "s2": ["s2"], "s1s2": ["s1", "s2"], "s1s2_fused": ["s1", "s2"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("MODEL_WEIGHTS", nargs="?", help="pre-trained encoder checkpoint (released SmallAlexNet layout), or 'random'")
    p.add_argument("--data_root", type=Path, default=Path("data/meter-ml"), help="METER-ML root (default data/meter-ml)")
    p.add_argument("--model", choices=["shared", "dual"], default="dual",
                   help="shared trunk with modality stems, or one encoder per modality (default dual, as the original)")
    p.add_argument("--scenario", choices=list(MODALITIES), default="s1s2_fused", help="modalities and heads (default s1s2_fused)")
    p.add_argument("--eval_mode", choices=["linear", "finetune"], default="finetune",
                   help="linear: frozen encoder (batch norm too), heads only; finetune: everything trains (default)")
    p.add_argument("--use_augs", action="store_true",
                   help="augmented views: random resized crop 72 px (scale 0.9-1.0) and flips, encoded jointly with the "
                        "originals; SupCon reads both, CE the originals (as the original, also without SupCon)")
    p.add_argument("--dont_include_negatives", action="store_true",
                   help="CE ignores the Negative class and the metrics leave it out; negatives stay in SupCon")
    p.add_argument("--allow_split_overlap", action="store_true", help="allow image sets present in both train and val")
    p.add_argument("--drop_repeated", action="store_true",
                   help="keep only the first entry of an image folder listed several times in the metadata "
                        "(default: every entry, as the original)")
    p.add_argument("--momentum", type=engine.non_negative, default=0.0, help="SGD momentum (default 0, the original's plain SGD)")
    p.add_argument("--weight_decay", type=engine.non_negative, default=0.0, help="SGD weight decay (default 0)")
    engine.add_supervised_args(p, head_lr=None, eval_dense_after=79)
    engine.add_common_args(p, epochs=121, batch_size=32, lr=0.01)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.MODEL_WEIGHTS is None:
        p.error("MODEL_WEIGHTS is required: a checkpoint path, or 'random' for a randomly initialised encoder")
    if args.use_sup_con and args.eval_mode == "linear":
        p.error("--use_sup_con with --eval_mode linear: the encoder is frozen, so SupCon can change nothing "
                "(it has no parameters of its own). Use --eval_mode finetune, or drop --use_sup_con.")


def build_encoder(args: argparse.Namespace) -> nn.Module:
    encoder = SharedNet() if args.model == "shared" else DualEncoder()
    if args.MODEL_WEIGHTS != "random":
        load_checkpoint(encoder, args.MODEL_WEIGHTS)
    return encoder


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


def config_name(args: argparse.Namespace) -> str:
    loss = "SupCon+CE" if args.use_sup_con else "CE"
    return args.name or f"{args.scenario} {loss}" + (" aug" if args.use_augs else "")


@record
def main(argv=None) -> dict:
    parser = build_parser()
    args = engine.resolve_args(parser, argv)
    check_args(parser, args)
    args.name = config_name(args)
    ctx = engine.setup(args)

    modalities = MODALITIES[args.scenario]
    repeated = "first" if args.drop_repeated else "keep"
    train_set = MeterMLDataset(args.data_root, "train", seed=args.seed, repeated=repeated)
    val_set = MeterMLDataset(args.data_root, "val", repeated=repeated)
    overlap = split_overlap(train_set, val_set)
    if overlap and not args.allow_split_overlap:
        raise ValueError(f"{len(overlap)} image sets are in both the train and the val split of {args.data_root}, e.g. "
                         f"{overlap[:5]}: the evaluation would measure training data. Fix the metadata, or pass --allow_split_overlap")
    encoder = build_encoder(args)
    heads = build_heads(args.scenario, len(MeterMLDataset.classes))
    fused = args.scenario == "s1s2_fused"
    net = MultiModalNet({m: route(encoder, m) for m in modalities}, fused_head=heads["fused"] if fused else None,
                        modality_heads=None if fused else dict(heads), ce_from=args.ce_from)
    if args.eval_mode == "linear":
        freeze_all_but(net, heads)
    run = engine.RunDir(args.save_path or engine.default_run_path("meterml_finetune"), args, ctx)

    subset = engine.subset_indices(len(train_set), args.data_ratio, args.subset, args.subset_seed)
    loader = engine.make_loader(train_set, args.batch_size, ctx, args, train=True, indices=subset)
    val_loader = engine.make_loader(val_set, args.eval_batch_size or 2 * args.batch_size, ctx, args, train=False)
    log.info("%s: %d training samples, %d validation samples; %d trainable parameters",
             args.name, len(loader.dataset), len(val_set), count_trainable(net))

    views = engine.Views(modalities, meterml_augment(72, args.augment_impl) if args.use_augs else None, ctx, args.seed)
    # A forward pass never uses every stem of a SharedNet, so DDP must tolerate unused parameters.
    model = engine.wrap(net, ctx, args, find_unused=True)
    optimizer = torch.optim.SGD(param_groups(net, heads, args.lr, args.head_lr or args.lr, args.weight_decay), lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    criterion = SupConCELoss(temperature=args.temperature, ce_weight=args.ce_weight, sup_weight=args.sup_weight,
                             use_supcon=args.use_sup_con, cross_modal=fused, gather_distributed=ctx.world > 1)
    negative = MeterMLDataset.NEGATIVE
    ignore = (IGNORE, negative) if args.dont_include_negatives else (IGNORE,)

    def step(batch: dict, epoch: int, i: int) -> dict:
        originals, augmented = views(batch, epoch, i)
        labels = batch["label"].to(ctx.device, non_blocking=ctx.pin_memory)
        ce_labels = torch.where(labels == negative, IGNORE, labels) if args.dont_include_negatives else labels
        with ctx.autocast():
            out = model(originals, augmented)
        return criterion(out["features"], out["logits"], labels, ce_labels)

    def evaluate() -> dict:
        return engine.evaluate(model, val_loader, views, ctx, MeterMLDataset.classes, ignore)

    task = engine.Task(step, {"state_dict": encoder, "heads": heads}, evaluate,
                       engine.eval_schedule(args.epochs, args.eval_every, args.eval_dense_after), dataset="METER-ML",
                       # the original's running best: the overall accuracy (without negatives when they are excluded)
                       select="OA")
    return engine.fit(model, optimizer, loader, task, run, ctx, args)


if __name__ == "__main__":
    main()
