"""Whole torchvision ResNets, converted, against eager; and what a converted forward launches."""

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
from fastres.kernels import conv as conv_kernels
from fastres.kernels import pool as pool_kernels
from fastres.testing import assert_close, randomize_bn

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return randomize_bn(getattr(torchvision.models, arch)(num_classes=64), seed).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_resnet_matches_eager_fp32(arch, device):
    model = build(arch).to(device)
    fast = fastres.convert(model)
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.inference_mode():
        y = fast(x)
    with torch.no_grad():
        ref = model.double()(x.double())
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert_close(y, ref, rel=1e-4, atol=1e-4, rtol=1e-3, what=arch)


def test_converted_resnet_fp16(device):
    model = build("resnet18").to(device)
    fast = fastres.convert(model).half()
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.inference_mode():
        y = fast(x.half())
        ref = model.double()(x.double())
    assert y.dtype == torch.float16
    assert_close(y, ref, rel=1e-2, atol=5e-2, rtol=5e-2, what="resnet18 fp16")


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_resnet50_launches_only_fused_kernels(monkeypatch, device):
    """In eval, no eager conv, batch norm, ReLU or add remains, and at most 56 Triton launches."""
    launches = []

    def counting(kernel):
        from fastres.kernels._common import launchable

        inner = launchable(kernel)

        class _Counted:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append(getattr(kernel, "__name__", str(kernel)))
                    return inner[grid](*args, **kwargs)

                return launch

        return _Counted()

    monkeypatch.setattr(conv_kernels, "launchable", counting)
    monkeypatch.setattr(pool_kernels, "launchable", counting)
    fast = fastres.convert(build("resnet50").to(device))
    x = torch.randn(1, 3, 32, 32, device=device)
    with torch.inference_mode():
        fast(x)  # the first forward folds (that is eager arithmetic on the weights, once)
    launches.clear()
    with torch.inference_mode(), _OpLog() as log:
        fast(x)
    forbidden = {
        "aten.convolution",
        "aten.cudnn_convolution",
        "aten.mkldnn_convolution",
        "aten._native_batch_norm_legit_no_training",
        "aten.native_batch_norm",
        "aten.batch_norm",
        "aten.relu",
        "aten.relu_",
        "aten.add",
        "aten.add_",
        "aten.threshold",
        "aten.max_pool2d_with_indices",
        "aten.mean",
    }
    left = sorted(set(log.ops) & forbidden)
    assert not left, f"eager ops left in a converted forward: {left}"
    # 53 convs: 45 alone, and 4 block tails that also run their projection shortcut (dual GEMM).
    assert log.ops.count("fastres.conv_bias_act") == 45
    assert log.ops.count("fastres.conv_shortcut_bias_act") == 4
    assert len(launches) <= 56, f"{len(launches)} Triton launches"
    assert len(launches) == 51  # 49 conv kernels + max-pool + global average pool
