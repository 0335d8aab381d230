"""summarize.py and report.py on tiny fake run folders in the run folder format of rundir.py."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

import summarize
from helpers import PNG_SIGNATURE

DFC = ["Forest", "Shrubland", "Grassland", "Wetlands", "Croplands", "Urban/Built-up", "Barren", "Water"]


def evaluation(epoch, per_class, aa, oa, classes=("Forest", "Water"), confusion=None):
    """An evaluation record; the confusion matrix defaults to a diagonal one."""
    return {"epoch": epoch, "AA": aa, "OA": oa, "per_class": per_class, "n": 10, "ignored": 0,
            "classes": list(classes), "confusion": confusion or [[5, 0], [0, 5]]}


def write_run(folder, name, seed, last, best=None, dataset="DFC2020", metrics=(), **flags):
    """A run folder: config.json, metrics.jsonl and results.json."""
    folder.mkdir(parents=True)
    config = {"name": name, "seed": seed, "lr": 0.01, "temperature": 0.07, "save_path": str(folder),
              "data_root": "/data", "resume": None, "device": "cpu", "workers": 0, **flags}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    results = {"dataset": dataset, "name": name, "config": config, "last": last,
               "best_selected_on_eval_split": best or last, "note": "fake"}
    (folder / "results.json").write_text(json.dumps(results))


def runs_in(path):
    return [summarize.load_run(f) for f in summarize.find_results([path])]


def test_mean_and_std_over_seeds(tmp_path, capsys):
    write_run(tmp_path / "a0", "CE", 0, evaluation(3, {"Forest": 60.0, "Water": 100.0}, 80.0, 70.0))
    write_run(tmp_path / "a1", "CE", 1, evaluation(3, {"Forest": 64.0, "Water": 96.0}, 80.0, 74.0))
    write_run(tmp_path / "b0", "SupCon+CE", 0, evaluation(3, {"Forest": 75.0, "Water": None}, 75.0, 72.5))
    summarize.main([str(tmp_path)])
    table = capsys.readouterr().out
    assert "| class | CE | SupCon+CE |" in table
    assert "| Forest | 62.00 ± 2.83 | 75.00 |" in table  # stdev([60, 64]) = sqrt(8) = 2.828
    assert "| Water | 98.00 ± 2.83 | – |" in table
    assert "| **OA** | **72.00 ± 2.83** | **72.50** |" in table
    assert "| n (seeds) | 2 | 1 |" in table
    assert "Seeds: CE: 0, 1; SupCon+CE: 0" in table
    groups = summarize.group_runs(runs_in(tmp_path))["DFC2020"]
    bars = summarize.bars_of(groups)
    assert bars["rows"] == ["Forest", "Water", "AA", "OA"]
    assert bars["mean"][0] == [62.0, 98.0, 80.0, 72.0]
    assert bars["std"][0] == pytest.approx([8 ** 0.5, 8 ** 0.5, 0.0, 8 ** 0.5])
    assert math.isnan(bars["mean"][1][1]) and math.isnan(bars["std"][1][0])  # absent class; one seed


def test_two_tables_from_their_own_fields(tmp_path, capsys):
    last = evaluation(5, {"Forest": 50.0, "Water": 70.0}, 60.0, 65.0)
    best = evaluation(4, {"Forest": 90.0, "Water": 80.0}, 85.0, 88.0)
    write_run(tmp_path / "r0", "CE", 0, last, best)
    (tmp_path / "pre").mkdir()  # a pre-training run: no evaluation, its data set is skipped
    (tmp_path / "pre" / "results.json").write_text(json.dumps({"dataset": "SSL", "config": {}, "last": None}))
    summarize.main([str(tmp_path)])
    out = capsys.readouterr().out
    last_table, best_table = out.split("### DFC2020: best epoch by AA, selected on the evaluation split, as the original reported")
    assert "### DFC2020: last epoch" in last_table
    assert "| Forest | 50.00 |" in last_table and "| **AA** | **60.00** |" in last_table and "| epoch | 5 |" in last_table
    assert "| Forest | 90.00 |" in best_table and "| **AA** | **85.00** |" in best_table and "| epoch | 4 |" in best_table
    assert "50.00" not in best_table and "90.00" not in last_table
    assert "SSL: skipped" in out


def test_grouping_splits_differing_flags_and_keeps_seeds_together(tmp_path, capsys):
    e = evaluation(3, {"Forest": 60.0, "Water": 100.0}, 80.0, 70.0)
    write_run(tmp_path / "ce0", "CE", 0, e)
    write_run(tmp_path / "ce1", "CE", 1, e, device="cuda", workers=8, amp=True)  # hardware only: same group
    write_run(tmp_path / "t0", "CE", 0, e, temperature=0.5)
    # outputs and bookkeeping only: same group
    write_run(tmp_path / "t1", "CE", 1, e, temperature=0.5, script="dfc_finetune", keep_last="weights", tensorboard=True,
              save_best=False, progress=False, overwrite=True)
    write_run(tmp_path / "s0", "SupCon+CE", 0, e)
    groups = summarize.group_runs(runs_in(tmp_path))["DFC2020"]
    # columns in the order first met (folders are read in sorted order)
    assert [g.label for g in groups] == ["CE (temperature=0.07)", "SupCon+CE", "CE (temperature=0.5)"]
    assert [[r.folder.name for r in g.runs] for g in groups] == [["ce0", "ce1"], ["s0"], ["t0", "t1"]]
    summarize.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| class | CE (temperature=0.07) | SupCon+CE | CE (temperature=0.5) |" in out
    assert "> Note: DFC2020: 2 configurations named 'CE' differ in temperature;" in out


def fake_confusion_runs(tmp_path):
    """Two seeds of one configuration with hand-made confusion matrices over four classes."""
    classes = ["Forest", "Water", "Barren", "Wetlands"]
    first = [[3, 1, 0, 0], [0, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]  # Barren absent in this seed
    second = [[1, 1, 2, 0], [1, 5, 0, 0], [0, 2, 2, 0], [0, 0, 0, 0]]  # Wetlands absent in both
    for seed, matrix in enumerate((first, second)):
        write_run(tmp_path / f"c{seed}", "CE", seed,
                  evaluation(2, {"Forest": 0.0, "Water": 0.0, "Barren": None, "Wetlands": None}, 0.0, 0.0, classes, matrix),
                  metrics=[{"epoch": 1, "train_loss": 1.0 + seed, "train_ce": 0.5 + seed, "samples_per_s": 9.0,
                            "epoch_s": 1.0, "lr": 0.01},
                           {"epoch": 2, "train_loss": 0.5 + 2 * seed, "train_ce": 0.25, "train_supcon": 0.2 + seed,
                            "samples_per_s": 9.0, "epoch_s": 1.0, "lr": 0.01, "AA": 50.0 + 10 * seed, "OA": 60.0}])
    return runs_in(tmp_path)


def test_confusion_summed_over_seeds_and_row_normalised(tmp_path):
    confusion = summarize.confusion_of(fake_confusion_runs(tmp_path))
    assert confusion["classes"] == ["Forest", "Water", "Barren", "Wetlands"]
    assert confusion["counts"] == [[4, 2, 2, 0], [1, 9, 0, 0], [0, 2, 2, 0], [0, 0, 0, 0]]  # sums by hand
    percent = confusion["percent"]
    assert percent[:3] == [pytest.approx(row) for row in ([50, 25, 25, 0], [10, 90, 0, 0], [0, 50, 50, 0])]
    assert all(math.isnan(v) for v in percent[3])  # no Wetlands sample: the row has no percentages
    assert confusion["seeds"] == 2


def test_curves_follow_metrics_jsonl(tmp_path):
    curves = summarize.curves_of(fake_confusion_runs(tmp_path))
    assert list(curves) == ["train_loss", "train_ce", "train_supcon", "AA", "OA"]
    assert curves["train_loss"] == {"epoch": [1, 2], "mean": [1.5, 1.5], "min": [1.0, 0.5], "max": [2.0, 2.5], "n": [2, 2]}
    assert curves["train_ce"]["mean"] == [1.0, 0.25]
    assert curves["train_supcon"] == {"epoch": [2], "mean": [0.7], "min": [0.2], "max": [1.2], "n": [2]}
    assert curves["AA"] == {"epoch": [2], "mean": [55.0], "min": [50.0], "max": [60.0], "n": [2]}


@pytest.mark.slow
def test_report_writes_valid_pngs_that_report_md_references(tmp_path):
    rng = random.Random(0)
    for name in ("CE", "SupCon+CE"):
        for seed in range(2):
            matrix = [[rng.randint(0, 20) for _ in DFC] for _ in DFC]
            per_class = {c: rng.uniform(0, 100) for c in DFC}
            metrics = [{"epoch": e, "train_loss": rng.random(), "train_ce": rng.random(),
                        **({"train_supcon": rng.random()} if name != "CE" else {}),
                        **({"AA": rng.uniform(0, 100), "OA": rng.uniform(0, 100)} if e % 2 == 0 else {})}
                       for e in range(1, 7)]
            write_run(tmp_path / "runs" / f"{name}{seed}", name, seed,
                      evaluation(6, per_class, 50.0, 60.0, DFC, matrix), metrics=metrics)
    out = tmp_path / "report"
    summarize.main([str(tmp_path / "runs"), "--report", str(out), "--published"])
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"per_class_DFC2020.png", "curves_DFC2020.png",
                                      "confusion_DFC2020_1_CE.png", "confusion_DFC2020_2_SupCon_CE.png"}
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
    text = (out / "report.md").read_text()
    for png in pngs:
        assert f"]({png.name})" in text
    # the fake metrics hold no per-class records: the best evaluation is results.json's, the last one
    assert text.startswith("<!-- written by summarize.py --report -->\n")
    assert "### DFC2020: last epoch" in text and "Best epoch by AA = last epoch for every run: one table." in text


def test_missing_paths_give_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        summarize.main([str(tmp_path / "nothing")])
    assert exit_.value.code == 2
    assert "nothing: no such run folder or results file" in capsys.readouterr().err


@pytest.mark.slow
def test_tables_alone_do_not_import_matplotlib(tmp_path):
    write_run(tmp_path / "r0", "CE", 0, evaluation(3, {"Forest": 60.0, "Water": 100.0}, 80.0, 70.0))
    code = ("import sys, summarize; summarize.main([sys.argv[1]]); "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| Forest | 60.00 |" in done.stdout


@pytest.mark.slow
def test_runs_without_confusion_or_metrics_still_report(tmp_path):
    """results.json written before the engine recorded a confusion matrix, and no metrics.jsonl."""
    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    last = {"epoch": 3, "per_class": {"Forest": 60.0, "Water": 100.0}, "AA": 80.0, "OA": 70.0, "n": 10}
    (run / "results.json").write_text(json.dumps({"dataset": "DFC2020", "config": {"name": "CE", "seed": 0, "head_lr": None},
                                                  "last": last, "best_selected_on_eval_split": last}))
    write_run(tmp_path / "runs" / "new", "CE", 0, evaluation(3, {"Forest": 60.0, "Water": 100.0}, 80.0, 70.0))
    runs = runs_in(tmp_path / "runs")
    assert summarize.confusion_of(runs[1:]) is None and summarize.curves_of(runs[1:]) == {}
    summarize.main([str(tmp_path / "runs"), "--report", str(tmp_path / "report")])
    text = (tmp_path / "report" / "report.md").read_text()
    assert "no confusion matrix for 'CE (data_root=unset, head_lr=None, lr=unset, temperature=unset)'" in text
    assert (tmp_path / "report" / "per_class_DFC2020.png").read_bytes()[:8] == PNG_SIGNATURE


def write_embedding(folder, s1, s2, picture, color_by="class", paired=0.8, random=0.125, across=None):
    """embed.py's output in a run folder: embedding.json with the given kNN accuracies (across
    modalities half the within ones unless `across` gives both) and pair cosines, and tsne.png."""
    (folder / "embedding").mkdir()
    (folder / "embedding" / "tsne.png").write_bytes(PNG_SIGNATURE + picture)
    s1_to_s2, s2_to_s1 = across or (s1 / 2, s2 / 2)
    info = {"kind": "dfc_finetune", "checkpoint": "last.pt", "epoch": 3, "split": "test", "n": 6, "ignored": 0, "k": 5,
            "color_by": color_by,
            "knn_accuracy": {"s1": s1, "s2": s2, "s1_to_s2": s1_to_s2, "s2_to_s1": s2_to_s1},
            "pair_cosine": {"paired": paired, "random": random, "seed": 0}}
    (folder / "embedding" / "embedding.json").write_text(json.dumps(info))


@pytest.mark.slow
def test_report_shows_embeddings_of_one_seed_per_configuration(tmp_path):
    e = evaluation(3, {"Forest": 60.0, "Water": 100.0}, 80.0, 70.0)
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs / f"ce{seed}", "CE", seed, e)
        write_run(runs / f"sup{seed}", "SupCon+CE", seed, e)
        write_embedding(runs / f"ce{seed}", 50.0 + seed, 40.0, f"ce{seed}".encode())
    write_embedding(runs / "sup1", 90.0, 80.0, b"sup1", color_by="modality")  # SupCon+CE has seed 1 only: both show seed 1
    write_run(runs / "other0", "CE", 0, e, lr=0.5)  # no embedding: no picture
    write_run(tmp_path / "meter" / "m0", "CE", 0, e, dataset="METER-ML")  # a data set without any: no section
    groups = summarize.group_runs(runs_in(tmp_path))
    shown = summarize.embeddings_of(groups["DFC2020"])
    # groups: CE, CE with lr 0.5 (no embedding), SupCon+CE
    assert [(row["label"], row["seed"], row["group"]) for row in shown] == [("CE (lr=0.01)", 1, 0), ("SupCon+CE", 1, 2)]
    assert [row["knn_accuracy"]["s1"] for row in shown] == [51.0, 90.0]
    assert summarize.embeddings_of(groups["METER-ML"]) == []

    out = tmp_path / "report"
    summarize.main([str(runs), str(tmp_path / "meter"), "--report", str(out)])
    assert (out / "tsne_DFC2020_1_CE_lr_0_01_seed1.png").read_bytes() == PNG_SIGNATURE + b"ce1"
    assert (out / "tsne_DFC2020_3_SupCon_CE_seed1.png").read_bytes() == PNG_SIGNATURE + b"sup1"
    assert len(list(out.glob("tsne_*.png"))) == 2
    text = (out / "report.md").read_text()
    assert "### DFC2020: embeddings" in text and "METER-ML: embeddings" not in text
    assert "| CE (lr=0.01), seed 1 | SupCon+CE, seed 1, colour = modality |" in text
    assert "](tsne_DFC2020_1_CE_lr_0_01_seed1.png) | ![DFC2020: t-SNE of SupCon+CE](tsne_DFC2020_3_SupCon_CE_seed1.png) |" in text
    assert "| CE (lr=0.01) | 1 | last.pt (epoch 3) | test | 6 | 5 | 51.0 | 40.0 | 25.5 | 20.0 | 0.800 | 0.125 |" in text
    assert "| SupCon+CE | 1 | last.pt (epoch 3) | test | 6 | 5 | 90.0 | 80.0 | 45.0 | 40.0 | 0.800 | 0.125 |" in text


def test_embeddings_without_a_common_seed_show_each_configurations_lowest(tmp_path):
    e = evaluation(3, {"Forest": 60.0, "Water": 100.0}, 80.0, 70.0)
    for name, seeds in (("CE", (2, 0)), ("SupCon+CE", (1, 3))):
        for seed in seeds:
            write_run(tmp_path / f"{name}{seed}", name, seed, e)
            write_embedding(tmp_path / f"{name}{seed}", 10.0 * seed, 0.0, b"x")
    shown = summarize.embeddings_of(summarize.group_runs(runs_in(tmp_path))["DFC2020"])
    assert [(row["label"], row["seed"], row["knn_accuracy"]["s1"]) for row in shown] == [("CE", 0, 0.0), ("SupCon+CE", 1, 10.0)]


def test_best_is_selected_as_the_original_per_data_set(tmp_path, capsys):
    """METER-ML: the running best of OA (the original's Evaluator total); DFC2020: AA; --select overrides."""
    early = evaluation(1, {"Forest": 90.0, "Water": 50.0}, 70.0, 80.0)  # best OA
    late = evaluation(2, {"Forest": 60.0, "Water": 90.0}, 75.0, 70.0)  # best AA
    for dataset in ("METER-ML", "DFC2020"):
        write_run(tmp_path / dataset / "r0", "CE", 0, late, best=late, dataset=dataset, metrics=[early, late])
    summarize.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "### METER-ML: best epoch by OA" in out  # epoch 1, not the last
    assert "### DFC2020: best epoch by AA" not in out and "Best epoch by AA = last epoch for every run: one table." in out
    runs = runs_in(tmp_path)
    chosen = {r.dataset: summarize.best_evaluation(r, summarize.criterion_of(r.dataset))["epoch"] for r in runs}
    assert chosen == {"METER-ML": 1, "DFC2020": 2}
    datasets, _ = summarize.summarize(runs_in(tmp_path), select="AA")
    assert [g.runs[0].results["best_selected_on_eval_split"]["epoch"] for g in datasets["METER-ML"]] == [2]
    tie = [evaluation(1, {"Forest": 1.0, "Water": 1.0}, 50.0, 50.0), evaluation(2, {"Forest": 1.0, "Water": 1.0}, 50.0, 50.0)]
    write_run(tmp_path / "tie", "CE", 0, tie[1], metrics=tie)
    assert summarize.best_evaluation(summarize.load_run(tmp_path / "tie" / "results.json"), "AA")["epoch"] == 1  # the first


# ----------------------------------------------------------------------------- report.py alone

@pytest.mark.slow
def test_report_module_does_not_import_summarize():
    """report.py draws plain data from summarize.report_data: no import cycle."""
    code = "import sys; from util import report; assert 'summarize' not in sys.modules, 'report imported summarize'"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_report_never_replaces_a_report_md_the_user_wrote(tmp_path, capsys):
    write_run(tmp_path / "runs" / "r0", "CE", 0, evaluation(3, {"Forest": 60.0, "Water": 100.0}, 80.0, 70.0))
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("# my notes\n")
    with pytest.raises(SystemExit) as exit_:
        summarize.main([str(tmp_path / "runs"), "--report", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{out / 'report.md'} exists and was not written by summarize.py --report" in err
    assert (out / "report.md").read_text() == "# my notes\n"
    assert list(out.iterdir()) == [out / "report.md"]  # refused before any figure was written

    (out / "report.md").unlink()
    summarize.main([str(tmp_path / "runs"), "--report", str(out)])
    assert f"wrote {out / 'report.md'}" in capsys.readouterr().err
    summarize.main([str(tmp_path / "runs"), "--report", str(out)])  # its own earlier report: replaced, and said so
    assert f"replaced {out / 'report.md'} (written earlier by summarize.py --report)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- runs

def test_unfinished_runs_are_named_in_the_notes(tmp_path, capsys):
    write_run(tmp_path / "done", "CE", 0, evaluation(3, {"Forest": 60.0, "Water": 100.0}, 80.0, 70.0))
    for name in ("killed", "running"):
        (tmp_path / "sub" / name).mkdir(parents=True)
        (tmp_path / "sub" / name / "config.json").write_text(json.dumps({"name": "CE", "seed": 1}))
    summarize.main([str(tmp_path)])
    out = capsys.readouterr().out
    for name in ("killed", "running"):
        assert f"> Note: left out: {tmp_path / 'sub' / name} has no results.json (unfinished or killed)." in out
    assert out.count("left out:") == 2 and "| Forest | 60.00 |" in out
    assert summarize.find_unfinished([tmp_path / "done", tmp_path / "sub" / "killed"]) == [tmp_path / "sub" / "killed"]
    with pytest.raises(SystemExit) as exit_:  # nothing finished: the error names the unfinished runs
        summarize.main([str(tmp_path / "sub")])
    assert f"left out: {tmp_path / 'sub' / 'killed'} has no results.json" in str(exit_.value.code)


def test_runs_on_different_data_roots_are_different_configurations(tmp_path, capsys):
    e = evaluation(3, {"Forest": 60.0, "Water": 100.0}, 80.0, 70.0)
    write_run(tmp_path / "a0", "CE", 0, e, data_root="/data/dfc_a")
    write_run(tmp_path / "b0", "CE", 0, e, data_root="/data/dfc_b")
    # a seed that typed /data/dfc_a relatively: results.json keeps it as typed, config.json resolved it
    write_run(tmp_path / "a1", "CE", 1, e, data_root="/data/dfc_a")
    results = json.loads((tmp_path / "a1" / "results.json").read_text())
    results["config"]["data_root"] = "dfc_a"
    (tmp_path / "a1" / "results.json").write_text(json.dumps(results))
    summarize.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| class | CE (data_root=/data/dfc_a) | CE (data_root=/data/dfc_b) |" in out
    assert "| n (seeds) | 2 | 1 |" in out
    assert "> Note: DFC2020: 2 configurations named 'CE' differ in data_root;" in out


@pytest.mark.slow
def test_best_table_only_where_it_differs_from_the_last(tmp_path, capsys):
    first = evaluation(1, {"Forest": 50.0, "Water": 50.0}, 50.0, 50.0)
    second = evaluation(2, {"Forest": 70.0, "Water": 90.0}, 80.0, 75.0)
    for seed in (0, 1):  # DFC2020: the last evaluation is the best by AA for every run
        write_run(tmp_path / "dfc" / f"r{seed}", "CE", seed, second, metrics=[first, second])
    write_run(tmp_path / "meter" / "r0", "CE", 0, second, dataset="METER-ML", metrics=[first, second])
    third = evaluation(3, {"Forest": 60.0, "Water": 60.0}, 60.0, 60.0)  # METER-ML r1: best by OA at epoch 2, last at 3
    write_run(tmp_path / "meter" / "r1", "CE", 1, third, dataset="METER-ML", metrics=[first, second, third])
    summarize.main([str(tmp_path), "--report", str(tmp_path / "report")])
    out = capsys.readouterr().out
    text = (tmp_path / "report" / "report.md").read_text()
    for shown in (out, text):
        assert shown.count("### DFC2020:") == 1 and "Best epoch by AA = last epoch for every run: one table." in shown
        assert "### METER-ML: best epoch by OA" in shown and "Best epoch by OA" not in shown


# ----------------------------------------------------------------------------- figures

def figure_runs(tmp_path, labels_long=False):
    """Three configurations whose runs stopped after epoch 1 (one loss point, one evaluation);
    two of them with identical curves; a SupCon term that is NaN (no data to draw)."""
    suffix = "_with_a_rather_long_configuration_label" * labels_long
    for i, name in enumerate(("CE", "SupCon+CE", "SupCon+CE aug")):
        loss = 0.7 if i < 2 else 0.5
        write_run(tmp_path / f"r{i}", name + suffix, 0, evaluation(1, {"Forest": 60.0, "Water": 100.0}, 80.0, 70.0),
                  metrics=[{"epoch": 1, "train_loss": loss, "train_supcon": float("nan"), "AA": 80.0, "OA": 70.0}])
    datasets, _ = summarize.summarize(runs_in(tmp_path))
    return summarize.report_data(datasets)["DFC2020"]


def inside(inner, outer):
    """Box `inner` lies within box `outer` (display pixels, half a pixel of rounding allowed)."""
    return (inner.x0 >= outer.x0 - 0.5 and inner.y0 >= outer.y0 - 0.5
            and inner.x1 <= outer.x1 + 0.5 and inner.y1 <= outer.y1 + 0.5)


@pytest.mark.slow
def test_curves_mark_single_points_use_integer_epochs_and_keep_the_legend_inside(tmp_path):
    from util import report

    section = figure_runs(tmp_path, labels_long=True)
    fig = report.curves_figure("DFC2020", section["curves"])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["total training loss", "AA", "OA"]  # no panel for the NaN-only SupCon term
    for ax in axes:
        lines = ax.get_lines()
        assert len(lines) == 3 and all(len(line.get_xdata()) == 1 and line.get_marker() not in ("None", "", None)
                                       for line in lines)
        # the two identical curves still differ in marker, line style and fill
        styles = {(line.get_marker(), line.get_linestyle(), line.get_markerfacecolor() == "none") for line in lines}
        assert len(styles) == 3
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks == [1.0]
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert len(legend.get_texts()) == 3
    assert inside(box, fig.bbox)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in axes)
    report.save(fig, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.slow
def test_per_class_bars_reach_above_the_error_bars_and_name_sample_counts(tmp_path):
    from util import report

    matrices = ([[3, 1], [0, 6]], [[4, 0], [1, 5]])  # Forest 4 samples, Water 6, in each seed
    for seed, (forest, water) in enumerate(((94.0, 98.0), (100.0, 86.0))):
        write_run(tmp_path / f"r{seed}", "CE", seed,
                  evaluation(1, {"Forest": forest, "Water": water}, (forest + water) / 2, 90.0, confusion=matrices[seed]))
    datasets, _ = summarize.summarize(runs_in(tmp_path))
    bars = summarize.report_data(datasets)["DFC2020"]["bars"]
    assert bars["n"] == [[4, 4], [6, 6], None, None]
    fig = report.per_class_figure("DFC2020", bars)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Forest\n(n=4)", "Water\n(n=6)", "AA", "OA"]
    water = bars["mean"][0][1] + bars["std"][0][1]  # 92 + 8.49
    assert water > 100 and ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > water
    fig.canvas.draw()
    assert inside(fig.legends[0].get_window_extent(fig.canvas.get_renderer()), fig.bbox)
    report.save(fig, tmp_path / "bars.png")


def test_confusion_rows_name_their_sample_counts(tmp_path):
    from util import report

    confusion = summarize.confusion_of(fake_confusion_runs(tmp_path))
    fig = report.confusion_figure("DFC2020", "CE", confusion)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [
        "Forest (n=8)", "Water (n=10)", "Barren (n=4)", "Wetlands (n=0)"]
    report.save(fig, tmp_path / "confusion.png")


# ----------------------------------------------------------------------------- interpretation

@pytest.mark.slow
def test_interpretation_pairs_seeds_and_flags_unaligned_embeddings(tmp_path):
    def aa_run(folder, name, seed, aa, **flags):
        write_run(tmp_path / folder, name, seed, evaluation(1, {"Forest": aa, "Water": aa}, aa, aa),
                  dataset="METER-ML", **flags)

    for seed in (0, 1, 2):
        aa_run(f"fused_sup{seed}", "s1s2_fused SupCon+CE", seed, 70.0 + 2 * seed, scenario="s1s2_fused", use_sup_con=True)
        aa_run(f"fused_ce{seed}", "s1s2_fused CE", seed, 66.0 + seed, scenario="s1s2_fused", use_sup_con=False)
    for seed in (0, 1):  # seed 2 missing: paired over seeds 0 and 1
        aa_run(f"s1_sup{seed}", "s1 SupCon+CE", seed, 60.0, scenario="s1", use_sup_con=True)
    # differs in scenario AND augment: never compared with the fused runs
    aa_run("s2_aug0", "s2 SupCon+CE aug", 0, 10.0, scenario="s2", use_sup_con=True, augment=True)
    # paired 0.008 above random: within the margin of 0.01, flagged
    write_embedding(tmp_path / "fused_sup0", 80.0, 70.0, b"x", paired=0.86, random=0.852, across=(50.0, 52.0))
    write_embedding(tmp_path / "fused_ce0", 80.0, 70.0, b"y", paired=0.9, random=0.1, across=(78.0, 69.0))

    groups = summarize.summarize(runs_in(tmp_path))[0]["METER-ML"]
    found = [(d["flag"], d["a"], d["b"], d["seeds"], d["differences"], d["n"]) for d in summarize.paired_differences(groups)]
    assert found == [("scenario", "s1s2_fused SupCon+CE", "s1 SupCon+CE", [0, 1], [10.0, 12.0], 2),
                     ("use_sup_con", "s1s2_fused SupCon+CE", "s1s2_fused CE", [0, 1, 2], [4.0, 5.0, 6.0], 3)]

    text = summarize.interpretation_of("METER-ML", groups)
    assert "### METER-ML: interpretation" in text
    # t-tests by hand: t = 11 / (sqrt(2) / sqrt(2)) with 1 degree of freedom, p = 1 - 2 atan(t) / pi = 0.0577;
    # t = 5 / (1 / sqrt(3)) with 2, p = 1 - t / sqrt(t^2 + 2) = 0.0131. Wilcoxon, all differences positive: 2 / 2^n
    assert ("| s1s2_fused SupCon+CE | s1 SupCon+CE | scenario | 0: +10.00; 1: +12.00 | +11.00 | 1.41 | 2 "
            "| 0.058 | 0.500 | too few seeds to conclude (2 < 5) |") in text
    assert ("| s1s2_fused SupCon+CE | s1s2_fused CE | use_sup_con | 0: +4.00; 1: +5.00; 2: +6.00 | +5.00 | 1.00 | 3 "
            "| 0.013 | 0.250 | too few seeds to conclude (3 < 5) |") in text
    assert "s2 SupCon+CE aug" not in text
    assert ("In s1s2_fused SupCon+CE (seed 0) the S1 and S2 features of one sample are no closer (cosine 0.86) than "
            "those of random pairs (0.85; margin 0.01): the two encoders do not align the modalities.") in text
    assert ("In s1s2_fused SupCon+CE (seed 0) kNN accuracy across modalities (S1→S2 50.0%, S2→S1 52.0%) is 24.0 points "
            "below that within a modality (S1 80.0%, S2 70.0%)") in text
    assert "In s1s2_fused CE" not in text  # aligned (0.9 vs 0.1), and kNN across within 1.5 points

    summarize.main([str(tmp_path), "--report", str(tmp_path / "report")])
    assert text in (tmp_path / "report" / "report.md").read_text()


def test_the_reading_of_unaligned_embeddings_follows_the_loss_each_run_used(tmp_path):
    for folder, name, flags in [("sup", "s1s2_fused SupCon+CE", {"scenario": "s1s2_fused", "use_sup_con": True}),
                                ("ce", "s1s2_fused CE", {"scenario": "s1s2_fused", "use_sup_con": False}),
                                ("apart", "s1s2 SupCon+CE", {"scenario": "s1s2", "use_sup_con": True}),
                                ("one", "s1 CE", {"scenario": "s1", "use_sup_con": False})]:
        write_run(tmp_path / folder, name, 0, evaluation(1, {"Forest": 50.0, "Water": 50.0}, 50.0, 50.0),
                  dataset="METER-ML", **flags)
        write_embedding(tmp_path / folder, 80.0, 70.0, folder.encode(), paired=0.2, random=0.2, across=(80.0, 70.0))
    lines = {line.split(" (seed")[0][len("- In "):]: line
             for line in summarize.interpretation_of("METER-ML", summarize.summarize(runs_in(tmp_path))[0]["METER-ML"]).splitlines()
             if line.startswith("- In ")}
    assert "The run's SupCon had cross-modal positives" in lines["s1s2_fused SupCon+CE"]
    assert "CE alone" not in lines["s1s2_fused SupCon+CE"]
    assert "expected: the run's loss is CE alone" in lines["s1s2_fused CE"]
    assert "within each modality only (scenario s1s2)" in lines["s1s2 SupCon+CE"]
    assert "trained on S1 only" in lines["s1 CE"]


def test_a_truncated_results_json_is_named(tmp_path, capsys):
    write_run(tmp_path / "r0", "CE", 0, evaluation(1, {"Forest": 50.0, "Water": 70.0}, 60.0, 65.0))
    (tmp_path / "r0" / "results.json").write_text('{"dataset": "DFC2020", "las')  # killed while writing
    with pytest.raises(SystemExit) as exit_info:
        summarize.main([str(tmp_path)])
    assert f"{tmp_path / 'r0' / 'results.json'} is not valid JSON" in str(exit_info.value)


@pytest.mark.parametrize("differences, t_p, wilcoxon_p, conclusion", [
    # mean 3, std sqrt(2.5): t = 3 sqrt(2) with 4 degrees of freedom, two-sided p = 1 - t (t^2 + 6) / (t^2 + 4)^1.5
    ([1.0, 2.0, 3.0, 4.0, 5.0], 1 - 18 ** 0.5 * 24 / 22 ** 1.5, 2 / 32, "A > B (t-test p < 0.05)"),
    ([-1.0, -2.0, -3.0, -4.0, -5.0], 1 - 18 ** 0.5 * 24 / 22 ** 1.5, 2 / 32, "A < B (t-test p < 0.05)"),
    ([1.0, -1.0, 2.0, -2.0, 0.0], 1.0, 1.0, "no significant difference (t-test p ≥ 0.05)"),
    ([2.0] * 6, math.nan, 2 / 64, "p undefined: every seed gives the same difference"),
    ([4.0, 5.0, 6.0], 1 - 75 ** 0.5 / 77 ** 0.5, 2 / 8, "too few seeds to conclude (3 < 5)"),
    ([1.5], math.nan, 1.0, "too few seeds to conclude (1 < 5)"),
])
def test_paired_test_by_hand(differences, t_p, wilcoxon_p, conclusion):
    found = summarize.paired_test(differences)
    assert found["t_p"] == pytest.approx(t_p, nan_ok=True)
    assert found["wilcoxon_p"] == pytest.approx(wilcoxon_p) and found["conclusion"] == conclusion


def test_kappa_and_macro_f1_rows_and_the_printed_paired_comparison(tmp_path, capsys):
    for seed in range(5):
        for name, aa, kappa, sup in (("SupCon+CE", 70.0 + seed, 0.5 + seed / 100, True), ("CE", 60.0, 0.4, False)):
            last = {**evaluation(3, {"Forest": aa, "Water": aa}, aa, aa), "kappa": kappa, "macro_F1": aa - 1}
            write_run(tmp_path / f"{name}{seed}", name, seed, last, use_sup_con=sup)
    # a run that recorded no kappa and F1
    write_run(tmp_path / "old", "old", 0, evaluation(3, {"Forest": 1.0, "Water": 1.0}, 1.0, 1.0))
    summarize.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| **kappa** | **0.400 ± 0.000** | **0.520 ± 0.016** | **–** |" in out  # stdev of 0.50 ... 0.54 = 0.0158
    assert "| **macro F1** | **59.00 ± 0.00** | **71.00 ± 1.58** | **–** |" in out
    assert "### DFC2020: paired comparisons" in out
    assert ("| SupCon+CE | CE | use_sup_con | 0: +10.00; 1: +11.00; 2: +12.00; 3: +13.00; 4: +14.00 "
            "| +12.00 | 1.58 | 5 |") in out
    t = 12 / (2.5 ** 0.5 / 5 ** 0.5)  # 4 degrees of freedom: p = 1 - t (t^2 + 6) / (t^2 + 4)^1.5 = 7.1e-05
    assert f"| {1 - t * (t * t + 6) / (t * t + 4) ** 1.5:.1e} | 0.062 | A > B (t-test p < 0.05) |" in out
    groups = summarize.group_runs(runs_in(tmp_path))["DFC2020"]
    assert summarize.bars_of(groups)["rows"] == ["Forest", "Water", "AA", "OA"]  # the accuracy figure keeps its rows


def test_manifest_runs_get_their_own_tables_titled_by_the_manifests_name(tmp_path, capsys):
    last = evaluation(3, {"Forest": 60.0, "Water": 100.0}, 80.0, 70.0)
    write_run(tmp_path / "dfc", "CE", 0, last)
    write_run(tmp_path / "own", "CE", 0, last, dataset="manifest")
    results = json.loads((tmp_path / "own" / "results.json").read_text())
    (tmp_path / "own" / "results.json").write_text(json.dumps({**results, "manifest": "rice.csv"}))
    write_run(tmp_path / "older", "CE", 1, last, data_root="/data/fields.csv")  # before "manifest" was recorded
    assert set(summarize.group_runs(runs_in(tmp_path))) == {"DFC2020", "manifest rice.csv", "manifest fields.csv"}
    summarize.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "### manifest rice.csv: last epoch" in out and "### manifest fields.csv: last epoch" in out


def test_the_per_class_legend_leaves_the_title_clear():
    from util.report import per_class_figure

    rows = ["Forest", "Shrubland", "Grassland", "Water", "AA", "OA"]
    labels = ["frozen CE", "frozen SupCon+CE", "fine-tuned CE", "fine-tuned SupCon+CE"]
    bars = {"rows": rows, "labels": labels, "mean": [[60.0] * 6] * 4, "std": [[2.0] * 6] * 4}
    fig = per_class_figure("DFC2020", bars, published=True)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title = fig.axes[0].title.get_window_extent(renderer)
    legend = fig.legends[0].get_window_extent(renderer)
    assert not title.overlaps(legend) and not fig.axes[0].get_window_extent(renderer).overlaps(legend)
