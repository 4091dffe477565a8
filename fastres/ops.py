"""PyTorch-facing ops: ``torch.ops.fastres.*``, their fake (meta) implementations and the CPU path.

Where each op runs (DESIGN.md, "Where kernels run"):
- CUDA tensors: the compiled Triton kernel;
- CPU tensors with TRITON_INTERPRET=1 set before import: the same kernel through Triton's interpreter;
- other tensors (CPU without the interpreter): the CPU path, ``fastres.cpu`` (oneDNN fused convs).

On a CUDA build the ops are ``torch.library.triton_op`` so that torch.compile can see into
them. Under the interpreter they are opaque ``custom_op``s: the interpreter cannot run on the
fake tensors that tracing through a triton_op would hand it.
"""

from __future__ import annotations

import torch
from torch.library import custom_op, triton_op

from fastres import cpu as _cpu
from fastres.kernels import conv as _conv
from fastres.kernels import pool as _pool
from fastres.kernels import tuning as _tuning
from fastres.kernels._common import INTERPRET

_define = custom_op if INTERPRET else triton_op


def _conv_out_shape(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> tuple[int, ...]:
    h, w = x.shape[-2:]
    r, s = weight.shape[-2:]
    return (
        x.shape[0],
        weight.shape[0],
        _conv.conv_output_size(h, r, stride[0], padding[0], dilation[0]),
        _conv.conv_output_size(w, s, stride[1], padding[1], dilation[1]),
    )


# The CPU path (fastres/cpu.py): CPU tensors when the interpreter is off. Inside the op bodies (not
# register_kernel) so that tracing through a triton_op on the CPU sees it too. Outputs are
# channels_last, like the kernels' (the fake implementations promise that layout).
def _torch_path(x: torch.Tensor) -> bool:
    return x.device.type != "cuda" and not INTERPRET


@_define("fastres::conv_bias_act", mutates_args=())
def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    act_a: float,
    act_b: float,
) -> torch.Tensor:
    """act(conv2d(x, weight, stride, padding, dilation, groups) + bias (+ residual)).

    act: a name of ``fastres.kernels._act.ACT_CODES`` ("relu", "identity", "silu", …); act_a / act_b its
    arguments (hardtanh min / max, leaky_relu slope; 0.0 otherwise).
    """
    if _torch_path(x):
        return _cpu.conv_bias_act(
            x, weight, bias, residual, stride, padding, dilation, groups, act, act_a, act_b
        )
    return _tuning.conv_bias_act(
        x,
        weight,
        bias,
        residual=residual,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        act=act,
        act_a=act_a,
        act_b=act_b,
    )


@conv_bias_act.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, act, act_a, act_b):
    return x.new_empty(_conv_out_shape(x, weight, stride, padding, dilation)).to(
        memory_format=torch.channels_last
    )


@_define("fastres::conv_shortcut_bias_act", mutates_args=())
def conv_shortcut_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    shortcut_x: torch.Tensor,
    shortcut_weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    shortcut_stride: list[int],
    act: str,
    act_a: float,
    act_b: float,
) -> torch.Tensor:
    """act(conv2d(x, weight, ...) + conv2d(shortcut_x, shortcut_weight (1×1), shortcut_stride) + bias).

    A bottleneck's tail with its projection shortcut in one kernel (``bias`` holds both folded biases).
    """
    if _torch_path(x):
        return _cpu.conv_shortcut_bias_act(
            x, weight, bias, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
            shortcut_stride, act, act_a, act_b,
        )
    return _tuning.conv_bias_act(
        x,
        weight,
        bias,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        act=act,
        act_a=act_a,
        act_b=act_b,
        shortcut_x=shortcut_x,
        shortcut_weight=shortcut_weight,
        shortcut_stride=shortcut_stride,
    )


@conv_shortcut_bias_act.register_fake
def _(
    x, weight, bias, shortcut_x, shortcut_weight, stride, padding, dilation, groups, shortcut_stride,
    act, act_a, act_b,
):
    return x.new_empty(_conv_out_shape(x, weight, stride, padding, dilation)).to(
        memory_format=torch.channels_last
    )


@_define("fastres::max_pool2d", mutates_args=())
def max_pool2d(
    x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int]
) -> torch.Tensor:
    """torch.nn.functional.max_pool2d with dilation 1 and floor mode."""
    if _torch_path(x):
        return _cpu.max_pool2d(x, kernel_size, stride, padding)
    return _pool.max_pool2d(x, kernel_size, stride, padding)


@max_pool2d.register_fake
def _(x, kernel_size, stride, padding):
    shape = (
        x.shape[0],
        x.shape[1],
        _conv.conv_output_size(x.shape[2], kernel_size[0], stride[0], padding[0], 1),
        _conv.conv_output_size(x.shape[3], kernel_size[1], stride[1], padding[1], 1),
    )
    return x.new_empty(shape).to(memory_format=torch.channels_last)


@_define("fastres::global_avg_pool", mutates_args=())
def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over H, W keeping them as 1×1: (N, C, H, W) → (N, C, 1, 1)."""
    if _torch_path(x):
        return _cpu.global_avg_pool(x)
    return _pool.global_avg_pool(x)


@global_avg_pool.register_fake
def _(x):
    return x.new_empty((x.shape[0], x.shape[1], 1, 1)).to(memory_format=torch.channels_last)
