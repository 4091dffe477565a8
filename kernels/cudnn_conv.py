"""The ``cudnn`` tactic, the safety net: cuDNN's own conv with the folded bias, residual and activation.

Two branches, chosen per call by ``branch``:

- **cuDNN fused** (CUDA): ``torch.cudnn_convolution_relu(x, w, b, ...)`` = relu(conv(x, w) + b), and
  ``torch.cudnn_convolution_add_relu(x, w, z, alpha=1, b, ...)`` = relu(conv(x, w) + z + b), one cuDNN
  call each. ``z`` is the block's residual, or the projection shortcut's conv output (the dual GEMM as
  two convs: cuDNN adds the second in the first one's epilogue). Taken when the activation is ReLU and
  everything cuDNN's fused op computes is what the other tactics compute: not for an fp32 output that
  must be rounded to tf32 for the next layer's tf32 dot (DESIGN.md, Numerics), nor for a residual in
  another dtype than x (cuDNN's fused op takes z, bias, x and y in one dtype), nor for a residual plus a
  shortcut (two addends).
- **conv2d + epilogue** (everywhere else, and the CPU in the interpreter): ``F.conv2d`` without bias
  (cuDNN on a GPU), then ``kernels/epilogue.py``'s Triton pass: + bias + shortcut conv output + residual,
  ``_act``'s activation and tf32 rounding, cast, one store, in place on the conv output when the caller
  gave no ``out`` (the conv output is ours and already channels_last).

Weights: cuDNN takes OIHW, in channels_last memory (O, H, W, I) for NHWC inputs, not the packed layout
(R, S, C_in, C_out) of the Triton tactics. ``cudnn_weight`` derives it from the packed one (one copy); the
launcher derives it on each call unless it is given it already (then ``cudnn_weight`` is a no-op), so a
caller with a fold cache keeps the derived weight there, per tactic, beside the packed one: the cache must
key the weight by tactic. ``cudnn_bias`` likewise: the fused ops take the bias in x's dtype (the fp32
folded bias rounded once), passed as ``fused_bias``.

Numerics: F.conv2d rounds the conv to x's dtype before the epilogue adds the bias (one rounding more than
the gather kernel's fp32 epilogue, within the fp16/bf16 bounds); fp32 convs run cuDNN's tf32 path only when
``precision="tf32"`` (the launcher sets ``torch.backends.cudnn.allow_tf32`` for the call and restores it).

    >>> y = conv_bias_act(x, cudnn_weight(w), b, residual=identity, padding=1)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ._act import act_code
from ._common import INTERPRET, SUPPORTED_DTYPES, check_tensor
from .conv import TF32_ROUND_DEVICE_TYPES, _default_precision, _pair, conv_output_size
from .epilogue import bias_act_epilogue

# Device types where the cuDNN fused ops run (tests add "cpu" to record the call with an emulation).
FUSED_DEVICE_TYPES = ("cuda",)
# The cuDNN fused ops apply ReLU and nothing else.
FUSED_ACTS = ("relu",)
RELU_ONLY = "cudnn_convolution_relu"
ADD_RELU = "cudnn_convolution_add_relu"
UNFUSED = "conv2d+epilogue"


def cudnn_weight(weight: torch.Tensor) -> torch.Tensor:
    """The cuDNN weight (C_out, C_in/groups, R, S) in channels_last memory, from the packed one (or any
    layout); the tensor itself when it is already in that layout. For the caller's fold cache, per tactic.

    >>> cudnn_weight(pack_weight(w)).is_contiguous(memory_format=torch.channels_last)   # doctest: +SKIP
    True
    """
    return weight.contiguous(memory_format=torch.channels_last)


def cudnn_bias(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The folded fp32 bias as the fused ops take it: in x's dtype (``fused_bias``). For the fold cache."""
    return bias.to(dtype)


def _device_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        if not torch.backends.cudnn.is_available():
            return "cudnn: cuDNN is not available in this PyTorch build"
        if not torch.backends.cudnn.enabled:
            return "cudnn: torch.backends.cudnn.enabled is False"
        return None
    if device.type == "cpu" and INTERPRET:
        return None  # F.conv2d + the epilogue in the interpreter
    return f"cudnn: x is on {device}, needs CUDA with cuDNN (or the CPU under the interpreter)"


