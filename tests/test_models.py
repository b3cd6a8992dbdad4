"""The model zoo: architectures as specified, mix points, counts, the CLI table."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from rsd_deploy import RSDConv, RSDError, __version__, fuse_model
from rsd_deploy.blocks import ConvBN
from rsd_deploy.cli import main
from rsd_deploy.complexity import count_macs, count_params
from rsd_deploy.models import create, get_spec, names
from rsd_deploy.models.resnet import BasicBlock, Bottleneck
from rsd_deploy.training.rsd import check_mix_points

ZOO = {
    "resnet20", "resnet32", "resnet56", "resnet110", "wrn20_8", "vgg16", "vgg19",
    "densenet40_12", "resnet18", "resnet34",
}


def test_registry_lists_the_zoo():
    assert set(names()) == ZOO
    assert get_spec("resnet18").input_size == 224 and get_spec("resnet18").family == "imagenet"
    assert get_spec("vgg16").input_size == 32 and get_spec("vgg16").family == "cifar"


def test_create_rejects_bad_input():
    with pytest.raises(RSDError, match="unknown model 'resnet21'.*resnet20"):
        create("resnet21", num_classes=10)
    with pytest.raises(RSDError, match="unknown form"):
        create("resnet20", num_classes=10, form="fused")  # type: ignore[arg-type]
    with pytest.raises(RSDError):
        create("resnet20", num_classes=0)


def test_resnet20_plain_matches_hand_count():
    # stem 3x3 (3->16) + BN, then 3 stages of 3 basic blocks (16/32/64), 1x1+BN shortcuts
    # where the shape changes, and a 64->10 linear layer.
    conv = lambda cin, cout, k: cin * cout * k * k + 2 * cout  # conv + BN affine
    stage1 = 6 * conv(16, 16, 3)
    stage2 = conv(16, 32, 3) + 5 * conv(32, 32, 3) + conv(16, 32, 1)
    stage3 = conv(32, 64, 3) + 5 * conv(64, 64, 3) + conv(32, 64, 1)
    expected = conv(3, 16, 3) + stage1 + stage2 + stage3 + 64 * 10 + 10
    assert count_params(create("resnet20", num_classes=10, form="plain")) == expected
    # MACs: 16 + 2*... per-pixel work on 32x32, 16x16 and 8x8 maps.
    macs = (
        3 * 16 * 9 * 32 * 32
        + 6 * 16 * 16 * 9 * 32 * 32
        + (16 * 32 * 9 + 5 * 32 * 32 * 9 + 16 * 32) * 16 * 16
        + (32 * 64 * 9 + 5 * 64 * 64 * 9 + 32 * 64) * 8 * 8
        + 64 * 10
    )
    assert count_macs(create("resnet20", num_classes=10, form="deploy"), (3, 32, 32)) == macs


@pytest.mark.parametrize(
    "name,block,per_stage,out_channels",
    [
        ("resnet32", BasicBlock, 5, 64),
        ("resnet110", Bottleneck, 12, 256),
        ("wrn20_8", Bottleneck, 2, 256),
        ("resnet18", BasicBlock, None, 512),
    ],
)
def test_resnet_structures(name, block, per_stage, out_channels):
    model = create(name, num_classes=10, form="plain")
    for stage in model.stages:
        assert all(isinstance(b, block) for b in stage)
        if per_stage is not None:
            assert len(stage) == per_stage
    assert model.head[-1].in_features == out_channels
    if name == "wrn20_8":  # width per group 512: bottleneck inner width 8x planes
        assert [s[0].conv2.conv.out_channels for s in model.stages] == [128, 256, 512]
    if name == "resnet18":
        assert [len(s) for s in model.stages] == [2, 2, 2, 2]
        assert model.stem[0].kernel_size == (7, 7)


def _vgg_macs(groups: list[list[int]], sides: list[int], num_classes: int) -> int:
    """Hand count: each 3x3 conv's in*out*9 multiply-adds at every pixel of its group."""
    total, cin = 0, 3
    for widths, side in zip(groups, sides, strict=True):
        for w in widths:
            total += cin * w * 9 * side * side
            cin = w
    return total + cin * num_classes


