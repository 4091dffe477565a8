"""tma_conv (3×3 stride-1 and dilated convs as an implicit GEMM over 4-D tensor-descriptor boxes).

Numerics against the unfolded float64 reference (conv → BN(eval, randomised) → (+residual) → activation)
for the ResNet-50 3×3 stride-1 layer classes at reduced spatial size, dilated (DeepLabV3) and odd shapes;
every output element written exactly once (NaN-poisoned outputs, a residual aliased by the output);
the box zero fill as padding at every edge; the applicability edges falling back through
``kernels.tactics``; the GPU config heuristic.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastres.fold import fold_conv_bn, pack_weight, round_tf32
from fastres.kernels import conv as gather
from fastres.kernels import tactics, tma_conv
from fastres.kernels.tma_conv import TmaConvConfig, applicable, conv3x3_bias_act, pick_config, pixel_box
from fastres.testing import assert_close

# (dtype, per-layer rel limit (DESIGN.md numerics: interpreter fp32, fp16), atol, rtol) per element.
FP32 = (torch.float32, 1e-5, 1e-4, 1e-4)
FP16 = (torch.float16, 5e-3, 2e-2, 1e-2)

# Eager activations in float64 (kernels/_act.py codes), with the launcher's act_a / act_b.
ACTS = {
    "relu": (torch.relu, 0.0, 0.0),
    "identity": (lambda y: y, 0.0, 0.0),
    "hardtanh": (lambda y: F.hardtanh(y, -0.5, 1.0), -0.5, 1.0),
    "silu": (F.silu, 0.0, 0.0),
    "leaky_relu": (lambda y: F.leaky_relu(y, 0.1), 0.1, 0.0),
}

# (name, N, C_in, H, W, C_out, padding, dilation, residual, act): the ResNet-50 3×3 stride-1 classes
# (each stage's bottleneck conv2: 64, 128, 256, 512 channels) at 5×7 / 3×3 and other small maps, batch 1
# and 2; the ResNet-18 basic-block conv2 with its residual; DeepLabV3's dilated layer4 (dilation 2,
# padding 2); odd maps (9×11, 1×5, a 2×2 map smaller than the dilated kernel's reach); C_in = 20, fp32:
# a K block of 32 channels overhangs the tensor, so both boxes must zero-fill it.
SHAPES = [
    ("64->64 b2 5x7", 2, 64, 5, 7, 64, 1, 1, False, "relu"),
    ("128->128+res b1 6x6", 1, 128, 6, 6, 128, 1, 1, True, "relu"),
    ("256->256 b1 5x7 identity", 1, 256, 5, 7, 256, 1, 1, False, "identity"),
    ("512->512+res b1 3x3", 1, 512, 3, 3, 512, 1, 1, True, "relu"),
    ("512->512 dil2 b1 7x5 hardtanh", 1, 512, 7, 5, 512, 2, 2, False, "hardtanh"),
    ("256->256+res dil2 b2 2x2", 2, 256, 2, 2, 256, 2, 2, True, "silu"),
    ("odd 32->48 b2 9x11 leaky", 2, 32, 9, 11, 48, 1, 1, False, "leaky_relu"),
    ("odd 20->24+res b1 3x5 partial K", 1, 20, 3, 5, 24, 1, 1, True, "relu"),
    ("odd 32->32 b1 1x5", 1, 32, 1, 5, 32, 1, 1, False, "relu"),
]


def make_conv_bn(c_in, c_out, padding=1, dilation=1, conv_bias=False):
    conv = nn.Conv2d(c_in, c_out, 3, 1, padding, dilation=dilation, bias=conv_bias)
    bn = nn.BatchNorm2d(c_out)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return conv.eval(), bn.eval()


def reference(x, conv, bn, residual, act="relu"):
    """The unfolded module chain in float64 on the CPU."""
    with torch.no_grad():
        y = bn.double().cpu()(conv.double().cpu()(x.double().cpu()))
        if residual is not None:
            y = y + residual.double().cpu()
        return ACTS[act][0](y)


def poisoned(shape, dtype, channels_last=True):
    out = torch.full(shape, float("nan"), dtype=dtype)
    return out.to(memory_format=torch.channels_last) if channels_last else out


def _nhwc(n, c, h, w, dtype=torch.float32):
    return torch.randn(n, c, h, w, dtype=dtype).to(memory_format=torch.channels_last)


def _run_case(shape, dtype, rel, atol, rtol, config=None):
    name, n, c_in, h, w, c_out, pad, dil, has_res, act = shape
    conv, bn = make_conv_bn(c_in, c_out, pad, dil, conv_bias=has_res)
    x = _nhwc(n, c_in, h, w, dtype)
    p, q = gather.conv_output_size(h, 3, 1, pad, dil), gather.conv_output_size(w, 3, 1, pad, dil)
    # The residual in the other float dtype, NCHW-contiguous: the strided epilogue load and its cast.
    res = torch.randn(n, c_out, p, q).to(torch.float16 if dtype == torch.float32 else torch.float32)
    res = res if has_res else None
    folded = fold_conv_bn(conv, bn, dtype, precision="ieee")
    assert applicable(x, folded.weight, 1, pad, dil) is None
    out = poisoned((n, c_out, p, q), dtype)
    fn, a, b = ACTS[act]
    y = conv3x3_bias_act(
        x, folded.weight, folded.bias, residual=res, padding=pad, dilation=dil, act=act, act_a=a, act_b=b,
        precision="ieee", out=out, config=config,
    )  # fmt: skip
    assert y.data_ptr() == out.data_ptr()
    assert not y.isnan().any(), f"{name}: an output element was never written"
    # fp16 inputs are rounded before the kernel sees them; the reference sees the same values (and, for
    # fp16, the fp16-rounded weights the kernel holds), in fp64.
    assert_close(
        y, reference(x, conv.to(dtype).float(), bn, res, act), rel=rel, atol=atol, rtol=rtol, what=name
    )
    return y


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_tma_conv_matches_unfolded_reference(shape):
    _run_case(shape, *FP32)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]], ids=[SHAPES[0][0], SHAPES[4][0]])
def test_tma_conv_fp16_matches_unfolded_reference(shape):
    _run_case(shape, *FP16)


# (config, why): box shapes and grids the interpreter's heuristic does not pick. Each walks several tiles
# per program over a 2 × 64 × 9 × 13 input (box origins off every edge, partial boxes at the bottom/right).
CONFIGS = [
    (TmaConvConfig(1, 16, 32, 16, num_programs=3), "row box 1x16 (the GPU's SS form), 2 column tiles, K 16"),
    (TmaConvConfig(4, 4, 64, 32, num_programs=1), "4x4 boxes, one program walks all 12 tiles"),
    (TmaConvConfig(2, 8, 16, 64, num_programs=7), "2x8 boxes, 4 column tiles, 7 programs"),
]


@pytest.mark.parametrize("cfg, why", CONFIGS, ids=[c[1].split(",")[0] for c in CONFIGS])
def test_any_box_and_grid_computes_every_tile_once(cfg, why):
    """The output aliases the residual (each tile reads its residual box, then stores over it): a tile
    computed twice would add the residual twice; one never computed would keep the residual."""
    n, c_in, h, w, c_out = 2, 64, 9, 13, 64
    conv, bn = make_conv_bn(c_in, c_out)
    x = _nhwc(n, c_in, h, w)
    res = _nhwc(n, c_out, h, w)
    folded = fold_conv_bn(conv, bn, torch.float32, precision="ieee")
    ref = reference(x, conv, bn, res)
    inplace = res.clone()
    y = conv3x3_bias_act(
        x, folded.weight, folded.bias, residual=inplace, padding=1, precision="ieee", out=inplace, config=cfg
    )
    assert_close(y, ref, rel=1e-5, atol=1e-4, rtol=1e-4, what=why)


@pytest.mark.parametrize(
    "res_layout, out_layout", [("nchw", "nchw"), ("channels_last", "nchw"), (None, "nchw")]
)
def test_strided_epilogue_paths(res_layout, out_layout):
    """Residual through strided loads or a descriptor; the output through the masked pointer store (an NCHW
    ``out``); identity activation, so negative values must survive."""
    n, c_in, h, w, c_out = 2, 32, 5, 6, 40
    conv, bn = make_conv_bn(c_in, c_out)
    x = _nhwc(n, c_in, h, w)
    res = None if res_layout is None else torch.randn(n, c_out, h, w)
    if res_layout == "channels_last":
        res = res.to(memory_format=torch.channels_last)
    folded = fold_conv_bn(conv, bn, torch.float32, precision="ieee")
    out = poisoned((n, c_out, h, w), torch.float32, channels_last=out_layout == "channels_last")
    cfg = TmaConvConfig(2, 8, 16, 32, num_programs=3)  # partial boxes, several column tiles
    y = conv3x3_bias_act(
        x, folded.weight, folded.bias, residual=res, act="identity", precision="ieee", out=out, config=cfg
    )
    assert not y.isnan().any() and (y < 0).any()
    assert_close(
        y, reference(x, conv, bn, res, "identity"), rel=1e-5, atol=1e-4, rtol=1e-4, what=str(res_layout)
    )


def test_padding_is_the_zero_fill_at_every_edge():
    """A constant input and an all-ones weight: each output is (number of in-image taps) × C_in. Padding 1
    and padding 2 with dilation 2 on a 4×5 map: corners, edges and the interior count 4, 6 and 9 taps."""
    c = 16
    w = pack_weight(torch.ones(c, c, 3, 3))
    x = torch.ones(1, c, 4, 5).to(memory_format=torch.channels_last)
    for pad, dil in ((1, 1), (2, 2)):
        y = conv3x3_bias_act(
            x, w, torch.zeros(c), padding=pad, dilation=dil, act="identity", precision="ieee"
        )
        expected = F.conv2d(x, w, padding=pad, dilation=dil)
        assert torch.equal(y, expected), (pad, dil)
        assert {int(v) for v in y[0, 0].unique() / c} == ({4, 6, 9} if dil == 1 else {4, 6})


def test_fp32_output_rounded_to_tf32_when_the_device_asks(monkeypatch):
    """ROUND_TF32 reaches the kernel: listed as a tf32 device, the CPU gets round_tf32(exact result)."""
    conv, bn = make_conv_bn(32, 32)
    x = _nhwc(1, 32, 4, 4)
    folded = fold_conv_bn(conv, bn, torch.float32, precision="ieee")
    exact = conv3x3_bias_act(x, folded.weight, folded.bias, precision="tf32")  # CPU: no rounding
    monkeypatch.setattr(tma_conv, "TF32_ROUND_DEVICE_TYPES", ("cpu",))
    rounded = conv3x3_bias_act(x, folded.weight, folded.bias, precision="tf32")
    assert not torch.equal(exact, rounded), "rounding changed nothing: the flag did not reach the kernel"
    assert torch.equal(rounded, round_tf32(exact))


def _packed(c_out, c_in, r=3, groups=1, dtype=torch.float32):
    return pack_weight(torch.randn(c_out, c_in // groups, r, r, dtype=dtype))


# (case, x, w, conv kwargs, a phrase the reason must contain)
NOT_APPLICABLE = [
    ("fp16 C_in=12", _nhwc(1, 12, 5, 5, torch.float16), _packed(16, 12, dtype=torch.float16), {},
     "x rows of C_in=12 x 2 B"),
    ("fp32 C_in=6", _nhwc(1, 6, 5, 5), _packed(16, 6), {}, "x rows of C_in=6 x 4 B"),
    ("fp16 C_out=12", _nhwc(1, 16, 5, 5, torch.float16), _packed(12, 16, dtype=torch.float16), {},
     "weight rows of C_out=12"),
    ("stride2", _nhwc(1, 16, 6, 6), _packed(16, 16), {"stride": 2}, "stride (2, 2)"),
    ("groups", _nhwc(1, 16, 5, 5), _packed(16, 16, groups=2), {"groups": 2}, "groups=2"),
    ("nchw_x", torch.randn(1, 16, 5, 5), _packed(16, 16), {}, "not channels_last-contiguous"),
    ("sliced_channels", _nhwc(1, 32, 5, 5)[:, :16], _packed(16, 16), {}, "not channels_last-contiguous"),
    ("1x1", _nhwc(1, 16, 5, 5), _packed(16, 16, r=1), {}, "1x1 kernel"),
    ("5x5", _nhwc(1, 16, 5, 5), _packed(16, 16, r=5), {}, "5x5 kernel"),
    ("unpacked_weight", _nhwc(1, 16, 5, 5), torch.randn(16, 16, 3, 3), {}, "not the packed layout"),
    ("dtype_mismatch", _nhwc(1, 16, 5, 5), _packed(16, 16, dtype=torch.float16), {}, "dtypes"),
]  # fmt: skip


@pytest.mark.parametrize("case, x, w, kwargs, reason", NOT_APPLICABLE, ids=[c[0] for c in NOT_APPLICABLE])
def test_not_applicable_falls_back_to_gather(case, x, w, kwargs, reason):
    kwargs = {"padding": 1, **kwargs}
    why = applicable(x, w, **kwargs)
    assert why is not None and reason in why, f"{case}: {why!r}"
    # The registry says the same and falls back to gather even when tma_conv is preferred.
    name, because = tactics.choose(x, w, env="tma_conv,gather", **kwargs)
    assert name == "gather" and reason in because, (name, because)


def test_misaligned_base_and_shortcut_are_not_applicable():
    buf = torch.randn(1 * 5 * 5 * 16 + 1)
    x = buf[1:].view(1, 5, 5, 16).permute(0, 3, 1, 2)  # channels_last-contiguous, base 4 bytes off
    w = _packed(16, 16)
    assert "base address" in applicable(x, w, padding=1)
    with pytest.raises(ValueError, match="base address"):
        conv3x3_bias_act(x, w, torch.randn(16))
    x = _nhwc(1, 16, 5, 5)
    name, why = tactics.choose(x, w, padding=1, shortcut=True, tuned="tma_conv")
    assert name == "gather" and "projection shortcut" in why


def test_missing_descriptor_api_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.delattr(tma_conv.tl, "make_tensor_descriptor")
    x, w = _nhwc(1, 16, 5, 5), _packed(16, 16)
    why = applicable(x, w, padding=1)
    assert why is not None and "make_tensor_descriptor" in why
    assert tactics.choose(x, w, padding=1, env="tma_conv")[0] == "gather"


def test_launcher_argument_errors():
    x, w, b = _nhwc(1, 16, 5, 5), _packed(32, 16), torch.randn(32)
    with pytest.raises(ValueError, match="bias has 16 entries"):
        conv3x3_bias_act(x, w, torch.randn(16))
    with pytest.raises(ValueError, match="residual shape"):
        conv3x3_bias_act(x, w, b, residual=torch.randn(1, 32, 5, 4))
    with pytest.raises(ValueError, match="out must be"):
        conv3x3_bias_act(x, w, b, out=torch.empty(1, 32, 3, 3))  # the padding-0 shape, padding is 1
    with pytest.raises(ValueError, match="precision"):
        conv3x3_bias_act(x, w, b, precision="fp64")
    with pytest.raises(ValueError, match="stride"):
        tactics.conv_bias_act(x, w, b, stride=2, padding=1, tactic="tma_conv")


def test_registry_dispatch(monkeypatch):
    """FASTRES_TACTICS=tma_conv: tactics.conv_bias_act runs 3×3 stride-1 layers (plain and dilated)
    through tma_conv and the rest (stride 2, 1×1) through gather; the default never picks tma_conv."""
    calls = []
    real = tma_conv.conv3x3_bias_act
    monkeypatch.setattr(
        tma_conv, "conv3x3_bias_act", lambda *a, **k: calls.append(k["dilation"]) or real(*a, **k)
    )
    x = _nhwc(1, 32, 6, 6)
    f = fold_conv_bn(*make_conv_bn(32, 32), torch.float32, precision="ieee")
    monkeypatch.delenv("FASTRES_TACTICS", raising=False)
    assert tactics.choose(x, f.weight, padding=1)[0] == "gather"
    assert tactics.choose(x, f.weight, padding=1, tuned="tma_conv") == ("tma_conv", "tma_conv: tuned table")
    monkeypatch.setenv("FASTRES_TACTICS", "tma_conv")
    for pad, dil in ((1, 1), (2, 2)):
        y = tactics.conv_bias_act(x, f.weight, f.bias, padding=pad, dilation=dil, precision="ieee")
        expected = F.relu(F.conv2d(x.double(), f.weight.double(), f.bias.double(), padding=pad, dilation=dil))
        assert_close(y, expected, rel=1e-5, atol=1e-4, rtol=1e-4, what=f"dilation {dil}")
    assert calls == [1, 2]
    tactics.conv_bias_act(x, f.weight, f.bias, stride=2, padding=1, precision="ieee")
    w1 = fold_conv_bn(nn.Conv2d(32, 32, 1, bias=False), None, torch.float32, precision="ieee").weight
    tactics.conv_bias_act(x, w1, f.bias, precision="ieee")
    assert len(calls) == 2, "stride 2 and 1x1 must not reach tma_conv"


def test_gpu_config_heuristic():
    """Row boxes (wgmma A from shared memory) where they cover the row as well as a 2-D box; 2-D boxes
    on the smaller maps; 4 warps for 64-pixel boxes; two programs per SM for 64-channel tiles."""
    cfg56 = pick_config(56, 56, 64, 64, torch.float16, interpret=False)
    assert (cfg56.block_h, cfg56.block_w, cfg56.block_n, cfg56.block_k, cfg56.num_warps) == (1, 64, 64, 64, 4)
    assert cfg56.programs_per_sm == 2
    cfg28 = pick_config(28, 28, 128, 128, torch.float32, interpret=False)
    assert (cfg28.block_h, cfg28.block_w, cfg28.block_k, cfg28.num_warps) == (4, 32, 32, 8)
    cfg7 = pick_config(7, 7, 512, 512, torch.float16, interpret=False)
    assert (cfg7.block_h, cfg7.block_w, cfg7.num_warps) == (8, 8, 4)
    assert pixel_box(14, 14, 128) == (8, 16)
    assert tma_conv.num_programs(cfg56, tma_conv.num_tiles(cfg56, 32, 56, 56, 64), 132) == 264
    assert tma_conv.num_programs(cfg7, tma_conv.num_tiles(cfg7, 1, 7, 7, 512), 132) == 4
