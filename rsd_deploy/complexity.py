"""Parameter and multiply-add counts of a model, for tables and sanity checks."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import RSDConv


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, RSDConv):
        # The maths of the block: num_square KxK kernels plus one Kx1 and one 1xK.
        k = module.kernel_size[0]
        per_output = (module.in_channels // module.groups) * (module.num_square * k * k + 2 * k)
        return out.numel() * per_output
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-adds of convolutions and linear layers for one ``(C, H, W)`` input."""
    total = 0

    def hook(module: nn.Module, _inputs, out: torch.Tensor) -> None:
        nonlocal total
        total += _conv_macs(module, out)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (RSDConv, nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def model_table(num_classes: int | None = None) -> str:
    """A text table of every zoo architecture in its RSD training form and deployed form."""
    from . import models

    rows = [("model", "family", "input", "train params", "train MACs", "deploy params", "deploy MACs")]
    for name in models.names():
        spec = models.get_spec(name)
        classes = num_classes or (1000 if spec.family == "imagenet" else 100)
        shape = (3, spec.input_size, spec.input_size)
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            rsd = models.create(name, num_classes=classes, form="rsd")
            deploy = models.create(name, num_classes=classes, form="deploy")
        rows.append((
            name, spec.family, f"{spec.input_size}x{spec.input_size}",
            human(count_params(rsd)), human(count_macs(rsd, shape)),
            human(count_params(deploy)), human(count_macs(deploy, shape)),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + (
        "\n\nParameters and MACs (conv and linear multiply-adds, one image) with the "
        "family's usual class count (CIFAR-100: 100, ImageNet: 1000)."
    )


def human(n: int) -> str:
    """``n`` with a K, M or G suffix."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
