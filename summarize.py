"""Results tables in the layout of the paper's Tables II / III, from run folders.

    python summarize.py RUN_DIR_OR_PARENT [...] [--metric last|best]

Reads every `results.json` at or below the given paths, groups the runs by data set and by
configuration (the `--name` of the run, e.g. "s1s2_fused SupCon+CE"), and prints one markdown
table per data set: a row per class, then AA and OA; a column per configuration, each cell the
mean +- sample standard deviation over the configuration's seeds, in percent. Columns keep the
order in which configurations are first met.
"""
import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


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


def cell(values: list[float]) -> str:
    """'mean ± std' over seeds ('mean' alone for one seed, '–' for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summarize(files: list[Path], metric: str = "last") -> str:
    """Markdown tables for the runs in `files`; `metric` picks the reported or the best evaluation."""
    # dataset -> configuration -> list of evaluations (one per seed)
    tables: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    seeds: dict[tuple[str, str], list[int]] = defaultdict(list)
    for file in files:
        results = json.loads(file.read_text())
        evaluation = results.get("last" if metric == "last" else "best_selected_on_eval_split")
        if evaluation is None:
            continue  # pre-training runs have no evaluation
        config = results["config"]
        dataset, name = results.get("dataset", "runs"), config.get("name") or file.parent.name
        tables[dataset][name].append(evaluation)
        seeds[(dataset, name)].append(config.get("seed"))
    if not tables:
        raise ValueError(f"none of {len(files)} results files holds an evaluation")

    out = []
    for dataset, configs in tables.items():
        names = list(configs)
        classes = list(next(iter(configs.values()))[0]["per_class"])
        counts = ", ".join(f"{n}: {len(seeds[(dataset, n)])}" for n in names)
        label = "last epoch (reported)" if metric == "last" else "best epoch, selected on the evaluation split (optimistic)"
        out.append(f"### {dataset}: per-class accuracy, AA and OA (%), mean ± std over seeds; {label}\n")
        out.append(f"Seeds per configuration: {counts}\n")
        out.append("| class | " + " | ".join(names) + " |")
        out.append("|---|" + "---:|" * len(names))
        for c in classes:
            out.append(f"| {c} | " + " | ".join(cell([e["per_class"].get(c) for e in configs[n]]) for n in names) + " |")
        for key in ("AA", "OA"):
            out.append(f"| **{key}** | " + " | ".join(f"**{cell([e[key] for e in configs[n]])}**" for n in names) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", type=Path, nargs="+", help="run folders, results.json files, or folders holding runs")
    p.add_argument("--metric", choices=["last", "best"], default="last",
                   help="last: the last epoch's evaluation, the reported result (default); best: the best epoch's")
    args = p.parse_args(argv)
    try:
        print(summarize(find_results(args.paths), args.metric))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"summarize.py: {e}")


if __name__ == "__main__":
    main()
