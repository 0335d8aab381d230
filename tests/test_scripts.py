"""End-to-end runs of the three scripts on tiny synthetic data (CPU, a few steps each)."""
import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

import dfc_finetune
import engine
import meterml_finetune
import meterml_pretrain
import models
from datasets import DFC2020Dataset, MeterMLDataset, balanced_indices
from helpers import read_jsonl, ssl4eo_file
from losses import SupConCELoss
from models import CheckpointError, DualEncoder, DualResNet, SharedNet, load_checkpoint
from synthetic_data import write_dfc2020, write_manifest, write_meterml
from util import checkpoint, cli, process
from util.rundir import RunFolderError

REPO = Path(__file__).resolve().parents[1]
FAST = ["--workers", "0", "--batch_size", "8", "--epochs", "1"]
SHARED = ["--model", "shared"]  # half the parameters of the dual encoder: faster steps and checkpoints
MOMENTUM = ["--momentum", "0.9"]  # optimizer state for the resume tests to restore (plain SGD keeps none)


@pytest.fixture(scope="module")
def meter_root(tmp_path_factory):
    return write_meterml(tmp_path_factory.mktemp("meter"), n=20, seed=0)  # 16 train (2 steps of FAST), 4 val


@pytest.fixture(scope="module")
def dfc_root(tmp_path_factory):
    return write_dfc2020(tmp_path_factory.mktemp("dfc"), n_validation=12, n_test=6, seed=0, size=64)


@pytest.fixture(scope="module")
def s1_run(meter_root, tmp_path_factory):
    """One finished 1-epoch run that several tests read or copy (a copy costs less than a run): (argv without
    --save_path, results, run folder)."""
    argv = ["random", "--data_root", str(meter_root), *FAST, *SHARED, *MOMENTUM, "--scenario", "s1", "--eval_every",
            "1", "--no-save_best"]
    run = tmp_path_factory.mktemp("s1_run") / "run"
    return argv, meterml_finetune.main([*argv, "--save_path", str(run)]), run


@pytest.fixture(scope="module")
def pretrain_run(meter_root, tmp_path_factory):
    """meterml_pretrain.py runs by their flags, each run once per test process: flags -> run folder."""
    @functools.cache
    def run(*flags):
        folder = tmp_path_factory.mktemp("pretrain") / "run"
        meterml_pretrain.main(["--data_root", str(meter_root), "--save_path", str(folder), *FAST, *flags])
        return folder
    return run


@functools.cache
def shared_net_state():
    """A SharedNet's state dict, built once per process (66 M parameters take a second to initialise)."""
    return SharedNet().state_dict()


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "epoch_s")} for r in records]


