"""The hot path (issue 10; DESIGN.md, The hot path): module → plan → kernel.

Launches are recorded, not made (``benchmarks.host_overhead.recorded_launches``: Triton's launch path
runs in full up to the compiled kernel's launcher, on CPU tensors, with an sm_90 stand-in driver), so
these tests check on the CPU what a GPU forward would launch: after the first forward every launch goes
through the bound compiled kernel with the arguments ``kernel[grid](...)`` passed, the per-forward path
walks no parameters, stamps no fold and calls no op, and anything that changes the signature, a fold,
the module tree, a training flag or the precision makes a new plan.
"""

import copy
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import fastres
from fastres import fold, modules, ops
from fastres.kernels import conv, pool
from fastres.testing import count_launches, randomize_bn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/, as test_bench_smoke does
from benchmarks import host_overhead  # noqa: E402

LAUNCHES = 51  # ResNet-50: 53 convs, 4 shortcuts accumulated into their tails, the stem pool, the head


@pytest.fixture
def recorded():
    with host_overhead.recorded_launches() as rec:
        yield rec


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    model = fastres.convert(randomize_bn(torchvision.models.resnet50(), 1).eval())
    model.fc = nn.Identity()  # an nn.Linear: not fastres's
    return model


def _runs(monkeypatch) -> list:
    """Counts calls of JITFunction.run (Triton's binder, specialisation, cache lookup) of each kernel."""
    calls = []
    for name, mod in host_overhead.KERNELS.items():
        kernel = getattr(mod, name)
        original = kernel.run

        def run(*args, _original=original, **kwargs):
            calls.append(1)
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run, raising=False)
    return calls


def _forward(model, x, mode=torch.inference_mode):
    with mode():
        return model(x)


def _same_launch(a, b, what):
    (name_a, grid_a, args_a), (name_b, grid_b, args_b) = a, b
    assert (name_a, grid_a, len(args_a)) == (name_b, grid_b, len(args_b)), what
    for i, (u, v) in enumerate(zip(args_a, args_b, strict=True)):
        if isinstance(u, torch.Tensor):
            assert isinstance(v, torch.Tensor), f"{what}: argument {i}"
            assert (u.dtype, u.shape, u.stride(), u.device) == (v.dtype, v.shape, v.stride(), v.device), i
        else:
            assert u == v, f"{what}: argument {i}: {u!r} != {v!r}"


def test_later_forwards_launch_the_bound_kernel_with_the_same_arguments(recorded, resnet50, monkeypatch):
    model = copy.deepcopy(resnet50)
    x = torch.randn(1, 3, 32, 32)
    runs = _runs(monkeypatch)
    _forward(model, x)  # plans made; each launch through kernel[grid](...)
    first, compiles = list(recorded.log), len(recorded.compiles)
    assert len(first) == LAUNCHES and len(runs) == LAUNCHES
    recorded.log.clear()
    _forward(model, x)
    second = list(recorded.log)
    assert len(second) == LAUNCHES
    assert len(runs) == LAUNCHES, "a later forward went through JITFunction.run"
    assert len(recorded.compiles) == compiles
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        _same_launch(a, b, f"launch {i}")
        if a[0] == "_conv_bias_act_fwd_kernel":  # weight and bias: the fold's tensors, held by the plan
            assert a[2][1] is b[2][1] and a[2][2] is b[2][2], f"launch {i}"
    assert second[0][2][0] is x, "the stem reads the input itself"
    # What count_launches sees goes through launchable(kernel) and is counted; then binding resumes.
    recorded.log.clear()
    with count_launches() as log:
        _forward(model, x)
    assert len(log) == LAUNCHES and len(recorded.log) == LAUNCHES
    _forward(model, x)
    assert len(runs) == 2 * LAUNCHES


