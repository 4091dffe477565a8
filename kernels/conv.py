"""Implicit-GEMM convolution over NHWC with a fused bias / residual / activation epilogue.

GEMM view: M = N·P·Q output pixels, N = C_out / groups, K = R·S·C_in / groups.
One program computes a BLOCK_M × BLOCK_N output tile of one group, accumulating in fp32,
then adds the folded-BN bias and an optional residual tile, applies the activation (``_act``) and
stores once.

Tensors are addressed through their strides, so any layout works; channels_last
(channel stride 1) is the one that coalesces, and is what the modules produce.
The weight is the conv's (C_out, C_in/groups, R, S) tensor; the fold prepacks it so that
its C_out stride is 1 (memory order R, S, C_in, C_out): each K row of the B tile is contiguous.

Split-K (``ConvConfig.split_k`` > 1, for layers whose tiles do not fill the GPU): program (tile, g, k)
accumulates the k-th contiguous slice of the K iterations (the main conv's, then the shortcut's) and stores
its fp32 partial sum in a workspace [SPLIT_K, M, C_out]; ``kernels/epilogue.py``'s pass then adds the
partials in split order (deterministic), the bias and residual, applies the activation and stores once.
The FLOPs and bytes behind the choice are in benchmarks/NOTES.md (issue 11, small-M layers).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ._act import _apply_act, _round_tf32, act_code
from ._common import (
    INTERPRET,
    BoundLaunch,
    channels_last_strides,
    check_tensor,
    launchable,  # noqa: F401  (looked up here per launch: count_launches patches it)
    next_pow2,
    tl_dtype_ok,
    unused_pointer,
)
from .epilogue import prepare_bias_act_epilogue

# Tuning constants.
# Interpreter: one large-block config; each program instance costs milliseconds in the
# interpreter whatever its size, so fewer, larger programs finish sooner (DESIGN.md, Tuning).
INTERPRET_MAX_BLOCK = 128
# tl.dot needs every dimension >= 16.
MIN_BLOCK = 16
# Below this many input channels per group the (r, s, c) taps are flattened into one K range,
# so the stem's C_in = 3 fills a K block instead of padding each tap's 3 channels to 16.
FLAT_K_MAX_CIN = 16
# GPU defaults until tuned tables ship (issue: citizen / speed): 128×128 tiles with BLOCK_K=64
# (fp16/bf16) or 32 (fp32, same bytes per stage) are the shapes Triton's matmul tutorial uses
# on Hopper; 4 stages fit the sm_90 shared memory with these tiles. Not yet measured here.
GPU_BLOCK_M = 128
GPU_BLOCK_N = 128
GPU_STAGES = 4
# Warps follow the tile, not M: a 128-row tile with 4 warps (64 < M < 128, ResNet-50 layer4 at
# batch 2) compiled to 255 registers and 88 B of spills on sm_90 (triton 3.8; 44-196 B on 3.6).
GPU_WARPS = 8
SMALL_TILE_WARPS = 4
# Sizes that only enter masks and index arithmetic are not specialised: Triton would otherwise turn a
# value of 1 into a constant and give multiples of 16 a divisibility hint, so batch 1, 4 and 32 (or two
# image sizes) compiled separate kernels. The PTX/SASS cost is in benchmarks/NOTES.md (issue 9, item 6).
# Channel counts and strides stay specialised: they decide the vector width of every load.
CONV_UNSPECIALISED = ("BATCH", "H", "W")
# Device types whose fp32 convs run Triton's tf32 dot, which truncates its operands to tf32 (no
# rounding step): the fold rounds fp32 weights to tf32 and the epilogue rounds fp32 outputs, so that
# every dot operand is already exact in tf32 (DESIGN.md, Numerics). fastres.fold has the same switch.
TF32_ROUND_DEVICE_TYPES = ("cuda",)
# Grouped tile order: GROUP_M row tiles share a column of weight tiles in L2.
GROUP_M = 8
# SM count for the cost model when no GPU is visible: H100 SXM's (the kernel report's sm_90 part).
REFERENCE_SMS = 132
# Split-K: at most 8 slices, each at least 4 K iterations (a 4-stage pipeline has something to overlap).
SPLIT_K_MAX = 8
MIN_K_ITERS_PER_SPLIT = 4
# Smaller tiles the cost model weighs against the default (pick_config): halves of it down to 64 rows or
# columns (one warpgroup's wgmma M; below 64 rows sm_90 falls back to mma.sync).
MIN_CANDIDATE_BLOCK = 64

# Cost model (pick_config, predict_config): a roofline per candidate config, from counted FLOPs and bytes.
# H100 SXM5 figures, NVIDIA H100 Tensor Core GPU datasheet (dense, without sparsity): 989.4 TFLOP/s fp16 /
# bf16 and 494.7 TF32 on the tensor cores, 3.35 TB/s of HBM3, 132 SMs (REFERENCE_SMS). Ridge point:
# 989.4 / 3.35 ≈ 295 FLOP/B (fp16), 148 (tf32): below it a launch is bound by bytes.
H100_PEAK_FLOPS_16BIT = 989.4e12
H100_PEAK_FLOPS_TF32 = 494.7e12
H100_HBM_BYTES_PER_S = 3.35e12
RIDGE_FLOP_PER_BYTE = H100_PEAK_FLOPS_16BIT / H100_HBM_BYTES_PER_S
# Shared memory per SM: 228 KiB, 1 KiB of it reserved per resident block (CUDA C++ Programming Guide,
# compute capability 9.0; the kernel report's occupancy uses the same); it bounds the resident programs.
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_PROGRAM = 1024
# Assumptions, not measurements (no GPU has run this kernel; the tuner measures and its table wins):
# - a program of the default 128x128 tile, alone on its SM with 8 warps, reaches 60% of the SM's share of
#   the peak (NOTES.md, issue 11's count); fewer resident warps reach proportionally less;
ACHIEVABLE_FRACTION = 0.6
SATURATING_WARPS = 8
# - a smaller tile moves more bytes through shared memory per FLOP (the pipeline's copies of A and B, then
#   each warpgroup's wgmma reads of its 64 rows of A and all of B); its fraction of peak is the default's
#   scaled by the default's shared-memory bytes per FLOP over its own (64x128: 0.83, 64x64: 0.63);
# - the split-K partials cost DRAM bandwidth both ways (an upper bound: they may stay in the 50 MB L2);
# - the epilogue pass's launch and ramp cost 3 µs (NOTES.md's 2-4 µs launch gap between kernels).
EXTRA_LAUNCH_S = 3e-6
# Measured: the host work of one launch in a plan (its output or workspace allocation and the launch
# path), 4.5-4.8 µs per launch on this project's 2-core CPU host: ResNet-50 batch 1 with split-K on and off,
# 72 and 51 launches, 607-630 and 517-528 µs per forward (benchmarks/host_overhead.py, launches recorded;
# NOTES.md, issue 10). Triton's own launcher adds more on a GPU host, so this is a lower bound. The host
# issues a plan's launches one after another, so a layer takes at least its launches' host time: where
# that is longer than the kernels (batch 1 without CUDA graphs) a split's second pass costs host time and
# the GPU time it saves is not seen; where the kernels are longer, the host's work hides behind them.
HOST_LAUNCH_S = 4.5e-6


@dataclass(frozen=True)
class ConvConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1
    split_k: int = 1  # K slices, each a program with an fp32 partial sum (module docstring)


@triton.jit
def _flat_k_tiles(
    x_base,
    w_base,
    ih0,
    iw0,
    m_mask,
    n_mask,
    k0,
    H,
    W,
    C_IN_G,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wc,
    stride_wr,
    stride_ws,
    R: tl.constexpr,
    S: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The A and B tiles of K block k0 of the flattened (r, s, c) range (small C_in)."""
    K = R * S * C_IN_G
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    c = offs_k % C_IN_G
    rs = offs_k // C_IN_G
    r = rs // S
    s = rs % S
    ih = ih0[:, None] + r[None, :] * DIL_H
    iw = iw0[:, None] + s[None, :] * DIL_W
    a_mask = m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    a_ptrs = (
        x_base[:, None]
        + c[None, :].to(tl.int64) * stride_xc
        + ih.to(tl.int64) * stride_xh
        + iw.to(tl.int64) * stride_xw
    )
    a = tl.load(a_ptrs, mask=a_mask, other=0.0)
    b_ptrs = w_base[None, :] + (c * stride_wc + r * stride_wr + s * stride_ws)[:, None]
    b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
    return a, b


