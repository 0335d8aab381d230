"""Random augmentations of (C, H, W) or (B, C, H, W) images, batched with per-sample parameters drawn on the generator's
device (CPU by default), then moved: a seeded CPU generator augments alike anywhere. The recipes' ``impl="torchvision"``
gives the original's torchvision pixels; ``"fused"``, one bilinear resampling per batch (docs/differences.md)."""
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from util.seeding import key_seed, keyed_generator  # noqa: F401 - the seeding every module uses, named here too


def _as_batch(x: Tensor) -> Tensor:
    if x.ndim == 4:
        return x
    if x.ndim == 3:
        return x.unsqueeze(0)
    raise ValueError(f"expected an image (C, H, W) or a batch (B, C, H, W), got shape {tuple(x.shape)}")


def _like_input(out: Tensor, x: Tensor) -> Tensor:
    return out if x.ndim == 4 else out.squeeze(0)


def _check_float(x: Tensor, op: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{op} interpolates and needs a floating-point tensor, got {x.dtype}")


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.empty(shape, device=device).uniform_(low, high, generator=generator)


# Functional ops: a batch (B, C, H, W) and one parameter per sample.


def hflip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror left-right the samples where ``mask`` (B,) bool is True."""
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), TF.horizontal_flip(x), x)


def vflip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror top-bottom the samples where ``mask`` (B,) bool is True."""
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), TF.vertical_flip(x), x)


