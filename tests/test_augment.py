"""augment.py against independent expectations: torch / torchvision ops, hand-computed cases, round trips."""
import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

import augment
from augment import Views
from util import process


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_flip_masks_select_samples_and_flip_twice_is_identity():
    x = torch.rand(4, 3, 5, 7)
    mask = torch.tensor([True, False, True, False])
    once = augment.hflip(x, mask)
    assert torch.equal(once[0], x[0].flip(-1)) and torch.equal(once[1], x[1])
    assert torch.equal(augment.hflip(once, mask), x)
    once = augment.vflip(x, mask)
    assert torch.equal(once[2], x[2].flip(-2)) and torch.equal(once[3], x[3])
    assert torch.equal(augment.vflip(once, mask), x)


@pytest.mark.parametrize("p, flipped", [(1.0, True), (0.0, False)])
def test_random_flips_with_certain_probability(p, flipped):
    x = torch.rand(3, 6, 6)
    assert torch.equal(augment.RandomHorizontalFlip(p)(x), x.flip(-1) if flipped else x)
    assert torch.equal(augment.RandomVerticalFlip(p)(x), x.flip(-2) if flipped else x)


def test_random_flip_draws_per_sample():
    x = torch.rand(1, 2, 4, 4).expand(64, -1, -1, -1)
    out = augment.RandomHorizontalFlip()(x, generator=_gen(0))
    flipped = torch.tensor([torch.equal(o, x[0].flip(-1)) for o in out])
    kept = torch.tensor([torch.equal(o, x[0]) for o in out])
    assert torch.all(flipped | kept) and 10 < int(flipped.sum()) < 54


