"""The plain per-branch RSD block: the reference the fast :class:`RSDConv` must equal.

Five separate conv(-BN) modules with their own paddings, each output dropped with
its own per-sample mask, then summed: the method written out literally.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from rsd_deploy.blocks import RSDConv, drop_mask


class ReferenceRSDConv(nn.Module):
    def __init__(self, fast: RSDConv) -> None:
        """Copy the geometry and current parameters / statistics of ``fast``."""
        super().__init__()
        k, s, g = fast.kernel_size[0], fast.stride[0], fast.groups
        p = k // 2
        cin, cout, bn = fast.in_channels, fast.out_channels, fast.bn is not None
        shapes = [((k, k), (p, p))] * fast.num_square + [((k, 1), (p, 0)), ((1, k), (0, p))]
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, ks, s, pad, groups=g, bias=not bn) for ks, pad in shapes
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(cout) for _ in shapes) if bn else None
        self.drop_rate = fast.drop_rate
        self.to(fast.weight_square.dtype)
        with torch.no_grad():
            weights = [*fast.weight_square, fast.weight_vertical, fast.weight_horizontal]
            for conv, w in zip(self.convs, weights, strict=True):
                conv.weight.copy_(w)
            if bn:
                per_branch = {
                    name: fast.unstack(getattr(fast.bn, name))
                    for name in ("weight", "bias", "running_mean", "running_var")
                }
                for b, ref_bn in enumerate(self.bns):
                    for name, value in per_branch.items():
                        getattr(ref_bn, name).copy_(value[b])
                    ref_bn.num_batches_tracked.copy_(fast.bn.num_batches_tracked)
            else:
                for conv, bias in zip(self.convs, fast.bias, strict=True):
                    conv.bias.copy_(bias)

    def forward(self, x: Tensor) -> Tensor:
        p = self.drop_rate if self.training else 0.0
        mask = drop_mask(x.shape[0], len(self.convs), p, device=x.device, dtype=x.dtype) if p else None
        out = 0
        for b, conv in enumerate(self.convs):
            y = conv(x)
            if self.bns is not None:
                y = self.bns[b](y)
            if mask is not None:
                y = y * mask[:, b].view(-1, 1, 1, 1)
            out = out + y
        return out


def fast_param_grads(fast: RSDConv) -> dict[str, Tensor]:
    """Gradients of the fast block, per branch, in the reference's layout."""
    grads = {
        f"convs.{b}.weight": w for b, w in enumerate(
            [*fast.weight_square.grad, fast.weight_vertical.grad, fast.weight_horizontal.grad]
        )
    }
    if fast.bn is not None:
        for name in ("weight", "bias"):
            for b, g in enumerate(fast.unstack(getattr(fast.bn, name).grad)):
                grads[f"bns.{b}.{name}"] = g
    else:
        for b, g in enumerate(fast.bias.grad):
            grads[f"convs.{b}.bias"] = g
    return grads


def to_reference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`RSDConv` replaced by its per-branch reference."""
    model = copy.deepcopy(model)

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, RSDConv):
                setattr(module, name, ReferenceRSDConv(child))
            else:
                swap(child)

    swap(model)
    return model
