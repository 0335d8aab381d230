"""SupConLoss against the textbook formula that materialises every (N, N) mask.

Forward + backward time and peak memory for N anchors (N/2 samples x 2 views), D = 128, labels
from 10 classes. Each measurement runs in a fresh process so that CPU peak memory (max RSS growth)
is not polluted by the previous one; on CUDA it is torch.cuda.max_memory_allocated.

    python bench/bench_losses.py [--sizes 512 2048 8192] [--device cuda]
"""
import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from losses import SupConLoss  # noqa: E402


def reference_supcon(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """The public reference form: float32, dense (N, N) masks, max-subtracted logits."""
    batch, views = features.shape[:2]
    mask = torch.eq(labels[:, None], labels[None, :]).float()
    contrast = torch.cat(torch.unbind(features, dim=1))
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(views, views)
    logits_mask = torch.ones_like(mask)
    logits_mask.fill_diagonal_(0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    positives = mask.sum(1)
    positives = torch.where(positives < 1e-6, torch.ones_like(positives), positives)
    return -((mask * log_prob).sum(1) / positives).mean()


def measure(name: str, n: int, device: str, repeats: int, queue) -> None:
    torch.manual_seed(0)
    features = F.normalize(torch.randn(n // 2, 2, 128, device=device), dim=-1).requires_grad_()
    labels = torch.randint(0, 10, (n // 2,), device=device)
    loss_fn = reference_supcon if name == "reference" else SupConLoss()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss_fn(features, labels).backward()  # warm-up, and the first peak
    features.grad = None
    start = time.perf_counter()
    for _ in range(repeats):
        loss_fn(features, labels).backward()
        features.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    queue.put(((time.perf_counter() - start) / repeats * 1000, peak / 2**20))


def run(name: str, n: int, device: str, repeats: int) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=measure, args=(name, n, device, repeats, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192], help="anchor counts N")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-repeats", type=int, default=3, help="timed passes at the largest N; more at small N")
    args = parser.parse_args()

    print(f"SupCon forward + backward, D = 128, device {args.device}; memory: peak growth over the inputs")
    print("| N | reference ms | SupConLoss ms | speed-up | reference MiB | SupConLoss MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        repeats = max(args.min_repeats, 2**25 // n**2)
        ref_ms, ref_mib = run("reference", n, args.device, repeats)
        ours_ms, ours_mib = run("ours", n, args.device, repeats)
        print(f"| {n} | {ref_ms:.1f} | {ours_ms:.1f} | {ref_ms / ours_ms:.2f}x | {ref_mib:.0f} | {ours_mib:.0f} |")


if __name__ == "__main__":
    main()
