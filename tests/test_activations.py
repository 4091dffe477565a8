"""Issue 12, item 2: every supported activation in every conv tactic's epilogue, in the converter (runs,
fx, blocks) and on the CPU path; unsupported ones stay eager with the reason in the report."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import fastres
from fastres import activations
from fastres.kernels import tactics
from fastres.testing import assert_close, randomize_bn

# DESIGN.md, Numerics: fp32 in the interpreter (conftest.bounds("cpu", fp32, ...)).
LAYER = dict(rel=1e-5, atol=1e-5, rtol=1e-4)
MODEL = dict(rel=1e-4, atol=1e-4, rtol=1e-3)

ACTS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(),
    "hardtanh": lambda: nn.Hardtanh(-0.5, 1.25),
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "leaky_relu_neg": lambda: nn.LeakyReLU(-1.5, inplace=True),
    "silu": lambda: nn.SiLU(),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "hardswish": lambda: nn.Hardswish(),
    "hardsigmoid": lambda: nn.Hardsigmoid(),
    "sigmoid": lambda: nn.Sigmoid(),
    "mish": lambda: nn.Mish(),
    "identity": lambda: nn.Identity(),
}
# What report / repr call each one.
NAMES = {
    "relu": "relu", "relu6": "relu6", "hardtanh": "hardtanh(-0.5, 1.25)", "leaky_relu": "leaky_relu(0.2)",
    "leaky_relu_neg": "leaky_relu(-1.5)", "silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_tanh",
    "hardswish": "hardswish", "hardsigmoid": "hardsigmoid", "sigmoid": "sigmoid", "mish": "mish",
    "identity": "identity",
}
INF, NAN = float("inf"), float("nan")
# Every bound and kink of the activations above, both sides of it, the extremes and NaN.
EDGES = [NAN, INF, -INF, 0.0, -0.0, 1e-7, -1e-7, -3.0, 3.0, -3.0001, 3.0001, -2.9999, 2.9999, 6.0, 5.9999,
         6.0001, -0.5, -0.5001, -0.4999, 1.25, 1.2501, 1.2499, 20.0, 20.001, 19.999, -20.0, 44.0, 90.0,
         -90.0, -100.0, 1e30, -1e30, 0.5, -0.5, -1.0, 1.0, -7.0, 7.0]


def eager_act(name):
    return ACTS[name]()


def test_act_descriptions():
    assert activations.from_module(nn.ReLU6()) == activations.Act("hardtanh", 0.0, 6.0)
    assert str(activations.from_module(nn.ReLU6())) == "relu6"
    assert activations.from_module(nn.LeakyReLU(0.3)) == activations.Act("leaky_relu", 0.3)
    assert activations.from_module(nn.GELU("tanh")).name == "gelu_tanh"
    for bad, words in [
        (nn.PReLU(), "PReLU is not a supported"),
        (nn.ELU(), "ELU is not a supported"),
        (nn.Softplus(), "Softplus is not a supported"),
        (nn.Tanh(), "Tanh is not a supported"),
    ]:
        assert activations.from_module(bad) is None
        assert words in activations.unsupported_reason(bad)
    gelu = nn.GELU()
    gelu.approximate = "fast"
    assert activations.from_module(gelu) is None and "'fast'" in activations.unsupported_reason(gelu)
    ht = nn.Hardtanh(-1.0, 1.0)
    ht.min_val = 2.0
    assert activations.from_module(ht) is None
    assert "min_val 2.0 > max_val 1.0" in activations.unsupported_reason(ht)

    class MyReLU(nn.ReLU):  # a subclass may compute something else
        def forward(self, x):
            return x * 2

    assert activations.from_module(MyReLU()) is None


@pytest.mark.parametrize("tactic", ["gather", "tma_gemm"])
@pytest.mark.parametrize("name", list(ACTS))
def test_epilogue_at_the_edges(name, tactic):
    """An identity 1x1 conv (exact in fp32) puts every finite edge value into the epilogue as it is, and
    the residual (zero elsewhere) adds NaN and ±Inf at their own elements (through the dot they would
    spread over a pixel): the activation must give what the eager module gives for the same fp32 values."""
    c = 16
    finite = torch.tensor([v for v in EDGES if v == v and abs(v) != INF])
    x = torch.randn(2, c, 5, 4) * 4
    flat = x.permute(0, 2, 3, 1).reshape(-1)
    flat[: finite.numel()] = finite
    flat[-finite.numel():] = finite.flip(0)
    x = flat.reshape(2, 5, 4, c).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    res = torch.zeros_like(x)
    for i, v in enumerate((NAN, INF, -INF, NAN, INF, -INF)):
        res[i % 2, 3 + i, i % 5, i % 4] = v
    weight = torch.eye(c).reshape(c, c, 1, 1)
    weight = weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)  # C_out stride 1, as the fold packs
    bias = torch.zeros(c)
    act = activations.from_module(eager_act(name))
    y = tactics.conv_bias_act(
        x, weight, bias, residual=res, act=act.name, act_a=act.a, act_b=act.b, precision="ieee",
        tactic=tactic,
    )
    ref = eager_act(name)(x + res)
    assert_close(y, ref, **LAYER, what=f"{name} ({tactic})")
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y[ref.isinf()], ref[ref.isinf()])
    assert ref.isnan().sum() >= 2


def test_epilogue_act_after_the_residual_add():
    """The activation applies after bias + residual (a block's tail): hardtanh's bounds on the sum."""
    c = 16
    x = torch.randn(2, c, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, 3, 3) * 0.3
    wp = w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    b, res = torch.randn(c), torch.randn(2, c, 6, 6) * 2
    y = tactics.conv_bias_act(
        x, wp, b, residual=res, padding=1, act="hardtanh", act_a=-0.5, act_b=1.25, precision="ieee"
    )
    ref = F.hardtanh(F.conv2d(x.double(), w.double(), b.double(), padding=1) + res.double(), -0.5, 1.25)
    assert_close(y, ref, **LAYER, what="hardtanh after the residual")
    assert ((y == -0.5).any() and (y == 1.25).any()), "the inputs must reach both bounds"


def with_specials(x):
    """x with NaN, +Inf and -Inf entries at a few pixels (the first layer is 1x1: they stay per pixel)."""
    x = x.clone()
    x[0, 1, 0, 0] = NAN
    x[0, 2, 1, 1] = INF
    x[1, 0, 2, 3] = -INF
    return x


def conv_bn_act_seq(name):
    torch.manual_seed(1)
    seq = nn.Sequential(
        nn.Conv2d(5, 12, 1),
        nn.BatchNorm2d(12),
        eager_act(name),
        nn.Conv2d(12, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        eager_act(name),
    )
    return randomize_bn(seq, 1).eval()


def eager64(model, x):
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


@pytest.mark.parametrize("name", list(ACTS))
def test_sequential_conv_bn_act(name):
    seq = conv_bn_act_seq(name)
    fast = fastres.convert(seq)
    assert isinstance(fast[0], fastres.FusedConvBNAct2d) and isinstance(fast[3], fastres.FusedConvBNAct2d)
    act_type = type(eager_act(name))
    assert isinstance(fast[2], fastres.modules.FoldedAct) and isinstance(fast[2], act_type)
    rep = fastres.report(fast)
    assert rep.convs_fused == 2
    assert [e.detail for e in rep.fused] == [f"conv+bn+{NAMES[name]}, already fused"] * 2
    x = torch.randn(2, 5, 7, 6) * 3
    with torch.inference_mode():
        out = fast(x)
    assert_close(out, eager64(seq, x), **MODEL, what=name)
    xs = with_specials(x)
    with torch.inference_mode():
        out = fast(xs)
        again = fast(xs)  # the launch plan's path
    ref = eager64(seq, xs)
    assert ref.isnan().any() or name in ("sigmoid", "hardsigmoid"), "specials must reach the output"
    assert_close(out, ref, **MODEL, what=f"{name} with NaN/Inf")
    assert_close(again, ref, **MODEL, what=f"{name} with NaN/Inf (plan)")
    # Each layer alone, at the layer bound (the second layer's input is the first's output).
    with torch.inference_mode():
        y1 = fast[2](fast[1](fast[0](xs)))
    assert_close(y1, eager64(seq[:3], xs), **LAYER, what=f"{name}: first layer")
    # Not fused (train mode): the pass-through computes its own class's forward.
    fast.train()
    seq.train()
    assert_close(fast(x), seq(x), rel=0, atol=0, rtol=0, what=f"{name} train mode")


@pytest.mark.parametrize("name", list(ACTS))
@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_block_with_act_layer(name, block):
    """A torchvision block whose ``relu`` is another activation (timm's ``act_layer``) is fused: the
    activation after conv1/conv2 and after the residual add, exactly as the block's forward applies it."""
    torch.manual_seed(2)
    planes = 4
    down = nn.Sequential(nn.Conv2d(8, planes * block.expansion, 1, stride=2, bias=False),
                         nn.BatchNorm2d(planes * block.expansion))
    blk = block(8, planes, stride=2, downsample=down)
    blk.relu = eager_act(name)
    model = randomize_bn(nn.Sequential(blk, block(planes * block.expansion, planes)), 2).eval()
    model[1].relu = eager_act(name)
    fast = fastres.convert(model)
    cls = fastres.FusedBottleneck if block is Bottleneck else fastres.FusedBasicBlock
    assert type(fast[0]) is cls and type(fast[1]) is cls
    assert f"conv+bn+{NAMES[name]} kernels" in repr(fast[0])
    x = torch.randn(2, 8, 9, 8) * 2
    for inp in (x, with_specials(x)):
        ref = eager64(model, inp)
        with torch.inference_mode():
            out, again = fast(inp), fast(inp)
        assert_close(out, ref, **MODEL, what=f"{block.__name__} {name}")
        assert_close(again, ref, **MODEL, what=f"{block.__name__} {name} (plan)")


def test_stem_with_other_activation_fuses():
    from torchvision.models import resnet18

    torch.manual_seed(3)
    m = resnet18(num_classes=10)
    m.relu = nn.SiLU()
    for mod in m.modules():
        if isinstance(mod, (BasicBlock, Bottleneck)):
            mod.relu = nn.Hardswish()
    m = randomize_bn(m, 3).eval()
    fast = fastres.convert(m)
    rep = fastres.report(fast)
    assert rep.convs_fused == rep.convs_total
    assert type(fast.conv1) is fastres.FusedStem and "conv+bn+silu" in repr(fast.conv1)
    x = torch.randn(1, 3, 40, 36)
    with torch.inference_mode():
        out = fast(x)
    assert_close(out, eager64(m, x), **MODEL, what="resnet18 silu stem, hardswish blocks")


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: nn.PReLU(12), "PReLU is not a supported activation"),
        (lambda: nn.ELU(), "ELU is not a supported activation"),
        (lambda: nn.Softplus(), "Softplus is not a supported activation"),
        (lambda: _gelu_with("erf-ish"), "GELU approximate='erf-ish'"),
    ],
)
def test_unsupported_activation_stays_eager_with_reason(make, reason):
    torch.manual_seed(4)
    seq = randomize_bn(nn.Sequential(nn.Conv2d(5, 12, 3, padding=1), nn.BatchNorm2d(12), make()), 4).eval()
    fast = fastres.convert(seq)
    assert isinstance(fast[0], fastres.FusedConvBNAct2d) and fast[0].folded_act is None
    assert type(fast[2]) is type(seq[2])  # the activation module left exactly as it was
    (entry,) = fastres.report(fast).fused
    assert entry.detail.startswith("conv+bn, already fused; ") and reason in entry.detail, entry.detail
    if isinstance(seq[2], nn.GELU):
        return  # eager itself cannot run an unknown approximate
    x = torch.randn(2, 5, 7, 6)
    with torch.inference_mode():
        out = fast(x)
    assert_close(out, eager64(seq, x), **MODEL, what=reason)


