"""RSD for any conv+BN network: restructure, fuse back to the same architecture, mix by name."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from helpers import randomize_bn
from rsd_deploy import RSDConv, RSDError, fuse_model
from rsd_deploy.audit import audit, op_histogram
from rsd_deploy.models.external import build_plain, default_mix_points
from rsd_deploy.onnx import export_onnx
from rsd_deploy.restructure import restructure
from rsd_deploy.training.rsd import MixDraw, RSDStep, check_mix_points

HAS_TIMM = importlib.util.find_spec("timm") is not None
B, SIDE = 4, 32

#: model -> (convs, converted): what restructuring finds in each (3x3 and 5x5 pairs).
COUNTS = {
    "torchvision:resnet18": (20, 16),  # 7x7 stem and three 1x1 projections stay
    "torchvision:resnet50": (53, 16),  # 1x1s stay
    "torchvision:mobilenet_v2": (52, 18),  # depthwise 3x3s and the stem; 1x1s stay
    "torchvision:efficientnet_b0": (81, 17),  # 16 depthwise + stem; SE convs have no BN
    "torchvision:regnet_x_400mf": (71, 23),
    "torchvision:vgg11_bn": (8, 8),
    "timm:resnet18": (20, 16),
}
MODELS = [pytest.param(m, marks=pytest.mark.skipif(m.startswith("timm:") and not HAS_TIMM,
                                                   reason="timm is not installed")) for m in COUNTS]


def _plain(model: str) -> nn.Module:
    kind, name = model.split(":")
    torch.manual_seed(0)
    return build_plain(kind, name, num_classes=10, in_channels=3)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("model", MODELS)
def test_restructure_fuses_back_to_the_original_architecture(model, tmp_path):
    plain = _plain(model)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    rsd, report = restructure(plain)

    convs, converted = COUNTS[model]
    assert (len(report.convs), len(report.converted)) == (convs, converted)
    assert sum(isinstance(m, RSDConv) for m in rsd.modules()) == converted
    assert all(c.reason for c in report.skipped)
    # The input model is not modified.
    assert not any(isinstance(m, RSDConv) for m in plain.modules())
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())

    # Fusion is exact: fp64 and fp32, random BN statistics, against the restructured model.
    randomize_bn(rsd).eval()
    x = torch.randn(2, 3, SIDE, SIDE, dtype=torch.float64)
    fused64 = fuse_model(rsd.double())
    with torch.no_grad():
        assert _rel(fused64(x), rsd(x)) <= 1e-9
        rsd.float()
        fused = fuse_model(rsd)
        assert _rel(fused(x.float()), rsd(x.float())) <= 1e-5

    # The fused model is the original architecture with BN folded: same modules, same conv
    # count, no BN left, and its weights load strictly into the folded original.
    folded = fuse_model(plain)
    assert [(n, type(m)) for n, m in fused.named_modules()] == [(n, type(m)) for n, m in folded.named_modules()]
    n_conv = sum(isinstance(m, nn.Conv2d) for m in plain.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == n_conv == convs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    folded.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(folded(x.float()), fused(x.float()))

    # Its ONNX graph has the folded original's operators. (VGG's adaptive 7x7 pool exports
    # only from a side that 7 divides after its five pools.)
    side = 224 if "vgg" in model else SIDE
    export_onnx(fused, tmp_path / "fused.onnx", input_shape=(3, side, side))
    export_onnx(fuse_model(plain), tmp_path / "plain.onnx", input_shape=(3, side, side))
    hist = op_histogram(tmp_path / "fused.onnx")
    result = audit(hist, op_histogram(tmp_path / "plain.onnx"))
    assert result["passed"] and result["identical"], result["difference"]  # Identity nodes aside
    assert hist["Conv"] == convs and "BatchNormalization" not in hist


@pytest.mark.parametrize("model", ["torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_one_kxk_branch_restructures_fuses_and_starts_equivalent(model, tmp_path):
    """--kxk-branches 1 (ACNet-like blocks) on a library model, depthwise convs included: the
    report records it, every block has one KxK branch, fusion is exact, the graph is the original's."""
    plain = randomize_bn(_plain(model)).eval()
    rsd, report = restructure(plain, num_square=1)
    paper, _ = restructure(plain)
    assert report.to_json()["num_square"] == 1 and len(report.converted) == COUNTS[model][1]
    blocks = [m for m in rsd.modules() if isinstance(m, RSDConv)]
    assert len(blocks) == COUNTS[model][1] and all(b.weight_square.shape[0] == 1 for b in blocks)
    fewer = sum(p.numel() for p in paper.parameters()) - sum(p.numel() for p in rsd.parameters())
    assert fewer == sum(2 * (b.weight_square[0].numel() + 2 * b.out_channels) for b in blocks)
    randomize_bn(rsd).eval()
    x = torch.randn(2, 3, SIDE, SIDE, dtype=torch.float64)
    fused = fuse_model(rsd.double())
    with torch.no_grad():
        assert _rel(fused(x), rsd(x)) <= 1e-9
    fuse_model(plain).load_state_dict(fused.state_dict(), strict=True)
    export_onnx(fused.float(), tmp_path / "fused.onnx", input_shape=(3, SIDE, SIDE))
    export_onnx(fuse_model(plain), tmp_path / "plain.onnx", input_shape=(3, SIDE, SIDE))
    result = audit(op_histogram(tmp_path / "fused.onnx"), op_histogram(tmp_path / "plain.onnx"))
    assert result["passed"] and result["identical"], result["difference"]
    start, _ = restructure(plain.double(), num_square=1, equivalent_init=True)
    with torch.no_grad():
        assert _rel(start.eval()(x), plain(x)) <= 1e-12


