"""Pooling over NHWC: the stem's max-pool and the global average pool before the FC layer.

Both are memory-bound: a program owns BLOCK_P output pixels × BLOCK_C channels so that every
load is a run of contiguous channels (channels_last).
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from ._common import (  # launchable is looked up here per launch: count_launches patches it
    INTERPRET,
    BoundLaunch,
    channels_last_strides,
    check_tensor,
    launchable,  # noqa: F401
    next_pow2,
    tl_dtype_ok,
)
from .conv import conv_output_size

# 64 channels × 32 pixels of fp16 is 4 KiB per tap load: enough bytes in flight per program
# for a bandwidth-bound kernel without needing more than 4 warps (not yet measured).
POOL_BLOCK_C = 64
POOL_BLOCK_P = 32
# Global average pool: HW rows per step; ResNet's last stage is 7×7 = 49 at 224².
AVG_BLOCK_HW = 64
# Interpreter: fewer, larger programs (each program instance costs milliseconds there).
INTERPRET_BLOCK = 128
# Batch and spatial sizes only enter masks and index arithmetic: not specialised, so that batch 1, 4
# and 32 share one compile (as in conv.py). The channel count stays specialised (vector width).
MAX_POOL_UNSPECIALISED = ("BATCH", "H", "W", "P", "Q")
AVG_POOL_UNSPECIALISED = ("H", "W")


@triton.jit(do_not_specialize=MAX_POOL_UNSPECIALISED)
def _max_pool2d_fwd_kernel(
    x_ptr,
    out_ptr,
    BATCH,
    C,
    H,
    W,
    P,
    Q,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = offs_p < BATCH * P * Q
    c_mask = offs_c < C
    q = offs_p % Q
    p = (offs_p // Q) % P
    n = (offs_p // Q // P).to(tl.int64)
    c64 = offs_c.to(tl.int64)
    acc = tl.full((BLOCK_P, BLOCK_C), float("-inf"), dtype=tl.float32)
    for kh in range(KH):
        for kw in range(KW):
            ih = p * STRIDE_H - PAD_H + kh
            iw = q * STRIDE_W - PAD_W + kw
            ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ptrs = (
                x_ptr
                + (n * stride_xn + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw)[:, None]
                + (c64 * stride_xc)[None, :]
            )
            v = tl.load(ptrs, mask=ok[:, None] & c_mask[None, :], other=float("-inf"))
            # NaN anywhere in the window gives NaN, as torch.max_pool2d does.
            acc = tl.maximum(acc, v.to(tl.float32), propagate_nan=tl.PropagateNan.ALL)
    o_ptrs = (
        out_ptr
        + (n * stride_on + p.to(tl.int64) * stride_oh + q.to(tl.int64) * stride_ow)[:, None]
        + (c64 * stride_oc)[None, :]
    )
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit(do_not_specialize=AVG_POOL_UNSPECIALISED)
def _global_avg_pool_fwd_kernel(
    x_ptr,
    out_ptr,
    C,
    H,
    W,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_on,
    stride_oc,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    c64 = offs_c.to(tl.int64)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    hw = H * W
    for start in range(0, hw, BLOCK_HW):
        offs = start + tl.arange(0, BLOCK_HW)
        ok = offs < hw
        ih = (offs // W).to(tl.int64)
        iw = (offs % W).to(tl.int64)
        ptrs = x_ptr + n * stride_xn + (ih * stride_xh + iw * stride_xw)[:, None] + (c64 * stride_xc)[None, :]
        v = tl.load(ptrs, mask=ok[:, None] & c_mask[None, :], other=0.0)
        acc += tl.sum(v.to(tl.float32), axis=0)
    mean = acc / hw
    tl.store(out_ptr + n * stride_on + c64 * stride_oc, mean.to(out_ptr.dtype.element_ty), mask=c_mask)


def _blocks(rows: int, cols: int, block_rows: int, block_cols: int) -> tuple[int, int]:
    if INTERPRET:
        block_rows = block_cols = INTERPRET_BLOCK
    return (min(block_rows, max(16, next_pow2(rows))), min(block_cols, max(16, next_pow2(cols))))


class PoolLaunch:
    """A pool launcher prepared once for one input signature (dtype, shape, strides, device, 16-byte
    alignment: the caller guarantees them, as for ``conv.ConvLaunch``); a call takes the input and
    returns the output."""

    __slots__ = ("out_shape", "dtype", "device", "template", "bound", "fill", "out_stride")

    def __init__(self, out_shape, dtype, device, template, bound, fill=None) -> None:
        self.out_shape = out_shape
        self.dtype = dtype
        self.device = device
        self.template = template
        self.bound = bound  # a BoundLaunch, or None when there is nothing to launch
        self.fill = fill  # the value of every output element when nothing is launched (None: untouched)
        self.out_stride = channels_last_strides(out_shape)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = x.new_empty_strided(self.out_shape, self.out_stride)  # x has dtype and device (conv.py)
        if self.bound is None:
            return out if self.fill is None else out.fill_(self.fill)
        args = self.template.copy()
        args[0] = x
        args[1] = out
        bound = self.bound
        fast = bound.fast  # BoundLaunch.__call__, inline (one Python call less per launch)
        if fast is None or not fast(args):
            bound.launch(args)
        return out


_CL = torch.channels_last
_MAX_POOL_CONSTEXPRS = ("KH", "KW", "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W", "BLOCK_P", "BLOCK_C")
_AVG_POOL_CONSTEXPRS = ("BLOCK_HW", "BLOCK_C")


def max_pool2d(
    x: torch.Tensor, kernel_size=3, stride=2, padding=1, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """torch.nn.functional.max_pool2d (dilation 1, floor mode) over any layout; output channels_last.

    >>> y = max_pool2d(x, 3, 2, 1)   # the ResNet stem's pool              # doctest: +SKIP
    """
    launch, out = prepare_max_pool2d(x, kernel_size, stride, padding, out=out)
    return launch(x, out)


def prepare_max_pool2d(
    x: torch.Tensor, kernel_size=3, stride=2, padding=1, *, out: torch.Tensor | None = None
) -> tuple[PoolLaunch, torch.Tensor]:
    """``max_pool2d``'s checks, blocks and arguments for ``x`` as the prototype: the ``PoolLaunch`` and an
    output for this call."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
    check_tensor("max_pool2d", "x", x, ndim=4)
    tl_dtype_ok("max_pool2d", x.dtype)
    if ph * 2 > kh or pw * 2 > kw:
        raise ValueError(f"max_pool2d: padding {(ph, pw)} must be at most half the kernel {(kh, kw)}")
    batch, c, h, w = x.shape
    p, q = conv_output_size(h, kh, sh, ph, 1), conv_output_size(w, kw, sw, pw, 1)
    if p < 1 or q < 1:
        raise ValueError(f"max_pool2d: input {h}x{w} is smaller than the {kh}x{kw} window")
    if out is None:
        out = torch.empty((batch, c, p, q), device=x.device, dtype=x.dtype, memory_format=_CL)
    rows = batch * p * q
    if rows == 0 or c == 0:
        return PoolLaunch((batch, c, p, q), x.dtype, x.device, None, None), out
    bp, bc = _blocks(rows, c, POOL_BLOCK_P, POOL_BLOCK_C)
    grid = (triton.cdiv(rows, bp), triton.cdiv(c, bc))
    runtime = [x, out, batch, c, h, w, p, q, *x.stride(), *out.stride()]
    template = runtime + [kh, kw, sh, sw, ph, pw, bp, bc]
    owner = sys.modules[__name__]
    bound = BoundLaunch(owner, _max_pool2d_fwd_kernel, grid, len(runtime), _MAX_POOL_CONSTEXPRS, {}, x.device)
    return PoolLaunch((batch, c, p, q), x.dtype, x.device, template, bound), out


