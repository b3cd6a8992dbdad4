"""The RSD step pinned down: loss by hand, gradients, branch drop, mixture, ablations."""

from __future__ import annotations

import copy

import pytest
import torch

from rsd_deploy import blocks, models
from rsd_deploy.blocks import RSDConv, set_branch_drop
from rsd_deploy.training import rsd as rsd_module
from rsd_deploy.training.rsd import (
    LOSS_TERMS,
    CEStep,
    MixDraw,
    RSDObjective,
    RSDStep,
    feature_mixture,
)

B, C, S = 8, 4, 8  # batch, classes, input side: tiny and fast


def _model(seed: int = 0, form: str = "rsd") -> models.StagedNet:
    torch.manual_seed(seed)
    return models.create("resnet20", num_classes=C, form=form).train()


def _batch(seed: int = 1, b: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, S, S, generator=g), torch.randint(0, C, (b,), generator=g)


# Hand computation --------------------------------------------------------------------


def _ce(z, y):  # mean over the batch of -log softmax(z)[y], written out
    return (torch.log(torch.exp(z).sum(1)) - z[torch.arange(len(y)), y]).mean()


def _smoothed_ce(z, y, eps):  # target: 1 - eps on the label, eps spread over all classes
    logp = z - torch.log(torch.exp(z).sum(1, keepdim=True))
    return (1 - eps) * _ce(z, y) - eps * logp.mean(1).mean()


def _kl(student, teacher, t):  # KL(softmax(teacher/T) || softmax(student/T)) * T^2, batch mean
    pt = torch.exp(teacher / t) / torch.exp(teacher / t).sum(1, keepdim=True)
    ps = torch.exp(student / t) / torch.exp(student / t).sum(1, keepdim=True)
    return (pt * (torch.log(pt) - torch.log(ps))).sum(1).mean() * t * t


def _features(model, x):  # the stem's and every stage's output, and the logits
    feats = [model.stem(x)]
    for stage in model.stages:
        feats.append(stage(feats[-1]))
    return feats, model.head(feats[-1])


def _from(model, h, point):  # logits, continuing from the feature h at mix point ``point``
    for stage in model.stages[point:]:
        h = stage(h)
    return model.head(h)


def _by_hand(model, x, y, seed, alpha, beta, t, p):
    """Every term of the RSD loss, from the same random draws, with plain tensor maths."""
    torch.manual_seed(seed)
    point = int(torch.randint(model.num_mix_points, ()).item())
    lam = float(torch.distributions.Beta(torch.tensor(2.0), torch.tensor(2.0)).sample())
    idx = torch.randperm(len(y))
    set_branch_drop(model, p)
    feats, s = _features(model, x)
    set_branch_drop(model, 0.0)
    h = _features(model, x)[0][point]
    sf = feats[point]
    mixed = torch.cat([h, lam * h + (1 - lam) * h[idx], lam * h + (1 - lam) * sf[idx]])
    out = _from(model, mixed, point)
    tl, tt, ts = out[:B], out[B : 2 * B], out[2 * B :]
    terms = {
        "ce_student": _ce(s, y),
        "ce_teacher": _ce(tl, y),
        "ce_mix_tt": lam * _ce(tt, y) + (1 - lam) * _ce(tt, y[idx]),
        "ce_mix_ts": lam * _ce(ts, y) + (1 - lam) * _ce(ts, y[idx]),
        "kd_student": _kl(s, tl, t),
        "kd_mix": _kl(ts, tt, t),
    }
    total = alpha * sum(terms[k] for k in LOSS_TERMS[:4]) + beta * sum(terms[k] for k in LOSS_TERMS[4:])
    return total, terms


