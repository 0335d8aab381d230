"""The report of `summarize.py --report OUT`: OUT/report.md with PNG figures beside it (docs/flags.md).

Everything shown arrives as plain data (summarize.report_data): nothing here reads run folders or
imports summarize. Figure functions return the Figure, so that what they draw can be inspected.
"""
import math
import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# The first line of every report.md written here: a report.md without it is the user's.
MARKER = "<!-- written by summarize.py --report -->"
DPI = 120
# One marker, line style and fill per configuration, so that curves that coincide stay apart.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")

# The paper's Tables II, III (%; DFC2020 test, METER-ML val; class names mapped to the data sets'), CE
# first so each method keeps its marker. Its std: DFC2020 AA 0.89 (SupCon+CE) / 0.72 (CE), OA 1.31 /
# 1.66; METER-ML AA 1.74 (CE) / 2.00 (SupCon+CE), no OA.
PUBLISHED = {
    "DFC2020": {
        "CE": {"Forest": 63.49, "Shrubland": 58.31, "Grassland": 12.60, "Wetlands": 14.43, "Croplands": 52.65,
               "Urban/Built-up": 91.14, "Barren": 43.91, "Water": 98.63, "AA": 54.39, "OA": 68.29},
        "SupCon+CE": {"Forest": 75.54, "Shrubland": 52.26, "Grassland": 6.18, "Wetlands": 20.90, "Croplands": 59.65,
                      "Urban/Built-up": 89.94, "Barren": 44.09, "Water": 98.42, "AA": 55.87,
                      "OA": 72.62},
    },
    "METER-ML": {
        "CE": {"CAFOs": 97.44, "Landfills": 50.23, "Mines": 60.00, "ProcessingPlants": 57.36,
               "RefineriesAndTerminals": 77.91, "WWTreatment": 81.50, "AA": 70.74},
        "SupCon+CE": {"CAFOs": 97.44, "Landfills": 59.53, "Mines": 59.00, "ProcessingPlants": 66.31,
                      "RefineriesAndTerminals": 78.61, "WWTreatment": 82.10, "AA": 73.83},
    },
}

LOSS_LABELS = {"train_loss": "total training loss", "train_ce": "cross-entropy", "train_supcon": "SupCon"}


class NotOurReportError(FileExistsError):
    """OUT/report.md exists and was not written by this tool."""


def ours_to_replace(out: Path) -> bool:
    """Whether OUT/report.md exists and was written here; NotOurReportError when it lacks MARKER."""
    path = Path(out) / "report.md"
    if not path.exists():
        return False
    with open(path, errors="replace") as f:
        if f.readline().rstrip("\n") != MARKER:
            raise NotOurReportError(f"{path} exists and was not written by summarize.py --report, so it is not "
                                    f"replaced: give another OUT folder, or move that file away")
    return True


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "x"


def save(fig: Figure, path: Path) -> None:
    """A PNG cropped to what `fig` draws (nothing is cut off); frees it."""
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def count_text(n: list[int] | None) -> str:
    """'n=52', or 'n=50–52' where evaluations counted the class differently; '' when unknown."""
    if n is None:
        return ""
    return f"n={n[0]}" if n[0] == n[1] else f"n={n[0]}–{n[1]}"


def per_class_figure(dataset: str, bars: dict, published: bool = False) -> Figure:
    """summarize.bars_of as grouped bars (a bar per configuration); the y axis clears every error bar."""
    rows, labels = bars["rows"], bars["labels"]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(rows) + 3), 4.8), layout="constrained")
    tops = [100.0]
    for i, label in enumerate(labels):
        x = [r + (i - (len(labels) - 1) / 2) * width for r in range(len(rows))]
        means = bars["mean"][i]
        stds = [0.0 if math.isnan(d) else d for d in bars["std"][i]]
        # an accuracy is never below 0: the lower error bar stops at the axis
        lower = [0.0 if math.isnan(m) else min(d, m) for m, d in zip(means, stds)]
        ax.bar(x, means, width, yerr=[lower, stds], capsize=3, label=label)
        tops += [m + d for m, d in zip(means, stds) if not math.isnan(m)]
    if published:
        for k, (method, values) in enumerate(PUBLISHED.get(dataset, {}).items()):
            points = [(r, values[row]) for r, row in enumerate(rows) if row in values]
            ax.scatter([r + (k - 0.5) * 0.2 for r, _ in points], [v for _, v in points], marker="D*"[k % 2],
                       s=40, color="black" if k == 0 else "dimgray", zorder=3,
                       label=f"published {method} (paper, real data)")
    n = bars.get("n") or [None] * len(rows)
    ax.set_xticks(range(len(rows)), [f"{row}\n({count_text(c)})" if c else row for row, c in zip(rows, n)],
                  rotation=30, ha="right", rotation_mode="anchor")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, max(tops) + 5)
    ax.set_title(f"{dataset}: per-class accuracy, AA and OA at the last epoch\n"
                 "(bars: mean over seeds, error bars: sample std; n: samples of the class in one evaluation)")
    # below the axes: at the right it sat under the two-line title, which is wider than the axes
    fig.legend(fontsize="small", loc="outside lower center", ncols=min(3, len(labels) + (2 if published else 0)))
    ax.grid(axis="y", alpha=0.3)
    return fig


