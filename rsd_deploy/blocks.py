"""Reparameterizable convolution blocks.

Every block here is, at inference time, exactly one ``nn.Conv2d`` with bias. Each
answers the same protocol (:class:`Reparameterizable`): its equivalent kernel and
bias, from which :func:`rsd_deploy.fuse_model` builds the plain convolution.

* :class:`ConvBN` is the plain network's conv + BatchNorm (or conv with bias).
* :class:`RSDConv` is RSD's restructured teacher: ``num_square`` KxK conv-BN
  branches, one Kx1 and one 1xK conv-BN branch, summed; in the student pass each
  branch output is dropped per sample (branch drop).

Models are written once against :func:`conv_block` / :func:`norm_layer`, which
return the right module for the requested form: ``"rsd"`` (multi-branch training
form), ``"plain"`` (conv+BN baseline) or ``"deploy"`` (fused: conv with bias).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .branch_norm import branch_norm_sum

Form = Literal["rsd", "plain", "deploy"]
FORMS: tuple[str, ...] = ("rsd", "plain", "deploy")

#: Kernel sizes that the RSD form restructures. The asymmetric Kx1 / 1xK branches
#: must sit on the centre column / row of the KxK kernel with the same "same"
#: padding, which needs an odd K; 1x1 and K >= 7 stay conv+BN as in the paper.
RESTRUCTURED_KERNELS: tuple[int, ...] = (3, 5)


class Reparameterizable(nn.Module):
    """A block that collapses into one convolution for inference.

    Subclasses set the convolution geometry below and implement
    :meth:`equivalent_kernel_bias`, which must use BatchNorm running statistics.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """Kernel ``(out, in/groups, kh, kw)`` and bias ``(out,)`` of the eval-mode block."""
        raise NotImplementedError

    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        """The single ``nn.Conv2d`` (with bias) equal to this block in eval mode."""
        kernel, bias = self.equivalent_kernel_bias()
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            groups=self.groups,
            bias=True,
            device=kernel.device,
            dtype=kernel.dtype,
        )
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        return conv


