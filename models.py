"""The encoders (SmallAlexNet: METER-ML; dual ResNet: DFC2020), the method's forward pass, and the loaders of the
released checkpoint layouts (keys: tests/data/*.txt), so released weights load here and weights trained here load
there. Reading and writing the files themselves: util/checkpoint.py."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# Checkpoint files and the training helpers live in util/; the scripts and docs name them here too.
from util.checkpoint import (  # noqa: F401
    CheckpointError,
    atomic_save,
    cached_download,
    check_finite,
    first,
    load_state,
    read_checkpoint,
    read_state_dict,
    save_checkpoint,
    unwrap,
)
from util.labels import L1C_BANDS  # the S2 band order of 13-band first layers (SSL4EO-S12, SEN12MS, DFC2020)
from util.training import count_trainable, freeze_all_but, param_groups, set_frozen_bn_eval  # noqa: F401

logger = logging.getLogger(__name__)

IMAGE_SIZE = 72  # METER-ML inputs; SmallAlexNet's fc6 is sized for them
S1_CHANNELS = 2  # VV, VH
S2_CHANNELS = 4  # METER-ML's S2 bands (RGB + NIR)
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


# --------------------------------------------------------------- SmallAlexNet encoders (METER-ML)


def _conv_block(in_channels: int, out_channels: int, pool: bool) -> nn.Sequential:
    """3x3 conv (no bias: BN follows), BN, ReLU, and max-pool 3/2 if `pool`; keys .0 conv, .1 BN."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
    return nn.Sequential(*layers)


def _init_alexnet(module: nn.Module) -> None:
    """Weights N(0, 0.02), biases 0, BN scale 1: the initialisation of the original SmallAlexNet."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, _BatchNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _check_images(x: Tensor, channels: tuple[int, ...], model: str) -> None:
    if x.ndim != 4 or x.shape[1] not in channels or tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{model} takes images of shape (B, C, {IMAGE_SIZE}, {IMAGE_SIZE}) with C in "
                         f"{channels} bands, got {tuple(x.shape)}")


class SmallAlexNet(nn.Module):
    """(B, in_channel, 72, 72) -> (B, feat_dim), unit L2 norm; blocks numbered as in the released checkpoints (5 conv
    blocks, fc6, fc7, fc8), 72 -> 35 -> 17 -> 8 px through the pools of blocks 0, 1, 4. `in_channel=None`: no block 0,
    the input is a `SharedNet` stem's (B, 96, 35, 35)."""

    def __init__(self, in_channel: int | None, feat_dim: int = 128) -> None:
        super().__init__()
        self.in_channel = in_channel
        self.blocks = nn.ModuleList([
            nn.Identity() if in_channel is None else _conv_block(in_channel, 96, pool=True),
            _conv_block(96, 192, pool=True),
            _conv_block(192, 384, pool=False),
            _conv_block(384, 384, pool=False),
            _conv_block(384, 192, pool=True),
            nn.Sequential(
                nn.Flatten(),
                nn.Linear(192 * 8 * 8, 4096, bias=False),
                nn.BatchNorm1d(4096),
                nn.ReLU(inplace=True),
            ),
            nn.Sequential(
                nn.Linear(4096, 4096, bias=False),
                nn.BatchNorm1d(4096),
                nn.ReLU(inplace=True),
            ),
            nn.Sequential(nn.Linear(4096, feat_dim)),  # Sequential: the released key is blocks.7.0
        ])
        self.apply(_init_alexnet)

    def forward(self, x: Tensor) -> Tensor:
        if self.in_channel is not None:
            _check_images(x, (self.in_channel,), type(self).__name__)
        for block in self.blocks:
            x = block(x)
        return F.normalize(x, dim=1)