@pytest.mark.parametrize("model", MODELS)
def test_one_rsd_step_at_each_default_mix_point(model):
    rsd, _ = restructure(_plain(model))
    kind, name = model.split(":")
    points = default_mix_points(kind, name, rsd, SIDE)
    assert points and len(points) >= 4
    step = RSDStep(rsd.train(), mix_points=points)
    rows = []  # rows of logits of each forward pass
    rsd.register_forward_hook(lambda _m, _a, out: rows.append(out.shape[0]))
    x, y = torch.randn(B, 3, SIDE, SIDE), torch.randint(0, 10, (B,))
    for point in (0, len(points) - 1):
        rows.clear()
        out = step(x, y, draw=MixDraw(point, 0.4, torch.tensor([2, 3, 1, 0])))
        assert torch.isfinite(out.loss) and out.logits.shape == (B, 10)
        assert rows == [B, 3 * B]  # the student pass, then the teacher's 3B rows after the point
        out.loss.backward()
    grads = [p.grad for p in rsd.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_default_mix_points_are_stage_outputs():
    def points(model):
        kind, name = model.split(":")
        return default_mix_points(kind, name, build_plain(kind, name, num_classes=10, in_channels=3), SIDE)

    assert points("torchvision:resnet50") == ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert points("torchvision:mobilenet_v2") == [f"features.{i}" for i in (1, 3, 6, 13, 18)]
    # VGG as the authors mix it: after each group's ReLU, before its pool.
    assert points("torchvision:vgg11_bn") == [f"features.{i}" for i in (2, 6, 13, 20, 27)]
    assert points("torchvision:regnet_x_400mf") == ["stem", *(f"trunk_output.block{i}" for i in range(1, 5))]
    assert points("torchvision:shufflenet_v2_x0_5") is None


@pytest.mark.parametrize("model", ["torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_equivalent_init_computes_what_the_original_did(model):
    plain = randomize_bn(_plain(model)).eval()
    for m in plain.modules():  # a conv bias too, which the first branch's BN must absorb
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.bias is None:
            m.bias = nn.Parameter(torch.randn(m.out_channels) * 0.1)
            break
    x = torch.randn(2, 3, SIDE, SIDE)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        original = plain.to(dtype)
        rsd, report = restructure(original, equivalent_init=True)
        assert report.converted
        with torch.no_grad():
            assert _rel(rsd.eval()(x.to(dtype)), original(x.to(dtype))) <= tol
    # Not an identity by accident: a fresh restructuring computes something else.
    fresh, _ = restructure(plain)
    with torch.no_grad():
        assert _rel(fresh.eval()(x.double()), plain(x.double())) > 1e-2
    # And training starts from the original: every other branch has BN weight and bias 0.
    block = next(m for m in rsd.modules() if isinstance(m, RSDConv))
    weight = block.unstack(block.bn.weight.detach())
    assert (weight[1:] == 0).all() and (weight[0] != 0).all()


def test_what_is_skipped_and_why():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),  # converted
        nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.BatchNorm2d(8),  # dilated
        nn.Conv2d(8, 8, 3, padding=0), nn.BatchNorm2d(8),  # padding not K//2
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 5, padding=2, stride=2, groups=8), nn.BatchNorm2d(8),  # depthwise 5x5 /2
        nn.Conv2d(8, 8, 7, padding=3), nn.BatchNorm2d(8),  # 7x7 stays
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),  # no BN
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),  # excluded below
    )
    out, report = restructure(net, exclude=["15"])
    reasons = {c.conv: c.reason for c in report.convs}
    assert reasons == {"0": None, "3": "dilated", "5": "padding not K//2", "7": "reflect padding", "9": None,
                       "11": "kernel 7x7 not restructured", "13": "not followed by BatchNorm2d alone",
                       "15": "excluded"}
    assert isinstance(out[9], RSDConv) and out[9].stride == (2, 2) and out[9].groups == 8
    assert isinstance(out[10], nn.Identity)
    # kernel_sizes decides which square kernels are restructured.
    _, report7 = restructure(net, kernel_sizes=(3, 5, 7))
    assert {c.conv for c in report7.converted} == {"0", "9", "11", "15"}
    # The BN's own eps and momentum carry over.
    net[1].eps, net[1].momentum = 1e-3, 0.01
    block = restructure(net)[0][0]
    assert (block.bn.eps, block.bn.momentum) == (1e-3, 0.01)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x))


