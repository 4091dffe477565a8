"""The CPU path: what the ``fastres::`` ops compute on CPU tensors when Triton's interpreter is off.

Folded weights reach the ops in the Triton kernel's layout (C_out stride 1). Handed to ``F.conv2d``
as they are, oneDNN reorders them on every call (ResNet-50, batch 1, 224²: 42 of 115 ms were those
copies, benchmarks/NOTES.md). So each op repacks a folded weight once, into the CPU conv's layout
(``fold.pack_weight_cpu``), and keeps the pack beside that weight:

* fp32 with oneDNN (``torch.backends.mkldnn``): the weight in oneDNN's blocked format for this conv
  and input shape, and one ``torch.ops.mkldnn._convolution_pointwise`` call per conv that adds the
  bias, the residual (its ``binary`` variant) and applies the activation where oneDNN has it as a
  post-op that computes what eager computes (``activations.onednn``; with a residual only ReLU, the
  post-op Inductor's freezing fuses after an add: other activations and Mish run eagerly after the
  conv): what Inductor's CPU freezing emits, without its compile. The projection shortcut of a
  bottleneck tail runs first; the main conv
  then accumulates into its output with the add and ReLU fused (the in-place ``binary`` variant).
* other dtypes, or no oneDNN: ``F.conv2d`` with a dense channels_last copy of the weight, add, the
  activation (``activations.apply``: PyTorch's own function).
* while tracing (torch.compile, torch.export, any dispatch mode, fake tensors): plain aten ops on the
  weight as given, so the graph holds no opaque oneDNN tensors and the compiler packs it itself.

The pack cache is keyed on the folded weight *object* (weakly: a pack dies with its weight) and its
exact state (``_version``, data pointer, dtype, shape, strides), the conv's arguments and, for oneDNN,
the input shape. ``FoldCache`` makes new folded tensors whenever anything it read changes, so a pack
is never stale; an in-place edit of a weight handed to the op directly bumps its version and repacks.
Inference tensors have no version counter: they are packed on every call, never cached.

Outputs are channels_last, as the fake implementations promise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from fastres import activations
from fastres.fold import pack_weight_cpu

_CL = torch.channels_last

_MKL = torch.ops.mkldnn
# The oneDNN ops Inductor's CPU freezing uses (torch >= 2.1); absent from builds without oneDNN.
HAS_MKLDNN_OPS = (
    torch.backends.mkldnn.is_available()
    and hasattr(_MKL, "_convolution_pointwise")
    and hasattr(_MKL, "_convolution_pointwise_")
    and hasattr(_MKL, "_reorder_convolution_weight")
)
_broken: list[BaseException] = []  # a oneDNN call that raised (an unexpected build): plain path from then on

# Packs kept per folded weight, one per input shape, most recent first. A pack is input-shape specific
# (module docstring of fold.pack_weight_cpu); 4 covers a serving batch plus a smaller last batch, and
# bounds the memory at 4 packed copies of the weights.
PACKS_PER_WEIGHT = 4
_packs: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _tracing(x: torch.Tensor) -> bool:
    return (
        type(x) is not torch.Tensor
        or torch._C._len_torch_dispatch_stack() > 0
        or torch.compiler.is_compiling()
    )


def use_mkldnn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this conv runs as one oneDNN fused call: fp32, oneDNN built in and enabled, not tracing.
    bf16/fp16 stay on ``F.conv2d``: oneDNN's low-precision convs need AVX-512 or AMX, which the
    machines this was measured on lack (so that path is untested)."""
    return (
        HAS_MKLDNN_OPS
        and not _broken
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
    )


def packed_weight(weight, stride, padding, dilation, groups, input_size) -> torch.Tensor:
    """``fold.pack_weight_cpu(weight, ...)``, cached beside ``weight`` (module docstring)."""
    if weight.is_inference():
        return pack_weight_cpu(weight, stride, padding, dilation, groups, input_size)
    key = (
        weight._version,
        weight.data_ptr(),
        weight.dtype,
        weight.shape,
        weight.stride(),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        groups,
        None if input_size is None else tuple(input_size),
    )
    entries = _packs.get(weight)
    if entries is None:
        entries = _packs[weight] = []
    for i, (k, packed) in enumerate(entries):
        if k == key:
            if i:
                entries.insert(0, entries.pop(i))
            return packed
    # Pack outside inference mode (the result may serve any later mode) and without autograd.
    with torch.inference_mode(False), torch.no_grad():
        packed = pack_weight_cpu(weight, stride, padding, dilation, groups, input_size)
    # A pack for an older state of this weight is dead: drop it with the shape overflow.
    entries[:] = [(key, packed)] + [e for e in entries if e[0][:5] == key[:5]][: PACKS_PER_WEIGHT - 1]
    return packed


