"""The activations a fused conv applies in its epilogue: what each supported module computes, as
``Act(name, a, b)`` (the kernels' ``ACT`` code name and its two fp32 arguments), and the eager function
that computes the same on a tensor (the CPU path, export decompositions).

Supported, with any ``inplace`` flag: ReLU, ReLU6 and Hardtanh (any min_val <= max_val), LeakyReLU (any
slope), SiLU, GELU (approximate "none" or "tanh"), Hardswish, Hardsigmoid, Sigmoid, Mish, Identity.
Anything else, or one of these with an argument it cannot take, gives None and ``unsupported_reason``
says why: the layer's activation then stays the eager module.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Act(NamedTuple):
    name: str  # a key of fastres.kernels._act.ACT_CODES
    a: float = 0.0  # hardtanh min_val, leaky_relu negative_slope
    b: float = 0.0  # hardtanh max_val

    def __str__(self) -> str:
        if self.name == "hardtanh":
            return "relu6" if (self.a, self.b) == (0.0, 6.0) else f"hardtanh({self.a:g}, {self.b:g})"
        if self.name == "leaky_relu":
            return f"leaky_relu({self.a:g})"
        return self.name


IDENTITY = Act("identity")
RELU = Act("relu")
# Classes whose forward is exactly one of the kernel's activations (exact types: a subclass may override
# forward). Parametrised ones are read in from_module.
_PLAIN = {
    nn.ReLU: "relu",
    nn.SiLU: "silu",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Sigmoid: "sigmoid",
    nn.Mish: "mish",
    nn.Identity: "identity",
}
SUPPORTED_TYPES = tuple(_PLAIN) + (nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.GELU)


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _from(m: nn.Module) -> tuple[Act | None, str]:
    # fastres.modules' pass-throughs (FoldedReLU, …) name the class they stand for in _act_base.
    cls = getattr(type(m), "_act_base", None) or type(m)
    if cls in _PLAIN:
        return Act(_PLAIN[cls]), ""
    if cls in (nn.Hardtanh, nn.ReLU6):
        lo, hi = _number(getattr(m, "min_val", None)), _number(getattr(m, "max_val", None))
        if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
            return None, f"{cls.__name__} bounds {m.min_val!r}, {m.max_val!r} are not numbers"
        if not lo <= hi:
            return None, f"{cls.__name__} min_val {lo} > max_val {hi}"
        return Act("hardtanh", lo, hi), ""
    if cls is nn.LeakyReLU:
        slope = _number(getattr(m, "negative_slope", None))
        if slope is None or math.isnan(slope):
            return None, f"LeakyReLU negative_slope {m.negative_slope!r} is not a number"
        return Act("leaky_relu", slope), ""
    if cls is nn.GELU:
        approximate = getattr(m, "approximate", None)
        if approximate == "none":
            return Act("gelu"), ""
        if approximate == "tanh":
            return Act("gelu_tanh"), ""
        return None, f"GELU approximate={approximate!r} (only 'none' and 'tanh' are fused)"
    return None, f"{cls.__name__} is not a supported activation"


def from_module(m: nn.Module | None) -> Act | None:
    """The Act ``m`` computes, or None if the fused epilogue cannot compute it (``unsupported_reason``)."""
    if m is None:
        return IDENTITY
    return _from(m)[0]


def unsupported_reason(m: nn.Module) -> str | None:
    """Why ``m`` cannot be fused as an activation, or None if it can."""
    return _from(m)[1] or None


def key(m: nn.Module | None) -> tuple:
    """What ``from_module`` reads from ``m``, cheaply: a launch plan keeps it and compares it per forward
    (an activation's bounds or slope edited after a plan was made must not run the old ones)."""
    d = m.__dict__ if m is not None else {}
    return (type(m), d.get("min_val"), d.get("max_val"), d.get("negative_slope"), d.get("approximate"))


def apply(y: torch.Tensor, act: str, a: float = 0.0, b: float = 0.0) -> torch.Tensor:
    """act(y) computed by PyTorch's own functions: what the eager module computes."""
    if act == "identity":
        return y
    if act == "relu":
        return torch.relu(y)
    if act == "hardtanh":
        return F.hardtanh(y, a, b)
    if act == "leaky_relu":
        return F.leaky_relu(y, a)
    if act == "silu":
        return F.silu(y)
    if act == "gelu":
        return F.gelu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if act == "hardswish":
        return F.hardswish(y)
    if act == "hardsigmoid":
        return F.hardsigmoid(y)
    if act == "sigmoid":
        return torch.sigmoid(y)
    if act == "mish":
        return F.mish(y)
    raise ValueError(f"unknown activation {act!r}")


# oneDNN's fused post-op (torch.ops.mkldnn._convolution_pointwise's unary attr, scalars, algorithm) for
# each activation it computes as eager does; Mish has none (oneDNN: "Fusion behavior undefined").
ONEDNN = {
    "identity": ("none", (), ""),
    "relu": ("relu", (), ""),
    "hardtanh": ("hardtanh", ("a", "b"), ""),
    "leaky_relu": ("leaky_relu", ("a",), ""),
    "silu": ("swish", (), ""),
    "gelu": ("gelu", (), "none"),
    "gelu_tanh": ("gelu", (), "tanh"),
    "hardswish": ("hardswish", (), ""),
    "hardsigmoid": ("hardsigmoid", (), ""),
    "sigmoid": ("sigmoid", (), ""),
}


def onednn(act: str, a: float, b: float) -> tuple[str, list[float], str] | None:
    """(attr, scalars, algorithm) for oneDNN's fused conv, or None when it has no exact post-op."""
    entry = ONEDNN.get(act)
    if entry is None:
        return None
    attr, names, algorithm = entry
    values = {"a": a, "b": b}
    return attr, [values[n] for n in names], algorithm


# Functional forms the torch.fx pass recognises after a BN (reported: the call stays in the model's code).
FUNCTIONAL = {
    F.relu, torch.relu, F.relu6, F.hardtanh, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.hardsigmoid,
    torch.sigmoid, F.sigmoid, F.mish, torch.relu_, F.relu_,
}
FUNCTIONAL_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_"}
