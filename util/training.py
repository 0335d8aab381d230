"""Which parameters train, and at what rate: linear evaluation's freezing, batch norm of a frozen encoder, the
optimiser's parameter groups."""
from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def freeze_all_but(model: nn.Module, trainable: nn.Module | Iterable[nn.Module]) -> None:
    """Freeze `model` but `trainable` (part of it, as `DualResNet.fc`, or a head apart): linear evaluation."""
    modules = [trainable] if isinstance(trainable, nn.Module) else list(trainable)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)


def set_frozen_bn_eval(model: nn.Module) -> None:
    """Batch norm with frozen parameters into eval mode, after each `model.train()`: a fixed encoder (in training mode
    it would normalise with batch statistics and move its running ones), as MoCo's linear evaluation."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.affine and not module.weight.requires_grad:
            module.eval()


def param_groups(
    model: nn.Module, head: nn.Module, lr: float, head_lr: float, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Groups "backbone" (lr) and "head" (head_lr, whether or not `head` is part of `model`), empty ones left out."""
    head_params = [p for p in head.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head.parameters()}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [
        {"name": "backbone", "params": backbone, "lr": lr, "weight_decay": weight_decay},
        {"name": "head", "params": head_params, "lr": head_lr, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def count_trainable(model: nn.Module) -> int:
    """Trainable parameter values (elements), for the log."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
