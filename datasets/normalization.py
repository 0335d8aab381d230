"""The network's inputs from S1 / S2 windows as read: one pure function, ``normalize``, per recipe.

``"seed"``, the released DualResNet50's recipe: S1 NaN -> 0 dB, clip [-25, 0] dB (-inf -> -25,
+inf -> 0, as the original's ``np.clip``) + 25, S2 clip [0, 10000], each channel / (its window
maximum + 1e-5). ``"ssl4eo"``: TorchGeo's SSL4EO-S12 scaling. ``"stats"``: every band standardised
by the training split's mean and standard deviation (``band_statistics``). ``"none"``: S1 dB and
raw S2. Non-finite values are counted, and after scaling become 0 (``"seed"``: as stated above).
Why ``"stats"`` is the manifests' default: docs/data.md.
"""
import functools
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

NORMALIZATIONS = ("seed", "ssl4eo", "stats", "none")
# The input scaling of TorchGeo's SSL4EO-S12 ResNets (torchgeo/models/resnet.py): S1 VV, VH in dB.
SSL4EO_S1_MEAN = (-12.59, -20.26)
SSL4EO_S1_STD = (5.26, 5.91)
SSL4EO_S2_SCALE = 10000.0
STATS_KEYS = ("s1_mean", "s1_std", "s2_mean", "s2_std")
# What a recipe puts in place of a non-finite S1, S2 value (for the data sets' messages).
REPLACEMENTS = {
    "seed": ("NaN by 0 dB, +-inf clipped to 0 / -25 dB", "NaN by 0, +-inf clipped"),
    "ssl4eo": ("0 after SSL4EO scaling", "0 after SSL4EO scaling"),
    "stats": ("0 after standardising (the band mean)", "0 after standardising (the band mean)"),
    "none": ("0", "0"),
}


def seed_normalize(x: Tensor) -> Tensor:
    """Each channel of ``x`` (C, H, W) or (B, C, H, W), non-negative, / (its maximum + 1e-5): the last
    step of the seed recipe, on the image the network sees (the crop, or an augmented view)."""
    if x.ndim not in (3, 4):
        raise ValueError(f"seed_normalize expects an image (C, H, W) or a batch (B, C, H, W), "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"seed_normalize expects a floating-point tensor, got {x.dtype}")
    return x / (x.amax(dim=(-2, -1), keepdim=True) + 1e-5)


