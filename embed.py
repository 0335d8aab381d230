"""How a trained encoder arranges S1 and S2: t-SNE picture and kNN numbers of a run's features.

    python embed.py RUN_DIR [--data_root ROOT] [--out DIR] [--split SPLIT] [--max_samples N]
                            [--color_by class|modality] [--checkpoint last.pt] [--device cpu]

RUN_DIR: a run of meterml_finetune.py, dfc_finetune.py, meterml_pretrain.py or sen12ms_pretrain.py.
Its encoder (last.pt; encoder.pth of a METER-ML pre-training) encodes the evaluation split in eval
mode: L2-normalised 128-d projections z1, z2 (N, 128), the features SupCon sees. Read by default:
METER-ML the run's data_root, split val; DFC2020 its eval_split as its evaluations read it;
SEN12MS pre-training whole patches of a DFC2020 root (split test) or of SEN12MS (--split: seasons).

Writes RUN_DIR/embedding/ (or --out): tsne.png (S1 and S2 together; colour = class or modality,
marker = modality) and embedding.json: cosine kNN accuracy within each modality (leave one out) and
across (the query's own partner left out: class neighbourhoods, not pair matching), and the mean
cosine of a sample's S1 and S2 features against random pairs. Ignored samples (255) are counted apart.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from datasets import IGNORE, SEASONS, DFC2020Dataset, MeterMLDataset, SEN12MSDataset, patch_dataset
from models import DualEncoder, DualResNet, SharedNet, load_checkpoint
from util import cli, flags, process
from util.runs import KINDS, NotARunError, RunInfo, checkpoint_path, read_run, run_kind  # noqa: F401

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("embed")

MODALITIES = ("s1", "s2")


# ----------------------------------------------------------------------------- the numbers

def knn_accuracy(queries: Tensor, labels_q: Tensor, keys: Tensor, labels_k: Tensor, k: int = 5,
                 leave_one_out: bool = False) -> float:
    """Accuracy (%) of queries (Nq, D) voted by the majority of their k nearest keys (Nk, D) by
    cosine, ties to the class of larger summed similarity. `leave_one_out` (Nq == Nk): key i is never
    a neighbour of query i (the query itself, or its own feature of the other modality)."""
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries (Nq, D) and keys (Nk, D) must share D, got {tuple(queries.shape)} and "
                         f"{tuple(keys.shape)}")
    if leave_one_out and len(queries) != len(keys):
        raise ValueError(f"leave_one_out needs one key per query, got {len(queries)} queries and {len(keys)} keys")
    available = len(keys) - (1 if leave_one_out else 0)
    if available < 1 or len(queries) == 0:
        raise ValueError(f"need at least one query and one key besides it, got {len(queries)} queries and "
                         f"{len(keys)} keys")
    k = min(k, available)
    similarity = F.normalize(queries.double(), dim=1) @ F.normalize(keys.double(), dim=1).T  # (Nq, Nk)
    if leave_one_out:
        similarity.fill_diagonal_(-math.inf)
    top, index = similarity.topk(k, dim=1)  # (Nq, k)
    neighbour_labels = labels_k[index]
    classes = int(max(labels_q.max(), labels_k.max())) + 1
    counts = torch.zeros(len(queries), classes, dtype=torch.float64).scatter_add_(1, neighbour_labels,
                                                                                  torch.ones_like(top))
    summed = torch.zeros(len(queries), classes, dtype=torch.float64).scatter_add_(1, neighbour_labels,
                                                                                  top + 1.0)
    # Lexicographic: the vote count first, the summed similarity (shifted into [0, 2k]) breaks ties.
    votes = (counts * (2 * k + 1) + summed).argmax(1)
    return 100.0 * (votes == labels_q).double().mean().item()


def pair_similarity(z1: Tensor, z2: Tensor, seed: int = 0) -> dict:
    """{"paired": mean cos(z1[i], z2[i]), "random": mean cos(z1[i], z2[j_i]), "seed"} of (N, D)
    features; j_i = (i + o_i) mod N with o_i uniform in 1..N-1 (never sample i itself)."""
    if z1.shape != z2.shape or z1.ndim != 2 or len(z1) < 2:
        raise ValueError(f"z1 and z2 must be (N, D) of one shape with N >= 2, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    n = len(z1)
    a, b = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    offset = torch.randint(1, n, (n,), generator=torch.Generator().manual_seed(seed))
    other = (torch.arange(n) + offset) % n
    return {"paired": (a * b).sum(1).mean().item(), "random": (a * b[other]).sum(1).mean().item(), "seed": seed}


def embedding_numbers(z1: Tensor, z2: Tensor, labels: Tensor, k: int = 5, seed: int = 0) -> dict:
    """embedding.json's numbers from (N, D) features and (N,) labels of the counted samples."""
    knn = {"s1": knn_accuracy(z1, labels, z1, labels, k, leave_one_out=True),
           "s2": knn_accuracy(z2, labels, z2, labels, k, leave_one_out=True),
           "s1_to_s2": knn_accuracy(z1, labels, z2, labels, k, leave_one_out=True),
           "s2_to_s1": knn_accuracy(z2, labels, z1, labels, k, leave_one_out=True)}
    return {"knn_accuracy": knn, "pair_cosine": pair_similarity(z1, z2, seed)}


