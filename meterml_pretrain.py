"""Self-supervised NT-Xent (SimCLR) pre-training of SmallAlexNet encoders on METER-ML S1 / S2 (docs/method.md).

    python meterml_pretrain.py --data_root DATA [--scenario s1s2] [--arch dual] [--use_pairs]

Positives: an image and its augmented view (the original's `RandomAugmentations`), each encoded in a pass of its own;
S1 and S2 batches are independent shuffles (NT-Xent over the blocks S1', S1, S2', S2). `--use_pairs`: the S1 and S2
images of one location are positives too (PairwiseNTXent; with `--no-augment`, NT-Xent over S1, S2). The encoder is
saved in the released SmallAlexNet layout (`encoder.pth`, and `state_dict` of every checkpoint).
"""

import argparse
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import Dataset

from augment import AUGMENT_IMPLS, Views, key_seed, meterml_augment
from datasets import MeterMLDataset
from engine import data_report, epoch_summary, train_one_epoch
from losses import NTXent, PairwiseNTXent
from models import (
    S1_CHANNELS,
    S2_CHANNELS,
    DualEncoder,
    MultiModalNet,
    SharedNet,
    count_trainable,
    save_checkpoint,
)
from util import cli, flags, process
from util.checkpoint import checkpoint_meta
from util.rundir import RunDir, Saved, default_run_path

log = logging.getLogger("meterml_pretrain")


