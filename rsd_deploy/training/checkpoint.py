"""The resume state of a run, saved every epoch without pickle.

``checkpoint.safetensors`` holds every tensor (model state, optimizer buffers, gradient
scaler); ``checkpoint.json`` holds everything else (epoch, optimizer hyper-parameters,
the configuration, the metrics so far). Both are written atomically; each names the
epoch it belongs to, and a pair that disagrees (a crash between the two writes), a
truncated file or a missing entry is reported as a corrupt resume state.

Randomness needs no saved generator: the loop re-derives every generator from
``(seed, epoch, rank)`` at the start of each epoch, so a resumed run draws exactly the
numbers the uninterrupted run would have drawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RSDError
from ..io import load_tensors, read_json, save_tensors, write_json

TENSORS_FILE = "checkpoint.safetensors"
STATE_FILE = "checkpoint.json"
FORMAT = 1


def exists(run_dir: str | os.PathLike) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / STATE_FILE).exists() or (run_dir / TENSORS_FILE).exists()


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


def save(run_dir: str | os.PathLike, *, epoch: int, step: int, model: nn.Module,
         optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
         config: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Write the state after ``epoch`` complete epochs (``step`` optimizer steps)."""
    run_dir = Path(run_dir)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_json = _split_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["checkpoint.epoch_step"] = torch.tensor([epoch, step], dtype=torch.int64)
    scaler_state = scaler.state_dict() if scaler is not None and scaler.is_enabled() else None
    save_tensors(run_dir / TENSORS_FILE, tensors, metadata={"epoch": str(epoch)})
    write_json(run_dir / STATE_FILE, {
        "format": FORMAT, "epoch": epoch, "step": step, "optimizer": opt_json,
        "scaler": scaler_state, "config": config, "history": history,
    })


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The configuration a run was started with (from its resume state)."""
    state = _read_state(Path(run_dir))
    return state["config"]


def read_progress(run_dir: str | os.PathLike) -> tuple[int, int]:
    """``(epochs, optimizer steps)`` completed by the run in ``run_dir``."""
    state = _read_state(Path(run_dir))
    return int(state["epoch"]), int(state["step"])


def _read_state(run_dir: Path) -> dict[str, Any]:
    if not (run_dir / STATE_FILE).exists():
        raise RSDError(f"{run_dir} holds no resume state ({STATE_FILE}); cannot --resume it")
    state = read_json(run_dir / STATE_FILE)
    required = ("format", "epoch", "step", "optimizer", "config", "history")
    if not isinstance(state, dict) or any(k not in state for k in required):
        raise RSDError(f"resume state {run_dir / STATE_FILE} is corrupt (missing entries)")
    if state["format"] != FORMAT:
        raise RSDError(f"resume state {run_dir / STATE_FILE} has unknown format {state['format']!r}")
    return state


def load(run_dir: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """Restore model, optimizer and scaler in place; returns ``{"epoch", "step", "history"}``."""
    run_dir = Path(run_dir)
    state = _read_state(run_dir)
    tensors = load_tensors(run_dir / TENSORS_FILE)
    where = f"resume state in {run_dir}"
    try:
        epoch_step = tensors.pop("checkpoint.epoch_step").tolist()
        if epoch_step != [state["epoch"], state["step"]]:
            raise RSDError(
                f"{where} is inconsistent: {TENSORS_FILE} is from epoch {epoch_step[0]}, "
                f"{STATE_FILE} from epoch {state['epoch']}"
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
        return {"epoch": int(state["epoch"]), "step": int(state["step"]),
                "history": list(state["history"])}
    except RSDError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
        detail = " ".join(str(e).split())[:300]
        raise RSDError(f"{where} is corrupt or belongs to another model: {detail}") from None