class SharedNet(nn.Module):
    """(B, 2, 72, 72) S1 or (B, 4, 72, 72) S2 -> (B, feat_dim), unit L2 norm: one SmallAlexNet trunk behind a stem
    per modality (its block 0), chosen by the channel count. A batch feeds one stem only: under DDP, pass
    find_unused_parameters=True. Keys: tests/data/smallalexnet_shared.txt."""

    def __init__(self, feat_dim: int = 128) -> None:
        super().__init__()
        self.encoder = SmallAlexNet(in_channel=None, feat_dim=feat_dim)
        # PyTorch's default initialisation, as the original's stems (only the trunk gets N(0, 0.02)).
        self.sentinel1_block = _conv_block(S1_CHANNELS, 96, pool=True)
        self.sentinel2_block = _conv_block(S2_CHANNELS, 96, pool=True)

    def forward(self, x: Tensor) -> Tensor:
        _check_images(x, (S1_CHANNELS, S2_CHANNELS), type(self).__name__)
        stem = self.sentinel1_block if x.shape[1] == S1_CHANNELS else self.sentinel2_block
        return self.encoder(stem(x))


class DualEncoder(nn.Module):
    """A `SharedNet` per modality (`encoder_1` S1, `encoder_2` S2, by channel count); each keeps both stems and uses
    one, as the released checkpoint (tests/data/smallalexnet_dual.txt)."""

    def __init__(self, feat_dim: int = 128) -> None:
        super().__init__()
        self.encoder_1 = SharedNet(feat_dim)
        self.encoder_2 = SharedNet(feat_dim)

    def forward(self, x: Tensor) -> Tensor:
        _check_images(x, (S1_CHANNELS, S2_CHANNELS), type(self).__name__)
        encoder = self.encoder_1 if x.shape[1] == S1_CHANNELS else self.encoder_2
        return encoder(x)


# --------------------------------------------------------------- Dual ResNet (DFC2020)


def _resnet(arch: str, in_channels: int, proj_dim: int) -> nn.Module:
    """A torchvision ResNet with a first conv for `in_channels` bands and fc = projection head."""
    net = torchvision.models.get_model(arch, weights=None)
    # PyTorch's default initialisation, as the original replaces conv1 after building the net
    # (torchvision's other convs are Kaiming normal); it matters when training from scratch.
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    width = net.fc.in_features
    net.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, proj_dim))
    return net


