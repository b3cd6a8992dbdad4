"""Collapse a trained network into its plain deployable form.

One generic pass: every :class:`~rsd_deploy.blocks.Reparameterizable` block becomes
the single ``nn.Conv2d`` it is equivalent to; every other ``nn.Conv2d`` whose only
consumer is an ``nn.BatchNorm2d`` (found with torch.fx) absorbs it, the BN's place
becoming an ``nn.Identity``; every remaining BatchNorm (one that no conv can absorb)
becomes an :class:`~rsd_deploy.blocks.Affine2d`. Module names never change, so a
fused model's state dict loads into the original architecture with BN folded.
Nothing here knows about particular architectures.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .blocks import Affine2d, Reparameterizable, fold_conv_bn
from .errors import RSDError
from .graph import TraceError, conv_bn_pairs

log = logging.getLogger(__name__)


def check_finite(model: nn.Module) -> None:
    """Raise :class:`RSDError` naming the first parameter or buffer that is not finite."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RSDError(f"'{name}' holds non-finite values (NaN or inf); refusing to fuse")
    for name, m in model.named_modules():
        var = getattr(m, "running_var", None)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and var is not None and bool((var < 0).any()):
            raise RSDError(f"'{name}.running_var' has negative entries; refusing to fuse")


def _replace(module: nn.Module, match: Callable[[nn.Module], bool],
             fuse: Callable[[Any], nn.Module]) -> nn.Module:
    """``module`` with every submodule that ``match``es replaced by ``fuse(it)`` (in place where possible)."""
    if match(module):
        return fuse(module)
    for name, child in module.named_children():
        fused = _replace(child, match, fuse)
        if fused is not child:
            setattr(module, name, fused)
    return module


def _fold_pairs(model: nn.Module, pairs: Sequence[Sequence[str]] | None = None) -> int:
    """Fold each BN that is a conv's only consumer (or each given pair) into that conv; returns how many."""
    if pairs is None:
        try:
            pairs = conv_bn_pairs(model)
        except TraceError as e:
            log.debug(f"{e}: standalone BatchNorms become per-channel affines")
            return 0
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        if type(modules.get(conv_name)) is not nn.Conv2d or type(modules.get(bn_name)) is not nn.BatchNorm2d:
            raise RSDError(f"pair {conv_name!r}, {bn_name!r} is not an nn.Conv2d and an nn.BatchNorm2d of the model")
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        fused = fold_conv_bn(conv, bn)
        model.set_submodule(conv_name, fused)
        model.set_submodule(bn_name, nn.Identity())
    return len(pairs)


def fuse_model(model: nn.Module, pairs: Sequence[Sequence[str]] | None = None) -> nn.Module:
    """A fused copy of ``model`` in eval mode: one conv with bias per block, no BatchNorm.

    Conv+BN pairs come from torch.fx, or from ``pairs`` for a model it cannot trace (the
    pairs given to :func:`~rsd_deploy.restructure`: its fused form then loads into this
    one). Uses each BatchNorm's running statistics and its own eps. The input model is
    left untouched. Raises :class:`RSDError` when weights or statistics are not finite.
    """
    check_finite(model)
    fused = _replace(copy.deepcopy(model), lambda m: isinstance(m, Reparameterizable), lambda m: m.to_conv())
    _fold_pairs(fused, pairs)
    # Exactly BatchNorm2d: a subclass may do more (timm's BN + activation) than an affine can.
    fused = _replace(fused, lambda m: type(m) is nn.BatchNorm2d, Affine2d.from_batchnorm).eval()
    left = [(n, type(m).__name__) for n, m in fused.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        kinds = sorted({k for _, k in left})
        names = ", ".join(n for n, _ in left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
        raise RSDError(f"fusion left {len(left)} BatchNorm layer(s) it cannot fold ({', '.join(kinds)}: {names}); "
                       "only nn.BatchNorm2d folds (a subclass that also applies an activation does not)")
    check_finite(fused)
    return fused