@triton.jit
def _channel_tiles(a_row, row_mask, b_col, n_mask, c0, C, stride_ac, stride_bc, BLOCK_K: tl.constexpr):
    """The A and B tiles of channels [c0, c0 + BLOCK_K) at one filter tap (or of the 1x1 shortcut): A rows
    start at ``a_row`` (masked by ``row_mask``), B columns at ``b_col``."""
    offs_c = c0 + tl.arange(0, BLOCK_K)
    c_mask = offs_c < C
    a = tl.load(
        a_row[:, None] + offs_c[None, :].to(tl.int64) * stride_ac,
        mask=row_mask[:, None] & c_mask[None, :],
        other=0.0,
    )
    b = tl.load(
        b_col[None, :] + offs_c[:, None] * stride_bc, mask=c_mask[:, None] & n_mask[None, :], other=0.0
    )
    return a, b


@triton.jit
def _main_k_tiles(
    x_base,
    w_base,
    ih0,
    iw0,
    m_mask,
    n_mask,
    it,
    n_c,
    H,
    W,
    C_IN_G,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wc,
    stride_wr,
    stride_ws,
    R: tl.constexpr,
    S: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    FLAT_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The A and B tiles of the main conv's K iteration ``it``: flat K block ``it`` (small C_in), or channel
    block ``it % n_c`` of tap ``it // n_c`` (taps in (r, s) order, each a contiguous run of C in an A row)."""
    if FLAT_K:
        a, b = _flat_k_tiles(
            x_base,
            w_base,
            ih0,
            iw0,
            m_mask,
            n_mask,
            it * BLOCK_K,
            H,
            W,
            C_IN_G,
            stride_xc,
            stride_xh,
            stride_xw,
            stride_wc,
            stride_wr,
            stride_ws,
            R,
            S,
            DIL_H,
            DIL_W,
            BLOCK_K,
        )
    elif R * S == 1:
        # 1x1: one tap, so no division by n_c (a runtime value: ~300 more SASS instructions per 1x1 kernel
        # on sm_90, kernel report)
        ih = ih0
        iw = iw0
        pix_mask = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_row = x_base + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
        a, b = _channel_tiles(
            a_row, pix_mask, w_base, n_mask, it * BLOCK_K, C_IN_G, stride_xc, stride_wc, BLOCK_K
        )
    else:
        rs = it // n_c
        r = rs // S
        s = rs % S
        ih = ih0 + r * DIL_H
        iw = iw0 + s * DIL_W
        pix_mask = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_row = x_base + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
        b_col = w_base + r * stride_wr + s * stride_ws
        a, b = _channel_tiles(
            a_row, pix_mask, b_col, n_mask, (it % n_c) * BLOCK_K, C_IN_G, stride_xc, stride_wc, BLOCK_K
        )
    return a, b


if INTERPRET:  # as _act's helpers: skipped from torch's tracing hash under the interpreter
    _flat_k_tiles.__triton_builtin__ = True
    _channel_tiles.__triton_builtin__ = True
    _main_k_tiles.__triton_builtin__ = True


@triton.jit(do_not_specialize=CONV_UNSPECIALISED)
def _conv_bias_act_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    # problem size; C_IN_G / C_OUT_G are per group
    BATCH,
    H,
    W,
    P,
    Q,
    C_IN_G,
    C_OUT_G,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wo,
    stride_wc,
    stride_wr,
    stride_ws,  # weight (C_out, C_in_g, R, S)
    stride_rn,
    stride_rc,
    stride_rh,
    stride_rw,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    # projection shortcut ("dual GEMM"): a 1×1 conv of x2 accumulated into the same tile
    x2_ptr,
    w2_ptr,
    C_IN2,
    stride_x2n,
    stride_x2c,
    stride_x2h,
    stride_x2w,
    stride_w2o,
    stride_w2c,
    act_a,  # fp32 activation arguments (_act._apply_act): hardtanh's bounds, leaky ReLU's slope
    act_b,
    R: tl.constexpr,
    S: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SHORTCUT: tl.constexpr,
    SC_STRIDE_H: tl.constexpr,
    SC_STRIDE_W: tl.constexpr,
    ACT: tl.constexpr,  # activation code, _act.ACT_CODES
    FLAT_K: tl.constexpr,  # iterate the flattened (r, s, c) K range (small C_in)
    DOT_PRECISION: tl.constexpr,  # "tf32" or "ieee"; used by fp32 dots only
    ROUND_TF32: tl.constexpr,  # round the fp32 output to tf32 (nearest even) for the next tf32 dot
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,  # > 1: out_ptr is the fp32 workspace; store this K slice's partial sum
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    M = BATCH * P * Q
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_OUT_G, BLOCK_N)
    # Grouped ordering: consecutive programs reuse the same weight column tiles.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < C_OUT_G
    # Output pixel coordinates; int64 before any product with a stride.
    q = offs_m % Q
    p = (offs_m // Q) % P
    n = (offs_m // Q // P).to(tl.int64)
    ih0 = p * STRIDE_H - PAD_H
    iw0 = q * STRIDE_W - PAD_W
    co = (g * C_OUT_G + offs_n).to(tl.int64)

    x_base = x_ptr + n * stride_xn + (g * C_IN_G).to(tl.int64) * stride_xc
    w_base = w_ptr + co * stride_wo
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_SHORTCUT:
        # Second K range: the shortcut's 1×1 strided conv over the block input, same output tile,
        # so the shortcut tensor never reaches memory. Groups are 1 here (the launcher checks).
        a2_row = (
            x2_ptr
            + n * stride_x2n
            + (p * SC_STRIDE_H).to(tl.int64) * stride_x2h
            + (q * SC_STRIDE_W).to(tl.int64) * stride_x2w
        )
        b2_col = w2_ptr + co * stride_w2o

    # One iteration space: the main conv's K blocks (taps x channel blocks, or flat blocks), then the
    # shortcut's. Unsplit, one program walks all of it; with split-K program k takes the k-th contiguous
    # slice (the last ones may be short or empty). Taps and channel blocks form one loop, not r/s/c loops:
    # with C_in = BLOCK_K (layer1's 3x3) the channel loop has one iteration per tap, and Triton pipelines
    # only the loop that holds the dot, so nested loops refilled and drained the pipeline on every tap
    # (kernel report's k_loops: depth 3, one drain per tap, before; depth 1 and no drain now).
    n_c = tl.cdiv(C_IN_G, BLOCK_K)
    if FLAT_K:
        n_main = tl.cdiv(R * S * C_IN_G, BLOCK_K)
    else:
        n_main = R * S * n_c
    n_total = n_main
    if HAS_SHORTCUT:
        n_total += tl.cdiv(C_IN2, BLOCK_K)
    if SPLIT_K == 1:
        main_lo = 0
        main_hi = n_main
        sc_lo = n_main
        sc_hi = n_total
    else:
        per_split = tl.cdiv(n_total, SPLIT_K)
        it_lo = tl.program_id(2) * per_split
        it_hi = min(it_lo + per_split, n_total)
        main_lo = it_lo
        main_hi = min(it_hi, n_main)
        sc_lo = max(it_lo, n_main)
        sc_hi = it_hi
    for it in range(main_lo, main_hi):
        a, b = _main_k_tiles(
            x_base,
            w_base,
            ih0,
            iw0,
            m_mask,
            n_mask,
            it,
            n_c,
            H,
            W,
            C_IN_G,
            stride_xc,
            stride_xh,
            stride_xw,
            stride_wc,
            stride_wr,
            stride_ws,
            R,
            S,
            DIL_H,
            DIL_W,
            FLAT_K,
            BLOCK_K,
        )
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_SHORTCUT:
        for it in range(sc_lo, sc_hi):
            a, b = _channel_tiles(
                a2_row,
                m_mask,
                b2_col,
                n_mask,
                (it - n_main) * BLOCK_K,
                C_IN2,
                stride_x2c,
                stride_w2c,
                BLOCK_K,
            )
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    pq_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        # This slice's fp32 partial sum, in workspace slice k (out's strides, BATCH·stride_on apart).
        w_ptrs = (
            out_ptr
            + tl.program_id(2).to(tl.int64) * BATCH * stride_on
            + (n * stride_on + p.to(tl.int64) * stride_oh + q.to(tl.int64) * stride_ow)[:, None]
            + (co * stride_oc)[None, :]
        )
        tl.store(w_ptrs, acc, mask=pq_mask)
        return

    # Epilogue in fp32: + bias, + residual, activation, one store.
    bias = tl.load(bias_ptr + co, mask=n_mask, other=0.0)
    acc += bias[None, :]
    if HAS_RESIDUAL:
        r_ptrs = (
            res_ptr
            + (n * stride_rn + p.to(tl.int64) * stride_rh + q.to(tl.int64) * stride_rw)[:, None]
            + (co * stride_rc)[None, :]
        )
        acc += tl.load(r_ptrs, mask=pq_mask, other=0.0).to(tl.float32)
    acc = _apply_act(acc, ACT, act_a, act_b)
    if ROUND_TF32:
        acc = _round_tf32(acc)  # the next layer's tf32 dot reads exact tf32 values
    o_ptrs = (
        out_ptr
        + (n * stride_on + p.to(tl.int64) * stride_oh + q.to(tl.int64) * stride_ow)[:, None]
        + (co * stride_oc)[None, :]
    )
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=pq_mask)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pick_config(
    m: int,
    c_out_g: int,
    c_in_g: int,
    r: int,
    s: int,
    dtype: torch.dtype,
    *,
    interpret: bool = INTERPRET,
    groups: int = 1,
    num_sms: int | None = None,
) -> ConvConfig:
    """The heuristic block config for one conv shape: the launcher's default, used where no table or
    autotune entry has it (``fastres.kernels.tuning.select_config``), and always under the interpreter.

    On a GPU: the candidate with the least predicted time (``predict_config``, a roofline on H100 SXM
    figures) among the default tile unsplit, its halves down to 64 rows / columns unsplit, and the default
    tile split into 2 to ``SPLIT_K_MAX`` K slices. A candidate's time is the longer of its kernels' and its
    launches' host time (``HOST_LAUNCH_S`` each: a split has two), so at batch 1 a split whose GPU saving the
    host would not let show is not taken. Ties go to the shorter kernel time, then more of a wave, then
    fewer slices, then the larger tile. ResNet-50 at batch 32 (fp16, 132 SMs): benchmarks/NOTES.md lists
    each layer's choice.

    >>> pick_config(32 * 49, 512, 512, 3, 3, torch.float16, interpret=False, num_sms=132).split_k
    2
    """
    if interpret:
        flat = c_in_g < FLAT_K_MAX_CIN
        k_extent = r * s * c_in_g if flat else c_in_g
        cap = INTERPRET_MAX_BLOCK
        return ConvConfig(
            block_m=min(cap, max(MIN_BLOCK, next_pow2(m))),
            block_n=min(cap, max(MIN_BLOCK, next_pow2(c_out_g))),
            block_k=min(cap, max(MIN_BLOCK, next_pow2(k_extent))),
        )
    sms = num_sms or _num_sms()
    best, best_key = None, None
    for cfg in config_candidates(m, c_out_g, c_in_g, r, s, dtype):
        pred = predict_config(m, c_out_g, c_in_g, r, s, dtype, cfg, groups=groups, num_sms=sms)
        cost = max(pred.seconds, host_floor_seconds(cfg.split_k))
        # Picoseconds: equal predictions (two half tiles on an SM against one whole) compare equal. Equal
        # costs (both at the host's floor) go to the shorter kernel time.
        seconds = round(pred.seconds, 12)
        key = (round(cost, 12), seconds, -min(1.0, pred.waves), cfg.split_k, -cfg.block_m * cfg.block_n)
        if best_key is None or key < best_key:
            best, best_key = cfg, key
    return best


def host_floor_seconds(split_k: int) -> float:
    """The host time of a conv launch's launches (``HOST_LAUNCH_S`` each; a split has two): ``pick_config``
    ranks a prediction, and the tuner a measured time, by the longer of the kernel time and this."""
    return (2 if split_k > 1 else 1) * HOST_LAUNCH_S


def default_tile(m: int, c_out_g: int, c_in_g: int, r: int, s: int, dtype: torch.dtype) -> ConvConfig:
    """The GPU default tile, unsplit: 128x128 (clamped to the problem) with BLOCK_K 64 (32 for fp32)."""
    flat = c_in_g < FLAT_K_MAX_CIN
    k_extent = r * s * c_in_g if flat else c_in_g
    block_k = 32 if dtype == torch.float32 else 64
    if flat:
        # The flattened K loop builds [BLOCK_M, BLOCK_K] index tiles: at BLOCK_K = 64 a ResNeXt
        # group (C_in_g = 4, 128×16 tile) spilled at 255 registers on sm_90; 32 compiles to 128
        # registers without spills for it and for the stem (kernel report, fp16/bf16/fp32).
        block_k = 32
    block_m = min(GPU_BLOCK_M, max(MIN_BLOCK, next_pow2(m)))
    return ConvConfig(
        block_m=block_m,
        block_n=min(GPU_BLOCK_N, max(MIN_BLOCK, next_pow2(c_out_g))),
        block_k=min(block_k, max(MIN_BLOCK, next_pow2(k_extent))),
        num_warps=GPU_WARPS if block_m >= GPU_BLOCK_M else SMALL_TILE_WARPS,
        num_stages=GPU_STAGES,
    )


def config_candidates(
    m: int, c_out_g: int, c_in_g: int, r: int, s: int, dtype: torch.dtype
) -> list[ConvConfig]:
    """What ``pick_config`` weighs on a GPU: the default tile, its halves (rows, columns, both; none below
    ``MIN_CANDIDATE_BLOCK``) unsplit, and the default tile split into 2 to ``SPLIT_K_MAX`` slices of at least
    ``MIN_K_ITERS_PER_SPLIT`` K iterations each."""
    base = default_tile(m, c_out_g, c_in_g, r, s, dtype)
    out = [base]
    for bm, bn in (
        (base.block_m // 2, base.block_n),
        (base.block_m, base.block_n // 2),
        (base.block_m // 2, base.block_n // 2),
    ):
        if min(bm, bn) >= MIN_CANDIDATE_BLOCK:
            warps = GPU_WARPS if bm >= GPU_BLOCK_M else SMALL_TILE_WARPS
            out.append(ConvConfig(bm, bn, base.block_k, warps, GPU_STAGES))
    k_iters = _k_iters(c_in_g, r, s, base.block_k)
    for split in range(2, SPLIT_K_MAX + 1):
        if k_iters < split * MIN_K_ITERS_PER_SPLIT:
            break
        out.append(replace(base, split_k=split))
    return out


def _k_iters(c_in_g: int, r: int, s: int, block_k: int) -> int:
    """K iterations of the main loop (the flattened range for small C_in, else taps x channel blocks)."""
    if c_in_g < FLAT_K_MAX_CIN:
        return triton.cdiv(r * s * c_in_g, block_k)
    return r * s * triton.cdiv(c_in_g, block_k)


@dataclass(frozen=True)
class Prediction:
    """``predict_config``'s estimate for one config: a model, not a measurement."""

    seconds: float  # both passes, the extra launch included
    compute_s: float  # the GEMM pass's busiest SM at its achievable fraction of peak
    dram_bytes: int  # compulsory bytes of both passes (the split-K partials written and read included)
    programs: int
    programs_per_sm: int  # resident at once, by shared memory
    waves: float  # programs / (programs_per_sm x SMs): the kernel report's column
    sms_busy: int


def _smem_bytes_per_flop(block_m: int, block_n: int) -> float:
    """Elements through shared memory per FLOP of a tile's K step: the pipeline writes A and B once, each
    warpgroup (64 rows) reads its rows of A and all of B; per element of the dtype."""
    warpgroups = max(1, block_m // 64)
    return (2 * block_m + block_n * (1 + warpgroups)) / (2 * block_m * block_n)


def predict_config(
    m: int,
    c_out_g: int,
    c_in_g: int,
    r: int,
    s: int,
    dtype: torch.dtype,
    cfg: ConvConfig,
    *,
    groups: int = 1,
    num_sms: int = REFERENCE_SMS,
) -> Prediction:
    """Predicted time of one conv launch with ``cfg`` on an H100 SXM-like GPU with ``num_sms`` SMs (the
    module's cost-model constants: H100 SXM datasheet figures per SM, and labelled assumptions).

    GEMM pass: max(compute, bytes / HBM bandwidth). Compute is the busiest SM's: ceil(programs / SMs)
    programs of 2·BLOCK_M·BLOCK_N·BLOCK_K FLOPs per K iteration (masked lanes compute too) at
    ACHIEVABLE_FRACTION of its share of the peak, scaled down for fewer than SATURATING_WARPS resident
    warps and for the tile's shared-memory bytes per FLOP. Bytes: input (counted as M·C_in: exact at
    stride 1), weight, bias, and the output, or with split-K the fp32 partials (4 B x split x M x C_out).
    Split-K adds the epilogue pass (partials read, output written, at DRAM bandwidth) and EXTRA_LAUNCH_S.
    A residual's read is the same in every candidate and left out."""
    elem = dtype.itemsize
    tf32 = dtype == torch.float32
    c_out = c_out_g * groups
    split = max(1, cfg.split_k)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(c_out_g, cfg.block_n) * groups
    programs = tiles * split
    smem = cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * elem
    per_sm = max(1, min(SMEM_PER_SM // (smem + SMEM_RESERVED_PER_PROGRAM), 64 // cfg.num_warps))
    per_busiest = triton.cdiv(programs, num_sms)
    occupancy = min(1.0, min(per_busiest, per_sm) * cfg.num_warps / SATURATING_WARPS)
    tile_factor = min(
        1.0, _smem_bytes_per_flop(GPU_BLOCK_M, GPU_BLOCK_N) / _smem_bytes_per_flop(cfg.block_m, cfg.block_n)
    )
    peak_per_sm = (H100_PEAK_FLOPS_TF32 if tf32 else H100_PEAK_FLOPS_16BIT) / REFERENCE_SMS
    iters = triton.cdiv(_k_iters(c_in_g, r, s, cfg.block_k), split)
    flops = per_busiest * 2 * cfg.block_m * cfg.block_n * cfg.block_k * iters
    compute = flops / (peak_per_sm * ACHIEVABLE_FRACTION * occupancy * tile_factor)
    inputs = elem * (m * c_in_g * groups + r * s * c_in_g * c_out) + 4 * c_out
    out = elem * m * c_out
    if split == 1:
        nbytes = inputs + out
        seconds = max(compute, nbytes / H100_HBM_BYTES_PER_S)
    else:
        partials = 4 * split * m * c_out
        nbytes = inputs + 2 * partials + out
        gemm = max(compute, (inputs + partials) / H100_HBM_BYTES_PER_S)
        seconds = gemm + (partials + out) / H100_HBM_BYTES_PER_S + EXTRA_LAUNCH_S
    return Prediction(
        seconds=seconds,
        compute_s=compute,
        dram_bytes=nbytes,
        programs=programs,
        programs_per_sm=per_sm,
        waves=programs / (per_sm * num_sms),
        sms_busy=min(programs, num_sms),
    )


def _num_sms() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return REFERENCE_SMS


def fit_ieee(cfg: ConvConfig) -> ConvConfig:
    """Exact fp32 dots run on the FMA units, not tensor cores, and hold their operands in registers:
    on sm_90 a 128×128×32 tile (8 warps) spilled at 255 registers and 64×64×32 (4 warps) still
    spilled 32 B at 168; 64×64×16 with 4 warps and 4 stages compiles to 168 registers and no
    spills (dilated 3×3, 256 channels; test_kernel_report)."""
    return ConvConfig(min(cfg.block_m, 64), min(cfg.block_n, 64), min(cfg.block_k, 16), 4, 4)


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    if len(v) != 2:
        raise ValueError(f"conv_bias_act: {name} must be an int or a pair, got {v}")
    return v


def _default_precision() -> str:
    return os.environ.get("FASTRES_FP32_PRECISION", "tf32")


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
    config: ConvConfig | Callable[..., ConvConfig] | None = None,
) -> torch.Tensor:
    """act(conv2d(x, weight) + bias (+ residual) (+ conv2d(shortcut_x, shortcut_weight))) in one kernel.

    x: (N, C_in, H, W) fp32/fp16/bf16, any strides (channels_last coalesces).
    weight: (C_out, C_in/groups, R, S), same dtype as x (prepacked by ``fastres.fold``).
    bias: (C_out,) fp32. residual: (N, C_out, P, Q), any strides and floating dtype.
    shortcut_x, shortcut_weight (C_out, C_in2, 1, 1), shortcut_stride: a projection shortcut, a 1×1
    strided conv accumulated into the same output tile (its folded bias belongs in ``bias``).
    precision: fp32 dot mode, "tf32" (default, or $FASTRES_FP32_PRECISION) or "ieee".
    act: a name in ``_act.ACT_CODES``, with act_a / act_b its arguments (hardtanh min / max, leaky_relu
    slope); ``relu=True/False`` is the older spelling of act="relu" / "identity".
    config: as ``prepare_conv``'s (None: the heuristic; ``fastres.kernels.tuning.conv_bias_act`` looks up
    the tuned tables first).

    >>> y = conv_bias_act(x, w, b, stride=2, padding=1)      # doctest: +SKIP
    """
    launch, out = prepare_conv(
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
        relu=relu,
        shortcut_x=shortcut_x,
        shortcut_weight=shortcut_weight,
        shortcut_stride=shortcut_stride,
        precision=precision,
        out=out,
        config=config,
    )
    return launch(x, residual, shortcut_x, out)


class ConvLaunch:
    """``conv_bias_act`` prepared once for one signature (DESIGN.md, The hot path): checks made, config
    chosen, grid and argument template built, the launch bound after its first run. A call takes the
    tensors that change between calls, which must have the prototype's dtype, shape, strides, device and
    16-byte alignment (the module's launch plan checks its input; the rest are outputs of earlier
    launches of the plan), and returns the output.

    Split-K (``split``): two launches, both prepared here and bound alike: the GEMM pass into an fp32
    workspace, then the epilogue pass (``kernels/epilogue.py``'s ``EpilogueLaunch``). The workspace is
    allocated on each call (``torch.empty``: a block of the caching allocator, no memset), not held: a held
    buffer would be shared by calls that can overlap (two threads or streams running one module, a CUDA
    graph captured while eager calls run), whereas each call's block is stream-ordered by the allocator.

    >>> launch, _ = prepare_conv(x, w, b, padding=1)                        # doctest: +SKIP
    >>> y = launch(x)                                                       # doctest: +SKIP
    """

    __slots__ = (
        "out_shape", "dtype", "device", "template", "bound", "has_residual", "has_shortcut", "ws_shape",
        "epilogue", "out_stride", "ws_stride",
    )  # fmt: skip

    def __init__(
        self,
        out_shape,
        dtype,
        device,
        template,
        bound,
        has_residual,
        has_shortcut,
        ws_shape=None,
        epilogue=None,
    ) -> None:
        self.out_shape = out_shape
        self.dtype = dtype
        self.device = device
        self.template = template  # every kernel argument in parameter order
        self.bound = bound  # a BoundLaunch, or None when there is nothing to compute
        self.has_residual = has_residual
        self.has_shortcut = has_shortcut
        self.ws_shape = ws_shape  # split-K: the fp32 workspace (split_k x batch, C_out, P, Q), else None
        self.epilogue = epilogue  # split-K: the prepared epilogue pass (an EpilogueLaunch), else None
        # channels_last strides of the output and workspace, for torch.empty_strided on each call
        self.out_stride = channels_last_strides(out_shape)
        self.ws_stride = None if ws_shape is None else channels_last_strides(ws_shape)

    def __call__(self, x, residual=None, shortcut_x=None, out=None) -> torch.Tensor:
        # x.new_empty_strided: x has the prototype's dtype and device, and the call is ~0.3 µs cheaper than
        # torch.empty_strided(..., dtype=, device=) (no keyword parsing; CPU, torch 2.14).
        if out is None:
            out = x.new_empty_strided(self.out_shape, self.out_stride)
        if self.bound is None:
            return out
        args = self.template.copy()
        args[0] = x
        args[_X2] = shortcut_x if self.has_shortcut else x
        if self.epilogue is not None:
            ws = args[2].new_empty_strided(self.ws_shape, self.ws_stride)  # args[2]: the fp32 bias
            args[4] = ws
            bound = self.bound
            fast = bound.fast  # BoundLaunch.__call__, inline (one Python call less per launch)
            if fast is None or not fast(args):
                bound.launch(args)
            return self.epilogue(ws, out, residual)
        args[4] = out
        if self.has_residual:
            args[3] = residual
        bound = self.bound
        fast = bound.fast  # BoundLaunch.__call__, inline
        if fast is None or not fast(args):
            bound.launch(args)
        return out


_CL = torch.channels_last
# Positions in the kernel's parameter list of the arguments a ConvLaunch call fills in.
_X2 = 28
_CONV_CONSTEXPRS = (
    "R",
    "S",
    "STRIDE_H",
    "STRIDE_W",
    "PAD_H",
    "PAD_W",
    "DIL_H",
    "DIL_W",
    "HAS_RESIDUAL",
    "HAS_SHORTCUT",
    "SC_STRIDE_H",
    "SC_STRIDE_W",
    "ACT",
    "FLAT_K",
    "DOT_PRECISION",
    "ROUND_TF32",
    "BLOCK_M",
    "BLOCK_N",
    "BLOCK_K",
    "GROUP_M",
    "SPLIT_K",
)


def prepare_conv(
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
    config: ConvConfig | Callable[..., ConvConfig] | None = None,
) -> tuple[ConvLaunch, torch.Tensor]:
    """Everything ``conv_bias_act`` does before the launch, for these tensors as prototypes: returns the
    ``ConvLaunch`` and an output for this call (``out``, or a new channels_last tensor).

    ``config``: a ``ConvConfig``; None for the heuristic (``pick_config``); or a config source
    ``config(x, weight, *, stride, padding, dilation, groups, m, shortcut_c_in, launch)`` asked after the
    checks, which is how the layer above hands in its tables (``fastres.kernels.tuning.prepare_conv``)."""
    stride, padding, dilation = (
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
    )
    if relu is not None:
        act = "relu" if relu else "identity"
    code = act_code(act)
    check_tensor("conv_bias_act", "x", x, ndim=4)
    check_tensor("conv_bias_act", "weight", weight, ndim=4, dtype=x.dtype, device=x.device)
    check_tensor("conv_bias_act", "bias", bias, ndim=1, dtype=torch.float32, device=x.device)
    tl_dtype_ok("conv_bias_act", x.dtype)
    batch, c_in, h, w = x.shape
    c_out, c_in_g, r, s = weight.shape
    if groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(f"conv_bias_act: groups={groups} must divide C_in={c_in} and C_out={c_out}")
    if c_in_g * groups != c_in:
        raise ValueError(f"conv_bias_act: weight expects {c_in_g * groups} input channels, x has {c_in}")
    if bias.shape[0] != c_out:
        raise ValueError(f"conv_bias_act: bias has {bias.shape[0]} entries, expected C_out={c_out}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"conv_bias_act: bad stride={stride} padding={padding} dilation={dilation}")
    p = conv_output_size(h, r, stride[0], padding[0], dilation[0])
    q = conv_output_size(w, s, stride[1], padding[1], dilation[1])
    if p < 1 or q < 1:
        raise ValueError(
            f"conv_bias_act: input {h}x{w} is smaller than the {r}x{s} kernel "
            f"(padding {padding}, dilation {dilation})"
        )
    if residual is not None:
        check_tensor("conv_bias_act", "residual", residual, ndim=4, device=x.device)
        if tuple(residual.shape) != (batch, c_out, p, q):
            raise ValueError(
                f"conv_bias_act: residual shape {tuple(residual.shape)} != output shape "
                f"{(batch, c_out, p, q)}"
            )
    sc_stride = _pair(shortcut_stride, "shortcut_stride")
    if (shortcut_x is None) != (shortcut_weight is None):
        raise ValueError("conv_bias_act: shortcut_x and shortcut_weight go together")
    if shortcut_x is not None:
        check_tensor("conv_bias_act", "shortcut_x", shortcut_x, ndim=4, dtype=x.dtype, device=x.device)
        check_tensor(
            "conv_bias_act", "shortcut_weight", shortcut_weight, ndim=4, dtype=x.dtype, device=x.device
        )
        c_in2 = shortcut_x.shape[1]
        if groups != 1 or tuple(shortcut_weight.shape) != (c_out, c_in2, 1, 1):
            raise ValueError(
                f"conv_bias_act: the shortcut must be a 1x1 conv {(c_out, c_in2, 1, 1)} with groups=1, "
                f"got weight {tuple(shortcut_weight.shape)}, groups={groups}"
            )
        sc_hw = tuple(
            conv_output_size(d, 1, st, 0, 1) for d, st in zip(shortcut_x.shape[2:], sc_stride, strict=True)
        )
        if shortcut_x.shape[0] != batch or sc_hw != (p, q):
            raise ValueError(
                f"conv_bias_act: shortcut_x {tuple(shortcut_x.shape)} with stride {sc_stride} gives "
                f"{sc_hw}, not the output's {(p, q)}"
            )
    if out is None:
        out = torch.empty((batch, c_out, p, q), device=x.device, dtype=x.dtype, memory_format=_CL)
    elif tuple(out.shape) != (batch, c_out, p, q) or out.dtype != x.dtype:
        raise ValueError(f"conv_bias_act: out must be {(batch, c_out, p, q)} {x.dtype}")
    precision = precision or _default_precision()
    if precision not in ("tf32", "ieee"):
        raise ValueError(f"conv_bias_act: precision must be 'tf32' or 'ieee', got {precision!r}")
    m = batch * p * q
    out_shape = (batch, c_out, p, q)
    if m == 0 or c_out == 0:
        return ConvLaunch(out_shape, x.dtype, x.device, None, None, False, False), out
    c_out_g = c_out // groups
    if config is None:
        # The kernel's own heuristic. Tuned tables and the autotune cache are the layer above's
        # (``fastres.kernels.tuning.prepare_conv`` passes its lookup as ``config``): this module
        # imports neither (DESIGN.md, Layers).
        config = pick_config(m, c_out_g, c_in_g, r, s, x.dtype)
    elif callable(config):
        # A config source from the layer above, asked after the checks, with a launcher that runs
        # this conv with a given config (what an autotuner times).
        config = config(
            x,
            weight,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            m=m,
            shortcut_c_in=None if shortcut_x is None else shortcut_x.shape[1],
            launch=lambda c: conv_bias_act(
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
                shortcut_x=shortcut_x,
                shortcut_weight=shortcut_weight,
                shortcut_stride=sc_stride,
                precision=precision,
                out=out,
                config=c,
            ),
        )
    cfg = config
    if x.dtype == torch.float32 and precision == "ieee" and not INTERPRET:
        cfg = fit_ieee(cfg)
    # Without a residual its pointer is never read: a dedicated dummy, not ``out`` (one buffer as a read
    # and a written argument misleads torch.compile), with out's strides (the same specialisation).
    round_tf32 = x.dtype == torch.float32 and precision == "tf32" and x.device.type in TF32_ROUND_DEVICE_TYPES
    ws_shape, epilogue, dst = None, None, out
    if cfg.split_k > 1:
        # Split-K: the kernel stores fp32 partial sums in a workspace of split_k × out's shape (channels_last:
        # slice k is BATCH·stride_on further on); the epilogue pass adds bias and residual, applies the
        # activation. The GEMM pass reads neither, so its flags are off (one compile for every epilogue).
        # The prototype workspace is a meta tensor: its strides are each call's (ConvLaunch allocates).
        ws_shape = (cfg.split_k * batch, c_out, p, q)
        dst = torch.empty(ws_shape, dtype=torch.float32, device="meta", memory_format=_CL)
        epilogue = prepare_bias_act_epilogue(
            dst,
            bias,
            out,
            num_src=cfg.split_k,
            src_split_stride=m * c_out,
            residual=residual,
            act_code=code,
            act_a=act_a,
            act_b=act_b,
            round_tf32=round_tf32,
        )
        residual_in_gemm, code, round_tf32 = None, 0, False
    else:
        residual_in_gemm = residual
    res = (
        residual_in_gemm
        if residual_in_gemm is not None
        else unused_pointer(out if epilogue is None else bias)
    )
    res_strides = residual_in_gemm.stride() if residual_in_gemm is not None else dst.stride()
    x2 = shortcut_x if shortcut_x is not None else x  # never read when HAS_SHORTCUT is False
    w2 = shortcut_weight if shortcut_weight is not None else weight
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(c_out_g, cfg.block_n), groups)
    if cfg.split_k > 1:
        grid = (*grid, cfg.split_k)
    runtime = [
        x,
        weight,
        bias,
        res,
        dst,
        batch,
        h,
        w,
        p,
        q,
        c_in_g,
        c_out_g,
        *x.stride(),
        *weight.stride(),
        *res_strides,
        *dst.stride(),
        x2,
        w2,
        x2.shape[1],
        *x2.stride(),
        w2.stride(0),
        w2.stride(1),
        float(act_a),
        float(act_b),
    ]
    consts = dict(
        R=r,
        S=s,
        STRIDE_H=stride[0],
        STRIDE_W=stride[1],
        PAD_H=padding[0],
        PAD_W=padding[1],
        DIL_H=dilation[0],
        DIL_W=dilation[1],
        HAS_RESIDUAL=residual_in_gemm is not None,
        HAS_SHORTCUT=shortcut_x is not None,
        SC_STRIDE_H=sc_stride[0],
        SC_STRIDE_W=sc_stride[1],
        ACT=code,
        FLAT_K=c_in_g < FLAT_K_MAX_CIN,
        DOT_PRECISION=precision,
        ROUND_TF32=round_tf32,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=GROUP_M,
        SPLIT_K=cfg.split_k,
    )
    template = runtime + [consts[name] for name in _CONV_CONSTEXPRS]
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    kernel = _conv_bias_act_fwd_kernel
    owner = sys.modules[__name__]
    bound = BoundLaunch(owner, kernel, grid, len(runtime), _CONV_CONSTEXPRS, options, x.device)
    if epilogue is not None:
        template[4] = None  # the meta prototype: each call passes its own workspace
    launch = ConvLaunch(
        out_shape,
        x.dtype,
        x.device,
        template,
        bound,
        residual_in_gemm is not None,
        x2 is not x,
        ws_shape,
        epilogue,
    )
    return launch, out