def reevaluate(run, root, scenario, model):
    """Predictions of last.pt on the val split, computed here from the checkpoint alone."""
    state = torch.load(run / "last.pt", weights_only=False)
    encoder = SharedNet() if model == "shared" else DualEncoder()
    encoder.load_state_dict(state["state_dict"])
    heads = meterml_finetune.build_heads(scenario, 7)
    heads.load_state_dict(state["heads"])
    encoder.eval(), heads.eval()
    val = MeterMLDataset(root, "val")
    batch = torch.utils.data.default_collate([val[i] for i in range(len(val))])
    with torch.no_grad():
        z = {m: encoder(batch[m]) for m in ("s1", "s2")}
        if scenario == "s1s2_fused":
            probs = heads["fused"](torch.cat([z["s1"], z["s2"]], 1)).softmax(1)
        else:
            probs = torch.stack([heads[m](z[m]).softmax(1) for m in meterml_finetune.MODALITIES[scenario]]).mean(0)
    return batch["label"], probs.argmax(1)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [  # --data_ratio 0.5: one training step
    ["--scenario", "s1", "--no-exclude_negatives", "--data_ratio", "0.5"],
    ["--scenario", "s2", "--use_augs", "--use_sup_con", "--data_ratio", "0.5", *SHARED],
    ["--scenario", "s1s2", "--use_augs", "--use_sup_con", "--dont_include_negatives", "--data_ratio", "0.5", *SHARED],
    ["--scenario", "s1s2_fused", "--use_sup_con", "--ce_from", "joint", "--data_ratio", "0.5", *SHARED],
    ["--scenario", "s1s2_fused", "--eval_mode", "linear", "--data_ratio", "0.5", "--no-exclude_negatives", *SHARED],
])
def test_meterml_finetune_runs(meter_root, tmp_path, flags):
    run = tmp_path / "run"
    results = meterml_finetune.main(["random", "--data_root", str(meter_root), "--save_path", str(run), *FAST, *flags])
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.jsonl", "last.pt", "best.pt", "results.json", "data_report.json"}
    scenario = flags[flags.index("--scenario") + 1]
    model = "shared" if "shared" in flags else "dual"
    truth, pred = reevaluate(run, meter_root, scenario, model)
    excluded = "--no-exclude_negatives" not in flags  # excluded by default, as the original's recorded run
    counted = truth != 3 if excluded else torch.ones_like(truth, dtype=torch.bool)
    last = results["last"]
    assert last["epoch"] == 1 and last["n"] == int(counted.sum()) and last["ignored"] == len(truth) - last["n"]
    assert last["OA"] == pytest.approx(100 * (pred == truth)[counted].float().mean().item())
    assert ("Negative" not in last["per_class"]) == excluded
    record = read_jsonl(run / "metrics.jsonl")[0]
    assert ("train_supcon" in record) == ("--use_sup_con" in flags) and record["samples_per_s"] > 0
    encoder = SharedNet() if model == "shared" else DualEncoder()
    assert load_checkpoint(encoder, run / "last.pt") == ([], [])  # our checkpoints keep the released layout
    heads = {"s1": ["s1"], "s2": ["s2"], "s1s2": ["s1", "s2"], "s1s2_fused": ["fused"]}[scenario]
    best = torch.load(run / "best.pt", weights_only=True)
    assert set(best["heads"]) == {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    assert "optimizer" not in best  # the best checkpoint is for use, not for resuming
    config = json.loads((run / "config.json").read_text())
    assert config["device"] == "cpu" and config["workers"] == 0 and config["amp"] is False


@pytest.mark.slow
def test_linear_eval_changes_only_the_heads(meter_root, tmp_path):
    weights = tmp_path / "init.pth"
    torch.manual_seed(0)
    torch.save(SharedNet().state_dict(), weights)
    run = tmp_path / "run"
    meterml_finetune.main([str(weights), "--data_root", str(meter_root), "--save_path", str(run), *FAST, *SHARED,
                           "--eval_mode", "linear", "--no-save_best"])
    before, after = torch.load(weights), torch.load(run / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included


@pytest.mark.slow
@pytest.mark.parametrize("flags", [  # --data_ratio 0.5: one training step
    ["--data_ratio", "0.5"],
    ["--use_pairs", "--data_ratio", "0.5", *SHARED],
    ["--use_pairs", "--no_augs", "--use_negative_labels", "--data_ratio", "0.5", *SHARED],
    ["--scenario", "s2", "--data_ratio", "0.5", *SHARED],
])
def test_meterml_pretrain_runs(pretrain_run, flags):
    run = pretrain_run(*flags)
    loss = read_jsonl(run / "metrics.jsonl")[0]["train_loss"]
    assert loss > 0 and loss == loss
    encoder = SharedNet() if "shared" in flags else DualEncoder()
    assert load_checkpoint(encoder, run / "encoder.pth") == ([], [])


@pytest.mark.slow
def test_pretrained_encoder_feeds_finetuning(meter_root, pretrain_run, tmp_path):
    encoder = pretrain_run("--use_pairs", "--data_ratio", "0.5", *SHARED) / "encoder.pth"  # test_meterml_pretrain_runs
    pre = SharedNet()
    load_checkpoint(pre, encoder)
    meterml_finetune.main([str(encoder), "--data_root", str(meter_root), "--save_path", str(tmp_path / "ft"), *FAST,
                           *SHARED, "--lr", "0", "--no-save_best"])
    tuned = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)["state_dict"]
    # lr 0: the encoder's weights are the pre-trained ones (batch-norm statistics move, weights do not)
    assert all(torch.equal(v, tuned[k]) for k, v in pre.state_dict().items() if k.endswith("weight"))


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--use_sup_con", "--finetune", "--eval_crop", "48"],
                                   ["--balanced_class", "--eval_crop", "0", "--data_ratio", "0.75"]])
def test_dfc_finetune_runs(dfc_root, tmp_path, flags):
    run = tmp_path / "run"
    results = dfc_finetune.main(["--data_root", str(dfc_root), "--save_path", str(run), "--arch", "resnet18",
                                 "--crop", "32", "--workers", "0", "--batch_size", "4", "--epochs", "1", *flags])
    assert len(results["last"]["per_class"]) == 8 and results["dataset"] == "DFC2020"
    confusion = torch.tensor(results["last"]["confusion"])
    assert confusion.sum() == results["last"]["n"] and results["last"]["n"] + results["last"]["ignored"] == 6
    assert results["last"]["OA"] == pytest.approx(100 * confusion.diag().sum().item() / confusion.sum().item())
    missing, unexpected = load_checkpoint(DualResNet("resnet18"), run / "last.pt")
    assert (missing, unexpected) == ([], [])
    assert torch.load(run / "last.pt", weights_only=False)["arch"] == "resnet18"
    if "--balanced_class" in flags:  # the first 9 of the 12 patches, each copied by its class's count
        n = len(balanced_indices(DFC2020Dataset(dfc_root).patch_labels()[:9]))
    else:
        n = 12
    steps = n // 4 + (n % 4 > 1)  # the last partial batch is kept, unless it holds a single sample
    assert torch.load(run / "last.pt", weights_only=False)["optimizer"]["state"][0]["step"].item() == steps


