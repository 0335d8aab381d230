"""Results tables in the layout of the paper's Tables II / III, from run folders; optionally a report.

    python summarize.py RUNS... [--report OUT [--published] [--maps MAP.tif...]] [--select AA|OA]

RUNS: run folders, results.json files, or folders holding runs (searched recursively). Per data set
and configuration (every flag but the seed, outputs and hardware), mean ± sample std over seeds of
the last evaluation, the reported result, and of the best one, selected on the evaluation split as
the original reported (optimistic); then the per-seed AA differences of configurations differing in
one flag (fused vs single modality, SupCon+CE vs CE) with paired tests. --report OUT writes
OUT/report.md and PNG figures (matplotlib is imported only then). docs/flags.md has the details.
Over 600 lines on purpose: the tables, the paired tests and the report's data read the same grouping of runs.
"""
import argparse
import dataclasses
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import scipy.stats

from util import cli
from util.io import read_json

# Flags that change only the seed, where a run writes, what it keeps or shows, or the hardware: runs
# differing only in these are seeds of one configuration ("script": the data set tells scripts apart).
NOT_CONFIGURATION = frozenset({
    "seed",
    "save_path", "resume", "overwrite", "script",
    "keep_last", "tensorboard", "save_best", "progress",
    "device", "workers", "amp", "channels_last", "compile", "eval_batch_size",
})
# Path flags that config.json records resolved to absolute paths (rundir.py), while results.json
# keeps them as typed: read from config.json, one data root typed two ways is one configuration.
PATH_FLAGS = ("data_root", "model_path", "s1_backbone", "s2_backbone")

TABLES = (
    ("last", "last epoch"),
    ("best_selected_on_eval_split",
     "best epoch by {criterion}, selected on the evaluation split, as the original reported"),
)
# The original's "best": METER-ML its running best OA (without negatives when excluded); DFC2020 AA
# (its best-tracking code is commented out; it printed every evaluation).
SELECT = {"METER-ML": "OA", "DFC2020": "AA"}


@dataclass
class Run:
    """One run folder: its results.json and its metrics.jsonl records ([] when the file is missing)."""

    folder: Path
    results: dict
    metrics: list[dict]

    @property
    def dataset(self) -> str:
        """The data set's name; a manifest's runs by the manifest's file name, never with DFC2020's (runs
        written before results.json named manifests said "DFC2020": their data_root tells)."""
        dataset = self.results.get("dataset") or "runs"
        root = str(self.config.get("data_root") or "")
        manifest = self.results.get("manifest") or (Path(root).name if root.lower().endswith(".csv") else None)
        if dataset == "manifest" or manifest:
            return f"manifest {manifest or Path(root).name or '(unnamed)'}"
        return dataset

    @property
    def config(self) -> dict:
        return self.results.get("config") or {}

    @property
    def name(self) -> str:
        return self.config.get("name") or self.results.get("name") or self.folder.name

    @property
    def seed(self):
        return self.config.get("seed")


@dataclass
class Group:
    """The seeds of one configuration; `differs`: the flags that tell it from same-named groups."""

    dataset: str
    name: str
    flags: dict
    runs: list[Run]
    differs: list[str] = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        if not self.differs:
            return self.name
        return f"{self.name} ({', '.join(f'{k}={flag_text(self.flags, k)}' for k in self.differs)})"


def flag_text(flags: dict, key: str) -> str:
    """A flag's value as one would type it ('unset' for a flag the run does not have)."""
    if key not in flags:
        return "unset"
    value = flags[key]
    return value if isinstance(value, str) else "None" if value is None else json.dumps(value, default=str)


def find_results(paths: list[Path]) -> list[Path]:
    """results.json files at or below `paths`, in order, each once."""
    found: dict[Path, None] = {}
    for path in paths:
        if path.is_file():
            found[path] = None
        elif (path / "results.json").is_file():
            found[path / "results.json"] = None
        elif path.is_dir():
            found.update(dict.fromkeys(sorted(path.rglob("results.json"))))
        else:
            raise FileNotFoundError(f"{path}: no such run folder or results file")
    return list(found)


def find_unfinished(paths: list[Path]) -> list[Path]:
    """Run folders at or below `paths` with a config.json but no results.json (running, or killed)."""
    found: dict[Path, None] = {}
    for path in paths:
        if path.is_dir() and not (path / "results.json").is_file():
            found.update(dict.fromkeys(c.parent for c in sorted(path.rglob("config.json"))
                                       if not (c.parent / "results.json").is_file()))
    return list(found)