def rotate(x: Tensor, angles: Tensor, flip_h: Tensor | None = None, flip_v: Tensor | None = None) -> Tensor:
    """Rotate sample i by ``angles[i]`` degrees counter-clockwise as torchvision's ``rotate`` (about the centre,
    bilinear, zero fill); ``flip_h`` / ``flip_v`` (B,) mirror first in the same grid, exactly (centres stay centres)."""
    _check_float(x, "rotate")
    batch, _, height, width = x.shape
    radians = torch.deg2rad(angles.to(device=x.device, dtype=x.dtype))
    cos, sin = torch.cos(radians), torch.sin(radians)
    sign_x = 1 - 2 * flip_h.to(device=x.device, dtype=x.dtype) if flip_h is not None else 1
    sign_y = 1 - 2 * flip_v.to(device=x.device, dtype=x.dtype) if flip_v is not None else 1
    # affine_grid's coordinates are [-1, 1] per axis: rescaled by the aspect ratio, it stays a rotation when H != W.
    theta = torch.zeros(batch, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = sign_x * cos
    theta[:, 0, 1] = sign_x * -sin * height / width
    theta[:, 1, 0] = sign_y * sin * width / height
    theta[:, 1, 1] = sign_y * cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resized_crop(x: Tensor, boxes: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Box i (B, 4) (top, left, height, width in pixels) of sample i, resized bilinearly to ``size`` by a ``roi_align``:
    a box larger than the output averages ceil(box / size)^2 samples a pixel (anti-aliasing); samples near a box edge
    read the pixels just outside it, so a full box at the input size is exactly the identity."""
    _check_float(x, "resized_crop")
    output_size = (size, size) if isinstance(size, int) else tuple(size)
    boxes = boxes.to(device=x.device, dtype=x.dtype)
    top, left, height, width = boxes.unbind(1)
    index = torch.arange(len(boxes), device=x.device, dtype=x.dtype)
    rois = torch.stack([index, left, top, left + width, top + height], dim=1)
    return roi_align(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def rotate_nearest(x: Tensor, angles: Tensor) -> Tensor:
    """torchvision's ``rotate`` (nearest, zero fill, no expansion, about the centre: the original's ``RandomRotation``)
    as one ``grid_sample`` on torchvision's pixel-centre grid (``_affine_grid``) with its inverse matrix (-angle, double
    precision, cast to the image dtype): on CPU bit for bit its per-sample result (``tests/test_augment.py``)."""
    _check_float(x, "rotate_nearest")
    batch, _, height, width = x.shape
    matrices = []
    for angle in angles.tolist():
        radians = math.radians(-angle)
        matrices.append([math.cos(radians), math.sin(radians), 0.0, -math.sin(radians), math.cos(radians), 0.0])
    theta = torch.tensor(matrices, dtype=x.dtype, device=x.device).view(batch, 2, 3)
    base = torch.empty(1, height, width, 3, dtype=x.dtype, device=x.device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=x.device))
    base[..., 1].copy_(
        torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=x.device)[:, None])
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * width, 0.5 * height], dtype=x.dtype, device=x.device)
    grid = base.view(1, height * width, 3).expand(batch, -1, -1).bmm(scaled).view(batch, height, width, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def resized_crop_antialias(x: Tensor, boxes: Tensor, size: int | tuple[int, int]) -> Tensor:
    """torchvision's ``resized_crop`` (bilinear, antialiased) of integer boxes (B, 4) (top, left, height, width), one
    ``interpolate`` per distinct box size; a box of the output size is copied unresized, as torchvision does."""
    _check_float(x, "resized_crop_antialias")
    output_size = (size, size) if isinstance(size, int) else tuple(size)
    out = x.new_empty(x.shape[0], x.shape[1], *output_size)
    boxes = boxes.long().tolist()
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (_, _, height, width) in enumerate(boxes):
        by_size.setdefault((height, width), []).append(i)
    for (height, width), samples in by_size.items():
        crops = torch.stack([x[i, :, boxes[i][0]: boxes[i][0] + height, boxes[i][1]: boxes[i][1] + width]
                             for i in samples])
        if (height, width) != output_size:
            crops = F.interpolate(crops, size=output_size, mode="bilinear", align_corners=False, antialias=True)
        out[samples] = crops
    return out


# Random ops: modules called as op(x, generator=None) on (C, H, W) or (B, C, H, W).


class RandomHorizontalFlip(nn.Module):
    flip = staticmethod(hflip)

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        batch = _as_batch(x)
        mask = _uniform((len(batch),), 0.0, 1.0, generator) < self.p
        return _like_input(self.flip(batch, mask), x)


class RandomVerticalFlip(RandomHorizontalFlip):
    flip = staticmethod(vflip)


class RandomFlipRotation(nn.Module):
    """Flips (each with probability ``p``), then a rotation uniform in [-degrees, degrees], per sample: the distribution
    of the flips and a bilinear rotation in sequence, in one ``grid_sample`` (zero fill)."""

    def __init__(self, degrees: float, p: float = 0.5) -> None:
        super().__init__()
        self.degrees = degrees
        self.p = p

    def get_params(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        flips = _uniform((2, n), 0.0, 1.0, generator) < self.p
        return _uniform((n,), -self.degrees, self.degrees, generator), flips[0], flips[1]

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        batch = _as_batch(x)
        angles, flip_h, flip_v = self.get_params(len(batch), generator)
        return _like_input(rotate(batch, angles, flip_h, flip_v), x)


class RandomResizedCrop(nn.Module):
    """Boxes as torchvision's ``RandomResizedCrop`` (area fraction in ``scale``, aspect log-uniform in ``ratio``,
    integer, 10 tries, then the centred crop clamped to ``ratio``), all samples' tries in one draw."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        super().__init__()
        self.size = size
        self.scale = scale
        self.ratio = ratio

    def get_params(self, n: int, height: int, width: int, generator: torch.Generator | None = None) -> Tensor:
        """Boxes (n, 4) as (top, left, height, width) in integer pixels (float dtype)."""
        tries = 10
        area = height * width * _uniform((n, tries), *self.scale, generator)
        aspect = torch.exp(_uniform((n, tries), math.log(self.ratio[0]), math.log(self.ratio[1]), generator))
        box_w = torch.round(torch.sqrt(area * aspect))
        box_h = torch.round(torch.sqrt(area / aspect))
        fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
        first = fits.int().argmax(dim=1, keepdim=True)
        box_w = box_w.gather(1, first).squeeze(1)
        box_h = box_h.gather(1, first).squeeze(1)

        # torchvision's fallback when no try fits: the largest centred box within the ratio range.
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            fallback_w, fallback_h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            fallback_w, fallback_h = round(height * max(self.ratio)), height
        else:
            fallback_w, fallback_h = width, height
        found = fits.any(dim=1)
        box_w = torch.where(found, box_w, float(fallback_w))
        box_h = torch.where(found, box_h, float(fallback_h))

        u = _uniform((2, n), 0.0, 1.0, generator)
        top = torch.where(found, torch.floor(u[0] * (height - box_h + 1)), float((height - fallback_h) // 2))
        left = torch.where(found, torch.floor(u[1] * (width - box_w + 1)), float((width - fallback_w) // 2))
        return torch.stack([top, left, box_h, box_w], dim=1)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        batch = _as_batch(x)
        boxes = self.get_params(len(batch), batch.shape[-2], batch.shape[-1], generator)
        return _like_input(resized_crop(batch, boxes, self.size), x)


class Augment(nn.Module):
    def __init__(self, *ops: nn.Module) -> None:
        super().__init__()
        self.ops = nn.ModuleList(ops)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        for op in self.ops:
            x = op(x, generator=generator)
        return x


class DFCAugment(nn.Module):
    """The original's DFC2020 SupCon view: ``RandomHorizontalFlip``, ``RandomRotation(degrees)`` (nearest, zero fill),
    ``RandomVerticalFlip``, each flip with probability ``p``."""

    def __init__(self, degrees: float = 20.0, p: float = 0.5) -> None:
        super().__init__()
        self.degrees = degrees
        self.p = p

    def get_params(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        flips = _uniform((2, n), 0.0, 1.0, generator) < self.p
        return flips[0], _uniform((n,), -self.degrees, self.degrees, generator), flips[1]

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        batch = _as_batch(x)
        flip_h, angles, flip_v = self.get_params(len(batch), generator)
        return _like_input(vflip(rotate_nearest(hflip(batch, flip_h), angles), flip_v), x)


class MeterMLAugment(nn.Module):
    """The original's METER-ML view (``RandomAugmentations``): ``Resize(size)``, ``RandomHorizontalFlip``,
    ``RandomVerticalFlip``, ``RandomResizedCrop(size, scale)``; the resizes bilinear with antialiasing."""

    def __init__(self, size: int = 72, scale: tuple[float, float] = (0.9, 1.0), p: float = 0.5) -> None:
        super().__init__()
        self.size = size
        self.p = p
        self.crop = RandomResizedCrop(size, scale=scale)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        batch = _as_batch(x)
        if tuple(batch.shape[-2:]) != (self.size, self.size):
            batch = TF.resize(batch, [self.size, self.size], interpolation=TF.InterpolationMode.BILINEAR,
                              antialias=True)
        flips = _uniform((2, len(batch)), 0.0, 1.0, generator) < self.p
        batch = vflip(hflip(batch, flips[0]), flips[1])
        boxes = self.crop.get_params(len(batch), batch.shape[-2], batch.shape[-1], generator)
        return _like_input(resized_crop_antialias(batch, boxes, self.size), x)


AUGMENT_IMPLS = ("torchvision", "fused")


def _check_impl(impl: str) -> None:
    if impl not in AUGMENT_IMPLS:
        raise ValueError(f"impl must be one of {AUGMENT_IMPLS}, got {impl!r}")


def meterml_augment(size: int = 72, impl: str = "torchvision") -> nn.Module:
    """The original's METER-ML views; ``"fused"``: ``roi_align`` crops, then flips (bilinear, no antialiasing)."""
    _check_impl(impl)
    if impl == "torchvision":
        return MeterMLAugment(size)
    return Augment(RandomResizedCrop(size, scale=(0.9, 1.0)), RandomHorizontalFlip(), RandomVerticalFlip())


def dfc_augment(degrees: float = 20.0, impl: str = "torchvision") -> nn.Module:
    """The original's DFC2020 views; ``"fused"``: flips folded into one bilinear rotation (nearest in the original)."""
    _check_impl(impl)
    return DFCAugment(degrees) if impl == "torchvision" else Augment(RandomFlipRotation(degrees))


class Views:
    """A batch's originals and augmented views on the device, drawn from a CPU generator keyed by (seed, epoch, step,
    rank): the same on any device, replayed on resume. `renormalize` (e.g. `datasets.seed_normalize`) follows every
    augmented view, as the original normalises each view after its augmentation. `ctx`: a `process.Context`."""

    def __init__(self, modalities: list[str], augment: nn.Module | None, ctx, seed: int,
                 renormalize=None) -> None:
        self.modalities, self.augment, self.ctx, self.seed = list(modalities), augment, ctx, seed
        self.renormalize = renormalize

    def originals(self, batch: dict) -> dict[str, Tensor]:
        """modality -> (B, C, H, W) original images on the device."""
        return {m: self.ctx.to_device(batch[m]) for m in self.modalities}

    def _augmented(self, x: Tensor, g: torch.Generator) -> Tensor:
        view = self.augment(x, generator=g)
        if self.renormalize is not None:
            view = self.renormalize(view)
        # grid_sample and roi_align return NCHW whatever their input: restore the nets' format.
        return self.ctx.memory_format(view)

    def with_augmented(self, batch: dict, epoch: int, step: int) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """(originals, augmented): modality -> (B, C, H, W) on the device; augmented is None
        without augmentation."""
        originals = self.originals(batch)
        if self.augment is None:
            return originals, None
        g = keyed_generator(self.seed, epoch, step, self.ctx.rank)
        return originals, {m: self._augmented(x, g) for m, x in originals.items()}

    def two_augmented(self, batch: dict, epoch: int, step: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(first, second): two independently augmented views, modality -> (B, C, H, W), in the
        order they are drawn."""
        originals = self.originals(batch)
        g = keyed_generator(self.seed, epoch, step, self.ctx.rank)
        first = {m: self._augmented(x, g) for m, x in originals.items()}
        return first, {m: self._augmented(x, g) for m, x in originals.items()}
