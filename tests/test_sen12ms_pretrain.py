"""sen12ms_pretrain.py: the loss and the schedule against the original's construction, the released
checkpoint layout that dfc_finetune.py starts from, resume after a kill, the flags, torchrun."""
import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfc_finetune
import sen12ms_pretrain
from helpers import read_jsonl, ssl4eo_file
from losses import NTXent
from models import DualResNet, MultiModalNet, load_checkpoint
from synthetic_data import write_dfc2020, write_sen12ms
from util import flags, process

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "resnet18", "--crop", "32", "--epochs", "1", "--batch_size", "4", "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def sen12ms_root(tmp_path_factory):
    return write_sen12ms(tmp_path_factory.mktemp("sen12ms"), n_per_season=2, seed=0, size=48)  # 8 patches


# ----------------------------------------------------------------------------- the loss


def naive_cross_modal_ntxent(z1, z2, tau):
    """Mean over the 2B rows of -log(exp(s(i, p) / tau) / sum_{k != i} exp(s(i, k) / tau)), cosine s,
    p the other modality's row of the same patch."""
    rows = [F.normalize(r, dim=0) for r in list(z1) + list(z2)]
    b, total = len(z1), 0.0
    for i, anchor in enumerate(rows):
        partner = (i + b) % (2 * b)
        denominator = sum(math.exp(float(anchor @ rows[k]) / tau) for k in range(2 * b) if k != i)
        total += -math.log(math.exp(float(anchor @ rows[partner]) / tau) / denominator)
    return total / (2 * b)


def original_info_nce(features, batch_size, tau):
    """SSLTransformerRS `SimCLRDoubleBackbone.info_nce_loss` (n_views 2) and its CrossEntropyLoss,
    transcribed: similarity matrix without its diagonal, positives first in the logits, label 0."""
    labels = torch.cat([torch.arange(batch_size) for _ in range(2)], dim=0)
    labels = (labels.unsqueeze(0) == labels.unsqueeze(1)).float()
    features = F.normalize(features, dim=1)
    similarity_matrix = torch.matmul(features, features.T)
    mask = torch.eye(labels.shape[0], dtype=torch.bool)
    labels = labels[~mask].view(labels.shape[0], -1)
    similarity_matrix = similarity_matrix[~mask].view(similarity_matrix.shape[0], -1)
    positives = similarity_matrix[labels.bool()].view(labels.shape[0], -1)
    negatives = similarity_matrix[~labels.bool()].view(similarity_matrix.shape[0], -1)
    logits = torch.cat([positives, negatives], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))


@pytest.mark.parametrize("b", [1, 5, 16])
def test_cross_modal_ntxent_is_the_original_info_nce(b):
    g = torch.Generator().manual_seed(b)
    z1, z2 = torch.randn(b, 128, generator=g, dtype=torch.float64), torch.randn(b, 128, generator=g, dtype=torch.float64)
    ours = NTXent(tau=0.07, blocks=2)(torch.cat([z1, z2])).item()
    assert ours == pytest.approx(naive_cross_modal_ntxent(z1, z2, 0.07), rel=1e-10)
    assert ours == pytest.approx(original_info_nce(torch.cat([z1, z2]), b, 0.07).item(), rel=1e-10)


# ----------------------------------------------------------------------------- the schedule


def test_learning_rate_schedules_by_hand():
    lr = sen12ms_pretrain.learning_rate
    # original, warm-up 2, 4 steps per epoch: constant through epoch 2, then cos with period 8 epochs
    assert [lr(e, 1.0, "original", 2, 8, 4) for e in range(8)] == pytest.approx(
        [1.0, 1.0, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627, 0.0, 0.14644660940672627], abs=1e-15)
    # the published setting: 180,662 patches at batch 200 give 903 steps; epoch 200 runs at 89.5 %
    assert lr(200, 3e-5, "original", 10, 201, 903) == pytest.approx(3e-5 * 0.89468270, rel=1e-7)
    assert [lr(e, 1.0, "cosine", 2, 6, 4) for e in range(6)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627], abs=1e-15)
    assert [lr(e, 1.0, "constant", 2, 3, 4) for e in range(3)] == [1.0, 1.0, 1.0]


