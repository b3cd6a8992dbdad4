"""Training-mode BatchNorm of stacked branch outputs, branch drop and their sum, as one op.

:class:`~rsd_deploy.blocks.RSDConv` computes its branches with three convolutions whose
outputs hold the channels of all branches. In training, each branch output is batch-
normalised, dropped per sample and summed. Written with ``F.batch_norm`` and
multiply-adds, that is several passes over every branch output forward and backward
(normalised copies, masked gradients, a ``cat`` of the split gradients), each writing
fresh memory. Here the whole of it is one autograd op with a hand-derived backward:

forward   per-row sums give each channel's batch mean and variance; the output is
          ``sum_b s[n, b, c] * z_b + t[n, c]`` with the BN scale and the mask folded into
          per-sample, per-channel factors, so no normalised branch output is stored;
backward  with ``dy`` the output's gradient, ``m_b`` the mask and ``a_b = gamma_b / sigma_b``,
          BN's gradient ``dz_b = a_b (m_b dy - mean(m_b dy) - xhat_b mean(m_b dy xhat_b))``
          is ``p[n, b, c] dy + q[b, c] z_b + r[b, c]``; it is written into the memory of the
          saved ``z_b``, which nothing else needs (a second backward through the same graph
          is refused by autograd, as for any op whose saved tensors changed).

The fp64 equivalence tests against the per-branch reference (``tests/test_blocks.py``)
cover outputs, gradients of every parameter and running statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def _branch_view(z: Tensor, groups: int, channels: int) -> Tensor:
    """``(n, groups*k*cg, h, w)`` in ``(group, branch, channel)`` order -> ``(n, g, k, cg, h*w)``.

    A view (written through) for NCHW and channels-last tensors, as convolutions return.
    """
    n, _, h, w = z.shape
    return z.view(n, groups, -1, channels // groups, h * w)


def _to_channels(per_part: Sequence[Tensor], views: Sequence[Tensor]) -> Tensor:
    """Broadcast one ``(n, g or 1, k or 1, cg or 1)`` tensor per part to ``(n, channels in BN order)``."""
    return torch.cat([t.expand(*v.shape[:4]).flatten(1) for t, v in zip(per_part, views, strict=True)], 1)


def _branch_columns(keep: Tensor, views: Sequence[Tensor]) -> list[Tensor]:
    """The mask ``(n, branches)`` split into one ``(n, 1, k, 1)`` block per part."""
    return [c[:, None, :, None] for c in keep.split([v.shape[2] for v in views], dim=1)]


def _flat(values: Tensor, views: Sequence[Tensor]) -> list[Tensor]:
    """``(n or 1, channels in BN order)`` -> one ``(n or 1, g, k, cg, 1)`` view per part."""
    sizes = [v.shape[1] * v.shape[2] * v.shape[3] for v in views]
    return [t.view(len(values), *v.shape[1:4], 1) for t, v in zip(values.split(sizes, dim=1), views, strict=True)]


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype to do arithmetic in: float32 for the half types autocast gives, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _sum_of_squares(v: Tensor) -> Tensor:
    """``(v * v).sum(-1)`` without a squared copy, on the faster kernel for ``v``'s strides."""
    if v.stride(-1) == 1:  # NCHW: rows are contiguous
        return torch.linalg.vector_norm(v, dim=-1, dtype=_opmath(v.dtype)).square_()
    return torch.linalg.vecdot(v, v, dim=-1).to(_opmath(v.dtype))  # channels-last (the norm is ~10x slower there)


