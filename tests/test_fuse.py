"""Fusion is exact: fused == unfused (eval) within tight tolerances, for blocks and the whole zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import randomize_bn
from rsd_deploy import RSDConv, RSDError, fuse_model
from rsd_deploy.blocks import Affine2d, ConvBN
from rsd_deploy.models import create, get_spec, names


def assert_fused_matches(model: nn.Module, x: torch.Tensor, rel: float) -> None:
    model.eval()
    fused = fuse_model(model)
    with torch.no_grad():
        y, y_fused = model(x), fused(x)
    err = (y - y_fused).abs().max().item()
    scale = y.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} * max|y| ({scale:.3g})"
    assert torch.equal(y.argmax(1), y_fused.argmax(1)) if y.dim() == 2 else True


BLOCK_CASES = [
    # (cin, cout, k, stride, groups, bn)
    (8, 16, 3, 1, 1, True),
    (8, 16, 3, 2, 1, True),
    (8, 16, 5, 1, 1, True),
    (8, 16, 5, 2, 1, True),
    (8, 16, 3, 1, 4, True),
    (8, 16, 5, 2, 4, True),
    (16, 16, 3, 1, 16, True),
    (16, 16, 5, 2, 16, True),
    (8, 16, 3, 2, 1, False),
    (8, 16, 5, 1, 4, False),
]


@pytest.mark.parametrize("cin,cout,k,stride,groups,bn", BLOCK_CASES)
@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("batch", [1, 3])
def test_block_fusion_is_exact(cin, cout, k, stride, groups, bn, dtype, rel, batch):
    torch.manual_seed(0)
    block = randomize_bn(RSDConv(cin, cout, k, stride, groups, bn=bn)).to(dtype)
    x = torch.randn(batch, cin, 33, 17, dtype=dtype)  # odd sizes: borders and strides matter
    assert_fused_matches(block, x, rel)
    conv = fuse_model(block)
    assert type(conv) is nn.Conv2d and conv.bias is not None
    assert conv.kernel_size == (k, k) and conv.stride == (stride, stride) and conv.groups == groups


@pytest.mark.parametrize("num_square", [1, 2, 3])
@pytest.mark.parametrize("groups,bn", [(1, True), (4, True), (1, False)])
def test_block_fusion_is_exact_for_every_kxk_branch_count(num_square, groups, bn):
    """The cost dial (--kxk-branches): the block still fuses exactly, with the parameters it should have."""
    torch.manual_seed(0)
    block = randomize_bn(RSDConv(8, 16, 3, 2, groups, num_square=num_square, bn=bn)).double()
    per_branch = 16 * (8 // groups)
    expected = per_branch * (9 * num_square + 3 + 3) + (num_square + 2) * 16 * (2 if bn else 1)
    assert sum(p.numel() for p in block.parameters()) == expected
    assert_fused_matches(block, torch.randn(2, 8, 33, 17, dtype=torch.float64), 1e-9)


@pytest.mark.parametrize("k,stride", [(1, 1), (3, 2), (7, 2)])
def test_conv_bn_fusion_is_exact(k, stride):
    torch.manual_seed(0)
    block = randomize_bn(ConvBN(6, 10, k, stride)).double()
    assert_fused_matches(block, torch.randn(2, 6, 19, 23, dtype=torch.float64), 1e-9)


def _zoo_input(name: str, dtype: torch.dtype) -> torch.Tensor:
    size = get_spec(name).input_size
    torch.manual_seed(1)
    return torch.randn(2, 3, size, size, dtype=dtype)


@pytest.mark.parametrize("name", names())
def test_zoo_fusion_is_exact(name):
    torch.manual_seed(0)
    model = randomize_bn(create(name, num_classes=10, form="rsd"), seed=3)
    for dtype, rel in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        model = model.to(dtype)
        assert_fused_matches(model, _zoo_input(name, dtype), rel)


@pytest.mark.parametrize("name", names())
def test_fused_model_is_the_plain_architecture(name):
    rsd = randomize_bn(create(name, num_classes=10, form="rsd"))
    fused = fuse_model(rsd)
    deploy = create(name, num_classes=10, form="deploy")
    deploy.load_state_dict(fused.state_dict(), strict=True)
    plain = create(name, num_classes=10, form="plain")

    def count(model: nn.Module, kind: type) -> int:
        return sum(type(m) is kind for m in model.modules())

    n_conv = count(plain, nn.Conv2d)
    assert n_conv == count(deploy, nn.Conv2d) == count(fused, nn.Conv2d) > 0
    assert all(m.bias is not None for m in fused.modules() if isinstance(m, nn.Conv2d))
    for model in (fused, deploy):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert not any(isinstance(m, (RSDConv, ConvBN)) for m in model.modules())
    # Only DenseNet's pre-activation BNs, which belong to the architecture, remain as affines.
    conv_bns = sum(isinstance(m, ConvBN) and m.bn is not None for m in plain.modules())
    assert count(fused, Affine2d) == count(plain, nn.BatchNorm2d) - conv_bns
    assert (count(fused, Affine2d) > 0) == name.startswith("densenet")
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in deploy.parameters())


def test_fuse_leaves_input_untouched():
    model = randomize_bn(create("resnet20", num_classes=10)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_model(model)
    assert model.training and not fused.training
    assert any(isinstance(m, RSDConv) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("where", ["weight", "running_var", "running_mean", "negative_var"])
def test_fuse_refuses_non_finite_weights(where):
    model = create("resnet20", num_classes=10)
    block = model.stages[1][0].conv1
    with torch.no_grad():
        if where == "weight":
            block.weight_square[1, 0, 0, 0, 0] = float("nan")
        elif where == "running_var":
            block.bn.running_var[3] = float("inf")
        elif where == "running_mean":
            block.bn.running_mean[3] = float("nan")
        else:
            block.bn.running_var[3] = -1.0
    with pytest.raises(RSDError, match="stages.1.0.conv1"):
        fuse_model(model)