def test_original_schedule_is_what_the_original_scheduler_gives():
    """CosineAnnealingLR(T_max=steps per epoch) stepped after every epoch from epoch 10 on, as
    simclr_double_backbone.py does: the rate each epoch trained with."""
    steps_per_epoch, epochs = 7, 40
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=3e-5)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps_per_epoch, eta_min=0)
    used = []
    for epoch in range(epochs):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if epoch >= 10:
            scheduler.step()
    ours = [sen12ms_pretrain.learning_rate(e, 3e-5, "original", 10, epochs, steps_per_epoch) for e in range(epochs)]
    assert ours == pytest.approx(used, abs=1e-15)


# ----------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_checkpoint_is_the_released_layout_and_dfc_finetune_starts_from_it(sen12ms_root, tmp_path):
    run = tmp_path / "pre"
    results = sen12ms_pretrain.main(["--data_root", str(sen12ms_root), "--save_path", str(run), *TINY])
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-epoch0.pth", "checkpoint.pth", "config.json", "data_report.json", "last.pt",
                                                     "metrics.jsonl", "results.json"]
    assert os.path.samefile(run / "checkpoint.pth", run / "checkpoint-epoch0.pth")  # the last snapshot, not a copy
    checkpoint = torch.load(run / "checkpoint.pth", weights_only=True)
    # the original's layout and naming: the 0-based epoch after which the weights were saved
    assert sorted(checkpoint) == ["arch", "epoch", "state_dict"] and (checkpoint["arch"], checkpoint["epoch"]) == ("resnet18", 0)
    assert {k.split(".")[0] for k in checkpoint["state_dict"]} == {"backbone1", "backbone2"}
    last = torch.load(run / "last.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(v, last[k]) for k, v in checkpoint["state_dict"].items()) and last.keys() == checkpoint["state_dict"].keys()
    assert load_checkpoint(DualResNet("resnet18"), run / "checkpoint.pth") == (["fc.weight", "fc.bias"], [])
    assert results["data"]["nonfinite_values"]["train"]["nan"] > 0  # the synthetic S1 holds NaN, as SEN12MS does

    process.seed_everything(0)
    initial = DualResNet("resnet18").state_dict()  # the run's initialisation (seed 0)
    weight = "backbone2.conv1.weight"
    assert not torch.equal(initial[weight], checkpoint["state_dict"][weight])  # pre-training moved it

    dfc = write_dfc2020(tmp_path / "dfc", n_validation=8, n_test=4, seed=0, size=48)
    dfc_finetune.main(["--data_root", str(dfc), "--save_path", str(tmp_path / "ft"), "--model_path", str(run / "checkpoint.pth"),
                       "--arch", "resnet18", "--crop", "32", "--eval_crop", "0", "--epochs", "1", "--batch_size", "4",
                       "--workers", "0", "--device", "cpu"])
    tuned = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)["state_dict"]
    # Linear evaluation (no --finetune): the backbones keep the pre-trained weights, the classifier trains.
    for key in (weight, "backbone1.layer4.1.conv2.weight", "backbone1.fc.2.weight"):
        assert torch.equal(tuned[key], checkpoint["state_dict"][key])


@pytest.mark.slow
def test_resume_after_a_kill_matches_an_uninterrupted_run(sen12ms_root, tmp_path, monkeypatch):
    argv = ["--data_root", str(sen12ms_root), *TINY, "--epochs", "2", "--warmup_epochs", "0"]  # 2 steps an epoch
    sen12ms_pretrain.main([*argv, "--save_path", str(tmp_path / "whole")])

    real_step, calls = torch.optim.Adam.step, []

    def killed_in_epoch_two(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # the first step of epoch 2
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        sen12ms_pretrain.main([*argv, "--save_path", str(tmp_path / "killed")])
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    assert not (tmp_path / "killed" / "checkpoint.pth").exists() and (tmp_path / "killed" / "checkpoint-epoch0.pth").exists()
    sen12ms_pretrain.main(["--resume", str(tmp_path / "killed"), "--workers", "1"])  # a loader worker now

    whole, resumed = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("whole", "killed"))
    assert [r["lr"] for r in whole] == [r["lr"] for r in resumed] == [3e-5, 1.5e-5]  # period 2 epochs: cos(pi / 2)
    assert [r["train_loss"] for r in whole] == [r["train_loss"] for r in resumed]
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-epoch0.pth", "checkpoint-epoch1.pth"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "killed" / "checkpoint.pth", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--augment", "--supervised_lc"])
def test_variants_run_a_step(sen12ms_root, tmp_path, flag):
    run = tmp_path / "run"
    sen12ms_pretrain.main(["--data_root", str(sen12ms_root), "--save_path", str(run), *TINY, "--data_ratio", "0.5", flag])
    (record,) = read_jsonl(run / "metrics.jsonl")
    assert math.isfinite(record["train_loss"]) and record["train_loss"] > 0
    assert json.loads((run / "config.json").read_text())["seasons"] == ["spring", "summer", "fall", "winter"]
    assert load_checkpoint(DualResNet("resnet18"), run / "checkpoint.pth") == (["fc.weight", "fc.bias"], [])


