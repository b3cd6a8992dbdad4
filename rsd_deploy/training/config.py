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
from collections.abc import Callable
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
    epochs: int = 8
    batch_size: int = 64  #: per process; the effective batch is this times the world size
    lr: float = 0.05  #: the paper's; stable with the warm-up and clipping below
    schedule: str = "cosine"
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    warmup_epochs: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_grad_norm: float | None = 5.0  #: clip the global gradient norm to this value (None: off)
    #: Before every evaluation and before the weights are written, re-estimate BatchNorm
    #: statistics over this many clean (teacher: no drop, no mixture) training batches.
    precise_bn: int = 20
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
    amp: bool = False  #: mixed precision: float16 + gradient scaling on CUDA, bfloat16 on CPUs with bf16 units
    workers: int = 2
    eval_batch_size: int = 256

    def validate(self) -> "TrainConfig":
        """Check every value; raises :class:`RSDError` naming the first bad one."""
        models.get_spec(self.model)  # unknown model -> RSDError listing the known ones
        _choice("method", self.method, METHODS)
        _choice("data", self.data, DATASETS)
        _choice("device", self.device, DEVICES)
        _choice("schedule", self.schedule, SCHEDULES)
        _check_numbers(self)
        if self.alpha == 0 and self.beta == 0:
            raise RSDError("--alpha and --beta cannot both be 0 (the loss would be 0)")
        if self.input_size is not None:
            _check_input_size(self.model, self.input_size)
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


#: Range of each numeric option: a test and the words for it. A field not listed here
#: still gets the checks every number gets (see :func:`_check_numbers`).
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_POSITIVE = (lambda v: v > 0, "positive")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": _AT_LEAST_1, "batch_size": _AT_LEAST_1, "eval_batch_size": _AT_LEAST_1,
    "input_size": _AT_LEAST_1, "train_samples": _AT_LEAST_1, "val_samples": _AT_LEAST_1,
    "max_steps": _AT_LEAST_1, "workers": _NON_NEGATIVE, "seed": _NON_NEGATIVE,
    "lr": _POSITIVE, "lr_gamma": _POSITIVE, "momentum": _FRACTION, "weight_decay": _NON_NEGATIVE,
    "drop_rate": _FRACTION, "alpha": _NON_NEGATIVE, "beta": _NON_NEGATIVE, "temperature": _POSITIVE,
    "warmup_epochs": _NON_NEGATIVE, "clip_grad_norm": _POSITIVE, "precise_bn": _NON_NEGATIVE,
}
_INT_MAX = 2**63 - 1  #: every integer must fit in int64 (seeds, sizes and counts end up in torch)


def _check_numbers(config: TrainConfig) -> None:
    """Every float finite, every integer within int64, every listed field in its range.

    NaN fails every comparison, so a range test alone (``x <= 0``) would let it through:
    non-finite values are refused first, for every float field, recipe or command line.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise RSDError(f"--{_flag(f.name)} must be a finite number (got {v})")
            if isinstance(v, int) and not isinstance(v, bool) and not -_INT_MAX <= v <= _INT_MAX:
                raise RSDError(f"--{_flag(f.name)} must fit in 64 bits, |value| < 2**63 (got {v})")
        test, words = _RANGES.get(f.name, (None, ""))
        if test is not None and value is not None and not test(value):
            raise RSDError(f"--{_flag(f.name)} must be {words} (got {value})")


def _check_input_size(model: str, size: int) -> None:
    """Refuse an input side the architecture cannot take (its pooling would leave nothing).

    The check runs the plain architecture on the meta device: shapes only, no memory, no maths.
    """
    import torch

    with torch.device("meta"):
        net = models.create(model, num_classes=2, form="deploy").eval()

    def fits(side: int) -> bool:
        try:
            with torch.no_grad():
                net(torch.empty(2, 3, side, side, device="meta"))
        except RuntimeError:
            return False
        return True

    if not fits(size):
        largest = models.get_spec(model).input_size
        smallest = next((s for s in range(size + 1, largest) if fits(s)), largest)
        raise RSDError(f"--input-size {size} is too small for {model} (it needs at least {smallest})")


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