def load_run(file: Path) -> Run:
    """The run of results.json `file` and its metrics.jsonl; PATH_FLAGS as config.json resolved them."""
    metrics_file = file.parent / "metrics.jsonl"
    metrics = []
    if metrics_file.is_file():
        for number, line in enumerate(metrics_file.read_text().splitlines(), 1):
            if line.strip():
                try:
                    metrics.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{metrics_file}:{number}: not a JSON record ({e})") from None
    results = read_json(file)
    config_file = file.parent / "config.json"
    if isinstance(results.get("config"), dict) and config_file.is_file():
        resolved = read_json(config_file)
        results["config"].update({k: resolved[k] for k in PATH_FLAGS
                                  if k in resolved and k in results["config"]})
    return Run(file.parent, results, metrics)


def configuration(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_CONFIGURATION}


def group_runs(runs: list[Run]) -> dict[str, list[Group]]:
    """data set -> its configurations in the order first met; same-named groups get `differs`
    (a flag missing from one run counts as differing)."""
    keyed: dict[str, dict[str, Group]] = {}
    for run in runs:
        flags = configuration(run.config)
        key = json.dumps(flags, sort_keys=True, default=str)
        groups = keyed.setdefault(run.dataset, {})
        groups.setdefault(key, Group(run.dataset, run.name, flags, [])).runs.append(run)

    datasets = {}
    for dataset, by_key in keyed.items():
        groups = list(by_key.values())
        for name in dict.fromkeys(g.name for g in groups):
            same = [g for g in groups if g.name == name]
            if len(same) > 1:
                keys = sorted(set().union(*(g.flags for g in same)))
                # compare as JSON with presence, so that "0.5" and 0.5, or None and unset, differ
                differs = [k for k in keys
                           if len({(k in g.flags, json.dumps(g.flags.get(k), default=str)) for g in same}) > 1]
                for g in same:
                    g.differs = differs
        datasets[dataset] = groups
    return datasets


def grouping_notes(datasets: dict[str, list[Group]]) -> list[str]:
    """One line per name shared by configurations that differ, and per seed met twice."""
    notes = []
    for dataset, groups in datasets.items():
        for name in dict.fromkeys(g.name for g in groups if g.differs):
            same = [g for g in groups if g.name == name]
            notes.append(f"{dataset}: {len(same)} configurations named '{name}' differ in "
                         f"{', '.join(same[0].differs)}; their columns are kept apart and labelled with those flags.")
        for g in groups:
            seeds = [r.seed for r in g.runs]
            for seed in dict.fromkeys(s for s in seeds if seeds.count(s) > 1):
                folders = ", ".join(str(r.folder) for r in g.runs if r.seed == seed)
                notes.append(f"{dataset}: '{g.label}' holds seed {seed} {seeds.count(seed)} times ({folders}); "
                             "each counts.")
    return notes


def criterion_of(dataset: str, select: str | None = None) -> str:
    """The metric that picks a data set's best evaluation: `select`, else the original's (SELECT)."""
    return select or SELECT.get(dataset, "AA")


def best_evaluation(run: Run, criterion: str) -> dict | None:
    """The first best evaluation by `criterion` in metrics.jsonl; without records, results.json's
    own choice if made by the same criterion, else None."""
    records = [r for r in run.metrics if r.get(criterion) is not None and "per_class" in r]
    if not records:
        chosen = run.results.get("best_selected_on_eval_split")
        return chosen if run.results.get("select", "AA") == criterion else None
    best = records[0]
    for record in records[1:]:
        if record[criterion] > best[criterion]:
            best = record
    keys = ("epoch", "AA", "OA", "kappa", "macro_F1", "per_class", "n", "ignored", "classes", "confusion")
    return {k: best[k] for k in keys if k in best}


