"""Precise BatchNorm: re-estimate running statistics of the network that is evaluated.

During RSD training the running statistics are updated by two different networks: the
student pass (branch drop) and the teacher pass (3B rows, mixed features included).
Evaluation and fusion use neither: they use the clean teacher. :func:`update_bn_stats`
replaces every BatchNorm's running mean and variance by the equally weighted average of
the batch statistics of ``num_batches`` clean forward passes (train mode, no branch
drop, no mixture), as torch.optim.swa_utils.update_bn and fvcore's precise BN do.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..blocks import set_branch_drop


@torch.no_grad()
def update_bn_stats(model: nn.Module, batches: Iterable[Tensor | tuple], num_batches: int,
                    device: torch.device | str | None = None) -> int:
    """Re-estimate the running statistics of every BatchNorm in ``model``; returns the batches used.

    ``batches`` yields inputs (or ``(inputs, labels)`` pairs); the first ``num_batches``
    are used. Each running mean is the average of the batch means, each running variance
    the average of the unbiased batch variances. Parameters, the train/eval mode and the
    BN momenta are left as they were.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms or num_batches <= 0:
        return 0
    momenta = [bn.momentum for bn in norms]
    was_training = model.training
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
    model.train()
    set_branch_drop(model, 0.0)
    used = 0
    try:
        for batch in batches:
            if used >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device) if device is not None else x)
            used += 1
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    return used
