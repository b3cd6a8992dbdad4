"""The fast RSD block equals the literal per-branch block, and branch drop behaves."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reference import ReferenceRSDConv, fast_param_grads, to_reference
from rsd_deploy import RSDConv, set_branch_drop
from rsd_deploy.blocks import ConvBN, conv_block, drop_mask
from rsd_deploy.branch_norm import branch_norm_sum
from rsd_deploy.models import create

CASES = [
    # (cin, cout, k, stride, groups, bn)
    (8, 12, 3, 1, 1, True),
    (8, 12, 3, 2, 1, True),
    (8, 12, 5, 1, 1, True),
    (8, 12, 5, 2, 1, True),
    (8, 12, 3, 1, 4, True),
    (8, 8, 3, 2, 8, True),  # depthwise
    (8, 8, 5, 1, 8, True),  # depthwise
    (8, 12, 3, 1, 1, False),
    (8, 12, 3, 2, 4, False),
]


@pytest.mark.parametrize("cin,cout,k,stride,groups,bn", CASES)
@pytest.mark.parametrize("drop", [0.0, 0.4])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
def test_fast_block_equals_per_branch_reference(cin, cout, k, stride, groups, bn, drop, memory_format):
    """Outputs, every parameter's gradient and BN running statistics, over training steps, fp64."""
    _assert_equals_reference(cin, cout, k, stride, groups, bn, drop, memory_format)


def _assert_equals_reference(cin, cout, k, stride, groups, bn, drop, memory_format, num_square=3):
    """The fast block against :class:`ReferenceRSDConv` over three SGD steps and in eval, fp64."""
    torch.manual_seed(0)
    fast = RSDConv(cin, cout, k, stride, groups, num_square=num_square, bn=bn, drop_rate=drop).double()
    with torch.no_grad():  # non-trivial starting point for every parameter
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ref = ReferenceRSDConv(fast)
    fast_opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(3, cin, 33, 17, dtype=torch.float64).contiguous(memory_format=memory_format)
        torch.manual_seed(100 + step)
        y_fast = fast(x)
        assert y_fast.is_contiguous(memory_format=memory_format)  # kept: no slow mixed-layout kernels
        target = torch.randn_like(y_fast)
        torch.manual_seed(100 + step)  # the same masks in both
        y_ref = ref(x)
        torch.testing.assert_close(y_fast, y_ref, rtol=1e-10, atol=1e-10)
        for opt, y in ((fast_opt, y_fast), (ref_opt, y_ref)):
            opt.zero_grad()
            ((y - target) ** 2).mean().backward()
        ref_grads = dict(ref.named_parameters())
        for name, g in fast_param_grads(fast).items():
            torch.testing.assert_close(g, ref_grads[name].grad, rtol=1e-9, atol=1e-12, msg=name)
        fast_opt.step()
        ref_opt.step()
    if bn:
        for name in ("running_mean", "running_var"):
            stats = fast.unstack(getattr(fast.bn, name))
            for b, ref_bn in enumerate(ref.bns):
                torch.testing.assert_close(stats[b], getattr(ref_bn, name), rtol=1e-10, atol=1e-12)
    fast.eval()
    ref.eval()
    x = torch.randn(2, cin, 33, 17, dtype=torch.float64)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("num_square", [1, 2])
@pytest.mark.parametrize("cin,cout,k,stride,groups,bn", [CASES[1], CASES[4], CASES[6], CASES[8]])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
def test_fewer_kxk_branches_equal_the_per_branch_reference(num_square, cin, cout, k, stride, groups, bn,
                                                           memory_format):
    """--kxk-branches 1 and 2: outputs, gradients and running statistics with branch drop, fp64
    (grouped, depthwise and BN-less blocks too: the fused BN op and the eval sum take any count)."""
    assert len(ReferenceRSDConv(RSDConv(cin, cout, k, stride, groups, num_square=num_square)).convs) == num_square + 2
    _assert_equals_reference(cin, cout, k, stride, groups, bn, 0.4, memory_format, num_square)


def test_whole_model_equals_reference_in_training():
    torch.manual_seed(0)
    model = create("resnet20", num_classes=10).double().train()
    set_branch_drop(model, 0.2)
    ref = to_reference(model)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(7)
    y = model(x)
    torch.manual_seed(7)
    torch.testing.assert_close(y, ref(x), rtol=1e-9, atol=1e-10)


def test_drop_keeps_each_branch_per_sample_and_rescales():
    """With p = 0.5 each sample's output is 2 x the sum of exactly the branches its mask kept."""
    torch.manual_seed(1)
    fast = RSDConv(4, 6, 3, drop_rate=0.5).double().train()
    x = torch.randn(16, 4, 9, 9, dtype=torch.float64)
    torch.manual_seed(5)
    y = fast(x)
    torch.manual_seed(5)
    mask = drop_mask(16, fast.num_branches, 0.5, dtype=torch.float64)
    assert set(mask.unique().tolist()) <= {0.0, 2.0}
    assert 0 < (mask == 0).sum() < mask.numel()
    ref = ReferenceRSDConv(fast)
    ref.drop_rate = 0.0
    branch_outputs = []
    for b, conv in enumerate(ref.convs):
        branch_outputs.append(ref.bns[b](conv(x)))
    expected = sum(mask[:, b].view(-1, 1, 1, 1) * out for b, out in enumerate(branch_outputs))
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


