"""What the fused conv kernel compiles to, per ResNet-50 layer, without a GPU.

For the config each layer would get on a GPU (``pick_config(..., interpret=False)``), the kernel is
specialised exactly as a real launch would specialise it (Triton's own binder: ints equal to 1
become constants, multiples of 16 get divisibility hints) and compiled on the CPU for sm_90 (and
sm_80) with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. From the PTX,
the cubin (cuobjdump/nvdisasm shipped with Triton) and ``ptxas -v`` it reports registers, spills,
shared memory, an occupancy estimate and the tensor-core instructions of the main loop
(sm_90: ``wgmma.mma_async`` / HGMMA; sm_80: ``mma.sync`` / HMMA), and flags spills, missing
tensor-core use and over-sized shared memory.

    python -m benchmarks.kernel_report                       # ResNet-50, batch 1, 2, 32, fp16, sm_90 + sm_80
    python -m benchmarks.kernel_report --archs 90 --out benchmarks/results
    python -m benchmarks.kernel_report --tactics tma_gemm --archs 90 --batch 32 --dtype bf16

``--tactics`` (default ``gather``) adds rows for other tactics (``kernels/tactics.py``) on the layers
they apply to: ``tma_gemm`` compiles the persistent descriptor GEMM for the 1×1 stride-1 layers (and the
strided-view kernel for the standalone 1×1 stride-2 ones; ``tma_gemm_ws`` the same with the K loop
warp-specialised, a config that fails to compile recorded as COMPILE_FAILED, not raised), with
its grid of min(#SMs, tiles) programs, and the report counts its bulk tensor copies (PTX
``cp.async.bulk.tensor``, SASS ``UTMALDG``/``UTMASTG``; flag ``NO_TMA`` when absent). ``tma_conv``
compiles the 4-D-box implicit GEMM for the 3×3 stride-1 layers the same way. For every kernel the
report also says where wgmma reads its A operand (``wgmma_a``, from the TTGIR: "shared" for the SS form,
"registers" when each K step first copies the A tile into registers with ``ldmatrix``; ``ptx_ldmatrix``
counts those copies).

Each gather row also carries the cost model's prediction (``kernels.conv.predict_config``: a roofline
on H100 SXM figures with labelled assumptions, not a measurement) for its config and for the default tile
unsplit, which is how ``pick_config`` chose between them.

Batches 1 and 2 are in the default set: below M = 128 the heuristic picks other tiles (and, before
issue 9, 4 warps for a 128-row tile, which spilled). The batch size itself is not specialised
(``do_not_specialize``), so batches that get the same config share one compile.
Compiles are cached per distinct specialisation (in-process, and in Triton's on-disk cache).
Under TRITON_INTERPRET=1 ``@triton.jit`` yields interpreter objects that cannot be compiled, so the
report re-runs itself in a subprocess with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._bootstrap import ensure_fastres  # noqa: E402

# Per-SM limits used by the occupancy estimate (CUDA C Programming Guide, "Compute capabilities" table):
# registers per SM, shared memory per SM / per block (KiB), max warps and blocks per SM, SM count of the
# reference part (H100 SXM5: 132 SMs; A100 SXM4: 108 SMs).
ARCH_LIMITS = {
    90: {
        "regs": 65536,
        "smem_sm_kib": 228,
        "smem_block_kib": 227,
        "warps": 64,
        "blocks": 32,
        "sms": 132,
        "part": "H100 SXM",
    },
    80: {
        "regs": 65536,
        "smem_sm_kib": 164,
        "smem_block_kib": 163,
        "warps": 64,
        "blocks": 32,
        "sms": 108,
        "part": "A100 SXM",
    },
}
# Register allocation granularity: 256 registers per warp; 1 KiB of shared memory reserved per block.
REG_ALLOC_UNIT = 256
SMEM_RESERVED_PER_BLOCK = 1024


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


@dataclass
class ShortcutVariant:
    """A block tail that also runs its projection shortcut (dual GEMM: ``HAS_SHORTCUT``)."""

    shape: object  # the tail conv's ConvShape
    shortcut: object  # the downsample conv's ConvShape
    count: int = 0

    @property
    def name(self) -> str:
        return f"{self.shape.name} +shortcut {self.shortcut.c}/s{self.shortcut.stride}"


def shortcut_variants(model: str = "resnet50", image: int = 224) -> list[ShortcutVariant]:
    """Every distinct (tail, projection) pair of a torchvision ResNet, derived from its modules."""
    from benchmarks.shapes import model_convs

    convs = dict(model_convs(model, image))
    found: dict[tuple, ShortcutVariant] = {}
    for path, ds in convs.items():
        if not path.endswith(".downsample.0"):
            continue
        block = path[: -len(".downsample.0")]
        tail = convs.get(f"{block}.conv3") or convs[f"{block}.conv2"]
        v = found.setdefault((tail, ds), ShortcutVariant(tail, ds))
        v.count += 1
    return list(found.values())


def launch_args(shape, batch: int, dtype, shortcut=None, sms: int = ARCH_LIMITS[90]["sms"], config=None):
    """Positional args, constexpr kwargs and config, as ``conv_bias_act`` would pass them for ``shape``
    with channels_last activations and a prepacked weight (C_out stride 1), on a part with ``sms`` SMs.
    With split-K (``cfg.split_k`` > 1) this is the GEMM pass: residual, activation and tf32 rounding move
    to the epilogue pass (``kernels/epilogue.py``), and the grid has ``split_k`` programs per tile.
    ``config``: a ``ConvConfig`` in place of the heuristic's (as a tuned table gives one)."""
    import torch
    from triton.runtime.jit import MockTensor

    from fastres.kernels import conv

    n, c, h, w, k, r, s = batch, shape.c, shape.h, shape.w, shape.k, shape.r, shape.s
    p, q, g = shape.p, shape.q, shape.groups
    c_in_g, c_out_g = c // g, k // g
    x_strides = (h * w * c, 1, w * c, c)  # channels_last
    w_strides = (1, k, s * c_in_g * k, c_in_g * k)  # pack_weight: memory order (R, S, C_in, C_out)
    o_strides = (p * q * k, 1, q * k, k)
    m = n * p * q
    cfg = config or conv.pick_config(m, c_out_g, c_in_g, r, s, dtype, interpret=False, groups=g, num_sms=sms)
    split = cfg.split_k > 1
    t = MockTensor(dtype)
    # Runtime arguments by name, so a reordered signature still lines up (without a residual the launcher
    # passes a dummy of out's dtype with out's strides: the same specialisation either way).
    values = dict(
        x_ptr=t,
        w_ptr=t,
        bias_ptr=MockTensor(torch.float32),
        res_ptr=t,
        out_ptr=t,
        BATCH=n,
        H=h,
        W=w,
        P=p,
        Q=q,
        C_IN_G=c_in_g,
        C_OUT_G=c_out_g,
        # Without a projection shortcut x2/w2 alias x/w, as in the launcher.
        x2_ptr=t,
        w2_ptr=t,
        C_IN2=shortcut.c if shortcut is not None else c,
        act_a=0.0,
        act_b=0.0,
    )
    for prefix, strides in (("x", x_strides), ("w", w_strides), ("r", o_strides), ("o", o_strides)):
        dims = "ocrs" if prefix == "w" else "nchw"
        values.update({f"stride_{prefix}{d}": v for d, v in zip(dims, strides, strict=True)})
    if shortcut is None:
        x2_strides, w2_strides = x_strides, w_strides[:2]
    else:
        sc = shortcut
        x2_strides, w2_strides = (sc.h * sc.w * sc.c, 1, sc.w * sc.c, sc.c), (1, sc.k)
    values.update({f"stride_x2{d}": v for d, v in zip("nchw", x2_strides, strict=True)})
    values.update(stride_w2o=w2_strides[0], stride_w2c=w2_strides[1])
    consts = dict(
        R=r,
        S=s,
        STRIDE_H=shape.stride,
        STRIDE_W=shape.stride,
        PAD_H=shape.padding,
        PAD_W=shape.padding,
        DIL_H=shape.dilation,
        DIL_W=shape.dilation,
        # the shortcut replaces the residual; split-K adds it in the epilogue pass
        HAS_RESIDUAL=shape.has_residual and shortcut is None and not split,
        HAS_SHORTCUT=shortcut is not None,
        SC_STRIDE_H=shortcut.stride if shortcut is not None else 1,
        SC_STRIDE_W=shortcut.stride if shortcut is not None else 1,
        ACT=1 if shape.relu and not split else 0,  # kernels/_act.ACT_CODES: relu / identity
        FLAT_K=c_in_g < conv.FLAT_K_MAX_CIN,
        DOT_PRECISION="tf32",
        # fp32 on CUDA rounds its outputs to tf32 (the launcher's TF32_ROUND_DEVICE_TYPES)
        ROUND_TF32=dtype == torch.float32 and not split,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=conv.GROUP_M,
        SPLIT_K=cfg.split_k,
    )
    names = [a for a in conv._conv_bias_act_fwd_kernel.arg_names if a not in consts]
    unknown = [a for a in names if a not in values]
    if unknown:
        raise RuntimeError(f"kernel_report: the conv kernel has new arguments {unknown}; teach launch_args")
    args = [values[a] for a in names]
    import triton

    grid = triton.cdiv(m, cfg.block_m) * triton.cdiv(c_out_g, cfg.block_n) * g * cfg.split_k
    return args, consts, cfg, grid


