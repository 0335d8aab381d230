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
"""
import argparse
import logging
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

import engine
from augment import dfc_augment
from datasets import DFC2020Dataset, balanced_indices, seed_normalize
from losses import SupConCELoss
from models import RESNETS, DualResNet, MultiModalNet, count_trainable, freeze_all_but, load_checkpoint, param_groups

log = logging.getLogger("dfc_finetune")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", type=Path, default=Path("data/dfc2020"),
                   help="folder holding ROIs0000_validation and ROIs0000_test, or a packed copy (default data/dfc2020)")
    p.add_argument("--model_path", default=None, help="pre-trained dual ResNet in the released layout (default: random initialisation)")
    p.add_argument("--arch", choices=RESNETS, default="resnet50", help="backbone (default resnet50, as the released checkpoints)")
    p.add_argument("--finetune", action="store_true", help="train the whole network (default: the classifier only)")
    p.add_argument("--frozen_bn_eval", action="store_true",
                   help="without --finetune, keep the frozen backbone's batch norm in eval mode (a fixed encoder); "
                        "the original left it in training mode")
    p.add_argument("--degrees", type=engine.non_negative, default=20.0, help="largest rotation of the SupCon view, degrees (default 20)")
    p.add_argument("--balanced_class", nargs="?", const="copies", choices=["copies", "weighted"], default=None,
                   help="oversample small classes: copies (the flag alone) repeats every patch by its class's "
                        "number of copies, the original's list (datasets.balanced_indices); weighted draws "
                        "with replacement weighted by 1 / class frequency")
    p.add_argument("--weight_decay", type=engine.non_negative, default=1e-3, help="Adam weight decay (default 1e-3)")
    p.add_argument("--crop", type=engine.positive_int, default=224, help="training crop, px (default 224)")
    p.add_argument("--eval_crop", type=engine.non_negative_int, default=224,
                   help="evaluation window, px, labelled by its majority class (default 224, as the original; 0: whole patches)")
    p.add_argument("--eval_offset_seed", type=engine.seed_int, default=0,
                   help="seed of the evaluation windows' offsets, drawn once per patch (default 0)")
    p.add_argument("--train_split", choices=["validation", "test"], default="validation", help="DFC2020 split to train on (default validation)")
    p.add_argument("--eval_split", choices=["validation", "test"], default="test", help="DFC2020 split to evaluate on (default test)")
    p.add_argument("--allow_same_split", action="store_true", help="allow training and evaluating on the same split")
    engine.add_supervised_args(p, head_lr=3e-6, eval_dense_after=150)
    engine.add_common_args(p, epochs=201, batch_size=32, lr=1e-5)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.use_sup_con and not args.finetune and args.frozen_bn_eval:
        p.error("--use_sup_con with a frozen backbone and --frozen_bn_eval: SupCon trains no parameter and, with batch "
                "norm in eval mode, moves no running statistic either, so it would change nothing. Drop "
                "--frozen_bn_eval (the original's frozen run), add --finetune, or drop --use_sup_con.")
    if args.train_split == args.eval_split and not args.allow_same_split:
        p.error(f"--train_split and --eval_split are both {args.train_split!r}: the evaluation would measure the "
                "training data; pass --allow_same_split if that is what you want")


def config_name(args: argparse.Namespace) -> str:
    """'frozen CE', 'fine-tuned SupCon+CE', ...: which parameters train, and the loss."""
    return f"{'fine-tuned' if args.finetune else 'frozen'} {'SupCon+CE' if args.use_sup_con else 'CE'}"


@record
def main(argv=None) -> dict:
    parser = build_parser()
    args = engine.resolve_args(parser, argv)
    check_args(parser, args)
    args.name = args.name or config_name(args)
    ctx = engine.setup(args)

    train_set = DFC2020Dataset(args.data_root, args.train_split, crop=args.crop, train=True, seed=args.seed)
    eval_set = DFC2020Dataset(args.data_root, args.eval_split, crop=args.eval_crop or None, offset_seed=args.eval_offset_seed)
    net = DualResNet(args.arch, num_classes=len(eval_set.classes))
    if args.model_path is not None:
        load_checkpoint(net, args.model_path)
    if not args.finetune:
        freeze_all_but(net, net.fc)
    run = engine.RunDir(args.save_path or engine.default_run_path("dfc_finetune"), args, ctx)

    indices = engine.subset_indices(len(train_set), args.data_ratio, args.subset, args.subset_seed)
    weights = None
    if args.balanced_class:
        labels = train_set.patch_labels()[indices]
        if args.balanced_class == "copies":
            indices = [indices[i] for i in balanced_indices(labels).tolist()]
        else:
            weights = 1.0 / torch.bincount(labels)[labels].float()
    loader = engine.make_loader(train_set, args.batch_size, ctx, args, train=True, indices=indices, weights=weights)
    eval_loader = engine.make_loader(eval_set, args.eval_batch_size or 2 * args.batch_size, ctx, args, train=False)
    log.info("%s: %d training patches, %d evaluation patches; %d trainable parameters",
             args.name, len(loader.dataset), len(eval_set), count_trainable(net))
    if args.use_sup_con and not args.finetune:
        log.info("--use_sup_con with the backbones frozen (no --finetune), as the original's recorded run: SupCon "
                 "trains no parameter; it changes the run only through the batch-norm running statistics that the "
                 "joint (augmented, original) pass updates, which evaluation uses")

    views = engine.Views(["s1", "s2"], dfc_augment(args.degrees, args.augment_impl) if args.use_sup_con else None, ctx, args.seed,
                         renormalize=seed_normalize)
    model = engine.wrap(MultiModalNet({"s1": net.backbone1, "s2": net.backbone2}, fused_head=net.fc, ce_from=args.ce_from),
                        ctx, args)
    # Frozen backbone: the original trains the classifier at the base rate; fine-tuning gives it its own.
    optimizer = torch.optim.Adam(param_groups(net, net.fc, args.lr, args.head_lr if args.finetune else args.lr, args.weight_decay),
                                 betas=(0.9, 0.999))
    criterion = SupConCELoss(temperature=args.temperature, ce_weight=args.ce_weight, sup_weight=args.sup_weight,
                             use_supcon=args.use_sup_con, cross_modal=True, gather_distributed=ctx.world > 1)

    def step(batch: dict, epoch: int, i: int) -> dict:
        originals, augmented = views(batch, epoch, i)
        labels = batch["label"].to(ctx.device, non_blocking=ctx.pin_memory)
        with ctx.autocast():
            out = model(originals, augmented)
        return criterion(out["features"], out["logits"], labels)

    def evaluate() -> dict:
        return engine.evaluate(model, eval_loader, views, ctx, eval_set.classes)

    task = engine.Task(step, {"state_dict": net}, evaluate, engine.eval_schedule(args.epochs, args.eval_every, args.eval_dense_after),
                       checkpoint={"arch": args.arch}, dataset="DFC2020", frozen_bn_eval=args.finetune or args.frozen_bn_eval)
    return engine.fit(model, optimizer, loader, task, run, ctx, args)


if __name__ == "__main__":
    main()
