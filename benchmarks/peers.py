"""The other side of every comparison: eager conv-BN-ReLU(-add), cuDNN with folded BN, Inductor, and a
small CUDA-graph wrapper. Written here, independently of fastres's own fold, so a folding bug in
fastres cannot hide by appearing on both sides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(W·s in ``dtype``, channels_last as cuDNN likes it; (b − μ)·s + β in float64);
    s = γ / sqrt(var + eps)."""
    w = conv.weight.detach().double()
    b = (
        conv.bias.detach().double()
        if conv.bias is not None
        else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    )
    s = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.detach().double()
    shift = (b - bn.running_mean.detach().double()) * s
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    w = (w * s.view(-1, 1, 1, 1)).to(dtype).contiguous(memory_format=torch.channels_last)
    return w, shift


class ConvBNAct(nn.Module):
    """One ResNet layer as eager PyTorch runs it: conv → BN (→ + residual) (→ ReLU)."""

    def __init__(self, shape):
        super().__init__()
        self.conv = nn.Conv2d(
            shape.c,
            shape.k,
            (shape.r, shape.s),
            shape.stride,
            shape.padding,
            shape.dilation,
            shape.groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(shape.k)
        self.relu = shape.relu

    def forward(self, x, residual=None):
        y = self.bn(self.conv(x))
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y


def cudnn_folded_fn(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype, relu: bool):
    """f(x, residual=None) with BN folded: ``torch.cudnn_convolution_relu`` / ``_add_relu`` (one cuDNN
    fused call), or a plain biased conv when there is no ReLU (the downsample)."""
    w, b = fold_bn(conv, bn, dtype)
    b = b.to(dtype)
    args = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)

    def f(x, residual=None):
        if not relu:
            y = F.conv2d(x, w, b, *args)
            return y if residual is None else y + residual
        if residual is None:
            return torch.cudnn_convolution_relu(x, w, b, *args)
        return torch.cudnn_convolution_add_relu(x, w, residual, 1.0, b, *args)

    return f


class CudnnFoldedResNet(nn.Module):
    """A torchvision ResNet with every conv+BN folded and run through cuDNN's fused conv(+add)+ReLU."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        m = model
        self.stem = cudnn_folded_fn(m.conv1, m.bn1, dtype, relu=True)
        self.maxpool = m.maxpool
        self.blocks = []
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            for blk in layer:
                pairs = [("conv1", "bn1"), ("conv2", "bn2")]
                if hasattr(blk, "conv3"):
                    pairs.append(("conv3", "bn3"))
                fns = [cudnn_folded_fn(getattr(blk, c), getattr(blk, b), dtype, relu=True) for c, b in pairs]
                ds = None
                if blk.downsample is not None:
                    ds = cudnn_folded_fn(blk.downsample[0], blk.downsample[1], dtype, relu=False)
                self.blocks.append((fns, ds))
        self.avgpool = m.avgpool
        self.fc = m.fc

    def forward(self, x):
        x = self.maxpool(self.stem(x))
        for fns, ds in self.blocks:
            identity = ds(x) if ds is not None else x
            out = x
            for f in fns[:-1]:
                out = f(out)
            x = fns[-1](out, identity)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CudaGraphRunner:
    """Capture ``fn(static_input)`` once in a CUDA graph; each call copies the input in and replays.

    >>> run = CudaGraphRunner(model, x)      # doctest: +SKIP
    >>> y = run(x)                           # doctest: +SKIP
    """

    def __init__(self, fn, example: torch.Tensor, warmup: int = 3):
        self.fn = fn
        self.static_in = example.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up outside capture: Triton JIT, cuDNN heuristics, allocator
            for _ in range(warmup):
                fn(self.static_in)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(self.static_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out
