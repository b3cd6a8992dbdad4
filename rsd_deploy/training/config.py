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

from ..data import DATASETS, native_size
from ..errors import RSDError, option
from ..run import ModelSource
from ..schema import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, Rule, check_values, from_mapping
from .rsd import LOSS_TERMS, RSDObjective

METHODS = ("rsd", "baseline")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("step", "cosine")
KXK_BRANCHES = (1, 2, 3)


@dataclass
class TrainConfig:
    """Everything a training run depends on; recorded in full in ``run.json``."""

    # What to train, on what.
    #: ``NAME`` (the zoo), ``torchvision:NAME`` or ``timm:NAME`` (restructured for RSD)
    model: str = "resnet20"
    method: str = "rsd"  #: "rsd" (multi-branch form, RSD loss) or "baseline" (plain form, CE)
    data: str = "digits"
    data_dir: str | None = None
    download: bool = False
    #: Input side; None: 16 for digits (8x8 images), else the zoo model's own (32 for the
    #: CIFAR family), or for torchvision/timm models the data's own image side.
    input_size: int | None = None
    #: Modules whose outputs RSD mixes; None: the model's (zoo) or its family's defaults.
    mix_points: list[str] | None = None
    #: safetensors state dict of the plain model to start from (a baseline run's model.safetensors,
    #: or a torchvision/timm state dict); the RSD form starts equivalent to it (each conv and
    #: its BN in one branch).
    init_weights: str | None = None
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
    #: Stop a run whose network has collapsed (three epochs at chance accuracy and the loss of predicting the label frequencies, not falling).
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
    #: KxK conv-BN branches per restructured block (each also has one Kx1 and one 1xK):
    #: 3 is the paper's, 1 an ACNet-like block; fewer branches cost less per step.
    kxk_branches: int = 3
    #: Label smoothing of every cross-entropy term, RSD's and the baseline's (0: hard labels).
    label_smoothing: float = 0.0
    # Execution.
    device: str = "auto"
    amp: bool = False  #: mixed precision: float16 + gradient scaling on CUDA, bfloat16 on CPUs with bf16 units
    workers: int = 2
    eval_batch_size: int = 256

    def validate(self) -> "TrainConfig":
        """Check every value; raises :class:`RSDError` naming the first bad one."""
        source = self.source()  # unknown model -> RSDError saying where the known ones are
        _choice("method", self.method, METHODS)
        _choice("data", self.data, DATASETS)
        _choice("device", self.device, DEVICES)
        _choice("schedule", self.schedule, SCHEDULES)
        check_values(self, _RANGES, option)
        if type(self.kxk_branches) is not int or self.kxk_branches not in KXK_BRANCHES:  # not 2.0, not True
            raise RSDError(f"{option('kxk_branches')} must be 1, 2 or 3 (got {self.kxk_branches!r})")
        if self.alpha == 0 and self.beta == 0:
            raise RSDError(f"{option('alpha')} and {option('beta')} cannot both be 0 (the loss would be 0)")
        if self.input_size is not None:
            check_input_size(source, self.input_size)
        elif source.kind != "zoo":  # the data's own side: a library model may not take it
            check_input_size(source, self.resolved_input_size())
        if self.mix_points is not None and (not self.mix_points or not all(
                isinstance(p, str) and p for p in self.mix_points)):
            raise RSDError(f"{option('mix_points')} must name modules (got {self.mix_points})")
        if sorted(self.lr_milestones) != list(self.lr_milestones) or any(
            m < 1 for m in self.lr_milestones
        ):
            raise RSDError(f"{option('lr_milestones')} must be increasing epochs >= 1 (got {self.lr_milestones})")
        try:
            self.objective()
        except ValueError as e:
            raise RSDError(str(e)) from None
        return self

    def objective(self) -> RSDObjective:
        return RSDObjective(
            alpha=self.alpha, beta=self.beta, temperature=self.temperature,
            drop_rate=self.drop_rate, mixture=self.mixture, terms=tuple(self.loss_terms),
            detach_teacher=self.detach_teacher, label_smoothing=self.label_smoothing,
        )

    def source(self) -> ModelSource:
        return ModelSource.from_json(self.model)

    def resolved_input_size(self) -> int:
        if self.input_size is not None:
            return self.input_size
        if self.data == "digits":
            return 16
        return self.source().input_size() or native_size(self.data, self.data_dir)

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
        return from_mapping(type(self), values, source, base=self)


#: Range of each numeric option: a test and the words for it. A field not listed here
#: still gets the checks every number gets (see :func:`rsd_deploy.schema.check_values`).
_RANGES: dict[str, Rule] = {
    "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "eval_batch_size": AT_LEAST_1,
    "input_size": AT_LEAST_1, "train_samples": AT_LEAST_1, "val_samples": AT_LEAST_1,
    "max_steps": AT_LEAST_1, "workers": NON_NEGATIVE, "seed": NON_NEGATIVE,
    "lr": POSITIVE, "lr_gamma": POSITIVE, "momentum": FRACTION, "weight_decay": NON_NEGATIVE,
    "drop_rate": FRACTION, "label_smoothing": FRACTION, "alpha": NON_NEGATIVE, "beta": NON_NEGATIVE,
    "temperature": POSITIVE,
    "warmup_epochs": NON_NEGATIVE, "clip_grad_norm": POSITIVE, "precise_bn": NON_NEGATIVE,
}


def check_input_size(source: ModelSource, size: int) -> None:
    """Refuse an input side the architecture cannot take (its pooling would leave nothing).

    The check runs the plain architecture on the meta device: shapes only, no memory, no maths.
    """
    import torch

    with torch.device("meta"):
        net = source.create(num_classes=2, in_channels=3, form="plain").eval()

    def fits(side: int) -> bool:
        try:
            with torch.no_grad():
                net(torch.empty(2, 3, side, side, device="meta"))
        except (RuntimeError, ValueError):
            return False
        return True

    if not fits(size):
        largest = source.input_size() or 256
        smallest = next((s for s in range(size + 1, largest) if fits(s)), largest)
        raise RSDError(f"{option('input_size')} {size} is too small for {source} (it needs at least {smallest})")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RSDError(f"unknown {name} {value!r}; choose from: {', '.join(choices)}")


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