def test_rotate_90_degrees_is_a_quarter_turn():
    x = torch.rand(2, 5, 16, 16)
    out = augment.rotate(x, torch.tensor([90.0, -90.0]))
    torch.testing.assert_close(out[0], torch.rot90(x[0], 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], torch.rot90(x[1], -1, dims=(-2, -1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(13, 24, 24), (2, 18, 30), (4, 25, 11)])
def test_rotate_matches_torchvision_per_sample(shape):
    x = torch.rand(3, *shape)
    angles = torch.tensor([17.0, -8.5, 33.0])
    out = augment.rotate(x, angles)
    for i, angle in enumerate(angles.tolist()):
        expected = TF.rotate(x[i], angle, interpolation=TF.InterpolationMode.BILINEAR)  # fill None: zeros
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


def test_rotate_batch_equals_rotate_per_sample():
    x = torch.rand(5, 4, 20, 20)
    angles = torch.tensor([-20.0, -3.0, 0.0, 11.0, 20.0])
    out = augment.rotate(x, angles)
    for i in range(5):
        torch.testing.assert_close(out[i : i + 1], augment.rotate(x[i : i + 1], angles[i : i + 1]))


def test_rotate_of_a_ramp_is_the_rotated_ramp_inside():
    # Bilinear interpolation reproduces a linear function exactly, so inside the image the result
    # is the ramp evaluated at the inversely rotated pixel centre.
    size, angle = 33, 25.0
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    c = (size - 1) / 2
    ramp = (2 * (xx - c) + 0.5 * (yy - c)).view(1, 1, size, size)
    out = augment.rotate(ramp, torch.tensor([angle], dtype=torch.float64))[0, 0]
    a = math.radians(angle)
    # Counter-clockwise on screen (y down): the source of output (x, y) is R(+a) applied in y-down axes.
    src_x = math.cos(a) * (xx - c) - math.sin(a) * (yy - c)
    src_y = math.sin(a) * (xx - c) + math.cos(a) * (yy - c)
    expected = 2 * src_x + 0.5 * src_y
    inside = (src_x.abs() < c - 1) & (src_y.abs() < c - 1)
    torch.testing.assert_close(out[inside], expected[inside], atol=1e-9, rtol=0)
    assert torch.all(out[(src_x.abs() > c + 1) | (src_y.abs() > c + 1)] == 0)  # zero fill


def test_rotate_folds_flips_exactly():
    x = torch.rand(4, 3, 21, 21)
    angles = torch.tensor([12.0, -7.0, 19.0, 0.0])
    flip_h = torch.tensor([True, False, True, False])
    flip_v = torch.tensor([False, True, True, False])
    sequential = augment.rotate(augment.vflip(augment.hflip(x, flip_h), flip_v), angles)
    torch.testing.assert_close(augment.rotate(x, angles, flip_h, flip_v), sequential, atol=1e-5, rtol=0)


def test_random_flip_rotation_uses_its_drawn_params():
    x = torch.rand(6, 2, 16, 16)
    op = augment.RandomFlipRotation(20.0)
    angles, flip_h, flip_v = op.get_params(6, _gen(3))
    assert torch.all(angles.abs() <= 20.0) and angles.unique().numel() == 6
    torch.testing.assert_close(op(x, generator=_gen(3)), augment.rotate(x, angles, flip_h, flip_v))


def test_resized_crop_full_box_is_identity():
    x = torch.rand(3, 4, 72, 72)
    boxes = torch.tensor([[0.0, 0.0, 72.0, 72.0]]).repeat(3, 1)
    assert torch.equal(augment.resized_crop(x, boxes, 72), x)


def test_resized_crop_matches_torchvision_inside_the_box():
    # torchvision crops first (repeating the box edge); resized_crop reads the real neighbours
    # there, so they agree everywhere except the outermost output pixels.
    # float64: the two bilinear implementations agree to ~1e-15, far from the tolerance
    x = torch.rand(2, 5, 72, 72, generator=_gen(3), dtype=torch.float64)
    boxes = torch.tensor([[3.0, 4.0, 60.0, 65.0], [10.0, 0.0, 62.0, 70.0]], dtype=torch.float64)
    out = augment.resized_crop(x, boxes, 72)
    for i, (top, left, height, width) in enumerate(boxes.int().tolist()):
        expected = TF.resized_crop(x[i], top, left, height, width, [72, 72], antialias=False)
        torch.testing.assert_close(out[i, :, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-9, rtol=0)


def test_resized_crop_of_a_ramp():
    # Output pixel j samples the input at left + (j + 0.5) * width / size - 0.5 (pixel centres).
    x = torch.arange(40, dtype=torch.float64).repeat(40, 1).view(1, 1, 40, 40)
    out = augment.resized_crop(x, torch.tensor([[5.0, 8.0, 20.0, 30.0]], dtype=torch.float64), 24)[0, 0]
    expected = 8 + (torch.arange(24, dtype=torch.float64) + 0.5) * 30 / 24 - 0.5
    torch.testing.assert_close(out, expected.expand(24, 24), atol=1e-9, rtol=0)


def test_resized_crop_batch_equals_per_sample():
    x = torch.rand(4, 3, 40, 40)
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [2.0, 3.0, 30.0, 35.0], [5.0, 1.0, 38.0, 33.0], [0.0, 6.0, 36.0, 34.0]])
    out = augment.resized_crop(x, boxes, 32)
    for i in range(4):
        torch.testing.assert_close(out[i : i + 1], augment.resized_crop(x[i : i + 1], boxes[i : i + 1], 32))


def test_random_resized_crop_boxes_follow_scale_and_ratio():
    op = augment.RandomResizedCrop(64, scale=(0.3, 0.6), ratio=(0.5, 2.0))
    boxes = op.get_params(500, 100, 120, _gen(0))
    top, left, height, width = boxes.unbind(1)
    assert torch.all(boxes == boxes.round())
    assert torch.all((top >= 0) & (left >= 0) & (top + height <= 100) & (left + width <= 120))
    area = height * width / (100 * 120)
    assert area.min() > 0.28 and area.max() < 0.62  # rounding to whole pixels
    aspect = width / height
    assert aspect.min() > 0.45 and aspect.max() < 2.2
    assert len({tuple(b) for b in boxes.tolist()}) > 400


def test_random_resized_crop_falls_back_to_the_centred_image():
    # Scale 1 of a 10 x 40 image cannot meet ratios near 1: torchvision's fallback is the
    # largest centred box of the maximal ratio.
    op = augment.RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(0.9, 1.1))
    boxes = op.get_params(5, 10, 40, _gen(0))
    assert boxes.tolist() == [[0.0, 14.0, 10.0, 11.0]] * 5


