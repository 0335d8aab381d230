"""The report of `summarize.py --report OUT`: OUT/report.md with PNG figures beside it.

Per data set: both tables of summarize.py; per-class accuracy of each configuration as grouped
bars with the sample std over seeds as error bars (optionally the paper's values as markers);
learning curves (every loss term, AA and OA; mean over seeds, shaded min-max over seeds); a
row-normalised confusion matrix per configuration (counts summed over seeds, last evaluation);
where runs hold embed.py's embedding/tsne.png and embedding.json, their t-SNE pictures side by
side (one seed per configuration, copied beside report.md) above a table of their kNN numbers.
The figures draw what summarize.py's bars_of, curves_of, confusion_of compute; embeddings_of
picks the pictures.
"""
import math
import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

import summarize  # noqa: E402

# The paper's results on real data (per-class accuracy, AA, OA in %), for comparison markers.
# CE first, so that each method keeps its marker in both figures.
# Source: /work/shared/specs/method.md, "Published results to compare with" (DFC2020 test split,
# METER-ML validation split; the paper's class names mapped to the data sets' own). The paper
# gives AA +- 0.89 (SupCon+CE) / 0.72 (CE) and OA +- 1.31 / 1.66 on DFC2020, AA +- 1.74 (CE) /
# 2.00 (SupCon+CE) on METER-ML, and no METER-ML OA.
PUBLISHED = {
    "DFC2020": {
        "CE": {"Forest": 63.49, "Shrubland": 58.31, "Grassland": 12.60, "Wetlands": 14.43, "Croplands": 52.65,
               "Urban/Built-up": 91.14, "Barren": 43.91, "Water": 98.63, "AA": 54.39, "OA": 68.29},
        "SupCon+CE": {"Forest": 75.54, "Shrubland": 52.26, "Grassland": 6.18, "Wetlands": 20.90, "Croplands": 59.65,
                      "Urban/Built-up": 89.94, "Barren": 44.09, "Water": 98.42, "AA": 55.87, "OA": 72.62},
    },
    "METER-ML": {
        "CE": {"CAFOs": 97.44, "Landfills": 50.23, "Mines": 60.00, "ProcessingPlants": 57.36,
               "RefineriesAndTerminals": 77.91, "WWTreatment": 81.50, "AA": 70.74},
        "SupCon+CE": {"CAFOs": 97.44, "Landfills": 59.53, "Mines": 59.00, "ProcessingPlants": 66.31,
                      "RefineriesAndTerminals": 78.61, "WWTreatment": 82.10, "AA": 73.83},
    },
}

LOSS_LABELS = {"train_loss": "total training loss", "train_ce": "cross-entropy", "train_supcon": "SupCon"}


