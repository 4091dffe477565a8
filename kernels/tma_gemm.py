"""1×1 stride-1 convolution as a persistent tensor-descriptor (TMA) GEMM over NHWC, fused epilogue.

GEMM view: for x in channels_last-contiguous memory, the (n, h, w) pixels are the rows of one
row-major matrix, so a 1×1 stride-1 conv is a plain GEMM with no index arithmetic in the loop:

    A = x viewed as [M = N·H·W, K = C_in]      (row stride C_in)
    B = the folded weight viewed as [C_in, C_out]  (``fastres.fold.pack_weight``: C_out stride 1)
    out[M, C_out] = act(A @ B + bias (+ residual))

A and B tiles are loaded through 2-D tensor descriptors (``tl.make_tensor_descriptor``: on sm_90 the
bulk tensor copy engine, ``cp.async.bulk.tensor``; the rows past M and the columns past C_in/C_out come
back zero-filled, so the main loop has no masks). A persistent grid of min(k × #SMs, tiles) programs
(k = the programs that fit on an SM) walks the output tiles in grouped order (GROUP_M row tiles share
one column of weight tiles in L2).
The epilogue is ``kernels/conv.py``'s in fp32: + bias, + residual tile (any float dtype; through a
descriptor when it is channels_last-contiguous and 16-byte aligned, else strided pointer loads), ReLU,
optional tf32 rounding of fp32 outputs, cast, one store (a descriptor store clips at the tensor's edge;
a masked pointer store for outputs that are not channels_last-contiguous). Every output element is
written exactly once.

Stride 2 (``_conv1x1_strided_bias_act_fwd_kernel``): output pixel (n, p, q) reads x[n, 2p, 2q, :], so
A is x seen through the strided 4-D view

    [N, P, Q, C_in] with element strides [H·W·C_in, 2·W·C_in, 2·C_in, 1]

with P = (H − 1)//2 + 1 and Q = (W − 1)//2 + 1 (padding 0: P = ceil(H/2)). The copy engine's rules
hold for exactly the x the stride-1 rule admits:
the base is x's (16-byte aligned), the innermost stride is 1, and every other stride is a multiple of
C_in·itemsize, itself a multiple of 16 bytes (2·C_in·itemsize and H·W·C_in·itemsize then are too). Odd H
or W need nothing more: the last view row 2(P − 1) ≤ H − 1 and column 2(Q − 1) ≤ W − 1 are real pixels of
the same image, and the view's extent [N, P, Q] makes the copy engine zero-fill (and the store clip)
everything past it, never reading the next image. N and P cannot merge into one 3-D row dimension in
general (image n's first even row is n·H, linear in n·P + p only for even H), and the output rows of a
flat M tile are not one box of the view, so an M tile is one image's BLOCK_H × BLOCK_W box of output
pixels (``tma_conv``'s tiling, box [1, BLOCK_H, BLOCK_W, BLOCK_K] reshaped to [BLOCK_M, BLOCK_K]; a
box spanning more than one row feeds wgmma from registers, ``kernels/tma_conv.py``'s ROW_BOX note), with
BLOCK_W = min(next_pow2(Q), BLOCK_M) chosen at launch (``pixel_box``), so the config stays shape-free.
The epilogue takes the same box of the residual and the output through 4-D descriptors over [N, P, Q,
C_out] (or strided pointers). Only stride (2, 2) is admitted: the view is valid for any stride, but
other strides have no layer in the models here and no test.

Applicability (``applicable``): 1×1 kernel, stride 1 or (2, 2), padding 0, groups 1; x
channels_last-contiguous with C_in·itemsize a multiple of 16 bytes and a 16-byte aligned base (the copy
engine's rule for strides and addresses); the weight in the packed layout with C_out·itemsize a multiple
of 16 bytes; a Triton with device-side descriptors and ``triton.set_allocator``; on CUDA, compute
capability ≥ 9.0. Anything else is reported as not applicable with the reason, never launched.

Warp specialisation (``TmaGemmConfig.warp_specialize``, off by default; a tuner axis,
``kernels/tuning.tma_gemm_candidates``): the K loop becomes ``tl.range(..., warp_specialize=True)``, so
Triton splits it into a TMA producer warp and MMA consumer warps. A Triton whose ``tl.range`` lacks the
argument gets it forced off (``WARP_SPECIALIZE_AVAILABLE``); a config whose compile fails on a GPU is
dropped by the tuner like any other.

Device-side descriptors (built in the kernel, not ``triton.tools.tensor_descriptor.TensorDescriptor``
on the host) keep the kernel's signature to pointers and integers: no descriptor object is built per
call, and the kernel report specialises it like the gather kernel. On a GPU they need scratch memory
for the descriptors (128 bytes per program), which Triton asks of the allocator set with
``triton.set_allocator``; the launcher installs a torch allocator when none is set.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._act import _apply_act, _round_tf32, act_code
from ._common import INTERPRET, check_tensor, launchable, next_pow2, tl_dtype_ok, unused_pointer
from .conv import TF32_ROUND_DEVICE_TYPES, _default_precision

# Tuning constants.
# Interpreter: each program instance costs milliseconds whatever its block size, so few large tiles and a
# small fixed persistent grid (4 programs also walks the multi-tile loop of every program in the tests).
INTERPRET_MAX_BLOCK = 128
INTERPRET_PROGRAMS = 4
# tl.dot needs every dimension >= 16; the copy engine needs >= 16 bytes along the contiguous dimension.
MIN_BLOCK = 16
# GPU defaults until a GPU measures them (no GPU was lent for issue 11): 128×128 output tiles with 64
# (16-bit) or 32 (fp32) K columns per stage are the Hopper shapes of Triton's persistent-matmul tutorial;
# 3 stages: (128 + 128) × 64 × 2 B = 32 KiB per stage, 96 KiB, leaving room for the epilogue's tile.
# Register and spill figures of these configs: benchmarks/kernel_report.py --tactics tma_gemm.
GPU_BLOCK_M = 128
GPU_BLOCK_N = 128
GPU_STAGES = 3
# 8 warps for a 128-row tile, as the gather kernel (4 warps on a 128×128 fp32 accumulator is 128
# accumulator registers per thread before the epilogue); 4 warps below.
GPU_WARPS = 8
SMALL_TILE_WARPS = 4
# Persistent programs per SM: 2 for tiles at most 64 columns wide. Kernel report (sm_90, batch 32): the
# 128×64 tile takes 70 registers × 8 warps and 88 KiB (fp16) / 104 KiB (tf32) of shared memory, so two
# fit on an SM, as two gather programs do (occupancy 0.25); one per SM would halve the resident tiles.
# 128×128 tiles take 128-164 registers and 128-160 KiB: one.
NARROW_TILE_N = 64
NARROW_TILE_PROGRAMS_PER_SM = 2
# Grouped tile order: GROUP_M row tiles share a column of weight tiles in L2 (as conv.py).
GROUP_M = 8
# Sizes that only enter index arithmetic are not specialised, so batches share a compile (conv.py's
# CONV_UNSPECIALISED). Channel counts stay specialised: they are the descriptors' strides.
TMA_UNSPECIALISED = ("M", "H", "W")
# Bytes: the copy engine's alignment for base addresses and row strides.
TMA_ALIGN = 16
# Hopper (sm_90) is the first architecture with the tensor memory accelerator.
MIN_CAPABILITY = (9, 0)
# Strides with a kernel path: 1 (flat row tiles) and (2, 2) (the strided 4-D view, pixel-box tiles).
STRIDED = (2, 2)
# The strided kernel's sizes that only enter descriptor shapes and index arithmetic (as TMA_UNSPECIALISED).
TMA_STRIDED_UNSPECIALISED = ("BATCH", "H", "W", "P", "Q")
# tl.range(..., warp_specialize=) exists in this Triton (3.6 and 3.8 have it); else the field is forced off.
WARP_SPECIALIZE_AVAILABLE = "warp_specialize" in inspect.signature(tl.range.__init__).parameters


@dataclass(frozen=True)
class TmaGemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1
    num_programs: int | None = None  # persistent grid size; None: min(programs_per_sm × #SMs, tiles)
    programs_per_sm: int = 1
    # 1: the K loop is warp-specialised; None: off. Not a bool: the tables' JSON reader
    # (kernels/tuning._config_from_json) takes positive ints or null for optional fields.
    warp_specialize: int | None = None


@triton.jit
def _pixel_box_tile(
    tile, num_pid_in_group, num_pid_m, tiles_img, tiles_w,
    GROUP_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """(image, box row, box column, first output channel) of persistent tile ``tile`` of a box kernel,
    in grouped order (consecutive tiles reuse the same weight column tiles)."""
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    box = pid_m % tiles_img
    return pid_m // tiles_img, (box // tiles_w) * BLOCK_H, (box % tiles_w) * BLOCK_W, pid_n * BLOCK_N


@triton.jit
def _pixel_box_ptrs(
    base, img, h0, w0, off_n, P, Q, C_OUT, stride_n, stride_h, stride_w, stride_c,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Pointers and mask of an output-shaped tensor's tile for the pixel box at (img, h0, w0), channels
    from off_n: row i of the tile is pixel (h0 + i // BLOCK_W, w0 + i % BLOCK_W) (powers of two); int64
    before any product with a stride. The strided residual and output paths of the box kernels (this
    file's strided 1×1 kernel and ``tma_conv``) share it."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    pix_h = h0 + offs_m // BLOCK_W
    pix_w = w0 + offs_m % BLOCK_W
    mask = ((pix_h < P) & (pix_w < Q))[:, None] & (offs_n < C_OUT)[None, :]
    ptrs = (
        base
        + img.to(tl.int64) * stride_n
        + (pix_h.to(tl.int64) * stride_h + pix_w.to(tl.int64) * stride_w)[:, None]
        + (offs_n.to(tl.int64) * stride_c)[None, :]
    )
    return ptrs, mask


@triton.jit
def _pixel_box_epilogue(
    acc, bias_ptr, res_ptr, out_ptr, r_desc, o_desc, img, h0, w0, off_n, P, Q, C_OUT,
    stride_rn, stride_rh, stride_rw, stride_rc, stride_on, stride_oh, stride_ow, stride_oc, act_a, act_b,
    HAS_RESIDUAL: tl.constexpr, RES_DESC: tl.constexpr, OUT_DESC: tl.constexpr, ACT: tl.constexpr,
    ROUND_TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """The box kernels' epilogue for the tile at (img, h0, w0, off_n), in fp32: + bias, + residual (its
    box through ``r_desc``, else masked pointers), activation, tf32 rounding, one store (``o_desc``'s box,
    else masked pointers). ``r_desc`` / ``o_desc``: the kernel's descriptors, built once per program, or
    None where ``RES_DESC`` / ``OUT_DESC`` is off. This file's strided 1×1 kernel and ``tma_conv`` share
    it."""
    offs_n = off_n + tl.arange(0, BLOCK_N)
    acc += tl.load(bias_ptr + offs_n, mask=offs_n < C_OUT, other=0.0)[None, :]
    if HAS_RESIDUAL:
        if RES_DESC:
            acc += r_desc.load([img, h0, w0, off_n]).reshape(BLOCK_M, BLOCK_N).to(tl.float32)
        else:
            r_ptrs, r_mask = _pixel_box_ptrs(
                res_ptr, img, h0, w0, off_n, P, Q, C_OUT, stride_rn, stride_rh, stride_rw, stride_rc,
                BLOCK_M, BLOCK_N, BLOCK_W,
            )
            acc += tl.load(r_ptrs, mask=r_mask, other=0.0).to(tl.float32)
    acc = _apply_act(acc, ACT, act_a, act_b)
    if ROUND_TF32:
        acc = _round_tf32(acc)
    if OUT_DESC:
        # The copy engine writes only the part of the box inside [BATCH, P, Q, C_OUT]: each element once.
        tile_out = acc.to(out_ptr.dtype.element_ty).reshape(1, BLOCK_H, BLOCK_W, BLOCK_N)
        o_desc.store([img, h0, w0, off_n], tile_out)
    else:
        o_ptrs, o_mask = _pixel_box_ptrs(
            out_ptr, img, h0, w0, off_n, P, Q, C_OUT, stride_on, stride_oh, stride_ow, stride_oc,
            BLOCK_M, BLOCK_N, BLOCK_W,
        )
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


def use_warp_specialize(cfg: TmaGemmConfig) -> bool:
    """The WARP_SPECIALIZE constexpr for ``cfg``: its field, forced off where tl.range lacks the argument."""
    return bool(cfg.warp_specialize) and WARP_SPECIALIZE_AVAILABLE


@triton.jit(do_not_specialize=TMA_UNSPECIALISED)
def _conv1x1_bias_act_fwd_kernel(
    x_ptr,  # [M, C_IN] row-major (channels_last x)
    w_ptr,  # [C_IN, C_OUT] row-major (packed weight)
    bias_ptr,
    res_ptr,
    out_ptr,
    M,
    H,
    W,  # pixel (n, h, w) of row m, for the strided residual / output paths only
    C_IN,
    C_OUT,
    stride_rn,
    stride_rc,
    stride_rh,
    stride_rw,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    act_a,  # fp32 activation arguments (_act._apply_act): hardtanh's bounds, leaky ReLU's slope
    act_b,
    HAS_RESIDUAL: tl.constexpr,
    RES_DESC: tl.constexpr,  # residual is [M, C_OUT] row-major and aligned: load it through a descriptor
    OUT_DESC: tl.constexpr,  # output is [M, C_OUT] row-major and aligned: store it through a descriptor
    ACT: tl.constexpr,  # activation code, _act.ACT_CODES
    DOT_PRECISION: tl.constexpr,  # "tf32" or "ieee"; used by fp32 dots only
    ROUND_TF32: tl.constexpr,  # round the fp32 output to tf32 (nearest even) for the next tf32 dot
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr = False,  # split the K loop into TMA-producer and MMA-consumer warps
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_OUT, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n

    # One set of descriptors per program, reused for every tile it computes.
    x_desc = tl.make_tensor_descriptor(
        x_ptr, shape=[M, C_IN], strides=[C_IN, 1], block_shape=[BLOCK_M, BLOCK_K]
    )
    w_desc = tl.make_tensor_descriptor(
        w_ptr, shape=[C_IN, C_OUT], strides=[C_OUT, 1], block_shape=[BLOCK_K, BLOCK_N]
    )
    if RES_DESC:
        r_desc = tl.make_tensor_descriptor(
            res_ptr, shape=[M, C_OUT], strides=[C_OUT, 1], block_shape=[BLOCK_M, BLOCK_N]
        )
    if OUT_DESC:
        o_desc = tl.make_tensor_descriptor(
            out_ptr, shape=[M, C_OUT], strides=[C_OUT, 1], block_shape=[BLOCK_M, BLOCK_N]
        )

    for tile in range(pid, num_tiles, num_programs):
        # Grouped ordering: consecutive tiles reuse the same weight column tiles.
        group_id = tile // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
        pid_n = (tile % num_pid_in_group) // group_size_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N

        # Out-of-bounds rows and K columns are zero-filled by the descriptor: no masks in the loop.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if WARP_SPECIALIZE:  # a constexpr branch: a Triton without the argument never compiles it
            for k0 in tl.range(0, C_IN, BLOCK_K, warp_specialize=True):
                a = x_desc.load([off_m, k0])
                b = w_desc.load([k0, off_n])
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        else:
            for k0 in tl.range(0, C_IN, BLOCK_K):
                a = x_desc.load([off_m, k0])
                b = w_desc.load([k0, off_n])
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        # Epilogue in fp32: + bias, + residual, activation, one store.
        offs_n = off_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < C_OUT
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        if (HAS_RESIDUAL and not RES_DESC) or not OUT_DESC:
            # Strided paths: the row index m is pixel (n, h, w); int64 before any product with a stride.
            offs_m = off_m + tl.arange(0, BLOCK_M)
            m_mask = offs_m < M
            pix_w = (offs_m % W).to(tl.int64)
            pix_h = ((offs_m // W) % H).to(tl.int64)
            pix_n = (offs_m // W // H).to(tl.int64)
            tile_mask = m_mask[:, None] & n_mask[None, :]
            co = offs_n.to(tl.int64)
        if HAS_RESIDUAL:
            if RES_DESC:
                acc += r_desc.load([off_m, off_n]).to(tl.float32)
            else:
                r_ptrs = (
                    res_ptr
                    + (pix_n * stride_rn + pix_h * stride_rh + pix_w * stride_rw)[:, None]
                    + (co * stride_rc)[None, :]
                )
                acc += tl.load(r_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        acc = _apply_act(acc, ACT, act_a, act_b)
        if ROUND_TF32:
            acc = _round_tf32(acc)
        if OUT_DESC:
            # The copy engine writes only the part of the box inside [M, C_OUT]: each element once.
            o_desc.store([off_m, off_n], acc.to(out_ptr.dtype.element_ty))
        else:
            o_ptrs = (
                out_ptr
                + (pix_n * stride_on + pix_h * stride_oh + pix_w * stride_ow)[:, None]
                + (co * stride_oc)[None, :]
            )
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit(do_not_specialize=TMA_STRIDED_UNSPECIALISED)
def _conv1x1_strided_bias_act_fwd_kernel(
    x_ptr,  # [BATCH, H, W, C_IN] (channels_last x), read through the strided view [BATCH, P, Q, C_IN]
    w_ptr,  # [C_IN, C_OUT] row-major (packed weight)
    bias_ptr,
    res_ptr,
    out_ptr,
    BATCH,
    H,
    W,
    P,
    Q,
    C_IN,
    C_OUT,
    stride_rn,
    stride_rc,
    stride_rh,
    stride_rw,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    act_a,  # fp32 activation arguments (_act._apply_act): hardtanh's bounds, leaky ReLU's slope
    act_b,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    RES_DESC: tl.constexpr,  # residual is channels_last-contiguous and aligned: 4-D descriptor boxes
    OUT_DESC: tl.constexpr,  # output is channels_last-contiguous and aligned: 4-D descriptor stores
    ACT: tl.constexpr,  # activation code, _act.ACT_CODES
    DOT_PRECISION: tl.constexpr,  # "tf32" or "ieee"; used by fp32 dots only
    ROUND_TF32: tl.constexpr,  # round the fp32 output to tf32 (nearest even) for the next tf32 dot
    BLOCK_H: tl.constexpr,  # output pixel box: BLOCK_H × BLOCK_W pixels of one image (pixel_box)
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr = False,
):
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    tiles_h = tl.cdiv(P, BLOCK_H)
    tiles_w = tl.cdiv(Q, BLOCK_W)
    tiles_img = tiles_h * tiles_w
    num_pid_m = BATCH * tiles_img
    num_pid_n = tl.cdiv(C_OUT, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n

    # The strided view (module docstring): view pixel (p, q) is x pixel (STRIDE_H·p, STRIDE_W·q); its
    # extent [BATCH, P, Q] bounds the zero fill. Strides in elements, int64.
    row_x = W.to(tl.int64) * C_IN
    x_desc = tl.make_tensor_descriptor(
        x_ptr,
        shape=[BATCH, P, Q, C_IN],
        strides=[H * row_x, STRIDE_H * row_x, STRIDE_W * C_IN, 1],
        block_shape=[1, BLOCK_H, BLOCK_W, BLOCK_K],
    )
    w_desc = tl.make_tensor_descriptor(
        w_ptr, shape=[C_IN, C_OUT], strides=[C_OUT, 1], block_shape=[BLOCK_K, BLOCK_N]
    )
    row_o = Q.to(tl.int64) * C_OUT
    r_desc = None
    o_desc = None
    if RES_DESC:
        r_desc = tl.make_tensor_descriptor(
            res_ptr,
            shape=[BATCH, P, Q, C_OUT],
            strides=[P * row_o, row_o, C_OUT, 1],
            block_shape=[1, BLOCK_H, BLOCK_W, BLOCK_N],
        )
    if OUT_DESC:
        o_desc = tl.make_tensor_descriptor(
            out_ptr,
            shape=[BATCH, P, Q, C_OUT],
            strides=[P * row_o, row_o, C_OUT, 1],
            block_shape=[1, BLOCK_H, BLOCK_W, BLOCK_N],
        )

    for tile in range(pid, num_tiles, num_programs):
        img, h0, w0, off_n = _pixel_box_tile(
            tile, num_pid_in_group, num_pid_m, tiles_img, tiles_w, GROUP_M, BLOCK_H, BLOCK_W, BLOCK_N
        )

        # Box pixels past P or Q and K columns past C_in are zero-filled by the descriptor: no masks.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if WARP_SPECIALIZE:
            for k0 in tl.range(0, C_IN, BLOCK_K, warp_specialize=True):
                a = x_desc.load([img, h0, w0, k0]).reshape(BLOCK_M, BLOCK_K)
                b = w_desc.load([k0, off_n])
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        else:
            for k0 in tl.range(0, C_IN, BLOCK_K):
                a = x_desc.load([img, h0, w0, k0]).reshape(BLOCK_M, BLOCK_K)
                b = w_desc.load([k0, off_n])
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        # Epilogue in fp32: + bias, + residual, activation, one store.
        _pixel_box_epilogue(
            acc, bias_ptr, res_ptr, out_ptr, r_desc, o_desc, img, h0, w0, off_n, P, Q, C_OUT,
            stride_rn, stride_rh, stride_rw, stride_rc, stride_on, stride_oh, stride_ow, stride_oc,
            act_a, act_b, HAS_RESIDUAL, RES_DESC, OUT_DESC, ACT, ROUND_TF32,
            BLOCK_M, BLOCK_N, BLOCK_H, BLOCK_W,
        )


def descriptors_available() -> str | None:
    """None if this Triton has device-side tensor descriptors and a scratch allocator hook, else why not.
    (Both exist from Triton 3.4; the GPU machine's 3.6 and this checkout's 3.8 have them.)"""
    if not hasattr(tl, "make_tensor_descriptor"):
        return f"triton {triton.__version__} has no tl.make_tensor_descriptor"
    if not hasattr(triton, "set_allocator"):
        return f"triton {triton.__version__} has no triton.set_allocator (descriptor scratch memory)"
    return None


def _is_nhwc_rows(t: torch.Tensor) -> bool:
    """t (N, C, H, W) is one row-major [N·H·W, C] matrix: channels_last-contiguous."""
    return t.is_contiguous(memory_format=torch.channels_last)


def _aligned(t: torch.Tensor, row_elems: int) -> bool:
    return t.data_ptr() % TMA_ALIGN == 0 and (row_elems * t.element_size()) % TMA_ALIGN == 0


def _is_packed_1x1(w: torch.Tensor) -> bool:
    """w (C_out, C_in, 1, 1) is a row-major [C_in, C_out] matrix (C_out stride 1)."""
    c_out, c_in = w.shape[:2]
    return (c_out == 1 or w.stride(0) == 1) and (c_in == 1 or w.stride(1) == c_out)


def applicable(
    x: torch.Tensor, w: torch.Tensor, stride=1, padding=0, dilation=1, groups: int = 1
) -> str | None:
    """None if ``conv1x1_bias_act`` can run this conv, else the reason it cannot.

    >>> applicable(x, w, stride=3)                            # doctest: +SKIP
    'tma_gemm: stride (3, 3), needs 1 or (2, 2)'
    """
    why = descriptors_available()
    if why:
        return f"tma_gemm: {why}"
    if x.dim() != 4 or w.dim() != 4:
        return f"tma_gemm: needs 4-D x and weight, got {tuple(x.shape)} and {tuple(w.shape)}"
    stride, padding = _pair(stride), _pair(padding)
    if tuple(w.shape[2:]) != (1, 1):
        return f"tma_gemm: {w.shape[2]}x{w.shape[3]} kernel, needs 1x1"
    if groups != 1:
        return f"tma_gemm: groups={groups}, needs 1"
    if stride not in ((1, 1), STRIDED):
        return f"tma_gemm: stride {stride}, needs 1 or (2, 2)"
    if padding != (0, 0):
        return f"tma_gemm: padding {padding}, needs 0"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or w.dtype != x.dtype:
        return f"tma_gemm: dtypes x {x.dtype}, weight {w.dtype}"
    if x.device.type == "cuda":
        cap = torch.cuda.get_device_capability(x.device)
        if cap < MIN_CAPABILITY:
            return f"tma_gemm: compute capability {cap[0]}.{cap[1]}, TMA needs 9.0"
    elif not INTERPRET:
        return f"tma_gemm: x is on {x.device}, needs CUDA (or the interpreter)"
    c_in, c_out = x.shape[1], w.shape[0]
    if w.shape[1] != c_in:
        return f"tma_gemm: weight expects {w.shape[1]} input channels, x has {c_in}"
    if not _is_nhwc_rows(x):
        return f"tma_gemm: x is not channels_last-contiguous (strides {tuple(x.stride())})"
    if not _aligned(x, c_in):
        return (
            f"tma_gemm: x rows of C_in={c_in} x {x.element_size()} B or its base address are not "
            f"{TMA_ALIGN}-byte aligned"
        )
    if not _is_packed_1x1(w):
        return f"tma_gemm: weight strides {tuple(w.stride())} are not the packed layout (C_out stride 1)"
    if not _aligned(w, c_out):
        return (
            f"tma_gemm: weight rows of C_out={c_out} x {w.element_size()} B or its base address are not "
            f"{TMA_ALIGN}-byte aligned"
        )
    return None


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(int(i) for i in v)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(
    m: int,
    c_out: int,
    c_in: int,
    dtype: torch.dtype,
    *,
    interpret: bool = INTERPRET,
    out_hw: tuple[int, int] | None = None,
) -> TmaGemmConfig:
    """The heuristic config for one 1×1 conv shape (no tuned table for this tactic yet).
    ``out_hw``: (P, Q) of a strided conv, whose M tiles are pixel boxes of one image: no larger than the
    image's power-of-two box (7×7: 64 rows, 49 useful, where a 128-row box would hold 49)."""
    if out_hw is not None:
        m = min(m, next_pow2(out_hw[0]) * next_pow2(out_hw[1]))
    if interpret:
        cap = INTERPRET_MAX_BLOCK
        return TmaGemmConfig(
            block_m=min(cap, max(MIN_BLOCK, next_pow2(m))),
            block_n=min(cap, max(MIN_BLOCK, next_pow2(c_out))),
            block_k=min(cap, max(MIN_BLOCK, next_pow2(c_in))),
            num_programs=INTERPRET_PROGRAMS,
        )
    block_k = 32 if dtype == torch.float32 else 64
    block_m = 64 if m <= 64 else GPU_BLOCK_M
    block_n = min(GPU_BLOCK_N, max(MIN_BLOCK, next_pow2(c_out)))
    return TmaGemmConfig(
        block_m=block_m,
        block_n=block_n,
        block_k=min(block_k, max(MIN_BLOCK, next_pow2(c_in))),
        num_warps=GPU_WARPS if block_m >= GPU_BLOCK_M else SMALL_TILE_WARPS,
        num_stages=GPU_STAGES,
        programs_per_sm=NARROW_TILE_PROGRAMS_PER_SM if block_n <= NARROW_TILE_N else 1,
    )