def curve_quantities(curves: list[dict]) -> list[str]:
    """Quantities with a finite value somewhere: loss terms in the order met, then AA and OA."""
    met = dict.fromkeys(q for c in curves for q, curve in c["curves"].items()
                        if any(math.isfinite(v) for v in curve["mean"]))
    return [q for q in met if q not in ("AA", "OA")] + [q for q in ("AA", "OA") if q in met]


def curves_figure(dataset: str, curves: list[dict]) -> Figure | None:
    """A panel per quantity, configurations overlaid, each with a marker (a single epoch stays
    visible); one legend below. None when no quantity has a value."""
    quantities = curve_quantities(curves)
    if not quantities:
        return None
    cols = min(3, len(quantities))
    nrows = math.ceil(len(quantities) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows + 0.8), squeeze=False,
                             layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, quantity in zip(axes.flat, quantities):
        for i, config in enumerate(curves):
            if quantity not in config["curves"]:
                continue
            c, color = config["curves"][quantity], colors[i % len(colors)]
            ax.plot(c["epoch"], c["mean"], color=color, marker=MARKERS[i % len(MARKERS)],
                    linestyle=LINESTYLES[i % len(LINESTYLES)], markersize=5,
                    markerfacecolor="none" if i % 2 else color,  # hollow and filled markers stay apart when on top
                    markevery=max(1, len(c["epoch"]) // 15), label=config["label"])
            ax.fill_between(c["epoch"], c["min"], c["max"], color=color, alpha=0.2, linewidth=0)
        ax.set_title(LOSS_LABELS.get(quantity, quantity))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, even for one epoch
        ax.set_ylabel("accuracy (%)" if quantity in ("AA", "OA") else "loss (mean over batches)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(quantities):]:
        ax.set_visible(False)
    legend = {}  # one entry per configuration, whichever panels it appears in
    for ax in axes.flat[:len(quantities)]:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    # as many columns as the longest labels fit across the figure (about 12 small characters an inch)
    longest = max(map(len, legend))
    ncol = max(1, min(len(legend), int(4.5 * cols * 12 // (longest + 6))))
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=ncol, fontsize="small")
    fig.suptitle(f"{dataset}: learning curves (line: mean over seeds, band: min-max over seeds)")
    return fig


def confusion_figure(dataset: str, label: str, confusion: dict) -> Figure:
    """% of each true class in the cells; each true class with its samples over seeds."""
    classes, percent = confusion["classes"], confusion["percent"]
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 * k + 3, 0.8 * k + 2), layout="constrained")
    image = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    for i in range(k):
        for j in range(k):
            value = percent[i][j]
            text = "–" if math.isnan(value) else f"{value:.0f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if not math.isnan(value) and value > 60 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), [f"{c} (n={sum(row)})" for c, row in zip(classes, confusion["counts"])])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (samples over all seeds)")
    total = sum(map(sum, confusion["counts"]))
    ax.set_title(f"{dataset}: {label}\nlast evaluation, {confusion['seeds']} seeds, {total} samples")
    fig.colorbar(image, ax=ax, label="% of the true class")
    return fig


def embedding_section(out: Path, dataset: str, embeddings: list[dict]) -> list[str]:
    """Markdown: embeddings_of's t-SNE pictures side by side (copied into `out`), a table of their numbers."""
    names = []
    for e in embeddings:
        name = f"tsne_{slug(dataset)}_{e['group'] + 1}_{slug(e['label'])}_seed{slug(str(e['seed']))}.png"
        shutil.copyfile(e["png"], out / name)
        names.append(name)
    lines = [f"### {dataset}: embeddings", "",
             "| " + " | ".join(f"{e['label']}, seed {e['seed']}"
                               + (", colour = modality" if e.get("color_by") == "modality" else "")
                               for e in embeddings) + " |",
             "|" + "---|" * len(embeddings),
             "| " + " | ".join(f"![{dataset}: t-SNE of {e['label']}]({n})" for e, n in zip(embeddings, names)) + " |",
             "",
             "t-SNE of the S1 (circles) and S2 (triangles) projections of each configuration's run (`embed.py`), "
             "colour = class unless said otherwise. kNN accuracy (%): cosine similarity, majority of the k nearest; "
             "within a modality leave-one-out, across modalities (S1→S2: S1 queries among the S2 features) the "
             "sample's own other "
             "feature left out. Cosine: mean over samples of their S1 and S2 features' cosine, paired and in random "
             "pairs of different samples.",
             "",
             "| configuration | seed | checkpoint | split | n | k | S1 | S2 | S1→S2 | S2→S1 | "
             "cos paired | cos random |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in embeddings:
        knn, cos = e["knn_accuracy"], e["pair_cosine"]
        epoch = f" (epoch {e['epoch']})" if e.get("epoch") is not None else ""
        lines.append(f"| {e['label']} | {e['seed']} | {e.get('checkpoint', '–')}{epoch} | "
                     f"{e.get('split', '–')} | {e['n']} | {e['k']} | "
                     + " | ".join(f"{knn[key]:.1f}" for key in ("s1", "s2", "s1_to_s2", "s2_to_s1"))
                     + f" | {cos['paired']:.3f} | {cos['random']:.3f} |")
    return lines + [""]


def maps_section(out: Path, maps: list[dict]) -> list[str]:
    """Markdown: predict.py's scene maps (`maps`: each MAP.json plus "png") copied into `out`, their numbers."""
    lines = ["## Predicted maps", ""]
    for i, m in enumerate(maps):
        name = f"map_{i + 1}_{slug(Path(m['out']).stem)}.png"
        shutil.copyfile(m["png"], out / name)
        agree = ("" if m.get("agreement") is None else f" {m['agreement']:.1f} % of the pixels labelled in both "
                 f"agree with the true classes (`{m['truth']}`).")
        lines += [f"![predicted map {Path(m['out']).name}]({name})", "",
                  f"`predict.py` with `{m['run']}` ({m['weights']}) on `{m['s1']}` and `{m['s2']}`: {m['window']} px "
                  f"windows every {m['stride']} px, each giving its class to the {m['stride']} px cell centred in it; "
                  f"{m['grid'][0]} x {m['grid'][1]} windows, {m.get('nodata_pixels', '?')} nodata pixels; "
                  f"{m['windows_per_s']:.0f} windows/s on {m['device']}.{agree}", ""]
    return lines


def write_report(out: Path, sections: dict[str, dict], notes: list[str], published: bool = False,
                 sources=(), maps=()) -> Path:
    """OUT/report.md (MARKER first) and its figures; refuses (NotOurReportError) before writing anything
    to replace a report.md not written here."""
    out = Path(out)
    ours_to_replace(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(notes)
    body = []
    for dataset, section in sections.items():
        body += [f"## {dataset}", "", section["tables"]]

        name = f"per_class_{slug(dataset)}.png"
        save(per_class_figure(dataset, section["bars"], published), out / name)
        body += [f"![{dataset}: per-class accuracy]({name})", "",
                 "Per-class accuracy, AA and OA at the last epoch: bars are the mean over seeds, error bars the "
                 "sample standard deviation over seeds (none for a single seed); n under each class: its samples "
                 "in one evaluation."
                 + (" Markers: the paper's published values on the real data." if published else ""), ""]

        name = f"curves_{slug(dataset)}.png"
        figure = curves_figure(dataset, section["curves"])
        if figure is not None:
            save(figure, out / name)
            body += [f"![{dataset}: learning curves]({name})", "",
                     "Learning curves: every loss term per epoch and AA / OA at each evaluation; "
                     "the line is the mean over seeds, the shaded band spans the minimum to the maximum over "
                     "seeds.", ""]
        else:
            notes.append(f"{dataset}: no learning curves, the runs have no metrics.jsonl.")

        for i, config in enumerate(section["confusions"]):
            label, confusion = config["label"], config["confusion"]
            if confusion is None:
                notes.append(f"{dataset}: no confusion matrix for '{label}', its results.json does not record one.")
                continue
            name = f"confusion_{slug(dataset)}_{i + 1}_{slug(label)}.png"
            save(confusion_figure(dataset, label, confusion), out / name)
            body += [f"![{dataset}: confusion matrix of {label}]({name})", "",
                     f"Confusion matrix of {label} at the last evaluation: counts summed over "
                     f"{confusion['seeds']} seeds, each row in % of its true class ('–': no sample of that class); "
                     f"n: the class's samples over all seeds.", ""]

        if section["embeddings"]:
            body += embedding_section(out, dataset, section["embeddings"])
        if section["interpretation"]:
            body += [section["interpretation"]]

    if maps:
        body += maps_section(out, list(maps))
    head = [MARKER, "# Results report", "",
            "Written by `summarize.py --report` from: " + ", ".join(f"`{s}`" for s in sources) + ".", ""]
    head += [f"> Note: {n}" for n in notes] + ([""] if notes else [])
    (out / "report.md").write_text("\n".join(head + body))
    return out / "report.md"