@pytest.mark.parametrize(
    "name,groups,macs",
    [
        ("vgg16", [[64] * 2, [128] * 2, [256] * 3, [512] * 3, [512] * 3], 398_182_400),
        ("vgg19", [[64] * 2, [128] * 2, [256] * 4, [512] * 4, [512] * 4], 511_428_608),
    ],
)
def test_vgg_is_the_authors_cifar_layout(name, groups, macs):
    # The RSD authors' CIFAR VGG: pools after groups 1-3 only, so groups 4 and 5 both
    # run at 4x4, and the features are taken after each group's ReLU, before its pool.
    sides = [32, 16, 8, 4, 4]
    assert _vgg_macs(groups, sides, 100) == macs
    plain = create(name, num_classes=100, form="plain")
    assert count_macs(plain, (3, 32, 32)) == macs
    assert count_macs(create(name, num_classes=100, form="deploy"), (3, 32, 32)) == macs
    convs = [m for m in plain.modules() if isinstance(m, ConvBN)]
    assert [m.conv.out_channels for m in convs] == [w for g in groups for w in g]
    assert sum(isinstance(m, nn.MaxPool2d) for m in plain.modules()) == 3
    assert plain.num_mix_points == 5 and plain.head[-1].in_features == 512
    feats = [plain.eval().forward_to(torch.zeros(1, 3, 32, 32), p) for p in range(plain.num_mix_points)]
    assert [tuple(f.shape[1:]) for f in feats] == [
        (g[-1], s, s) for g, s in zip(groups, sides, strict=True)
    ]
    # Mix points sit after a ReLU (non-negative features), not after a pool.
    assert all(isinstance(m[-1], nn.ReLU) for m in [plain.stem, *plain.stages])


def test_vgg16_fused_equals_plain():
    # RSD form (random BN statistics) fused into conv-with-bias equals the RSD form in
    # eval, and loads strictly into the plain deploy architecture with the same logits.
    torch.manual_seed(0)
    rsd = create("vgg16", num_classes=10, form="rsd").double()
    with torch.no_grad():
        for m in rsd.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    rsd.eval()
    deploy = create("vgg16", num_classes=10, form="deploy").double().eval()
    deploy.load_state_dict(fuse_model(rsd).state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        y, y_deploy = rsd(x), deploy(x)
    assert y.abs().max() > 1e-3  # not a vanishing output that would match anything
    torch.testing.assert_close(y_deploy, y, rtol=1e-9, atol=1e-9 * y.abs().max().item())


def test_densenet_structure():
    dense = create("densenet40_12", num_classes=100, form="plain")
    layers = [sum(type(m).__name__ == "DenseLayer" for m in s.modules()) for s in dense.stages]
    assert layers == [6, 6, 6]
    assert dense.head[-1].in_features == 132  # 24 + 6*12 -> 48 + 72 -> 60 + 72


@pytest.mark.parametrize("name", ["resnet20", "wrn20_8", "vgg16", "densenet40_12", "resnet18"])
def test_mix_points_are_cuts_that_compose_to_the_full_forward(name):
    torch.manual_seed(0)
    model = create(name, num_classes=7).eval()
    size = 64 if name == "resnet18" else 32
    x = torch.randn(2, 3, size, size)
    assert model.mix_points == ("stem", *(f"stages.{i}" for i in range(len(model.stages))))
    check_mix_points(model, model.mix_points)  # each is a cut: no skip connection around it
    outputs = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, _, out, n=n: outputs.update({n: out}))
             for n in model.mix_points]
    with torch.no_grad():
        y = model(x)
        for h in hooks:
            h.remove()
        for point, name in enumerate(model.mix_points):
            torch.testing.assert_close(model.forward_to(x, point), outputs[name])
        torch.testing.assert_close(model.head(outputs[model.mix_points[-1]]), y)


def test_rsd_form_restructures_exactly_the_kxk_convs():
    rsd, plain = create("resnet18", num_classes=10), create("resnet18", num_classes=10, form="plain")
    k3 = sum(isinstance(m, ConvBN) and m.kernel_size == (3, 3) for m in plain.modules())
    assert sum(isinstance(m, RSDConv) for m in rsd.modules()) == k3 == 16
    kept = [m.kernel_size for m in rsd.modules() if isinstance(m, ConvBN)]
    assert sorted(kept) == [(1, 1)] * 3 + [(7, 7)]  # shortcuts and the 7x7 stem stay conv+BN


def test_cli_version_help_and_models_table():
    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).output.strip() == f"rsd-deploy, version {__version__}"
    assert runner.invoke(main, ["--help"]).exit_code == 0
    result = runner.invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.strip() and line.split()[0] in ZOO}
    assert set(rows) == ZOO
    # resnet32 for CIFAR-100: 0.47M parameters deployed (the paper's figure), ~3.7x while training.
    assert rows["resnet32"][5] == "471.52K"
    assert rows["resnet32"][1:3] == ["cifar", "32x32"]
    # vgg16 as the authors' CIFAR VGG: 398 M multiply-adds deployed (313 M with a 2x2 last group).
    assert rows["vgg16"][-1] == "398.18M" and rows["vgg19"][-1] == "511.43M"
