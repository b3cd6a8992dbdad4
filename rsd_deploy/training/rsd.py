"""The RSD training step: student pass, teacher pass with the feature mixture block, loss.

One step on a batch ``(x, y)`` of ``B`` samples of a :class:`~rsd_deploy.models.StagedNet`
in its RSD form (Zheng et al., IEEE TIP 33, 2024):

* **student pass**: branch drop at rate ``p`` in every :class:`~rsd_deploy.blocks.RSDConv`
  (train mode), ``feats, s = model.forward_features(x)``;
* **teacher pass**: no drop; at a mix point chosen uniformly at random,
  ``h = model.forward_to(x, point)`` is replaced by the feature mixture
  ``cat([h, lam*h + (1-lam)*h[idx], lam*h + (1-lam)*feats[point][idx]])`` with
  ``lam ~ Beta(2, 2)`` and one permutation ``idx`` shared by both mixes, and
  ``model.forward_from(mixed, point)`` gives ``3B`` rows of logits, split into the teacher
  ``t``, the teacher-teacher mix ``tt`` and the teacher-student mix ``ts``;
* **loss**: ``alpha * [CE(s) + CE(t) + mixCE(tt) + mixCE(ts)]
  + beta * [KL_T(s -> t) + KL_T(ts -> tt)]``.

The two passes are separate forward passes, each with its own BatchNorm batch statistics,
exactly as the reference. Every term and the mixture block can be switched off for
ablations (:class:`RSDObjective`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import set_branch_drop

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


def mix_ce(logp: Tensor, y: Tensor, y_perm: Tensor, lam: float) -> Tensor:
    """``lam * CE(z, y) + (1 - lam) * CE(z, y[idx])`` from ``logp = log_softmax(z)``."""
    return lam * F.nll_loss(logp, y) + (1.0 - lam) * F.nll_loss(logp, y_perm)


class RSDStep(nn.Module):
    """The RSD forward step around a model: ``forward(x, y) -> StepOutput``.

    A module (not a function) so that :class:`~torch.nn.parallel.DistributedDataParallel`
    can wrap the whole step, both passes included, and synchronise the gradients of the
    one backward that follows. The model's drop rate is restored to 0 after the step, so
    evaluation and export never see branch drop.
    """

    def __init__(self, model: nn.Module, objective: RSDObjective | None = None) -> None:
        super().__init__()
        self.model = model
        self.objective = objective or RSDObjective()
        self.last_draw: MixDraw | None = None  #: the mixture drawn by the latest step (for tests)

    def forward(self, x: Tensor, y: Tensor, draw: MixDraw | None = None) -> StepOutput:
        """One step on ``(x, y)``; ``draw`` fixes the mixture (default: a random one)."""
        obj, model = self.objective, self.model
        active = obj.active_terms
        b = x.shape[0]
        if not obj.mixture:
            draw = None
        elif draw is None:
            draw = draw_mixture(model.num_mix_points, b, x.device)
        elif not 0 <= draw.point < model.num_mix_points or draw.idx.shape != (b,):
            raise ValueError(f"draw {draw.point} / {tuple(draw.idx.shape)} does not fit "
                             f"{model.num_mix_points} mix points and a batch of {b}")
        self.last_draw = draw

        # Student pass: branch drop on, features at every mix point and logits.
        set_branch_drop(model, obj.drop_rate)
        try:
            feats, s_logits = model.forward_features(x)
        finally:
            set_branch_drop(model, 0.0)

        # Teacher pass: no drop; the mixture block at the drawn point, 3B rows after it.
        if draw is not None:
            h = model.forward_to(x, draw.point)
            mixed = feature_mixture(h, feats[draw.point], draw.lam, draw.idx)
            del feats, h
            out = model.forward_from(mixed, draw.point)
            t_logits, tt_logits, ts_logits = out.split(b)
        else:
            del feats
            out = t_logits = model(x)
            tt_logits = ts_logits = None

        # Loss: one log-softmax over all teacher rows serves the three CE terms.
        terms: dict[str, Tensor] = {}
        logp = F.log_softmax(out, dim=1)
        lp_t = logp[:b]
        if "ce_student" in active:
            terms["ce_student"] = F.cross_entropy(s_logits, y)
        if "ce_teacher" in active:
            terms["ce_teacher"] = F.nll_loss(lp_t, y)
        if draw is not None:
            y_perm = y[draw.idx]
            if "ce_mix_tt" in active:
                terms["ce_mix_tt"] = mix_ce(logp[b : 2 * b], y, y_perm, draw.lam)
            if "ce_mix_ts" in active:
                terms["ce_mix_ts"] = mix_ce(logp[2 * b :], y, y_perm, draw.lam)
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
    """The baseline step: cross-entropy of the model's logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, y: Tensor) -> StepOutput:
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss, {"ce": loss.detach()}, logits.detach(), None)