# tma_gemm_ws: tma_gemm with a warp-specialised K loop (a tuner axis; the report says if it compiles).
TACTICS = ("gather", "tma_gemm", "tma_gemm_ws", "tma_conv")


def tma_gemm_reason(shape, dtype, shortcut=None) -> str | None:
    """``kernels.tma_gemm.applicable``'s shape rules for a ConvShape (channels_last x, packed weight)."""
    from fastres.kernels import tma_gemm

    if shortcut is not None:
        return "projection shortcut"
    if (shape.r, shape.s, shape.padding, shape.groups) != (1, 1, 0, 1) or shape.stride not in (1, 2):
        return "not 1x1/s1 or 1x1/s2"
    item = dtype.itemsize
    if (shape.c * item) % tma_gemm.TMA_ALIGN or (shape.k * item) % tma_gemm.TMA_ALIGN:
        return "channels not 16-byte aligned"
    return None


def tma_launch_args(shape, batch: int, dtype, sms: int = ARCH_LIMITS[90]["sms"], warp_specialize=False):
    """Positional args, constexpr kwargs, config, persistent grid and tile count, as
    ``conv1x1_bias_act`` would pass them: channels_last x, residual and output (descriptor paths); the
    strided kernel for a stride-2 layer. ``warp_specialize``: the config with a warp-specialised K loop."""
    import dataclasses

    import torch
    from triton.runtime.jit import MockTensor

    from fastres.kernels import tma_gemm

    n, c, h, w, k = batch, shape.c, shape.h, shape.w, shape.k
    p, q = shape.p, shape.q
    m = n * p * q
    strided = shape.stride != 1
    out_hw = (p, q) if strided else None
    cfg = tma_gemm.pick_config(m, k, c, dtype, interpret=False, out_hw=out_hw)
    if warp_specialize:
        cfg = dataclasses.replace(cfg, warp_specialize=1)
    t = MockTensor(dtype)
    o_strides = (p * q * k, 1, q * k, k)
    values = dict(
        x_ptr=t,
        w_ptr=t,
        bias_ptr=MockTensor(torch.float32),
        res_ptr=t,
        out_ptr=t,
        M=m,
        BATCH=n,
        H=h,
        W=w,
        P=p,
        Q=q,
        C_IN=c,
        C_OUT=k,
        act_a=0.0,
        act_b=0.0,
    )
    for prefix in ("r", "o"):
        values.update({f"stride_{prefix}{d}": v for d, v in zip("nchw", o_strides, strict=True)})
    consts = dict(
        HAS_RESIDUAL=shape.has_residual,
        RES_DESC=shape.has_residual,
        OUT_DESC=True,
        ACT=1 if shape.relu else 0,  # kernels/_act.ACT_CODES: relu / identity
        DOT_PRECISION="tf32",
        ROUND_TF32=dtype == torch.float32,  # fp32 on CUDA: the launcher's TF32_ROUND_DEVICE_TYPES
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=tma_gemm.GROUP_M,
        WARP_SPECIALIZE=tma_gemm.use_warp_specialize(cfg),
    )
    if strided:
        block_h, block_w = tma_gemm.pixel_box(cfg.block_m, q)
        consts.update(STRIDE_H=shape.stride, STRIDE_W=shape.stride, BLOCK_H=block_h, BLOCK_W=block_w)
        kernel = tma_gemm._conv1x1_strided_bias_act_fwd_kernel
    else:
        consts.update(BLOCK_M=cfg.block_m)
        kernel = tma_gemm._conv1x1_bias_act_fwd_kernel
    names = [a for a in kernel.arg_names if a not in consts]
    unknown = [a for a in names if a not in values]
    if unknown:
        raise RuntimeError(f"kernel_report: tma_gemm has new arguments {unknown}; teach tma_launch_args")
    import triton

    tiles = tma_gemm.m_tiles(cfg, m, batch=n, out_hw=out_hw) * triton.cdiv(k, cfg.block_n)
    grid = tma_gemm.num_programs(cfg, m, k, sms, tiles_m=tiles // triton.cdiv(k, cfg.block_n))
    return [values[a] for a in names], consts, cfg, grid, tiles, kernel


def tma_gemm_ws_launch_args(shape, batch: int, dtype, sms: int = ARCH_LIMITS[90]["sms"]):
    """``tma_launch_args`` with the K loop warp-specialised (``TmaGemmConfig.warp_specialize``)."""
    return tma_launch_args(shape, batch, dtype, sms, warp_specialize=True)


def tma_conv_reason(shape, dtype, shortcut=None) -> str | None:
    """``kernels.tma_conv.applicable``'s shape rules for a ConvShape (channels_last x, packed weight)."""
    from fastres.kernels import tma_conv

    if shortcut is not None:
        return "projection shortcut"
    if (shape.r, shape.s, shape.stride, shape.groups) != (3, 3, 1, 1):
        return "not 3x3/s1"
    item = dtype.itemsize
    if (shape.c * item) % tma_conv.TMA_ALIGN or (shape.k * item) % tma_conv.TMA_ALIGN:
        return "channels not 16-byte aligned"
    return None


def tma_conv_launch_args(shape, batch: int, dtype, sms: int = ARCH_LIMITS[90]["sms"]):
    """Positional args, constexpr kwargs, config, persistent grid and tile count, as
    ``conv3x3_bias_act`` would pass them: channels_last x, residual and output (descriptor paths)."""
    import torch
    from triton.runtime.jit import MockTensor

    from fastres.kernels import tma_conv

    n, c, h, w, k, p, q = batch, shape.c, shape.h, shape.w, shape.k, shape.p, shape.q
    cfg = tma_conv.pick_config(p, q, k, c, dtype, interpret=False)
    t = MockTensor(dtype)
    o_strides = (p * q * k, 1, q * k, k)
    values = dict(
        x_ptr=t,
        w_ptr=t,
        bias_ptr=MockTensor(torch.float32),
        res_ptr=t,
        out_ptr=t,
        BATCH=n,
        H=h,
        W=w,
        P=p,
        Q=q,
        C_IN=c,
        C_OUT=k,
        act_a=0.0,
        act_b=0.0,
    )
    for prefix in ("r", "o"):
        values.update({f"stride_{prefix}{d}": v for d, v in zip("nchw", o_strides, strict=True)})
    consts = dict(
        R=shape.r,
        S=shape.s,
        PAD_H=shape.padding,
        PAD_W=shape.padding,
        DIL_H=shape.dilation,
        DIL_W=shape.dilation,
        HAS_RESIDUAL=shape.has_residual,
        RES_DESC=shape.has_residual,
        OUT_DESC=True,
        ACT=1 if shape.relu else 0,  # kernels/_act.ACT_CODES: relu / identity
        DOT_PRECISION="tf32",
        ROUND_TF32=dtype == torch.float32,  # fp32 on CUDA: the launcher's TF32_ROUND_DEVICE_TYPES
        BLOCK_H=cfg.block_h,
        BLOCK_W=cfg.block_w,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=tma_conv.GROUP_M,
    )
    kernel = tma_conv._conv3x3_bias_act_fwd_kernel
    names = [a for a in kernel.arg_names if a not in consts]
    unknown = [a for a in names if a not in values]
    if unknown:
        raise RuntimeError(f"kernel_report: tma_conv has new arguments {unknown}; teach tma_conv_launch_args")
    tiles = tma_conv.num_tiles(cfg, n, p, q, k)
    return [values[a] for a in names], consts, cfg, tma_conv.num_programs(cfg, tiles, sms), tiles


def chosen_tactic(shape, batch: int, dtype, shortcut, arch: int) -> str:
    """The tactic the lookup picks for this layer on sm_{arch}: ``tactics.choose``'s order
    (``FASTRES_TACTICS``, the default) with the tuned entry of the sm_{arch} table (``$FASTRES_CONFIG_DIR``,
    shipped, autotune cache), each tactic judged by this report's applicability rules (compiled on the
    CPU: no GPU to ask)."""
    from fastres.kernels import tactics, tuning

    fits = {
        "gather": True,
        "cudnn": True,  # any conv, on CUDA with cuDNN
        "tma_gemm": arch >= 90 and tma_gemm_reason(shape, dtype, shortcut) is None,
        "tma_conv": arch >= 90 and tma_conv_reason(shape, dtype, shortcut) is None,
    }
    key = tuning.shape_key(
        shape.c, shape.k, shape.r, shape.s, (shape.stride,) * 2, (shape.padding,) * 2, (shape.dilation,) * 2,
        shape.groups, batch * shape.p * shape.q, dtype, None if shortcut is None else shortcut.c,
    )  # fmt: skip
    entry = tuning.lookup(f"sm_{arch}", key)
    order, explicit = tactics.enabled()
    if entry is not None and fits.get(entry.tactic) and (not explicit or entry.tactic in order):
        return f"{entry.tactic} (tuned)"
    return next(t for t in order if fits.get(t, False))


def predicted(shape, batch: int, dtype, cfg, sms: int) -> dict:
    """The cost model's prediction (``kernels.conv.predict_config``: H100 SXM figures per SM, labelled
    assumptions; not a measurement) for ``cfg`` and for the default tile unsplit, in µs, with waves."""
    from fastres.kernels import conv

    g = shape.groups
    args = (batch * shape.p * shape.q, shape.k // g, shape.c // g, shape.r, shape.s, dtype)
    chosen = conv.predict_config(*args, cfg, groups=g, num_sms=sms)
    default = conv.predict_config(*args, conv.default_tile(*args), groups=g, num_sms=sms)
    return {
        "us": round(chosen.seconds * 1e6, 2),
        "default_us": round(default.seconds * 1e6, 2),
        "default_waves": round(default.waves, 2),
        "waves": round(chosen.waves, 2),
        "sms_busy": chosen.sms_busy,
    }


def specialise(kernel, arch: int, args, consts, cfg):
    """(ASTSource, options, target, cache key) exactly as a launch on ``arch`` would build them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages, debug=False)
    # Triton's own binder (private API, present in 3.2 through 3.8): the same constants and
    # divisibility hints a launch would compute from these argument values.
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    key = (arch, src.hash(), str(sorted(options.__dict__.items())))
    return src, options, target, key


def _ptxas_info(ptx: str, arch_name: str) -> dict:
    """Registers, spill bytes and stack from ``ptxas -v`` on the kernel's PTX."""
    import triton  # noqa: F401

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [
                _tool("ptxas"),
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={arch_name}",
                str(src),
                "-o",
                str(Path(d) / "k.cubin"),
            ],
            capture_output=True,
            text=True,
        )
    log = out.stdout + out.stderr
    info = {"ptxas_rc": out.returncode}
    m = re.search(r"Used (\d+) registers", log)
    info["regs"] = int(m.group(1)) if m else None
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    spills = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    info["spill_store_bytes"], info["spill_load_bytes"] = spills
    m = re.search(r"(\d+) bytes stack frame", log)
    info["stack_bytes"] = int(m.group(1)) if m else None
    return info


def _sass_counts(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True)
    sass = out.stdout
    return {
        "sass_instructions": len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M)),
        "sass_hgmma": len(re.findall(r"\bHGMMA\.", sass)),
        "sass_hmma": len(re.findall(r"\bHMMA\.", sass)),
        "sass_stl": len(re.findall(r"\bSTL\b", sass)),
        "sass_ldl": len(re.findall(r"\bLDL\b", sass)),
        "sass_utmaldg": len(re.findall(r"\bUTMALDG\b", sass)),
        "sass_utmastg": len(re.findall(r"\bUTMASTG\b", sass)),
        "sass_ok": out.returncode == 0 and bool(sass.strip()),
    }