def summarize(runs: list[Run], select: str | None = None) -> tuple[dict[str, list[Group]], list[str]]:
    """Evaluated runs grouped per data set, and notes; each run's best is chosen again by `criterion_of`."""
    notes = []
    for run in runs:
        if run.results.get("last"):
            run.results["best_selected_on_eval_split"] = best_evaluation(run, criterion_of(run.dataset, select))
    evaluated = [r for r in runs if r.results.get("last")]
    for dataset in dict.fromkeys(r.dataset for r in runs):
        total = sum(r.dataset == dataset for r in runs)
        kept = sum(r.dataset == dataset for r in evaluated)
        if kept == 0:
            notes.append(f"{dataset}: skipped, none of its {total} runs holds an evaluation (pre-training runs).")
        elif kept < total:
            notes.append(f"{dataset}: {total - kept} of {total} runs hold no evaluation and are left out.")
    if not evaluated:
        raise ValueError(f"none of {len(runs)} results files holds an evaluation")
    datasets = group_runs(evaluated)
    return datasets, notes + grouping_notes(datasets)


def evaluations(group: Group, field: str) -> list[dict]:
    return [r.results[field] for r in group.runs if r.results.get(field)]


def class_names(groups: list[Group], field: str) -> list[str]:
    """Class names in index order; those without a value anywhere (an excluded Negative) left out."""
    names: dict[str, None] = {}
    for g in groups:
        for e in evaluations(g, field):
            names.update(dict.fromkeys(e.get("classes") or e["per_class"]))
    return [c for c in names
            if any((e["per_class"].get(c) is not None) for g in groups for e in evaluations(g, field))]


# The rows after the classes; kappa and macro F1 only where some run recorded them.
SUMMARY_ROWS = ("AA", "OA", "kappa", "macro_F1")


def rows_of(groups: list[Group], field: str) -> list[tuple[str, list[list[float]]]]:
    """Table rows: (row name, per group the values over its seeds), a row per class, then SUMMARY_ROWS."""
    rows = []
    for c in class_names(groups, field):
        rows.append((c, [[e["per_class"][c] for e in evaluations(g, field) if e["per_class"].get(c) is not None]
                         for g in groups]))
    for key in SUMMARY_ROWS:
        values = [[e[key] for e in evaluations(g, field) if e.get(key) is not None] for g in groups]
        if key in ("AA", "OA") or any(values):
            rows.append((key, values))
    return rows


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan where undefined: no value, or one for the std)."""
    mean = statistics.mean(values) if values else math.nan
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


def cell(values: list[float], seeds: int, digits: int = 2) -> str:
    """'mean ± std' ('mean' for one value, '–' for none), '(n=k)' where fewer seeds have a value."""
    if not values:
        return "–"
    mean, std = mean_std(values)
    text = f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text if len(values) == seeds else f"{text} (n={len(values)})"


def epochs_text(epochs: list[int]) -> str:
    """The evaluated epochs of the seeds: one number when they agree, else their range."""
    return "–" if not epochs else str(min(epochs)) if min(epochs) == max(epochs) else f"{min(epochs)}–{max(epochs)}"


def table(dataset: str, groups: list[Group], field: str, title: str) -> str:
    seeds = [len(evaluations(g, field)) for g in groups]
    out = [f"### {dataset}: {title}",
           "",
           ("Per-class accuracy, AA, OA and macro F1 (%), Cohen's kappa (a fraction): mean ± sample std over seeds; "
            "n = number of seeds."),
           "",
           "| class | " + " | ".join(g.label for g in groups) + " |",
           "|---|" + "---:|" * len(groups)]
    for name, values in rows_of(groups, field):
        cells = [cell(v, n, 3 if name == "kappa" else 2) for v, n in zip(values, seeds)]
        if name in SUMMARY_ROWS:
            name, cells = f"**{name.replace('_', ' ')}**", [f"**{c}**" for c in cells]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("| epoch | " + " | ".join(epochs_text([e["epoch"] for e in evaluations(g, field) if "epoch" in e])
                                         for g in groups) + " |")
    out.append("| n (seeds) | " + " | ".join(map(str, seeds)) + " |")
    out.append("")
    out.append("Seeds: " + "; ".join(f"{g.label}: {', '.join(str(r.seed) for r in g.runs if r.results.get(field))}"
                                     for g in groups))
    return "\n".join(out) + "\n"


def best_is_last(groups: list[Group]) -> bool:
    """Every run's best evaluation is its last one: the best-epoch table would repeat the first."""
    for run in (r for g in groups for r in g.runs):
        last, best = run.results.get("last"), run.results.get("best_selected_on_eval_split")
        if not best or not last:
            return False
        # results.json written before evaluations recorded their epoch: the same evaluation is equal
        if best != last and (best.get("epoch") is None or best.get("epoch") != last.get("epoch")):
            return False
    return True