def test_an_untraceable_model_takes_explicit_pairs():
    with pytest.raises(RSDError, match=r"torch.fx cannot trace _Untraceable.*pairs=\[\('conv', 'bn'\)"):
        restructure(_Untraceable())
    out, report = restructure(_Untraceable(), pairs=[("conv", "bn")])
    assert isinstance(out.conv, RSDConv) and isinstance(out.bn, nn.Identity) and len(report.converted) == 1
    for bad, match in (([("bn", "conv")], "is not an nn.Conv2d"), ([("conv", "nope")], "is not an nn.BatchNorm2d")):
        with pytest.raises(RSDError, match=match):
            restructure(_Untraceable(), pairs=bad)
    # fuse_model still folds what it knows: the RSDConv becomes one conv, nothing is left;
    # the original folded with the same pairs is the same architecture.
    fused = fuse_model(randomize_bn(out).eval())
    assert isinstance(fused.conv, nn.Conv2d) and fused.conv.bias is not None
    folded = fuse_model(_Untraceable().eval(), pairs=[("conv", "bn")])
    assert isinstance(folded.bn, nn.Identity)
    folded.load_state_dict(fused.state_dict(), strict=True)
    with pytest.raises(RSDError, match="is not an nn.Conv2d and an nn.BatchNorm2d"):
        fuse_model(_Untraceable(), pairs=[("bn", "conv")])


def test_mix_points_must_be_cuts():
    rsd, _ = restructure(_plain("torchvision:resnet18"))
    check_mix_points(rsd, ["maxpool", "layer1", "layer2.1", "layer4"])
    for points, match in (
        (["layer1.0.conv1"], "not a cut of the network: a path from the input to the logits goes around it"),
        (["layer9"], "is not a module of the model"),
        (["layer1", "layer1"], "repeat"),
        ([], "no mix points"),
    ):
        with pytest.raises(RSDError, match=match):
            RSDStep(rsd, mix_points=points)