def pixel_box(block_m: int, q: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_W) of the strided path's M tile: as wide as the output row allows (next_pow2(Q),
    at most block_m), the rest in height; BLOCK_H · BLOCK_W = block_m."""
    block_w = min(block_m, next_pow2(q))
    return block_m // block_w, block_w


def m_tiles(cfg: TmaGemmConfig, m: int, *, batch: int = 1, out_hw: tuple[int, int] | None = None) -> int:
    """M tiles: of the flat [M] rows (stride 1), or of ``batch`` images of (P, Q) pixel boxes (strided)."""
    if out_hw is None:
        return triton.cdiv(m, cfg.block_m)
    bh, bw = pixel_box(cfg.block_m, out_hw[1])
    return batch * triton.cdiv(out_hw[0], bh) * triton.cdiv(out_hw[1], bw)


def num_programs(cfg: TmaGemmConfig, m: int, c_out: int, sms: int, *, tiles_m: int | None = None) -> int:
    """Persistent grid: ``programs_per_sm`` programs per SM, never more programs than tiles.
    ``tiles_m``: the M tile count when it is not cdiv(m, block_m) (the strided path, ``m_tiles``)."""
    tiles = (tiles_m or triton.cdiv(m, cfg.block_m)) * triton.cdiv(c_out, cfg.block_n)
    return max(1, min(cfg.num_programs or sms * cfg.programs_per_sm, tiles))


def _torch_scratch(size: int, alignment: int, stream):
    # Descriptor scratch for device-side descriptors; the caching allocator aligns to 512 bytes.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Install a torch-backed scratch allocator if the calling context has none (Triton keeps it in a
    ContextVar: a thread or context that never set one gets Triton's raising NullAllocator)."""
    try:
        from triton.runtime import _allocation

        current = _allocation._allocator.get()
        if not isinstance(current, _allocation.NullAllocator):
            return  # the caller's own allocator (or ours) is in place
    except (ImportError, AttributeError):  # private module moved: set ours
        pass
    triton.set_allocator(_torch_scratch)