def _gelu_with(approximate):
    g = nn.GELU()
    g.approximate = approximate
    return g


def test_unsupported_block_activation_is_left_with_reason():
    model = randomize_bn(nn.Sequential(BasicBlock(8, 8)), 5).eval()
    model[0].relu = nn.ELU()
    fast = fastres.convert(model)
    assert type(fast[0]) is BasicBlock
    entry = fastres.report(fast).by_path["0"]
    assert entry.result == "left" and "ELU is not a supported activation" in entry.detail
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():
        out = fast(x)
    assert_close(out, eager64(model, x), **MODEL, what="ELU block")


def test_activation_edited_after_a_plan_is_followed():
    """A plan holds the activation's arguments as they were: editing them must not run the old ones."""
    seq = conv_bn_act_seq("leaky_relu")
    fast = fastres.convert(seq)
    x = torch.randn(2, 5, 7, 6)
    with torch.inference_mode():
        fast(x)
        fast(x)
    for m in (seq[2], seq[5], fast[2], fast[5]):
        m.negative_slope = 0.7
    with torch.inference_mode():
        out = fast(x)
    assert_close(out, eager64(seq, x), **MODEL, what="slope edited after the plan")
    blk_model = randomize_bn(nn.Sequential(BasicBlock(8, 8)), 6).eval()
    blk_model[0].relu = nn.Hardtanh(-1.0, 1.0)
    fast_blk = fastres.convert(blk_model)
    xb = torch.randn(2, 8, 6, 6) * 3
    with torch.inference_mode():
        fast_blk(xb)
        fast_blk(xb)
    for m in (blk_model[0].relu, fast_blk[0].relu):
        m.max_val = 0.25
    with torch.inference_mode():
        out = fast_blk(xb)
    assert_close(out, eager64(blk_model, xb), **MODEL, what="hardtanh bound edited after the plan")
    assert (out == 0.25).any()


