"""The process: the device plan, sampling and loading."""
import argparse
import logging

import numpy as np
import pytest
import torch

from util import flags, process


def test_epoch_sampler_shards_cover_the_data_and_change_per_epoch():
    shards = [list(process.EpochSampler(10, seed=3, rank=r, world=2, shuffle=True)) for r in range(2)]
    indices = [i for shard in shards for i, _ in shard]
    assert sorted(indices) == list(range(10))
    sampler = process.EpochSampler(10, seed=3)
    first = [i for i, _ in sampler]
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(i for i, _ in second) == list(range(10)) and [i for i, _ in second] != first
    assert {e for _, e in second} == {1}
    again = process.EpochSampler(10, seed=3)
    assert [i for i, _ in again] == first  # keyed by (seed, epoch), not by history


def test_epoch_sampler_drop_last_pads_eval_and_weights():
    assert len(process.EpochSampler(10, 0, 0, 3, drop_last=True, batch_size=2)) == 2
    padded = [list(process.EpochSampler(10, 0, r, 3, shuffle=False)) for r in range(3)]
    assert [len(p) for p in padded] == [4, 4, 4]
    assert sorted({i for p in padded for i, _ in p}) == list(range(10))
    weights = torch.tensor([0.0, 1.0, 3.0])
    drawn = [i for i, _ in process.EpochSampler(3000, 0, weights=weights.repeat_interleave(1000))]
    counts = np.bincount(np.array(drawn) // 1000, minlength=3)
    assert counts[0] == 0 and 2.5 < counts[2] / counts[1] < 3.5


def test_subset_indices_first_items_as_the_original_or_a_seeded_draw():
    assert process.subset_indices(100, 0.25) == list(range(25))  # LimitedDataset: the first int(ratio * N)
    assert process.subset_indices(10, 0.29) == [0, 1]  # int(), not round()
    a = process.subset_indices(100, 0.25, "random", seed=1)
    assert len(a) == 25 and a == sorted(a) and a == process.subset_indices(100, 0.25, "random", seed=1)
    assert a != process.subset_indices(100, 0.25, "random", seed=2)
    with pytest.raises(ValueError, match="data_ratio"):
        process.subset_indices(100, 0.0)
    with pytest.raises(ValueError, match="keeps int"):
        process.subset_indices(10, 0.05)


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
    ctx = process.Context(device=torch.device("cpu"))
    loader = process.make_loader(_Items(986), 32, ctx, argparse.Namespace(seed=0), train=True)
    sizes = [len(b["x"]) for b in loader]
    assert len(sizes) == 31 and sizes[-1] == 986 - 30 * 32  # DFC2020: 31 steps an epoch, the last of 26
    with caplog.at_level(logging.WARNING, logger="engine"):
        single = process.make_loader(_Items(33), 32, ctx, argparse.Namespace(seed=0), train=True)
    assert [len(b["x"]) for b in single] == [32]  # a last batch of ONE sample cannot pass batch norm
    assert "ONE sample" in caplog.text
    seen = set()
    for epoch in (0, 1, 2):
        single.sampler.set_epoch(epoch)
        seen.add(frozenset(int(i) for b in single for i in b["x"]))
    assert len(seen) > 1  # another sample left out each epoch
    assert [len(b["x"]) for b in process.make_loader(_Items(10), 4, ctx, argparse.Namespace(seed=0), train=True,
                                                    drop_last=True)] == [4, 4]


def test_a_batch_size_above_the_training_samples_warns_with_the_batch_that_results(caplog):
    ctx = process.Context(device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="process"):
        loader = process.make_loader(_Items(12), 64, ctx, argparse.Namespace(seed=0), train=True)
        assert [len(b["x"]) for b in loader] == [12]
    assert "--batch_size 64 is above the 12 training samples: each epoch is one step, on a batch of 12" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="process"):
        process.make_loader(_Items(12), 12, ctx, argparse.Namespace(seed=0), train=True)
        process.make_loader(_Items(12), 64, ctx, argparse.Namespace(seed=0), train=False)  # evaluation: no training batch
    assert "--batch_size" not in caplog.text


def test_torchrun_ranks_drop_the_tail_to_take_equal_steps():
    parts = []
    for rank in (0, 1):
        ctx = process.Context(device=torch.device("cpu"), rank=rank, world=2)
        loader = process.make_loader(_Items(37), 4, ctx, argparse.Namespace(seed=0), train=True)
        parts.append([len(b["x"]) for b in loader])
    assert parts == [[4, 4, 4, 4], [4, 4, 4, 4]]


# ----------------------------------------------------------------------------- device plan

def plan(env=None, cuda=True, count=2, cpus=16, **flags):
    args = argparse.Namespace(**{"device": None, "amp": False, "channels_last": None, "workers": None, "progress": None, **flags})
    return process.plan_context(args, env or {}, cuda, count, cpus)


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
    with pytest.raises(process.DeviceError, match=message):
        plan(env, cuda=count > 0, count=count, **flags)


def test_tensorboard_without_the_package_stops_with_one_line(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    args = tensorboard_parser().parse_args(["--tensorboard", "--device", "cpu"])
    with pytest.raises(SystemExit, match="pip install tensorboard"):
        process.setup(args)


def tensorboard_parser():
    parser = flags.parser(None)
    flags.add_run_args(parser, epochs=5, batch_size=4, lr=0.1)
    return parser
