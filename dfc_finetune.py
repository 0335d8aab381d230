"""Fine-tune the dual ResNet on DFC2020 with CE on the fused projections and optional SupCon.

    python dfc_finetune.py --data_root DATA --model_path DualResnet50.pth --finetune [--use_sup_con]

Trains on the DFC2020 `validation` split (986 patches) with random 224 px crops and evaluates on
the `test` split (5,128) on whole 256 px patches, as the original work. The classifier reads the
concatenated 128-d S1 and S2 projections of the original view; SupCon reads the L2-normalised
projections of (augmented, original) views, S1 and S2 stacked along the batch.
"""
import argparse
import logging
from pathlib import Path

import torch

import engine
from augment import dfc_augment
from datasets import DFC2020Dataset
from losses import SupConLoss
from models import RESNETS, DualResNet, count_trainable, freeze_all_but, load_checkpoint, param_groups

log = logging.getLogger("dfc_finetune")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", type=Path, default=Path("data/dfc2020"), help="folder holding ROIs0000_validation and ROIs0000_test (default data/dfc2020)")
    p.add_argument("--model_path", default=None, help="pre-trained dual ResNet in the released layout (default: random initialisation)")
    p.add_argument("--arch", choices=RESNETS, default="resnet50", help="backbone (default resnet50, as the released checkpoints)")
    p.add_argument("--finetune", action="store_true", help="train the whole network (default: the classifier only)")
    p.add_argument("--use_sup_con", action="store_true", help="add the supervised contrastive loss")
    p.add_argument("--delta_sup", type=float, default=1.0, help="weight of SupCon (default 1.0)")
    p.add_argument("--delta_lin", type=float, default=1.0, help="weight of cross-entropy (default 1.0)")
    p.add_argument("--temperature", type=float, default=0.07, help="SupCon temperature and base temperature (default 0.07)")
    p.add_argument("--degrees", type=float, default=20.0, help="largest rotation of the SupCon view, degrees (default 20)")
    p.add_argument("--balanced_class", action="store_true", help="oversample small classes (draws weighted by 1 / class frequency)")
    p.add_argument("--classifier_lr", type=float, default=3e-6, help="learning rate of the classifier (default 3e-6)")
    p.add_argument("--weight_decay", type=float, default=1e-3, help="Adam weight decay (default 1e-3)")
    p.add_argument("--crop", type=int, default=224, help="training crop, px (default 224)")
    p.add_argument("--eval_crop", type=int, default=None, help="evaluation crop, px (default: the whole 256 px patch)")
    p.add_argument("--eval_batch_size", type=int, default=None, help="evaluation batch size (default 2 x --batch_size)")
    p.add_argument("--train_split", default="validation", help="DFC2020 split to train on (default validation)")
    p.add_argument("--eval_split", default="test", help="DFC2020 split to evaluate on (default test)")
    p.add_argument("--eval_every", type=int, default=10, help="evaluate every N epochs and after the last (default 10)")
    p.add_argument("--separate_ce_pass", action="store_true",
                   help="original style: a third backbone pass for CE instead of reusing the original view's projections")
    p.add_argument("--name", default=None, help="configuration label for summaries (default: derived from the flags)")
    engine.add_common_args(p, epochs=201, batch_size=32, lr=1e-5)
    return p


def main(argv=None) -> dict:
    parser = build_parser()
    args = engine.resolve_args(parser, argv)
    if args.use_sup_con and not args.finetune:
        parser.error("--use_sup_con without --finetune: only the classifier trains, and SupCon does not reach it "
                     "(it acts on the projections), so it would change nothing. Add --finetune, or drop --use_sup_con.")
    args.name = args.name or ("SupCon+CE" if args.use_sup_con else "CE")
    ctx = engine.setup(args)
    run = engine.RunDir(args.save_path or engine.default_run_path("dfc_finetune"), args, ctx)

    views = engine.Views(["s1", "s2"], dfc_augment(args.degrees) if args.use_sup_con else None,
                         2 if args.use_sup_con else 1, args.augment_on, ctx, args.seed)
    train_set = DFC2020Dataset(args.data_root, args.train_split, crop=args.crop, train=True,
                               transform=views.dataset_transform(), seed=args.seed)
    eval_set = DFC2020Dataset(args.data_root, args.eval_split, crop=args.eval_crop)
    weights = None
    if args.balanced_class:
        labels = train_set.patch_labels()
        weights = 1.0 / torch.bincount(labels)[labels].float()
    loader = engine.make_loader(train_set, args.batch_size, ctx, args, train=True, weights=weights)
    eval_loader = engine.make_loader(eval_set, args.eval_batch_size or 2 * args.batch_size, ctx, args, train=False)
    log.info("%s: %d training patches, %d evaluation patches", args.name, len(train_set), len(eval_set))

    net = DualResNet(args.arch, num_classes=len(eval_set.classes))
    if args.model_path is not None:
        load_checkpoint(net, args.model_path)
    if not args.finetune:
        freeze_all_but(net, net.fc)
    log.info("trainable parameters: %d", count_trainable(net))
    model = engine.wrap(engine.MultiViewClassifier({"s1": net.backbone1, "s2": net.backbone2}, {"fused": net.fc},
                                                   args.separate_ce_pass), ctx, args)
    optimizer = torch.optim.Adam(param_groups(net, net.fc, args.lr, args.classifier_lr, args.weight_decay), betas=(0.9, 0.999))
    supcon = SupConLoss(args.temperature, "all", args.temperature, gather_distributed=ctx.world > 1) if args.use_sup_con else None

    def step(batch: dict, epoch: int, i: int) -> dict:
        labels = batch["label"].to(ctx.device, non_blocking=True)
        out = model(views(batch, epoch, i))
        return engine.compose_loss(out, labels, supcon=supcon, ce_weight=args.delta_lin, sup_weight=args.delta_sup)

    def evaluate() -> dict:
        return engine.evaluate(model, eval_loader, views.originals, ctx, eval_set.classes)

    task = engine.Task(step, {"state_dict": net}, evaluate, engine.eval_schedule(args.epochs, args.eval_every),
                       checkpoint={"arch": args.arch}, dataset="DFC2020")
    return engine.fit(model, optimizer, loader, task, run, ctx, args)


if __name__ == "__main__":
    main()
