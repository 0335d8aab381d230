"""Random augmentations for multi-band remote-sensing images, per sample or on a batch.

Every op takes a floating-point tensor ``(C, H, W)`` or ``(B, C, H, W)`` with any number of bands
(2 for Sentinel-1, 4 or 13 for Sentinel-2), on any device, and an optional ``torch.Generator``.
On a batch every sample draws its own parameters, and the batch is processed in one vectorised
call. Parameters are drawn on the generator's device (the CPU when no generator is given) and
then moved to the data, so a seeded CPU generator gives the same augmentation on CPU and GPU.

The functional ops (``hflip``, ``vflip``, ``rotate``, ``rotate_nearest``,
``resized_crop``, ``resized_crop_antialias``) take a batch and explicit per-sample parameters; the
``Random*`` modules draw the parameters and call them.

Two implementations of the method's recipes (``meterml_augment``, ``dfc_augment``), chosen by
``impl``:

- ``"torchvision"`` (the default, the original's pixels): for the same drawn parameters, exactly
  what the original's torchvision transforms give per sample (``tests/test_augment.py`` compares
  with ``torchvision.transforms.v2.functional``). DFC2020: horizontal flip, rotation with
  nearest-neighbour resampling and zero fill, vertical flip (``rotate_nearest``: one batched
  ``grid_sample`` with per-sample angles on torchvision's sampling grid). METER-ML: flips, then the
  random resized crop resized bilinearly with antialiasing (``resized_crop_antialias``: one
  ``interpolate`` call per distinct box size).
- ``"fused"``: one bilinear resampling per batch. DFC2020: flips folded into a bilinear rotation
  (``RandomFlipRotation``); METER-ML: ``roi_align`` crops. The same parameter distributions, not
  the same pixels: smoother views (bilinear instead of nearest-neighbour rotation).

``Views`` makes the images of a training batch on the device: the originals, and augmented views
from a generator keyed by (seed, epoch, step, rank).
"""
import math

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF


def key_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers, e.g. (seed, epoch, index). Distinct keys give
    independent streams (numpy's SeedSequence hashing), so neighbouring keys are unrelated."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def keyed_generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded with ``key_seed(*parts)``."""
    return torch.Generator(device).manual_seed(key_seed(*parts))


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
    """Uniform draws in [low, high) on the generator's device (CPU by default)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.empty(shape, device=device).uniform_(low, high, generator=generator)


# ---------------------------------------------------------------------------------------------
# Functional ops: a batch (B, C, H, W) and one parameter per sample.


def hflip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror left-right the samples of ``x`` (B, C, H, W) where ``mask`` (B,) bool is True."""
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), TF.horizontal_flip(x), x)


