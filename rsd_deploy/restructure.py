"""Restructure any conv+BN network into RSD's training form.

:func:`restructure` finds every ``nn.Conv2d`` whose only consumer is an
``nn.BatchNorm2d`` (torch.fx, :mod:`rsd_deploy.graph`) and replaces each convertible
pair by one :class:`~rsd_deploy.blocks.RSDConv` (the conv's place) and an
``nn.Identity`` (the BN's place). Module names stay, so the fused network
(:func:`rsd_deploy.fuse_model`) is the original architecture with BN folded, and its
state dict loads into it.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .blocks import RSDConv
from .errors import RSDError
from .graph import TraceError, conv_bn_pairs

#: Kernel sizes restructured by default: the paper's (1x1 and K >= 7 stay conv+BN).
DEFAULT_KERNEL_SIZES: tuple[int, ...] = (3, 5)


@dataclass(frozen=True)
class ConvEntry:
    """What restructuring did with one ``nn.Conv2d``."""

    conv: str
    kernel_size: list[int]
    stride: list[int]
    groups: int
    bn: str | None  #: the BatchNorm2d it feeds, when it is its only consumer
    converted: bool
    reason: str | None = None  #: why it was skipped


@dataclass
class RestructureReport:
    """Every conv of the model, converted or skipped, and the options used."""

    kernel_sizes: list[int]
    num_square: int
    exclude: list[str]
    convs: list[ConvEntry] = field(default_factory=list)

    @property
    def converted(self) -> list[ConvEntry]:
        return [c for c in self.convs if c.converted]

    @property
    def skipped(self) -> list[ConvEntry]:
        return [c for c in self.convs if not c.converted]

    def pairs(self) -> list[tuple[str, str]]:
        """The (conv, bn) names that were converted."""
        return [(c.conv, c.bn) for c in self.converted if c.bn is not None]

    def counts(self) -> dict[str, Any]:
        """How many convs, how many converted, and how many skipped for each reason."""
        reasons: dict[str, int] = {}
        for c in self.skipped:
            reasons[c.reason or ""] = reasons.get(c.reason or "", 0) + 1
        return {"convs": len(self.convs), "converted": len(self.converted), "skipped": reasons}

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {r}" for r, n in self.counts()["skipped"].items())
        return (f"{len(self.converted)} of {len(self.convs)} convs restructured"
                + (f"; skipped: {skipped}" if skipped else ""))

    def to_json(self) -> dict[str, Any]:
        return {"kernel_sizes": self.kernel_sizes, "num_square": self.num_square, "exclude": self.exclude,
                "converted": [c.conv for c in self.converted],
                "skipped": {c.conv: c.reason for c in self.skipped},
                "pairs": [list(p) for p in self.pairs()], "counts": self.counts()}


def _skip_reason(conv: nn.Conv2d, kernel_sizes: Sequence[int]) -> str | None:
    """Why ``conv`` cannot become an RSDConv, or None when it can."""
    k = conv.kernel_size
    if k[0] != k[1] or k[0] % 2 == 0:
        return "kernel not square and odd"
    if k[0] not in kernel_sizes:
        return f"kernel {k[0]}x{k[1]} not restructured"
    if tuple(conv.dilation) != (1, 1):
        return "dilated"
    if isinstance(conv.padding, str) or tuple(conv.padding) != (k[0] // 2, k[1] // 2):
        return "padding not K//2"
    if conv.padding_mode != "zeros":
        return f"{conv.padding_mode} padding"
    return None


def _excluded(name: str, patterns: Iterable[str]) -> bool:
    """``name`` matches a pattern (fnmatch) or lies under a module a pattern names."""
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def find_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, bn)`` names where the conv's only consumer is the BN (needs torch.fx)."""
    try:
        return conv_bn_pairs(model)
    except TraceError as e:
        raise RSDError(f"{e}; pass the conv+BN pairs explicitly (pairs=[('conv', 'bn'), ...])") from None