@pytest.mark.parametrize("alpha,beta,t,p", [(1.0, 1.0, 3.0, 0.2), (0.7, 1.3, 2.0, 0.5)])
def test_loss_equals_hand_computation(alpha, beta, t, p):
    model = _model()
    x, y = _batch()
    reference = copy.deepcopy(model)
    step = RSDStep(model, RSDObjective(alpha=alpha, beta=beta, temperature=t, drop_rate=p))
    torch.manual_seed(123)
    out = step(x, y)
    total, terms = _by_hand(reference, x, y, 123, alpha, beta, t, p)
    assert list(out.terms) == list(LOSS_TERMS)
    for k in LOSS_TERMS:
        torch.testing.assert_close(out.terms[k], terms[k].detach(), rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(out.loss, total, rtol=1e-5, atol=1e-6)
    # Not a degenerate case: every term contributes, and the mix terms really mix.
    assert all(float(v.detach()) > 1e-4 for v in terms.values())
    assert 0.0 < step.last_draw.lam < 1.0


def test_gradients_reach_every_branch():
    model = _model()
    x, y = _batch()
    torch.manual_seed(0)
    RSDStep(model)(x, y).loss.backward()
    convs = [m for m in model.modules() if isinstance(m, RSDConv)]
    assert len(convs) == 19  # stem + 18 3x3 convs of resnet20
    for conv in convs:
        for i in range(conv.num_square):
            assert conv.weight_square.grad[i].abs().sum() > 0
        assert conv.weight_vertical.grad.abs().sum() > 0
        assert conv.weight_horizontal.grad.abs().sum() > 0
        per_branch = conv.unstack(conv.bn.weight.grad)  # (branches, out)
        assert (per_branch.abs().sum(1) > 0).all()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


class _MaskRecorder:
    def __init__(self):
        self.masks: list[torch.Tensor] = []
        self.rates: list[float] = []

    def __call__(self, batch, branches, p, **kw):
        mask = _ORIGINAL_DROP_MASK(batch, branches, p, **kw)
        self.masks.append(mask.clone())
        self.rates.append(p)
        return mask


_ORIGINAL_DROP_MASK = blocks.drop_mask


def test_branch_drop_rate_is_p_per_sample_and_branch_independently(monkeypatch):
    p = 0.2
    recorder = _MaskRecorder()
    monkeypatch.setattr(blocks, "drop_mask", recorder)
    model = _model()
    step = RSDStep(model, RSDObjective(drop_rate=p))
    torch.manual_seed(0)
    with torch.no_grad():
        for i in range(3):
            step(*_batch(i, b=64))
    masks = torch.stack(recorder.masks)  # (calls, 64, 5)
    assert masks.shape == (3 * 19, 64, 5)
    dropped = (masks == 0).double()
    kept = masks[masks != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))  # kept outputs scaled
    n = dropped.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped.mean().item() - p) < 4 * sigma
    # Each branch on its own drops at rate p.
    per_branch = dropped.mean((0, 1))
    assert (per_branch - p).abs().max().item() < 4 * (p * (1 - p) / (n / 5)) ** 0.5
    # Independence: branches of one sample, and the same branch of two samples, are
    # dropped together with probability p^2 (a shared mask would give p).
    pairs_branch = (dropped[..., 0] * dropped[..., 1]).mean().item()
    pairs_sample = (dropped[:, 0::2, :] * dropped[:, 1::2, :]).mean().item()
    m = dropped[..., 0].numel()
    tol = 4 * (p * p * (1 - p * p) / m) ** 0.5
    assert abs(pairs_branch - p * p) < tol
    assert abs(pairs_sample - p * p) < 2 * tol
    # Whole-sample drop (all 5 branches at once) is as rare as independence says.
    assert dropped.prod(-1).mean().item() < 0.01


def test_no_drop_in_teacher_pass_and_rate_restored(monkeypatch):
    recorder = _MaskRecorder()
    monkeypatch.setattr(blocks, "drop_mask", recorder)
    model = _model()
    step = RSDStep(model, RSDObjective(drop_rate=0.3))
    calls = []  # masks drawn before each forward pass starts
    model.stem.register_forward_pre_hook(lambda *_: calls.append(len(recorder.masks)))
    torch.manual_seed(0)
    step(*_batch())
    convs = [m for m in model.modules() if isinstance(m, RSDConv)]
    # Exactly one mask per block: the student pass. The teacher pass draws none.
    assert len(recorder.masks) == len(convs) and set(recorder.rates) == {0.3}
    assert calls == [0, len(convs)]
    assert all(m.drop_rate == 0.0 for m in convs)