def _plain(x, weight, bias, residual, stride, padding, dilation, groups, act, cache: bool):
    w = packed_weight(weight, stride, padding, dilation, groups, None) if cache else weight.contiguous(
        memory_format=_CL
    )
    b = None if bias is None else bias.to(x.dtype)
    y = F.conv2d(x.contiguous(memory_format=_CL), w, b, stride, padding, dilation, groups)
    if residual is not None:
        y = y.add_(residual)  # in the conv's dtype whatever the residual's, as eager's `out += identity`
    y = activations.apply(y, *act)
    return y.contiguous(memory_format=_CL)


_NONE = ("identity", 0.0, 0.0)


def _fall_back(err: BaseException) -> None:
    import warnings

    _broken.append(err)
    warnings.warn(
        f"fastres: oneDNN's fused conv failed ({type(err).__name__}: {err}); the CPU path uses "
        "F.conv2d from now on",
        stacklevel=3,
    )


def conv_bias_act(
    x, weight, bias, residual, stride, padding, dilation, groups, act="relu", act_a=0.0, act_b=0.0
) -> torch.Tensor:
    """act(conv2d(x, weight) + bias (+ residual)) on the CPU: ``fastres::conv_bias_act``'s CPU body."""
    act = (act, float(act_a), float(act_b))
    if _tracing(x):
        return _plain(x, weight, bias, residual, stride, padding, dilation, groups, act, cache=False)
    if use_mkldnn(x, weight):
        try:  # the same oneDNN call a launch plan binds (None: a residual of another shape)
            run = _prepare_mkldnn(x, weight, bias, residual, stride, padding, dilation, groups, act)
            if run is not None:
                return run(x, residual, None)
        except (RuntimeError, NotImplementedError) as err:
            _fall_back(err)
    return _plain(x, weight, bias, residual, stride, padding, dilation, groups, act, cache=True)


def conv_shortcut_bias_act(
    x, weight, bias, shortcut_x, shortcut_weight, stride, padding, dilation, groups, shortcut_stride,
    act="relu", act_a=0.0, act_b=0.0,
) -> torch.Tensor:
    """``fastres::conv_shortcut_bias_act``'s CPU body: the 1×1 projection shortcut first, then the main
    conv adding bias and shortcut and applying the activation (in place over the shortcut's output on
    oneDNN)."""
    act = (act, float(act_a), float(act_b))
    one, zero = [1, 1], [0, 0]
    if _tracing(x):
        s = F.conv2d(
            shortcut_x.contiguous(memory_format=_CL), shortcut_weight.contiguous(memory_format=_CL), None,
            shortcut_stride,
        )
        return _plain(x, weight, bias, s, stride, padding, dilation, groups, act, cache=False)
    if use_mkldnn(x, weight) and use_mkldnn(shortcut_x, shortcut_weight):
        try:  # the same two oneDNN calls a launch plan binds (None: shapes that do not add up)
            run = _prepare_mkldnn_shortcut(
                x, weight, bias, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
                shortcut_stride, act,
            )
            if run is not None:
                return run(x, None, shortcut_x)
        except (RuntimeError, NotImplementedError) as err:
            _fall_back(err)
    s = _plain(shortcut_x, shortcut_weight, None, None, shortcut_stride, zero, one, 1, _NONE, cache=True)
    return _plain(x, weight, bias, s, stride, padding, dilation, groups, act, cache=True)


