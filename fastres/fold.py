"""BatchNorm folding and weight prepacking, behind a cache that is never stale.

s = γ / sqrt(running_var + eps);  W' = W · s;  b' = (b_conv − running_mean) · s + β
computed in float64, then W' cast to the compute dtype and b' kept in fp32 (DESIGN.md).

The cache key holds, for every tensor the fold read: the tensor object itself, its
``_version`` (bumped by every in-place write: ``load_state_dict``, ``mul_``, optimizer steps),
its data pointer, dtype, device and shape (``.to()``, ``.half()`` and ``param.data = ...``
change those without a version bump). Any difference means the next forward refolds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

try:  # detection backbones use torchvision's FrozenBatchNorm2d
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:  # pragma: no cover - torchvision is a dependency, but keep fold usable alone
    FrozenBatchNorm2d = None


class Folded(NamedTuple):
    weight: torch.Tensor  # (C_out, C_in/groups, R, S) in memory order (R, S, C_in, C_out), compute dtype
    bias: torch.Tensor  # (C_out,) fp32


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in_g, R, S) with C_out stride 1: the kernel's K rows are contiguous."""
    return w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def bn_fold_reason(bn: nn.Module) -> str | None:
    """Why this norm layer cannot be folded into the conv before it, or None if it can."""
    if FrozenBatchNorm2d is not None and isinstance(bn, FrozenBatchNorm2d):
        return None
    if not isinstance(bn, nn.BatchNorm2d):
        return f"{type(bn).__name__} is not BatchNorm2d"
    if not bn.track_running_stats or bn.running_mean is None:
        return "BatchNorm2d without running statistics uses batch statistics in eval"
    return None


def bn_tensors(bn: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(γ, β, running_mean, running_var) of a BatchNorm2d or FrozenBatchNorm2d; γ/β None if not affine."""
    return bn.weight, bn.bias, bn.running_mean, bn.running_var


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module | None, dtype: torch.dtype) -> Folded:
    """Fold ``bn`` (eval statistics) into ``conv``; ``bn=None`` folds only the conv bias."""
    w = conv.weight.detach()
    acc = torch.float64 if w.device.type in ("cpu", "cuda") else torch.float32
    c_out = w.shape[0]
    b = (
        conv.bias.detach().to(acc)
        if conv.bias is not None
        else torch.zeros(c_out, dtype=acc, device=w.device)
    )
    if bn is None:
        return Folded(pack_weight(w.to(dtype)), b.float())
    gamma, beta, mean, var = bn_tensors(bn)
    scale = torch.rsqrt(var.detach().to(acc) + bn.eps)
    if gamma is not None:
        scale = scale * gamma.detach().to(acc)
    shift = (b - mean.detach().to(acc)) * scale
    if beta is not None:
        shift = shift + beta.detach().to(acc)
    w_folded = w.to(acc) * scale.view(-1, 1, 1, 1)
    return Folded(pack_weight(w_folded.to(dtype)), shift.float())


def _stamp(t: torch.Tensor | None):
    if t is None:
        return None
    return (t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape))


class FoldCache:
    """Holds one fold and the exact state of the tensors it was made from."""

    def __init__(self) -> None:
        self._tensors: tuple = ()
        self._stamps: tuple = ()
        self._extra = None
        self._value = None
        self.folds = 0  # how many times this cache has (re)folded: tests read it

    def clear(self) -> None:
        self._tensors, self._stamps, self._extra, self._value = (), (), None, None

    def get(self, tensors: tuple[torch.Tensor | None, ...], extra, make: Callable[[], Folded]) -> Folded:
        """The cached fold if every tensor is the same object in the same state, else ``make()``."""
        if torch.compiler.is_compiling():
            # Traced by torch.compile / torch.export: the fold becomes part of the graph (freezing
            # constant-folds it), and the graph's own guards decide when it is retraced.
            return make()
        try:
            stamps = tuple(_stamp(t) for t in tensors)
        except RuntimeError:  # inference tensors carry no version counter: never cache them
            self.folds += 1
            return make()
        if (
            self._value is not None
            and extra == self._extra
            and len(tensors) == len(self._tensors)
            and all(a is b for a, b in zip(tensors, self._tensors, strict=True))
            and stamps == self._stamps
        ):
            return self._value
        # Fold outside inference mode so the result is usable in any later mode.
        with torch.inference_mode(False), torch.no_grad():
            value = make()
        self._tensors, self._stamps, self._extra, self._value = tensors, stamps, extra, value
        self.folds += 1
        return value

    def __deepcopy__(self, memo):
        return FoldCache()  # a copy refolds from its own tensors

    def __getstate__(self):
        return {"folds": 0}

    def __setstate__(self, state):
        self.__init__()


def conv_bn_tensors(conv: nn.Conv2d, bn: nn.Module | None) -> tuple:
    """Every tensor a conv(+BN) fold reads, for the cache key."""
    if bn is None:
        return (conv.weight, conv.bias)
    return (conv.weight, conv.bias, *bn_tensors(bn))