def slug(text: str) -> str:
    """A file-name-safe form of `text`."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "x"


def per_class_figure(path: Path, dataset: str, groups: list, published: bool = False) -> None:
    """Grouped bars: per class, AA and OA, a bar per configuration (mean over seeds of the last
    evaluation), error bars the sample std over seeds; the paper's values as markers if asked."""
    bars = summarize.bars_of(groups, "last")
    rows, width = bars["rows"], 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(rows) + 5), 4.5))
    for i, label in enumerate(bars["labels"]):
        x = [r + (i - (len(groups) - 1) / 2) * width for r in range(len(rows))]
        errors = [0.0 if math.isnan(s) else s for s in bars["std"][i]]
        ax.bar(x, bars["mean"][i], width, yerr=errors, capsize=3, label=label)
    if published:
        for k, (method, values) in enumerate(PUBLISHED.get(dataset, {}).items()):
            points = [(r, values[row]) for r, row in enumerate(rows) if row in values]
            ax.scatter([r + (k - 0.5) * 0.2 for r, _ in points], [v for _, v in points], marker="D*"[k % 2],
                       s=40, color="black" if k == 0 else "dimgray", zorder=3, label=f"published {method} (paper, real data)")
    ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{dataset}: per-class accuracy, AA and OA at the last epoch\n(bars: mean over seeds, error bars: sample std)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the bars fill the axes
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves_figure(path: Path, dataset: str, groups: list) -> bool:
    """A panel per quantity (loss terms, AA, OA) against the epoch, configurations overlaid:
    mean over seeds, shaded min-max over seeds. False (nothing written) without metrics.jsonl."""
    curves = [summarize.curves_of(g.runs) for g in groups]
    met = dict.fromkeys(q for c in curves for q in c)
    quantities = [q for q in met if q not in ("AA", "OA")] + [q for q in ("AA", "OA") if q in met]  # losses first
    if not quantities:
        return False
    cols = min(3, len(quantities))
    nrows = math.ceil(len(quantities) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, quantity in zip(axes.flat, quantities):
        for i, (group, curve) in enumerate(zip(groups, curves)):
            if quantity not in curve:
                continue
            c, color = curve[quantity], colors[i % len(colors)]
            sparse = quantity in ("AA", "OA")  # evaluated every few epochs: show the points
            ax.plot(c["epoch"], c["mean"], color=color, marker="o" if sparse else None, markersize=3, label=group.label)
            ax.fill_between(c["epoch"], c["min"], c["max"], color=color, alpha=0.2, linewidth=0)
        ax.set_title(LOSS_LABELS.get(quantity, quantity))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy (%)" if quantity in ("AA", "OA") else "loss (mean over batches)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(quantities):]:
        ax.set_visible(False)
    legend = {}  # one entry per configuration, whichever panels it appears in
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(4, len(legend)), fontsize="small")
    fig.suptitle(f"{dataset}: learning curves (line: mean over seeds, band: min-max over seeds)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def confusion_figure(path: Path, dataset: str, label: str, confusion: dict) -> None:
    """Row-normalised confusion matrix (% of each true class), the values written in the cells."""
    classes, percent = confusion["classes"], confusion["percent"]
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 * k + 2.5, 0.8 * k + 2))
    image = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    for i in range(k):
        for j in range(k):
            value = percent[i][j]
            text = "–" if math.isnan(value) else f"{value:.0f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if not math.isnan(value) and value > 60 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = sum(map(sum, confusion["counts"]))
    ax.set_title(f"{dataset}: {label}\nlast evaluation, {confusion['seeds']} seeds, {total} samples")
    fig.colorbar(image, ax=ax, label="% of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def embedding_section(out: Path, dataset: str, embeddings: list[dict]) -> list[str]:
    """Markdown lines showing embeddings_of's t-SNE pictures side by side, copied into `out`
    under unique names, and a table of their kNN accuracies and S1-S2 cosines (a row per
    configuration)."""
    names = []
    for e in embeddings:
        name = f"tsne_{slug(dataset)}_{e['group'] + 1}_{slug(e['label'])}_seed{slug(str(e['seed']))}.png"
        shutil.copyfile(e["png"], out / name)
        names.append(name)
    lines = [f"### {dataset}: embeddings", "",
             "| " + " | ".join(f"{e['label']}, seed {e['seed']}" + (", colour = modality" if e.get("color_by") == "modality" else "")
                               for e in embeddings) + " |",
             "|" + "---|" * len(embeddings),
             "| " + " | ".join(f"![{dataset}: t-SNE of {e['label']}]({n})" for e, n in zip(embeddings, names)) + " |",
             "",
             "t-SNE of the S1 (circles) and S2 (triangles) projections of each configuration's run (`embed.py`), "
             "colour = class unless said otherwise. kNN accuracy (%): cosine similarity, majority of the k nearest; within a modality "
             "leave-one-out, across modalities (S1→S2: S1 queries among the S2 features) the sample's own other "
             "feature left out. Cosine: mean over samples of their S1 and S2 features' cosine, paired and in random "
             "pairs of different samples.",
             "",
             "| configuration | seed | checkpoint | split | n | k | S1 | S2 | S1→S2 | S2→S1 | cos paired | cos random |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in embeddings:
        knn, cos = e["knn_accuracy"], e["pair_cosine"]
        epoch = f" (epoch {e['epoch']})" if e.get("epoch") is not None else ""
        lines.append(f"| {e['label']} | {e['seed']} | {e.get('checkpoint', '–')}{epoch} | "
                     f"{e.get('split', '–')} | {e['n']} | {e['k']} | "
                     + " | ".join(f"{knn[key]:.1f}" for key in ("s1", "s2", "s1_to_s2", "s2_to_s1"))
                     + f" | {cos['paired']:.3f} | {cos['random']:.3f} |")
    return lines + [""]


def write_report(out: Path, datasets: dict, notes: list[str], published: bool = False, sources=(),
                 select: str | None = None) -> Path:
    """Write OUT/report.md and its figures; returns the path of report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(notes)
    body = []
    for dataset, groups in datasets.items():
        body += [f"## {dataset}", "", summarize.tables_of(dataset, groups, select)]

        name = f"per_class_{slug(dataset)}.png"
        per_class_figure(out / name, dataset, groups, published)
        body += [f"![{dataset}: per-class accuracy]({name})", "",
                 "Per-class accuracy, AA and OA at the last epoch: bars are the mean over seeds, error bars the "
                 "sample standard deviation over seeds (none for a single seed)."
                 + (" Markers: the paper's published values on the real data." if published else ""), ""]

        name = f"curves_{slug(dataset)}.png"
        if curves_figure(out / name, dataset, groups):
            body += [f"![{dataset}: learning curves]({name})", "",
                     "Learning curves: every loss term per epoch and AA / OA at each evaluation; "
                     "the line is the mean over seeds, the shaded band spans the minimum to the maximum over seeds.", ""]
        else:
            notes.append(f"{dataset}: no learning curves, the runs have no metrics.jsonl.")

        for i, group in enumerate(groups):
            confusion = summarize.confusion_of(group.runs, "last")
            if confusion is None:
                notes.append(f"{dataset}: no confusion matrix for '{group.label}', its results.json does not record one.")
                continue
            name = f"confusion_{slug(dataset)}_{i + 1}_{slug(group.label)}.png"
            confusion_figure(out / name, dataset, group.label, confusion)
            body += [f"![{dataset}: confusion matrix of {group.label}]({name})", "",
                     f"Confusion matrix of {group.label} at the last evaluation: counts summed over "
                     f"{confusion['seeds']} seeds, each row in % of its true class ('–': no sample of that class).", ""]

        embeddings = summarize.embeddings_of(groups)
        if embeddings:
            body += embedding_section(out, dataset, embeddings)

    head = ["# Results report", "",
            "Written by `summarize.py --report` from: " + ", ".join(f"`{s}`" for s in sources) + ".", ""]
    head += [f"> Note: {n}" for n in notes] + ([""] if notes else [])
    (out / "report.md").write_text("\n".join(head + body))
    return out / "report.md"
