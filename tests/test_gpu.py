"""Checks that need a CUDA GPU to be trusted: tf32 / fp16 / bf16 numerics on hardware, num_warps.

Skipped without CUDA (see conftest); run by benchmarks/gpu_check.sh on a GPU machine.
"""

import pytest
import torch
import torchvision

import fastres
from fastres.fold import fold_conv_bn
from fastres.kernels.conv import ConvConfig, conv_bias_act, pick_config
from fastres.testing import assert_close, count_launches, randomize_bn

from test_kernels import SHAPES, make_conv_bn, reference

pytestmark = pytest.mark.gpu

# (dtype, precision, per-layer limit, whole-model limit) from DESIGN.md's numerics table.
GPU_NUMERICS = [
    (torch.float32, "tf32", 2e-3, 5e-3),
    (torch.float32, "ieee", 1e-5, 1e-4),
    (torch.float16, "tf32", 5e-3, 1e-2),
    (torch.bfloat16, "tf32", 2e-2, 3e-2),
]


def _run_layer(shape, dtype, precision, residual, config=None):
    _, n, c_in, h, w, c_out, r, stride, padding, dilation, groups = shape
    conv, bn = make_conv_bn(c_in, c_out, r, stride, padding, dilation, groups, conv_bias=residual)
    x = torch.randn(n, c_in, h, w).to(memory_format=torch.channels_last)
    p = (h + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    q = (w + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    res = torch.randn(n, c_out, p, q) if residual else None
    xd = x.to(dtype)
    ref = reference(xd, conv.to(dtype), bn.to(dtype), None if res is None else res.to(dtype), True)
    folded = fold_conv_bn(conv.float().cuda(), bn.float().cuda(), dtype, precision=precision)
    out = torch.full((n, c_out, p, q), float("nan"), dtype=dtype, device="cuda")
    y = conv_bias_act(
        xd.cuda(),
        folded.weight,
        folded.bias,
        residual=None if res is None else res.to("cuda", dtype),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        relu=True,
        precision=precision,
        out=out.to(memory_format=torch.channels_last),
        config=config,
    )
    torch.cuda.synchronize()
    assert not y.isnan().any(), "an output element was never written"
    return y, ref


def elementwise(ref: torch.Tensor, rel: float) -> dict:
    """The per-element half of a check at norm bound ``rel``: |out - ref| <= 4·rel·rms(ref) + 2·rel·|ref|.
    The norm bound holds the RMS error to rel·rms(ref), so a single element 4x past it (or 2·rel
    relative) is an outlier no rounding explains; a fixed atol of 10-50x the bound (1.5 for bf16 in a
    whole model) caught nothing."""
    rms = float(ref.double().pow(2).mean().sqrt())
    return dict(rel=rel, atol=4 * rel * rms, rtol=2 * rel)


# One compile per case, and the GPU check has minutes: every layer class (tests/test_kernels.SHAPES)
# in fp16, the dtype the benchmarks lead with; bf16 and tf32 on one representative of each K-loop
# kind (flattened-K stem, per-tap 3×3 stride 2, strided 1×1 projection); exact fp32 on a 3×3 and a 1×1.
_BY_NAME = {s[0]: s for s in SHAPES}
_MODE = {(m[0], m[1]): m for m in GPU_NUMERICS}
LAYER_CASES = (
    [(s, *_MODE[(torch.float16, "tf32")]) for s in SHAPES]
    + [
        (_BY_NAME[n], *_MODE[mode])
        for mode in ((torch.bfloat16, "tf32"), (torch.float32, "tf32"))
        for n in ("stem7x7s2", "3x3s2", "1x1s2_proj")
    ]
    + [(_BY_NAME[n], *_MODE[(torch.float32, "ieee")]) for n in ("3x3s1", "1x1s1")]
)


@pytest.mark.parametrize(
    "shape, dtype, precision, layer_rel, _model_rel",
    LAYER_CASES,
    ids=[f"{c[0][0]}-{str(c[1])[6:]}-{c[2]}" for c in LAYER_CASES],
)
def test_layer_numerics_on_gpu(shape, dtype, precision, layer_rel, _model_rel):
    y, ref = _run_layer(shape, dtype, precision, True)
    assert_close(y, ref, **elementwise(ref, layer_rel), what=f"{shape[0]} {dtype} {precision}")


# Real ResNet-50 layer shapes at batch 2, one per K-loop kind (the flattened-K stem, a per-tap 3×3,
# a strided 1×1 projection), for the compiled configs at every num_warps the tables may choose.
RESNET50_LAYERS = [
    ("r50_stem", 2, 3, 224, 224, 64, 7, 2, 3, 1, 1),
    ("r50_l1_3x3", 2, 64, 56, 56, 64, 3, 1, 1, 1, 1),
    ("r50_proj_s2", 2, 1024, 14, 14, 2048, 1, 2, 0, 1, 1),
]


@pytest.mark.parametrize("num_warps", [2, 4, 8])
@pytest.mark.parametrize("shape", RESNET50_LAYERS, ids=[s[0] for s in RESNET50_LAYERS])
def test_num_warps_sweep_matches_reference(shape, num_warps):
    """Flattened / per-tap K loops have miscompiled at some num_warps in Triton: sweep them."""
    _, n, c_in, h, w, c_out, r, stride, padding, dilation, groups = shape
    p = (h + 2 * padding - r) // stride + 1
    base = pick_config(n * p * p, c_out // groups, c_in // groups, r, r, torch.float16, interpret=False)
    cfg = ConvConfig(
        base.block_m, base.block_n, base.block_k, num_warps=num_warps, num_stages=base.num_stages
    )
    y, ref = _run_layer(shape, torch.float16, "tf32", True, config=cfg)
    assert_close(y, ref, **elementwise(ref, 5e-3), what=f"{shape[0]} warps={num_warps}")


# Whole models: ResNet-50 in fp16 (the benchmarks' first plan: its kernels are then in the Triton
# cache), ResNet-18 for the other modes (fewer distinct convs: fewer compiles). The conv launches
# are counted: every conv fused, projection shortcuts riding in their block's tail (dual GEMM).
WHOLE_MODEL_CASES = [("resnet50", *_MODE[(torch.float16, "tf32")], 53 - 4)] + [
    ("resnet18", *_MODE[mode], 20 - 3)
    for mode in ((torch.bfloat16, "tf32"), (torch.float32, "tf32"), (torch.float32, "ieee"))
]


@pytest.mark.parametrize(
    "arch, dtype, precision, _layer_rel, model_rel, conv_launches",
    WHOLE_MODEL_CASES,
    ids=[f"{c[0]}-{str(c[1])[6:]}-{c[2]}" for c in WHOLE_MODEL_CASES],
)
def test_whole_model_on_gpu(arch, dtype, precision, _layer_rel, model_rel, conv_launches, monkeypatch):
    monkeypatch.setenv("FASTRES_FP32_PRECISION", precision)
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, arch)()).eval().cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = model.double()(x.double())
    model.to(dtype)
    fast = fastres.convert(model)
    with torch.inference_mode(), count_launches() as launches:
        y = fast(x.to(dtype))
    assert y.dtype == dtype
    assert launches.count_of("_conv_bias_act_fwd_kernel") == conv_launches, launches
    assert_close(y, ref, **elementwise(ref, model_rel), what=f"{arch} {dtype} {precision}")


@pytest.mark.parametrize("dtype, rel", [(torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
def test_dual_gemm_tail_on_gpu(dtype, rel):
    """ResNet-50 layer2.0's tail: 1×1 128→512 on 28×28 plus the 256→512 stride-2 shortcut, one kernel."""
    conv3, bn3 = make_conv_bn(128, 512, 1, 1, 0, 1, 1)
    conv_ds, bn_ds = make_conv_bn(256, 512, 1, 2, 0, 1, 1)
    x = torch.randn(4, 256, 56, 56).to(dtype).to(memory_format=torch.channels_last)
    y = torch.randn(4, 128, 28, 28).to(dtype).to(memory_format=torch.channels_last)
    short = reference(x, conv_ds.to(dtype), bn_ds.to(dtype), None, False)
    ref = reference(y, conv3.to(dtype), bn3.to(dtype), short, True)
    main = fold_conv_bn(conv3.float().cuda(), bn3.float().cuda(), dtype)
    sc = fold_conv_bn(conv_ds.float().cuda(), bn_ds.float().cuda(), dtype)
    out = conv_bias_act(
        y.cuda(),
        main.weight,
        main.bias + sc.bias,
        shortcut_x=x.cuda(),
        shortcut_weight=sc.weight,
        shortcut_stride=2,
    )
    assert_close(out, ref, **elementwise(ref, rel), what=f"dual GEMM {dtype}")
