"""Training-run directories for the export tests, made by the real trainer.

:func:`make_run` runs ``rsd_deploy.training.train`` (what ``rsd-deploy train`` runs)
for a few steps on real images. A few steps leave an untrained net that predicts
nearly one class, which would make a top-1 comparison unable to fail; ``probe``
then fits the final linear layer on the trained body's features (a linear probe),
so the model predicts varied classes as a trained one does, without the cost of
training the whole network on CPU.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsd_deploy.data import load_datasets
from rsd_deploy.run import load_run, save_run
from rsd_deploy.training import TrainConfig, train


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
    """Train ``name`` for ``steps`` steps on ``data_dir`` into ``run_dir``; optionally probe.

    Returns the model (eval mode) and its ``run.json`` contents.
    """
    config = TrainConfig(
        model=name, method="rsd" if form == "rsd" else "baseline", data="imagefolder",
        data_dir=str(data_dir), epochs=1, max_steps=steps, batch_size=batch_size, seed=seed,
        train_samples=steps * batch_size, val_samples=64, workers=0,
    )
    train(config, run_dir, quiet=True)
    model, meta = load_run(run_dir)
    if probe:
        train_ds, _, _ = _datasets(str(data_dir))
        fit_head(model, train_ds, probe, torch.Generator().manual_seed(seed))
        meta["metrics"]["linear_probe_images"] = probe
        save_run(run_dir, model, meta)
    return model, meta