def global_load_widths(ptx: str) -> dict:
    """Global loads by width in bytes ({"16": 12, "4": 3}): plain ``ld.global`` (vector count × element
    bits) and asynchronous ``cp.async`` copies. Wider is better; a lost divisibility hint shows here."""
    widths: dict[str, int] = {}
    for vec, bits in re.findall(r"\bld\.global(?:\.[a-zA-Z0-9:_]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        key = str(int(vec or 1) * int(bits) // 8)
        widths[key] = widths.get(key, 0) + 1
    copies = r"\bcp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)"
    for size in re.findall(copies, ptx):
        key = str(int(size, 0))
        widths[key] = widths.get(key, 0) + 1
    return dict(sorted(widths.items(), key=lambda kv: -int(kv[0])))


def occupancy(arch: int, regs: int, smem: int, num_warps: int) -> dict:
    lim = ARCH_LIMITS[arch]
    per_warp = -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = lim["regs"] // (per_warp * num_warps) if regs else lim["blocks"]
    by_smem = (lim["smem_sm_kib"] * 1024) // (smem + SMEM_RESERVED_PER_BLOCK)
    by_warps = lim["warps"] // num_warps
    blocks = min(by_regs, by_smem, by_warps, lim["blocks"])
    limiter = min(
        (("registers", by_regs), ("shared memory", by_smem), ("warps", by_warps), ("blocks", lim["blocks"])),
        key=lambda t: t[1],
    )[0]
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * num_warps,
        "occupancy": blocks * num_warps / lim["warps"],
        "limited_by": limiter,
    }