def _moments(views: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance of every channel (BN order) of the parts' views.

    One pass: per-row sums of ``z`` and ``z^2`` (in at least float32), combined over the
    batch in float64. ``E[z^2] - E[z]^2`` loses digits when a channel's mean is large
    against its spread; the caller's convolutions subtract a running estimate of the
    mean (the shifted-data algorithm), which keeps that ratio small.
    """
    sums = torch.cat([v.sum(-1, dtype=_opmath(v.dtype)).flatten(1) for v in views], 1)
    squares = torch.cat([_sum_of_squares(v).flatten(1) for v in views], 1)
    size = sums.shape[0] * views[0].shape[-1]
    mean = sums.double().sum(0) / size
    var = (squares.double().sum(0) / size - mean.square()).clamp_min(0.0)
    return mean, var


class _BranchNormSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor, mask: Tensor | None, eps: float,
                groups: int, *parts: Tensor):
        out_ch = parts[-1].shape[1]
        views = [_branch_view(z, groups, out_ch) for z in parts]
        mean, var = _moments(views)
        mean, var = mean.to(weight.dtype), var.to(weight.dtype)
        invstd = torch.rsqrt(var + eps)
        n = parts[0].shape[0]
        if mask is None:
            mask = weight.new_ones(n, sum(v.shape[2] for v in views))
        keep = _to_channels(_branch_columns(mask.to(weight.dtype), views), views)  # (n, channels)
        scale = keep * (weight * invstd)  # (n, channels): BN scale and drop, per sample
        shift = keep * (bias - mean * weight * invstd)

        out = torch.empty_like(parts[-1])  # the conv outputs' layout
        out_view = _branch_view(out, groups, out_ch)[:, :, 0]  # (n, g, cg, hw), written through
        opmath = _opmath(out.dtype)  # half types (autocast): sum in float32, round once
        total = out_view if opmath == out.dtype else torch.empty_like(out_view, dtype=opmath)
        total.copy_(sum(t.sum(2) for t in _flat(shift, views)))
        for v, f in zip(views, _flat(scale.to(opmath), views), strict=True):
            for j in range(v.shape[2]):
                total.addcmul_(v[:, :, j], f[:, :, j])
        if total is not out_view:
            out_view.copy_(total)

        ctx.save_for_backward(weight, keep, mean, invstd, *parts)
        ctx.groups = groups
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, _grad_mean: Tensor, _grad_var: Tensor):
        weight, keep, mean, invstd, *parts = ctx.saved_tensors
        groups, out_ch = ctx.groups, grad_out.shape[1]
        views = [_branch_view(z, groups, out_ch) for z in parts]
        n, _, h, w = grad_out.shape
        dy = grad_out.reshape(n, groups, 1, out_ch // groups, h * w)  # any strides autograd hands us
        size = n * h * w

        opmath = _opmath(views[0].dtype)  # half types (autocast): float32 arithmetic
        dy = dy.to(opmath)
        dy_sum = _to_channels([dy.sum(-1)] * len(views), views)  # (n, channels)
        dy_z = torch.cat([(v.to(opmath) * dy).sum(-1).flatten(1) for v in views], 1)
        grad_bias = (keep * dy_sum).sum(0).to(weight.dtype)
        grad_weight = invstd * ((keep * dy_z).sum(0).to(weight.dtype) - mean * grad_bias)
        # BN's input gradient, dz = p * dy + q * z + r, written over the saved z.
        a = weight * invstd
        q = -a * grad_weight * invstd / size
        r = -a * grad_bias / size - q * mean
        p = keep * a
        for v, p_i, q_i, r_i in zip(views, *(_flat(t.to(opmath), views) for t in (p, q[None], r[None])), strict=True):
            if v.dtype == opmath:
                v.mul_(q_i).add_(r_i).addcmul_(dy, p_i)
            else:  # one rounding to the half type
                v.copy_(v.to(opmath).mul_(q_i).add_(r_i).addcmul_(dy, p_i))
        grads = [z.detach() for z in parts]
        return grad_weight, grad_bias, None, None, None, *grads


def branch_norm_sum(parts: Sequence[Tensor], bn: nn.BatchNorm2d, groups: int,
                    mask: Tensor | None, shift: Tensor | None = None) -> Tensor:
    """``sum_b mask[:, b] * BN_b(z_b)`` over the branches held in ``parts``, with batch statistics.

    ``parts`` are convolution outputs ``(n, groups*k*cg, h, w)`` whose channels, in BN's
    order, are ``(group, branch, channel)``; all parts together hold ``bn``'s channels.
    ``shift`` (BN order, optional) is a per-channel value already subtracted from the
    parts, for example by the convolutions' bias; BN does not change under it, and a
    shift near the batch mean keeps the one-pass variance accurate. ``mask`` is
    ``(n, branches)`` or None (no drop). Updates ``bn``'s running statistics as
    ``nn.BatchNorm2d`` does in training (unbiased variance, momentum or cumulative
    average). Gradients flow to ``parts``, ``bn.weight`` and ``bn.bias``.
    """
    n, _, h, w = parts[0].shape
    size = n * h * w
    if size < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(parts[0].shape)}"
        )
    out, mean, var = _BranchNormSum.apply(bn.weight, bn.bias, mask, bn.eps, groups, *parts)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            if shift is not None:
                mean = mean + shift
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean, momentum)
            bn.running_var.lerp_(var * (size / (size - 1)), momentum)
    return out
