"""The RSD training step: student pass, teacher pass with the feature mixture block, loss.

One step on a batch ``(x, y)`` of ``B`` samples of a model in its RSD form (Zheng et
al., IEEE TIP 33, 2024). The *mix points* are named modules whose outputs are cuts of
the network (every path from the input to the logits passes through them): the zoo's
:class:`~rsd_deploy.models.StagedNet` names its stem and stages, any other model is
given them (``mix_points=["layer1", ...]``).

* **student pass**: branch drop at rate ``p`` in every :class:`~rsd_deploy.blocks.RSDConv`
  (train mode), ``s = model(x)``, the output of the drawn mix point recorded (a hook);
* **teacher pass**: no drop; ``model(x)`` with the drawn point's output ``h`` replaced (a
  hook) by the feature mixture ``cat([h, lam*h + (1-lam)*h[idx], lam*h + (1-lam)*s_h[idx]])``,
  ``s_h`` the student's output there, ``lam ~ Beta(2, 2)`` and one permutation ``idx``
  shared by both mixes; everything after the point runs on ``3B`` rows, and the logits
  split into the teacher ``t``, the teacher-teacher mix ``tt`` and the teacher-student mix ``ts``;
* **loss**: ``alpha * [CE(s) + CE(t) + mixCE(tt) + mixCE(ts)]
  + beta * [KL_T(s -> t) + KL_T(ts -> tt)]``.

The two passes are separate forward passes, each with its own BatchNorm batch statistics,
exactly as the reference. Every term and the mixture block can be switched off for
ablations (:class:`RSDObjective`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import set_branch_drop
from ..errors import RSDError
from ..graph import TraceError, non_cuts, trace

log = logging.getLogger(__name__)

#: The loss terms, in the order they are reported.
#: ``ce_student`` CE(s), ``ce_teacher`` CE(t), ``ce_mix_tt`` mixCE(tt), ``ce_mix_ts`` mixCE(ts),
#: ``kd_student`` KL_T(s -> t), ``kd_mix`` KL_T(ts -> tt).
LOSS_TERMS: tuple[str, ...] = (
    "ce_student", "ce_teacher", "ce_mix_tt", "ce_mix_ts", "kd_student", "kd_mix",
)
_MIX_TERMS = frozenset({"ce_mix_tt", "ce_mix_ts", "kd_mix"})
_KD_TERMS = frozenset({"kd_student", "kd_mix"})


@dataclass
class RSDObjective:
    """Hyper-parameters and ablation switches of the RSD step."""

    alpha: float = 1.0  #: weight of the cross-entropy terms
    beta: float = 1.0  #: weight of the distillation (KL) terms
    temperature: float = 3.0  #: KL temperature T (the KL terms are scaled by T^2)
    drop_rate: float = 0.2  #: branch-drop rate of the student pass
    mixture: bool = True  #: the feature mixture block (off: no mix terms, teacher on B rows)
    #: Loss terms switched on. Switching one off removes exactly that term from the loss;
    #: both passes and the mixture still run as before (same draws, same BN statistics).
    terms: tuple[str, ...] = field(default_factory=lambda: LOSS_TERMS)
    detach_teacher: bool = False  #: stop gradients through the KL targets (t and tt)
    #: Label smoothing of every cross-entropy term (0: the paper's hard labels).
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.terms) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"unknown loss term(s) {', '.join(unknown)}; known: {', '.join(LOSS_TERMS)}")
        if not self.terms:
            raise ValueError("at least one loss term must be switched on")
        if not self.mixture and set(self.terms) <= _MIX_TERMS:
            raise ValueError("without the mixture block the chosen loss terms are all empty")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive (got {self.temperature})")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop rate must be in [0, 1) (got {self.drop_rate})")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1) (got {self.label_smoothing})")
        self.terms = tuple(t for t in LOSS_TERMS if t in self.terms)

    @property
    def active_terms(self) -> tuple[str, ...]:
        """The terms the step computes: ``terms`` less the mix terms when there is no mixture."""
        return tuple(t for t in self.terms if self.mixture or t not in _MIX_TERMS)


class MixDraw(NamedTuple):
    """The random choices of one feature mixture: where, how much, with whom."""

    point: int
    lam: float
    idx: Tensor


class StepOutput(NamedTuple):
    """The loss to back-propagate and what the loop reports."""

    loss: Tensor
    terms: dict[str, Tensor]  #: unweighted value of every active term (detached)
    logits: Tensor  #: logits of the full network (the teacher for RSD) on the B samples
    student_logits: Tensor | None  #: logits of the student pass (None for the baseline)


def draw_mixture(num_points: int, batch: int, device: torch.device | str = "cpu") -> MixDraw:
    """A uniformly random mix point, ``lam ~ Beta(2, 2)`` and a random permutation.

    Uses torch's global generator, so a run is reproducible from its seed and resumable
    from the saved generator state.
    """
    point = int(torch.randint(num_points, ()).item())
    lam = float(torch.distributions.Beta(2.0, 2.0).sample())
    idx = torch.randperm(batch).to(device)
    return MixDraw(point, lam, idx)


def feature_mixture(h: Tensor, s: Tensor, lam: float, idx: Tensor) -> Tensor:
    """RSD's feature mixture block: ``cat([h, lam*h + (1-lam)*h[idx], lam*h + (1-lam)*s[idx]])``.

    ``h`` is the teacher feature, ``s`` the student feature at the same mix point; the
    result has ``3B`` rows. Each mix is one ``lerp`` kernel
    (``lam*h + (1-lam)*g == g + lam*(h - g)``) and the three parts are concatenated once.
    """
    return torch.cat([h, torch.lerp(h[idx], h, lam), torch.lerp(s[idx], h, lam)])


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(teacher/T) || softmax(student/T)) * T^2``, batch mean: pulls student to teacher."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
        reduction="batchmean", log_target=True,
    ) * (t * t)


def smoothed_nll(logp: Tensor, y: Tensor, smoothing: float = 0.0) -> Tensor:
    """Cross-entropy from ``logp = log_softmax(z)``, with label smoothing ``smoothing``.

    Equals ``F.cross_entropy(z, y, label_smoothing=smoothing)``: the target puts
    ``1 - smoothing`` on the label and ``smoothing`` spread evenly over all classes.
    With 0 it is exactly ``F.nll_loss``.
    """
    nll = F.nll_loss(logp, y)
    return nll if smoothing == 0 else (1.0 - smoothing) * nll - smoothing * logp.mean(dim=1).mean()


def mix_ce(logp: Tensor, y: Tensor, y_perm: Tensor, lam: float, smoothing: float = 0.0) -> Tensor:
    """``lam * CE(z, y) + (1 - lam) * CE(z, y[idx])`` from ``logp = log_softmax(z)``."""
    return lam * smoothed_nll(logp, y, smoothing) + (1.0 - lam) * smoothed_nll(logp, y_perm, smoothing)


def check_mix_points(model: nn.Module, points: Sequence[str]) -> None:
    """RSDError unless every name in ``points`` is a module of ``model`` whose output is a cut.

    The cut test traces the model with torch.fx; a model fx cannot trace is checked at
    run time only (its logits must come out with 3B rows).
    """
    if not points:
        raise RSDError("no mix points: name the modules whose outputs RSD may mix")
    modules = dict(model.named_modules())
    for name in points:
        if not name or name not in modules:
            raise RSDError(f"mix point {name!r} is not a module of the model")
    if len(set(points)) != len(points):
        raise RSDError(f"mix points repeat a name: {', '.join(points)}")
    try:  # one trace per point: nested points ("layer1", "layer1.0") are each a leaf in their own
        bad = {name: why for point in points for name, why in non_cuts(trace(model, leaves=[point]), [point]).items()}
    except TraceError as e:
        log.warning(f"{e}: mix points are checked at run time only")
        return
    if bad:
        name, why = next(iter(bad.items()))
        raise RSDError(f"mix point {name!r} is not a cut of the network: {why}; choose modules "
                       "every path from the input to the logits passes through (stage outputs)")


def _logits(out: Any, model: nn.Module) -> Tensor:
    """``out`` when it is the logits tensor; RSDError for a model that returns more in training."""
    if not isinstance(out, Tensor):
        raise RSDError(f"{type(model).__name__} returns {type(out).__name__} in training, not a tensor of "
                       "logits: build it without auxiliary outputs (e.g. aux_logits=False)")
    return out


class _Recorder:
    """A forward hook that records a module's output, or replaces it by ``replace(output)``."""

    def __init__(self, module: nn.Module, name: str, replace=None) -> None:
        self.name, self.replace = name, replace
        self.output: Tensor | None = None
        self.version = -1
        self.handle = module.register_forward_hook(self)

    def __call__(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        if not isinstance(output, Tensor):
            raise RSDError(f"mix point {self.name!r} returns {type(output).__name__}, not a tensor")
        if self.output is not None:
            raise RSDError(f"mix point {self.name!r} runs more than once in a forward pass")
        self.output, self.version = output, output._version
        return None if self.replace is None else self.replace(output)

    def recorded(self) -> Tensor:
        """The recorded output, refused if a later in-place op has changed it since."""
        if self.output is None:
            raise RSDError(f"mix point {self.name!r} did not run in the forward pass")
        if self.output._version != self.version:
            raise RSDError(f"the output of mix point {self.name!r} is changed in place after it "
                           "(an in-place op follows it); choose the module after that op")
        return self.output


class RSDStep(nn.Module):
    """The RSD forward step around a model: ``forward(x, y) -> StepOutput``.

    ``mix_points`` names the modules whose outputs the mixture may replace (default: the
    model's own ``mix_points``, as the zoo's models have). A module (not a function) so
    that :class:`~torch.nn.parallel.DistributedDataParallel` can wrap the whole step,
    both passes included, and synchronise the gradients of the one backward that
    follows. The model's drop rate is restored to 0 after the step, so evaluation and
    export never see branch drop.
    """

    def __init__(self, model: nn.Module, objective: RSDObjective | None = None,
                 mix_points: Sequence[str] | None = None) -> None:
        super().__init__()
        self.model = model
        self.objective = objective or RSDObjective()
        points = getattr(model, "mix_points", None) if mix_points is None else mix_points
        if self.objective.mixture:
            if points is None:
                raise RSDError(f"{type(model).__name__} names no mix points: give mix_points")
            check_mix_points(model, list(points))
        self.mix_points: tuple[str, ...] = tuple(points or ())
        self.last_draw: MixDraw | None = None  #: the mixture drawn by the latest step (for tests)

    @property
    def num_mix_points(self) -> int:
        return len(self.mix_points)

    def forward(self, x: Tensor, y: Tensor, draw: MixDraw | None = None) -> StepOutput:
        """One step on ``(x, y)``; ``draw`` fixes the mixture (default: a random one)."""
        obj, model = self.objective, self.model
        active = obj.active_terms
        b = x.shape[0]
        if not obj.mixture:
            draw = None
        elif draw is None:
            draw = draw_mixture(self.num_mix_points, b, x.device)
        elif not 0 <= draw.point < self.num_mix_points or draw.idx.shape != (b,):
            raise ValueError(f"draw {draw.point} / {tuple(draw.idx.shape)} does not fit "
                             f"{self.num_mix_points} mix points and a batch of {b}")
        self.last_draw = draw
        point = None if draw is None else self.mix_points[draw.point]
        module = None if point is None else model.get_submodule(point)

        # Student pass: branch drop on; the drawn point's output recorded, and the logits.
        set_branch_drop(model, obj.drop_rate)
        student = None if module is None else _Recorder(module, point)
        try:
            s_logits = _logits(model(x), model)
        finally:
            set_branch_drop(model, 0.0)
            if student is not None:
                student.handle.remove()

        # Teacher pass: no drop; the mixture block at the drawn point, 3B rows after it.
        if draw is not None:
            s_feat = student.recorded()
            teacher = _Recorder(module, point, lambda h: feature_mixture(h, s_feat, draw.lam, draw.idx))
            try:
                out = _logits(model(x), model)
            finally:
                teacher.handle.remove()
            del s_feat, student, teacher
            if out.shape[0] != 3 * b:
                raise RSDError(f"mix point {point!r} gave {out.shape[0]} rows of logits for 3 x {b}: "
                               "it is not a cut of the network")
            t_logits, tt_logits, ts_logits = out.split(b)
        else:
            out = t_logits = _logits(model(x), model)
            tt_logits = ts_logits = None

        # Loss: one log-softmax over all teacher rows serves the three CE terms.
        terms: dict[str, Tensor] = {}
        logp = F.log_softmax(out, dim=1)
        lp_t, ls = logp[:b], obj.label_smoothing
        if "ce_student" in active:
            terms["ce_student"] = F.cross_entropy(s_logits, y, label_smoothing=ls)
        if "ce_teacher" in active:
            terms["ce_teacher"] = smoothed_nll(lp_t, y, ls)
        if draw is not None:
            y_perm = y[draw.idx]
            if "ce_mix_tt" in active:
                terms["ce_mix_tt"] = mix_ce(logp[b : 2 * b], y, y_perm, draw.lam, ls)
            if "ce_mix_ts" in active:
                terms["ce_mix_ts"] = mix_ce(logp[2 * b :], y, y_perm, draw.lam, ls)
        if "kd_student" in active:
            target = t_logits.detach() if obj.detach_teacher else t_logits
            terms["kd_student"] = kd_loss(s_logits, target, obj.temperature)
        if "kd_mix" in active:
            target = tt_logits.detach() if obj.detach_teacher else tt_logits
            terms["kd_mix"] = kd_loss(ts_logits, target, obj.temperature)

        loss = sum((obj.beta if n in _KD_TERMS else obj.alpha) * v for n, v in terms.items())
        return StepOutput(loss, {n: v.detach() for n, v in terms.items()},
                          t_logits.detach(), s_logits.detach())


class CEStep(nn.Module):
    """The baseline step: cross-entropy of the model's logits (with ``label_smoothing``)."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1) (got {label_smoothing})")
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, x: Tensor, y: Tensor) -> StepOutput:
        logits = _logits(self.model(x), self.model)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return StepOutput(loss, {"ce": loss.detach()}, logits.detach(), None)
