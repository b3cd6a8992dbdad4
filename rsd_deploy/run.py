"""Run directories: the contract between training, export and benchmarking.

A run directory holds ``model.safetensors`` (the state dict) and ``run.json``,
which says how to rebuild the model: at least ``model`` (a zoo name), ``form``
("rsd", "plain" or "deploy"), ``num_classes``, ``in_channels`` and ``input_size``
(``[H, W]``). Training adds ``classes``, ``normalization`` (``{"mean", "std"}``),
``data``, ``config``, ``versions`` and ``metrics``; export adds what it verified.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from . import models
from .blocks import FORMS
from .data import DataInfo, is_count, is_names, is_numbers, is_size
from .errors import RSDError
from .io import load_tensors, read_json, save_tensors, write_json

WEIGHTS_FILE = "model.safetensors"
RUN_FILE = "run.json"
REQUIRED_KEYS = ("model", "form", "num_classes", "in_channels", "input_size")


#: Type test and words of every entry a reader of ``run.json`` uses (optional ones too).
_TYPES: dict[str, tuple[Any, str]] = {
    "model": (lambda v: isinstance(v, str), "a model name"),
    "num_classes": (is_count, "a positive integer"),
    "in_channels": (is_count, "a positive integer"),
    "input_size": (is_size, "[H, W], two positive integers"),
    "classes": (is_names, "a list of class names"),
    "normalization": (lambda v: isinstance(v, dict) and is_numbers(v.get("mean"))
                      and is_numbers(v.get("std"), positive=True),
                      'an object {"mean": [...], "std": [...]} of finite numbers, std positive'),
    "tensorrt": (lambda v: isinstance(v, dict) and all(is_count(v.get(k)) for k in
                                                       ("min_batch", "opt_batch", "max_batch")),
                 "an object with positive integers min_batch, opt_batch and max_batch"),
}


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``run.json`` of ``run_dir``, every entry its readers use checked for presence and type."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RSDError(f"run directory {run_dir} does not exist")
    path = run_dir / RUN_FILE
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise RSDError(f"{path} must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise RSDError(f"{path} lacks {', '.join(missing)}")
    for key, (test, words) in _TYPES.items():  # an optional entry may be null: not recorded
        if (key in REQUIRED_KEYS or meta.get(key) is not None) and not test(meta.get(key)):
            raise RSDError(f"{path}: {key} must be {words} (got {meta.get(key)!r})")
    models.get_spec(meta["model"])  # unknown model -> RSDError
    if meta["form"] not in FORMS:
        raise RSDError(f"{path}: unknown form {meta['form']!r}")
    if meta.get("classes") is not None and len(meta["classes"]) != meta["num_classes"]:
        raise RSDError(f"{path}: {len(meta['classes'])} classes for num_classes {meta['num_classes']}")
    if meta.get("data") is not None:
        try:
            DataInfo.from_json(meta["data"])
        except RSDError as e:
            raise RSDError(f"{path}: data: {e}") from None
    return meta


def build_model(meta: dict[str, Any], form: str | None = None) -> nn.Module:
    """The architecture ``meta`` describes, in its own form or in ``form``."""
    return models.create(
        meta["model"],
        num_classes=int(meta["num_classes"]),
        in_channels=int(meta["in_channels"]),
        form=form or meta["form"],
    )


def load_state(model: nn.Module, path: str | os.PathLike, what: str = "") -> None:
    """Load safetensors weights into ``model`` strictly; any mismatch is an :class:`RSDError`."""
    state = load_tensors(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise RSDError(f"{path} does not match {what or 'the model'}: {detail[:300]}") from None


def load_run(run_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a run directory, with its weights, in eval mode, and its ``run.json``."""
    run_dir = Path(run_dir)
    meta = read_run(run_dir)
    model = build_model(meta)
    load_state(model, run_dir / WEIGHTS_FILE, f"architecture {meta['model']!r} ({meta['form']} form)")
    return model.eval(), meta


def save_run(run_dir: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``model``'s weights and ``meta`` to ``run_dir``, each file atomically."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"run metadata lacks {', '.join(missing)}")
    run_dir = Path(run_dir)
    save_tensors(run_dir / WEIGHTS_FILE, model.state_dict())
    write_json(run_dir / RUN_FILE, meta)
