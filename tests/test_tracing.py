"""A converted model under the tracers people already use: torch.fx.symbolic_trace and torch.jit.trace."""

import torch
import torch.fx
import torchvision

import fastres
from fastres.modules import FusedBasicBlock, FusedConvBNAct2d, FusedHead
from fastres.testing import assert_close, count_launches, randomize_bn


def _models():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    return model, fastres.convert(model)


def test_fx_symbolic_trace_keeps_fused_modules_as_leaves():
    model, fast = _models()
    gm = torch.fx.symbolic_trace(fast)
    called = {type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert {FusedBasicBlock, FusedHead}.issubset(called)
    assert any(issubclass(c, FusedConvBNAct2d) for c in called)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        with count_launches() as launches:
            out = gm(x)
        ref = model(x)
    assert len(launches) == 19  # the same kernels as the converted model: the leaves decide at run time
    assert_close(out, ref, rel=1e-4, atol=1e-4, rtol=1e-4, what="fx GraphModule")


def test_jit_trace_passes_its_check_and_follows_later_edits():
    model, fast = _models()
    for m in (model, fast):
        m.requires_grad_(False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(fast, x)  # check_trace reruns and compares the graphs
    kinds = [n.kind() for n in traced.inlined_graph.nodes()]
    assert "fastres::conv_bias_act" in kinds and "aten::_convolution" not in kinds
    x2 = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(traced(x2), model(x2), rel=1e-4, atol=1e-4, rtol=1e-4, what="jit.trace")
        # The fold is part of the trace: an in-place edit of a BN statistic reaches the traced model.
        for m in (model, fast):
            m.layer2[0].bn1.running_var.mul_(3.0)
        assert_close(traced(x2), model(x2), rel=1e-4, atol=1e-4, rtol=1e-4, what="jit.trace after edit")