def fold_batchnorm(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` with ``bn(x) == x * scale + shift`` in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm2d without running statistics")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """``conv`` followed by ``bn`` (eval mode) as one conv with bias, of ``conv``'s geometry."""
    scale, shift = fold_batchnorm(bn)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    fused.bias.copy_(shift if conv.bias is None else conv.bias * scale + shift)
    return fused


def _check_geometry(in_channels: int, out_channels: int, groups: int) -> None:
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(
            f"in_channels ({in_channels}) and out_channels ({out_channels}) "
            f"must both be divisible by groups ({groups})"
        )


def _init_conv_weight(weight: Tensor) -> None:
    # torchvision's ResNet initialisation, applied branch by branch.
    nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")


class ConvBN(Reparameterizable):
    """``Conv2d`` followed by ``BatchNorm2d``; with ``bn=False`` a conv with bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        *,
        bn: bool = True,
    ) -> None:
        super().__init__()
        _check_geometry(in_channels, out_channels, groups)
        padding = kernel_size // 2 if padding is None else padding
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = (stride, stride)
        self.padding = (padding, padding)
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=not bn
        )
        _init_conv_weight(self.conv.weight)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        self.bn = nn.BatchNorm2d(out_channels) if bn else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.bn(y) if self.bn is not None else y

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel = self.conv.weight
        if self.bn is None:
            return kernel, self.conv.bias
        scale, shift = fold_batchnorm(self.bn)
        return kernel * scale.view(-1, 1, 1, 1), shift


def _memory_format(x: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a channels-last 4-D tensor, else ``torch.contiguous_format``."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def drop_mask(batch: int, branches: int, p: float, *, device=None, dtype=None) -> Tensor:
    """Per-sample, per-branch keep mask ``(batch, branches)``: 0, or 1/(1-p) when kept."""
    keep = 1.0 - p
    return torch.empty(batch, branches, device=device, dtype=dtype).bernoulli_(keep).div_(keep)


class RSDConv(Reparameterizable):
    """RSD's restructured KxK convolution: ``num_square`` KxK, one Kx1 and one 1xK branch.

    Each branch is conv-BN (or, with ``bn=False``, a conv with bias, for convs that
    are not followed by BN in the original network); the block outputs their sum.
    The Kx1 / 1xK branches use paddings (K//2, 0) / (0, K//2), so their outputs line
    up with the KxK ones at every position, borders and strides included.

    The training forward uses three convolutions whatever ``num_square`` is: all KxK
    kernels stacked along the output channels in one, and the Kx1 and 1xK kernels at
    their true sizes (zero-padding them into KxK would cost (K-1)/K more of their
    multiply-adds, which measured slower on CPU). One BatchNorm holds the statistics
    of all branches' channels (BN is per channel, so this equals a BN per branch). In
    training, BN with batch statistics, branch drop and the sum are one fused op
    (:func:`rsd_deploy.branch_norm.branch_norm_sum`); in eval, BN is applied to the
    three outputs through views of its vectors. Channel order of ``bn``: the KxK
    branches as the grouped convolution orders them, ``(group, branch, channel)``,
    then the Kx1 channels, then the 1xK channels; :meth:`unstack` gives per-branch views.

    ``drop_rate`` is the branch-drop probability of the student pass: in training
    mode each branch output of each sample is zeroed with that probability and kept
    outputs are scaled by 1/(1-p). It has no effect in eval mode.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        *,
        num_square: int = 3,
        bn: bool = True,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        _check_geometry(in_channels, out_channels, groups)
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(
                f"RSDConv needs an odd kernel size >= 3 (got {kernel_size}): the Kx1 and "
                "1xK branches must sit on the centre column and row of the KxK kernel"
            )
        if num_square < 1:
            raise ValueError(f"num_square must be >= 1 (got {num_square})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = (stride, stride)
        self.padding = (kernel_size // 2, kernel_size // 2)
        self.num_square = num_square
        self.num_branches = num_square + 2
        self.drop_rate = drop_rate

        k, cin = kernel_size, in_channels // groups
        self.weight_square = nn.Parameter(torch.empty(num_square, out_channels, cin, k, k))
        self.weight_vertical = nn.Parameter(torch.empty(out_channels, cin, k, 1))
        self.weight_horizontal = nn.Parameter(torch.empty(out_channels, cin, 1, k))
        if bn:
            self.bn: nn.BatchNorm2d | None = nn.BatchNorm2d(self.num_branches * out_channels)
            self.register_parameter("bias", None)
        else:
            self.bn = None
            self.bias = nn.Parameter(torch.empty(self.num_branches, out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (*self.weight_square, self.weight_vertical, self.weight_horizontal):
            _init_conv_weight(w)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.bn is not None:
            self.bn.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, groups={self.groups}, num_square={self.num_square}, "
            f"bn={self.bn is not None}, drop_rate={self.drop_rate}"
        )

    # Branch layout helpers -----------------------------------------------------------

    def branch_kernels(self) -> Tensor:
        """All branch kernels embedded in KxK: ``(num_branches, out, in/groups, K, K)``."""
        p = self.padding[0]
        vertical = F.pad(self.weight_vertical, (p, p, 0, 0))
        horizontal = F.pad(self.weight_horizontal, (0, 0, p, p))
        return torch.cat([self.weight_square, vertical[None], horizontal[None]])

    def _group_major(self, square: Tensor) -> Tensor:
        """``(num_square, out, ...)`` -> the grouped conv's order ``(groups*num_square*out/groups, ...)``."""
        g, n, rest = self.groups, self.num_square, square.shape[2:]
        t = square.reshape(n, g, self.out_channels // g, *rest).transpose(0, 1)
        return t.reshape(n * self.out_channels, *rest)

    def unstack(self, stacked: Tensor) -> Tensor:
        """Per-channel values in ``bn``'s order ``(num_branches*out, ...)`` -> ``(num_branches, out, ...)``."""
        g, n, c = self.groups, self.num_square, self.out_channels
        rest = stacked.shape[1:]
        square = stacked[: n * c].reshape(g, n, c // g, *rest).transpose(0, 1).reshape(n, c, *rest)
        return torch.cat([square, stacked[n * c :].reshape(2, c, *rest)])

    def stack(self, per_branch: Tensor) -> Tensor:
        """The inverse of :meth:`unstack`: ``(num_branches, out, ...)`` -> ``bn``'s order."""
        g, n, c = self.groups, self.num_square, self.out_channels
        rest = per_branch.shape[2:]
        square = per_branch[:n].reshape(n, g, c // g, *rest).transpose(0, 1).reshape(n * c, *rest)
        return torch.cat([square, per_branch[n:].reshape(2 * c, *rest)])

    # Forward ---------------------------------------------------------------------------

    def _conv_outputs(self, x: Tensor, bias: Tensor | None) -> list[Tensor]:
        """The KxK branches (stacked, in ``bn``'s channel order), the Kx1 and the 1xK branch.

        ``bias`` holds one value per branch channel in ``bn``'s order, or is None.
        """
        n, c, p = self.num_square, self.out_channels, self.padding[0]
        biases = [None] * 3 if bias is None else bias.split([n * c, c, c])
        return [
            F.conv2d(x, self._group_major(self.weight_square), biases[0], self.stride, p, 1, self.groups),
            F.conv2d(x, self.weight_vertical, biases[1], self.stride, (p, 0), 1, self.groups),
            F.conv2d(x, self.weight_horizontal, biases[2], self.stride, (0, p), 1, self.groups),
        ]

    def _bias_in_bn_order(self) -> Tensor:
        """The branch biases of a block without BN, in the stacked channel order."""
        n = self.num_square
        return torch.cat([self._group_major(self.bias[:n]), self.bias[n], self.bias[n + 1]])

    def forward(self, x: Tensor) -> Tensor:
        p = self.drop_rate if self.training else 0.0
        bn = self.bn
        if bn is None and p == 0.0:
            # Without BN and without drop the block is linear: one conv, summed kernel.
            return F.conv2d(
                x, self.branch_kernels().sum(0), self.bias.sum(0), self.stride, self.padding,
                groups=self.groups,
            )
        mask = None
        if p > 0.0:
            mask = drop_mask(x.shape[0], self.num_branches, p, device=x.device, dtype=x.dtype)
        if bn is not None and (self.training or bn.running_mean is None):
            # Batch statistics: BN, drop and sum as one op (rsd_deploy.branch_norm). The
            # convolutions subtract the running mean through their bias, which BN does not
            # see and which keeps the one-pass variance accurate.
            shift = bn.running_mean  # branch_norm_sum reads it before updating it
            outputs = self._conv_outputs(x, None if shift is None else -shift)
            return branch_norm_sum(outputs, bn, self.groups, mask, shift)
        outputs = self._conv_outputs(x, None if bn is not None else self._bias_in_bn_order())
        if bn is not None:  # eval: BN with running statistics, through views of bn's vectors
            n, c = self.num_square, self.out_channels
            sections = [slice(0, n * c), slice(n * c, (n + 1) * c), slice((n + 1) * c, (n + 2) * c)]
            outputs = [
                F.batch_norm(y, bn.running_mean[s], bn.running_var[s], bn.weight[s], bn.bias[s],
                             False, 0.0, bn.eps)
                for y, s in zip(outputs, sections, strict=True)
            ]
        square, vertical, horizontal = outputs
        c = self.out_channels
        if self.groups == 1:  # the stacked KxK branches are channel blocks (one: nothing to split)
            squares = square.split(c, dim=1) if self.num_square > 1 else [square]
            return self._sum_branches([*squares, vertical, horizontal], mask)
        # Grouped: the stacked output is ordered (group, branch, channel), so the branches
        # are slices of a (group, branch, channel) view; sum them there and return the
        # input's layout.
        b, _, h, w = square.shape
        g = self.groups
        parts = [*square.view(b, g, self.num_square, c // g, h, w).unbind(2),
                 vertical.view(b, g, c // g, h, w), horizontal.view(b, g, c // g, h, w)]
        out = self._sum_branches(parts, mask).reshape(b, c, h, w)
        return out.contiguous(memory_format=_memory_format(x))

    @staticmethod
    def _sum_branches(outputs: list[Tensor], mask: Tensor | None) -> Tensor:
        """``sum_i mask[:, i] * outputs[i]`` as a chain of fused multiply-adds.

        Every operand keeps the input's memory format (``split`` makes channel views, whose
        gradients ``cat`` joins back), so channels-last inputs stay on fast kernels.
        """
        if mask is None:
            return sum(outputs[1:], outputs[0])
        keep = mask.to(outputs[0].dtype).view(*mask.shape, *[1] * (outputs[0].dim() - 1)).unbind(1)
        out = outputs[0] * keep[0]
        for y, k in zip(outputs[1:], keep[1:], strict=True):
            out = torch.addcmul(out, y, k)
        return out

    # Reparameterization ----------------------------------------------------------------

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernels = self.branch_kernels()
        if self.bn is None:
            return kernels.sum(0), self.bias.sum(0)
        scale, shift = fold_batchnorm(self.bn)
        scale, shift = self.unstack(scale), self.unstack(shift)
        return (kernels * scale[:, :, None, None, None]).sum(0), shift.sum(0)


class Affine2d(nn.Module):
    """Per-channel scale and shift: an eval-mode ``BatchNorm2d`` with its statistics folded.

    Stands where the architecture itself has a BatchNorm that no convolution can
    absorb (DenseNet's pre-activation BN-ReLU-conv), so deployed models hold no BN.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    @classmethod
    @torch.no_grad()
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "Affine2d":
        scale, shift = fold_batchnorm(bn)
        affine = cls(bn.num_features).to(device=scale.device, dtype=scale.dtype)
        affine.weight.copy_(scale)
        affine.bias.copy_(shift)
        return affine

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return str(self.num_features)


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {', '.join(FORMS)}")


def conv_block(
    form: Form,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    *,
    bn: bool = True,
) -> nn.Module:
    """A "same"-padded KxK convolution unit in the requested form.

    ``bn`` says whether the architecture follows this conv with BatchNorm; without
    it the conv (and, in the RSD form, every branch) has a bias instead.
    """
    _check_form(form)
    if form == "deploy":
        return nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups
        )
    if form == "rsd" and kernel_size in RESTRUCTURED_KERNELS:
        return RSDConv(in_channels, out_channels, kernel_size, stride, groups, bn=bn)
    return ConvBN(in_channels, out_channels, kernel_size, stride, groups=groups, bn=bn)


def norm_layer(form: Form, num_features: int) -> nn.Module:
    """A standalone BatchNorm (one no conv can absorb) in the requested form."""
    _check_form(form)
    return Affine2d(num_features) if form == "deploy" else nn.BatchNorm2d(num_features)


def set_branch_drop(model: nn.Module, p: float) -> int:
    """Set the branch-drop rate of every :class:`RSDConv` in ``model``; returns how many.

    Only an attribute changes (no module is replaced), so optimizers, hooks and
    ``torch.compile`` keep working.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"branch-drop rate must be in [0, 1) (got {p})")
    blocks = [m for m in model.modules() if isinstance(m, RSDConv)]
    for m in blocks:
        m.drop_rate = float(p)
    return len(blocks)
