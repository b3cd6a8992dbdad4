"""Training-run directories for the export tests, made without the trainer.

One place to switch to a short real ``rsd-deploy train --max-steps`` run once the
trainer lands: every export test gets its runs from :func:`make_run`.

The model is made "trained-looking": BatchNorm running statistics and affine
parameters are randomized (an untrained net has mean 0 / var 1 / weight 1 /
bias 0, which would hide a fusion that ignores them), then a few SGD steps on
real images move the weights and statistics as training does.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

import rsd_deploy
from rsd_deploy import models
from rsd_deploy.data import load_datasets
from rsd_deploy.run import save_run


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
            m.weight.copy_(0.5 + torch.rand(n, generator=generator))
            m.bias.copy_(0.2 * torch.randn(n, generator=generator))


@lru_cache(maxsize=2)
def _datasets(data_dir: str):
    return load_datasets("imagefolder", data_dir, input_size=32)


def fit_head(model: nn.Module, train, n: int, generator: torch.Generator) -> None:
    """Fit ``model.head``'s final linear layer to ``n`` training images (body frozen, eval)."""
    idx = torch.randperm(len(train), generator=generator)[:n].tolist()
    x, y = zip(*(train[i] for i in idx))
    x, y = torch.stack(x), torch.tensor(y)
    linear = model.head[-1]
    with torch.no_grad():
        feats = torch.cat([model.head[:-1](model.forward_to(c, len(model.stages))) for c in x.split(128)])
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    z = (feats - mu) / sd
    w = torch.zeros(linear.out_features, z.shape[1], requires_grad=True)
    b = torch.zeros(linear.out_features, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ w.T + b, y) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardization into the layer
        linear.weight.copy_(w / sd)
        linear.bias.copy_(b - (w / sd) @ mu)


def make_run(
    run_dir: str | Path,
    name: str,
    data_dir: str | Path,
    *,
    steps: int = 3,
    batch_size: int = 32,
    seed: int = 0,
    form: str = "rsd",
    probe: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """Write a run directory for ``name`` trained ``steps`` SGD steps on ``data_dir``.

    ``probe > 0`` then fits the final linear layer on the features of ``probe``
    training images (a linear probe), so that the model predicts varied classes
    with better than chance accuracy, as a trained one does, without the cost of
    training the whole network on CPU.

    Returns the model (eval mode) and its ``run.json`` contents.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train, _, info = _datasets(str(data_dir))
    model = models.create(name, num_classes=info.num_classes, form=form)
    randomize_batchnorm(model, g)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    order = torch.randperm(len(train), generator=g)
    model.train()
    loss = None
    for step in range(steps):
        idx = order[step * batch_size:(step + 1) * batch_size].tolist()
        x, y = zip(*(train[i] for i in idx))
        loss = nn.functional.cross_entropy(model(torch.stack(x)), torch.tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    if probe:
        fit_head(model, train, probe, g)
    meta = {
        "model": name,
        "form": form,
        "method": "rsd" if form == "rsd" else "baseline",
        "num_classes": info.num_classes,
        "in_channels": info.in_channels,
        "input_size": list(info.input_size),
        "classes": list(info.classes),
        "normalization": {"mean": list(info.mean), "std": list(info.std)},
        "data": info.to_json(),
        "config": {"model": name, "data": "imagefolder", "data_dir": str(data_dir),
                   "steps": steps, "batch_size": batch_size, "lr": 0.02, "seed": seed,
                   "made_by": "tests/helpers_runs.py (stand-in for rsd-deploy train)"},
        "versions": {"rsd_deploy": rsd_deploy.__version__, "torch": torch.__version__},
        "metrics": {"steps": steps, "final_loss": None if loss is None else float(loss.detach()),
                    "linear_probe_images": probe},
    }
    save_run(run_dir, model, meta)
    return model, meta