@pytest.mark.slow
def test_frozen_dfc_backbone_trains_the_classifier_at_lr(dfc_root, tmp_path, caplog):
    """Without --finetune the original trains the classifier at --lr (1e-5), its batch norm in
    training mode; its recorded run adds SupCon, which then moves only batch-norm statistics."""
    torch.manual_seed(0)
    init = tmp_path / "init.pth"
    torch.save({"state_dict": DualResNet("resnet18").state_dict()}, init)
    argv = ["--data_root", str(dfc_root), "--arch", "resnet18", "--model_path", str(init), "--crop", "32",
            "--eval_crop", "0", "--workers", "0", "--batch_size", "4", "--epochs", "1"]
    dfc_finetune.main([*argv, "--save_path", str(tmp_path / "ce")])
    with caplog.at_level("INFO", logger="dfc_finetune"):
        results = dfc_finetune.main([*argv, "--use_sup_con", "--save_path", str(tmp_path / "supcon")])
    assert "SupCon trains no parameter" in caplog.text and results["name"] == "frozen SupCon+CE"
    before = torch.load(init, weights_only=True)["state_dict"]
    ce, supcon = (torch.load(tmp_path / run / "last.pt", weights_only=False) for run in ("ce", "supcon"))
    for state in (ce, supcon):
        assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [1e-5]
        assert torch.equal(before["backbone1.conv1.weight"], state["state_dict"]["backbone1.conv1.weight"])
        assert not torch.equal(before["backbone1.bn1.running_mean"], state["state_dict"]["backbone1.bn1.running_mean"])
        assert not torch.equal(before["fc.weight"], state["state_dict"]["fc.weight"])
    # SupCon's joint pass over (augmented, original) moved the running statistics further
    assert not torch.equal(ce["state_dict"]["backbone1.bn1.running_mean"], supcon["state_dict"]["backbone1.bn1.running_mean"])