def build_parser() -> argparse.ArgumentParser:
    p = flags.parser(__doc__)
    g = flags.add_data_args(p, root="data/meter-ml", what="METER-ML root")
    g.add_argument("--exclude_negatives", action="store_true", help="leave the Negative-class images out")
    g.add_argument("--use_negative_labels", action="store_true", help="Negative-class images act only as negatives")
    flags.add_image_dirs_arg(g)
    g = flags.add_model_args(p, archs=["dual", "shared"], arch="dual", weights=False, original_spellings=True)
    g.add_argument("--scenario", choices=["s1s2", "s1", "s2"], default="s1s2",
                   help="modalities to pre-train on (default s1s2)")
    g = p.add_argument_group("method")
    g.add_argument("--use_pairs", action="store_true", help="S1 and S2 of one location are positives of each other")
    flags.add_augment_args(g, default=True, impls=AUGMENT_IMPLS, no_augs=True,
                           what="positive pairs of an image and its augmented view (--no-augment needs --use_pairs: "
                                "the S1-S2 pairs are then the only positives)")
    g.add_argument("--two_augmented_views", action="store_true",
                   help="positive pairs of two augmented views (default: augmented and original, as the original)")
    flags.add_temperature_arg(g, 0.2, "NT-Xent temperature")
    flags.add_optimizer_args(g, weight_decay=0.0, momentum=True)
    flags.add_run_args(p, epochs=200, batch_size=200, lr=0.01)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flag combinations that leave nothing to learn or contradict each other."""
    both = args.scenario == "s1s2"
    if args.use_pairs and not both:
        p.error(f"--use_pairs pairs S1 with S2 images, but --scenario {args.scenario} reads one modality only")
    if not args.augment and not args.use_pairs:
        p.error("--no-augment without --use_pairs leaves no positive pair: every image would only be compared with "
                "copies of itself. Keep the augmentations, or add --use_pairs (with --scenario s1s2).")
    if args.use_negative_labels and args.exclude_negatives:
        p.error("--use_negative_labels flags Negative images that --exclude_negatives removes; choose one")
    if args.two_augmented_views and not args.augment:
        p.error("--two_augmented_views with --no-augment: there is nothing to augment; choose one")


class IndependentModalities(Dataset):
    """S1 of sample i next to S2 of sample perm_epoch[i]: the modalities independently shuffled, by a permutation
    drawn from (seed, epoch), so the same in every worker."""

    def __init__(self, dataset: MeterMLDataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch, self.perm = dataset, seed, None, None

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.perm = torch.randperm(len(self.dataset),
                                       generator=torch.Generator().manual_seed(key_seed(self.seed, epoch, 1)))

    def __getitem__(self, index: int) -> dict:
        first, second = self.dataset[index], self.dataset[int(self.perm[index])]
        return {"s1": first["s1"], "s2": second["s2"], "label": first["label"], "label_s2": second["label"],
                "id": first["id"]}


def build_loss(args: argparse.Namespace, ctx: process.Context, blocks: int) -> nn.Module:
    """NT-Xent over `blocks` blocks; PairwiseNTXent when S1-S2 pairs join the augmented pairs."""
    if args.use_pairs and blocks == 4:
        return PairwiseNTXent(blocks=blocks, tau=args.temperature, gather_distributed=ctx.world > 1)
    return NTXent(tau=args.temperature, blocks=blocks, gather_distributed=ctx.world > 1)


def make_step(args: argparse.Namespace, views: Views, model: MultiModalNet, loss_fn: nn.Module, ctx: process.Context,
              modalities: list[str], blocks: int) -> Callable:
    """The views (augmented and original, or two augmented), a pass per view, NT-Xent on the features laid out
    block-major (each modality's views in turn)."""

    def step(batch: dict, epoch: int, i: int) -> dict[str, Tensor]:
        if args.two_augmented_views:  # view 0 the first augmented view, view 1 the second (in the original's place)
            first, second = views.two_augmented(batch, epoch, i)
            pair = (second, first)
        else:
            pair = views.with_augmented(batch, epoch, i)  # (originals, augmented or None)
        with ctx.autocast():
            features = model(*pair)["features"]  # modality -> (B, views, 128), view 0 augmented
        z = torch.cat([f.transpose(0, 1).reshape(-1, f.shape[-1]) for f in features.values()])
        negatives = None
        if args.use_negative_labels:
            labels = [batch["label"]] + ([batch.get("label_s2", batch["label"])] if len(modalities) == 2 else [])
            per_block = [y.to(ctx.device) == MeterMLDataset.NEGATIVE
                         for y in labels for _ in range(blocks // len(modalities))]
            negatives = torch.cat(per_block)
        return {"loss": loss_fn(z, negatives)}

    return step


@record
def main(argv=None) -> dict:
    parser = build_parser()
    args, ctx = process.start(parser, argv, check_args, script="meterml_pretrain")

    modalities = ["s1", "s2"] if args.scenario == "s1s2" else [args.scenario]
    meter = MeterMLDataset(args.data_root, "train", exclude_negatives=args.exclude_negatives, seed=args.seed,
                           image_dirs=args.train_image_dirs)
    dataset = IndependentModalities(meter, args.seed) if args.scenario == "s1s2" and not args.use_pairs else meter
    indices = process.subset_indices(len(dataset), args.data_ratio, args.subset, args.subset_seed)
    loader = process.make_loader(dataset, args.batch_size, ctx, args, train=True, indices=indices)

    encoder = SharedNet() if args.arch == "shared" else DualEncoder()
    # Each view in a pass of its own, as the original pre-training; a pass never uses every stem.
    model = process.wrap(MultiModalNet({m: encoder for m in modalities}, encode_views="apart"), ctx, args,
                         find_unused=True)
    blocks = len(modalities) * (2 if args.augment else 1)
    loss_fn = build_loss(args, ctx, blocks)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    views = Views(modalities, meterml_augment(72, args.augment_impl) if args.augment else None, ctx, args.seed)
    step = make_step(args, views, model, loss_fn, ctx, modalities, blocks)
    log.info("%d training samples; %d trainable parameters", len(loader.dataset), count_trainable(encoder))

    meta = checkpoint_meta("meterml_pretrain", args.arch, {"s1": S1_CHANNELS, "s2": S2_CHANNELS}, meter)
    with RunDir(args.save_path or default_run_path("meterml_pretrain"), args, ctx, "meterml_pretrain",
                Saved({"state_dict": encoder}, optimizer, meta=meta)) as run:
        for epoch in range(run.start, args.epochs):
            row = train_one_epoch(step, model, loader, optimizer, ctx, epoch, args.epochs, board=run.board(len(loader)),
                                  run_path=run.path)
            run.end_epoch(epoch, row, epoch_summary(row))
        if ctx.is_main:
            save_checkpoint(encoder, run.path / "encoder.pth")
        data = data_report(run, {"train": meter}, ctx)
        return run.finish(process.environment(ctx), "METER-ML pre-training", data=data)


if __name__ == "__main__":
    cli.run(main)
