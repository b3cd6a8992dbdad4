"""Collapse a trained network into its plain deployable form.

One generic pass: every :class:`~rsd_deploy.blocks.Reparameterizable` block becomes
the single ``nn.Conv2d`` it is equivalent to, and every remaining BatchNorm (one
that no conv can absorb) becomes an :class:`~rsd_deploy.blocks.Affine2d`. Nothing
here knows about particular architectures.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .blocks import Affine2d, Reparameterizable
from .errors import RSDError


def check_finite(model: nn.Module) -> None:
    """Raise :class:`RSDError` naming the first parameter or buffer that is not finite."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RSDError(f"'{name}' holds non-finite values (NaN or inf); refusing to fuse")
    for name, m in model.named_modules():
        var = getattr(m, "running_var", None)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and var is not None and bool((var < 0).any()):
            raise RSDError(f"'{name}.running_var' has negative entries; refusing to fuse")


def _fuse(module: nn.Module) -> nn.Module:
    """``module`` with every block replaced by its fused equivalent (in place where possible)."""
    if isinstance(module, Reparameterizable):
        return module.to_conv()
    if isinstance(module, nn.BatchNorm2d):
        return Affine2d.from_batchnorm(module)
    for name, child in module.named_children():
        fused = _fuse(child)
        if fused is not child:
            setattr(module, name, fused)
    return module


def fuse_model(model: nn.Module) -> nn.Module:
    """A fused copy of ``model`` in eval mode: one conv with bias per block, no BatchNorm.

    Uses each BatchNorm's running statistics and its own eps. The input model is
    left untouched. Raises :class:`RSDError` when weights or statistics are not finite.
    """
    check_finite(model)
    fused = _fuse(copy.deepcopy(model)).eval()
    left = [n for n, m in fused.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise RSDError(f"fusion left BatchNorm layers it cannot fold: {', '.join(left)}")
    check_finite(fused)
    return fused