def _out_shape(x, weight, stride, padding, dilation) -> torch.Size:
    h, w = x.shape[-2:]
    r, s = weight.shape[-2:]
    return torch.Size((
        x.shape[0],
        weight.shape[0],
        (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1,
        (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1,
    ))


def max_pool2d(x, kernel_size, stride, padding) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size, stride, padding).contiguous(memory_format=_CL)


def global_avg_pool(x) -> torch.Tensor:
    return x.mean(dim=(2, 3), keepdim=True).contiguous(memory_format=_CL)


# --------------------------------------------------------------------------------------------
# Launch plans on the CPU (DESIGN.md, The hot path): a fused module's plan calls these directly, with
# the pack made once for the plan's input shape, instead of the ``fastres::`` op (dispatch, pack lookup
# and checks on every call). The plan holds while its input signature and every tensor its folds read
# are unchanged (fastres/modules.py ``_Plan``), so the pack it holds is never stale.


class CpuConvLaunch:
    """One conv of a CPU launch plan, prepared for one input signature: called like the kernels'
    ``ConvLaunch`` (``launch(x, residual=None, shortcut_x=None)``), it returns exactly what
    ``conv_bias_act`` / ``conv_shortcut_bias_act`` return for the same tensors."""

    __slots__ = ("run", "body", "out_shape", "dtype", "into_residual")

    def __init__(self, run, body, out_shape, dtype, into_residual=None) -> None:
        self.run = run  # the prepared call(s)
        self.body = body  # the op body on the same tensors: what runs if oneDNN fails (as the ops do)
        self.out_shape = out_shape
        self.dtype = dtype
        # into_residual(x, residual): the same result written over ``residual`` (oneDNN's in-place sum),
        # for a caller that owns the residual (fastres.modules.FusedStage); None where it cannot be.
        self.into_residual = into_residual

    def __call__(self, x, residual=None, shortcut_x=None, out=None):
        try:
            return self.run(x, residual, shortcut_x)
        except (RuntimeError, NotImplementedError) as err:
            if self.run is self.body:
                raise
            _fall_back(err)
            self.run = self.body
            return self.body(x, residual, shortcut_x)


def prepare_conv(
    x, weight, bias, *, residual=None, stride, padding, dilation, groups, act="relu", act_a=0.0, act_b=0.0,
    shortcut_x=None, shortcut_weight=None, shortcut_stride=None,
) -> tuple[CpuConvLaunch, torch.Tensor]:
    """(launch, an output-shaped prototype) for the CPU op body on tensors like these (``x``, and the
    residual or shortcut input the launch will get): the oneDNN fused call with its weight packed now for
    ``x``'s shape, where the op body would make that call; otherwise the op body itself, called directly."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    actt = (act, float(act_a), float(act_b))
    out_shape = _out_shape(x, weight, stride, padding, dilation)
    proto = torch.empty(out_shape, dtype=x.dtype, memory_format=_CL)
    if shortcut_weight is not None:
        shortcut_stride = list(shortcut_stride)

        def body(x, residual, shortcut_x):
            return conv_shortcut_bias_act(
                x, weight, bias, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
                shortcut_stride, *actt,
            )

    else:

        def body(x, residual, shortcut_x):
            return conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, *actt)

    run = into = body
    if use_mkldnn(x, weight):
        try:
            if shortcut_weight is None:
                run = _prepare_mkldnn(x, weight, bias, residual, stride, padding, dilation, groups, actt)
                conv_args = (stride, padding, dilation, groups, actt)
                into = _prepare_into_residual(x, weight, bias, residual, *conv_args)
            elif use_mkldnn(shortcut_x, shortcut_weight):
                run = _prepare_mkldnn_shortcut(
                    x, weight, bias, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
                    shortcut_stride, actt,
                )
        except (RuntimeError, NotImplementedError) as err:
            _fall_back(err)
    into = into if into is not body else None
    return CpuConvLaunch(run or body, body, out_shape, x.dtype, into), proto


def _prepare_into_residual(x, weight, bias, residual, stride, padding, dilation, groups, actt):
    """act(conv(x) + bias + residual) written over ``residual`` by oneDNN's in-place sum (what Inductor's
    CPU freezing emits for a residual add whose input buffer it owns): no new output, whose fresh pages
    the OS would fault in and zero on every forward at large batch. Only for an fp32 channels_last
    residual of the output's shape; None otherwise."""
    if (
        residual is None
        or residual.dtype != torch.float32
        or residual.shape != _out_shape(x, weight, stride, padding, dilation)
        or not residual.is_contiguous(memory_format=_CL)
    ):
        return None
    return _accumulate(x, weight, bias, stride, padding, dilation, groups, actt)