class DualResNet(nn.Module):
    """`backbone1` (S1) and `backbone2` (S2), ResNets whose `fc` is a projection head (F = 2048 for resnet50, 512 for
    resnet18), and `fc`, the classifier on the two projections. Any input size (global pooling). Keys of resnet50:
    tests/data/dualresnet50_*.txt."""

    def __init__(self, arch: str = "resnet50", num_classes: int = 8, s1_channels: int = 2, s2_channels: int = 13,
                 proj_dim: int = 128) -> None:
        super().__init__()
        if arch not in RESNETS:
            raise ValueError(f"arch must be one of {RESNETS}, got {arch!r}")
        self.arch = arch
        self.backbone1 = _resnet(arch, s1_channels, proj_dim)
        self.backbone2 = _resnet(arch, s2_channels, proj_dim)
        self.fc = nn.Linear(2 * proj_dim, num_classes)

    def embed(self, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
        """(B, s1_channels, H, W), (B, s2_channels, H, W) -> projections (B, proj_dim) each, not normalised."""
        for name, x, conv in (("s1", s1, self.backbone1.conv1), ("s2", s2, self.backbone2.conv1)):
            if x.ndim != 4 or x.shape[1] != conv.in_channels:
                raise ValueError(f"DualResNet expects {name} of shape (B, {conv.in_channels}, H, W), "
                                 f"got {tuple(x.shape)}")
        if s1.shape[0] != s2.shape[0]:
            raise ValueError(f"s1 and s2 must be pairs, got batches of {s1.shape[0]} and {s2.shape[0]}")
        return self.backbone1(s1), self.backbone2(s2)

    def classify(self, z1: Tensor, z2: Tensor) -> Tensor:
        return self.fc(torch.cat([z1, z2], dim=1))

    def forward(self, s1: Tensor, s2: Tensor) -> Tensor:
        """(B, s1_channels, H, W), (B, s2_channels, H, W) -> logits (B, num_classes)."""
        return self.classify(*self.embed(s1, s2))


# --------------------------------------------------------------- The method's multi-modal model


class MultiModalNet(nn.Module):
    """The method's forward pass (docs/method.md), routing views through per-modality encoders and optional heads.

    With augmentation, per modality, as the original's `dfc_return_feature` / `meterml_return_feature`: one pass over
    cat([augmented, original]) (2B images, joint batch-norm statistics) gives SupCon's (B, 2, D), view 0 augmented;
    the heads read a second pass over the originals (ce_from="separate", the original) or the original half of the
    first ("joint": 2B images instead of 3B, other batch-norm statistics in training mode). Without augmentation each
    modality is encoded once, (B, 1, D). encode_views="apart" (pre-training, as the original): a pass per view.
    No parameters of its own, so encoders and heads keep their released layouts; one forward call, as DDP needs.

    encoders: modality -> module (B, C, H, W) -> (B, D), one module may serve several (a shared trunk). fused_head:
    (B, M * D) -> (B, K) on the features concatenated in `encoders` order, logits "fused"; or modality_heads:
    modality -> (B, D) -> (B, K), logits named by modality."""

    def __init__(self, encoders: dict[str, nn.Module], *, fused_head: nn.Module | None = None,
                 modality_heads: dict[str, nn.Module] | None = None, ce_from: str = "separate",
                 encode_views: str = "together") -> None:
        super().__init__()
        if fused_head is not None and modality_heads is not None:
            raise ValueError("give a fused head or per-modality heads, not both")
        if ce_from not in ("separate", "joint"):
            raise ValueError(f"ce_from must be 'separate' or 'joint', got {ce_from!r}")
        if encode_views not in ("together", "apart"):
            raise ValueError(f"encode_views must be 'together' or 'apart', got {encode_views!r}")
        unique = list({id(e): e for e in encoders.values()}.values())
        self.encoders = nn.ModuleList(unique)
        self.route = {m: next(i for i, u in enumerate(unique) if u is e) for m, e in encoders.items()}
        self.fused_head = fused_head
        self.modality_heads = nn.ModuleDict(modality_heads or {})
        self.ce_from = ce_from
        self.encode_views = encode_views

    @property
    def fused(self) -> bool:
        return self.fused_head is not None

    def encode(self, modality: str, x: Tensor) -> Tensor:
        """(B, C, H, W) images of `modality` -> (B, D) features."""
        return self.encoders[self.route[modality]](x)

    def _views(self, modality: str, original: Tensor, augmented: Tensor | None) -> tuple[Tensor, Tensor]:
        """SupCon features (B, V, D) and head features (B, D) of one modality."""
        if augmented is None:
            z = self.encode(modality, original)
            return z[:, None], z
        if self.encode_views == "apart":
            z_orig = self.encode(modality, original)
            return torch.stack([self.encode(modality, augmented), z_orig], dim=1), z_orig
        both = self.encode(modality, torch.cat([augmented, original]))
        z_aug, z_orig = both.chunk(2)
        views = torch.stack([z_aug, z_orig], dim=1)
        has_heads = self.fused or len(self.modality_heads) > 0
        if not has_heads:
            return views, z_orig
        return views, (self.encode(modality, original) if self.ce_from == "separate" else z_orig)

    def forward(self, originals: dict[str, Tensor],
                augmented: dict[str, Tensor] | None = None) -> dict[str, dict[str, Tensor]]:
        """originals, augmented (the same samples, or None): modality -> (B, C, H, W). Returns "features": modality ->
        (B, V, D), V = 2 (augmented, original) or 1; "logits": "fused" or modality -> (B, K), empty without heads."""
        features, head_input = {}, {}
        for m, x in originals.items():
            features[m], head_input[m] = self._views(m, x, None if augmented is None else augmented[m])
        logits = {}
        if self.fused:
            logits["fused"] = self.fused_head(torch.cat([head_input[m] for m in self.route], dim=1))
        for m, head in self.modality_heads.items():
            logits[m] = head(head_input[m])
        return {"features": features, "logits": logits}


def linear_head(in_features: int, num_classes: int) -> nn.Linear:
    """A linear classifier initialised as the original METER-ML heads: weights N(0, 0.01), bias 0."""
    head = nn.Linear(in_features, num_classes)
    nn.init.normal_(head.weight, mean=0.0, std=0.01)
    nn.init.zeros_(head.bias)
    return head


# --------------------------------------------------------------- Checkpoints


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, fresh_first_conv: bool = False
) -> tuple[list[str], list[str]]:
    """A checkpoint in any released layout (bare or under "state_dict", other entries ignored) into `model`; returns
    (missing, unexpected) keys. Missing or unexpected keys raise unless strict=False, shape mismatches and NaN / inf
    always; a first conv for another band count raises BandCountError, or with `fresh_first_conv` stays fresh."""
    model = unwrap(model)
    path = Path(path)
    state = read_state_dict(path)
    expected = model.state_dict()
    dual = isinstance(model, DualResNet)
    fresh = _fit_first_conv(state, expected, {"backbone1.conv1.weight": "S1", "backbone2.conv1.weight": "S2"} if dual
                            else {}, path, fresh_first_conv)
    # The released pre-trained dual ResNet has no classifier: fine-tuning starts one afresh.
    head = {"fc.weight", "fc.bias"} if dual else set()
    rest = [k for k in expected if k not in state and k not in fresh]
    return load_state(model, state, path, strict=strict, excused=fresh + (rest if set(rest) == head else []))


