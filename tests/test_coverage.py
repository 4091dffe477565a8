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


class SEBlock(nn.Module):
    """A ResNet-D style block from another library: average-pool shortcut, squeeze-excitation."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.se_reduce = nn.Conv2d(c_out, c_out // 4, 1)
        self.se_expand = nn.Conv2d(c_out // 4, c_out, 1)
        self.down = nn.Sequential(
            nn.AvgPool2d(stride), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        )
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        s = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        return self.act2(y * s + self.down(x))


class OtherResNet(nn.Module):
    """Deep stem (three conv-bn-relu as attributes), SE blocks, a head with dropout."""

    def __init__(self):
        super().__init__()
        self.stem_conv1, self.stem_bn1 = nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        self.stem_conv2, self.stem_bn2 = nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.stem_conv3, self.stem_bn3 = nn.Conv2d(16, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.blocks = nn.Sequential(SEBlock(32, 32, 1), SEBlock(32, 64, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x):
        x = torch.relu(self.stem_bn1(self.stem_conv1(x)))
        x = self.relu(self.stem_bn2(self.stem_conv2(x)))
        x = self.relu(self.stem_bn3(self.stem_conv3(x)))
        return self.head(self.blocks(x))


def test_resnet_shaped_model_from_another_library():
    torch.manual_seed(0)
    model = randomize_bn(OtherResNet()).eval()
    rep = check(model, torch.randn(2, 3, 24, 20))
    fused = {e.path for e in rep.fused}
    # The stem's three conv+bn, each block's two conv+bn and its shortcut conv+bn are fused.
    assert {"stem_conv1", "stem_conv2", "stem_conv3", "blocks.0.conv1", "blocks.1.down.1"} <= fused
    assert rep.convs_fused == 3 + 2 * 3 and rep.convs_total == rep.convs_fused + 4  # SE convs left
    fast = fastres.convert(model)
    # relu as a module after a BN is folded; the shared self.relu (used twice) is not.
    assert isinstance(fast.blocks[0].act1, fastres.FoldedReLU) and type(fast.relu) is nn.ReLU