def applicable(
    x: torch.Tensor, w: torch.Tensor, stride=1, padding=0, dilation=1, groups: int = 1
) -> str | None:
    """None if ``conv_bias_act`` can run this conv, else the reason it cannot.

    >>> applicable(x.double(), w.double())                                     # doctest: +SKIP
    'cudnn: dtype torch.float64, needs one of float32, float16, bfloat16'
    """
    if x.dim() != 4 or w.dim() != 4:
        return f"cudnn: needs 4-D x and weight, got {tuple(x.shape)} and {tuple(w.shape)}"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"cudnn: dtype {x.dtype}, needs one of float32, float16, bfloat16"
    if w.dtype != x.dtype:
        return f"cudnn: weight dtype {w.dtype} != x dtype {x.dtype}"
    if w.device != x.device:
        return f"cudnn: weight on {w.device}, x on {x.device}"
    why = _device_reason(x.device)
    if why:
        return why
    c_in, c_out = x.shape[1], w.shape[0]
    if groups < 1 or c_in % groups or c_out % groups or w.shape[1] * groups != c_in:
        return f"cudnn: groups={groups} with C_in={c_in}, C_out={c_out}, weight {tuple(w.shape)}"
    return None


def branch(
    x: torch.Tensor,
    *,
    act: str,
    residual: torch.Tensor | None,
    shortcut: bool,
    precision: str,
) -> str:
    """Which branch runs: ``RELU_ONLY``, ``ADD_RELU`` (cuDNN's fused ops) or ``UNFUSED``."""
    if x.device.type not in FUSED_DEVICE_TYPES or act not in FUSED_ACTS:
        return UNFUSED
    if _rounds_tf32(x, precision):
        return UNFUSED  # the fused op cannot round its fp32 output to tf32
    if residual is not None and (shortcut or residual.dtype != x.dtype):
        return UNFUSED
    return ADD_RELU if residual is not None or shortcut else RELU_ONLY


def _rounds_tf32(x: torch.Tensor, precision: str) -> bool:
    return x.dtype == torch.float32 and precision == "tf32" and x.device.type in TF32_ROUND_DEVICE_TYPES


