"""Deployment: ONNX export of a converted model (both exporters, run by onnxruntime) and an AOTInductor
``.pt2`` package that a fresh process runs without importing fastres."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torchvision
from torchvision.models.resnet import BasicBlock, ResNet

import fastres
import fastres.deploy as fexport
import fastres.testing
from fastres.modules import FUSED_TYPES
from fastres.testing import assert_close, randomize_bn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(rel=1e-4, atol=1e-4, rtol=1e-3)  # DESIGN, Numerics: fp32 whole model (conftest.bounds)


def tiny():
    torch.manual_seed(0)
    model = randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)).eval()
    return model, fastres.convert(model)


def shape_of(model):
    """Every submodule's name, type and own attribute names: what a change to the model would alter."""
    return [(name, type(m), sorted(m.__dict__)) for name, m in model.named_modules()]


def test_unfused_is_the_original_model_on_the_same_tensors():
    model, fast = tiny()
    x = torch.randn(2, 3, 32, 32)
    before = shape_of(fast)
    plain = fexport.unfused(fast)
    types = lambda mod: [(name, type(m)) for name, m in mod.named_modules()]
    assert types(plain) == types(model)
    assert not any(isinstance(m, FUSED_TYPES) for m in plain.modules())
    fast_sd, plain_sd = fast.state_dict(keep_vars=True), plain.state_dict(keep_vars=True)
    assert list(plain_sd) == list(fast_sd)
    assert all(plain_sd[k] is fast_sd[k] for k in fast_sd), "the copy must share the tensors"
    assert shape_of(fast) == before, "unfused() changed the model it was given"
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))  # the very same eager computation


def test_original_computation_in_place_restores_a_model_that_cannot_be_copied():
    model, fast = tiny()
    fast.lock = threading.Lock()  # deepcopy fails: the fallback turns the model itself back, then restores
    x = torch.randn(1, 3, 32, 32)
    before = shape_of(fast)
    with torch.no_grad():
        with fexport.original_computation(fast) as plain:
            assert plain is fast
            assert not any(isinstance(m, FUSED_TYPES) for m in fast.modules())
            assert torch.equal(plain(x), model(x))
        assert shape_of(fast) == before
        with pytest.raises(RuntimeError, match="inside"), fexport.original_computation(fast):
            raise RuntimeError("inside")
        assert shape_of(fast) == before
        assert_close(fast(x), model(x), **MODEL, what="fused after the block")