def wgmma_operand_a(ttgir: str) -> str:
    """Where the main loop's wgmma reads its A operand, from the TTGIR: "shared" (every
    ``ttng.warp_group_dot`` takes A as a ``!ttg.memdesc``: the SS form, tensor cores read shared memory
    directly), "registers" (A is a ``tensor<...>`` in the dot-operand layout: the RS form, each K step
    first copies the A tile from shared memory into registers with ``ldmatrix``), "mixed", or "-" (none)."""
    kinds = {
        "shared" if ty.startswith("!ttg.memdesc") else "registers"
        for ty in re.findall(r"ttng\.warp_group_dot [^{:\n]*(?:\{[^}\n]*\})?\s*:\s*(\S+)", ttgir)
    }
    if not kinds:
        return "-"
    return kinds.pop() if len(kinds) == 1 else "mixed"


def k_loops(ttgir: str) -> dict:
    """The software pipelining of the loops that hold the dot, from the TTGIR: for each such ``scf.for``
    (main conv, then the shortcut's), its nesting depth (1: a top-level loop over the whole K range; 3: the
    channel loop inside the r and s tap loops, restarted per tap), the async copies in its body
    (``ttg.async_copy_global_to_local``, cp.async; ``ttng.async_tma_copy_global_to_local``, TMA: the
    copies for later iterations, issued while this one's dot runs; 0: not pipelined) and its
    ``ttg.async_wait`` count (cp.async groups left in flight; None for TMA, which waits on barriers).
    ``drains_in_loops``: ``async_wait {num = 0}`` inside a loop, a pipeline emptied on every iteration of an
    outer loop (per tap)."""
    stack: list[dict] = []  # the open scf.for, innermost last
    loops, drains = [], 0
    for line in ttgir.splitlines():
        body = line.lstrip()
        indent = len(line) - len(body)
        if stack and body.startswith("}") and indent == stack[-1]["indent"]:
            done = stack.pop()
            if done["dot"]:
                loops.append({"depth": done["depth"], "copies": done["copies"], "wait": done["wait"]})
            continue
        if stack:
            top = stack[-1]
            top["dot"] |= bool(re.search(r"(?:ttng\.warp_group_dot|tt\.dot) ", body))
            top["copies"] += bool(re.search(r"\.async(?:_tma)?_copy_global_to_local ", body))
            m = re.search(r"ttg\.async_wait .*\{num = (\d+)", body)
            if m:
                top["wait"] = int(m.group(1))
        if re.search(r"ttg\.async_wait\s*(?:[^{]*)\{num = 0 ", body) and stack:
            drains += 1
        if re.search(r"= scf\.for |^scf\.for ", body):
            stack.append({"indent": indent, "depth": len(stack) + 1, "dot": False, "copies": 0, "wait": None})
    return {
        "k_loops": loops,
        "k_loop_depth": max((lp["depth"] for lp in loops), default=0),
        "k_pipelined": bool(loops) and all(lp["copies"] > 0 for lp in loops),
        "drains_in_loops": drains,
    }


