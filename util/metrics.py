"""Per-class accuracy, AA, OA, kappa, macro F1, and the evaluation pass. AA: the mean of the per-class accuracies
(recalls), OA: the share of samples classified correctly, both in %. Samples whose label is ignored (255, or Negative
when excluded) count nowhere."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from util.labels import IGNORE


def predict(logits: dict[str, Tensor]) -> Tensor:
    """Class predictions (B,): one head's argmax, or the mean softmax of several (late fusion)."""
    if len(logits) == 1:
        return next(iter(logits.values())).argmax(1)
    return torch.stack([x.float().softmax(1) for x in logits.values()]).mean(0).argmax(1)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str],
                           ignore: Sequence[int] = (IGNORE,)) -> dict:
    """Ignored classes get no entry. AA averages the classes present; kappa (a fraction, None with one class
    everywhere) and macro F1 (%, over the classes true or predicted) match sklearn's. per_class: % or None if absent;
    n: samples counted; classes: all K names; confusion: (K, K) counts of the counted samples, rows true."""
    from sklearn.metrics import confusion_matrix  # here: importing sklearn costs every script start about a second

    keep = ~np.isin(y_true, list(ignore))
    y_true, y_pred = y_true[keep], y_pred[keep]
    k = len(class_names)
    confusion = (confusion_matrix(y_true, y_pred, labels=list(range(k))) if len(y_true)
                 else np.zeros((k, k), dtype=np.int64))
    classes = [c for c in range(k) if c not in ignore]
    support, hits = confusion.sum(1), np.diag(confusion)
    per_class = {class_names[c]: (100.0 * float(hits[c]) / float(support[c]) if support[c] else None) for c in classes}
    scores = [v for v in per_class.values() if v is not None]
    return {"AA": sum(scores) / len(scores) if scores else None,
            "OA": 100.0 * float(hits.sum()) / len(y_true) if len(y_true) else None,
            "kappa": _kappa(confusion), "macro_F1": _macro_f1(confusion, classes), "per_class": per_class,
            "n": int(len(y_true)), "ignored": int((~keep).sum()),
            "classes": list(class_names), "confusion": confusion.astype(int).tolist()}


def _kappa(confusion: np.ndarray) -> float | None:
    n = confusion.sum()
    if n == 0:
        return None
    observed = np.trace(confusion) / n
    chance = float((confusion.sum(0) * confusion.sum(1)).sum()) / float(n) ** 2
    return None if chance >= 1.0 else float((observed - chance) / (1.0 - chance))


def _macro_f1(confusion: np.ndarray, classes: list[int]) -> float | None:
    """Mean F1 (%) over `classes` that are true or predicted at least once; None without any."""
    support, predicted, hits = confusion.sum(1), confusion.sum(0), np.diag(confusion)
    met = [c for c in classes if support[c] or predicted[c]]
    if not met:
        return None
    return 100.0 * float(np.mean([2.0 * hits[c] / (support[c] + predicted[c]) for c in met]))


def _gather_rows(x: Tensor, ctx) -> Tensor:
    """Concatenate equal-length 1-D int64 tensors from every rank, on the device (NCCL needs it)."""
    local = x.to(ctx.device)
    parts = [torch.empty_like(local) for _ in range(ctx.world)]
    dist.all_gather(parts, local)
    return torch.cat(parts).cpu()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, views, ctx, class_names: Sequence[str],
             ignore: Sequence[int] = (IGNORE,)) -> dict:
    """`classification_metrics` of `model` on `loader` (the originals of `views`, an
    `augment.Views`), predictions gathered from every rank of `ctx` (a `process.Context`)."""
    model.eval()
    indices, truths, preds = [], [], []
    bar = tqdm(total=len(loader.sampler), desc="eval", unit="sample", leave=False, disable=not ctx.progress)
    for batch in loader:
        bar.update(len(batch["index"]))
        with ctx.autocast():
            out = model(views.originals(batch))
        preds.append(predict(out["logits"]).cpu())
        truths.append(torch.as_tensor(batch["label"]).cpu())
        indices.append(batch["index"])
    bar.close()
    index, truth, pred = (torch.cat(t).long() for t in (indices, truths, preds))
    if ctx.world > 1:  # the sampler gives every rank as many samples: equal lengths
        index, truth, pred = (_gather_rows(t, ctx) for t in (index, truth, pred))
    _, first = np.unique(index.numpy(), return_index=True)  # drop the sampler's padding repeats
    return classification_metrics(truth.numpy()[first], pred.numpy()[first], class_names, ignore)


def eval_schedule(epochs: int, every: int, dense_after: int | None = None) -> frozenset[int]:
    """0-based epochs to evaluate after: the original's `epoch % every == 0 or epoch > dense_after`,
    and the last epoch (the original evaluated once more after its loop)."""
    chosen = {e for e in range(epochs)
              if (every > 0 and e % every == 0) or (dense_after is not None and e > dense_after)}
    return frozenset(chosen | {epochs - 1})
