"""What the launchers hand to Triton, recorded on the CPU (issue 9: the first GPU run must count).

On a GPU the conv and pool kernels are ``JITFunction``s and ``JITFunction.run`` compiles and launches.
Here each kernel is replaced by a real ``JITFunction`` of the same source whose ``run`` records its
arguments instead, and the launchers are made to take their GPU path (``_common.INTERPRET`` off, the
CUDA-only device check off). Nothing is computed: the tests check what would be launched, how, where.

- Real tensors launch the raw kernel (no higher-order-op dispatch, no kernel-table entry per call),
  also after a traced call, and inside a ``triton_op``'s eager body.
- Traced launches (FakeTensorMode, make_fx, torch.compile) go through ``wrap_triton`` and never hand a
  fake or functional tensor to ``run``, whatever ran before.
- Launches run under a device guard for the input's device.
- No read argument shares storage with the written output.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from triton.runtime.jit import JITFunction

from fastres.kernels import _common, conv, pool
from fastres.kernels.conv import ConvConfig

CFG = ConvConfig(16, 16, 16)
KERNELS = {
    "_conv_bias_act_fwd_kernel": conv,
    "_max_pool2d_fwd_kernel": pool,
    "_global_avg_pool_fwd_kernel": pool,
}


@dataclass
class Launch:
    kernel: str
    args: tuple
    kwargs: dict
    grid: tuple
    guard: torch.device | None  # the device guard active when run() was called

    def tensors(self) -> list[torch.Tensor]:
        return [a for a in self.args if isinstance(a, torch.Tensor)]


@pytest.fixture
def recorded(monkeypatch):
    """The launchers on their GPU path, with every kernel's ``run`` recording instead of launching."""
    launches: list[Launch] = []
    guard: list[torch.device] = []

    @contextlib.contextmanager
    def device_guard(device):
        guard.append(device)
        try:
            yield
        finally:
            guard.pop()

    for name, mod in KERNELS.items():
        original = getattr(mod, name)
        kernel = JITFunction(getattr(original, "fn", original))  # interpreted or not: its Python source

        def run(*args, grid, warmup, _name=name, **kwargs):
            assert not warmup
            launches.append(Launch(_name, args, kwargs, grid, guard[-1] if guard else None))

        kernel.run = run
        monkeypatch.setattr(mod, name, kernel)
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(_common, "device_guard", device_guard, raising=False)  # (absent before issue 9)
    # check_tensor refuses CPU tensors without the interpreter; nothing runs on them here.
    monkeypatch.setattr(conv, "check_tensor", lambda *a, **k: None)
    monkeypatch.setattr(pool, "check_tensor", lambda *a, **k: None)
    return launches


def _inputs():
    x = torch.randn(2, 16, 5, 5).to(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 3, 3)
    b = torch.randn(16)
    return x, w, b


def _conv(x, w, b, **kw):
    return conv.conv_bias_act(x, w, b, padding=1, config=CFG, **kw)


def _assert_real(launch: Launch):
    kinds = {type(t).__name__ for t in launch.tensors()}
    assert kinds <= {"Tensor", "Parameter"}, f"{launch.kernel} was handed {kinds}"


@torch.library.triton_op("fastres_test::conv_relu", mutates_args=())
def _conv_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _conv(x, w, b)