def analyse(ck, arch: int, num_warps: int) -> dict:
    ptx = ck.asm["ptx"]
    arch_name = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    info = {
        "arch_name": arch_name,
        "shared_bytes": int(ck.metadata.shared),
        "ptx_wgmma": ptx.count("wgmma.mma_async"),
        "ptx_mma_sync": ptx.count("mma.sync"),
        "ptx_tma": ptx.count("cp.async.bulk.tensor"),
        "ptx_ldmatrix": ptx.count("ldmatrix"),
        "wgmma_a": wgmma_operand_a(ck.asm.get("ttgir", "")),
        "ptx_global_loads": global_load_widths(ptx),
        "ptx_cp_async": len(re.findall(r"\bcp\.async\.c[ag]\.", ptx)),
        **k_loops(ck.asm.get("ttgir", "")),
        **_ptxas_info(ptx, arch_name),
        **_sass_counts(ck.asm["cubin"]),
    }
    info.update(occupancy(arch, info["regs"] or 0, info["shared_bytes"], num_warps))
    flags = []
    if info["spill_store_bytes"] or info["spill_load_bytes"]:
        flags.append("SPILLS")
    tc = info["ptx_wgmma"] + info["ptx_mma_sync"]
    if arch >= 90 and info["ptx_wgmma"] == 0:
        flags.append("NO_WGMMA")
    if tc == 0:
        flags.append("NO_TENSOR_CORES")
    if info["shared_bytes"] > ARCH_LIMITS[arch]["smem_block_kib"] * 1024:
        flags.append("SMEM_OVER_LIMIT")
    if info["regs"] is None:
        flags.append("PTXAS_FAILED")
    info["flags"] = flags
    info["tensor_core"] = "wgmma" if info["ptx_wgmma"] else "mma.sync" if info["ptx_mma_sync"] else "none"
    return info


