"""End-to-end runs of the three scripts on tiny synthetic data (CPU, a few steps each)."""
import json

import pytest
import torch

import dfc_finetune
import engine
import meterml_finetune
import meterml_pretrain
from models import DualEncoder, DualResNet, SharedNet, load_checkpoint
from synthetic_data import write_dfc2020, write_meterml

FAST = ["--workers", "0", "--batch_size", "8", "--epochs", "1", "--momentum", "0.9"]
SHARED = ["--model", "shared"]  # half the parameters of the dual encoder: faster steps and checkpoints


@pytest.fixture(scope="module")
def meter_root(tmp_path_factory):
    return write_meterml(tmp_path_factory.mktemp("meter"), n=40, seed=0)  # 32 train, 8 val


@pytest.fixture(scope="module")
def dfc_root(tmp_path_factory):
    return write_dfc2020(tmp_path_factory.mktemp("dfc"), n_validation=12, n_test=6, seed=0, size=64)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("flags", [
    ["--scenario", "s1"],
    ["--scenario", "s2", "--use_augs", "--use_sup_con", *SHARED],
    ["--scenario", "s1s2", "--use_augs", "--use_sup_con", "--dont_include_negatives", *SHARED],
    ["--scenario", "s1s2_fused", "--use_augs", "--use_sup_con", "--augment_on", "loader", *SHARED],
    ["--scenario", "s1s2_fused", "--eval_mode", "linear", "--data_ratio", "0.5", *SHARED],
])
def test_meterml_finetune_runs(meter_root, tmp_path, flags):
    run = tmp_path / "run"
    results = meterml_finetune.main(["random", "--data_root", str(meter_root), "--save_path", str(run), *FAST, *flags])
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.jsonl", "last.pt", "best.pt", "results.json"}
    last = results["last"]
    classes = set(last["per_class"])
    assert ("Negative" not in classes) == ("--dont_include_negatives" in flags) and len(classes) >= 6
    assert 0 <= last["AA"] <= 100 and last["epoch"] == 1
    record = read_jsonl(run / "metrics.jsonl")[0]
    assert ("train_supcon" in record) == ("--use_sup_con" in flags)
    encoder = SharedNet() if "shared" in flags else DualEncoder()
    assert load_checkpoint(encoder, run / "last.pt") == ([], [])  # our checkpoints keep the released layout
    scenario = flags[flags.index("--scenario") + 1]
    heads = {"s1": ["s1"], "s2": ["s2"], "s1s2": ["s1", "s2"], "s1s2_fused": ["fused"]}[scenario]
    best = torch.load(run / "best.pt", weights_only=True)
    assert set(best["heads"]) == {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    assert "optimizer" not in best  # the best checkpoint is for use, not for resuming


def test_linear_eval_changes_only_the_heads(meter_root, tmp_path):
    weights = tmp_path / "init.pth"
    torch.manual_seed(0)
    torch.save(DualEncoder().state_dict(), weights)
    run = tmp_path / "run"
    meterml_finetune.main([str(weights), "--data_root", str(meter_root), "--save_path", str(run), *FAST, "--eval_mode", "linear"])
    before, after = torch.load(weights), torch.load(run / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included


@pytest.mark.parametrize("flags", [
    ["--data_ratio", "0.5"],
    ["--use_pairs", *SHARED],
    ["--use_pairs", "--no_augs", "--use_negative_labels", *SHARED],
    ["--scenario", "s2", *SHARED],
])
def test_meterml_pretrain_runs(meter_root, tmp_path, flags):
    run = tmp_path / "run"
    meterml_pretrain.main(["--data_root", str(meter_root), "--save_path", str(run), *FAST, *flags])
    loss = read_jsonl(run / "metrics.jsonl")[0]["train_loss"]
    assert loss > 0 and loss == loss
    encoder = SharedNet() if "shared" in flags else DualEncoder()
    assert load_checkpoint(encoder, run / "encoder.pth") == ([], [])


def test_pretrained_encoder_feeds_finetuning(meter_root, tmp_path):
    meterml_pretrain.main(["--data_root", str(meter_root), "--save_path", str(tmp_path / "pre"), *FAST, *SHARED])
    results = meterml_finetune.main([str(tmp_path / "pre" / "encoder.pth"), "--data_root", str(meter_root),
                                     "--save_path", str(tmp_path / "ft"), *FAST, *SHARED])
    assert results["last"]["OA"] is not None


@pytest.mark.parametrize("flags", [["--use_sup_con", "--finetune"], ["--balanced_class", "--augment_on", "loader"]])
def test_dfc_finetune_runs(dfc_root, tmp_path, flags):
    run = tmp_path / "run"
    results = dfc_finetune.main(["--data_root", str(dfc_root), "--save_path", str(run), "--arch", "resnet18",
                                 "--crop", "32", "--workers", "0", "--batch_size", "4", "--epochs", "1", *flags])
    assert len(results["last"]["per_class"]) == 8 and results["dataset"] == "DFC2020"
    missing, unexpected = load_checkpoint(DualResNet("resnet18"), run / "last.pt")
    assert (missing, unexpected) == ([], [])
    assert torch.load(run / "last.pt", weights_only=False)["arch"] == "resnet18"


@pytest.mark.parametrize("script, argv, message", [
    (meterml_pretrain, ["--no_augs"], "no positive pair"),
    (meterml_pretrain, ["--scenario", "s1", "--use_pairs"], "one modality"),
    (meterml_pretrain, ["--use_negative_labels", "--exclude_negatives"], "choose one"),
    (meterml_finetune, ["random", "--use_sup_con", "--eval_mode", "linear"], "frozen"),
    (meterml_finetune, [], "MODEL_WEIGHTS is required"),
    (dfc_finetune, ["--use_sup_con"], "only the classifier trains"),
])
def test_invalid_flag_combinations_are_refused(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_after_a_kill_matches_an_uninterrupted_run(meter_root, tmp_path, monkeypatch):
    argv = ["random", "--data_root", str(meter_root), "--scenario", "s1", "--use_augs", "--use_sup_con", *SHARED,
            "--batch_size", "8", "--epochs", "3", "--momentum", "0.9", "--eval_every", "1"]
    whole = meterml_finetune.main([*argv, "--workers", "0", "--save_path", str(tmp_path / "whole")])

    real_step, calls = torch.optim.SGD.step, []

    def killed_mid_epoch_two(self, *a, **k):
        calls.append(1)
        if len(calls) == 6:  # 4 steps per epoch: the second step of epoch 2
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
    assert read_jsonl(tmp_path / "killed" / "metrics.jsonl") == read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_resume_can_extend_a_finished_run(meter_root, tmp_path):
    argv = ["random", "--data_root", str(meter_root), "--scenario", "s1", *FAST, *SHARED, "--eval_every", "1"]
    two = meterml_finetune.main([*argv, "--epochs", "2", "--save_path", str(tmp_path / "two")])
    meterml_finetune.main([*argv, "--epochs", "1", "--save_path", str(tmp_path / "one")])
    extended = meterml_finetune.main(["--resume", str(tmp_path / "one"), "--epochs", "2"])
    assert extended["last"] == two["last"]


def test_non_finite_loss_stops_with_the_batch_ids(meter_root, tmp_path, monkeypatch):
    real = engine.compose_loss
    calls = []

    def poisoned(*a, **k):
        terms = real(*a, **k)
        calls.append(1)
        if len(calls) == 6:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(engine, "compose_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(engine.NonFiniteLossError, match=r"epoch 2, batch 1 .*sample ids \['") as error:
        meterml_finetune.main(["random", "--data_root", str(meter_root), "--save_path", str(run), *FAST, *SHARED,
                               "--scenario", "s1", "--epochs", "3"])
    assert "--resume" in str(error.value)
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 1  # the last good epoch