def _launch(kind: str, launches: list[Launch]) -> None:
    """One launch of the conv kernel, really (``real``, ``op``: inside a triton_op's eager body) or traced
    (``fake``: FakeTensorMode, ``make_fx``), with the checks that kind of launch must pass."""
    x, w, b = _inputs()
    before = len(launches)
    tables = len(kernel_side_table.id_to_kernel), len(kernel_side_table.constant_args)
    if kind in ("real", "op"):
        w = torch.nn.Parameter(w, requires_grad=False)  # a module's weight: a real tensor too
        with torch.no_grad():
            y = _conv(x, w, b) if kind == "real" else _conv_op(x, w, b)
        assert len(launches) == before + 1, "a real launch must reach JITFunction.run"
        _assert_real(launches[-1])
        assert launches[-1].args[0] is x and launches[-1].args[4] is y
        # The higher-order-op path would add a kernel-table entry per launch (and cost ~80 µs).
        assert (len(kernel_side_table.id_to_kernel), len(kernel_side_table.constant_args)) == tables
    elif kind == "fake":
        with FakeTensorMode() as mode:
            y = _conv(mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b))
        assert y.shape == (2, 16, 5, 5)
        assert len(launches) == before, "a fake tensor reached JITFunction.run"
    elif kind == "make_fx":
        graph = make_fx(lambda x, w, b: _conv(x, w, b), tracing_mode="fake")(x, w, b)
        assert len(launches) == before, "a traced launch reached JITFunction.run"
        hops = [n for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        assert len(hops) == 1, graph.code
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "order",
    [
        ("real", "fake", "real"),
        ("op", "make_fx", "real", "op"),
        ("fake", "real", "make_fx", "op"),
        ("make_fx", "op", "fake", "real"),
    ],
    ids="-".join,
)
def test_real_launches_raw_kernel_traced_launch_wraps_whatever_the_order(recorded, order):
    for kind in order:
        _launch(kind, recorded)


def test_torch_compile_after_eager_hands_run_only_real_tensors(recorded):
    """The reported failure: an eager forward first, then torch.compile. On a GPU the cached raw kernel
    got FunctionalTensors (a data_ptr failure). Compiled with aot_eager here: the traced graph holds the
    wrapped kernel, and running it launches on real tensors."""
    x, w, b = _inputs()
    _conv_op(x, w, b)
    compiled = torch.compile(lambda x, w, b: _conv_op(x, w, b) + 1, backend="aot_eager", fullgraph=True)
    compiled(x, w, b)
    assert len(recorded) == 2, [launch.kernel for launch in recorded]
    for launch in recorded:
        _assert_real(launch)
    _conv_op(x, w, b)
    assert len(recorded) == 3
    _assert_real(recorded[-1])


def test_pool_launches_are_real_and_traced_alike(recorded):
    x = torch.randn(2, 16, 9, 9).to(memory_format=torch.channels_last)
    pool.max_pool2d(x, 3, 2, 1)
    pool.global_avg_pool(x)
    assert [launch.kernel for launch in recorded] == ["_max_pool2d_fwd_kernel", "_global_avg_pool_fwd_kernel"]
    for launch in recorded:
        _assert_real(launch)
        assert launch.args[0] is x
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        assert pool.max_pool2d(fx, 3, 2, 1).shape == (2, 16, 5, 5)
        assert pool.global_avg_pool(fx).shape == (2, 16, 1, 1)
    assert len(recorded) == 2


@pytest.mark.parametrize(
    "which", ["conv", "conv_residual", "conv_shortcut", "conv_out", "max_pool", "avg_pool"]
)
def test_launch_runs_under_a_guard_for_the_input_device(recorded, which):
    """Triton launches on the current device: every launch must run with x's device made current."""
    x, w, b = _inputs()
    if which == "conv":
        _conv(x, w, b)
    elif which == "conv_residual":
        _conv(x, w, b, residual=torch.randn(2, 16, 5, 5))
    elif which == "conv_shortcut":
        _conv(x, w, b, shortcut_x=torch.randn(2, 8, 5, 5), shortcut_weight=torch.randn(16, 8, 1, 1))
    elif which == "conv_out":
        _conv(x, w, b, out=torch.empty(2, 16, 5, 5))
    elif which == "max_pool":
        pool.max_pool2d(x)
    else:
        pool.global_avg_pool(x)
    assert len(recorded) == 1
    assert recorded[0].guard == x.device, recorded[0].guard


def test_device_guard_makes_the_tensors_cuda_device_current(monkeypatch):
    entered = []

    class Guard:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            entered.append(-1)

    monkeypatch.setattr(torch.cuda, "_DeviceGuard", Guard)
    with _common.device_guard(torch.device("cuda", 1)):
        assert entered == [1]
    assert entered == [1, -1]
    with _common.device_guard(torch.device("cpu")):
        pass
    assert entered == [1, -1], "no CUDA guard for a CPU tensor"