def test_meterml_augment_shapes_and_determinism():
    aug = augment.meterml_augment()
    x = torch.rand(8, 4, 72, 72)
    out = aug(x, generator=_gen(7))
    assert out.shape == x.shape
    assert torch.equal(out, aug(x, generator=_gen(7)))
    assert not torch.equal(out, aug(x, generator=_gen(8)))
    assert aug(x[0], generator=_gen(7)).shape == (4, 72, 72)
    assert augment.meterml_augment(size=48)(torch.rand(2, 72, 72)).shape == (2, 48, 48)


def test_dfc_augment_draws_per_sample_and_keeps_shape():
    aug = augment.dfc_augment()
    x = torch.rand(1, 13, 32, 32).expand(4, -1, -1, -1)
    out = aug(x, generator=_gen(0))
    assert out.shape == x.shape
    assert not torch.allclose(out[0], out[1])
    assert aug(torch.rand(1, 16, 16)).shape == (1, 16, 16)


def test_bad_inputs():
    with pytest.raises(ValueError, match="got shape"):
        augment.RandomHorizontalFlip()(torch.rand(8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        augment.RandomFlipRotation(10.0)(torch.zeros(2, 8, 8, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_gives_the_cpu_result_for_the_same_generator():
    x = torch.rand(4, 13, 64, 64)
    for aug in (augment.dfc_augment(), augment.meterml_augment(64)):
        expected = aug(x, generator=_gen(0))
        out = aug(x.cuda(), generator=_gen(0))
        torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- the original's pixels
# The default recipes give, for the same drawn parameters, the pixels of the original's torchvision
# transforms applied per sample. Tolerance: none on CPU (bit-identical). Both sides run the same
# float32 arithmetic: the rotation matrix in double precision cast to float32, torchvision's
# sampling grid, grid_sample / interpolate with the same arguments.

@pytest.mark.parametrize("shape", [(6, 13, 224, 224), (6, 2, 64, 64), (5, 4, 40, 56)])
def test_rotate_nearest_equals_torchvision_per_sample(shape):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(*shape, generator=g)
    angles = torch.tensor([20.0, -20.0, 0.0, 7.3, -13.9, 1e-4][: shape[0]])
    out = augment.rotate_nearest(x, angles)
    for i in range(shape[0]):
        expected = TF.rotate(x[i], float(angles[i]), interpolation=TF.InterpolationMode.NEAREST, fill=0)
        assert torch.equal(out[i], expected), f"sample {i}, angle {float(angles[i])}"


def test_rotate_nearest_keeps_values_and_zero_fills_the_corners():
    x = torch.arange(1, 1 + 2 * 32 * 32, dtype=torch.float32).view(1, 2, 32, 32)
    out = augment.rotate_nearest(x, torch.tensor([20.0]))
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}  # nearest: no new values
    assert out[0, :, 0, 0].eq(0).all() and out[0, :, -1, -1].eq(0).all()  # corners rotate out: zero fill
    assert torch.equal(augment.rotate_nearest(x, torch.tensor([0.0])), x)


@pytest.mark.parametrize("size", [72, 40])
def test_dfc_augment_equals_the_original_torchvision_recipe(size):
    aug = augment.dfc_augment()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 13, size, size, generator=g)
    out = aug(x, generator=torch.Generator().manual_seed(5))
    flip_h, angles, flip_v = aug.get_params(8, torch.Generator().manual_seed(5))
    assert flip_h.any() and (~flip_h).any() and flip_v.any() and (~flip_v).any()
    for i in range(8):
        # the original: RandomHorizontalFlip, RandomRotation(20) (nearest, fill 0), RandomVerticalFlip
        y = TF.horizontal_flip(x[i]) if flip_h[i] else x[i]
        y = TF.rotate(y, float(angles[i]), interpolation=TF.InterpolationMode.NEAREST, fill=0)
        y = TF.vertical_flip(y) if flip_v[i] else y
        assert torch.equal(out[i], y), f"sample {i}"


def test_resized_crop_antialias_equals_torchvision_at_the_edges():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(6, 4, 72, 72, generator=g)
    # (top, left, height, width): the whole image, corners, the smallest and largest boxes of
    # scale 0.9-1.0, a downscaling box (antialiasing matters) and two of one size (one call)
    boxes = torch.tensor([[0, 0, 72, 72], [0, 4, 68, 68], [4, 0, 68, 68], [1, 1, 64, 71], [0, 0, 60, 72], [3, 1, 68, 68]])
    out = augment.resized_crop_antialias(x, boxes.float(), 72)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        expected = TF.resized_crop(x[i], top, left, h, w, [72, 72], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        assert torch.equal(out[i], expected), f"box {i}"
    big = torch.rand(2, 2, 96, 96, generator=g)  # boxes larger than the output: the antialiased downscale
    down = augment.resized_crop_antialias(big, torch.tensor([[0.0, 0, 96, 96], [10, 5, 80, 90]]), 72)
    assert torch.equal(down[1], TF.resized_crop(big[1], 10, 5, 80, 90, [72, 72], antialias=True))


def test_meterml_augment_equals_the_original_torchvision_recipe():
    aug = augment.meterml_augment()
    g = torch.Generator().manual_seed(6)
    x = torch.rand(16, 4, 72, 72, generator=g)
    out = aug(x, generator=torch.Generator().manual_seed(7))
    draws = torch.Generator().manual_seed(7)
    flips = augment._uniform((2, 16), 0.0, 1.0, draws) < 0.5
    boxes = aug.crop.get_params(16, 72, 72, draws)
    for i in range(16):
        # the original: Resize(72) (identity at 72 px), flips, RandomResizedCrop(72, scale=(0.9, 1))
        y = TF.horizontal_flip(x[i]) if flips[0, i] else x[i]
        y = TF.vertical_flip(y) if flips[1, i] else y
        top, left, h, w = (int(v) for v in boxes[i])
        expected = TF.resized_crop(y, top, left, h, w, [72, 72], interpolation=TF.InterpolationMode.BILINEAR,
                                   antialias=True)
        assert torch.equal(out[i], expected), f"sample {i}, box {(top, left, h, w)}"


def test_fused_recipes_stay_one_flag_away_and_differ_in_pixels():
    g = torch.Generator().manual_seed(8)
    x = torch.rand(4, 2, 64, 64, generator=g)
    fused = augment.dfc_augment(impl="fused")(x, generator=torch.Generator().manual_seed(1))
    original = augment.dfc_augment()(x, generator=torch.Generator().manual_seed(1))
    assert fused.shape == original.shape and not torch.equal(fused, original)
    with pytest.raises(ValueError, match="impl"):
        augment.meterml_augment(impl="bilinear")


# --------------------------------------------------------------------------- the views of a batch

def test_views_augment_on_the_device_renormalise_and_keep_the_format():
    ctx = process.Context(torch.device("cpu"), channels_last=True)
    flip = lambda x, generator=None: x.flip(-1).contiguous() * 2  # noqa: E731  (NCHW out, as grid_sample)
    x = torch.arange(16.0).view(2, 2, 2, 2)
    originals, augmented = Views(["s1"], flip, ctx, seed=0, renormalize=lambda v: v / 4).with_augmented({"s1": x}, 0, 0)
    assert torch.equal(originals["s1"], x) and torch.equal(augmented["s1"], x.flip(-1) / 2)
    assert augmented["s1"].is_contiguous(memory_format=torch.channels_last)
    originals, augmented = Views(["s1"], None, ctx, seed=0).with_augmented({"s1": x}, 0, 0)
    assert augmented is None and torch.equal(originals["s1"], x)
    first, second = Views(["s1"], flip, ctx, seed=0).two_augmented({"s1": x}, 0, 0)
    assert torch.equal(first["s1"], second["s1"]) and torch.equal(first["s1"], 2 * x.flip(-1))


def test_views_draw_the_same_augmentation_for_the_same_key():
    from augment import dfc_augment
    ctx = process.Context(torch.device("cpu"))
    x = torch.rand(4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    views = Views(["s1"], dfc_augment(), ctx, seed=5)
    a, b, c = (views.with_augmented({"s1": x}, epoch, step)[1]["s1"] for epoch, step in ((1, 2), (1, 2), (1, 3)))
    assert torch.equal(a, b) and not torch.equal(a, c)