class FxModule(nn.Module):
    def __init__(self, functional=None):
        super().__init__()
        self.conv = nn.Conv2d(5, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.Hardswish()
        self.functional = functional
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        y = self.bn2(self.conv2(y))
        return self.functional(y) if self.functional is not None else y


@pytest.mark.parametrize(
    "functional, name",
    [(F.silu, "silu"), (torch.relu, "relu"), (lambda t: F.leaky_relu(t, 0.3), None), (F.gelu, "gelu")],
)
def test_fx_modules_and_functional_forms(functional, name):
    torch.manual_seed(7)
    model = randomize_bn(FxModule(functional), 7).eval()
    fast = fastres.convert(model)
    rep = fastres.report(fast).by_path
    assert isinstance(fast.conv, fastres.FusedConvBNAct2d) and isinstance(fast.act, nn.Hardswish)
    assert "conv+bn+hardswish" in rep["conv"].detail
    assert isinstance(fast.conv2, fastres.FusedConvBNAct2d) and fast.conv2.folded_act is None
    if name is not None:
        assert f"functional activation {name}: conv+bn fused, activation left as is" in rep["conv2"].detail
    x = with_specials(torch.randn(2, 5, 6, 6))
    with torch.inference_mode():
        out = fast(x)
    assert_close(out, eager64(model, x), **MODEL, what="fx")


CPU_SCRIPT = textwrap.dedent("""
    import copy, torch
    from torch import nn
    from torchvision.models.resnet import BasicBlock, Bottleneck
    import fastres
    from fastres import cpu
    from fastres.kernels._common import INTERPRET
    from fastres.testing import randomize_bn, rel_err
    assert not INTERPRET and cpu.HAS_MKLDNN_OPS
    acts = {"silu": nn.SiLU, "gelu_tanh": lambda: nn.GELU("tanh"), "hardtanh": lambda: nn.Hardtanh(-0.5, 1.5),
            "leaky": lambda: nn.LeakyReLU(0.2), "mish": nn.Mish, "hardswish": nn.Hardswish}
    for name, make in acts.items():
        torch.manual_seed(0)
        seq = randomize_bn(nn.Sequential(nn.Conv2d(5, 12, 3, padding=1), nn.BatchNorm2d(12), make(),
                                         Bottleneck(12, 3), BasicBlock(12, 12)), 0).eval()
        seq[3].relu = make()
        seq[4].relu = make()
        fast = fastres.convert(seq)
        assert type(fast[3]) is fastres.FusedBottleneck and type(fast[4]) is fastres.FusedBasicBlock, name
        x = torch.randn(2, 5, 9, 8) * 2
        with torch.inference_mode():
            out = fast(x)
        with torch.no_grad():
            ref = copy.deepcopy(seq).double()(x.double())
        err = rel_err(out, ref)
        assert err < 1e-4, (name, err)
        with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
            err = rel_err(fast(x), ref)
        assert err < 1e-4, (name, "F.conv2d path", err)
        print(name, "ok")
""")


def test_cpu_path_activations():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", CPU_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" ok") == 6
