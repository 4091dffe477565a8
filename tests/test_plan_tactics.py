"""A launch plan runs the tactic chosen for each conv (issue 11: ``$FASTRES_TACTICS`` or a tuned table):
the TMA GEMM for 1×1 stride-1 convs, the TMA conv for 3×3 stride-1 ones, the cudnn tactic (F.conv2d and
the epilogue pass in the interpreter) anywhere, gather for the rest; the result is eager's either way."""

import pytest
import torch
import torchvision

import fastres
from fastres.kernels import tactics
from fastres.testing import assert_close, count_launches, randomize_bn


def _model():
    torch.manual_seed(0)
    # ResNet-50's block structure at reduced width: 1×1 and 3×3 stride-1 convs, stride-2 ones, the
    # projection shortcuts (dual GEMM tails), the stem. Channels stay multiples of 16 (TMA's rows).
    model = torchvision.models.resnet.ResNet(
        torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16
    )
    return randomize_bn(model).eval()


@pytest.mark.parametrize(
    "env, kernels",
    [
        (
            "tma_gemm,tma_conv",
            {"_conv1x1_bias_act_fwd_kernel", "_conv3x3_bias_act_fwd_kernel", "_conv_bias_act_fwd_kernel"},
        ),
        ("cudnn", {"_bias_act_epilogue_kernel"}),
    ],
)
def test_plans_run_the_chosen_tactics(monkeypatch, env, kernels):
    model = _model()
    fast = fastres.convert(model)
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    monkeypatch.setenv(tactics.ENV_VAR, env)
    with torch.inference_mode():
        fast(x)  # the plans are made (and the tactics chosen) here
        with count_launches() as launches:
            out = fast(x)
        again = fast(x)
        ref = model(x)
    names = set(launches)
    assert kernels <= names, names
    assert_close(out, ref, rel=1e-4, atol=1e-4, rtol=1e-4, what=f"FASTRES_TACTICS={env}")
    assert torch.equal(out, again)
    # Without the variable the default (gather) comes back with the next plans.
    monkeypatch.delenv(tactics.ENV_VAR)
    fastres.refold(fast)
    with torch.inference_mode(), count_launches() as launches:
        out = fast(x)
    assert not (kernels - {"_conv_bias_act_fwd_kernel"}) & set(launches), set(launches)
    assert_close(out, ref, rel=1e-4, atol=1e-4, rtol=1e-4, what="gather")


def test_a_tactic_that_cannot_run_a_conv_is_refused_with_its_reason():
    x = torch.randn(1, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 3, 3)
    with pytest.raises(ValueError, match="tma_gemm"):
        tactics.prepare("tma_gemm", x, w, torch.randn(32), stride=1, padding=1)
