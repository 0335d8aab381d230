"""The shared training pieces: device plan, flags, views, sampling, metrics, schedules, run folders."""
import argparse
import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import engine


def test_predict_single_head_and_late_fusion():
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert engine.predict({"fused": a}).tolist() == [0, 1]
    b = torch.tensor([[0.0, 5.0], [0.0, 1.0]])  # sample 0: the confident head wins the mean probability
    assert engine.predict({"s1": a, "s2": b}).tolist() == [1, 1]


def test_epoch_sampler_shards_cover_the_data_and_change_per_epoch():
    shards = [list(engine.EpochSampler(10, seed=3, rank=r, world=2, shuffle=True)) for r in range(2)]
    indices = [i for shard in shards for i, _ in shard]
    assert sorted(indices) == list(range(10))
    sampler = engine.EpochSampler(10, seed=3)
    first = [i for i, _ in sampler]
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(i for i, _ in second) == list(range(10)) and [i for i, _ in second] != first
    assert {e for _, e in second} == {1}
    again = engine.EpochSampler(10, seed=3)
    assert [i for i, _ in again] == first  # keyed by (seed, epoch), not by history


def test_epoch_sampler_drop_last_pads_eval_and_weights():
    assert len(engine.EpochSampler(10, 0, 0, 3, drop_last=True, batch_size=2)) == 2
    padded = [list(engine.EpochSampler(10, 0, r, 3, shuffle=False)) for r in range(3)]
    assert [len(p) for p in padded] == [4, 4, 4]
    assert sorted({i for p in padded for i, _ in p}) == list(range(10))
    weights = torch.tensor([0.0, 1.0, 3.0])
    drawn = [i for i, _ in engine.EpochSampler(3000, 0, weights=weights.repeat_interleave(1000))]
    counts = np.bincount(np.array(drawn) // 1000, minlength=3)
    assert counts[0] == 0 and 2.5 < counts[2] / counts[1] < 3.5


def test_subset_indices_first_items_as_the_original_or_a_seeded_draw():
    assert engine.subset_indices(100, 0.25) == list(range(25))  # LimitedDataset: the first int(ratio * N)
    assert engine.subset_indices(10, 0.29) == [0, 1]  # int(), not round()
    a = engine.subset_indices(100, 0.25, "random", seed=1)
    assert len(a) == 25 and a == sorted(a) and a == engine.subset_indices(100, 0.25, "random", seed=1)
    assert a != engine.subset_indices(100, 0.25, "random", seed=2)
    with pytest.raises(ValueError, match="data_ratio"):
        engine.subset_indices(100, 0.0)
    with pytest.raises(ValueError, match="keeps int"):
        engine.subset_indices(10, 0.05)


class _Items(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        pass

    def __getitem__(self, i):
        return {"x": torch.tensor(i)}


def test_training_keeps_the_last_partial_batch_as_the_original(caplog):
    ctx = engine.Context(device=torch.device("cpu"))
    loader = engine.make_loader(_Items(986), 32, ctx, argparse.Namespace(seed=0), train=True)
    sizes = [len(b["x"]) for b in loader]
    assert len(sizes) == 31 and sizes[-1] == 986 - 30 * 32  # DFC2020: 31 steps an epoch, the last of 26
    with caplog.at_level(logging.WARNING, logger="engine"):
        single = engine.make_loader(_Items(33), 32, ctx, argparse.Namespace(seed=0), train=True)
    assert [len(b["x"]) for b in single] == [32]  # a last batch of ONE sample cannot pass batch norm
    assert "ONE sample" in caplog.text
    seen = set()
    for epoch in (0, 1, 2):
        single.sampler.set_epoch(epoch)
        seen.add(frozenset(int(i) for b in single for i in b["x"]))
    assert len(seen) > 1  # another sample left out each epoch
    assert [len(b["x"]) for b in engine.make_loader(_Items(10), 4, ctx, argparse.Namespace(seed=0), train=True,
                                                    drop_last=True)] == [4, 4]


def test_torchrun_ranks_drop_the_tail_to_take_equal_steps():
    parts = []
    for rank in (0, 1):
        ctx = engine.Context(device=torch.device("cpu"), rank=rank, world=2)
        loader = engine.make_loader(_Items(37), 4, ctx, argparse.Namespace(seed=0), train=True)
        parts.append([len(b["x"]) for b in loader])
    assert parts == [[4, 4, 4, 4], [4, 4, 4, 4]]


def test_classification_metrics_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2, 255, 3])
    y_pred = np.array([0, 0, 1, 1, 0, 2, 0, 2])
    m = engine.classification_metrics(y_true, y_pred, ["a", "b", "c", "d", "e"], ignore=(255, 3))
    assert m["per_class"] == pytest.approx({"a": 200 / 3, "b": 50.0, "c": 100.0, "e": None})
    assert "d" not in m["per_class"]
    assert m["AA"] == pytest.approx((200 / 3 + 50 + 100) / 3)
    assert m["OA"] == pytest.approx(100 * 4 / 6) and m["n"] == 6 and m["ignored"] == 2
    # rows true, columns predicted; the ignored samples (255 and class "d") counted nowhere
    assert m["confusion"] == [[2, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    empty = engine.classification_metrics(np.array([255]), np.array([0]), ["a", "b"])
    assert empty["AA"] is None and empty["n"] == 0 and empty["ignored"] == 1


def test_eval_schedule_of_the_original_runs():
    """The original: 0-based `epoch % 10 == 0 or epoch > 79` (METER-ML; > 150 for DFC2020), and after the loop."""
    meterml = sorted(engine.eval_schedule(121, every=10, dense_after=79))
    assert meterml == [0, 10, 20, 30, 40, 50, 60, 70] + list(range(80, 121))
    dfc = sorted(engine.eval_schedule(201, every=10, dense_after=150))
    assert dfc == list(range(0, 151, 10)) + list(range(151, 201))
    assert sorted(engine.eval_schedule(5, every=0)) == [4]


# ----------------------------------------------------------------------------- device plan

def plan(env=None, cuda=True, count=2, cpus=16, **flags):
    args = argparse.Namespace(**{"device": None, "amp": False, "channels_last": None, "workers": None, "progress": None, **flags})
    return engine.plan_context(args, env or {}, cuda, count, cpus)


def test_plan_gives_cuda_an_index():
    """torch.cuda.set_device refuses torch.device("cuda"): the crash of every script on a GPU."""
    ctx = plan()
    assert ctx.device == torch.device("cuda", 0) and ctx.device.index == 0
    # float32 unless --amp (the original's numerics); channels_last, a memory layout, on with CUDA
    assert (ctx.amp, ctx.channels_last, ctx.pin_memory, ctx.backend) == (False, True, True, None)
    assert plan(amp=True).amp
    assert plan(device="cuda").device.index == 0
    assert plan(device="cuda:1").device == torch.device("cuda", 1)  # an explicit index stays
    torchrun = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    ctx = plan(torchrun, device="cuda")
    assert ctx.device == torch.device("cuda", 1) and (ctx.rank, ctx.world, ctx.backend) == (3, 4, "nccl")
    assert ctx.workers == 8  # 16 cores for 2 processes on this node, at most 8
    assert plan(torchrun).device == torch.device("cuda", 1)


def test_plan_on_cpu_and_flags():
    ctx = plan(cuda=False, count=0)
    assert ctx.device == torch.device("cpu") and (ctx.amp, ctx.channels_last, ctx.pin_memory, ctx.workers) == (False, False, False, 1)
    assert plan({"WORLD_SIZE": "2", "RANK": "1"}, cuda=False, count=0).backend == "gloo"
    ctx = plan(amp=False, channels_last=False, workers=3)
    assert (ctx.amp, ctx.channels_last, ctx.workers) == (False, False, 3)
    assert plan(cpus=4).workers == 4 and not plan(progress=True, env={"RANK": "1", "WORLD_SIZE": "2"}).progress


@pytest.mark.parametrize("flags, env, count, message", [
    ({"device": "cuda"}, {}, 0, "sees no CUDA device"),
    ({"device": "cuda:2"}, {}, 2, "only 2 CUDA device"),
    ({"device": "cuda:1"}, {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, 2, "under torchrun"),
    ({}, {"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, 2, "only 2 CUDA device"),
    ({"device": "tpu"}, {}, 2, "tpu"),
])
def test_plan_refuses_devices_that_cannot_run(flags, env, count, message):
    with pytest.raises(engine.DeviceError, match=message):
        plan(env, cuda=count > 0, count=count, **flags)


def test_views_augment_on_the_device_renormalise_and_keep_the_format():
    ctx = engine.Context(torch.device("cpu"), channels_last=True)
    flip = lambda x, generator=None: x.flip(-1).contiguous() * 2  # noqa: E731  (NCHW out, as grid_sample)
    x = torch.arange(16.0).view(2, 2, 2, 2)
    originals, augmented = engine.Views(["s1"], flip, ctx, seed=0, renormalize=lambda v: v / 4)({"s1": x}, 0, 0)
    assert torch.equal(originals["s1"], x) and torch.equal(augmented["s1"], x.flip(-1) / 2)
    assert augmented["s1"].is_contiguous(memory_format=torch.channels_last)
    originals, augmented = engine.Views(["s1"], None, ctx, seed=0)({"s1": x}, 0, 0)
    assert augmented is None and torch.equal(originals["s1"], x)
    first, second = engine.Views(["s1"], flip, ctx, seed=0, second="augmented")({"s1": x}, 0, 0)
    assert torch.equal(first["s1"], second["s1"]) and torch.equal(first["s1"], 2 * x.flip(-1))


def test_views_draw_the_same_augmentation_for_the_same_key():
    from augment import dfc_augment
    ctx = engine.Context(torch.device("cpu"))
    x = torch.rand(4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    views = engine.Views(["s1"], dfc_augment(), ctx, seed=5)
    a, b, c = views({"s1": x}, 1, 2)[1]["s1"], views({"s1": x}, 1, 2)[1]["s1"], views({"s1": x}, 1, 3)[1]["s1"]
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- flags

def common_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--flag", default="a")
    engine.add_supervised_args(parser, head_lr=None, eval_dense_after=79)
    engine.add_common_args(parser, epochs=5, batch_size=4, lr=0.1)
    return parser


@pytest.mark.parametrize("argv, flag", [
    (["--batch_size", "0"], "--batch_size"), (["--epochs", "-1"], "--epochs"), (["--lr", "-0.1"], "--lr"),
    (["--lr", "nan"], "--lr"), (["--temperature", "0"], "--temperature"), (["--data_ratio", "1.5"], "--data_ratio"),
    (["--data_ratio", "nan"], "--data_ratio"), (["--seed", str(2**32)], "--seed"), (["--eval_batch_size", "0"], "--eval_batch_size"),
    (["--sup_weight", "inf"], "--sup_weight"), (["--ce_weight", "-1"], "--ce_weight"), (["--head_lr", "x"], "--head_lr"),
])
def test_impossible_flag_values_are_refused_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        common_parser().parse_args(argv)
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_original_spellings_are_aliases():
    args = common_parser().parse_args(["--sup_delta", "0.5", "--cross_delta", "2", "--classifier_lr", "3e-6", "--n_epochs", "7"])
    assert (args.sup_weight, args.ce_weight, args.head_lr, args.epochs) == (0.5, 2.0, 3e-6, 7)
    args = common_parser().parse_args(["--delta_sup", "0.25", "--delta_lin", "4"])
    assert (args.sup_weight, args.ce_weight) == (0.25, 4.0)


def test_resolve_args_resume_keeps_config_and_refuses_other_flags(tmp_path, capsys):
    parser = common_parser()
    (tmp_path / "config.json").write_text('{"flag": "saved", "epochs": 5, "batch_size": 8, "lr": 0.5, "device": "cuda:3"}')
    args = engine.resolve_args(parser, ["--resume", str(tmp_path), "--epochs", "7", "--workers", "0"])
    assert (args.flag, args.epochs, args.batch_size, args.lr, args.workers) == ("saved", 7, 8, 0.5, 0)
    assert args.device is None  # hardware is this machine's, not the saved run's
    assert args.save_path == tmp_path
    with pytest.raises(SystemExit):
        engine.resolve_args(parser, ["--resume", str(tmp_path), "--lr", "0.1", "--flag=b"])
    err = capsys.readouterr().err
    assert "cannot change: --flag, --lr" in err
    with pytest.raises(SystemExit):
        engine.resolve_args(parser, ["--resume", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):
        engine.resolve_args(parser, ["--resume", str(tmp_path), "--overwrite"])


# ----------------------------------------------------------------------------- run folders

def run_args(**flags):
    return argparse.Namespace(**{"resume": None, "overwrite": False, "seed": 0, **flags})


CPU = engine.Context(torch.device("cpu"))


def test_run_folder_refuses_a_run_unless_resume_or_overwrite(tmp_path):
    run = engine.RunDir(tmp_path / "run", run_args(lr=0.1), CPU)
    run.save("last.pt", {"epoch": 1})
    run.close()
    with pytest.raises(engine.RunFolderError, match="holds a run .*--resume .*--overwrite"):
        engine.RunDir(tmp_path / "run", run_args(lr=0.2), CPU)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 0.1  # untouched
    engine.RunDir(tmp_path / "run", run_args(lr=0.3, overwrite=True), CPU).close()
    assert not (tmp_path / "run" / "last.pt").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 0.3
    assert not list((tmp_path / "run").glob("*.tmp")) and not (tmp_path / "run" / "run.lock").exists()


def test_run_lock_refuses_a_second_writer_and_takes_over_a_stale_lock(tmp_path):
    first = engine.RunDir(tmp_path / "run", run_args(), CPU)
    with pytest.raises(engine.RunFolderError, match=f"in use by process {os.getpid()}"):
        engine.RunDir(tmp_path / "run", run_args(resume=tmp_path / "run"), CPU)
    first.close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "run" / "run.lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))  # a killed run's lock
    engine.RunDir(tmp_path / "run", run_args(resume=tmp_path / "run"), CPU).close()


def test_damaged_checkpoint_is_named(tmp_path):
    run = engine.RunDir(tmp_path / "run", run_args(), CPU)
    assert run.load_last() is None
    (tmp_path / "run" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(engine.RunFolderError, match="last.pt is damaged.*--overwrite"):
        run.load_last()
    run.close()


def test_tensorboard_without_the_package_stops_with_one_line(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    args = common_parser().parse_args(["--tensorboard", "--device", "cpu"])
    with pytest.raises(SystemExit, match="pip install tensorboard"):
        engine.setup(args)
