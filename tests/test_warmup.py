"""fastres.warmup on a tiny ResNet through the interpreter: every fused module runs, every fold is made."""

import inspect
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import as_completed

import pytest
import torch
from torchvision.models.resnet import BasicBlock, ResNet

import fastres
from fastres import warm
from fastres.fold import FoldCache
from fastres.testing import assert_close, randomize_bn, rel_err

# The fused modules of ResNet(BasicBlock, [1, 1, 1, 1]) after convert, in the order they run.
FUSED = [
    ("conv1", "FusedStem"),
    ("layer1.0", "FusedBasicBlock"),
    ("layer2.0", "FusedBasicBlock"),
    ("layer3.0", "FusedBasicBlock"),
    ("layer4.0", "FusedBasicBlock"),
    ("avgpool", "FusedHead"),
]


def fold_caches(module):
    """The FoldCaches a fused module holds (how many depends on how it fuses its shortcut)."""
    caches = list(vars(module).get("_folds", {}).values()) + [vars(module).get("_fold")]
    return [c for c in caches if isinstance(c, FoldCache)]


@pytest.fixture
def tiny():
    model = randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)).eval()
    return model, fastres.convert(model), torch.randn(2, 3, 32, 32)


def test_warmup_runs_every_fused_module_and_makes_every_fold(tiny, capsys):
    model, fast, x = tiny
    report = fastres.warmup(fast, x)
    assert isinstance(report, fastres.WarmupReport)
    assert [(r.name, r.kind) for r in report.layers] == FUSED
    # Every fold of every fused module made once, and counted against the module that made it.
    caches = [fold_caches(fast.get_submodule(name)) for name, _ in FUSED]
    assert all(c.folds == 1 for cs in caches for c in cs)
    assert [r.folds for r in report.layers] == [len(cs) for cs in caches]
    assert min(report.layers[i].folds for i in range(5)) >= 1 and report.layers[5].folds == 0
    assert report.folds == sum(len(cs) for cs in caches) >= 9
    assert report.kernels is None and all(r.kernels is None for r in report.layers)  # interpreted
    assert report.seconds >= sum(r.seconds for r in report.layers) > 0
    out = capsys.readouterr().out
    for i, (name, kind) in enumerate(FUSED, 1):
        assert f"[{i}/{len(FUSED)}] {name}" in out and kind in out
    assert out.rstrip().splitlines()[-1] == str(report)

    # The next forward folds nothing new and computes what the original computes.
    again = fastres.warmup(fast, x, verbose=False)
    assert again.folds == 0 and capsys.readouterr().out == ""
    with torch.inference_mode():
        assert rel_err(fast(x), model(x)) <= 1e-4


def test_warmup_warns_when_nothing_would_be_fused(tiny):
    model, fast, x = tiny
    with pytest.warns(UserWarning, match="convert"):
        report = fastres.warmup(model, x, verbose=False)
    assert report.layers == [] and report.folds == 0
    fast.train()
    with pytest.warns(UserWarning, match="train mode"):
        report = fastres.warmup(fast, x, verbose=False)
    assert report.folds == 0  # the eager path ran: nothing folded
    with pytest.raises(TypeError, match="nn.Module"):
        fastres.warmup(lambda t: t, x)


@pytest.mark.gpu
def test_warmup_compiles_once_on_gpu():
    model = randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)).eval().cuda().half()
    fast = fastres.convert(model)
    x = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.half)
    first = fastres.warmup(fast, x, verbose=False)
    assert first.kernels is not None and first.folds >= 9
    second = fastres.warmup(fast, x, verbose=False)
    assert second.kernels == 0 and second.folds == 0  # everything compiled and folded the first time


def forget_compiled_kernels():
    """Empty Triton's in-memory kernel caches of our kernels: the next forward compiles (or loads from
    Triton's disk cache) every specialization again, so a case cannot pass on an earlier case's work."""
    from fastres.kernels import conv, pool

    for mod in (conv, pool):
        for value in vars(mod).values():
            caches = getattr(value, "device_caches", None)
            if isinstance(caches, dict):
                caches.clear()


