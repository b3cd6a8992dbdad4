"""Validation accuracy of a model, and of a saved run on its own validation split."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import eval_dataset
from ..errors import RSDError, option
from ..run import load_run
from .distributed import resolve_device


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, *,
             amp: bool = False) -> dict[str, float]:
    """Top-1 and top-5 accuracy (top-k with k <= number of classes) and mean CE loss."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(x).float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            correct1 += int(hit[:, 0].sum())
            correct5 += int(hit.any(1).sum())
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise RSDError("the validation split is empty")
    return {"top1": correct1 / total, "top5": correct5 / total, "loss": loss_sum / total}


def cpu_has_bf16() -> bool:
    """Whether the CPU has bfloat16 instructions (AVX512-BF16 or AMX-BF16).

    Read from Linux's CPU flags: oneDNN's own check also accepts plain AVX-512, where
    bfloat16 is emulated and slower than float32. Elsewhere, oneDNN's check.
    """
    try:
        flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    except OSError:
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check is not None and check())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype of ``amp`` on ``device``: float16 on CUDA (with gradient
    scaling), bfloat16 on a CPU with bfloat16 instructions; an :class:`RSDError` elsewhere."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        if not cpu_has_bf16():
            raise RSDError("mixed precision on the CPU needs bfloat16 instructions "
                           "(AVX512-BF16 or AMX), which this CPU lacks")
        return torch.bfloat16
    raise RSDError(f"mixed precision is supported on CUDA and CPU devices, not {device.type}")


def autocast(device: torch.device, amp: bool):
    """Autocast to :func:`amp_dtype` when ``amp``; a no-op context otherwise."""
    if amp:
        return torch.autocast(device.type, dtype=amp_dtype(device))
    return contextlib.nullcontext()


def evaluate_run(run_dir: str | os.PathLike, *, data_dir: str | None = None, batch_size: int = 256,
                 device: str = "auto", workers: int = 2) -> dict:
    """Top-1 / top-5 of the run in ``run_dir`` (training or deploy form) on its validation split."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RSDError(f"{option('batch_size')} must be at least 1 (got {batch_size})")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise RSDError(f"{option('workers')} must be >= 0 (got {workers})")
    model, run = load_run(run_dir)
    if run.data is None:
        raise RSDError(f"{run_dir}/run.json records no data set; cannot evaluate it")
    info = run.data if data_dir is None else dataclasses.replace(run.data, dir=str(data_dir))
    ds = eval_dataset(info)
    dev = resolve_device(device)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    result = evaluate(model.to(dev), loader, dev)
    return dict(result, images=len(ds), split=info.val_split, data=info.name)