def _check_pairs(model: nn.Module, pairs: Iterable[Sequence[str]]) -> dict[str, str]:
    modules = dict(model.named_modules())
    out: dict[str, str] = {}
    for pair in pairs:
        if len(pair) != 2:
            raise RSDError(f"a pair is (conv name, bn name), got {pair!r}")
        conv, bn = pair
        if type(modules.get(conv)) is not nn.Conv2d:
            raise RSDError(f"pair {conv!r}, {bn!r}: {conv!r} is not an nn.Conv2d of the model")
        if type(modules.get(bn)) is not nn.BatchNorm2d or not modules[bn].track_running_stats:
            raise RSDError(f"pair {conv!r}, {bn!r}: {bn!r} is not an nn.BatchNorm2d with running statistics")
        if modules[bn].num_features != modules[conv].out_channels:
            raise RSDError(f"pair {conv!r}, {bn!r}: {bn!r} has {modules[bn].num_features} channels, "
                           f"{conv!r} gives {modules[conv].out_channels}")
        out[conv] = bn
    return out


@torch.no_grad()
def rsd_conv_from(conv: nn.Conv2d, bn: nn.BatchNorm2d, *, num_square: int = 3,
                  equivalent_init: bool = False) -> RSDConv:
    """The RSDConv that takes the place of ``conv`` followed by ``bn``.

    Its BN keeps ``bn``'s eps and momentum. With ``equivalent_init`` the first KxK branch
    carries ``conv`` and ``bn`` (weights and running statistics) and every other branch
    starts with BN weight and bias 0, so in eval mode the block computes what the pair
    did; otherwise every branch is freshly initialised.
    """
    block = RSDConv(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
                    conv.groups, num_square=num_square, bn=True)
    if conv.stride[0] != conv.stride[1]:
        block.stride = tuple(conv.stride)
    block = block.to(device=conv.weight.device, dtype=conv.weight.dtype)
    block.bn.eps, block.bn.momentum = bn.eps, bn.momentum
    if not equivalent_init:
        return block
    nb, c = block.num_branches, conv.out_channels
    like = bn.running_mean
    weight, bias = like.new_zeros(nb, c), like.new_zeros(nb, c)
    mean, var = like.new_zeros(nb, c), like.new_ones(nb, c)
    weight[0] = bn.weight if bn.weight is not None else 1.0
    bias[0] = bn.bias if bn.bias is not None else 0.0
    mean[0] = bn.running_mean - (conv.bias if conv.bias is not None else 0.0)  # absorb a conv bias
    var[0] = bn.running_var
    block.weight_square[0].copy_(conv.weight)
    for target, values in ((block.bn.weight, weight), (block.bn.bias, bias),
                           (block.bn.running_mean, mean), (block.bn.running_var, var)):
        target.copy_(block.stack(values))
    block.bn.num_batches_tracked.copy_(bn.num_batches_tracked)
    return block


def restructure(
    model: nn.Module,
    *,
    kernel_sizes: Sequence[int] = DEFAULT_KERNEL_SIZES,
    num_square: int = 3,
    exclude: Iterable[str] = (),
    equivalent_init: bool = False,
    pairs: Iterable[Sequence[str]] | None = None,
) -> tuple[nn.Module, RestructureReport]:
    """A copy of ``model`` with every convertible conv+BN pair as one :class:`RSDConv`.

    Convertible: the conv's only consumer is the BN, a square odd kernel in
    ``kernel_sizes``, dilation 1, padding K//2, zero padding; any stride and groups.
    ``exclude`` holds module names or fnmatch patterns (a name also excludes the convs
    under it). ``pairs`` replaces the torch.fx search for models fx cannot trace. The
    input model is not modified. Returns the model and a report of every conv.
    """
    kernel_sizes = sorted({int(k) for k in kernel_sizes})
    if any(k < 3 or k % 2 == 0 for k in kernel_sizes):
        raise RSDError(f"kernel sizes must be odd and >= 3 (got {kernel_sizes})")
    if num_square < 1:
        raise RSDError(f"num_square must be >= 1 (got {num_square})")
    exclude = list(exclude)
    found = find_pairs(model) if pairs is None else pairs
    bn_of = _check_pairs(model, found)
    report = RestructureReport(kernel_sizes, num_square, exclude)
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    for name, conv in list(modules.items()):
        if not isinstance(conv, nn.Conv2d):
            continue
        bn = bn_of.get(name)
        reason = ("excluded" if _excluded(name, exclude)
                  else f"{type(conv).__name__} is not a plain nn.Conv2d" if type(conv) is not nn.Conv2d
                  else "not followed by BatchNorm2d alone" if bn is None
                  else _skip_reason(conv, kernel_sizes))
        report.convs.append(ConvEntry(name, list(conv.kernel_size), list(conv.stride), conv.groups,
                                      bn, reason is None, reason))
        if reason is None:
            block = rsd_conv_from(conv, modules[bn], num_square=num_square, equivalent_init=equivalent_init)
            block.train(conv.training)
            out.set_submodule(name, block)
            out.set_submodule(bn, nn.Identity())
    return out, report