def test_no_drop_in_eval_mode_or_at_zero_rate():
    torch.manual_seed(0)
    block = RSDConv(4, 6, 3, drop_rate=0.9)
    x = torch.randn(8, 4, 7, 7)
    block.eval()
    assert torch.equal(block(x), block(x))
    block.train()
    torch.manual_seed(0)
    dropped = block(x)
    set_branch_drop(block, 0.0)
    a, b = block(x), block(x)
    # Equal up to rounding: the convolutions subtract the running mean, which the first
    # call updated (BN itself does not change under that shift).
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, dropped, rtol=1e-2, atol=1e-2)


def test_set_branch_drop_changes_attributes_only():
    model = create("resnet20", num_classes=10)
    before = {name: id(m) for name, m in model.named_modules()}
    params_before = [id(p) for p in model.parameters()]
    n = set_branch_drop(model, 0.2)
    assert n == 19  # stem + 18 block convs; 1x1 shortcuts stay conv+BN
    assert all(m.drop_rate == 0.2 for m in model.modules() if isinstance(m, RSDConv))
    assert {name: id(m) for name, m in model.named_modules()} == before
    assert [id(p) for p in model.parameters()] == params_before
    with pytest.raises(ValueError):
        set_branch_drop(model, 1.0)


def test_conv_block_forms_and_kernel_rule():
    assert isinstance(conv_block("rsd", 4, 4, 3), RSDConv)
    assert isinstance(conv_block("rsd", 4, 4, 5), RSDConv)
    assert type(conv_block("rsd", 4, 4, 1)) is ConvBN  # 1x1 stays conv+BN
    assert type(conv_block("rsd", 4, 4, 7)) is ConvBN  # K >= 7 stays conv+BN
    assert type(conv_block("plain", 4, 4, 3)) is ConvBN
    deploy = conv_block("deploy", 4, 4, 3)
    assert type(deploy) is nn.Conv2d and deploy.bias is not None
    with pytest.raises(ValueError):
        conv_block("fancy", 4, 4, 3)
    with pytest.raises(ValueError):
        RSDConv(4, 4, 4)  # even kernels cannot centre the Kx1 / 1xK branches


def test_rsd_block_parameter_count():
    # 3 KxK + Kx1 + 1xK kernels per (in, out) pair, and 5 BN affine pairs per output channel.
    block = RSDConv(16, 32, 3)
    assert sum(p.numel() for p in block.parameters()) == 16 * 32 * (3 * 9 + 2 * 3) + 2 * 5 * 32
    grouped = RSDConv(16, 32, 5, groups=4, bn=False)
    assert sum(p.numel() for p in grouped.parameters()) == 4 * 32 * (3 * 25 + 2 * 5) + 5 * 32


def test_branch_norm_sum_is_accurate_for_a_large_mean_given_a_shift():
    """Branch outputs with mean 1000 and spread 1, in fp32: passed shifted by a value near
    the mean (what RSDConv's convolutions do with the running mean), the one-pass batch
    statistics give BN's output and running statistics to fp32 precision."""
    torch.manual_seed(0)
    c = 6
    z = [1000.0 + torch.randn(8, k * c, 9, 9, dtype=torch.float64) for k in (3, 1, 1)]
    bn = nn.BatchNorm2d(5 * c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    ref_bn = copy.deepcopy(bn).double()
    ref_out = sum(ref_bn(torch.cat(z, 1)).split(c, 1))
    shift = torch.full((5 * c,), 1000.3)  # a running mean that lags the batch mean
    out = branch_norm_sum([(t - 1000.3).float() for t in z], bn, 1, None, shift)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_mean.double(), ref_bn.running_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(bn.running_var.double(), ref_bn.running_var, rtol=1e-4, atol=0)


def test_second_backward_through_a_block_is_refused():
    """The fused backward writes its input gradients over the saved conv outputs, so a
    retained graph cannot be walked twice: autograd says so instead of returning garbage."""
    block = RSDConv(4, 6, 3).train()
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    y = block(x).square().sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_compiled_block_matches_eager():
    """``torch.compile`` traces the fused training op (forward and hand-written backward)."""
    torch.manual_seed(0)
    block = RSDConv(4, 6, 3).double().train()
    eager = copy.deepcopy(block)
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    compiled = torch.compile(block)
    y = compiled(x)
    y.square().sum().backward()
    y_eager = eager(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(block.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)
    torch.testing.assert_close(block.bn.running_var, eager.bn.running_var, rtol=1e-10, atol=0)


def test_block_under_bfloat16_autocast_stays_close_to_float32():
    """Under autocast the convolutions run in bfloat16; statistics and BN's gradient use
    float32 arithmetic, so results stay within bfloat16's resolution (~4e-3) of float32."""
    torch.manual_seed(0)
    block = RSDConv(16, 16, 3, drop_rate=0.2).train()
    low = copy.deepcopy(block)
    x = torch.randn(8, 16, 12, 12).relu()
    torch.manual_seed(1)
    y = block(x)
    y.square().mean().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        y_low = low(x)
    assert y_low.dtype == torch.bfloat16
    y_low.float().square().mean().backward()

    def rel(a, b):
        return ((a - b.float()).norm() / a.norm()).item()

    assert rel(y, y_low) < 1e-2
    for (name, p), q in zip(block.named_parameters(), low.parameters(), strict=True):
        assert q.grad.dtype == torch.float32
        assert rel(p.grad, q.grad) < 1e-2, name
    torch.testing.assert_close(low.bn.running_var, block.bn.running_var, rtol=1e-2, atol=1e-3)