def tables_of(dataset: str, groups: list[Group], select: str | None = None) -> str:
    """Both tables of a data set, or the first and a line saying the second would repeat it."""
    criterion = criterion_of(dataset, select)
    (last_field, last_title), (best_field, best_title) = TABLES
    last = table(dataset, groups, last_field, last_title)
    if best_is_last(groups):
        return f"{last}\nBest epoch by {criterion} = last epoch for every run: one table.\n"
    return f"{last}\n{table(dataset, groups, best_field, best_title.format(criterion=criterion))}"


def markdown(datasets: dict[str, list[Group]], notes: list[str], select: str | None = None) -> str:
    """The tool's printed output: notes, then the tables of each data set and its paired comparisons."""
    out = [f"> Note: {n}" for n in notes] + ([""] if notes else [])
    for dataset, groups in datasets.items():
        out.append(tables_of(dataset, groups, select))
        differences = paired_differences(groups)
        if differences:
            out += [f"### {dataset}: paired comparisons", "", *paired_table(differences)]
    return "\n".join(out)


# ----------------------------------------------------------------------------- figure data

def class_counts(evaluation: dict) -> dict[str, int]:
    """Samples of each true class: the confusion matrix's row sums ({} for older results)."""
    if "confusion" not in evaluation or "classes" not in evaluation:
        return {}
    return {c: sum(row) for c, row in zip(evaluation["classes"], evaluation["confusion"])}


def bars_of(groups: list[Group], field: str = "last") -> dict:
    """The per-class bars: rows (classes, AA, OA), per configuration the mean and sample std over
    seeds (nan where undefined), per row "n": [fewest, most] samples of the class in one evaluation
    (None for AA, OA and uncounted classes)."""
    rows = [row for row in rows_of(groups, field) if row[0] not in ("kappa", "macro_F1")]
    stats = [[mean_std(values[i]) for _, values in rows] for i in range(len(groups))]
    counts = [class_counts(e) for g in groups for e in evaluations(g, field)]
    n = []
    for name, _ in rows:
        seen = [c[name] for c in counts if name in c]
        n.append([min(seen), max(seen)] if seen and name not in ("AA", "OA") else None)
    return {"rows": [name for name, _ in rows], "labels": [g.label for g in groups],
            "mean": [[m for m, _ in s] for s in stats], "std": [[d for _, d in s] for s in stats], "n": n}


def curves_of(runs: list[Run]) -> dict[str, dict[str, list]]:
    """quantity (train_* in the order met, AA, OA) -> {"epoch", "mean", "min", "max", "n"} over the
    seeds that recorded it at each epoch; a repeated epoch record (a resumed run) replaces the earlier."""
    per_seed = []
    for run in runs:
        by_epoch = {}
        for record in run.metrics:
            by_epoch[record["epoch"]] = record
        per_seed.append(by_epoch)
    names = dict.fromkeys(k for seed in per_seed for rec in seed.values() for k in rec
                          if k.startswith("train_"))
    curves = {}
    for quantity in [*names, "AA", "OA"]:
        series = {}
        for seed in per_seed:
            for epoch, record in seed.items():
                if record.get(quantity) is not None:
                    series.setdefault(epoch, []).append(record[quantity])
        if series:
            epochs = sorted(series)
            curves[quantity] = {"epoch": epochs,
                                "mean": [statistics.mean(series[e]) for e in epochs],
                                "min": [min(series[e]) for e in epochs],
                                "max": [max(series[e]) for e in epochs],
                                "n": [len(series[e]) for e in epochs]}
    return curves


def confusion_of(runs: list[Run], field: str = "last") -> dict | None:
    """{"classes", "counts" (K, K) summed over seeds (rows: true class), "percent" (% of the row;
    nan for an empty row), "seeds"}, or None when an evaluation has no confusion matrix."""
    evals = [r.results[field] for r in runs if r.results.get(field)]
    if not evals or any("confusion" not in e or "classes" not in e for e in evals):
        return None
    classes = evals[0]["classes"]
    if any(e["classes"] != classes for e in evals):
        raise ValueError(f"runs of one configuration list different classes: {[e['classes'] for e in evals]}")
    k = len(classes)
    counts = [[sum(e["confusion"][i][j] for e in evals) for j in range(k)] for i in range(k)]
    percent = [[100.0 * c / sum(row) if sum(row) else math.nan for c in row] for row in counts]
    return {"classes": classes, "counts": counts, "percent": percent, "seeds": len(evals)}


