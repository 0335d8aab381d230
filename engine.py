"""`train_one_epoch`, shared by the four scripts, each of which defines its `step` (views, model, loss) and epochs."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from util.labels import IGNORE
from util.training import set_frozen_bn_eval

log = logging.getLogger("engine")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped."""


class NoTargetError(RuntimeError):
    """A training epoch in which no sample had a cross-entropy target."""


def _batch_ids(batch: dict) -> list:
    ids = batch.get("id", batch["index"])
    return ids.tolist() if isinstance(ids, Tensor) else list(ids)


def train_one_epoch(step: Callable[[dict, int, int], dict[str, Tensor]], model: nn.Module, loader: DataLoader,
                    optimizer: torch.optim.Optimizer, ctx, epoch: int, epochs: int, *, frozen_bn_eval: bool = True,
                    board=None, run_path=None) -> dict:
    """0-based `epoch`: `step(batch, epoch, i)` -> {"loss": total, ...; "ce_samples": the samples with a CE target, if
    counted}, then zero_grad, backward, optimizer.step. `frozen_bn_eval=False` leaves the batch norm of frozen
    parameters in training mode, as the original's frozen DFC2020 backbone. `ctx` is a `process.Context`, `board` a
    TensorBoard SummaryWriter or None, `run_path` the run folder named by NonFiniteLossError (with the batch's sample
    ids). Returns the means of the loss terms per batch ("train_<term>"), samples/s over all processes, epoch seconds
    and the first parameter group's lr."""
    loader.sampler.set_epoch(epoch)
    model.train()
    if frozen_bn_eval:
        set_frozen_bn_eval(model)
    sums: dict[str, Tensor] = {}
    began = time.perf_counter()
    bar = tqdm(total=len(loader.sampler), desc=f"epoch {epoch + 1}/{epochs}", unit="sample", leave=False,
               disable=not ctx.progress)  # samples of this process
    for i, batch in enumerate(loader):
        terms = step(batch, epoch, i)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            saved = None if run_path is None else run_path / "last.pt"
            where = (f"Last good checkpoint: {saved} (after epoch {epoch}); resume with --resume {run_path} "
                     "after fixing the cause" if saved is not None and saved.exists()
                     else "No checkpoint was written (the first epoch never ended)")
            raise NonFiniteLossError(f"non-finite loss at epoch {epoch + 1}, batch {i} "
                                     f"({', '.join(f'{k} {v.item():.4g}' for k, v in terms.items())}); sample ids "
                                     f"{_batch_ids(batch)}. {where}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        if board is not None:
            for k, v in terms.items():
                board.add_scalar(f"step/{k}", v.item(), epoch * len(loader) + i)
        bar.update(len(_batch_ids(batch)))
    bar.close()
    seconds = time.perf_counter() - began
    ce_samples = sums.pop("ce_samples", None)
    if ce_samples is not None and ce_samples.item() == 0:
        raise NoTargetError(f"epoch {epoch + 1}: no training sample had a cross-entropy target (every label was ignore "
                            f"= {IGNORE} or an excluded class); check the labels of the training data")
    return {**{f"train_{k}": (v / max(1, len(loader))).item() for k, v in sums.items()},
            "samples_per_s": len(loader.sampler) * ctx.world / seconds, "epoch_s": seconds,
            "lr": optimizer.param_groups[0]["lr"]}


def epoch_summary(record: dict) -> str:
    """The log line's numbers of an epoch's record: `train_one_epoch`'s, and an evaluation's when there was one."""
    line = f"loss {record['train_loss']:.4f}, {record['samples_per_s']:.0f} samples/s, {record['epoch_s']:.1f} s"
    if "AA" in record:
        line += (f"; AA {_pct(record['AA'])}, OA {_pct(record['OA'])} on {record['n']} samples "
                 f"({record['ignored']} ignored)")
    return line


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def data_report(run, splits: dict, ctx) -> dict:
    """Non-finite values met per split (name -> data set), summed over ranks: per file into the run's
    data_report.json (with the data sets' label summaries), a log line per split; returns the totals for
    results.json. `run` a `util.rundir.RunDir`, `ctx` a `process.Context`."""
    totals, files = {}, {}
    for name, dataset in splits.items():
        counts = dataset.nonfinite_counts.clone()
        if ctx.world > 1:
            counts = counts.to(ctx.device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        files[name] = dataset.nonfinite_by_file(counts)
        totals[name] = {"files": len(files[name]), **dict(zip(dataset.NONFINITE_KINDS, counts.sum((0, 1)).tolist()))}
        if files[name]:
            log.warning("%s split: %d NaN, %d +inf, %d -inf values replaced in %d files (every read counted; per "
                        "file in %s)", name, totals[name]["nan"], totals[name]["+inf"], totals[name]["-inf"],
                        len(files[name]), run.path / "data_report.json")
    labels = {name: d.label_summary for name, d in splits.items() if getattr(d, "label_summary", None)}
    run.write_json("data_report.json", {"nonfinite_values": files, "labels": labels})
    return {"nonfinite_values": totals}


def data_record(data_root, dataset, manifest: bool) -> dict:
    """What results.json records of the training data `dataset`: its S2 band names and band statistics, and for a
    manifest (`manifest`: the script's `is_manifest(data_root)`) the CSV's file name."""
    record = {"s2_band_names": list(dataset.s2_band_names), "norm_stats": dataset.norm_stats}
    return {"manifest": Path(data_root).name, **record} if manifest else record