def _storages(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("shortcut", [False, True])
def test_no_read_argument_aliases_the_output(recorded, with_out, shortcut):
    """Without a residual the residual pointer is a dedicated dummy, not ``out``: under torch.compile one
    buffer passed as a read and a written argument is a hazard."""
    x, w, b = _inputs()
    kw = {}
    if with_out:
        kw["out"] = torch.empty(2, 16, 5, 5).to(memory_format=torch.channels_last)
    if shortcut:
        kw.update(shortcut_x=torch.randn(2, 8, 5, 5), shortcut_weight=torch.randn(16, 8, 1, 1))
    y = _conv(x, w, b, **kw)
    (launch,) = recorded
    out_index = conv._conv_bias_act_fwd_kernel.arg_names.index("out_ptr")
    assert launch.args[out_index] is y
    others = [t for i, t in enumerate(launch.args) if isinstance(t, torch.Tensor) and i != out_index]
    assert len(others) == 6
    assert all(_storages(t) != _storages(y) for t in others), "a read argument shares storage with out"
    assert launch.kwargs["HAS_RESIDUAL"] is False


def test_dummy_residual_keeps_the_outputs_strides(recorded):
    """The dummy stands in with out's strides, so the specialisation is the one a residual would get."""
    x, w, b = _inputs()
    y = _conv(x, w, b)
    names = conv._conv_bias_act_fwd_kernel.arg_names
    launch = recorded[0]
    got = [launch.args[names.index(f"stride_r{d}")] for d in "nchw"]
    assert got == list(y.stride())


@pytest.mark.gpu
def test_launch_on_a_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the kernels must run on cuda:1 and be right."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    from fastres.fold import fold_conv_bn

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    c = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False).eval()
    bn = torch.nn.BatchNorm2d(32).eval()
    x = torch.randn(2, 16, 9, 9).to(memory_format=torch.channels_last)
    folded = fold_conv_bn(c.to(dev), bn.to(dev), torch.float32, precision="ieee")
    y = conv.conv_bias_act(x.to(dev), folded.weight, folded.bias, padding=1, precision="ieee")
    with torch.no_grad():
        ref = torch.relu(bn.cpu()(c.cpu()(x)))
    assert y.device == dev and torch.cuda.current_device() == 0
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-4)
    p = pool.max_pool2d(y)
    torch.testing.assert_close(p.cpu(), torch.nn.functional.max_pool2d(y.cpu(), 3, 2, 1))
    g = pool.global_avg_pool(y)
    torch.testing.assert_close(g.cpu(), y.cpu().mean((2, 3), keepdim=True), rtol=1e-5, atol=1e-5)


# ---- split-K through a launch plan: two launches (GEMM pass, epilogue pass), both prepared once ----


def _bottleneck(downsample: bool):
    """A converted torchvision Bottleneck with random BN statistics: identity shortcut (residual into the
    last launch) or a strided projection (accumulated into the last launch as a second K range)."""
    from torchvision.models.resnet import Bottleneck

    import fastres
    from fastres.testing import randomize_bn

    torch.manual_seed(0)
    if downsample:
        proj = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, 2, bias=False), torch.nn.BatchNorm2d(32))
        block, shape = Bottleneck(16, 8, stride=2, downsample=proj), (2, 16, 7, 7)
    else:
        block, shape = Bottleneck(32, 8), (2, 32, 6, 6)
    eager = randomize_bn(torch.nn.Sequential(block), 3).eval()
    return eager, fastres.convert(copy.deepcopy(eager)), shape