def test_hot_path_walks_no_parameters_stamps_no_fold_calls_no_op(recorded, resnet50, monkeypatch):
    model = copy.deepcopy(resnet50)
    x = torch.randn(1, 3, 32, 32)
    _forward(model, x)

    def forbidden(*args, **kwargs):
        raise AssertionError("called in the hot path")

    for obj, name in [
        (nn.Module, "parameters"),
        (nn.Module, "named_parameters"),
        (nn.Module, "modules"),
        (nn.Module, "named_modules"),
        (fold.FoldCache, "get"),
        (fold, "_stamp"),
        (ops, "conv_bias_act"),
        (ops, "conv_shortcut_bias_act"),
        (ops, "max_pool2d"),
        (ops, "global_avg_pool"),
    ]:
        monkeypatch.setattr(obj, name, forbidden)
    calls = []

    def profile(frame, event, arg):
        if event == "call":
            calls.append(frame.f_code.co_name)

    recorded.log.clear()
    for mode in (torch.inference_mode, torch.no_grad):
        sys.setprofile(profile)
        try:
            _forward(model, x, mode)
        finally:
            sys.setprofile(None)
    assert len(recorded.log) == 2 * LAUNCHES
    # Python function calls per forward, all included (nn.Module's __call__, torchvision's forward, the
    # plans, the launches): 1226 here after issue 10, ~16000 before (cProfile, the same forward).
    per_forward = len(calls) / 2
    assert per_forward <= 30 * LAUNCHES, f"{per_forward:.0f} Python calls per forward"


def _block_launches(model, x) -> int:
    return len(_launched(model, x))


def _launched(model, x) -> list:
    with host_overhead.recorded_launches() as rec:
        _forward(model, x, torch.no_grad)
        return list(rec.log)


def test_every_change_makes_a_new_plan(recorded, resnet50, monkeypatch):
    model = copy.deepcopy(resnet50)
    x = torch.randn(1, 3, 32, 32)
    _forward(model, x)
    block = model.layer2[0]
    plan = block._plan

    def ready(xb):
        with torch.no_grad():
            return block._plan.ready(xb)

    xb = _forward(nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1), x)
    assert ready(xb)
    with torch.no_grad():
        block.bn2.running_var.mul_(1.5)  # an in-place edit: a new fold
    assert not ready(xb)
    recorded.log.clear()
    _forward(block, xb)
    assert block._plan is not plan and ready(xb)
    plan = block._plan
    old_bn = block.bn3
    block.bn3 = copy.deepcopy(old_bn)  # a child replaced: the same values, another module
    assert not ready(xb)
    _forward(block, xb)
    assert block._plan is not plan
    block.bn1.training = True  # set directly on a child, not through train()
    assert not ready(xb)
    recorded.log.clear()
    mean = block.bn1.running_mean.clone()
    _forward(block, xb, torch.no_grad)
    assert recorded.log == [], "a child in training mode must run the original computation"
    assert not torch.equal(mean, block.bn1.running_mean), "train-mode BN updates its statistics"
    block.bn1.training = False
    _forward(block, xb)
    assert ready(xb)
    # A misaligned input has another specialisation: a new plan and a new compile, never the bound one.
    compiles = len(recorded.compiles)
    storage = torch.empty(xb.numel() + 1)
    xm = storage[1:].view(xb.shape[0], xb.shape[2], xb.shape[3], xb.shape[1]).permute(0, 3, 1, 2)
    xm.copy_(xb)
    assert xm.stride() == xb.stride() and xm.data_ptr() % 16
    assert not ready(xm)
    _forward(block, xm)
    assert len(recorded.compiles) > compiles
    # Gradients needed (an input that requires grad, with grad enabled): the original computation.
    recorded.log.clear()
    monkeypatch.setattr(modules, "_WARNED", [])  # warned once per process: earlier tests may have used it
    with pytest.warns(UserWarning, match="needs gradients"):
        block(xb.clone().requires_grad_())
    assert recorded.log == []


def test_precision_is_part_of_the_plan(recorded, monkeypatch):
    seq = randomize_bn(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()), 0)
    model = fastres.convert(seq.eval())
    x = torch.randn(1, 16, 8, 8)
    index = conv._conv_bias_act_fwd_kernel.arg_names.index("DOT_PRECISION")
    monkeypatch.setenv("FASTRES_FP32_PRECISION", "ieee")
    _forward(model, x)
    monkeypatch.setenv("FASTRES_FP32_PRECISION", "tf32")
    _forward(model, x)
    assert [launch[2][index] for launch in recorded.log] == ["ieee", "tf32"]