def _accumulate(x, weight, bias, stride, padding, dilation, groups, actt):
    """``into(x, residual)``: the in-place sum over ``residual`` (a tensor the caller owns), bound to the
    weight's pack for ``x``'s shape."""
    w = packed_weight(weight, stride, padding, dilation, groups, x.shape)
    unary = "relu" if actt[0] == "relu" else None
    accumulate = _MKL._convolution_pointwise_.binary

    def into(x, residual):
        x = x.contiguous(memory_format=_CL)
        y = accumulate(residual, x, w, bias, padding, stride, dilation, groups, "add", 1.0, unary, [], "")
        return y if unary is not None else activations.apply(y, *actt)

    return into


def _prepare_mkldnn(x, weight, bias, residual, stride, padding, dilation, groups, actt):
    """One oneDNN call, bound to the weight's pack for ``x``'s shape: conv + bias (+ residual) (+ the
    activation where oneDNN fuses it exactly; else PyTorch's function after it); ``actt``: (name, a, b).
    None for a residual of another shape. The op body runs it at once, a launch plan keeps it."""
    if residual is not None and residual.shape != _out_shape(x, weight, stride, padding, dilation):
        return None
    w = packed_weight(weight, stride, padding, dilation, groups, x.shape)
    conv = _MKL._convolution_pointwise
    post = activations.onednn(*actt)
    if residual is None and post is not None:
        attr, scalars, algorithm = post

        def run(x, residual, shortcut_x):
            x = x.contiguous(memory_format=_CL)
            return conv(x, w, bias, padding, stride, dilation, groups, attr, scalars, algorithm)

    elif residual is None:

        def run(x, residual, shortcut_x):
            x = x.contiguous(memory_format=_CL)
            y = conv(x, w, bias, padding, stride, dilation, groups, "none", [], "")
            return activations.apply(y, *actt)

    else:
        unary = "relu" if actt[0] == "relu" else None
        binary = conv.binary

        def run(x, residual, shortcut_x):
            x = x.contiguous(memory_format=_CL)
            other = residual.to(x.dtype).contiguous(memory_format=_CL)
            y = binary(x, other, w, bias, padding, stride, dilation, groups, "add", None, unary, [], "")
            return y if unary is not None else activations.apply(y, *actt)

    return run


def _prepare_mkldnn_shortcut(
    x, weight, bias, shortcut_x, shortcut_weight, stride, padding, dilation, groups, shortcut_stride, actt
):
    """``conv_shortcut_bias_act``'s two oneDNN calls bound to their packs (None where it would not)."""
    one, zero = [1, 1], [0, 0]
    out_shape = _out_shape(x, weight, stride, padding, dilation)
    if _out_shape(shortcut_x, shortcut_weight, shortcut_stride, zero, one) != out_shape:
        return None
    shortcut = _prepare_mkldnn(shortcut_x, shortcut_weight, None, None, shortcut_stride, zero, one, 1, _NONE)
    into = _accumulate(x, weight, bias, stride, padding, dilation, groups, actt)

    def run(x, residual, shortcut_x):
        return into(x, shortcut(shortcut_x, None, None))  # the main conv summed over the shortcut's output

    return run


def prepare_max_pool2d(y, kernel_size, stride, padding):
    """(launch, output prototype) of ``max_pool2d`` for a CPU launch plan."""
    kernel_size, stride, padding = list(kernel_size), list(stride), list(padding)
    out = F.max_pool2d(torch.empty(y.shape, dtype=y.dtype, device="meta"), kernel_size, stride, padding)
    return (lambda y: max_pool2d(y, kernel_size, stride, padding)), torch.empty(
        out.shape, dtype=y.dtype, memory_format=_CL
    )


def prepare_global_avg_pool(x):
    """(launch, output prototype) of ``global_avg_pool`` for a CPU launch plan."""
    return global_avg_pool, torch.empty((x.shape[0], x.shape[1], 1, 1), dtype=x.dtype, memory_format=_CL)