@pytest.mark.parametrize("flags, message", [
    (["--schedule", "cosine", "--warmup_epochs", "1"], "--warmup_epochs"),
    (["--seasons", "monsoon"], "--seasons"),
    (["--arch", "resnet42"], "--arch"),
    (["--fresh_first_conv"], "changes nothing without pre-trained weights"),
    (["--backbones", "ssl4eo-moco"], "pass --arch resnet50"),
    (["--backbones", "ssl4eo-moco", "--s2_backbone", "s2.pth"], "not both"),
])
def test_impossible_flags_are_refused_before_data_is_read(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        sen12ms_pretrain.main(["--data_root", str(tmp_path / "absent"), *TINY, *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_pretraining_continues_from_ssl4eo_layout_backbones(sen12ms_root, tmp_path, capsys):
    s1, s2 = ssl4eo_file(tmp_path / "s1.pth", 2, seed=1), ssl4eo_file(tmp_path / "s2.pth", 13, seed=2)
    run = tmp_path / "run"
    sen12ms_pretrain.main(["--data_root", str(sen12ms_root), "--save_path", str(run), *TINY, "--lr", "0", "--augment",
                           "--normalize", "ssl4eo", "--s1_backbone", str(tmp_path / "s1.pth"),
                           "--s2_backbone", str(tmp_path / "s2.pth")])
    config = json.loads((run / "config.json").read_text())
    assert config["normalize"] == "ssl4eo" and config["s2_backbone"] == str(tmp_path / "s2.pth")
    state = torch.load(run / "checkpoint.pth", weights_only=True)["state_dict"]
    for prefix, file in (("backbone1.", s1), ("backbone2.", s2)):  # lr 0: the weights are the files'
        assert all(torch.equal(state[prefix + k], v) for k, v in file.items()
                   if "running" not in k and "num_batches" not in k)
    ssl4eo_file(tmp_path / "s1_1band.pth", 1)
    with pytest.raises(SystemExit):
        sen12ms_pretrain.main(["--data_root", str(sen12ms_root), *TINY, "--s1_backbone", str(tmp_path / "s1_1band.pth"),
                               "--save_path", str(tmp_path / "refused")])
    assert "takes 1 band, but the data has 2 S1 bands; --fresh_first_conv" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


# ----------------------------------------------------------------------------- torchrun


def test_wrap_sync_bn_converts_in_place_before_ddp(monkeypatch):
    """What DDP receives under torchrun with sync_bn (DDP itself is stubbed: on CPU it refuses SyncBatchNorm)."""
    handed = {}
    monkeypatch.setattr(process.nn.parallel, "DistributedDataParallel", lambda model, **kwargs: handed.setdefault("model", model))
    net = DualResNet("resnet18")
    params, keys = [id(p) for p in net.parameters()], list(net.state_dict())
    model = MultiModalNet({"s1": net.backbone1, "s2": net.backbone2})
    ctx = process.Context(device=torch.device("cpu"), rank=0, world=2)
    assert process.wrap(model, ctx, argparse.Namespace(compile=False), sync_bn=True) is model is handed["model"]
    norms = [type(m) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms == [nn.SyncBatchNorm] * (2 * 20)  # resnet18: 20 batch norms per backbone, in the checkpointed modules
    assert [id(p) for p in net.parameters()] == params and list(net.state_dict()) == keys
    single = MultiModalNet({"s1": DualResNet("resnet18").backbone1})
    process.wrap(single, process.Context(device=torch.device("cpu")), argparse.Namespace(compile=False), sync_bn=True)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in single.modules())  # one process: nothing to synchronise


def _torchrun(tmp_path, *args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "sen12ms_pretrain.py"), *args]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_torchrun_two_processes_train_and_write_one_checkpoint(sen12ms_root, tmp_path):
    run = tmp_path / "run"
    argv = ["--data_root", str(sen12ms_root), "--save_path", str(run), *TINY, "--batch_size", "2"]  # 2 x 2 = 4 a step
    done = _torchrun(tmp_path, *argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-epoch0.pth", "checkpoint.pth", "config.json", "data_report.json", "last.pt",
                                                     "metrics.jsonl", "results.json"]
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    assert load_checkpoint(DualResNet("resnet18"), run / "checkpoint.pth") == (["fc.weight", "fc.bias"], [])
    results = json.loads((run / "results.json").read_text())
    assert results["environment"]["world"] == 2 and results["data"]["nonfinite_values"]["train"]["nan"] > 0


def test_sync_bn_on_cpu_is_refused_under_torchrun_before_the_run_folder(sen12ms_root, tmp_path, monkeypatch, capsys):
    """Rank 0 of two as torchrun starts it (its environment), in-process: the process group is not joined."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(process.dist, "init_process_group", lambda *args, **kwargs: None)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        sen12ms_pretrain.main(["--data_root", str(sen12ms_root), "--save_path", str(run), *TINY, "--sync_bn"])
    assert exit_info.value.code == 2 and "--sync_bn on cpu" in capsys.readouterr().err and not run.exists()


def test_shell_script_runs_the_published_recipe(tmp_path):
    env = {**os.environ, "PYTHON": "echo", "DATA": "/sen12ms", "OUT": str(tmp_path / "run"), "DEVICE": "cuda:1", "EXTRA": "--no-amp"}
    printed = subprocess.run(["bash", str(REPO / "sen12ms_pretrain.sh")], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert printed[0] == str(REPO / "sen12ms_pretrain.py")
    args = sen12ms_pretrain.build_parser().parse_args(printed[1:])
    defaults = sen12ms_pretrain.build_parser().parse_args([])
    published = {"arch": "resnet50", "crop": 128, "batch_size": 200, "epochs": 201, "lr": 3e-5, "weight_decay": 1e-4,
                 "temperature": 0.07, "schedule": "original", "warmup_epochs": 10, "seasons": ["spring", "summer", "fall", "winter"]}
    assert {k: getattr(args, k) for k in published} == published == {k: getattr(defaults, k) for k in published}
    assert (args.seed, str(args.data_root), args.device, args.amp) == (42, "/sen12ms", "cuda:1", False)
    assert not (args.augment or args.supervised_lc or args.sync_bn)


def test_the_documented_resume_of_the_recorded_script_parses(tmp_path):
    """`EXTRA="--resume RUN" bash sen12ms_pretrain.sh`: the script's own flags, unchanged, are accepted."""
    env = {**os.environ, "PYTHON": "echo", "OUT": str(tmp_path / "run")}
    recorded = subprocess.run(["bash", str(REPO / "sen12ms_pretrain.sh")], env=env, capture_output=True, text=True,
                              check=True).stdout.split()[1:]
    parser = sen12ms_pretrain.build_parser()
    (tmp_path / "run").mkdir()
    saved = {**flags.as_json(parser.parse_args(recorded)), "script": "sen12ms_pretrain"}
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    resumed = subprocess.run(["bash", str(REPO / "sen12ms_pretrain.sh")], capture_output=True, text=True, check=True,
                             env={**env, "EXTRA": f"--resume {tmp_path / 'run'}"}).stdout.split()[1:]
    args = flags.resolve(parser, resumed)
    assert args.resume == tmp_path / "run" and (args.epochs, args.batch_size, args.arch) == (201, 200, "resnet50")


def test_a_crop_larger_than_the_patches_is_named_not_called_unreadable(sen12ms_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sen12ms_pretrain.main(["--data_root", str(sen12ms_root), "--crop", "999", "--device", "cpu",
                               "--save_path", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and re.search(r"a crop of 999 px does not fit the \d+ x \d+ px patches", err)
    assert "unreadable" not in err and not (tmp_path / "run").exists()