def vflip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror top-bottom the samples of ``x`` (B, C, H, W) where ``mask`` (B,) bool is True."""
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), TF.vertical_flip(x), x)


def rotate(x: Tensor, angles: Tensor, flip_h: Tensor | None = None, flip_v: Tensor | None = None) -> Tensor:
    """Rotate sample i of ``x`` (B, C, H, W) by ``angles[i]`` degrees counter-clockwise.

    Same convention as ``torchvision.transforms.v2.functional.rotate``: about the image centre,
    bilinear, zero outside the image, output size unchanged. ``flip_h`` / ``flip_v`` (B,) bool
    mirror the samples left-right / top-bottom first, folded into the same sampling grid
    (mirroring maps pixel centres onto pixel centres, so it stays exact): flips and rotation
    cost one ``grid_sample`` call.
    """
    _check_float(x, "rotate")
    batch, _, height, width = x.shape
    radians = torch.deg2rad(angles.to(device=x.device, dtype=x.dtype))
    cos, sin = torch.cos(radians), torch.sin(radians)
    sign_x = 1 - 2 * flip_h.to(device=x.device, dtype=x.dtype) if flip_h is not None else 1
    sign_y = 1 - 2 * flip_v.to(device=x.device, dtype=x.dtype) if flip_v is not None else 1
    # affine_grid maps output to input positions in coordinates normalised to [-1, 1] per axis;
    # the pixel-space rotation is rescaled by the aspect ratio so that it stays a rotation when H != W.
    theta = torch.zeros(batch, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = sign_x * cos
    theta[:, 0, 1] = sign_x * -sin * height / width
    theta[:, 1, 0] = sign_y * sin * width / height
    theta[:, 1, 1] = sign_y * cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resized_crop(x: Tensor, boxes: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Crop box i of sample i of ``x`` (B, C, H, W) and resize it to ``size``: (B, C, *size).

    ``boxes`` (B, 4) holds (top, left, height, width) in pixels, as torchvision's
    ``RandomResizedCrop.get_params``. Bilinear, one ``roi_align`` call for the batch; when a box
    is larger than the output, every output pixel averages ceil(box / size)^2 bilinear samples
    (anti-aliasing). Near the border of a box, the samples use the image pixels just outside it
    rather than repeating the box's edge, so a full box at the input size is exactly the identity.
    """
    _check_float(x, "resized_crop")
    output_size = (size, size) if isinstance(size, int) else tuple(size)
    boxes = boxes.to(device=x.device, dtype=x.dtype)
    top, left, height, width = boxes.unbind(1)
    index = torch.arange(len(boxes), device=x.device, dtype=x.dtype)
    rois = torch.stack([index, left, top, left + width, top + height], dim=1)
    return roi_align(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def rotate_nearest(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate sample i of ``x`` (B, C, H, W) by ``angles[i]`` degrees counter-clockwise, as
    ``torchvision.transforms.v2.functional.rotate`` with nearest-neighbour resampling, zero fill,
    no expansion, about the centre (what the original's ``RandomRotation`` gives).

    One ``grid_sample`` for the batch, on torchvision's sampling grid: the inverse rotation matrix
    computed in double precision from each angle as torchvision computes it, then cast to the
    image dtype, applied to the same pixel-centre grid (``_affine_grid``). On CPU the output
    equals torchvision's per-sample result bit for bit (``tests/test_augment.py``).
    """
    _check_float(x, "rotate_nearest")
    batch, _, height, width = x.shape
    matrices = []
    for angle in angles.tolist():
        # torchvision rotates by -angle through its inverse affine matrix (no shear, scale 1, centre 0).
        radians = math.radians(-angle)
        matrices.append([math.cos(radians), math.sin(radians), 0.0, -math.sin(radians), math.cos(radians), 0.0])
    theta = torch.tensor(matrices, dtype=x.dtype, device=x.device).view(batch, 2, 3)
    base = torch.empty(1, height, width, 3, dtype=x.dtype, device=x.device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=x.device))
    base[..., 1].copy_(torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=x.device)[:, None])
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * width, 0.5 * height], dtype=x.dtype, device=x.device)
    grid = base.view(1, height * width, 3).expand(batch, -1, -1).bmm(scaled).view(batch, height, width, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def resized_crop_antialias(x: Tensor, boxes: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Crop box i of sample i of ``x`` (B, C, H, W) and resize it to ``size`` as torchvision's
    ``resized_crop`` (bilinear, antialiased, ``align_corners=False``): (B, C, *size).

    ``boxes`` (B, 4) holds integer (top, left, height, width). Samples whose boxes share a size
    are resized in one ``interpolate`` call; a box of the output size is copied unresized, as
    torchvision does.
    """
    _check_float(x, "resized_crop_antialias")
    output_size = (size, size) if isinstance(size, int) else tuple(size)
    out = x.new_empty(x.shape[0], x.shape[1], *output_size)
    boxes = boxes.long().tolist()
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (_, _, height, width) in enumerate(boxes):
        by_size.setdefault((height, width), []).append(i)
    for (height, width), samples in by_size.items():
        crops = torch.stack([x[i, :, boxes[i][0]: boxes[i][0] + height, boxes[i][1]: boxes[i][1] + width] for i in samples])
        if (height, width) != output_size:
            crops = F.interpolate(crops, size=output_size, mode="bilinear", align_corners=False, antialias=True)
        out[samples] = crops
    return out


# ---------------------------------------------------------------------------------------------
# Random ops: modules called as op(x, generator=None) on (C, H, W) or (B, C, H, W).


class RandomHorizontalFlip(nn.Module):
    """Left-right mirror with probability ``p``, drawn per sample."""

    flip = staticmethod(hflip)

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        batch = _as_batch(x)
        mask = _uniform((len(batch),), 0.0, 1.0, generator) < self.p
        return _like_input(self.flip(batch, mask), x)


class RandomVerticalFlip(RandomHorizontalFlip):
    """Top-bottom mirror with probability ``p``, drawn per sample."""

    flip = staticmethod(vflip)


class RandomFlipRotation(nn.Module):
    """Horizontal and vertical flips (each with probability ``p``) then a rotation by an angle
    uniform in [-degrees, degrees], per sample, in a single bilinear resampling (zero fill).

    The same distribution as horizontal and vertical flips and a bilinear rotation in sequence, at
    the cost of one ``grid_sample`` instead of three passes.
    """

    def __init__(self, degrees: float, p: float = 0.5) -> None:
        super().__init__()
        self.degrees = degrees
        self.p = p

    def get_params(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Angles in degrees (n,), horizontal and vertical flip masks (n,) bool."""
        flips = _uniform((2, n), 0.0, 1.0, generator) < self.p
        return _uniform((n,), -self.degrees, self.degrees, generator), flips[0], flips[1]

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        batch = _as_batch(x)
        angles, flip_h, flip_v = self.get_params(len(batch), generator)
        return _like_input(rotate(batch, angles, flip_h, flip_v), x)


class RandomResizedCrop(nn.Module):
    """Crop a random box and resize it to ``size`` x ``size``, per sample.

    The boxes follow torchvision's ``RandomResizedCrop``: area a fraction in ``scale`` of the
    image, aspect ratio log-uniform in ``ratio``, integer pixels, up to 10 tries, then a centred
    crop of the whole image clamped to ``ratio``. All samples' tries are drawn in one call.
    """

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
    """A sequence of random ops sharing one generator: ``aug(x, generator=None)``."""

    def __init__(self, *ops: nn.Module) -> None:
        super().__init__()
        self.ops = nn.ModuleList(ops)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        for op in self.ops:
            x = op(x, generator=generator)
        return x


class DFCAugment(nn.Module):
    """The original's DFC2020 SupCon view: ``RandomHorizontalFlip``, ``RandomRotation(degrees)``
    (nearest-neighbour, zero fill), ``RandomVerticalFlip``, each flip with probability ``p``,
    per sample and batched (``rotate_nearest``)."""

    def __init__(self, degrees: float = 20.0, p: float = 0.5) -> None:
        super().__init__()
        self.degrees = degrees
        self.p = p

    def get_params(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Horizontal flip masks (n,) bool, angles in degrees (n,), vertical flip masks (n,) bool."""
        flips = _uniform((2, n), 0.0, 1.0, generator) < self.p
        return flips[0], _uniform((n,), -self.degrees, self.degrees, generator), flips[1]

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        batch = _as_batch(x)
        flip_h, angles, flip_v = self.get_params(len(batch), generator)
        return _like_input(vflip(rotate_nearest(hflip(batch, flip_h), angles), flip_v), x)


class MeterMLAugment(nn.Module):
    """The original's METER-ML view (``RandomAugmentations``): ``Resize(size)``,
    ``RandomHorizontalFlip``, ``RandomVerticalFlip``, ``RandomResizedCrop(size, scale)``, per
    sample and batched; the resizes bilinear with antialiasing (``resized_crop_antialias``)."""

    def __init__(self, size: int = 72, scale: tuple[float, float] = (0.9, 1.0), p: float = 0.5) -> None:
        super().__init__()
        self.size = size
        self.p = p
        self.crop = RandomResizedCrop(size, scale=scale)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        batch = _as_batch(x)
        if tuple(batch.shape[-2:]) != (self.size, self.size):
            batch = TF.resize(batch, [self.size, self.size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        flips = _uniform((2, len(batch)), 0.0, 1.0, generator) < self.p
        batch = vflip(hflip(batch, flips[0]), flips[1])
        boxes = self.crop.get_params(len(batch), batch.shape[-2], batch.shape[-1], generator)
        return _like_input(resized_crop_antialias(batch, boxes, self.size), x)


AUGMENT_IMPLS = ("torchvision", "fused")


def _check_impl(impl: str) -> None:
    if impl not in AUGMENT_IMPLS:
        raise ValueError(f"impl must be one of {AUGMENT_IMPLS}, got {impl!r}")


def meterml_augment(size: int = 72, impl: str = "torchvision") -> nn.Module:
    """METER-ML recipe: flips and a random resized crop to ``size`` (scale 0.9-1.0).

    ``impl="torchvision"``: the original's pixels (``MeterMLAugment``); ``"fused"``: ``roi_align``
    crops, then flips (the same distributions, bilinear without antialiasing).
    """
    _check_impl(impl)
    if impl == "torchvision":
        return MeterMLAugment(size)
    return Augment(RandomResizedCrop(size, scale=(0.9, 1.0)), RandomHorizontalFlip(), RandomVerticalFlip())


def dfc_augment(degrees: float = 20.0, impl: str = "torchvision") -> nn.Module:
    """DFC2020 recipe: horizontal and vertical flips, rotation up to ``degrees``.

    ``impl="torchvision"``: the original's pixels (``DFCAugment``: nearest-neighbour rotation,
    zero fill); ``"fused"``: flips folded into one bilinear rotation (``RandomFlipRotation``).
    """
    _check_impl(impl)
    return DFCAugment(degrees) if impl == "torchvision" else Augment(RandomFlipRotation(degrees))


class Views:
    """The images of a batch on the training device: the originals and augmented views of them.

    Augmentation runs on whole batches on the device with per-sample parameters drawn from a CPU
    generator keyed by (seed, epoch, step, rank): the same draws on any device, and a resumed run
    replays them. `renormalize` (e.g. `datasets.seed_normalize`) is applied to every augmented
    view, as the original normalises each view after its augmentation.

    Args:
        modalities: batch keys to read ("s1", "s2").
        augment: a recipe (`dfc_augment`, `meterml_augment`, ...), or None for no augmentation.
        ctx: the process context (`process.Context`): device, memory format, rank.
        seed: run seed.
        renormalize: per-view normalisation after augmentation, or None.
    """

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
