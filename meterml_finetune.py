"""Fine-tune (or linearly evaluate) SmallAlexNet encoders on METER-ML with CE and optional SupCon.

    python meterml_finetune.py MODEL_WEIGHTS --data_root DATA [--scenario s1s2_fused] [--use_augs --use_sup_con]

Scenarios: `s1`, `s2` (one modality, one linear head), `s1s2` (a head per modality, SupCon per
modality, predictions by the mean of the two heads' probabilities) and `s1s2_fused` (one head on
the concatenated S1 + S2 features, SupCon across both modalities: the method). CE always reads
the original views; SupCon reads (augmented, original) pairs. Trains on the `train` split,
evaluates on `val`; the reported result is the last epoch's. The encoder in `last.pt` / `best.pt`
("state_dict") has the released SmallAlexNet layout; the heads are under "heads".
"""
import argparse
import logging
from pathlib import Path

import torch
from torch import nn

import engine
from augment import meterml_augment
from datasets import MeterMLDataset
from losses import SupConLoss
from models import DualEncoder, SharedNet, count_trainable, freeze_all_but, load_checkpoint, param_groups

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
                   help="linear: frozen encoder, heads only; finetune: everything trains (default)")
    p.add_argument("--use_augs", action="store_true",
                   help="augment: random flips + resized crop 72 px, scale 0.9-1.0 (the SupCon view; with CE only, CE's input)")
    p.add_argument("--use_sup_con", action="store_true", help="add the supervised contrastive loss")
    p.add_argument("--sup_delta", type=float, default=1.0, help="weight of SupCon (default 1.0)")
    p.add_argument("--cross_delta", type=float, default=1.0, help="weight of cross-entropy (default 1.0)")
    p.add_argument("--temperature", type=float, default=0.07, help="SupCon temperature and base temperature (default 0.07)")
    p.add_argument("--dont_include_negatives", action="store_true",
                   help="CE ignores the Negative class and the metrics leave it out; negatives stay in SupCon")
    p.add_argument("--data_ratio", type=float, default=1.0, help="fraction of the training set, a fixed seeded subset (default 1.0)")
    p.add_argument("--subset_seed", type=int, default=0, help="seed of the --data_ratio subset, fixed across --seed (default 0)")
    p.add_argument("--head_lr", type=float, default=None,
                   help="learning rate of the linear heads (default: --lr). The heads read L2-normalised "
                        "features, so their logits grow slowly: short runs need a larger rate")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0, the original's plain SGD)")
    p.add_argument("--weight_decay", type=float, default=0.0, help="SGD weight decay (default 0)")
    p.add_argument("--eval_every", type=int, default=10, help="evaluate every N epochs (default 10)")
    p.add_argument("--eval_dense_after", type=int, default=79, help="and after every epoch past this one (default 79)")
    p.add_argument("--separate_ce_pass", action="store_true",
                   help="original style: a third encoder pass for CE instead of reusing the original view's features")
    p.add_argument("--name", default=None, help="configuration label for summaries (default: derived from the flags)")
    engine.add_common_args(p, epochs=121, batch_size=32, lr=0.01)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.MODEL_WEIGHTS is None:
        p.error("MODEL_WEIGHTS is required: a checkpoint path, or 'random' for a randomly initialised encoder")
    if args.use_sup_con and args.eval_mode == "linear":
        p.error("--use_sup_con with --eval_mode linear: the encoder is frozen, so SupCon can change nothing "
                "(it has no parameters of its own). Use --eval_mode finetune, or drop --use_sup_con.")
    if args.use_sup_con and not args.use_augs:
        log.warning("--use_sup_con without --use_augs: both views are the original image, so SupCon only pulls "
                    "together different samples of a class")


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
    if scenario == "s1s2_fused":
        return nn.ModuleDict({"fused": nn.Linear(2 * feat_dim, num_classes)})
    return nn.ModuleDict({m: nn.Linear(feat_dim, num_classes) for m in MODALITIES[scenario]})


def config_name(args: argparse.Namespace) -> str:
    loss = "SupCon+CE" if args.use_sup_con else "CE"
    return args.name or f"{args.scenario} {loss}" + (" aug" if args.use_augs and not args.use_sup_con else "")


def main(argv=None) -> dict:
    parser = build_parser()
    args = engine.resolve_args(parser, argv)
    check_args(parser, args)
    args.name = config_name(args)
    ctx = engine.setup(args)
    run = engine.RunDir(args.save_path or engine.default_run_path("meterml_finetune"), args, ctx)

    modalities = MODALITIES[args.scenario]
    n_views = 2 if args.use_sup_con else 1
    views = engine.Views(modalities, meterml_augment(72) if args.use_augs else None, n_views, args.augment_on, ctx, args.seed)
    train_set = MeterMLDataset(args.data_root, "train", transform=views.dataset_transform(), seed=args.seed)
    val_set = MeterMLDataset(args.data_root, "val")
    subset = engine.subset_indices(len(train_set), args.data_ratio, args.subset_seed) if args.data_ratio < 1 else None
    loader = engine.make_loader(train_set, args.batch_size, ctx, args, train=True, indices=subset)
    val_loader = engine.make_loader(val_set, 2 * args.batch_size, ctx, args, train=False)
    log.info("%s: %d training samples, %d validation samples", args.name, len(loader.dataset), len(val_set))

    encoder = build_encoder(args)
    heads = build_heads(args.scenario, len(MeterMLDataset.classes))
    net = engine.MultiViewClassifier({m: route(encoder, m) for m in modalities}, heads, args.separate_ce_pass)
    if args.eval_mode == "linear":
        freeze_all_but(net, heads)
    log.info("trainable parameters: %d", count_trainable(net))
    # A forward pass never uses every stem of a SharedNet, so DDP must tolerate unused parameters.
    model = engine.wrap(net, ctx, args, find_unused=True)
    optimizer = torch.optim.SGD(param_groups(net, heads, args.lr, args.head_lr or args.lr, args.weight_decay), lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)

    supcon = SupConLoss(args.temperature, "all", args.temperature, gather_distributed=ctx.world > 1) if args.use_sup_con else None
    negative = MeterMLDataset.NEGATIVE
    ignore = (engine.IGNORE, negative) if args.dont_include_negatives else (engine.IGNORE,)

    def step(batch: dict, epoch: int, i: int) -> dict:
        labels = batch["label"].to(ctx.device, non_blocking=True)
        ce_labels = torch.where(labels == negative, engine.IGNORE, labels) if args.dont_include_negatives else labels
        out = model(views(batch, epoch, i))
        return engine.compose_loss(out, labels, ce_labels=ce_labels, supcon=supcon,
                                   ce_weight=args.cross_delta, sup_weight=args.sup_delta)

    def evaluate() -> dict:
        return engine.evaluate(model, val_loader, views.originals, ctx, MeterMLDataset.classes, ignore)

    task = engine.Task(step, {"state_dict": encoder, "heads": heads}, evaluate,
                       engine.eval_schedule(args.epochs, args.eval_every, args.eval_dense_after), dataset="METER-ML")
    return engine.fit(model, optimizer, loader, task, run, ctx, args)


if __name__ == "__main__":
    main()
