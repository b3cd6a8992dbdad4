"""The resume state of a run: one file, replaced by one rename, without pickle.

``checkpoint.safetensors`` holds every tensor (model state, optimizer buffers) and, in
its metadata, everything else as JSON (epoch, step, optimizer hyper-parameters, gradient
scaler, the configuration, the metrics so far). One file replaced by one rename is
always one whole epoch's state, whenever the process dies. It is the run's commit
record: the loop writes it at the start (epoch 0) and then last of each epoch's files.
Every entry is checked before a resumed run does any work, so a damaged or edited
state is a one-line :class:`RSDError`, never a traceback an epoch later.

Runs written before kept the JSON part in ``checkpoint.json`` beside the tensors
(format 1); they still resume (a pair from two different epochs is refused), and their
next epoch writes the single file and removes ``checkpoint.json``.

Randomness needs no saved generator: the loop re-derives every generator from
``(seed, epoch, rank)`` at the start of each epoch, so a resumed run draws exactly the
numbers the uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import RSDError, option
from ..io import atomic_path, load_tensors, read_json, write_tensors
from .config import TrainConfig

STATE_FILE = "checkpoint.safetensors"
LEGACY_STATE_FILE = "checkpoint.json"  #: format 1 kept the JSON part here
FILES = (STATE_FILE, LEGACY_STATE_FILE)
FORMAT = 2
_KEY = "rsd_deploy.resume_state"  #: metadata entry holding the JSON part
_REQUIRED = ("format", "epoch", "step", "optimizer", "config", "history")
#: Entries of every history record that readers (plots, metrics.jsonl, summaries) rely on.
_RECORD_NUMBERS = ("loss", "train_acc", "val_top1", "val_top5", "lr")


def exists(run_dir: str | os.PathLike) -> bool:
    return any((Path(run_dir) / name).exists() for name in FILES)


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def write(path: str | os.PathLike, *, epoch: int, step: int, model: nn.Module,
          optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
          config: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Write the state after ``epoch`` complete epochs (``step`` optimizer steps) to ``path``
    itself; the caller makes it atomic (:func:`save`, or the loop's one-step epoch write)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_json = _split_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["checkpoint.epoch_step"] = torch.tensor([epoch, step], dtype=torch.int64)
    scaler_state = scaler.state_dict() if scaler is not None and scaler.is_enabled() else None
    state = {"format": FORMAT, "epoch": epoch, "step": step, "optimizer": opt_json,
             "scaler": scaler_state, "config": config, "history": history}
    write_tensors(path, tensors, metadata={_KEY: json.dumps(state)})


def save(run_dir: str | os.PathLike, **state: Any) -> None:
    """Write the state (see :func:`write`) into ``run_dir`` with one atomic rename."""
    run_dir = Path(run_dir)
    with atomic_path(run_dir / STATE_FILE) as tmp:
        write(tmp, **state)
    (run_dir / LEGACY_STATE_FILE).unlink(missing_ok=True)  # superseded by the file just written


def discard_start(run_dir: str | os.PathLike) -> None:
    """Remove the state of a run that has committed no epoch yet (its epoch-0 start state)."""
    with contextlib.suppress(RSDError):
        if read_state(run_dir)["epoch"] == 0:
            (Path(run_dir) / STATE_FILE).unlink(missing_ok=True)


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The configuration a run was started with (from its resume state)."""
    return read_state(run_dir)["config"]


def read_progress(run_dir: str | os.PathLike) -> tuple[int, int]:
    """``(epochs, optimizer steps)`` completed by the run in ``run_dir``."""
    state = read_state(run_dir)
    return state["epoch"], state["step"]