def test_a_mix_point_changed_in_place_after_it_is_refused():
    # resnet18's bn1 (after the 7x7 stem conv, not restructured) is followed by ReLU(inplace=True).
    rsd, _ = restructure(_plain("torchvision:resnet18"))
    step = RSDStep(rsd.train(), mix_points=["bn1"])
    x, y = torch.randn(B, 3, SIDE, SIDE), torch.randint(0, 10, (B,))
    with pytest.raises(RSDError, match="'bn1' is changed in place after it"):
        step(x, y, draw=MixDraw(0, 0.5, torch.tensor([1, 0, 3, 2])))


def test_fuse_model_folds_any_conv_bn_pair_and_keeps_zoo_forms():
    plain = randomize_bn(_plain("torchvision:resnet18")).eval()
    fused = fuse_model(plain)
    assert isinstance(fused.bn1, nn.Identity) and fused.conv1.bias is not None
    assert isinstance(fused.layer2[0].downsample[1], nn.Identity)
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) <= 1e-5


class _TrainingOnlyBranch(nn.Module):
    """A conv+BN pair that runs only in training (as an auxiliary head does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.aux_conv, self.aux_bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.training:
            y = y + self.aux_bn(self.aux_conv(x))
        return y


def test_fusion_and_restructuring_do_not_depend_on_the_models_mode():
    net = _TrainingOnlyBranch()
    structures = []
    for training in (True, False):
        fused = fuse_model(net.train(training))
        structures.append([(n, type(m)) for n, m in fused.named_modules()])
        _, report = restructure(net.train(training))
        assert [c.conv for c in report.converted] == ["conv"]  # what the deployed forward runs
        assert net.training is training  # the mode is left as it was
    assert structures[0] == structures[1]


def test_nested_mix_points_are_each_checked_alone():
    rsd, _ = restructure(_plain("torchvision:resnet18"))
    check_mix_points(rsd, ["layer1", "layer1.1", "layer2.0"])
    with pytest.raises(RSDError, match="'layer1.0.conv1' is not a cut"):
        check_mix_points(rsd, ["layer1", "layer1.0.conv1"])


def test_a_model_returning_more_than_logits_is_one_line():
    class Tupled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())

        def forward(self, x):
            y = self.body(x)
            return (y, y) if self.training else y

    rsd, _ = restructure(Tupled())
    x, y = torch.randn(B, 3, 8, 8), torch.randint(0, 4, (B,))
    with pytest.raises(RSDError, match="Tupled returns tuple in training, not a tensor of logits"):
        RSDStep(rsd.train(), mix_points=["body"])(x, y, draw=MixDraw(0, 0.5, torch.tensor([1, 0, 3, 2])))
    # torchvision's googlenet and inception_v3 are built without their auxiliary heads.
    googlenet = build_plain("torchvision", "googlenet", num_classes=10, in_channels=3).train()
    assert isinstance(googlenet(torch.randn(2, 3, 64, 64)), torch.Tensor)


def test_default_mix_points_follow_the_models_dtype_and_device():
    model = build_plain("torchvision", "mobilenet_v2", num_classes=10, in_channels=3).double()
    assert default_mix_points("torchvision", "mobilenet_v2", model, SIDE)[0] == "features.1"


def test_zoo_models_fuse_to_their_deploy_form():
    from rsd_deploy import models

    rsd = randomize_bn(models.create("resnet20", num_classes=10)).eval()
    fused = fuse_model(rsd)
    deploy = models.create("resnet20", num_classes=10, form="deploy")
    assert [type(m) for m in fused.modules()] == [type(m) for m in deploy.modules()]
    deploy.load_state_dict(fused.state_dict(), strict=True)