def _bands(n: int, modality: str = "") -> str:
    return f"{n} {modality + ' ' if modality else ''}band{'' if n == 1 else 's'}"


class BandCountError(ValueError):
    """A checkpoint's first layer takes another number of bands than the model built for the data."""


def _fit_first_conv(state: dict[str, Tensor], expected: dict[str, Tensor], first: dict[str, str],
                    path: Path, fresh: bool, band_names: Sequence[str] | None = None) -> list[str]:
    """Input bands of the first convs `first` (key -> modality): a difference raises BandCountError, or with `fresh`
    drops the key (returned). A 13-band (L1C) layer given the data's `band_names`, all L1C names, keeps the kernels
    of those bands, by name, in their order (13 in another order too). Other shapes are the caller's."""
    dropped = []
    for key, modality in first.items():
        if key not in state or key not in expected:
            continue
        found, wanted = state[key].shape, expected[key].shape
        by_name = (band_names is not None and found[1] == len(L1C_BANDS) and len(band_names) == wanted[1]
                   and set(band_names) <= set(L1C_BANDS) and list(band_names) != list(L1C_BANDS))
        if (found[0], *found[2:]) != (wanted[0], *wanted[2:]) or (found[1] == wanted[1] and not by_name):
            continue
        if by_name:
            state[key] = state[key][:, [L1C_BANDS.index(name) for name in band_names]].contiguous()
            logger.info("%s: its %s first layer (%s) takes the 13 L1C bands; kept the kernels of the data's %d by "
                        "name, in its order; dropped %s", path, modality, key, wanted[1],
                        ", ".join(b for b in L1C_BANDS if b not in band_names) or "none")
            continue
        if not fresh:
            raise BandCountError(f"{path}: its {modality} first layer ({key}) takes {_bands(found[1])}, but the data "
                                 f"has {_bands(wanted[1], modality)}")
        del state[key]
        dropped.append(key)
        logger.warning("%s: its %s first layer (%s) takes %d bands, the data has %d: that layer starts fresh",
                       path, modality, key, found[1], wanted[1])
    return dropped