def read_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The JSON part of the resume state in ``run_dir``, every entry checked."""
    run_dir = Path(run_dir)
    path = run_dir / STATE_FILE
    if not exists(run_dir):
        raise RSDError(f"{run_dir} holds no resume state ({STATE_FILE}); cannot {option('resume')} it")
    if not path.is_file():
        raise RSDError(f"resume state {path} is missing ({LEGACY_STATE_FILE} alone cannot resume)")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RSDError(f"resume state {path} is not a readable safetensors file ({e})") from None
    if _KEY in metadata:
        where, expected = f"resume state {path}", FORMAT
        try:
            state = json.loads(metadata[_KEY])
        except json.JSONDecodeError as e:
            raise RSDError(f"{where} is corrupt: {e}") from None
    elif (run_dir / LEGACY_STATE_FILE).exists():
        where, expected = f"resume state {run_dir / LEGACY_STATE_FILE}", 1
        state = read_json(run_dir / LEGACY_STATE_FILE)
    else:
        raise RSDError(f"resume state {path} is corrupt: it holds no state entry")
    _check(state, expected, where)
    return state


def _check(state: Any, expected_format: int, where: str) -> None:
    """Refuse a state any part of which the loop could not use, naming the entry."""

    def corrupt(what: str) -> RSDError:
        return RSDError(f"{where} is corrupt: {what}")

    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED):
        raise corrupt(f"missing entries (needs {', '.join(_REQUIRED)})")
    if state["format"] != expected_format:
        raise RSDError(f"{where} has unknown format {state['format']!r}")
    for key in ("epoch", "step"):
        if not _is_int(state[key]) or state[key] < 0:
            raise corrupt(f"{key} must be a non-negative integer (got {state[key]!r})")
    if not isinstance(state["config"], dict):
        raise corrupt(f"config must be an object (got {state['config']!r})")
    TrainConfig.from_dict(state["config"], where).validate()
    opt = state["optimizer"]
    if not (isinstance(opt, dict) and isinstance(opt.get("scalars"), dict)
            and isinstance(opt.get("param_groups"), list)
            and all(isinstance(g, dict) for g in opt["param_groups"])):
        raise corrupt("optimizer must be an object with param_groups and scalars")
    if state.get("scaler") is not None and not isinstance(state["scaler"], dict):
        raise corrupt("scaler must be an object or null")
    history = state["history"]
    if not isinstance(history, list) or len(history) != state["epoch"]:
        raise corrupt(f"history must list the {state['epoch']} epochs completed")
    for i, record in enumerate(history, 1):
        problem = _record_problem(record, i)
        if problem:
            raise corrupt(f"history entry {i} {problem}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _record_problem(record: Any, epoch: int) -> str | None:
    if not isinstance(record, dict):
        return "must be an object"
    if record.get("epoch") != epoch or not _is_int(record["epoch"]):
        return f"must be epoch {epoch} (got {record.get('epoch')!r})"
    if not _is_int(record.get("steps")):
        return "lacks steps (an integer)"
    missing = [k for k in _RECORD_NUMBERS if not _is_number(record.get(k))]
    if missing:
        return f"lacks {', '.join(missing)} (numbers)"
    terms = record.get("terms")
    if not isinstance(terms, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in terms.items()):
        return "must hold terms, an object of numbers"
    return None


def load(run_dir: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """Restore model, optimizer and scaler in place; returns ``{"epoch", "step", "history"}``."""
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    tensors = load_tensors(run_dir / STATE_FILE)
    where = f"resume state in {run_dir}"
    try:
        epoch_step = tensors.pop("checkpoint.epoch_step").tolist()
        if epoch_step != [state["epoch"], state["step"]]:  # a format-1 pair from two epochs
            raise RSDError(
                f"{where} is inconsistent: {STATE_FILE} is from epoch {epoch_step[0]}, "
                f"its state from epoch {state['epoch']}"
            )
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(model_state, strict=True)
        opt = state["optimizer"]
        per_param: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, pid, name = key.split(".", 2)
                per_param.setdefault(int(pid), {})[name] = value
        for pid, entries in opt["scalars"].items():
            per_param.setdefault(int(pid), {}).update(entries)
        optimizer.load_state_dict({"state": per_param, "param_groups": opt["param_groups"]})
        if scaler is not None and scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        return {"epoch": state["epoch"], "step": state["step"], "history": list(state["history"])}
    except RSDError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
        detail = " ".join(str(e).split())[:300]
        raise RSDError(f"{where} is corrupt or belongs to another model: {detail}") from None
