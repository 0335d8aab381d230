"""What several test files share: the naive SupCon formula, a GeoTIFF writer, metrics.jsonl and PNG checks.
Tests import from here, never from each other."""
import json
import math
from pathlib import Path

import numpy as np
import rasterio
import torch
import torchvision
from torch import nn

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write_tif(path: Path, array: np.ndarray) -> None:
    """A (bands, H, W) GeoTIFF in UTM 32N at 10 m, dtype as given."""
    bands, height, width = array.shape
    with rasterio.open(
        path, "w", driver="GTiff", height=height, width=width, count=bands, dtype=array.dtype,
        crs="EPSG:32632", transform=rasterio.Affine(10.0, 0.0, 5e5, 0.0, -10.0, 5e6),
    ) as dst:
        dst.write(array)


def naive_supcon(features, labels=None, mask=None, temperature=0.07, mode="all", base_temperature=0.07):
    """Khosla et al. eq. 2, one anchor at a time; weights from labels, mask or identity."""
    f = features.double().flatten(2)
    batch, views = f.shape[:2]
    if mask is None:
        ids = torch.arange(batch) if labels is None else labels
        mask = (ids[:, None] == ids[None, :]).double()
    mask = mask.double()
    contrast = [(v, j) for v in range(views) for j in range(batch)]
    anchors = [(v, i) for v in range(1 if mode == "one" else views) for i in range(batch)]
    total = 0.0
    for v, i in anchors:
        others = [(w, j) for w, j in contrast if (w, j) != (v, i)]
        sims = {(w, j): float(f[i, v] @ f[j, w]) / temperature for w, j in others}
        log_denominator = math.log(sum(math.exp(s) for s in sims.values()))
        weight_sum = sum(float(mask[i, j]) for w, j in others)
        weighted = sum(float(mask[i, j]) * (sims[(w, j)] - log_denominator) for w, j in others)
        term = weighted / weight_sum if weight_sum > 1e-6 else 0.0
        total += -(temperature / base_temperature) * term
    return total / len(anchors)


def ssl4eo_file(path: Path, bands: int, arch: str = "resnet18", seed: int = 0, fc: bool = False) -> dict:
    """A torchvision ResNet's state dict with a first conv for `bands` bands and, unless `fc`, no
    classifier: TorchGeo's layout. Every tensor random, batch-norm statistics included (variances
    positive, weights small: a usable network)."""
    torch.manual_seed(seed)
    net = torchvision.models.get_model(arch, weights=None)
    net.conv1 = nn.Conv2d(bands, 64, kernel_size=7, stride=2, padding=3, bias=False)
    state = {k: v for k, v in net.state_dict().items() if fc or not k.startswith("fc.")}
    for k, v in state.items():
        if v.is_floating_point():
            v.copy_(torch.rand_like(v) + 0.5 if k.endswith("running_var") else 0.05 * torch.randn_like(v))
    torch.save(state, path)
    return state