def conv1x1_bias_act(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    stride=1,
    act: str = "relu",
    act_a: float = 0.0,
    act_b: float = 0.0,
    relu: bool | None = None,
    precision: str | None = None,
    out: torch.Tensor | None = None,
    config: TmaGemmConfig | None = None,
) -> torch.Tensor:
    """act(conv2d(x, w, stride=stride) + bias (+ residual)) for a 1×1 conv (stride 1 or 2), as one
    persistent TMA GEMM.

    x: (N, C_in, H, W) fp32/fp16/bf16, channels_last-contiguous, C_in·itemsize a multiple of 16 B.
    w: (C_out, C_in, 1, 1), x's dtype, packed with C_out stride 1 (``fastres.fold``).
    bias: (C_out,) fp32. residual: (N, C_out, P, Q), any strides and floating dtype.
    stride: 1 or 2 (padding 0: P = (H − 1)//2 + 1 for stride 2).
    precision: fp32 dot mode, "tf32" (default, or $FASTRES_FP32_PRECISION) or "ieee".
    Raises ValueError with ``applicable``'s reason for a conv this tactic cannot run.

    >>> y = conv1x1_bias_act(x, w, b, residual=identity)     # doctest: +SKIP
    >>> y = conv1x1_bias_act(x, w_down, b_down, stride=2, act="identity")   # doctest: +SKIP
    """
    op = "conv1x1_bias_act"
    if relu is not None:
        act = "relu" if relu else "identity"
    code = act_code(act)
    check_tensor(op, "x", x, ndim=4)
    check_tensor(op, "weight", w, ndim=4, dtype=x.dtype, device=x.device)
    check_tensor(op, "bias", bias, ndim=1, dtype=torch.float32, device=x.device)
    tl_dtype_ok(op, x.dtype)
    batch, c_in, h, wd = x.shape
    c_out = w.shape[0]
    if bias.shape[0] != c_out:
        raise ValueError(f"{op}: bias has {bias.shape[0]} entries, expected C_out={c_out}")
    why = applicable(x, w, stride=stride)
    if why is not None:
        raise ValueError(f"{op}: {why}")
    strided = _pair(stride) != (1, 1)
    sh, sw = _pair(stride)
    p, q = (h - 1) // sh + 1, (wd - 1) // sw + 1  # padding 0
    if residual is not None:
        check_tensor(op, "residual", residual, ndim=4, device=x.device)
        if tuple(residual.shape) != (batch, c_out, p, q):
            raise ValueError(
                f"{op}: residual shape {tuple(residual.shape)} != output shape {(batch, c_out, p, q)}"
            )
    if out is None:
        out = torch.empty(
            (batch, c_out, p, q), device=x.device, dtype=x.dtype, memory_format=torch.channels_last
        )
    elif tuple(out.shape) != (batch, c_out, p, q) or out.dtype != x.dtype:
        raise ValueError(f"{op}: out must be {(batch, c_out, p, q)} {x.dtype}")
    elif out.device != x.device:
        raise ValueError(f"{op}: out is on {out.device}, expected {x.device}")
    precision = precision or _default_precision()
    if precision not in ("tf32", "ieee"):
        raise ValueError(f"{op}: precision must be 'tf32' or 'ieee', got {precision!r}")
    m = batch * p * q
    if m == 0 or c_out == 0:
        return out
    out_hw = (p, q) if strided else None
    cfg = config or pick_config(m, c_out, c_in, x.dtype, out_hw=out_hw)
    if x.device.type == "cuda":
        _ensure_allocator()
        sms = _num_sms(x.device)
    else:
        sms = INTERPRET_PROGRAMS
    res_desc = residual is not None and _is_nhwc_rows(residual) and _aligned(residual, c_out)
    out_desc = _is_nhwc_rows(out) and _aligned(out, c_out)
    # Without a residual its pointer is never read: a dedicated dummy (conv.py's reason), out's strides.
    res = residual if residual is not None else unused_pointer(out)
    res_strides = residual.stride() if residual is not None else out.stride()
    round_tf32 = x.dtype == torch.float32 and precision == "tf32" and x.device.type in TF32_ROUND_DEVICE_TYPES
    tiles_m = m_tiles(cfg, m, batch=batch, out_hw=out_hw)
    grid = (num_programs(cfg, m, c_out, sms, tiles_m=tiles_m),)
    common = dict(
        HAS_RESIDUAL=residual is not None,
        RES_DESC=res_desc,
        OUT_DESC=out_desc,
        ACT=code,
        DOT_PRECISION=precision,
        ROUND_TF32=round_tf32,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=GROUP_M,
        WARP_SPECIALIZE=use_warp_specialize(cfg),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if strided:
        block_h, block_w = pixel_box(cfg.block_m, q)
        launchable(_conv1x1_strided_bias_act_fwd_kernel)[grid](
            x, w, bias, res, out, batch, h, wd, p, q, c_in, c_out, *res_strides, *out.stride(),
            float(act_a), float(act_b), STRIDE_H=sh, STRIDE_W=sw, BLOCK_H=block_h, BLOCK_W=block_w, **common,
        )  # fmt: skip
        return out
    launchable(_conv1x1_bias_act_fwd_kernel)[grid](
        x, w, bias, res, out, m, h, wd, c_in, c_out, *res_strides, *out.stride(),
        float(act_a), float(act_b), BLOCK_M=cfg.block_m, **common,
    )  # fmt: skip
    return out
