"""Two gloo processes: gathered losses equal the single-process loss on the whole batch, and
the training scripts run under torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from losses import NTXent, PairwiseNTXent, SupConLoss

REPO = Path(__file__).resolve().parents[1]

WORLD = 2
BATCH = 6  # per rank


def make_case(name):
    """A global batch of inputs, its labels / negatives, and a loss -> (inputs, extra kwargs, loss)."""
    g = torch.Generator().manual_seed(0)
    if name == "supcon":
        return torch.randn(WORLD * BATCH, 2, 5, generator=g), {"labels": torch.randint(0, 3, (WORLD * BATCH,), generator=g)}
    if name == "supcon_one":
        return torch.randn(WORLD * BATCH, 3, 5, generator=g), {"labels": torch.randint(0, 3, (WORLD * BATCH,), generator=g)}
    if name == "supcon_mask":
        return torch.randn(WORLD * BATCH, 2, 5, generator=g), {"mask": (torch.rand(WORLD * BATCH, WORLD * BATCH, generator=g) > 0.6).float()}
    return torch.randn(4, WORLD * BATCH, 5, generator=g), {"negatives": torch.rand(4, WORLD * BATCH, generator=g) > 0.7}


def make_loss(name, gather):
    if name.startswith("supcon"):
        return SupConLoss(0.1, "one" if name == "supcon_one" else "all", gather_distributed=gather)
    return (NTXent if name == "ntxent" else PairwiseNTXent)(blocks=4, tau=0.2, gather_distributed=gather)


def run_loss(model, loss_fn, name, inputs, extra):
    """Apply the feature model and the loss; NT-Xent inputs are (blocks, b, D) laid out block-major."""
    features = F.normalize(model(inputs), dim=-1)
    if name.startswith("supcon"):
        return loss_fn(features, **extra)
    return loss_fn(features.reshape(-1, features.shape[-1]), negatives=extra["negatives"].reshape(-1))


def local_slice(name, inputs, extra, rank):
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    if name.startswith("supcon"):
        local_extra = {k: v[rows] for k, v in extra.items()}  # mask rows: (B, W * B)
        return inputs[rows], local_extra
    return inputs[:, rows], {"negatives": extra["negatives"][:, rows]}


CASES = ["supcon", "supcon_one", "supcon_mask", "ntxent", "pairwise"]


def worker(rank, init_file, out_dir):
    """Every case in one process group: each spawn of two processes costs seconds of start-up."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    for name in CASES:
        torch.manual_seed(1)
        model = nn.parallel.DistributedDataParallel(nn.Linear(5, 4))
        inputs, extra = make_case(name)
        local_inputs, local_extra = local_slice(name, inputs, extra, rank)
        loss = run_loss(model, make_loss(name, True), name, local_inputs, local_extra)
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        torch.save({"loss": loss.detach(), "grads": grads}, f"{out_dir}/{name}_rank{rank}.pt")
    dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort at exit otherwise)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    """The folder holding each case's per-rank loss and gradients."""
    out = tmp_path_factory.mktemp("gathered")
    mp.spawn(worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_gathered_loss_and_gradients_equal_single_process(gathered, name):
    ranks = [torch.load(gathered / f"{name}_rank{r}.pt") for r in range(WORLD)]

    torch.manual_seed(1)
    model = nn.Linear(5, 4)
    inputs, extra = make_case(name)
    loss = run_loss(model, make_loss(name, False), name, inputs, extra)
    loss.backward()

    # Each rank returns the mean over its own anchors: their average is the global loss.
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), abs=1e-5)
    for rank in ranks:  # DDP-averaged gradients equal the global-batch gradients on every rank
        for got, want in zip(rank["grads"], (p.grad for p in model.parameters())):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_gather_without_process_group_is_single_process():
    features = F.normalize(torch.randn(4, 2, 3), dim=-1)
    labels = torch.tensor([0, 1, 0, 1])
    assert SupConLoss(gather_distributed=True)(features, labels).item() == pytest.approx(SupConLoss()(features, labels).item())


@pytest.mark.slow
def test_torchrun_two_processes_train_and_write_one_result(tmp_path):
    # Imported here: the processes mp.spawn starts import this file, and need neither.
    from datasets import DFC2020Dataset
    from synthetic_data import write_dfc2020

    root = write_dfc2020(tmp_path / "dfc", n_validation=8, n_test=5, seed=0, size=48)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "dfc_finetune.py"), "--data_root", str(root), "--arch", "resnet18", "--crop", "32",
               "--batch_size", "2", "--epochs", "2", "--workers", "0", "--finetune", "--use_sup_con",
               "--eval_every", "1", "--eval_crop", "0", "--save_path", str(run)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "data_report.json", "last.pt", "metrics.jsonl", "results.json"]
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    results = json.loads((run / "results.json").read_text())
    # The 5 test patches are split 3 + 3 over the ranks (one repeated as padding) and gathered back once each.
    labelled = sum(1 for label in DFC2020Dataset(root, "test").patch_labels().tolist() if label != 255)
    assert results["last"]["n"] == labelled
