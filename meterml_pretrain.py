"""Self-supervised NT-Xent (SimCLR) pre-training of SmallAlexNet encoders on METER-ML S1 / S2.

    python meterml_pretrain.py --data_root DATA [--scenario s1s2] [--model dual] [--use_pairs]

What is a positive pair:
- default: an image and its augmented view (the original's `RandomAugmentations`;
  `--two_augmented_views` for two augmented views), each encoded in a pass of its own; with both
  modalities, S1 and S2 batches are independent shuffles (different locations), NT-Xent with 4
  blocks, pairs (S1', S1) and (S2', S2);
- `--use_pairs`: the S1 and S2 images of one location are positives of each other too
  (PairwiseNTXent over 4 blocks; with `--no_augs`, NT-Xent over the 2 blocks S1, S2).
`--use_negative_labels`: Negative-class images only act as negatives. The encoder is saved in the
released SmallAlexNet layout (`encoder.pth`, and `state_dict` of every checkpoint).
"""
import argparse
import logging
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import Dataset

import engine
from augment import key_seed, meterml_augment
from datasets import MeterMLDataset
from losses import NTXent, PairwiseNTXent
from models import DualEncoder, MultiModalNet, SharedNet, count_trainable, save_checkpoint

log = logging.getLogger("meterml_pretrain")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", type=Path, default=Path("data/meter-ml"), help="METER-ML root (default data/meter-ml)")
    p.add_argument("--scenario", choices=["s1s2", "s1", "s2"], default="s1s2", help="modalities to pre-train on (default s1s2)")
    p.add_argument("--model", choices=["shared", "dual"], default="dual",
                   help="shared trunk with modality stems, or one encoder per modality (default dual)")
    p.add_argument("--use_pairs", action="store_true", help="S1 and S2 of one location are positives of each other")
    p.add_argument("--no_augs", action="store_true", help="no augmentation (needs --use_pairs: the pairs are then the only positives)")
    p.add_argument("--use_negative_labels", action="store_true", help="Negative-class images act only as negatives")
    p.add_argument("--exclude_negatives", action="store_true", help="leave the Negative-class images out")
    p.add_argument("--two_augmented_views", action="store_true",
                   help="positive pairs of two augmented views (default: augmented and original, as the original)")
    engine.add_subset_args(p)
    engine.add_augment_impl_arg(p)
    p.add_argument("--temperature", "--tau", dest="temperature", type=engine.positive, default=0.2,
                   help="NT-Xent temperature (default 0.2)")
    p.add_argument("--momentum", type=engine.non_negative, default=0.0, help="SGD momentum (default 0, the original's plain SGD)")
    p.add_argument("--weight_decay", type=engine.non_negative, default=0.0, help="SGD weight decay (default 0)")
    engine.add_common_args(p, epochs=200, batch_size=200, lr=0.01)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flag combinations that leave nothing to learn or contradict each other."""
    both = args.scenario == "s1s2"
    if args.use_pairs and not both:
        p.error(f"--use_pairs pairs S1 with S2 images, but --scenario {args.scenario} reads one modality only")
    if args.no_augs and not args.use_pairs:
        p.error("--no_augs without --use_pairs leaves no positive pair: every image would only be compared with "
                "copies of itself. Keep the augmentations, or add --use_pairs (with --scenario s1s2).")
    if args.use_negative_labels and args.exclude_negatives:
        p.error("--use_negative_labels flags Negative images that --exclude_negatives removes; choose one")
    if args.two_augmented_views and args.no_augs:
        p.error("--two_augmented_views with --no_augs: there is nothing to augment; choose one")


class IndependentModalities(Dataset):
    """S1 of sample i next to S2 of sample perm_epoch[i]: the two modalities independently shuffled.

    The permutation comes from (seed, epoch), so it is the same in every worker.
    """

    def __init__(self, dataset: MeterMLDataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch, self.perm = dataset, seed, None, None

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.perm = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(key_seed(self.seed, epoch, 1)))

    def __getitem__(self, index: int) -> dict:
        first, second = self.dataset[index], self.dataset[int(self.perm[index])]
        return {"s1": first["s1"], "s2": second["s2"], "label": first["label"], "label_s2": second["label"], "id": first["id"]}


@record
def main(argv=None) -> dict:
    parser = build_parser()
    args = engine.resolve_args(parser, argv)
    check_args(parser, args)
    ctx = engine.setup(args)

    modalities = ["s1", "s2"] if args.scenario == "s1s2" else [args.scenario]
    dataset = MeterMLDataset(args.data_root, "train", exclude_negatives=args.exclude_negatives, seed=args.seed)
    if args.scenario == "s1s2" and not args.use_pairs:
        dataset = IndependentModalities(dataset, args.seed)
    encoder = SharedNet() if args.model == "shared" else DualEncoder()
    run = engine.RunDir(args.save_path or engine.default_run_path("meterml_pretrain"), args, ctx)

    subset = engine.subset_indices(len(dataset), args.data_ratio, args.subset, args.subset_seed)
    loader = engine.make_loader(dataset, args.batch_size, ctx, args, train=True, indices=subset)
    views = engine.Views(modalities, None if args.no_augs else meterml_augment(72, args.augment_impl), ctx, args.seed,
                         second="augmented" if args.two_augmented_views else "original")
    log.info("%d training samples; %d trainable parameters", len(loader.dataset), count_trainable(encoder))
    # Each view in a pass of its own, as the original pre-training.
    model = engine.wrap(MultiModalNet({m: encoder for m in modalities}, joint=False), ctx, args, find_unused=True)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    blocks = len(modalities) * (1 if args.no_augs else 2)
    pairwise = args.use_pairs and blocks == 4
    loss_fn = (PairwiseNTXent(blocks, args.temperature, gather_distributed=ctx.world > 1) if pairwise
               else NTXent(args.temperature, blocks, gather_distributed=ctx.world > 1))

    def step(batch: dict, epoch: int, i: int) -> dict:
        originals, augmented = views(batch, epoch, i)
        with ctx.autocast():
            features = model(originals, augmented)["features"]  # modality -> (B, views, 128)
        z = torch.cat([f.transpose(0, 1).reshape(-1, f.shape[-1]) for f in features.values()])  # block-major
        negatives = None
        if args.use_negative_labels:
            labels = [batch["label"]] + ([batch.get("label_s2", batch["label"])] if len(modalities) == 2 else [])
            per_block = [l.to(ctx.device) == MeterMLDataset.NEGATIVE for l in labels for _ in range(blocks // len(modalities))]
            negatives = torch.cat(per_block)
        return {"loss": loss_fn(z, negatives)}

    task = engine.Task(step, {"state_dict": encoder}, dataset="METER-ML pre-training")
    results = engine.fit(model, optimizer, loader, task, run, ctx, args)
    if ctx.is_main:
        save_checkpoint(encoder, run.path / "encoder.pth")
    return results


if __name__ == "__main__":
    main()