@pytest.mark.parametrize("script, argv, message", [
    (meterml_pretrain, ["--no_augs"], "no positive pair"),
    (meterml_pretrain, ["--scenario", "s1", "--use_pairs"], "one modality"),
    (meterml_pretrain, ["--use_negative_labels", "--exclude_negatives"], "choose one"),
    (meterml_finetune, ["random", "--use_sup_con", "--eval_mode", "linear"], "frozen"),
    (meterml_finetune, [], "MODEL_WEIGHTS) is required"),
    (dfc_finetune, ["--use_sup_con", "--frozen_bn_eval"], "would change nothing"),
    (dfc_finetune, ["--eval_split", "validation"], "--allow_same_split"),
    (dfc_finetune, ["--model_path", "w.pth", "--s2_backbone", "s2.pth"], "give one of the two"),
    (dfc_finetune, ["--backbones", "ssl4eo-moco", "--s1_backbone", "s1.pth"], "not both"),
    (dfc_finetune, ["--backbones", "ssl4eo-moco", "--arch", "resnet18"], "pass --arch resnet50"),
    (dfc_finetune, ["--fresh_first_conv", "--model_path", "random"], "changes nothing without pre-trained weights"),
    (dfc_finetune, ["--normalize", "imagenet"], "--normalize: invalid choice"),
    (meterml_pretrain, ["--no_augs", "--use_pairs", "--two_augmented_views"], "nothing to augment"),
])
def test_invalid_flag_combinations_are_refused(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_a_kill_matches_an_uninterrupted_run(meter_root, tmp_path, monkeypatch):
    argv = ["random", "--data_root", str(meter_root), "--scenario", "s1", "--use_augs", "--use_sup_con", *SHARED,
            "--batch_size", "8", "--epochs", "2", "--momentum", "0.9", "--eval_every", "1", "--no-save_best"]
    whole = meterml_finetune.main([*argv, "--workers", "0", "--save_path", str(tmp_path / "whole")])

    real_step, calls = torch.optim.SGD.step, []

    def killed_mid_epoch_two(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:  # 2 steps per epoch: the second step of epoch 2
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", killed_mid_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        meterml_finetune.main([*argv, "--workers", "0", "--save_path", str(tmp_path / "killed")])
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)
    assert not (tmp_path / "killed" / "results.json").exists()
    # Resumed in worker processes: the keyed randomness does not care who loads a sample.
    resumed = meterml_finetune.main(["--resume", str(tmp_path / "killed"), "--workers", "2"])

    assert resumed["last"] == whole["last"]
    assert without_timing(read_jsonl(tmp_path / "killed" / "metrics.jsonl")) == without_timing(read_jsonl(tmp_path / "whole" / "metrics.jsonl"))
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.slow
def test_resume_can_extend_a_finished_run(s1_run, tmp_path):
    argv, _, one = s1_run
    two = meterml_finetune.main([*argv, "--epochs", "2", "--save_path", str(tmp_path / "two")])
    shutil.copytree(one, tmp_path / "one")
    extended = meterml_finetune.main(["--resume", str(tmp_path / "one"), "--epochs", "2"])
    assert extended["last"] == two["last"]


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_batch_ids(meter_root, tmp_path, monkeypatch):
    real = SupConCELoss.forward
    calls = []

    def poisoned(self, *a, **k):
        terms = real(self, *a, **k)
        calls.append(1)
        if len(calls) in (1, 5):  # the first call of the first run; the second step of epoch 2 of the second
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(SupConCELoss, "forward", poisoned)
    argv = ["random", "--data_root", str(meter_root), *FAST, *SHARED, "--scenario", "s1", "--epochs", "3"]
    with pytest.raises(engine.NonFiniteLossError, match="No checkpoint was written"):
        meterml_finetune.main([*argv, "--save_path", str(tmp_path / "first")])
    run = tmp_path / "run"
    with pytest.raises(engine.NonFiniteLossError, match=r"epoch 2, batch 1 .*sample ids \['") as error:
        meterml_finetune.main([*argv, "--save_path", str(run)])
    assert "--resume" in str(error.value)
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 1  # the last good epoch


@pytest.mark.slow
def test_a_folder_holding_a_run_is_refused_before_anything_changes(s1_run, tmp_path):
    shutil.copytree(s1_run[2], tmp_path / "run")
    argv = [*s1_run[0], "--save_path", str(tmp_path / "run")]
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(RunFolderError, match="holds a run"):
        meterml_finetune.main([*argv, "--lr", "0.5"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    # --overwrite checks everything before it deletes
    with pytest.raises(CheckpointError, match="missing.pth"):
        meterml_finetune.main([*argv, "--overwrite", "--model_path", str(tmp_path / "missing.pth")][1:])
    with pytest.raises(ValueError, match="keeps int"):
        meterml_finetune.main([*argv, "--overwrite", "--data_ratio", "0.01"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name != "run.lock"} == {
        k: v for k, v in before.items() if k != "run.lock"}
    results = meterml_finetune.main([*argv, "--lr", "0.5", "--overwrite"])
    assert results["config"]["lr"] == 0.5 and len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 1


@pytest.mark.slow
def test_resume_of_a_run_killed_in_its_first_epoch_starts_over(s1_run, tmp_path):
    _, whole, run = s1_run  # a --no-save_best run
    shutil.copytree(run, tmp_path / "killed")
    assert not (tmp_path / "killed" / "best.pt").exists()
    (tmp_path / "killed" / "last.pt").unlink()
    (tmp_path / "killed" / "results.json").unlink()
    resumed = meterml_finetune.main(["--resume", str(tmp_path / "killed")])
    assert resumed["last"] == whole["last"]
    assert len(read_jsonl(tmp_path / "killed" / "metrics.jsonl")) == 1


class Payload:
    """A pickled object that would run code when unpickled with weights_only=False."""

    def __reduce__(self):
        return (print, ("this ran",))


def pickled(protocol):
    """A checkpoint holding an argparse.Namespace beside the weights, pickled with `protocol`."""
    return lambda path: torch.save({"state_dict": shared_net_state(), "args": argparse.Namespace(lr=0.1)}, path,
                                   pickle_protocol=protocol)


@pytest.mark.parametrize("content, message", [
    (None, "not found"), (b"", "empty"), (b"PK\x03\x04 cut", "is not a PyTorch checkpoint, or is truncated"),
    (pickled(2), r"holds pickled Python objects \(argparse.Namespace\), which were not loaded"),
    (pickled(4), r"holds pickled Python objects \(argparse.Namespace\), which were not loaded"),
    (lambda path: torch.save(shared_net_state(), path, pickle_protocol=4), "pickled with protocol 4"),
])
def test_bad_checkpoints_are_named_before_the_run_folder_exists(meter_root, tmp_path, content, message):
    weights = tmp_path / "weights.pth"
    if callable(content):
        content(weights)
    elif content is not None:
        weights.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as error:
        meterml_finetune.main([str(weights), "--data_root", str(meter_root), *FAST, *SHARED,
                               "--save_path", str(tmp_path / "run")])
    assert str(weights) in str(error.value) and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_epoch_without_any_ce_target_is_an_error(dfc_root, tmp_path, monkeypatch):
    real = DFC2020Dataset.__getitem__
    monkeypatch.setattr(DFC2020Dataset, "__getitem__", lambda self, i: {**real(self, i), "label": 255})
    with pytest.raises(engine.NoTargetError, match="no training sample had a cross-entropy target"):
        dfc_finetune.main(["--data_root", str(dfc_root), "--save_path", str(tmp_path / "run"), "--arch", "resnet18",
                           "--crop", "32", "--eval_crop", "0", "--workers", "0", "--batch_size", "4", "--epochs", "1"])


def recorded_commands(script, cwd=None, **env):
    """The commands a recorded shell script runs, with the script's path as its name."""
    done = subprocess.run(["bash", str(REPO / script)], env={**os.environ, "PYTHON": "echo", "SEEDS": "3", **env},
                          capture_output=True, text=True, check=True, cwd=cwd)
    return [[Path(words[0]).name, *words[1:]] for words in (line.split() for line in done.stdout.splitlines())]


def test_recorded_meterml_experiment_is_the_originals():
    ce, supcon, augmented, summary = recorded_commands("meterml_finetune.sh", WEIGHTS="w.pth")
    assert ce[0] == supcon[0] == augmented[0] == "meterml_finetune.py" and summary[0] == "summarize.py"
    parse = meterml_finetune.build_parser().parse_args
    ce_args, sup_args, aug_args = parse(ce[1:]), parse(supcon[1:]), parse(augmented[1:])
    for args in (ce_args, sup_args, aug_args):  # the original's command line, then its defaults
        assert (args.model_path, args.arch, args.scenario, args.finetune) == ("w.pth", "dual", "s1s2_fused", True)
        assert args.exclude_negatives and (args.epochs, args.batch_size, args.lr, args.seed) == (121, 32, 0.01, 3)
        assert (args.data_ratio, args.subset, args.ce_from, args.eval_dense_after) == (1.0, "first", "separate", 79)
        assert not args.amp and args.augment_impl == "torchvision" and not args.drop_repeated
    assert not ce_args.use_sup_con and sup_args.use_sup_con and (sup_args.sup_weight, sup_args.ce_weight) == (1.0, 1.0)
    assert not sup_args.augment and aug_args.augment and aug_args.use_sup_con  # the recorded run first, the variant after
    assert len(recorded_commands("meterml_finetune.sh", VARIANTS="0")) == 3
    fast = [parse(c[1:]) for c in recorded_commands("meterml_finetune.sh", FAST="1")[:3]]
    assert all(a.amp and a.ce_from == "joint" for a in fast)


def test_recorded_dfc_experiment_is_the_originals():
    commands = recorded_commands("dfc_finetune.sh", WEIGHTS="random")
    assert [c[0] for c in commands] == ["dfc_finetune.py"] * 4 + ["summarize.py"]
    parsed = [dfc_finetune.build_parser().parse_args(c[1:]) for c in commands[:4]]
    # the original's recorded invocation (frozen: no --finetune) with its CE baseline, then the fine-tuned variant
    assert [(a.finetune, a.use_sup_con) for a in parsed] == [(False, False), (False, True), (True, False), (True, True)]
    assert [dfc_finetune.config_name(a) for a in parsed] == ["frozen CE", "frozen SupCon+CE", "fine-tuned CE",
                                                             "fine-tuned SupCon+CE"]
    for args in parsed:
        assert args.model_path is None and not args.frozen_bn_eval and not args.amp and args.ce_from == "separate"
        assert (args.arch, args.crop, args.eval_crop, args.epochs, args.batch_size) == ("resnet50", 224, 224, 201, 32)
        assert (args.lr, args.head_lr, args.weight_decay, args.eval_dense_after) == (1e-5, 3e-6, 1e-3, 150)
        assert (args.sup_weight, args.ce_weight, args.balanced_class, args.augment_impl) == (1.0, 1.0, None, "torchvision")
    assert "--model_path" in recorded_commands("dfc_finetune.sh", WEIGHTS="w.pth")[0]
    assert len(recorded_commands("dfc_finetune.sh", VARIANTS="0")) == 3


@pytest.mark.slow
def test_train_val_overlap_is_an_error_unless_allowed(tmp_path):
    root = write_meterml(tmp_path / "meter", n=20, seed=0)
    train = json.loads((root / "train_dataset.geojson").read_text())
    val = json.loads((root / "val_dataset.geojson").read_text())
    train["features"].append(val["features"][0])  # a val image set listed in train too
    (root / "train_dataset.geojson").write_text(json.dumps(train))
    argv = ["random", "--data_root", str(root), *FAST, *SHARED, "--scenario", "s1", "--save_path", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=r"1 image sets are in both the train and the val split .*site_000016"):
        meterml_finetune.main(argv)
    assert not (tmp_path / "run").exists()
    last = meterml_finetune.main([*argv, "--allow_split_overlap", "--epochs", "1"])["last"]
    assert last["n"] + last["ignored"] == 4  # every val image set evaluated; negatives excluded by default


@pytest.mark.parametrize("flags", [["--crop", "96"], ["--crop", "32", "--eval_crop", "80"]])
def test_a_crop_larger_than_the_patches_is_one_sentence_before_the_run_folder(dfc_root, tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as exit_info:
        dfc_finetune.main(["--data_root", str(dfc_root), "--save_path", str(tmp_path / "run"), *flags])
    assert exit_info.value.code == 2 and not (tmp_path / "run").exists()
    err = capsys.readouterr().err
    assert re.search(r"a crop of (96|80) px does not fit the 64 x 64 px patches of", err) and "Traceback" not in err


@pytest.mark.slow
def test_non_finite_pixels_are_reported_per_file_and_in_results(tmp_path):
    root = write_dfc2020(tmp_path / "dfc", n_validation=8, n_test=4, seed=1, size=32)
    files = sorted((root / "ROIs0000_validation" / "s1_validation").glob("*.tif"))[:4]
    for k, path in enumerate(files):
        with rasterio.open(path, "r+") as src:
            band = src.read(1)
            band[0, : k + 1] = [np.nan, np.inf, -np.inf, np.inf][: k + 1]
            src.write(band, 1)
    results = dfc_finetune.main(["--data_root", str(root), "--save_path", str(tmp_path / "run"), "--arch", "resnet18",
                                 "--crop", "32", "--eval_crop", "0", "--workers", "0", "--batch_size", "4", "--epochs", "1"])
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["nonfinite_values"]["validation"]
    for path in files:
        assert path.name in "".join(report)  # every file named
    written = sum(1 for k in range(4) for v in [np.nan, np.inf, -np.inf, np.inf][: k + 1] if np.isinf(v))
    totals = results["data"]["nonfinite_values"]["validation"]
    assert totals["files"] >= 4 and totals["+inf"] + totals["-inf"] >= written


def test_recorded_scripts_read_relative_paths_from_the_callers_folder(tmp_path):
    commands = recorded_commands("dfc_finetune.sh", cwd=tmp_path, DATA="mydata", OUT="myruns", WEIGHTS="w.pth", VARIANTS="0")
    args = dfc_finetune.build_parser().parse_args(commands[0][1:])
    assert (str(args.data_root), args.model_path, str(args.save_path)) == ("mydata", "w.pth", "myruns/frozen-ce-seed3")
    done = subprocess.run(["bash", str(REPO / "dfc_finetune.sh")], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": "echo", "SEEDS": "3"})
    assert str(REPO / "dfc_finetune.py") in done.stdout  # the script by its absolute path, run from the caller's folder


@pytest.mark.slow
def test_ignored_labels_are_counted_and_undocumented_codes_refused_before_the_run_folder(tmp_path, caplog, capsys):
    root = write_dfc2020(tmp_path / "dfc", n_validation=6, n_test=3, seed=2, size=32)
    labels = sorted((root / "ROIs0000_validation" / "dfc_validation").glob("*.tif"))
    for path in labels[:2]:  # a class relabelled into code 3 (Savanna), which DFC2020's 8 classes ignore
        with rasterio.open(path, "r+") as src:
            src.write(np.full((32, 32), 3, np.uint8), 1)
    argv = ["--data_root", str(root), "--arch", "resnet18", "--crop", "16", "--eval_crop", "0", "--workers", "0",
            "--batch_size", "4", "--epochs", "1"]
    dfc_finetune.main([*argv, "--save_path", str(tmp_path / "run")])
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["labels"]["validation"]
    assert report["ignored_label_patches"] >= 2 and report["ignored_pixels_by_code"]["3"] >= 2 * 32 * 32
    assert re.search(r"validation split: \d+ of 6 patches have an ignored majority label", caplog.text)
    test_label = sorted((root / "ROIs0000_test" / "dfc_0").glob("*.tif"))[-1]
    with rasterio.open(test_label, "r+") as src:
        src.write(np.full((32, 32), 42, np.uint8), 1)
    with pytest.raises(SystemExit) as exit_info:
        dfc_finetune.main([*argv, "--save_path", str(tmp_path / "run2")])
    assert exit_info.value.code == 2 and not (tmp_path / "run2").exists()
    assert "42: 1024" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pre-trained backbones

DFC_TINY = ["--arch", "resnet18", "--crop", "32", "--eval_crop", "0", "--workers", "0", "--batch_size", "4",
            "--epochs", "1"]


def frozen_weights_equal(state: dict, prefix: str, file: dict) -> bool:
    """The file's tensors in `state` under `prefix`, batch-norm running statistics aside (they move)."""
    return all(torch.equal(state[prefix + k], v) for k, v in file.items()
               if "running" not in k and "num_batches" not in k)


@pytest.mark.slow
def test_dfc_finetune_starts_from_ssl4eo_layout_files(dfc_root, tmp_path):
    s1, s2 = ssl4eo_file(tmp_path / "s1.pth", 2, seed=1), ssl4eo_file(tmp_path / "s2.pth", 13, seed=2)
    run = tmp_path / "run"
    results = dfc_finetune.main(["--data_root", str(dfc_root), "--save_path", str(run), *DFC_TINY, "--use_sup_con",
                                 "--s1_backbone", str(tmp_path / "s1.pth"), "--s2_backbone", str(tmp_path / "s2.pth"),
                                 "--normalize", "ssl4eo"])
    config = json.loads((run / "config.json").read_text())
    assert (config["normalize"], config["backbones"], config["fresh_first_conv"]) == ("ssl4eo", None, False)
    assert config["s1_backbone"] == str(tmp_path / "s1.pth") and config["s2_backbone"] == str(tmp_path / "s2.pth")
    state = torch.load(run / "last.pt", weights_only=False)["state_dict"]
    assert frozen_weights_equal(state, "backbone1.", s1) and frozen_weights_equal(state, "backbone2.", s2)
    last = results["last"]
    assert -1 <= last["kappa"] <= 1 and 0 <= last["macro_F1"] <= 100
    assert {"kappa", "macro_F1"} <= set(read_jsonl(run / "metrics.jsonl")[-1])


@pytest.mark.slow
def test_dfc_finetune_downloads_named_backbones_with_the_fetch_mocked(dfc_root, tmp_path, monkeypatch, caplog):
    import hashlib

    files = {"s1": ssl4eo_file(tmp_path / "s1.pth", 2, seed=0), "s2": ssl4eo_file(tmp_path / "s2.pth", 13, seed=1)}
    data = {m: (tmp_path / f"{m}.pth").read_bytes() for m in files}
    urls = {m: f"https://example.org/{m}-{hashlib.sha256(b).hexdigest()[:8]}.pth" for m, b in data.items()}
    monkeypatch.setitem(models.PRETRAINED_BACKBONES, "ssl4eo-moco", urls)
    monkeypatch.setattr(dfc_finetune, "PRETRAINED_ARCH", "resnet18")  # resnet18 files here: a fast run of the same path
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(checkpoint, "fetch", lambda url, path, progress: path.write_bytes(data[url.split("/")[-1][:2]]))
    run = tmp_path / "run"
    with caplog.at_level("INFO"):
        dfc_finetune.main(["--data_root", str(dfc_root), "--save_path", str(run), *DFC_TINY,
                           "--backbones", "ssl4eo-moco"])
    cached = sorted(p.name for p in (tmp_path / "hub" / "checkpoints").iterdir())
    assert cached == sorted(u.rsplit("/", 1)[1] for u in urls.values())
    assert json.loads((run / "config.json").read_text())["backbones"] == "ssl4eo-moco"
    state = torch.load(run / "last.pt", weights_only=False)["state_dict"]
    assert frozen_weights_equal(state, "backbone1.", files["s1"])
    assert frozen_weights_equal(state, "backbone2.", files["s2"])
    assert "trained on SSL4EO-S12 inputs scaled as --normalize ssl4eo; this run feeds --normalize seed" in caplog.text
    assert "The classifier (fc) starts fresh" in caplog.text
    assert "projection heads start fresh and stay frozen" in caplog.text


@pytest.mark.slow
def test_weights_for_other_band_counts_are_refused_before_the_run_folder(dfc_root, tmp_path, capsys):
    ssl4eo_file(tmp_path / "s2_12.pth", 12)
    argv = ["--data_root", str(dfc_root), *DFC_TINY, "--s2_backbone", str(tmp_path / "s2_12.pth")]
    with pytest.raises(SystemExit) as exit_info:
        dfc_finetune.main([*argv, "--save_path", str(tmp_path / "refused")])
    assert exit_info.value.code == 2 and not (tmp_path / "refused").exists()
    assert (f"{tmp_path / 's2_12.pth'}: its S2 first layer (conv1.weight) takes 12 bands, but the data has 13 S2 "
            "bands; --fresh_first_conv starts that layer afresh") in capsys.readouterr().err
    dfc_finetune.main([*argv, "--fresh_first_conv", "--finetune", "--save_path", str(tmp_path / "fresh")])
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["fresh_first_conv"] is True

    # a whole dual ResNet for 13 S2 bands, and a 12-band L2A manifest
    torch.save({"state_dict": DualResNet("resnet18").state_dict()}, tmp_path / "dual13.pth")
    pairs = write_manifest(tmp_path / "own", n=10, size=32)
    with pytest.raises(SystemExit):
        dfc_finetune.main(["--data_root", str(pairs), "--train_split", "train", "--eval_split", "val", *DFC_TINY,
                           "--model_path", str(tmp_path / "dual13.pth"), "--save_path", str(tmp_path / "refused")])
    assert (f"{tmp_path / 'dual13.pth'}: its S2 first layer (backbone2.conv1.weight) takes 13 bands, but the data has "
            "12 S2 bands; --fresh_first_conv starts that layer afresh") in capsys.readouterr().err


@pytest.mark.parametrize("normalize", ["seed", "ssl4eo"])
def test_only_seed_normalisation_renormalises_the_augmented_views(normalize):
    args = dfc_finetune.build_parser().parse_args(["--use_sup_con", "--degrees", "0", "--normalize", normalize])
    views = dfc_finetune.build_views(args, process.Context(torch.device("cpu")))
    g = torch.Generator().manual_seed(0)
    batch = {"s1": torch.rand(3, 2, 8, 8, generator=g) * 5 - 3, "s2": torch.rand(3, 13, 8, 8, generator=g) * 0.4}
    batch["s1"] = batch["s1"].abs() if normalize == "seed" else batch["s1"]
    originals, augmented = views.with_augmented(batch, epoch=0, step=0)
    for m in ("s1", "s2"):
        # degrees 0: the views are flips of the originals, the same values per channel
        peak = originals[m].amax(dim=(-2, -1))
        expected = peak / (peak + 1e-5) if normalize == "seed" else peak
        torch.testing.assert_close(augmented[m].amax(dim=(-2, -1)), expected)


def test_a_bare_meterml_finetune_command_is_the_recorded_run():
    """Every flag of the original's recorded command (meterml_finetune.sh's CE baseline) is the
    default: the bare command parses to the same flags."""
    ce = recorded_commands("meterml_finetune.sh", WEIGHTS="w.pth", DATA="d", OUT="o", VARIANTS="0")[0]
    parse = meterml_finetune.build_parser().parse_args
    bare = parse(["w.pth", "--data_root", "d", "--seed", "3", "--save_path", "o/ce-seed3"])
    assert vars(parse(ce[1:])) == vars(bare)
    assert bare.exclude_negatives and not parse(["w.pth", "--no-exclude_negatives"]).exclude_negatives


@pytest.mark.slow
def test_resume_with_another_script_names_both_before_checking_flags(s1_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        meterml_pretrain.main(["--resume", str(s1_run[2])])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is a run of meterml_finetune.py, not of meterml_pretrain.py: resume it with meterml_finetune.py" in err
    assert "positive pair" not in err


@pytest.mark.slow
def test_resume_with_a_truncated_config_names_the_file(s1_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(s1_run[2], run)
    (run / "config.json").write_text((run / "config.json").read_text()[:40])  # cut short
    with pytest.raises(SystemExit) as exit_info:
        meterml_finetune.main(["--resume", str(run)])
    assert exit_info.value.code == 2
    assert re.search(r"--resume .*run: .*config.json is not valid JSON \(truncated or edited\?", capsys.readouterr().err)


@pytest.mark.slow
def test_frozen_random_dfc_backbones_are_a_loud_warning(dfc_root, tmp_path, caplog):
    argv = ["--data_root", str(dfc_root), "--arch", "resnet18", "--crop", "32", "--eval_crop", "0", "--workers", "0",
            "--batch_size", "4", "--epochs", "1", "--eval_every", "0"]
    with caplog.at_level("WARNING", logger="dfc_finetune"):
        dfc_finetune.main([*argv, "--model_path", "random", "--save_path", str(tmp_path / "frozen")])
    assert "--model_path random without --finetune: the backbones keep their RANDOM initialisation, frozen" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dfc_finetune"):
        dfc_finetune.main([*argv, "--model_path", "random", "--finetune", "--save_path", str(tmp_path / "tuned")])
    assert "RANDOM" not in caplog.text


@pytest.mark.slow
def test_train_image_dirs_restricts_the_meterml_training_split(meter_root, tmp_path):
    there = {p.name for p in (meter_root / "train_images_1").iterdir()}
    argv = ["random", "--data_root", str(meter_root), *FAST, *SHARED, "--scenario", "s1", "--eval_every", "0"]
    results = meterml_finetune.main([*argv, "--train_image_dirs", "train_images_1", "--save_path", str(tmp_path / "ft")])
    assert results["config"]["train_image_dirs"] == ["train_images_1"]
    assert results["last"]["n"] + results["last"]["ignored"] == 4  # the val split is read whole
    kept = MeterMLDataset(meter_root, "train", image_dirs=["train_images_1"])
    assert set(kept.ids) <= there and 0 < len(kept) < 16
    meterml_pretrain.main(["--data_root", str(meter_root), *FAST, *SHARED, "--train_image_dirs", "train_images_1",
                           "--save_path", str(tmp_path / "pre")])
    assert json.loads((tmp_path / "pre" / "config.json").read_text())["train_image_dirs"] == ["train_images_1"]


@pytest.mark.slow
def test_a_user_error_is_one_line_without_traceback(tmp_path):
    argv = [str(tmp_path / "missing.pth"), "--data_root", str(tmp_path / "nodata"), "--save_path", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SUPCON_DEBUG": ""}
    done = subprocess.run([sys.executable, str(REPO / "meterml_finetune.py"), *argv], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[0].startswith("meterml_finetune.py: error: METER-ML root")


def test_debugging_keeps_the_traceback(tmp_path, monkeypatch):
    """SUPCON_DEBUG=1: the same user error escapes cli.run, so Python prints its traceback (in-process: the
    subprocess above proves the entry point)."""
    argv = [str(tmp_path / "missing.pth"), "--data_root", str(tmp_path / "nodata"), "--save_path", str(tmp_path / "run")]
    monkeypatch.setenv("SUPCON_DEBUG", "1")
    with pytest.raises(Exception, match="METER-ML root") as error:
        cli.run(meterml_finetune.main, argv)
    assert cli.user_error(error.value)


def test_every_script_and_tool_enters_through_cli_run():
    for script in ("meterml_finetune", "meterml_pretrain", "dfc_finetune", "sen12ms_pretrain", "embed", "summarize",
                   "synthetic_data", "predict", "pack"):
        source = (REPO / f"{script}.py").read_text()
        assert source.rstrip().endswith('if __name__ == "__main__":\n    cli.run(main)'), script


def test_the_projects_own_errors_are_user_errors_and_others_bugs():
    from datasets import DataFileError
    from util.cli import user_error
    from util.rundir import RunFolderError

    assert user_error(engine.NonFiniteLossError("loss")) and user_error(RunFolderError("x"))
    assert user_error(DataFileError("x")) and user_error(FileNotFoundError("x"))
    assert not user_error(RuntimeError("a bug")) and not user_error(KeyError("a bug"))