# TorchGeo's SSL4EO-S12 ResNet-50 pairs (torchgeo/models/resnet.py, ResNet50_Weights.SENTINEL1_ALL_* and
# SENTINEL2_ALL_*: 2 and 13 bands). The hex after a file name's last "-" starts its SHA-256 (torch.hub's convention).
_HF = "https://hf.co/torchgeo"
PRETRAINED_BACKBONES = {
    "ssl4eo-moco": {
        "s1": f"{_HF}/resnet50_sentinel1_all_moco/resolve/e79862c667853c10a709bdd77ea8ffbad0e0f1cf/"
              "resnet50_sentinel1_all_moco-906e4356.pth",
        "s2": f"{_HF}/resnet50_sentinel2_all_moco/resolve/da4f3c9dbe09272eb902f3b37f46635fa4726879/"
              "resnet50_sentinel2_all_moco-df8b932e.pth",
    },
    "ssl4eo-decur": {
        "s1": "https://huggingface.co/torchgeo/decur/resolve/9328eeb90c686a88b30f8526ed757b4bc0f12027/"
              "rn50_ssl4eo-s12_sar_decur_ep100-f0e69ba2.pth",
        "s2": "https://huggingface.co/torchgeo/decur/resolve/eba7ae5945d482a4319be046d34b552db5dd9950/"
              "rn50_ssl4eo-s12_ms_decur_ep100-fc6b09ff.pth",
    },
}
PRETRAINED_ARCH = "resnet50"


def pretrained_backbone_files(name: str, progress: bool = True) -> dict[str, Path]:
    """"s1", "s2" -> PRETRAINED_BACKBONES[name] in torch hub's cache (as torchgeo), downloaded once, hash-checked."""
    if name not in PRETRAINED_BACKBONES:
        raise ValueError(f"unknown pre-trained backbones {name!r}; known: {', '.join(PRETRAINED_BACKBONES)}")
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for modality, url in PRETRAINED_BACKBONES[name].items():
        files[modality] = cached_download(url, folder, f"the {name} {modality.upper()} backbone", progress,
                                          instead="give files of your own with --s1_backbone / --s2_backbone")
    return files


def load_backbone_weights(net: DualResNet, s1: str | os.PathLike | None = None,
                          s2: str | os.PathLike | None = None, *, fresh_first_conv: bool = False,
                          s2_band_names: Sequence[str] | None = None) -> list[str]:
    """ResNet state dicts in torchvision / timm layout into `net`'s backbones (docs/backbones.md); a file's `fc.*` is
    ignored. A 13-band S2 first layer on data of L1C bands (`s2_band_names`: fewer, or reordered) keeps theirs by name.
    Returns the first-layer keys that `fresh_first_conv` left fresh."""
    net = unwrap(net)
    kept = []
    for modality, path, prefix in (("S1", s1, "backbone1."), ("S2", s2, "backbone2.")):
        backbone = net.get_submodule(prefix[:-1])
        if path is None:
            continue
        path = Path(path)
        state = read_state_dict(path)
        ignored = [k for k in state if k.startswith("fc.")]
        state = {k: v for k, v in state.items() if k not in ignored}
        expected = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
        fresh = _fit_first_conv(state, expected, {"conv1.weight": modality}, path, fresh_first_conv,
                                s2_band_names if modality == "S2" else None)
        kept += [prefix + k for k in fresh]
        missing = [k for k in expected if k not in state and k not in fresh and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in expected]
        mismatched = [f"{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})"
                      for k, v in state.items() if k in expected and v.shape != expected[k].shape]
        problems = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": mismatched}
        if any(problems.values()):
            found = "; ".join(f"{what} ({len(keys)}): {first(keys)}" for what, keys in problems.items() if keys)
            raise ValueError(f"{path} is not a {net.arch} {modality} backbone in torchvision / timm layout: {found}")
        check_finite(state, path)
        backbone.load_state_dict(state, strict=False)
        logger.info("Loaded %s into the %s backbone (%d tensors)%s; its projection head starts fresh", path, modality,
                    len(state), f"; ignored the file's classifier {', '.join(ignored)}" if ignored else "")
    if s1 is not None or s2 is not None:
        logger.info("The classifier (fc) starts fresh%s", "" if s1 is not None and s2 is not None else
                    f"; the {'S2' if s1 is not None else 'S1'} backbone keeps its initialisation (no file given)")
    return kept