def test_mixture_has_3b_rows_and_shares_lam_and_permutation(monkeypatch):
    model = _model()
    x, y = _batch()
    seen, student, rows = {}, {}, []

    def spy(h, s, lam, idx):  # the mixture block as the step calls it
        out = feature_mixture(h, s, lam, idx)
        seen.update(h=h.detach().clone(), s=s, mixed=out.detach().clone())
        return out

    monkeypatch.setattr(rsd_module, "feature_mixture", spy)
    def keep_first(name):  # the student pass's output at every point (the first forward)
        def hook(_module, _args, out):
            student.setdefault(name, out.detach().clone())
        return hook

    for name in model.mix_points:
        model.get_submodule(name).register_forward_hook(keep_first(name))
    model.head.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    step = RSDStep(model)
    assert step.mix_points == ("stem", "stages.0", "stages.1", "stages.2")
    for seed in range(6):
        student.clear(), rows.clear()
        torch.manual_seed(seed)
        step(x, y)
        draw = step.last_draw
        point = model.mix_points[draw.point]
        assert rows == [B, 3 * B]  # student pass, then the teacher's 3B rows
        mixed, h, s = seen["mixed"], seen["h"], student[point]
        torch.testing.assert_close(seen["s"], s)  # the student feature of the drawn point
        lam, idx = draw.lam, draw.idx
        assert sorted(idx.tolist()) == list(range(B)) and idx.tolist() != list(range(B))
        torch.testing.assert_close(mixed[B : 2 * B], lam * h + (1 - lam) * h[idx])
        torch.testing.assert_close(mixed[2 * B :], lam * h + (1 - lam) * s[idx])
        # The student feature is not the teacher's (branch drop is on in the student pass).
        assert not torch.allclose(s, h)


def test_mix_points_are_all_used():
    model = _model()
    x, y = _batch()
    step = RSDStep(model)
    points = set()
    with torch.no_grad():
        for seed in range(24):
            torch.manual_seed(seed)
            step(x, y)
            points.add(step.last_draw.point)
    assert points == set(range(model.num_mix_points))


def test_a_given_draw_is_used_and_checked():
    model = _model()
    x, y = _batch()
    step = RSDStep(model)
    last = model.num_mix_points - 1
    draw = MixDraw(last, 0.25, torch.arange(B).flip(0))
    with torch.no_grad():
        torch.manual_seed(0)
        out = step(x, y, draw=draw)
        assert step.last_draw is draw
        torch.manual_seed(0)  # same branch-drop masks, same mixture: same loss
        again = step(x, y, draw=MixDraw(last, 0.25, torch.arange(B).flip(0)))
        torch.manual_seed(0)
        other = step(x, y, draw=MixDraw(last, 0.75, torch.arange(B).flip(0)))
    torch.testing.assert_close(again.loss, out.loss)
    assert not torch.allclose(other.loss, out.loss)
    for bad in (MixDraw(model.num_mix_points, 0.5, torch.arange(B)), MixDraw(0, 0.5, torch.arange(B + 1))):
        with pytest.raises(ValueError, match="does not fit"):
            step(x, y, draw=bad)


def test_feature_mixture_formula():
    g = torch.Generator().manual_seed(0)
    h, s = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    idx = torch.tensor([2, 0, 3, 1])
    out = feature_mixture(h, s, 0.3, idx)
    torch.testing.assert_close(out, torch.cat([h, 0.3 * h + 0.7 * h[idx], 0.3 * h + 0.7 * s[idx]]))


@pytest.mark.parametrize("term", LOSS_TERMS)
def test_each_ablation_removes_exactly_its_term(term):
    x, y = _batch()
    full_step = RSDStep(_model())
    ablated_step = RSDStep(_model(), RSDObjective(terms=tuple(t for t in LOSS_TERMS if t != term),
                                                  alpha=0.8, beta=1.5))
    full_step.objective = RSDObjective(alpha=0.8, beta=1.5)
    torch.manual_seed(7)
    full = full_step(x, y)
    torch.manual_seed(7)
    ablated = ablated_step(x, y)
    assert term not in ablated.terms and set(ablated.terms) == set(LOSS_TERMS) - {term}
    weight = 1.5 if term.startswith("kd") else 0.8
    torch.testing.assert_close(full.loss - ablated.loss, weight * full.terms[term], rtol=1e-5, atol=1e-6)
    for k, v in ablated.terms.items():
        torch.testing.assert_close(v, full.terms[k])