def _compile_failed(e: Exception) -> dict:
    """The record of a config that does not compile (``tma_gemm_ws``): flag COMPILE_FAILED and the error."""
    return {
        "regs": None, "spill_store_bytes": None, "spill_load_bytes": None, "shared_bytes": 0,
        "tensor_core": "none", "occupancy": 0.0, "limited_by": "-", "ptx_tma": 0, "sass_utmaldg": 0,
        "sass_utmastg": 0, "wgmma_a": "-", "ptx_wgmma": 0, "ptx_mma_sync": 0,
        "flags": ["COMPILE_FAILED"], "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
    }  # fmt: skip


DEFAULT_BATCHES = (1, 2, 32)


def build_report(
    model: str = "resnet50",
    batch: int | tuple[int, ...] = DEFAULT_BATCHES,
    dtype_name: str = "fp16",
    archs=(90, 80),
    image: int = 224,
    layers=None,
    progress=print,
    specialise_sizes: bool = False,
    tactics: tuple[str, ...] = ("gather",),
) -> dict:
    """Compile every distinct conv layer of ``model`` for each arch and batch; one record per
    (layer, arch, batch). Batches with the same config share a compile (sizes are not specialised).
    ``specialise_sizes``: compile a copy of the kernel without ``do_not_specialize``, as Triton would
    specialise it by default, to measure what not specialising costs (benchmarks/NOTES.md).
    ``tactics``: also compile these tactics on the layers they apply to (one record each, ``tactic``)."""
    import triton

    ensure_fastres()
    from benchmarks.common import env_info, torch_dtype
    from benchmarks.shapes import layer_class, unique_layers
    from fastres.kernels import conv

    kernel = conv._conv_bias_act_fwd_kernel
    if not hasattr(kernel, "params"):
        raise RuntimeError("the conv kernel is an interpreter object: run with TRITON_INTERPRET unset")
    if specialise_sizes:
        from triton.runtime.jit import JITFunction

        kernel = JITFunction(kernel.fn)
    dtype = torch_dtype(dtype_name)
    batches = (batch,) if isinstance(batch, int) else tuple(batch)
    infos = layers if layers is not None else unique_layers((model,), image) + shortcut_variants(model, image)
    cache: dict = {}
    records = []
    t_all = time.monotonic()
    unknown = [t for t in tactics if t not in TACTICS]
    if unknown:
        raise ValueError(f"kernel_report: unknown tactic(s) {unknown}; known: {', '.join(TACTICS)}")
    for arch, batch, li in ((a, b, li) for a in archs for b in batches for li in infos):
        shape = li.shape
        shortcut = getattr(li, "shortcut", None)
        for tactic in tactics:
            if tactic == "gather":
                args, consts, cfg, grid = launch_args(
                    shape, batch, dtype, shortcut=shortcut, sms=ARCH_LIMITS[arch]["sms"]
                )
                tiles, compiled = grid, kernel
            else:
                # The copy engine and the descriptors are sm_90's; other layers are gather's alone.
                reason, launch = {
                    "tma_gemm": (tma_gemm_reason, tma_launch_args),
                    "tma_gemm_ws": (tma_gemm_reason, tma_gemm_ws_launch_args),
                    "tma_conv": (tma_conv_reason, tma_conv_launch_args),
                }[tactic]
                if arch < 90 or reason(shape, dtype, shortcut) is not None:
                    continue
                args, consts, cfg, grid, tiles, *which = launch(shape, batch, dtype, ARCH_LIMITS[arch]["sms"])
                from fastres.kernels import tma_conv

                # tma_gemm's launch args name their kernel (the flat or the strided one).
                compiled = which[0] if which else tma_conv._conv3x3_bias_act_fwd_kernel
            src, options, target, key = specialise(compiled, arch, args, consts, cfg)
            t0 = time.monotonic()
            hit = key in cache
            if not hit:
                try:
                    ck = triton.compile(src, target=target, options=options.__dict__)
                    cache[key] = analyse(ck, arch, cfg.num_warps)
                except Exception as e:  # noqa: BLE001 - a tuner axis may not compile: report it, go on
                    if tactic != "tma_gemm_ws":
                        raise
                    cache[key] = _compile_failed(e)
            info = dict(cache[key])
            lim = ARCH_LIMITS[arch]
            if tactic == "gather":
                waves = grid / max(1, info["blocks_per_sm"] * lim["sms"])
            else:
                # Persistent: one program per SM walks tiles / programs tiles (the fraction is the tail).
                waves = tiles / grid
                if not (info["ptx_tma"] and info["sass_utmaldg"]) and "COMPILE_FAILED" not in info["flags"]:
                    info["flags"] = [*info["flags"], "NO_TMA"]
            if tactic == "gather":
                info["predicted"] = predicted(shape, batch, dtype, cfg, lim["sms"])
            rec = {
                "layer": li.name if shortcut is not None else shape.name,
                "class": layer_class(shape) + (" +shortcut" if shortcut is not None else ""),
                "tactic": tactic,
                "count": li.count,
                "arch": arch,
                "batch": batch,
                "dtype": dtype_name,
                "gemm_mnk": list(shape.gemm(batch)),
                "grid": grid,
                "tiles": tiles,
                "waves": round(waves, 2),
                "config": {
                    "block_m": cfg.block_m,
                    "block_n": cfg.block_n,
                    "block_k": cfg.block_k,
                    "num_warps": cfg.num_warps,
                    "num_stages": cfg.num_stages,
                    "split_k": getattr(cfg, "split_k", 1),
                    "flat_k": consts.get("FLAT_K", False),
                    "warp_specialize": bool(consts.get("WARP_SPECIALIZE", False)),
                    # tma_conv's output pixel box (block_m = block_h x block_w)
                    **({"block_h": cfg.block_h, "block_w": cfg.block_w} if hasattr(cfg, "block_h") else {}),
                },
                "chosen": chosen_tactic(shape, batch, dtype, shortcut, arch),
                "compile_s": round(time.monotonic() - t0, 2),
                "cached": hit,
                **info,
            }
            records.append(rec)
            label = "" if tactic == "gather" else f" [{tactic}]"
            progress(
                f"  sm_{arch} b{batch:<3} {shape.name + label:<44} regs {info['regs']!s:>4} "
                f"spill {info['spill_store_bytes']!s:>5}B "
                f"smem {info['shared_bytes'] // 1024:>4}KiB {info['tensor_core']:<8} occ "
                f"{info['occupancy']:.2f} tma {info['ptx_tma']} A {info['wgmma_a']} "
                f"K {_k_loops_cell(info)} {' '.join(info['flags'])}"
                f"{' (cached)' if hit else ''}"
            )
    return {
        "env": env_info(),
        "args": {
            "model": model,
            "batch": list(batches),
            "dtype": dtype_name,
            "archs": list(archs),
            "image": image,
            "specialise_sizes": specialise_sizes,
            "tactics": list(tactics),
        },
        "limits": ARCH_LIMITS,
        "distinct_compiles": len(cache),
        "elapsed_s": round(time.monotonic() - t_all, 1),
        "records": records,
    }


