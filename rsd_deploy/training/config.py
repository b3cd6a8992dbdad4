"""The training configuration: one dataclass, loadable from a recipe file (JSON or TOML).

Precedence is defaults < recipe (``--config FILE``) < options given on the command line.
A key the configuration does not know is a one-line error, so a typo in a recipe never
silently trains something else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import models
from ..data import DATASETS
from ..errors import RSDError
from .rsd import LOSS_TERMS, RSDObjective

METHODS = ("rsd", "baseline")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("step", "cosine")


@dataclass
class TrainConfig:
    """Everything a training run depends on; recorded in full in ``run.json``."""

    # What to train, on what.
    model: str = "resnet20"
    method: str = "rsd"  #: "rsd" (multi-branch form, RSD loss) or "baseline" (plain form, CE)
    data: str = "digits"
    data_dir: str | None = None
    download: bool = False
    #: Input side; None: the model's own (32 for the CIFAR family), 16 for digits (8x8 images).
    input_size: int | None = None
    train_samples: int | None = None  #: train on an evenly spread subset of this size (smoke runs)
    val_samples: int | None = None  #: validate on an evenly spread subset of this size (smoke runs)
    # Schedule: SGD with momentum; "step" multiplies the lr by lr_gamma at each milestone
    # epoch, "cosine" anneals it to 0 over the epochs after the warm-up. Both start with a
    # linear warm-up over warmup_epochs (fractions allowed) when it is positive.
    epochs: int = 3
    batch_size: int = 64  #: per process; the effective batch is this times the world size
    lr: float = 0.01  #: the paper uses 0.05 (see the recipes)
    schedule: str = "step"
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_grad_norm: float | None = None  #: clip the global gradient norm to this value
    #: Before every evaluation and before the weights are written, re-estimate BatchNorm
    #: statistics over this many clean (teacher: no drop, no mixture) training batches.
    precise_bn: int = 0
    #: Stop a run whose network has collapsed (chance accuracy, maximum-entropy loss).
    collapse_guard: bool = True
    seed: int = 0
    max_steps: int | None = None  #: stop after this many optimizer steps
    # RSD.
    drop_rate: float = 0.2
    alpha: float = 1.0
    beta: float = 1.0
    temperature: float = 3.0
    mixture: bool = True
    loss_terms: list[str] = field(default_factory=lambda: list(LOSS_TERMS))
    detach_teacher: bool = False
    # Execution.
    device: str = "auto"
    amp: bool = False  #: float16 autocast with gradient scaling (CUDA only)
    workers: int = 2
    eval_batch_size: int = 256

    def validate(self) -> "TrainConfig":
        """Check every value; raises :class:`RSDError` naming the first bad one."""
        models.get_spec(self.model)  # unknown model -> RSDError listing the known ones
        _choice("method", self.method, METHODS)
        _choice("data", self.data, DATASETS)
        _choice("device", self.device, DEVICES)
        _choice("schedule", self.schedule, SCHEDULES)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise RSDError(f"--{_flag(name)} must be at least 1 (got {getattr(self, name)})")
        for name in ("input_size", "train_samples", "val_samples", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RSDError(f"--{_flag(name)} must be at least 1 (got {value})")
        if self.workers < 0:
            raise RSDError(f"--workers must be >= 0 (got {self.workers})")
        if self.lr <= 0 or self.lr_gamma <= 0:
            raise RSDError("--lr and --lr-gamma must be positive")
        if self.momentum < 0 or self.weight_decay < 0:
            raise RSDError("--momentum and --weight-decay must be >= 0")
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise RSDError(f"--warmup-epochs must be a number >= 0 (got {self.warmup_epochs})")
        if self.clip_grad_norm is not None and not (
            math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0
        ):
            raise RSDError(f"--clip-grad-norm must be a positive number (got {self.clip_grad_norm})")
        if self.precise_bn < 0:
            raise RSDError(f"--precise-bn must be >= 0 batches (got {self.precise_bn})")
        if sorted(self.lr_milestones) != list(self.lr_milestones) or any(
            m < 1 for m in self.lr_milestones
        ):
            raise RSDError(f"--lr-milestones must be increasing epochs >= 1 (got {self.lr_milestones})")
        try:
            self.objective()
        except ValueError as e:
            raise RSDError(str(e)) from None
        return self

    def objective(self) -> RSDObjective:
        return RSDObjective(
            alpha=self.alpha, beta=self.beta, temperature=self.temperature,
            drop_rate=self.drop_rate, mixture=self.mixture, terms=tuple(self.loss_terms),
            detach_teacher=self.detach_teacher,
        )

    def resolved_input_size(self) -> int:
        if self.input_size is not None:
            return self.input_size
        return 16 if self.data == "digits" else models.get_spec(self.model).input_size

    def lr_at(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        """Learning rate of optimizer step ``step`` (0-based) of the 0-based ``epoch``.

        Linear warm-up over the first ``warmup_epochs`` (step ``s`` of ``W`` warm-up steps
        gets ``(s + 1) / W`` of the rate), then the schedule: multi-step decay at the
        milestone epochs, or a cosine from ``lr`` down to 0 at the end of the last epoch.
        """
        done = epoch + step / steps_per_epoch  # epochs completed when this step starts
        if self.schedule == "cosine":
            warm = min(self.warmup_epochs, self.epochs)
            t = min(max((done - warm) / max(self.epochs - warm, 1e-12), 0.0), 1.0)
            lr = self.lr * 0.5 * (1.0 + math.cos(math.pi * t))
        else:
            lr = self.lr * self.lr_gamma ** sum(epoch >= m for m in self.lr_milestones)
        warmup_steps = self.warmup_epochs * steps_per_epoch
        if warmup_steps > 0:
            lr *= min(1.0, (epoch * steps_per_epoch + step + 1) / warmup_steps)
        return lr

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "configuration") -> "TrainConfig":
        """A config from ``values`` over the defaults; unknown keys and bad types are errors."""
        return cls().update(values, source)

    def update(self, values: dict[str, Any], source: str = "configuration") -> "TrainConfig":
        """A copy with ``values`` (keys may use dashes) applied and type-checked."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        defaults, new = type(self)(), dataclasses.replace(self)
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise RSDError(f"{source}: unknown key {key!r} (known: {', '.join(fields)})")
            setattr(new, name, _coerce(name, value, getattr(defaults, name), source))
        return new