def _force_split(monkeypatch, split: int) -> list:
    """Every conv launch the modules prepare gets the interpreter's config with BLOCK_K 16 and ``split`` K
    slices (through kernels.tuning's lookup, as a table entry would give it). Returns the configs given."""
    from dataclasses import replace

    from fastres.kernels import tuning

    given = []

    def select_config(x, weight, *, groups, m, **kwargs):
        c_out, c_in_g, r, s = weight.shape
        base = conv.pick_config(m, c_out // groups, c_in_g, r, s, x.dtype, interpret=True)
        given.append(replace(base, block_k=16, split_k=split))
        return given[-1]

    monkeypatch.setattr(tuning, "select_config", select_config)
    return given


@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "projection"])
def test_split_k_plan_matches_the_ops_over_several_forwards(monkeypatch, downsample):
    """Interpreter: a FusedBottleneck whose every launch is split 3 ways gives through its plan the bits the
    ops give, forward after forward; each conv counts its two launches (GEMM pass, then epilogue pass); the
    epilogue pass is prepared with the plan, not on each forward."""
    from fastres import modules
    from fastres.kernels import epilogue
    from fastres.testing import assert_close, count_launches

    given = _force_split(monkeypatch, 3)
    eager, fused, shape = _bottleneck(downsample)
    ops_route = copy.deepcopy(fused)
    prepared = []
    real_prepare = conv.prepare_bias_act_epilogue
    monkeypatch.setattr(
        conv, "prepare_bias_act_epilogue", lambda *a, **k: prepared.append(1) or real_prepare(*a, **k)
    )
    outs = []
    with torch.inference_mode():
        for i in range(3):
            x = torch.randn(shape).to(memory_format=torch.channels_last)
            with count_launches() as log:
                y = fused(x)
            if i == 0:
                plan = fused[0].__dict__["_plan"]
                convs, n_prepared = log.count_of("_conv_bias_act_fwd_kernel"), len(prepared)
                assert plan is not None and convs in (3, 4) and n_prepared == convs
            assert fused[0].__dict__["_plan"] is plan, "a later forward made a new plan"
            assert len(prepared) == n_prepared, "the epilogue pass was prepared again on a later forward"
            assert log == ["_conv_bias_act_fwd_kernel", "_bias_act_epilogue_kernel"] * convs
            outs.append((x, y))
        assert all(c.split_k == 3 for c in given)
        monkeypatch.setattr(modules, "_plannable", lambda x: False)  # the ops, no plan
        for x, y in outs:
            with count_launches() as log:
                ref = ops_route(x)
            assert ops_route[0].__dict__.get("_plan") is None
            n_epilogue = log.count_of("_bias_act_epilogue_kernel")
            assert n_epilogue == log.count_of("_conv_bias_act_fwd_kernel") == convs
            assert torch.equal(y, ref), "plan and ops differ"
            assert_close(y, eager.double()(x.double()), rel=1e-5, atol=1e-4, rtol=1e-4, what="vs fp64 eager")
    assert epilogue.EpilogueLaunch.__slots__  # the prepared pass's type, bound like the conv's


def test_split_k_plan_launches_both_passes_bound_after_the_first_forward(monkeypatch):
    """GPU code path, recorded on the CPU (benchmarks/host_overhead.py): after the first forward the GEMM
    pass and the epilogue pass of every split conv launch through their bound compiled kernels (no
    JITFunction.run), with the same arguments, each call with a workspace of its own."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import host_overhead

    _force_split(monkeypatch, 2)
    _, fused, shape = _bottleneck(False)
    x = torch.randn(shape).to(memory_format=torch.channels_last)
    with host_overhead.recorded_launches() as rec, torch.inference_mode():
        runs = []
        for name, mod in host_overhead.KERNELS.items():
            kernel = getattr(mod, name)
            original = kernel.run
            monkeypatch.setattr(kernel, "run", lambda *a, _o=original, **k: runs.append(1) or _o(*a, **k))
        fused(x)
        first = list(rec.log)
        names = [n for n, _, _ in first]
        assert names == ["_conv_bias_act_fwd_kernel", "_bias_act_epilogue_kernel"] * 3
        assert len(runs) == 6
        rec.log.clear()
        fused(x)
        second = list(rec.log)
        assert len(runs) == 6, "a later forward went through JITFunction.run"
        for (na, ga, aa), (nb, gb, ab) in zip(first, second, strict=True):
            assert (na, ga, len(aa)) == (nb, gb, len(ab))
            for u, v in zip(aa, ab, strict=True):
                if isinstance(u, torch.Tensor):
                    assert (u.dtype, u.shape, u.stride()) == (v.dtype, v.shape, v.stride())
                else:
                    assert u == v
        for i in (0, 2, 4):  # the GEMM pass writes the workspace the epilogue pass then reads
            gemm, epi = second[i][2], second[i + 1][2]
            assert gemm[4].dtype == torch.float32 and epi[0] is gemm[4]
            assert gemm[4].shape[0] == 2 * shape[0]