def tsne_points(z1: Tensor, z2: Tensor, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """(2N, 2), S1 rows first. Perplexity at most (2N - 1) / 3 (it must stay below the points). One
    OpenMP thread: on a busy machine its threads wait on each other (116 points: 20 s instead of
    0.2 s on 2 busy cores; 4000 points: 22 s on one thread)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    points = torch.cat([z1, z2]).double().numpy()
    perplexity = min(perplexity, max(1.0, (len(points) - 1) / 3))
    with threadpool_limits(limits=1):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)


# ----------------------------------------------------------------------------- the figure

def tsne_figure(path: Path, points: np.ndarray, labels: np.ndarray, class_names: list[str], color_by: str,
                title: str) -> Figure:
    """Scatter of `points` (2N, 2), S1 circles then S2 triangles, written to `path`; returns the
    closed Figure, so that what it draws can be inspected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    n = len(labels)
    palette = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20").colors
    fig, ax = plt.subplots(figsize=(9.5, 6.5))
    handles = []
    # Two shapes with different edges: a point's modality reads at a glance where the clouds overlap.
    for i, (marker, name, edge) in enumerate((("o", "S1 (SAR)", 0.0), ("^", "S2 (optical)", 0.6))):
        xy = points[i * n:(i + 1) * n]
        style = dict(s=36, marker=marker, alpha=0.75, linewidths=edge, edgecolors="black")
        if color_by == "modality":
            ax.scatter(xy[:, 0], xy[:, 1], color=palette[i], **style)
            handles.append(Line2D([], [], linestyle="", marker=marker, markersize=7, color=palette[i],
                                  markeredgecolor="black", markeredgewidth=edge, label=name))
            continue
        for c in np.unique(labels):
            ax.scatter(xy[labels == c, 0], xy[labels == c, 1], color=palette[c % len(palette)], **style)
        handles.append(Line2D([], [], linestyle="", marker=marker, markersize=7, color="dimgray",
                              markeredgecolor="black", markeredgewidth=edge, label=name))
    if color_by == "class":
        handles += [Line2D([], [], linestyle="", marker="s", markersize=7, color=palette[c % len(palette)],
                           label=f"{class_names[c]} ({int((labels == c).sum())})") for c in np.unique(labels)]
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1),
              title="marker: modality" + (", colour: class (samples)" if color_by == "class" else ""))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- the run