@pytest.mark.gpu
@pytest.mark.parametrize("threads", [1, 8])
def test_warmup_in_threads_compiles_what_the_forward_needs(threads):
    """After a threaded compile the forward compiles nothing more, and its output is right."""
    torch.manual_seed(1)
    model = randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)).eval().cuda().half()
    fast = fastres.convert(model)
    x = torch.randn(3, 3, 40, 40, device="cuda", dtype=torch.half)
    forget_compiled_kernels()
    report = fastres.warmup(fast, x, verbose=False, threads=threads)
    assert report.kernels is not None and report.kernels > 0, "nothing compiled: the case proves nothing"
    if threads == 1:
        assert report.parallel_seconds is None and report.parallel_kernels is None
        assert sum(row.kernels for row in report.layers) == report.kernels
    else:
        assert report.parallel_seconds is not None and report.parallel_kernels == report.kernels
        assert [row.kernels for row in report.layers] == [0] * len(FUSED)
    with torch.inference_mode():
        out, ref = fast(x), model(x)
    assert_close(out, ref, rel=1e-2, atol=5e-2, rtol=5e-2, what=f"after warmup, {threads} threads")


def test_compile_only_turns_launches_into_compile_requests():
    """The mechanism behind the threaded warmup, with the interpreter off (a subprocess)."""
    probe = (
        "from triton.runtime.jit import JITFunction\n"
        "from fastres.kernels._common import compile_only, launchable\n"
        "class K(JITFunction):\n"  # launchable hands anything but a JITFunction back as it is
        "    calls = []\n"
        "    def __init__(self): pass\n"
        "    def warmup(self, *args, grid, **kw): self.calls.append((args, grid, kw))\n"
        "import torch\n"
        "k, t = K(), torch.ones(1)\n"
        "with compile_only():\n"
        "    launchable(k)[(3, 1)](t, 2, BLOCK=16)\n"
        "assert K.calls == [((t, 2), (3, 1), {'BLOCK': 16})], K.calls\n"
        "from fastres.kernels import conv\n"
        "assert type(launchable(conv._conv_bias_act_fwd_kernel)).__name__ != '_CompileRequest'\n"
        "print('OK')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-2000:]


def test_threads_phase_is_skipped_on_the_cpu(tiny):
    _, fast, x = tiny
    report = fastres.warmup(fast, x, verbose=False, threads=4)
    assert report.parallel_seconds is None and report.folds >= 0


# --------------------------------------------------------------------------------------------
# The threaded phase on the CPU: Triton's JIT replaced by a stand-in that does what it does at a launch


class FakeJit:
    """What Triton's JIT does when a fused module launches a kernel it has not compiled: under an active
    AsyncCompileMode it submits the compile to the mode's pool (kept only once finalised), otherwise it
    compiles in place. One kernel per fused module; ``fail`` names the module whose threaded compile
    raises (after every other compile has finished). ``finalised``: kernels the threaded phase kept."""

    def __init__(self, fast, fail=None):
        from triton.runtime import _async_compile

        self.active_mode = _async_compile.active_mode
        self.compiled: list[str] = []
        self.finalised: list[str] = []
        self.fail = fail
        self.others_done = threading.Event()
        self.lock = threading.Lock()
        self.succeeded = 0
        self.expected = len(FUSED) - (fail is not None)
        for name, _ in FUSED:
            # A forward hook registered before warmup's runs before warmup's: inside the module's row.
            fast.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: self.launch(name))

    def launch(self, name):
        if name in self.compiled:
            return
        mode = self.active_mode.get()
        if mode is None:
            self.compiled.append(name)
            return

        def compile_fn():
            if name == self.fail:
                self.others_done.wait(10)
                raise RuntimeError(f"ptxas failed on {name}")
            with self.lock:
                self.succeeded += 1
                if self.succeeded == self.expected:
                    self.others_done.set()
            return name

        def finalise(kernel):
            self.finalised.append(kernel)
            self.compiled.append(kernel)

        callbacks = [finalise]
        if len(inspect.signature(mode.submit).parameters) > 3:  # newer Triton: a cleanup callback too
            callbacks.append(lambda future_kernel: None)
        mode.submit(("fake", name), compile_fn, *callbacks)


def exit_finalising_first(self, exc_type, exc_value, traceback):
    """AsyncCompileMode.__exit__ as in Triton 3.6: finalise the compiles, then reset the active mode
    (a compile that raised skips the reset)."""
    from triton.runtime import _async_compile

    for future in as_completed(self.raw_futures):
        self.future_kernels[future._key].result(self.ignore_errors)
    _async_compile.active_mode.set(None)