def global_avg_pool(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over H and W: (N, C, H, W) → (N, C, 1, 1), fp32 accumulation, any input layout.

    >>> feats = global_avg_pool(x).flatten(1)                              # doctest: +SKIP
    """
    launch, out = prepare_global_avg_pool(x, out=out)
    return launch(x, out)


def prepare_global_avg_pool(
    x: torch.Tensor, *, out: torch.Tensor | None = None
) -> tuple[PoolLaunch, torch.Tensor]:
    """``global_avg_pool``'s checks, blocks and arguments for ``x`` as the prototype."""
    check_tensor("global_avg_pool", "x", x, ndim=4)
    tl_dtype_ok("global_avg_pool", x.dtype)
    batch, c, h, w = x.shape
    if out is None:
        out = torch.empty((batch, c, 1, 1), device=x.device, dtype=x.dtype, memory_format=_CL)
    shape = (batch, c, 1, 1)
    if batch == 0 or c == 0:
        return PoolLaunch(shape, x.dtype, x.device, None, None), out
    if h * w == 0:
        return PoolLaunch(shape, x.dtype, x.device, None, None, float("nan")), out  # mean of nothing
    bhw, bc = _blocks(h * w, c, AVG_BLOCK_HW, POOL_BLOCK_C)
    grid = (batch, triton.cdiv(c, bc))
    runtime = [x, out, c, h, w, *x.stride(), out.stride(0), out.stride(1)]
    template = runtime + [bhw, bc]
    owner = sys.modules[__name__]
    kernel = _global_avg_pool_fwd_kernel
    bound = BoundLaunch(owner, kernel, grid, len(runtime), _AVG_POOL_CONSTEXPRS, {}, x.device)
    return PoolLaunch(shape, x.dtype, x.device, template, bound), out
