"""torch.library ops: opcheck, torch.compile (aot_eager, fullgraph) and torch.export of a converted model."""

import pytest
import torch
from torchvision.models.resnet import BasicBlock, ResNet

import fastres
import fastres.ops  # noqa: F401  (registers torch.ops.fastres.*)
from fastres.testing import assert_close, randomize_bn

FP32 = dict(rel=1e-4, atol=1e-4, rtol=1e-3)


def tiny_fast():
    torch.manual_seed(0)
    model = randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)).eval()
    return model, fastres.convert(model)


CONV_CASES = {
    "3x3_relu": lambda: (
        torch.randn(2, 4, 6, 6),
        torch.randn(8, 4, 3, 3),
        torch.randn(8),
        None,
        [1, 1],
        [1, 1],
        [1, 1],
        1,
        "relu",
        0.0,
        0.0,
    ),
    "1x1s2_residual": lambda: (
        torch.randn(1, 6, 7, 7),
        torch.randn(8, 6, 1, 1),
        torch.randn(8),
        torch.randn(1, 8, 4, 4),
        [2, 2],
        [0, 0],
        [1, 1],
        1,
        "identity",
        0.0,
        0.0,
    ),
    "grouped": lambda: (
        torch.randn(1, 8, 5, 5),
        torch.randn(8, 2, 3, 3),
        torch.randn(8),
        None,
        [1, 1],
        [1, 1],
        [1, 1],
        4,
        "relu",
        0.0,
        0.0,
    ),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_opcheck_conv_bias_act(case):
    torch.library.opcheck(torch.ops.fastres.conv_bias_act.default, CONV_CASES[case]())


def test_opcheck_conv_shortcut_bias_act():
    args = (
        torch.randn(1, 6, 4, 4),
        torch.randn(8, 6, 3, 3),
        torch.randn(8),
        torch.randn(1, 5, 7, 7),
        torch.randn(8, 5, 1, 1),
        [1, 1],
        [1, 1],
        [1, 1],
        1,
        [2, 2],
        "leaky_relu",
        0.2,
        0.0,
    )
    torch.library.opcheck(torch.ops.fastres.conv_shortcut_bias_act.default, args)


def test_opcheck_pools():
    torch.library.opcheck(
        torch.ops.fastres.max_pool2d.default, (torch.randn(2, 4, 7, 7), [3, 3], [2, 2], [1, 1])
    )
    torch.library.opcheck(torch.ops.fastres.global_avg_pool.default, (torch.randn(2, 4, 7, 5),))


def test_compile_fullgraph_aot_eager_matches_uncompiled():
    model, fast = tiny_fast()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = fast(x)
        compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
        out = compiled(x)
        eager = model.double()(x.double())  # the unconverted model: a wrong fast(x) cannot hide here
    assert_close(out, ref, **FP32, what="aot_eager")
    assert_close(out, eager, **FP32, what="aot_eager against the eager model")
    torch._dynamo.reset()


def test_export_holds_fastres_ops_and_no_eager_conv_or_bn():
    model, fast = tiny_fast()
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(fast, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("fastres.conv_bias_act.default") == 6  # stem, layer1's two, three block heads
    assert targets.count("fastres.conv_shortcut_bias_act.default") == 3  # tails with projections
    assert "fastres.max_pool2d.default" in targets and "fastres.global_avg_pool.default" in targets
    eager = [t for t in targets if "conv" in t and "fastres" not in t or "batch_norm" in t]
    assert not eager, f"eager ops in the exported graph: {eager}"
    with torch.no_grad():
        assert_close(ep.module()(x), model.double()(x.double()), **FP32, what="exported program")


@pytest.mark.gpu
def test_inductor_compile_on_gpu_matches():
    model, fast = tiny_fast()
    fast = fast.cuda()
    x = torch.randn(8, 3, 64, 64, device="cuda")
    with torch.no_grad():
        ref = fast(x)
        out = torch.compile(fast, fullgraph=True)(x)
        eager = model.cuda().double()(x.double())  # fp64 on the GPU: no tf32 in the reference
    assert_close(out, ref, rel=5e-3, atol=5e-3, rtol=5e-3, what="inductor")
    # fp32 on a GPU: tf32 dots, DESIGN.md's whole-model bound (elements: as tests/conftest.py's bounds)
    assert_close(out, eager, rel=5e-3, atol=0.15, rtol=2.5e-2, what="inductor against the eager model")