def embedding_of(run: Run) -> dict | None:
    """embedding/embedding.json plus "png" (embedding/tsne.png), or None without both."""
    folder = run.folder / "embedding"
    if not ((folder / "tsne.png").is_file() and (folder / "embedding.json").is_file()):
        return None
    return {**json.loads((folder / "embedding.json").read_text()), "png": folder / "tsne.png"}


def embeddings_of(groups: list[Group]) -> list[dict]:
    """One embedding per embedded configuration, of the lowest seed all of them embedded (else its
    own lowest): embedding_of's dicts with "label", "seed", "group" (index in `groups`)."""
    found = []
    for i, g in enumerate(groups):
        by_seed = {r.seed: e for r in g.runs if (e := embedding_of(r)) is not None}
        if by_seed:
            found.append((i, g, by_seed))
    common = set.intersection(*(set(by_seed) for _, _, by_seed in found)) if found else set()
    rows = []
    for i, g, by_seed in found:
        seed = min(common or by_seed, key=seed_order)
        rows.append({**by_seed[seed], "label": g.label, "seed": seed, "group": i,
                     "use_sup_con": g.flags.get("use_sup_con"), "scenario": g.flags.get("scenario")})
    return rows


def seed_order(seed) -> tuple:
    """Sort key of seeds: ascending, a run without a seed last."""
    return seed is None, seed or 0


# ----------------------------------------------------------------------------- interpretation

# (flag, A, B): per-seed differences A − B of configurations equal in every other flag but the name.
CONTRASTS = (("scenario", "s1s2_fused", "s1"), ("scenario", "s1s2_fused", "s2"),
             ("use_sup_con", True, False))
# S1 and S2 features are not aligned when their mean cosine is at most this above random pairs'.
ALIGNMENT_MARGIN = 0.01
# Cross-modal kNN accuracy this many points (%) below the within-modality one is reported.
KNN_GAP = 10.0
# The paired tests conclude from this many seeds on, at this level: below 5 the Wilcoxon p cannot
# reach 0.05 (its least is 2 / 2^n), and the t-test's normality cannot be checked.
MIN_SEEDS = 5
ALPHA = 0.05


def last_aa_by_seed(group: Group) -> dict:
    """seed -> AA (%) of the last evaluation (the mean where a seed ran twice)."""
    by_seed: dict = {}
    for run in group.runs:
        if run.results["last"].get("AA") is not None:
            by_seed.setdefault(run.seed, []).append(run.results["last"]["AA"])
    return {seed: statistics.mean(values) for seed, values in by_seed.items()}


def paired_differences(groups: list[Group]) -> list[dict]:
    """[{"flag", "a", "b" (labels), "seeds" (both ran, ascending), "differences" (last AA of A − B,
    points), "mean", "std", "n", paired_test's keys}] in the order of CONTRASTS, then of `groups`."""
    def rest(g: Group, flag: str) -> str:
        return json.dumps({k: v for k, v in g.flags.items() if k not in (flag, "name")}, sort_keys=True, default=str)

    found = []
    for flag, value_a, value_b in CONTRASTS:
        for a in (g for g in groups if g.flags.get(flag) == value_a):
            for b in (g for g in groups if g.flags.get(flag) == value_b and rest(g, flag) == rest(a, flag)):
                aa_a, aa_b = last_aa_by_seed(a), last_aa_by_seed(b)
                seeds = sorted(set(aa_a) & set(aa_b), key=seed_order)
                differences = [aa_a[s] - aa_b[s] for s in seeds]
                mean, std = mean_std(differences)
                found.append({"flag": flag, "a": a.label, "b": b.label, "seeds": seeds, "differences": differences,
                              "mean": mean, "std": std, "n": len(seeds), **paired_test(differences)})
    return found