def to_markdown(doc: dict) -> str:
    a = doc["args"]
    batches = a["batch"] if isinstance(a["batch"], list) else [a["batch"]]
    # The tactic and TMA columns appear when a tactic other than gather is in the report.
    multi = any(r.get("tactic", "gather") != "gather" for r in doc["records"])
    head = "| arch | batch | layer | class | " + ("tactic | " if multi else "")
    head += "config (BMxBNxBK w/s) | regs | spill B | smem KiB | tensor core | "
    head += "TMA (PTX/UTMALDG/UTMASTG) | wgmma A | " if multi else ""
    head += "K loops (depth/copies/wait; drains) | "
    lines = [
        f"### Kernel report: {a['model']} at {a['image']}, batch {', '.join(map(str, batches))}, "
        f"{a['dtype']} (compiled on the CPU, triton {doc['env']['triton']})",
        "",
        head + "occupancy | waves | predicted µs (default tile unsplit) | flags | lookup picks |",
        "|---" * (15 + 3 * multi) + "|",
    ]
    for r in doc["records"]:
        c = r["config"]
        tactic = f"{r.get('tactic', 'gather')} | " if multi else ""
        tc = r["tensor_core"] + (
            f" | {r.get('ptx_tma', 0)}/{r.get('sass_utmaldg', 0)}/{r.get('sass_utmastg', 0)}"
            f" | {r.get('wgmma_a', '-')}"
            if multi
            else ""
        )
        c_box = f"{c['block_h']}x{c['block_w']}px " if "block_h" in c else ""
        lines.append(
            f"| sm_{r['arch']} | {r['batch']} | {r['layer']} | {r['class']} | {tactic}"
            f"{c_box}{c['block_m']}x{c['block_n']}x{c['block_k']} "
            f"{c['num_warps']}/{c['num_stages']} | {r['regs']} | {r['spill_store_bytes']} | "
            f"{r['shared_bytes'] / 1024:.0f} | {tc} | {_k_loops_cell(r)} | {r['occupancy']:.2f} "
            f"({r['limited_by']}) | {r['waves']} | {_predicted_cell(r.get('predicted'))} | "
            f"{' '.join(r['flags']) or '-'} | {r.get('chosen', '-')} |"
        )
    flagged = sorted({(r["arch"], f) for r in doc["records"] for f in r["flags"]})
    lines += ["", "Flags: " + (", ".join(f"sm_{a}: {f}" for a, f in flagged) if flagged else "none")]
    return "\n".join(lines) + "\n"


