"""Pack a data set once into a few memory-mapped .npy arrays per split, for fast reading.

    python pack.py {dfc2020,sen12ms,meterml,manifest} ROOT OUT [--seasons ...]

Every data set class reads OUT as its root, with the same items (format: ``datasets.packed``, docs/data.md)."""
import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import dfc2020, manifest, meterml, sen12ms
from datasets.packed import write
from util import cli, flags

PLANNERS = {"dfc2020": dfc2020.plan_pack, "sen12ms": sen12ms.plan_pack, "meterml": meterml.plan_pack,
            "manifest": manifest.plan_pack}


def pack(dataset: str, root: str | Path, out: str | Path, *, seasons: Sequence[str] = tuple(sen12ms.SEASONS),
         checkpoint_every: int = 256) -> dict[str, Any]:
    """Returns the index. Splits: DFC2020 validation, test; SEN12MS all (the seasons); METER-ML
    train, val, test (metadata copied beside the index); a manifest all (its rows in CSV order)."""
    if dataset not in PLANNERS:
        raise ValueError(f"dataset must be one of {tuple(PLANNERS)}, got {dataset!r}")
    sen12ms.check_seasons(seasons)
    copy: list[str] = []
    if dataset == "meterml":
        copy = [found.name for split in ("train", "val", "test") if (found := meterml.find_metadata(Path(root), split))]
    return write(dataset, PLANNERS[dataset], root, out, seasons=seasons, checkpoint_every=checkpoint_every, copy=copy)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("dataset", choices=tuple(PLANNERS))
    parser.add_argument("root", type=Path, help="the data set as distributed, or a manifest CSV")
    parser.add_argument("out", type=Path, help="new or empty folder, or an unfinished pack to resume")
    parser.add_argument("--seasons", nargs="+", choices=tuple(sen12ms.SEASONS), default=tuple(sen12ms.SEASONS),
                        help="SEN12MS seasons to pack (default all four)")
    parser.add_argument("--checkpoint_every", "--checkpoint-every", type=flags.positive_int, default=256,
                        metavar="ROWS", help="rows between progress checkpoints (default 256)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pack(args.dataset, args.root, args.out, seasons=args.seasons, checkpoint_every=args.checkpoint_every)


if __name__ == "__main__":
    cli.run(main)