def onnx_domains(proto):
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    return nodes, {n.domain for n in nodes} | {f.domain for f in proto.functions}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_is_a_standard_graph_that_onnxruntime_runs(dynamo, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=100)).eval()
    fast = fastres.convert(model)
    before = shape_of(fast)
    x = torch.randn(1, 3, 64, 64)
    path = str(tmp_path / "resnet18.onnx")
    fastres.export_onnx(fast, (x,), path, dynamo=dynamo)
    assert shape_of(fast) == before, "export_onnx changed the model it was given"

    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    nodes, domains = onnx_domains(proto)
    assert domains <= {"", "ai.onnx"}, f"custom domains in the graph: {domains}"
    assert not [n.op_type for n in nodes if "fastres" in n.op_type.lower()]
    assert sum(n.op_type == "Conv" for n in nodes) == 20  # every conv of ResNet-18, as ONNX's own op

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = model(x)
    assert_close(torch.from_numpy(out), ref, **MODEL, what=f"onnxruntime ({'dynamo' if dynamo else 'ts'})")


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_plain_torch_onnx_export_of_a_converted_model(dynamo, tmp_path):
    """What users already call: the fused modules take their original computation while exporting."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model, fast = tiny()
    x = torch.randn(1, 3, 32, 32)
    path = str(tmp_path / "tiny.onnx")
    with torch.no_grad():
        torch.onnx.export(fast, (x,), path, dynamo=dynamo)
    nodes, domains = onnx_domains(onnx.load(path))
    assert domains <= {"", "ai.onnx"} and sum(n.op_type == "Conv" for n in nodes) == 12
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(out), model(x), **MODEL, what="plain torch.onnx.export")
        with fastres.testing.count_launches() as launches:
            fast(x)
    assert launches, "after the export the converted model runs its fused kernels again"


def test_decompose_leaves_no_fastres_op_and_computes_the_model():
    model, fast = tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ep = torch.export.export(fast, (x,))
    assert len(fexport.fastres_nodes(ep)) == 11  # 6 conv kernels (stem included), 3 tails, 2 pools
    out = fexport.decompose(ep)
    assert fexport.fastres_nodes(out) == []
    targets = [str(n.target) for n in out.graph.nodes if n.op == "call_function"]
    assert targets.count("aten.convolution.default") == 12  # tails: main conv + shortcut conv
    with torch.no_grad():
        assert_close(out.module()(x), model(x), **MODEL, what="decomposed program")


def test_export_hands_aotinductor_a_graph_without_fastres_ops(monkeypatch, tmp_path):
    """Under the interpreter the ops are opaque custom_ops: a package holding them fails to load in a
    process without fastres ("Could not find schema for fastres::conv_bias_act"), so export must
    decompose them (the CPU path's triton_ops would be decomposed by AOTInductor itself)."""
    model, fast = tiny()
    x = torch.randn(1, 3, 32, 32)
    seen = {}

    def compile_and_package(ep, package_path, inductor_configs):
        seen.update(ep=ep, configs=inductor_configs)
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    assert fastres.export(fast, x, tmp_path / "m.pt2") == str(tmp_path / "m.pt2")
    assert fexport.fastres_nodes(seen["ep"]) == []
    assert seen["configs"] == {"freezing": True}
    with torch.no_grad():
        assert_close(seen["ep"].module()(x), model(x), **MODEL, what="the program given to AOTInductor")


def test_export_refuses_a_training_model(tmp_path):
    _, fast = tiny()
    with pytest.raises(ValueError, match="eval"):
        fastres.export(fast.train(), torch.randn(1, 3, 32, 32), tmp_path / "m.pt2")


def test_fastres_export_is_the_function_whatever_was_imported_first():
    import importlib

    importlib.import_module("fastres.deploy")
    assert fastres.export is fexport.export and fastres.export_onnx is fexport.export_onnx


EXPORT_CHILD = """
import sys, torch, torchvision, fastres
from fastres.kernels._common import INTERPRET
from fastres.testing import randomize_bn
assert not INTERPRET, "the package test is for the CPU path"
torch.manual_seed(0)
model = randomize_bn(torchvision.models.resnet18(num_classes=100)).eval()
fast = fastres.convert(model)
x = torch.randn(1, 3, 32, 32)
path = fastres.export(fast, x, sys.argv[1] + "/resnet18.pt2")
with torch.no_grad():
    torch.save({"x": x, "eager": model(x), "fast": fast(x)}, sys.argv[1] + "/io.pt")
print("PACKAGE", path)
"""

LOAD_CHILD = """
import sys, torch
runner = torch._inductor.aoti_load_package(sys.argv[1] + "/resnet18.pt2")
io = torch.load(sys.argv[1] + "/io.pt")
out = runner(io["x"])
loaded = sorted(m for m in sys.modules if m == "fastres" or m.startswith("fastres."))
assert not loaded, f"the package imported {loaded}"
torch.save(out, sys.argv[1] + "/out.pt")
"""


def run_child(code: str, tmp_path) -> str:
    # Without TRITON_INTERPRET: the CPU path (the ops' PyTorch bodies), not the interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp_path)],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout


def test_aoti_package_runs_in_a_fresh_process_without_fastres(tmp_path):
    assert "PACKAGE" in run_child(EXPORT_CHILD, tmp_path)
    assert (tmp_path / "resnet18.pt2").is_file()
    run_child(LOAD_CHILD, tmp_path)
    io, out = torch.load(tmp_path / "io.pt"), torch.load(tmp_path / "out.pt")
    assert_close(out, io["eager"], **MODEL, what="AOTInductor package against eager")
    assert_close(out, io["fast"], **MODEL, what="AOTInductor package against the converted model")