def _k_loops_cell(r: dict) -> str:
    """``d1/c2/w4, d1/c2/w4; 0``: each dot loop's nesting depth, in-loop async copies and wait count, then
    the pipelines drained inside a loop (``k_loops``)."""
    loops = r.get("k_loops")
    if loops is None:
        return "-"
    each = ", ".join(f"d{lp['depth']}/c{lp['copies']}/w{lp['wait']}" for lp in loops)
    return f"{each or 'none'}; {r.get('drains_in_loops', 0)}"


def _predicted_cell(p: dict | None) -> str:
    if not p:
        return "-"
    return f"{p['us']} ({p['default_us']}, {p['default_waves']} waves)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument(
        "--batch",
        default=",".join(map(str, DEFAULT_BATCHES)),
        help="comma list of batch sizes (default %(default)s: small batches pick other tiles)",
    )
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "tf32"])
    ap.add_argument("--archs", default="90,80", help="comma list of compute capabilities (90, 80)")
    ap.add_argument(
        "--specialise-sizes",
        action="store_true",
        help="compile without do_not_specialize (Triton's default) to compare the generated code",
    )
    ap.add_argument(
        "--tactics",
        default="gather",
        help="comma list of tactics to compile (gather, tma_gemm, tma_gemm_ws, tma_conv), each on the layers "
        "it fits",
    )
    ap.add_argument("--only", default=None, help="comma list of layer names (as shapes.py prints them)")
    ap.add_argument("--out", default=None, help="folder or .json path (default benchmarks/results/)")
    ap.add_argument("--md", default=None, help="markdown path (default: next to the JSON)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.kernel_report",
            *(argv if argv is not None else sys.argv[1:]),
        ]
        repo = str(Path(__file__).resolve().parent.parent)
        return subprocess.run(cmd, env=env, cwd=repo).returncode
    from benchmarks.common import write_run

    layers = None
    if args.only:
        from benchmarks.shapes import unique_layers

        wanted = [n.strip() for n in args.only.split(",")]
        by_name = {li.shape.name: li for li in unique_layers((args.model,))}
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise SystemExit(f"unknown layer(s) {missing}; known: {sorted(by_name)}")
        layers = [by_name[n] for n in wanted]
    doc = build_report(
        args.model,
        tuple(int(b) for b in args.batch.split(",")),
        args.dtype,
        tuple(int(a) for a in args.archs.split(",")),
        layers=layers,
        specialise_sizes=args.specialise_sizes,
        tactics=tuple(t.strip() for t in args.tactics.split(",") if t.strip()),
    )
    path = write_run(doc, args.out, "kernel_report")
    md = Path(args.md) if args.md else path.with_suffix(".md")
    md.write_text(to_markdown(doc))
    print(to_markdown(doc))
    print(f"wrote {path} and {md} ({doc['distinct_compiles']} distinct compiles, {doc['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
