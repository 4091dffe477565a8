"""BatchNorm folding and weight prepacking, behind a cache that is never stale.

s = γ / sqrt(running_var + eps);  W' = W · s;  b' = (b_conv − running_mean) · s + β
computed in float64, then W' cast to the compute dtype and b' kept in fp32 (DESIGN.md).

The cache key holds, for every tensor the fold read: the tensor object itself, its
``_version`` (bumped by every in-place write: ``load_state_dict``, ``mul_``, optimizer steps),
its data pointer, dtype, device and shape (``.to()``, ``.half()`` and ``param.data = ...``
change those without a version bump). Any difference means the next forward refolds.

Inference tensors (created under ``torch.inference_mode``, e.g. a model built there) have no version
counter: they are keyed by object, data pointer, dtype, device and shape only, so an in-place write to
one (``w.mul_(2)`` inside inference mode), like a write through ``param.data``, is not seen: call
``fastres.refold(model)`` after it.

fp32 on CUDA with tf32 dots (``FASTRES_FP32_PRECISION``, default "tf32"): Triton's tf32 dot truncates
its operands (it drops the low 13 mantissa bits), so the fold rounds the fp32 weights to tf32, nearest
even, and the kernel rounds its fp32 outputs the same way: every dot operand is then exact in tf32 and
the error is cuDNN's (DESIGN.md, Numerics). The precision is part of the cache key.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

try:  # detection backbones use torchvision's FrozenBatchNorm2d
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:  # pragma: no cover - torchvision is a dependency, but keep fold usable alone
    FrozenBatchNorm2d = None


# Device types whose fp32 convs run Triton's truncating tf32 dot (fastres.kernels.conv has the same
# switch for the output rounding; the tf32 emulation test turns both on for the interpreter).
TF32_ROUND_DEVICE_TYPES = ("cuda",)


def fp32_precision() -> str:
    """The fp32 dot mode of the kernels: "tf32" (default) or "ieee" (``$FASTRES_FP32_PRECISION``)."""
    return os.environ.get("FASTRES_FP32_PRECISION", "tf32")


def rounds_to_tf32(device: torch.device, dtype: torch.dtype, precision: str | None = None) -> bool:
    """Whether fp32 folded weights for ``device`` are rounded to tf32 (see the module docstring);
    ``precision`` is the launch's fp32 dot mode, default ``fp32_precision()``."""
    if dtype != torch.float32 or device.type not in TF32_ROUND_DEVICE_TYPES:
        return False
    return (precision or fp32_precision()) == "tf32"


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 ``t`` rounded to the nearest tf32 value (10 mantissa bits), ties to even; Inf and NaN unchanged.
    Values above the largest tf32 (within half a tf32 step of fp32's maximum) round to ±Inf, as correct
    rounding must.

    >>> round_tf32(torch.tensor([1 + 2**-11, 1 + 3 * 2**-11])).tolist()  # ties to even  # doctest: +SKIP
    [1.0, 1.001953125]
    """
    if t.dtype != torch.float32:
        raise TypeError(f"round_tf32: expected a float32 tensor, got {t.dtype}")
    bits = t.view(torch.int32)
    # Adding 0xFFF plus the lowest kept bit, then clearing the low 13 bits, rounds to nearest even;
    # finite values cannot overflow int32 (the largest, 0x7F7FFFFF, becomes 0x7F800000: Inf).
    rounded = (bits + (0xFFF + ((bits >> 13) & 1))) & -8192
    finite = (bits & 0x7F800000) != 0x7F800000
    return torch.where(finite, rounded, bits).view(torch.float32)


class Folded(NamedTuple):
    weight: torch.Tensor  # (C_out, C_in/groups, R, S) in memory order (R, S, C_in, C_out), compute dtype
    bias: torch.Tensor  # (C_out,) fp32


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in_g, R, S) with C_out stride 1: the kernel's K rows are contiguous."""
    return w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def pack_weight_cpu(
    w: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    input_size: list[int] | None,
) -> torch.Tensor:
    """A folded weight in the CPU conv's layout (never the kernel's ``pack_weight`` layout, which oneDNN
    would reorder on every call). With ``input_size``: oneDNN's blocked format for exactly this conv
    and input shape, an opaque ``torch._mkldnn`` tensor for ``torch.ops.mkldnn._convolution_pointwise``
    (what Inductor's CPU freezing makes); a pack made for another spatial size can be 30-200x slower, so
    callers key it on the input shape. Without: a dense channels_last copy for ``F.conv2d``.

    >>> pack_weight_cpu(w, [1, 1], [1, 1], [1, 1], 1, [8, 64, 56, 56]).is_mkldnn   # doctest: +SKIP
    True
    """
    w = w.detach()
    if input_size is None:
        return w.contiguous(memory_format=torch.channels_last)
    return torch.ops.mkldnn._reorder_convolution_weight(
        w.contiguous(), padding, stride, dilation, groups, list(input_size)
    )


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


def fold_conv_bn(
    conv: nn.Conv2d, bn: nn.Module | None, dtype: torch.dtype, *, precision: str | None = None
) -> Folded:
    """Fold ``bn`` (eval statistics) into ``conv``; ``bn=None`` folds only the conv bias.
    ``precision``: the fp32 dot mode the weights are for ("tf32" rounds fp32 weights on CUDA, "ieee"
    does not); default ``$FASTRES_FP32_PRECISION``, as the kernels' default. Pass the same ``precision``
    to ``conv_bias_act`` when calling the launcher directly."""
    w = conv.weight.detach()
    acc = torch.float64 if w.device.type in ("cpu", "cuda") else torch.float32
    c_out = w.shape[0]
    b = (
        conv.bias.detach().to(acc)
        if conv.bias is not None
        else torch.zeros(c_out, dtype=acc, device=w.device)
    )
    rounded = rounds_to_tf32(w.device, dtype, precision)
    if bn is None:
        return Folded(pack_weight(_cast(w, dtype, rounded)), b.float())
    gamma, beta, mean, var = bn_tensors(bn)
    scale = torch.rsqrt(var.detach().to(acc) + bn.eps)
    if gamma is not None:
        scale = scale * gamma.detach().to(acc)
    shift = (b - mean.detach().to(acc)) * scale
    if beta is not None:
        shift = shift + beta.detach().to(acc)
    w_folded = w.to(acc) * scale.view(-1, 1, 1, 1)
    return Folded(pack_weight(_cast(w_folded, dtype, rounded)), shift.float())


def _cast(w: torch.Tensor, dtype: torch.dtype, tf32: bool) -> torch.Tensor:
    w = w.to(dtype)
    return round_tf32(w) if tf32 else w


def _stamp(t: torch.Tensor | None):
    if t is None:
        return None
    # Inference tensors have no version counter (reading it raises): identity and data pointer only.
    version = None if t.is_inference() else t._version
    return (version, t.data_ptr(), t.dtype, t.device, tuple(t.shape))


_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr
_STORAGE = torch.Tensor.untyped_storage


class TensorStamps:
    """The state a launch plan checks of the tensors its folds read on every forward (DESIGN.md, The hot
    path): each tensor's version (none for inference tensors) and data pointer, as lists that the plan
    compares again with C-level loops (``modules._FoldState.holds``). Identity is the caller's to check
    (it fetches the tensors from their modules again).

    The stamps hold a reference to each tensor's storage as it was, so that memory cannot be freed and
    handed to another tensor while the stamps live: an equal data pointer then means the same storage.
    A ``param.data = other`` that moves a tensor to new memory (another dtype, shape or device included)
    therefore changes its pointer, even if the allocator would have reused the old address; dtype,
    shape and device are not read on each forward. Not seen, as with every version counter: writes
    through ``param.data`` in place, and ``param.data = view`` of the same memory (``fastres.refold``)."""

    __slots__ = ("tensors", "versioned", "versions", "pointers", "storages")

    def __init__(self, tensors) -> None:
        self.tensors = tuple(t for t in tensors if t is not None)
        self.versioned = tuple(t for t in self.tensors if not t.is_inference())
        self.storages = tuple(map(_STORAGE, self.tensors))  # kept alive: see the class docstring
        self.versions = list(map(_VERSION, self.versioned))
        self.pointers = list(map(_DATA_PTR, self.tensors))


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
        stamps = tuple(_stamp(t) for t in tensors)
        # The fp32 precision decides whether the fold rounds weights to tf32: part of the key.
        extra = (extra, fp32_precision())
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


def conv_bn_sources(conv: nn.Conv2d, bn: nn.Module | None) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every tensor a conv(+BN) fold's cache key holds: the conv's weight and bias,
    the BN's γ, β and running statistics, and its ``num_batches_tracked`` where it has one. The fold does
    not read that counter, but it is how a training-mode forward shows: the batch_norm kernel updates the
    running statistics in place without bumping their version counters (torch 2.11-2.14, under
    gradients, no_grad and inference_mode alike), while BatchNorm's forward adds 1 to the counter in
    place, which bumps its version. Without it, eval after training steps would reuse the folds of the
    old statistics (a BN without the counter: the fused modules refold when they run in training mode)."""
    out = [(conv, "weight"), (conv, "bias")]
    if bn is not None:
        out += [(bn, "weight"), (bn, "bias"), (bn, "running_mean"), (bn, "running_var")]
        if bn._buffers.get("num_batches_tracked") is not None:
            out.append((bn, "num_batches_tracked"))
    return out


def conv_bn_tensors(conv: nn.Conv2d, bn: nn.Module | None) -> tuple:
    """The tensors of ``conv_bn_sources``, for the cache key."""
    return tuple(getattr(module, name) for module, name in conv_bn_sources(conv, bn))