def test_tracing_and_dispatch_modes_see_the_ops(recorded):
    seq = randomize_bn(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()), 0)
    model = fastres.convert(seq.eval())
    x = torch.randn(1, 8, 6, 6)
    _forward(model, x)  # a plan exists: tracing must not take it
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad():
        graph = make_fx(model, tracing_mode="real")(x)  # a dispatch mode, real tensors
        traced = torch.jit.trace(model, x, check_trace=False)
    assert "fastres.conv_bias_act" in str(graph.code)
    assert "fastres::conv_bias_act" in str(traced.inlined_graph)


def test_copies_and_pickles_plan_again(recorded):
    seq = randomize_bn(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()), 0)
    model = fastres.convert(seq.eval())
    _forward(model, torch.randn(1, 8, 6, 6))
    assert model[0]._plan is not None
    assert copy.deepcopy(model)[0]._plan is None
    assert pickle.loads(pickle.dumps(model))[0]._plan is None
    fastres.refold(model)
    assert model[0]._plan is None


def test_pool_plans_launch_bound(recorded, monkeypatch):
    model = fastres.convert(randomize_bn(torchvision.models.resnet18(), 0).eval())
    model.fc = nn.Identity()
    x = torch.randn(1, 3, 32, 32)
    runs = _runs(monkeypatch)
    _forward(model, x)
    names = [launch[0] for launch in recorded.log]
    assert names.count("_max_pool2d_fwd_kernel") == 1 and names.count("_global_avg_pool_fwd_kernel") == 1
    _forward(model, x)
    assert len(runs) == len(names)
    assert pool is not None


def test_plan_holds_the_old_storage_so_a_moved_tensor_is_always_seen():
    """``param.data = new`` bumps no version: a plan sees it by the data pointer. The stamps keep the old
    storage alive, so no allocator (CUDA's caching allocator reuses freed blocks at once) can hand that
    address to the new memory, where an equal pointer would hide the change; the next forward follows
    the new values and the new plan lets the old memory go."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())).eval()
    fast = fastres.convert(model)
    x = torch.randn(1, 4, 6, 5)
    _forward(fast, x)
    plan = fast[0].__dict__["_plan"]
    weight = fast[0].weight
    old_storage = weight.untyped_storage()
    old_ptr = old_storage.data_ptr()
    del old_storage  # the Python wrapper; the plan must hold the storage itself
    with torch.no_grad():
        weight.data = weight.detach().clone().mul_(-1.5)  # new memory; the old one's only owner: the plan
    assert weight.data_ptr() != old_ptr
    assert any(s.data_ptr() == old_ptr for s in plan.stamps.storages), "the plan let the old memory go"
    model[0].weight.data = weight.detach().clone()
    out = _forward(fast, x)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert fast[0].__dict__["_plan"] is not plan
    # The new plan holds the tensors' memory as it is now (every stamped tensor existed while the old
    # weight memory was held, so none can sit at its address).
    assert not any(s.data_ptr() == old_ptr for s in fast[0].__dict__["_plan"].stamps.storages)


def test_cuda_latency_measurement_runs_its_steps_on_cpu_tensors():
    """benchmarks/host_overhead.py --cuda (enqueue time, plain and graphed batch-1 latency on a GPU): the
    same code on CPU tensors in the interpreter, with no graph, so the GPU run is not its first."""
    result = host_overhead.measure_cuda("resnet18", torch.float16, image=16, reps=1, rounds=1, device="cpu")
    assert result["ok"], result
    assert result["fused_launches"] == 19  # 20 convs, 3 shortcuts in their tails, the stem pool, the head
    assert result["rel_err"] <= result["bound"]
    for key in ("enqueue_us_per_forward", "latency_us_plain", "latency_us_graphed", "plain_over_graphed"):
        assert result[key] > 0, key