@contextlib.contextmanager
def _cudnn_tf32(x: torch.Tensor, precision: str):
    """cuDNN's fp32 convs use tf32 exactly when ``precision`` says so, for this call only."""
    if x.device.type != "cuda" or x.dtype != torch.float32:
        yield
        return
    want = precision == "tf32"
    before = torch.backends.cudnn.allow_tf32
    if before == want:
        yield
        return
    torch.backends.cudnn.allow_tf32 = want
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def _check(
    op,
    x,
    weight,
    bias,
    residual,
    shortcut_x,
    shortcut_weight,
    sc_stride,
    out,
    stride,
    padding,
    dilation,
    groups,
):
    """The checks of ``kernels.conv.prepare_conv`` that apply here; returns the output shape."""
    check_tensor(op, "x", x, ndim=4)
    check_tensor(op, "weight", weight, ndim=4, dtype=x.dtype, device=x.device)
    check_tensor(op, "bias", bias, ndim=1, dtype=torch.float32, device=x.device)
    why = applicable(x, weight, stride, padding, dilation, groups)
    if why is not None:
        raise ValueError(f"{op}: {why}")
    batch, _, h, w = x.shape
    c_out, _, r, s = weight.shape
    if bias.shape[0] != c_out:
        raise ValueError(f"{op}: bias has {bias.shape[0]} entries, expected C_out={c_out}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: bad stride={stride} padding={padding} dilation={dilation}")
    p = conv_output_size(h, r, stride[0], padding[0], dilation[0])
    q = conv_output_size(w, s, stride[1], padding[1], dilation[1])
    if p < 1 or q < 1:
        raise ValueError(f"{op}: input {h}x{w} is smaller than the {r}x{s} kernel")
    shape = (batch, c_out, p, q)
    if residual is not None:
        check_tensor(op, "residual", residual, ndim=4, device=x.device)
        if tuple(residual.shape) != shape:
            raise ValueError(f"{op}: residual shape {tuple(residual.shape)} != output shape {shape}")
    if (shortcut_x is None) != (shortcut_weight is None):
        raise ValueError(f"{op}: shortcut_x and shortcut_weight go together")
    if shortcut_x is not None:
        check_tensor(op, "shortcut_x", shortcut_x, ndim=4, dtype=x.dtype, device=x.device)
        check_tensor(op, "shortcut_weight", shortcut_weight, ndim=4, dtype=x.dtype, device=x.device)
        c_in2 = shortcut_x.shape[1]
        if groups != 1 or tuple(shortcut_weight.shape) != (c_out, c_in2, 1, 1):
            raise ValueError(
                f"{op}: the shortcut must be a 1x1 conv {(c_out, c_in2, 1, 1)} with groups=1, "
                f"got weight {tuple(shortcut_weight.shape)}, groups={groups}"
            )
        sc_hw = tuple(
            conv_output_size(d, 1, st, 0, 1) for d, st in zip(shortcut_x.shape[2:], sc_stride, strict=True)
        )
        if shortcut_x.shape[0] != batch or sc_hw != (p, q):
            raise ValueError(
                f"{op}: shortcut_x {tuple(shortcut_x.shape)} with stride {sc_stride} gives {sc_hw}"
            )
    if out is not None:
        if tuple(out.shape) != shape or out.dtype != x.dtype:
            raise ValueError(f"{op}: out must be {shape} {x.dtype}")
        if out.device != x.device:
            raise ValueError(f"{op}: out is on {out.device}, expected {x.device}")
    return shape


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    act: str = "relu",
    act_a: float = 0.0,
    act_b: float = 0.0,
    relu: bool | None = None,
    shortcut_x: torch.Tensor | None = None,
    shortcut_weight: torch.Tensor | None = None,
    shortcut_stride=1,
    precision: str | None = None,
    out: torch.Tensor | None = None,
    fused_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``kernels.conv.conv_bias_act``'s result through cuDNN: act(conv2d(x, weight) + bias (+ residual)
    (+ conv2d(shortcut_x, shortcut_weight, stride=shortcut_stride))).

    weight / shortcut_weight: packed (``fastres.fold``) or already ``cudnn_weight``'s layout (no copy).
    bias: the folded fp32 bias; ``fused_bias``: ``cudnn_bias(bias, x.dtype)`` from the caller's cache, for
    the fused branch (derived per call otherwise). The rest as ``kernels.conv.conv_bias_act``.

    >>> y = conv_bias_act(x, w, b, residual=identity)                # doctest: +SKIP
    """
    op = "cudnn_conv_bias_act"
    stride, padding, dilation = (
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
    )
    sc_stride = _pair(shortcut_stride, "shortcut_stride")
    if relu is not None:
        act = "relu" if relu else "identity"
    code = act_code(act)
    precision = precision or _default_precision()
    if precision not in ("tf32", "ieee"):
        raise ValueError(f"{op}: precision must be 'tf32' or 'ieee', got {precision!r}")
    shape = _check(
        op,
        x,
        weight,
        bias,
        residual,
        shortcut_x,
        shortcut_weight,
        sc_stride,
        out,
        stride,
        padding,
        dilation,
        groups,
    )
    if fused_bias is not None and (fused_bias.dtype != x.dtype or tuple(fused_bias.shape) != (shape[1],)):
        raise ValueError(f"{op}: fused_bias must be ({shape[1]},) {x.dtype} (cudnn_bias)")
    if 0 in shape:
        return out if out is not None else x.new_empty(shape).to(memory_format=torch.channels_last)
    shortcut = shortcut_x is not None
    how = branch(x, act=act, residual=residual, shortcut=shortcut, precision=precision)
    wc = cudnn_weight(weight)
    with _cudnn_tf32(x, precision):
        sc = None
        if shortcut:
            sc = F.conv2d(shortcut_x, cudnn_weight(shortcut_weight), None, sc_stride)
        if how != UNFUSED:
            b = fused_bias if fused_bias is not None else cudnn_bias(bias, x.dtype)
            args = (list(stride), list(padding), list(dilation), groups)
            if how == RELU_ONLY:
                y = torch.cudnn_convolution_relu(x, wc, b, *args)
            else:
                z = residual if residual is not None else sc
                y = torch.cudnn_convolution_add_relu(x, wc, z, 1.0, b, *args)
            if out is None:
                return y
            return out.copy_(y)
        y = F.conv2d(x, wc, None, stride, padding, dilation, groups)
    if out is None:
        # In place on the conv output: ours, and channels_last for channels_last x or weight.
        out = (
            y
            if y.is_contiguous(memory_format=torch.channels_last)
            else torch.empty_like(y, memory_format=torch.channels_last)
        )
    return bias_act_epilogue(
        y,
        bias,
        out,
        residual=residual,
        res2=sc,
        act_code=code,
        act_a=act_a,
        act_b=act_b,
        round_tf32=_rounds_tf32(x, precision),
    )
