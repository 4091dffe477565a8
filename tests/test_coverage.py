"""ResNet variants users have: ResNeXt, wide, dilated backbones, FrozenBatchNorm2d, odd BN settings."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

import fastres
from fastres.testing import assert_close, randomize_bn

FP32 = dict(rel=1e-4, atol=1e-4, rtol=1e-3)


def check(model, x):
    fast = fastres.convert(model)
    with torch.inference_mode():
        out = fast(x)
    with torch.no_grad():
        ref = model.double()(x.double())
    assert_close(out, ref, **FP32, what=type(model).__name__)
    return fastres.report(fast)


@pytest.mark.parametrize("arch", ["resnext50_32x4d", "wide_resnet50_2"])
def test_resnext_and_wide_resnet(arch):
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, arch)(num_classes=10)).eval()
    rep = check(model, torch.randn(1, 3, 32, 32))
    assert rep.convs_fused == rep.convs_total == 53


def test_dilated_backbone():
    torch.manual_seed(0)
    model = randomize_bn(
        ResNet(Bottleneck, [1, 1, 2, 1], replace_stride_with_dilation=[False, True, True])
    ).eval()
    rep = check(model, torch.randn(1, 3, 32, 32))
    assert rep.convs_fused == rep.convs_total


def test_frozen_batchnorm_backbone():
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=FrozenBatchNorm2d, num_classes=10)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.shape[0]
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            assert n > 0
    rep = check(model.eval(), torch.randn(2, 3, 32, 32))
    assert rep.convs_fused == rep.convs_total


def test_bn_without_affine_conv_with_bias_and_cumulative_momentum():
    seq = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True),
        nn.BatchNorm2d(8, affine=False),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=True),
        nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(),
    )
    seq = randomize_bn(seq).eval()
    rep = check(seq, torch.randn(2, 3, 9, 9))
    assert rep.convs_fused == 2


def test_batchnorm_without_running_stats_is_left():
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU()).eval()
    rep = check(seq, torch.randn(2, 3, 9, 9))
    assert rep.convs_fused == 0 and "running statistics" in rep.left[0].detail