def ssl4eo_normalize(s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    """S1 dB standardised per band, S2 / 10000, (C, H, W) or batched, as TorchGeo's SSL4EO-S12 weights
    expect; no clipping; non-finite values -> 0 after scaling (S1: the band mean)."""
    if s1.ndim not in (3, 4) or s1.shape[-3] != len(SSL4EO_S1_MEAN):
        raise ValueError(f"ssl4eo_normalize expects S1 of shape (2, H, W) or (B, 2, H, W) (VV, VH), "
                         f"got {tuple(s1.shape)}")
    shape = (len(SSL4EO_S1_MEAN), 1, 1)
    mean = torch.tensor(SSL4EO_S1_MEAN, dtype=s1.dtype, device=s1.device).view(shape)
    std = torch.tensor(SSL4EO_S1_STD, dtype=s1.dtype, device=s1.device).view(shape)
    return (torch.nan_to_num((s1 - mean) / std, nan=0.0, posinf=0.0, neginf=0.0),
            torch.nan_to_num(s2 / SSL4EO_S2_SCALE, nan=0.0, posinf=0.0, neginf=0.0))


def check_recipe(recipe: str, bands: dict[str, int], stats: dict | None = None) -> None:
    """Refuse a recipe these band counts cannot take (ssl4eo: S1 VV, VH) or stats of other counts."""
    if recipe not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {recipe!r}")
    if recipe == "ssl4eo" and bands["s1"] != len(SSL4EO_S1_MEAN):
        raise ValueError(f"--normalize ssl4eo standardises S1 VV, VH by SSL4EO-S12's statistics: it needs 2 S1 "
                         f"bands, the data have {bands['s1']}; use --normalize stats or seed")
    if stats is not None:
        if sorted(stats) != sorted(STATS_KEYS):
            raise ValueError(f"normalisation statistics need the keys {STATS_KEYS}, got {sorted(stats)}")
        for key in STATS_KEYS:
            if len(stats[key]) != bands[key[:2]]:
                raise ValueError(f"normalisation statistics {key} hold {len(stats[key])} values for "
                                 f"{bands[key[:2]]} {key[:2].upper()} bands")


def _float_copy(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """A float32 copy of ``raw``, its non-finite mask (None when all finite) and (NaN, +inf, -inf) counts."""
    x = np.array(raw, dtype=np.float32)
    counts = np.zeros(3, dtype=np.int64)
    with np.errstate(invalid="ignore", over="ignore"):  # a sum of +inf and -inf is NaN: non-finite as well
        finite = raw.dtype.kind != "f" or np.isfinite(x.sum())
    if finite:
        return x, None, counts
    nonfinite = ~np.isfinite(x)
    nan, positive = int(np.isnan(x).sum()), int((x == np.inf).sum())
    counts[:] = nan, positive, int(nonfinite.sum()) - nan - positive
    return x, nonfinite, counts


def _divide_by_maxima(x: np.ndarray, maxima: np.ndarray) -> Tensor:
    """``seed_normalize`` in place on a fresh float32 array whose channel maxima are known."""
    t = torch.from_numpy(x)
    return t.div_(torch.from_numpy(maxima.astype(np.float32)).view(-1, 1, 1).add_(1e-5))


def _seed_s1(x: np.ndarray, nonfinite: np.ndarray | None) -> Tensor:
    nan = None if nonfinite is None else np.isnan(x)
    np.clip(x, -25.0, 0.0, out=x)
    x += 25.0
    if nan is not None:
        x[nan] = 25.0  # NaN -> 0 dB before clipping
    return _divide_by_maxima(x, x.max(axis=(1, 2)))


def _seed_s2(raw: np.ndarray, x: np.ndarray, nonfinite: np.ndarray | None) -> Tensor:
    if raw.dtype.kind == "u":  # nothing below 0: clip only a cloud above the L1C range
        maxima = x.max(axis=(1, 2))
        if maxima.max() > 10000:
            np.minimum(x, 10000.0, out=x)
            maxima = np.minimum(maxima, 10000)
        return _divide_by_maxima(x, maxima)
    if nonfinite is not None:
        x[np.isnan(x)] = 0.0
    np.clip(x, 0.0, 10000.0, out=x)
    return _divide_by_maxima(x, x.max(axis=(1, 2)))


@functools.lru_cache(maxsize=8)
def _band_tensors(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """float32 (C, 1, 1) views of a run's band statistics, made once rather than every item; read only."""
    return (torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1),
            torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))


def _standardised(x: np.ndarray, mean, std) -> Tensor:
    t = torch.from_numpy(x)
    mean, std = _band_tensors(tuple(mean), tuple(std))
    t.sub_(mean).div_(std)
    return t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def normalize(s1: np.ndarray, s2: np.ndarray, recipe: str,
              stats: dict[str, list[float]] | None = None) -> tuple[Tensor, Tensor, np.ndarray]:
    """The network's inputs from windows as read: S1 (C1, h, w) in dB (float; NaN missing), S2 (C2, h, w)
    digital numbers (reflectance x 10000, any dtype). Returns S1, S2 float32 (C, h, w) tensors by
    ``recipe`` (module docstring) and counts (2, 3) int64: NaN, +inf, -inf met in S1, S2. ``stats``
    (``"stats"`` only): {"s1_mean", "s1_std", "s2_mean", "s2_std"} lists, one value a band."""
    if recipe == "stats" and stats is None:
        raise ValueError("normalize 'stats' needs the training split's band statistics (stats=)")
    x1, bad1, count1 = _float_copy(s1)
    x2, bad2, count2 = _float_copy(s2)
    counts = np.stack([count1, count2])
    if recipe == "seed":
        return _seed_s1(x1, bad1), _seed_s2(s2, x2, bad2), counts
    if recipe == "stats":
        return (_standardised(x1, stats["s1_mean"], stats["s1_std"]),
                _standardised(x2, stats["s2_mean"], stats["s2_std"]), counts)
    if recipe == "ssl4eo":
        return (*ssl4eo_normalize(torch.from_numpy(x1), torch.from_numpy(x2)), counts)
    if recipe == "none":
        for x, bad in ((x1, bad1), (x2, bad2)):
            if bad is not None:
                x[bad] = 0.0
        return torch.from_numpy(x1), torch.from_numpy(x2), counts
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {recipe!r}")


def band_statistics(windows: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, list[float]]:
    """Per-band mean and standard deviation (population) of S1 and S2 over ``windows`` ((C1, h, w),
    (C2, h, w) pairs as read), non-finite values left out; a band with no finite value or no spread
    gets mean 0 / std 1 there, so it passes unscaled. Sums in float64, one pass."""
    sums: dict[str, np.ndarray] = {}
    for s1, s2 in windows:
        for key, raw in (("s1", s1), ("s2", s2)):
            x = np.asarray(raw, dtype=np.float64).reshape(raw.shape[0], -1)
            finite = np.isfinite(x)
            x = np.where(finite, x, 0.0)
            found = np.stack([finite.sum(1), x.sum(1), (x * x).sum(1)])
            sums[key] = found if key not in sums else sums[key] + found
    if not sums:
        raise ValueError("no window to compute the band statistics from")
    stats: dict[str, list[float]] = {}
    for key, (n, total, squares) in sums.items():
        n = np.maximum(n, 1)
        mean = total / n
        std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
        stats[f"{key}_mean"] = mean.tolist()
        stats[f"{key}_std"] = np.where(std > 0, std, 1.0).tolist()
    return {key: stats[key] for key in STATS_KEYS}