def paired_test(differences: list[float]) -> dict:
    """Two-sided tests of the differences against 0: {"t_p", "wilcoxon_p" (nan: undefined), "conclusion"}.
    The t-test decides (an AA difference is near normal; it has power at 5-10 seeds, where the exact
    Wilcoxon is coarse); Wilcoxon's p is the check without normality."""
    n = len(differences)
    t_p = w_p = math.nan
    if n > 1 and statistics.stdev(differences) > 0:
        t_p = float(scipy.stats.ttest_1samp(differences, 0.0).pvalue)
    if any(d != 0 for d in differences):
        w_p = float(scipy.stats.wilcoxon(differences).pvalue)
    if n < MIN_SEEDS:
        conclusion = f"too few seeds to conclude ({n} < {MIN_SEEDS})"
    elif math.isnan(t_p):
        conclusion = "p undefined: every seed gives the same difference"
    elif t_p < ALPHA:
        conclusion = f"A {'>' if statistics.mean(differences) > 0 else '<'} B (t-test p < {ALPHA})"
    else:
        conclusion = f"no significant difference (t-test p ≥ {ALPHA})"
    return {"t_p": t_p, "wilcoxon_p": w_p, "conclusion": conclusion}


def p_text(p: float) -> str:
    return "–" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def paired_table(differences: list[dict]) -> list[str]:
    """The markdown lines of paired_differences: per seed, mean, std, n, both tests' p, conclusion."""
    out = [("Paired differences of AA at the last evaluation (percentage points, A − B), seed by seed over the "
            "seeds both configurations ran; A and B are equal in every flag but the one named (and the name). "
            "std: sample standard deviation of the differences. p: two-sided paired t-test and Wilcoxon signed-rank "
            f"test; a conclusion needs at least {MIN_SEEDS} seeds (p < {ALPHA}, t-test)."),
           "",
           "| A | B | differs in | per seed (seed: A − B) | mean | std | n | t-test p | Wilcoxon p | conclusion |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for d in differences:
        per_seed = "; ".join(f"{s}: {signed(v)}" for s, v in zip(d["seeds"], d["differences"])) or "no seed in common"
        std = "–" if math.isnan(d["std"]) else f"{d['std']:.2f}"
        out.append(f"| {d['a']} | {d['b']} | {d['flag']} | {per_seed} | {signed(d['mean'])} | {std} | {d['n']} | "
                   f"{p_text(d['t_p'])} | {p_text(d['wilcoxon_p'])} | {d['conclusion']} |")
    return out + [""]


def embedding_findings(embeddings: list[dict]) -> list[str]:
    """Sentences on embeddings whose S1 and S2 do not align (ALIGNMENT_MARGIN) or whose cross-modal
    kNN accuracy is over KNN_GAP points below the within-modality one."""
    lines = []
    for e in embeddings:
        cos, knn = e["pair_cosine"], e["knn_accuracy"]
        if cos["paired"] <= cos["random"] + ALIGNMENT_MARGIN:
            lines.append(f"In {e['label']} (seed {e['seed']}) the S1 and S2 features of one sample are no closer "
                         f"(cosine {cos['paired']:.2f}) than those of random pairs ({cos['random']:.2f}; margin "
                         f"{ALIGNMENT_MARGIN}): the two encoders do not align the modalities. {alignment_reading(e)}")
        within = (knn["s1"] + knn["s2"]) / 2
        across = (knn["s1_to_s2"] + knn["s2_to_s1"]) / 2
        if within - across > KNN_GAP:
            lines.append(f"In {e['label']} (seed {e['seed']}) kNN accuracy across modalities (S1→S2 "
                         f"{knn['s1_to_s2']:.1f}%, S2→S1 {knn['s2_to_s1']:.1f}%) is {within - across:.1f} points "
                         f"below that within a modality (S1 {knn['s1']:.1f}%, S2 {knn['s2']:.1f}%): the classes may "
                         f"be separated within each modality while the two modalities occupy different regions of "
                         f"the feature space.")
    return lines


def alignment_reading(e: dict) -> str:
    """What unaligned S1 and S2 features mean for the loss the run used (embeddings_of's row)."""
    if e.get("scenario") in ("s1", "s2"):
        return (f"That is expected: the run trained on {e['scenario'].upper()} only, so nothing trained the other "
                f"modality's features.")
    if e.get("use_sup_con") is False:
        return "That is expected: the run's loss is CE alone, and no loss pairs a sample's S1 and S2 features."
    if e.get("use_sup_con") and e.get("scenario") == "s1s2":
        return ("That is expected: SupCon compared features within each modality only (scenario s1s2), so no loss "
                "pairs a sample's S1 and S2 features.")
    if e.get("use_sup_con"):
        return ("The run's SupCon had cross-modal positives (a sample's S1 and S2 features, and those of its class): "
                "they had little effect on the alignment.")
    return ("That is expected where no loss pairs a sample's S1 and S2 features; where a loss had cross-modal "
            "positives, it may mean they had little effect.")


def signed(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:+.2f}"


def interpretation_of(dataset: str, groups: list[Group]) -> str:
    """Markdown of paired_differences and embedding_findings ("" when there is nothing to say)."""
    differences = paired_differences(groups)
    embeddings = embeddings_of(groups)
    if not differences and not embeddings:
        return ""
    out = [f"### {dataset}: interpretation", ""]
    if differences:
        out += paired_table(differences)
    if embeddings:
        findings = embedding_findings(embeddings)
        out += [f"- {line}" for line in findings] or [
            f"Embeddings: in every configuration shown the S1 and S2 features of one sample are closer than those of "
            f"random pairs (by more than {ALIGNMENT_MARGIN} in cosine), and kNN accuracy across modalities is within "
            f"{KNN_GAP:.0f} points of that within a modality."]
        out.append("")
    return "\n".join(out)


def report_data(datasets: dict[str, list[Group]], select: str | None = None) -> dict[str, dict]:
    """Everything report.write_report shows, per data set, as plain data (last evaluation)."""
    return {dataset: {"tables": tables_of(dataset, groups, select),
                      "bars": bars_of(groups, "last"),
                      "curves": [{"label": g.label, "curves": curves_of(g.runs)} for g in groups],
                      "confusions": [{"label": g.label, "confusion": confusion_of(g.runs, "last")} for g in groups],
                      "embeddings": embeddings_of(groups),
                      "interpretation": interpretation_of(dataset, groups)}
            for dataset, groups in datasets.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("paths", type=Path, nargs="+", help="run folders, results.json files, or folders holding runs")
    p.add_argument("--report", type=Path, metavar="OUT",
                   help="also write OUT/report.md with the tables and PNG figures (needs matplotlib); a report.md "
                        "there that this tool did not write is never replaced")
    p.add_argument("--published", action="store_true",
                   help="with --report: mark the paper's published values in the per-class figure "
                        "(off by default: they come from real data, the demo's is synthetic)")
    p.add_argument("--maps", type=Path, nargs="+", default=[], metavar="MAP.tif",
                   help="with --report: also show these scene maps of predict.py (their MAP.png and MAP.json)")
    p.add_argument("--select", choices=["AA", "OA"], default=None,
                   help="the metric that picks each run's best evaluation (default: the original's per data set: "
                        "METER-ML OA, DFC2020 AA)")
    args = p.parse_args(argv)
    if args.published and args.report is None:
        p.error("--published needs --report")
    if args.maps and args.report is None:
        p.error("--maps needs --report")
    maps = []
    for path in args.maps:
        if not (path.with_suffix(".json").is_file() and path.with_suffix(".png").is_file()):
            p.error(f"--maps {path}: no {path.with_suffix('.json').name} and {path.with_suffix('.png').name} "
                    f"beside it; pass a map written by predict.py")
        maps.append({**json.loads(path.with_suffix(".json").read_text()), "png": path.with_suffix(".png")})
    replacing = False
    if args.report is not None:
        try:
            from util import report  # matplotlib only when a report is asked for
        except ImportError as e:
            p.error(f"--report needs matplotlib ({e})")
        try:
            replacing = report.ours_to_replace(args.report)
        except report.NotOurReportError as e:
            p.error(str(e))
    try:
        files = find_results(args.paths)
    except FileNotFoundError as e:
        p.error(str(e))
    left_out = [f"left out: {folder} has no results.json (unfinished or killed)."
                for folder in find_unfinished(args.paths)]
    try:
        datasets, notes = summarize([load_run(f) for f in files], args.select)
    except ValueError as e:
        sys.exit("\n".join([f"summarize.py: {e}", *left_out]))
    notes = left_out + notes
    print(markdown(datasets, notes, args.select))
    if args.report is not None:
        written = report.write_report(args.report, report_data(datasets, args.select), notes,
                                      published=args.published, sources=args.paths, maps=maps)
        print(f"{'replaced' if replacing else 'wrote'} {written}"
              + (" (written earlier by summarize.py --report)" if replacing else ""), file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