def with_square_branches(model: nn.Module, num_square: int) -> nn.Module:
    """``model`` with every :class:`RSDConv` rebuilt with ``num_square`` KxK branches (fresh weights).

    The Kx1 and 1xK branches stay; 1 gives an ACNet-like block, 3 is the paper's. Each block
    keeps its geometry, its BN's eps and momentum, and its mode. Returns ``model``, changed in place.
    """
    if num_square < 1:
        raise RSDError(f"num_square must be >= 1 (got {num_square})")
    for name, block in [(n, m) for n, m in model.named_modules() if isinstance(m, RSDConv)]:
        if block.num_square == num_square:
            continue
        new = RSDConv(block.in_channels, block.out_channels, block.kernel_size[0], 1, block.groups,
                      num_square=num_square, bn=block.bn is not None, drop_rate=block.drop_rate)
        new.stride = block.stride
        if block.bn is not None:
            new.bn.eps, new.bn.momentum = block.bn.eps, block.bn.momentum
        new = new.to(device=block.weight_square.device, dtype=block.weight_square.dtype).train(block.training)
        model.set_submodule(name, new)
    return model


@torch.no_grad()
def load_equivalent(rsd: nn.Module, plain: nn.Module) -> nn.Module:
    """Start ``rsd`` (a zoo model's RSD form) computing exactly what ``plain`` (its plain form) does.

    Every :class:`RSDConv` of ``rsd`` takes the conv and BN of the ``ConvBN`` of the same
    name in ``plain`` in its first KxK branch, every other branch with BN weight and bias 0
    (:func:`rsd_conv_from` with ``equivalent_init``); every other tensor is copied by name.
    RSDError when the two are not the forms of one architecture. Returns ``rsd``.
    """
    from .blocks import ConvBN

    plain_modules = dict(plain.named_modules())
    state = plain.state_dict()
    blocks = {name: m for name, m in rsd.named_modules() if isinstance(m, RSDConv)}
    for name, block in blocks.items():
        src = plain_modules.get(name)
        if not isinstance(src, ConvBN) or src.bn is None:
            raise RSDError(f"{name!r} has no conv+BN in the plain model to start its RSD block from "
                           f"(found {type(src).__name__}): only blocks followed by BatchNorm can start equivalent")
        start = rsd_conv_from(src.conv, src.bn, num_square=block.num_square, equivalent_init=True)
        block.load_state_dict(start.state_dict())
        for key in list(state):
            if key.startswith(f"{name}."):
                del state[key]
    own = {k: v for k, v in rsd.state_dict().items() if not any(k.startswith(f"{n}.") for n in blocks)}
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        first = sorted(set(own) ^ set(state)) or [k for k in own if own[k].shape != state[k].shape]
        raise RSDError(f"the plain model does not match the RSD form outside its blocks: first mismatch {first[0]!r}")
    rsd.load_state_dict(state, strict=False)
    return rsd
