"""Training stabilisers: warm-up and cosine schedule, gradient clipping, precise BN, collapse guard."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from rsd_deploy import models
from rsd_deploy.blocks import RSDConv
from rsd_deploy.errors import RSDError
from rsd_deploy.io import load_tensors
from rsd_deploy.training import TrainConfig, checkpoint, evaluation, train
from rsd_deploy.training.loop import Chance, _collapse, _collapsed_loss, _labels
from rsd_deploy.training.precise_bn import update_bn_stats

TINY = dict(data="digits", input_size=8, train_samples=128, batch_size=32, epochs=2, workers=0,
            device="cpu", eval_batch_size=512)


def _config(**kw) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, **kw}).validate()


# Schedule --------------------------------------------------------------------------------


def test_linear_warmup_then_step_decay():
    c = TrainConfig(lr=0.1, schedule="step", warmup_epochs=0.5, lr_milestones=[2], epochs=3)
    spe = 10  # 5 warm-up steps
    assert [c.lr_at(0, s, spe) for s in range(6)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1])
    assert c.lr_at(1, 9, spe) == pytest.approx(0.1) and c.lr_at(2, 0, spe) == pytest.approx(0.01)


def test_cosine_schedule_after_warmup():
    c = TrainConfig(lr=0.2, schedule="cosine", warmup_epochs=1, epochs=5)
    spe = 4
    assert c.lr_at(0, 3, spe) == pytest.approx(0.2)  # end of warm-up: full rate
    assert c.lr_at(1, 0, spe) == pytest.approx(0.2)  # cosine starts at lr
    assert c.lr_at(3, 0, spe) == pytest.approx(0.1)  # half way through the 4 cosine epochs
    assert c.lr_at(4, 3, spe) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    no_warm = TrainConfig(lr=0.2, schedule="cosine", warmup_epochs=0, epochs=4)
    assert no_warm.lr_at(0, 0, spe) == pytest.approx(0.2) and no_warm.lr_at(2, 0, spe) == pytest.approx(0.1)


@pytest.mark.parametrize("values, needle", [
    ({"warmup_epochs": -1.0}, "`warmup_epochs`"),
    ({"warmup_epochs": float("nan")}, "`warmup_epochs`"),
    ({"clip_grad_norm": 0.0}, "`clip_grad_norm`"),
    ({"clip_grad_norm": float("inf")}, "`clip_grad_norm`"),
    ({"precise_bn": -2}, "`precise_bn`"),
    ({"schedule": "linear"}, "schedule"),
])
def test_bad_stabiliser_values_are_refused(values, needle):
    with pytest.raises(RSDError, match=needle):
        TrainConfig.from_dict(values).validate()


def test_loop_follows_the_schedule_step_by_step(tmp_path):
    out = train(_config(lr=0.08, warmup_epochs=1.5, schedule="cosine", epochs=3), tmp_path / "r")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    c = _config(lr=0.08, warmup_epochs=1.5, schedule="cosine", epochs=3)
    assert [r["lr"] for r in lines] == pytest.approx([c.lr_at(e, 3, 4) for e in range(3)])  # last step's lr
    assert lines[0]["lr"] == pytest.approx(0.08 * 4 / 6)


# Gradient clipping -----------------------------------------------------------------------


def test_clipping_matches_a_hand_clipped_step(tmp_path):
    clip = 0.05
    out = train(_config(method="baseline", clip_grad_norm=clip, max_steps=1, epochs=1), tmp_path / "r")
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["grad_norm_max"] > clip and record["clipped_fraction"] == 1.0

    # The same first step by hand: same initial weights, batch and clipped SGD update.
    from torch.utils.data import DataLoader

    from rsd_deploy.data import load_datasets
    from rsd_deploy.training.loop import _seed_for, _subset

    config = _config(method="baseline", clip_grad_norm=clip, max_steps=1, epochs=1)
    train_ds, _, info = load_datasets("digits", None, input_size=8)
    train_ds = _subset(train_ds, 128)
    torch.manual_seed(config.seed)
    model = models.create("resnet20", num_classes=10, in_channels=3, form="plain")
    opt = torch.optim.SGD(model.parameters(), lr=config.lr_at(0, 0, 4), momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(_seed_for(config, 0))
    loader = DataLoader(train_ds, batch_size=32, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(_seed_for(config, 0)))
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    assert float(norm) == pytest.approx(record["grad_norm_max"], rel=1e-5)
    opt.step()
    saved = load_tensors(out / "model.safetensors")
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved[name], p.detach(), rtol=1e-5, atol=1e-7)


# Precise BN ------------------------------------------------------------------------------


def _bn_inputs(model: nn.Module, x: torch.Tensor) -> dict[nn.BatchNorm2d, torch.Tensor]:
    """The input of every BatchNorm in a clean forward pass, by hand (not through BN)."""
    seen: dict[nn.BatchNorm2d, torch.Tensor] = {}
    hooks = []
    for m in model.modules():
        if isinstance(m, RSDConv) and m.bn is not None:
            def pre(mod, args, bn=m.bn):
                seen[bn] = torch.cat(mod._conv_outputs(args[0], None), dim=1)
            hooks.append(m.register_forward_pre_hook(pre))
        elif isinstance(m, nn.BatchNorm2d) and not any(m is c.bn for c in model.modules() if isinstance(c, RSDConv)):
            hooks.append(m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(mod, args[0])))
    with torch.no_grad():
        model.train()
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("form", ["rsd", "plain"])
def test_precise_bn_equals_a_hand_computation(form):
    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=10, form=form).double()
    batches = [torch.randn(8, 3, 8, 8, dtype=torch.float64) * (1 + i) for i in range(4)]
    # Statistics by hand: mean of the batch means and of the unbiased batch variances,
    # each batch's BN inputs taken from a model that already holds the new statistics of
    # the layers before it (BN in train mode uses batch statistics, so they do not matter).
    ref = {}
    for x in batches[:3]:
        for bn, inp in _bn_inputs(model, x).items():
            mean = inp.mean(dim=(0, 2, 3))
            var = inp.var(dim=(0, 2, 3), unbiased=True)
            ref.setdefault(bn, []).append((mean, var))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    used = update_bn_stats(model, batches, num_batches=3)
    assert used == 3 and not model.training  # mode restored
    for bn, stats in ref.items():
        torch.testing.assert_close(bn.running_mean, torch.stack([m for m, _ in stats]).mean(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bn.running_var, torch.stack([v for _, v in stats]).mean(0), rtol=1e-10, atol=1e-12)
        assert bn.momentum == 0.1
    after = {k: v for k, v in model.state_dict().items() if "running" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before if "num_batches" not in k)  # weights untouched


def test_precise_bn_run_saves_the_re_estimated_statistics(tmp_path):
    config = _config(precise_bn=3)
    out = train(config, tmp_path / "r")
    saved = load_tensors(out / "model.safetensors")
    assert all(int(v) == 3 for k, v in saved.items() if k.endswith("num_batches_tracked"))
    # Re-estimating from the saved weights over the loop's batches of the last epoch (drawn
    # from their own generator) gives exactly the saved statistics: they are the clean
    # network's, not the training passes' running averages.
    from rsd_deploy.data import load_datasets
    from rsd_deploy.run import load_run
    from rsd_deploy.training.loop import _precise_bn, _subset

    model, _ = load_run(out)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(123.0)
            m.running_var.fill_(7.0)
    train_ds, _, _ = load_datasets("digits", None, input_size=8)
    _precise_bn(model, _subset(train_ds, 128), config, torch.device("cpu"), epoch=config.epochs - 1)
    state = model.state_dict()
    stats = [k for k in saved if "running" in k]
    assert stats and all(torch.equal(state[k], saved[k]) for k in stats)


def test_precise_bn_records_the_batches_it_used_and_says_when_short(tmp_path, caplog):
    import json
    import logging

    # 128 images in batches of 32: 4 full batches, fewer than the 6 asked.
    with caplog.at_level(logging.INFO, logger="rsd_deploy.training.loop"):
        out = train(_config(precise_bn=6), tmp_path / "r")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["precise_bn_batches"] for r in records] == [4, 4]
    assert sum("4 full batches, fewer than the 6 asked" in r.message for r in caplog.records) == 1
    saved = load_tensors(out / "model.safetensors")
    assert all(int(v) == 4 for k, v in saved.items() if k.endswith("num_batches_tracked"))


def test_resume_with_every_stabiliser_is_bit_identical(tmp_path):
    kw = dict(precise_bn=2, warmup_epochs=0.5, clip_grad_norm=1.0, schedule="cosine", epochs=3)
    straight = train(_config(**kw), tmp_path / "straight")
    part = tmp_path / "part"

    def interrupt(epoch, metrics, model):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(**kw), part, on_epoch_end=interrupt)
    train(_config(**kw), part, resume=True)
    a, b = load_tensors(straight / "model.safetensors"), load_tensors(part / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["val_top1"], r["lr"]) for r in ra] == [(r["loss"], r["val_top1"], r["lr"]) for r in rb]


# Collapse guard --------------------------------------------------------------------------


def test_collapsed_loss_counts_the_active_cross_entropy_terms():
    ten, hundred = Chance.of(None, 10), Chance.of(None, 100)
    assert _collapsed_loss(TrainConfig(method="baseline"), ten) == pytest.approx(math.log(10))
    assert _collapsed_loss(TrainConfig(), ten) == pytest.approx(4 * math.log(10))
    assert _collapsed_loss(TrainConfig(alpha=0.5, mixture=False), hundred) == pytest.approx(math.log(100))
    assert _collapsed_loss(TrainConfig(loss_terms=["kd_student"]), ten) is None


def test_chance_follows_the_label_frequencies():
    balanced = Chance.of(np.repeat(np.arange(10), 7), 10)
    assert balanced == Chance(pytest.approx(0.1), pytest.approx(math.log(10)), 10)
    # Half the images in class 0, the rest spread over 4 of the other 9: majority 0.5 and
    # H = -(0.5 ln 0.5 + 4 x 0.125 ln 0.125); classes without images count for nothing.
    skewed = Chance.of(np.array([0] * 8 + [1, 1, 2, 2, 3, 3, 4, 4]), 10)
    assert skewed.accuracy == 0.5 and skewed.entropy == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.125)))
    labels = _labels(torch.utils.data.Subset(type("DS", (), {"targets": [5, 6, 7, 8]})(), [3, 1]))
    assert labels.tolist() == [8, 6] and _labels(object()) is None


def _epochs(*pairs):
    return [{"train_acc": acc, "loss": loss} for acc, loss in pairs]


def test_collapse_needs_chance_accuracy_and_the_collapsed_loss_for_three_epochs():
    ten = Chance.of(None, 10)
    ceiling = 4 * math.log(10)  # 9.210
    flat = _epochs((0.10, 9.17), (0.11, 9.19), (0.10, 9.16))
    assert "from 9.170 to 9.160, not falling" in _collapse(flat, ten, ceiling)  # the reported collapse
    assert _collapse(flat[1:], ten, ceiling) is None  # two epochs are not enough
    assert _collapse(_epochs((0.10, 9.17), (0.10, 8.0), (0.10, 9.17)), ten, ceiling) is None  # one epoch learnt
    assert _collapse(_epochs((0.10, 9.5), (0.30, 9.5), (0.10, 9.5)), ten, ceiling) is None  # one above chance
    assert _collapse(_epochs((0.0, 99.0),) * 3, ten, None) is None
    # Exploding: far above the collapsed loss and rising, at chance.
    assert _collapse(_epochs((0.12, 2307.0), (0.12, 1.1e5), (0.08, 5.3e5)), ten, ceiling)
    # RSD on 500 images (seed 1 of the data-efficiency study): three epochs at 14.5-15 % with
    # the loss above 97 % of 9.21, but falling by 0.37 (more than 1 % of 9.21): still learning.
    slow = _epochs((0.145, 9.71), (0.150, 9.44), (0.145, 9.34))
    assert _collapse(slow, ten, ceiling) is None
    assert _collapse(_epochs((0.145, 9.71), (0.150, 9.70), (0.145, 9.63)), ten, ceiling)  # fell 0.08 only
    # Imbalanced classes: a network that predicts the majority class (half the images) with
    # the label frequencies' loss has collapsed, though 50 % is far above 1 / C.
    skewed = Chance(0.5, 1.04, 10)
    assert _collapse(_epochs((0.5, 1.04),) * 3, skewed, 1.04)
    assert _collapse(_epochs((0.5, 1.04), (0.56, 1.04), (0.5, 1.04)), skewed, 1.04) is None


def _collapsing(**kw) -> TrainConfig:
    # A huge learning rate: the loss runs far above ln 10 with training accuracy at chance
    # (finite: the non-finite check does not fire). 16 steps per epoch, so the guard first
    # judges epoch 4 (after 50 steps), and stops at epoch 6 at the earliest (three at chance).
    return _config(method="baseline", lr=5.0, warmup_epochs=0.0, clip_grad_norm=None, train_samples=512,
                   epochs=9, schedule="step", **kw)


def test_guard_stops_a_collapsed_run_and_keeps_the_last_good_epoch(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(RSDError) as err:
        train(_collapsing(), out)
    msg = str(err.value)
    assert "\n" not in msg and "collapsed in epoch" in msg and "warm-up" in msg
    epoch = int(msg.split("collapsed in epoch ")[1].split(":")[0])
    assert 6 <= epoch <= 9
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == epoch - 1  # the collapsed epoch wrote nothing
    assert checkpoint.read_progress(out)[0] == epoch - 1
    assert json.loads((out / "run.json").read_text())["metrics"]["epochs_completed"] == epoch - 1


def test_guard_can_be_turned_off(tmp_path):
    out = train(_collapsing(collapse_guard=False), tmp_path / "r")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["epoch"] == 9 and last["train_acc"] < 0.2 and last["loss"] > math.log(10)  # it did collapse


# Mixed precision on the CPU ----------------------------------------------------------------

HAS_CPU_BF16 = evaluation.cpu_has_bf16()


@pytest.mark.skipif(not HAS_CPU_BF16, reason="this CPU has no bfloat16 instructions")
def test_amp_on_cpu_trains_in_bfloat16_close_to_float32(tmp_path):
    """--amp on a CPU with bf16 units: the step runs in bfloat16 (its first step's loss differs
    from float32's, by bfloat16's resolution, not more), the weights stay float32."""
    seen: list[torch.dtype] = []
    loss = {}
    for amp in (False, True):
        config = _config(amp=amp, epochs=1, max_steps=1, method="rsd", precise_bn=0)
        # Every convolution's output dtype, seen by a global forward hook during the step.
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o, amp=amp: seen.append(o.dtype) if isinstance(m, nn.Conv2d) and amp else None)
        try:
            run = train(config, out=tmp_path / f"amp{amp}")
        finally:
            handle.remove()
        loss[amp] = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert torch.bfloat16 in seen  # (a setup forward outside the step may run in float32)
    assert loss[True] != loss[False]
    assert loss[True] == pytest.approx(loss[False], rel=2e-2)
    state = load_tensors(tmp_path / "ampTrue" / "model.safetensors")
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}


def test_amp_on_a_cpu_without_bfloat16_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(evaluation, "cpu_has_bf16", lambda: False)
    with pytest.raises(RSDError, match="bfloat16 instructions"):
        train(_config(amp=True), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