@pytest.fixture
def threaded_on_cpu(monkeypatch, tiny):
    """The tiny model with the threaded phase enabled on the CPU and kernels counted by a FakeJit."""
    model, fast, x = tiny
    monkeypatch.setattr(warm, "_parallel_possible", lambda x, threads: True)

    def make(fail=None):
        jit = FakeJit(fast, fail)
        monkeypatch.setattr(warm, "_compiled_kernels", lambda: len(jit.compiled))
        return jit

    return model, fast, x, make


def progress_rows(out):
    return re.findall(r"\[(\d+)/(\d+)\] (\S+)", out)


def test_threaded_phase_compiles_everything_and_rows_come_from_the_serial_forward(threaded_on_cpu, capsys):
    model, fast, x, make = threaded_on_cpu
    jit = make()
    report = fastres.warmup(fast, x, threads=4)
    assert report.parallel_seconds is not None and report.parallel_kernels == len(FUSED)
    assert sorted(jit.compiled) == sorted(jit.finalised) == sorted(name for name, _ in FUSED)
    # One row per module, from the serial forward alone: nothing left for it to compile.
    assert [(r.name, r.kind) for r in report.layers] == FUSED
    assert [r.kernels for r in report.layers] == [0] * len(FUSED) and report.kernels == len(FUSED)
    assert progress_rows(capsys.readouterr().out) == [
        (str(i), str(len(FUSED)), name) for i, (name, _) in enumerate(FUSED, 1)
    ]
    # The folds the threaded phase made are counted against the modules that made them.
    assert [r.folds for r in report.layers] == [len(fold_caches(fast.get_submodule(n))) for n, _ in FUSED]
    with torch.inference_mode():
        assert rel_err(fast(x), model(x)) <= 1e-4


@pytest.mark.parametrize("exit_style", ["installed", "finalise_then_reset"])
def test_a_failed_threaded_compile_leaves_no_async_mode_and_the_serial_forward_compiles_it(
    threaded_on_cpu, monkeypatch, capsys, exit_style
):
    from triton.runtime import _async_compile

    model, fast, x, make = threaded_on_cpu
    if exit_style == "finalise_then_reset":
        monkeypatch.setattr(_async_compile.AsyncCompileMode, "__exit__", exit_finalising_first)
    jit = make(fail="layer2.0")
    with pytest.warns(UserWarning, match="parallel compile failed.*ptxas failed on layer2.0"):
        report = fastres.warmup(fast, x, threads=4)
    assert _async_compile.active_mode.get() is None
    assert report.parallel_seconds is None and report.parallel_kernels is None
    # The serial forward ran every module once and compiled what the threaded phase did not keep: the
    # failed one, and those whose finalising the failure cut short (as_completed's order is not fixed).
    assert "layer2.0" not in jit.finalised
    assert [(r.name, r.kind) for r in report.layers] == FUSED
    assert [r.kernels for r in report.layers] == [int(name not in jit.finalised) for name, _ in FUSED]
    assert sorted(jit.compiled) == sorted(name for name, _ in FUSED) and report.kernels == len(FUSED)
    assert progress_rows(capsys.readouterr().out) == [
        (str(i), str(len(FUSED)), name) for i, (name, _) in enumerate(FUSED, 1)
    ]
    with torch.inference_mode():
        assert rel_err(fast(x), model(x)) <= 1e-4


def test_unfinished_async_compiles_are_dropped_from_the_kernel_caches(monkeypatch):
    """A FutureKernel left in a kernel cache by a failed threaded phase would re-raise at every launch of
    its specialization; warmup drops it so that the serial forward compiles it, and keeps the rest."""
    from concurrent.futures import Future

    from triton.runtime._async_compile import FutureKernel

    def future_kernel(kernel):
        fk = FutureKernel.__new__(FutureKernel)  # the constructor's arguments vary between versions
        failed = Future()
        failed.set_exception(RuntimeError("ptxas failed"))
        vars(fk).update(kernel=kernel, future=failed, finalize_compile=lambda k: None)
        return fk

    class FakeKernel:
        device_caches = {0: ({"failed": future_kernel(None), "done": future_kernel("K"), "plain": "K2"}, {})}

    monkeypatch.setattr(warm._conv, "_fake_kernel", FakeKernel, raising=False)
    warm._drop_unfinished_compiles()
    assert sorted(FakeKernel.device_caches[0][0]) == ["done", "plain"]