_OPTIONAL_INT = {"input_size", "train_samples", "val_samples", "max_steps"}
_OPTIONAL_FLOAT = {"clip_grad_norm"}
_OPTIONAL_STR = {"data_dir"}


def _coerce(name: str, value: Any, default: Any, source: str) -> Any:
    bad = RSDError(f"{source}: {name} = {value!r} has the wrong type")
    if value is None:
        if name in _OPTIONAL_INT or name in _OPTIONAL_FLOAT or name in _OPTIONAL_STR:
            return None
        raise bad
    if name in _OPTIONAL_INT or isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        return value
    if name in _OPTIONAL_FLOAT or isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if name in _OPTIONAL_STR or isinstance(default, str):
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(default, list):
        if not isinstance(value, (list, tuple)):
            raise bad
        kind = int if name == "lr_milestones" else str
        if not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            raise bad
        return list(value)
    raise bad  # pragma: no cover - every field is handled above


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RSDError(f"unknown {name} {value!r}; choose from: {', '.join(choices)}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The key/value table of a recipe file (``.json`` or ``.toml``); RSDError when unreadable."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RSDError(f"recipe {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RSDError(f"cannot read recipe {path}: {e}") from None
    try:
        if path.suffix == ".toml":
            import tomllib  # Python >= 3.11

            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except ImportError:
        raise RSDError(f"TOML recipes need Python >= 3.11; use JSON for {path}") from None
    except (json.JSONDecodeError, ValueError) as e:
        raise RSDError(f"recipe {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(values, dict):
        raise RSDError(f"recipe {path} must hold a table of settings")
    values.pop("description", None)  # free text for humans
    return values