def test_no_mixture_runs_teacher_on_b_rows_without_mix_terms():
    model = _model()
    rows = []
    model.head.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    step = RSDStep(model, RSDObjective(mixture=False))
    torch.manual_seed(0)
    out = step(*_batch())
    assert set(out.terms) == {"ce_student", "ce_teacher", "kd_student"}
    assert rows and all(r == B for r in rows)
    torch.testing.assert_close(out.loss, sum(out.terms.values()))


def test_detach_teacher_changes_gradients_not_values():
    x, y = _batch()
    grads, losses = [], []
    for detach in (False, True):
        model = _model()
        step = RSDStep(model, RSDObjective(terms=("kd_student",), detach_teacher=detach))
        torch.manual_seed(3)
        out = step(x, y)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[0], losses[1])
    assert not torch.allclose(grads[0], grads[1])


def test_objective_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown loss term"):
        RSDObjective(terms=("ce_student", "nope"))
    with pytest.raises(ValueError, match="mixture"):
        RSDObjective(mixture=False, terms=("ce_mix_tt", "kd_mix"))
    with pytest.raises(ValueError):
        RSDObjective(drop_rate=1.0)


def test_baseline_step_is_cross_entropy():
    model = _model(form="plain")
    x, y = _batch()
    out = CEStep(model)(x, y)
    torch.testing.assert_close(out.loss, _ce(model(x), y), rtol=1e-5, atol=1e-6)


def test_label_smoothing_smooths_every_ce_term_and_nothing_else():
    eps = 0.1
    model = _model()
    x, y = _batch()
    reference = copy.deepcopy(model)
    torch.manual_seed(123)
    out = RSDStep(model, RSDObjective(label_smoothing=eps))(x, y)
    _, hard = _by_hand(copy.deepcopy(reference), x, y, 123, 1.0, 1.0, 3.0, 0.2)
    # The same draws by hand, each CE term with the smoothed target.
    torch.manual_seed(123)
    point = int(torch.randint(reference.num_mix_points, ()).item())
    lam = float(torch.distributions.Beta(torch.tensor(2.0), torch.tensor(2.0)).sample())
    idx = torch.randperm(len(y))
    set_branch_drop(reference, 0.2)
    feats, s = _features(reference, x)
    set_branch_drop(reference, 0.0)
    h = _features(reference, x)[0][point]
    mixed = torch.cat([h, lam * h + (1 - lam) * h[idx], lam * h + (1 - lam) * feats[point][idx]])
    o = _from(reference, mixed, point)
    tl, tt, ts = o[:B], o[B : 2 * B], o[2 * B :]
    smoothed = {
        "ce_student": _smoothed_ce(s, y, eps), "ce_teacher": _smoothed_ce(tl, y, eps),
        "ce_mix_tt": lam * _smoothed_ce(tt, y, eps) + (1 - lam) * _smoothed_ce(tt, y[idx], eps),
        "ce_mix_ts": lam * _smoothed_ce(ts, y, eps) + (1 - lam) * _smoothed_ce(ts, y[idx], eps),
        "kd_student": hard["kd_student"], "kd_mix": hard["kd_mix"],
    }
    for k in LOSS_TERMS:
        torch.testing.assert_close(out.terms[k], smoothed[k].detach(), rtol=1e-5, atol=1e-6, msg=k)
        if k.startswith("ce_"):  # smoothing really changed it
            assert abs(float(out.terms[k]) - float(hard[k])) > 1e-3, k
    # 0 is the paper's step, bit for bit.
    torch.manual_seed(5)
    a = RSDStep(copy.deepcopy(reference), RSDObjective(label_smoothing=0.0))(x, y).loss
    torch.manual_seed(5)
    b = RSDStep(copy.deepcopy(reference), RSDObjective())(x, y).loss
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="label smoothing"):
        RSDObjective(label_smoothing=1.0)
    with pytest.raises(ValueError, match="label smoothing"):
        CEStep(reference, label_smoothing=-0.1)


def test_baseline_step_smooths_its_labels():
    model = _model(form="plain")
    x, y = _batch()
    out = CEStep(model, label_smoothing=0.2)(x, y)
    torch.testing.assert_close(out.loss, _smoothed_ce(model(x), y, 0.2), rtol=1e-5, atol=1e-6)
    assert float(out.loss) > float(_ce(model(x), y)) + 1e-3 or float(out.loss) < float(_ce(model(x), y)) - 1e-3