def checkpoint_epoch(path: Path) -> int | None:
    """The epoch a checkpoint was written after (None for a bare state dict such as encoder.pth)."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state.get("epoch") if isinstance(state.get("epoch"), int) else None


def build_encoders(run: RunInfo, checkpoint: Path) -> dict[str, nn.Module]:
    """modality -> module mapping (B, C, H, W) to its projection (B, 128), weights loaded."""
    if run.kind in ("meterml_finetune", "meterml_pretrain"):
        encoder = SharedNet() if run.config.get("arch") == "shared" else DualEncoder()
        load_checkpoint(encoder, checkpoint)
        return {"s1": encoder, "s2": encoder}  # both pick the S1 or S2 path by the channel count
    net = DualResNet(run.config.get("arch", "resnet50"))
    load_checkpoint(net, checkpoint)  # a pre-training checkpoint lacks the classifier: allowed
    return {"s1": net.backbone1, "s2": net.backbone2}


def is_dfc_root(root: Path) -> bool:
    return any((root / f"ROIs0000_{split}").is_dir() for split in ("test", "validation"))


def build_dataset(run: RunInfo, data_root: Path | None, split: str | None) -> tuple[Dataset, str, Path, str]:
    """The evaluation data of `run`: (data set, split read, root, data set name)."""
    root = Path(data_root or run.config.get("data_root") or "")
    c = run.config
    if run.kind in ("meterml_finetune", "meterml_pretrain"):
        split = split or "val"
        return MeterMLDataset(root, split), split, root, "METER-ML"
    if run.kind == "dfc_finetune":
        split = split or c.get("eval_split") or "test"
        crop = c.get("eval_crop") or None
        offset_seed = c.get("eval_offset_seed") if crop else None
        return patch_dataset(root, split, crop=crop, offset_seed=offset_seed), split, root, "DFC2020"
    # SEN12MS pre-training: whole patches (global pooling takes any size) of DFC2020 or SEN12MS.
    if is_dfc_root(root):
        split = split or "test"
        return DFC2020Dataset(root, split), split, root, "DFC2020"
    seasons = tuple(split.split(",")) if split else tuple(c.get("seasons") or SEASONS)
    return SEN12MSDataset(root, seasons), ",".join(seasons), root, "SEN12MS"


@torch.no_grad()
def encode(encoders: dict[str, nn.Module], loader: DataLoader,
           device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """z1 (N, 128), z2 (N, 128) L2-normalised projections in eval mode, and labels (N,)."""
    for module in encoders.values():
        module.eval().to(device)
    z = {m: [] for m in MODALITIES}
    labels = []
    for batch in loader:
        for m in MODALITIES:
            z[m].append(F.normalize(encoders[m](batch[m].to(device)).float(), dim=1).cpu())
        labels.append(torch.as_tensor(batch["label"]).long())
    return torch.cat(z["s1"]), torch.cat(z["s2"]), torch.cat(labels)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder of one of the training scripts")
    p.add_argument("--data_root", type=Path, default=None, help="data to encode (default: the run's data_root)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/embedding)")
    p.add_argument("--split", default=None,
                   help="split to encode (default: val for METER-ML, the run's eval_split for DFC2020, "
                        "the run's seasons for SEN12MS, e.g. spring,fall)")
    p.add_argument("--max_samples", type=flags.positive_int, default=2000,
                   help="encode at most this many samples, a seeded subset (default 2000: t-SNE of 4000 points)")
    p.add_argument("--color_by", choices=["class", "modality"], default="class",
                   help="colour of the t-SNE points (default class)")
    p.add_argument("--k", type=flags.positive_int, default=5, help="neighbours of the kNN accuracy (default 5)")
    p.add_argument("--seed", type=flags.seed_int, default=0,
                   help="seed of the subset, the random pairs and t-SNE (default 0)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file in RUN_DIR (default last.pt; encoder.pth for a METER-ML pre-training)")
    p.add_argument("--batch_size", type=flags.positive_int, default=64, help="encoding batch size (default 64)")
    p.add_argument("--workers", type=flags.non_negative_int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    return p


def main(argv=None) -> dict:
    """Returns what embedding.json holds."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        run = read_run(args.run_dir)
    except NotARunError as error:
        parser.error(str(error))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint = checkpoint_path(run, args.checkpoint)
    encoders = build_encoders(run, checkpoint)
    dataset, split, root, data_name = build_dataset(run, args.data_root, args.split)
    indices = process.subset(len(dataset), min(len(dataset), args.max_samples), "random", args.seed)
    loader = DataLoader(Subset(dataset, indices), batch_size=args.batch_size, num_workers=args.workers)
    z1, z2, labels = encode(encoders, loader, device)

    counted = labels != IGNORE
    z1, z2, labels = z1[counted], z2[counted], labels[counted]
    if len(labels) < 2:
        raise ValueError(f"{len(labels)} samples with a class label in {root} ({split}): need at least 2")
    classes = list(dataset.classes)
    numbers = embedding_numbers(z1, z2, labels, args.k, args.seed)
    epoch = checkpoint_epoch(checkpoint)
    info = {"run": str(run.path), "kind": run.kind, "dataset": run.dataset, "name": run.config.get("name"),
            "seed": run.config.get("seed"), "scenario": run.config.get("scenario"), "checkpoint": checkpoint.name,
            "epoch": epoch, "data": data_name, "data_root": str(root), "split": split,
            "n": int(len(labels)), "ignored": int((~counted).sum()), "encoded": len(indices), "of": len(dataset),
            "k": min(args.k, len(labels) - 1), "classes": classes, "color_by": args.color_by,
            "class_counts": {classes[c]: int((labels == c).sum())
                             for c in range(len(classes)) if (labels == c).any()},
            **numbers,
            "note": "features: L2-normalised 128-d projections (eval mode). kNN: cosine, majority of the k nearest; "
                    "within a modality leave-one-out; across modalities the query's own other-modality feature is "
                    "left out. pair_cosine: a sample's S1 vs S2 features against random pairs of different samples."}

    out = args.out or run.path / "embedding"
    out.mkdir(parents=True, exist_ok=True)
    points = tsne_points(z1, z2, args.seed)
    knn = numbers["knn_accuracy"]
    title = (f"{run.dataset}: {run.config.get('name') or run.path.name}, seed {info['seed']} "
             f"({checkpoint.name}, epoch {epoch})\n"
             f"t-SNE of S1 and S2 projections, {data_name} {split}, {info['n']} samples\n"
             f"kNN accuracy (k={info['k']}): S1 {knn['s1']:.1f}%, S2 {knn['s2']:.1f}%, S1→S2 {knn['s1_to_s2']:.1f}%, "
             f"S2→S1 {knn['s2_to_s1']:.1f}%\n"
             f"cosine of a sample's S1 and S2 features {numbers['pair_cosine']['paired']:.2f} "
             f"(random pairs {numbers['pair_cosine']['random']:.2f})")
    tsne_figure(out / "tsne.png", points, labels.numpy(), classes, args.color_by, title)
    (out / "embedding.json").write_text(json.dumps(info, indent=2))
    log.info("wrote %s and %s: kNN S1 %.1f%%, S2 %.1f%%, S1->S2 %.1f%%, S2->S1 %.1f%%", out / "tsne.png",
             out / "embedding.json", knn["s1"], knn["s2"], knn["s1_to_s2"], knn["s2_to_s1"])
    return info


if __name__ == "__main__":
    cli.run(main)
