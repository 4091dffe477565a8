"""The one-shot tuner (``fastres.tuning.tune_layers``, ``python -m benchmarks.tune``) end to end on the CPU.

The kernels run in Triton's interpreter; the timer and the budget's clock are injected fakes (no CPU time
stands for a GPU time), so the choice, the budget stop and the table are deterministic. Checked: every
registered tactic that applies is offered; a candidate that fails to compile is dropped with its reason;
a candidate that computes a wrong result is dropped by the fp64 reference check and never timed; the
table is on disk after every (layer, dtype, batch), in format 2, and the lookup reads it; the runner-up
is recorded and cuDNN's time is null off a GPU; the budget stops before a layer that would not fit.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastres import tuning as ftuning
from fastres.fold import pack_weight
from fastres.kernels import tactics
from fastres.kernels import tuning as ktuning
from fastres.kernels.conv import ConvConfig
from fastres.tuning import Layer, tune_layers

REPO = Path(__file__).resolve().parent.parent
FP16 = torch.float16
GOOD_SLOW = ConvConfig(16, 16, 16, 4, 2)
GOOD_FAST = ConvConfig(32, 16, 16, 4, 2)
BROKEN = ConvConfig(24, 16, 16, 4, 2)  # tl.arange(0, 24): not a power of two, cannot compile
WRONG = ConvConfig(16, 32, 16, 4, 2)  # runs, but the test makes its output 2 % off
HOLE = ConvConfig(16, 16, 16, 4, 3)  # runs, but the test leaves one pixel unwritten (the NaN poison)
# Fake times (ms) per (tactic, config): gather's fast config wins, cuDNN is the runner-up.
TIMES = {("gather", GOOD_SLOW): 3.0, ("gather", GOOD_FAST): 1.0, ("cudnn", None): 1.5}
OTHER_MS = 4.0
TIMING_S = 10.0  # fake seconds each timing costs on the budget's clock


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTRES_CONFIG_DIR", raising=False)
    monkeypatch.delenv("FASTRES_AUTOTUNE", raising=False)
    monkeypatch.delenv("FASTRES_TACTICS", raising=False)
    ktuning.clear_cache()
    yield
    ktuning.clear_cache()


def three_layers():
    """Three 3×3 layers with the same tactics and candidates (so each takes the same fake time), listed
    out of FLOP-share order: b (count 3) has the largest share, then a, then c."""
    return [
        Layer("c", 16, 4, 4, 16, 3, 3, padding=1),
        Layer("a", 16, 6, 6, 16, 3, 3, padding=1, residual=True),
        Layer("b", 16, 6, 6, 32, 3, 3, padding=1, count=3),
    ]


def candidates(tactic, layer, batch, dtype):
    """Gather: two good configs, one that cannot compile, two made wrong; every other tactic its own."""
    return [GOOD_SLOW, GOOD_FAST, BROKEN, WRONG, HOLE] if tactic == "gather" else [None]


class Fakes:
    """The timer and the clock: each timing advances the clock and records which table keys were on disk."""

    def __init__(self, path):
        self.path = path
        self.now = 0.0
        self.timed = []  # (tactic, config)
        self.on_disk = []  # table keys present when each timing started

    def clock(self):
        return self.now

    def timer(self, fn, choice):
        self.now += TIMING_S
        self.timed.append((choice.tactic, choice.config))
        self.on_disk.append(set(ktuning.read_table(self.path)) if self.path.exists() else set())
        return TIMES.get((choice.tactic, choice.config), OTHER_MS)


@pytest.fixture
def wrong_when_asked(monkeypatch):
    real = tactics.conv_bias_act

    def run(*args, config=None, **kwargs):
        out = kwargs["out"]
        if config == HOLE:  # the kernel skips pixel (0, 0): what the poison left there stays
            keep = out[:, :, 0, 0].clone()
            real(*args, config=config, **kwargs)[:, :, 0, 0] = keep
            return out
        out = real(*args, config=config, **kwargs)
        return out.mul_(1.02) if config == WRONG else out

    monkeypatch.setattr(tactics, "conv_bias_act", run)


def test_tune_layers_end_to_end(tmp_path, monkeypatch, wrong_when_asked):
    layers = three_layers()
    path = tmp_path / "cfg" / "sm_90.json"
    fakes = Fakes(path)
    applicable = [n for n in tactics.TACTICS if n not in ("tma_gemm",)]  # 3x3: every tactic but the 1x1 GEMM
    timed_per_unit = len(applicable) - 1 + 2  # gather: 2 of its 5 configs pass; the others: their own one
    unit_s = timed_per_unit * TIMING_S
    layer_s = 2 * unit_s  # batches 1 and 2
    # After two layers 0.5 layer is left: less than 1.25 x a layer, so the third is not started.
    budget = 2.5 * layer_s
    logs = []
    result = tune_layers(
        layers, path, batches=(1, 2), dtypes=(FP16,), budget_s=budget, device="cpu", arch="sm_90",
        candidates=candidates, timer=fakes.timer, clock=fakes.clock, log=logs.append,
    )  # fmt: skip
    text = "\n".join(logs)
    # Budget: the largest shares first (b, then a); c not started, and the run ended inside its budget.
    assert result.not_started == ["c"] and "1 layers not started: c" in text
    assert fakes.now <= budget
    by_name = {lay.name: lay for lay in layers}
    keys = {by_name[n].key(b, FP16) for n in "ab" for b in (1, 2)}
    assert set(result.entries) == keys and set(ktuning.read_table(path, strict=True)) == keys
    # Every registered tactic that applies was offered and timed; broken and wrong ones never timed.
    assert {t for t, _ in fakes.timed} == set(applicable)
    assert not {("gather", BROKEN), ("gather", WRONG), ("gather", HOLE)} & set(fakes.timed)
    assert len(fakes.timed) == 4 * timed_per_unit
    reasons = {(cfg, why.split(":")[0]) for _, t, cfg, why in result.dropped if t == "gather"}
    assert reasons == {
        (BROKEN, "failed to compile or launch"),
        (WRONG, "wrong"),
        (HOLE, "non-finite output (NaN"),
    }
    assert len(result.dropped) == 3 * 4  # three per (layer, batch)
    assert "dropped gather [24x16x16" in text and "power of 2" in text and "rel err" in text
    # Written after every (layer, dtype, batch): the second unit's timings saw the first unit's key on disk.
    first_key = by_name["b"].key(1, FP16)
    assert first_key not in fakes.on_disk[0] and first_key in fakes.on_disk[timed_per_unit]
    # The entry: gather's fast config, the runner-up cuDNN (another tactic), cuDNN's time null on the CPU.
    data = json.loads(path.read_text())
    assert (
        data["format"] == 2
        and data["tuned_on"]["gpu"] is None
        and "injected timer" in data["tuned_on"]["note"]
    )
    for key in keys:
        entry = ktuning.read_table(path, strict=True)[key]
        assert (entry.tactic, entry.config, entry.ms) == ("gather", GOOD_FAST, 1.0)
        assert entry.runner_up == ktuning.Choice("cudnn", None, 1.5)
        assert entry.cudnn_ms is None and data["configs"][key]["cudnn_ms"] is None
        assert set(entry.by_tactic) == set(applicable)
    # The lookup reads it: gather's config for the launcher, the tactic for the report.
    monkeypatch.setenv("FASTRES_CONFIG_DIR", str(path.parent))
    monkeypatch.setattr(ktuning, "INTERPRET", False)
    monkeypatch.setattr(ktuning, "device_arch", lambda device: "sm_90")
    ktuning.clear_cache()
    b = by_name["b"]
    x = torch.empty(2, b.c_in, b.h, b.w, dtype=FP16).contiguous(memory_format=torch.channels_last)
    w = pack_weight(torch.empty(b.c_out, b.c_in, 3, 3, dtype=FP16))
    cfg = ktuning.select_config(x, w, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, m=2 * 36)
    assert cfg == GOOD_FAST
    name, why, entry = ktuning.tuned_tactic(x, w, padding=1, arch="sm_90")
    assert (name, why) == ("gather", "gather: tuned table") and entry.runner_up.tactic == "cudnn"


def test_a_dual_gemm_layer_is_checked_against_its_shortcut(tmp_path):
    """The reference includes the projection shortcut: a layer with one tunes (were the reference wrong,
    every candidate would be dropped and nothing written); gather's applicable, the TMA GEMM's is not."""
    layer = Layer("tail", 16, 4, 4, 32, 1, 1, shortcut_c_in=16, shortcut_stride=2, sc_h=8, sc_w=8)
    fakes = Fakes(tmp_path / "sm_90.json")
    result = tune_layers(
        [layer], tmp_path, batches=(2,), dtypes=(FP16,), device="cpu", arch="sm_90",
        candidates=lambda t, *a: [GOOD_FAST] if t == "gather" else [None], timer=fakes.timer,
        log=lambda m: None,
    )  # fmt: skip
    (key,) = result.entries
    assert key.endswith("-sc16") and not result.dropped
    assert "tma_gemm" not in {t for t, _ in fakes.timed} and "gather" in {t for t, _ in fakes.timed}


def test_the_entry_takes_a_split_only_past_the_hosts_floor():
    """The tuner ranks timed candidates as pick_config ranks predictions: the longer of the kernel time
    and the launches' host time (HOST_LAUNCH_S each, a split has two). At batch-1 sizes a split measured
    0.5 µs faster is not taken; where it saves more than its second launch costs the host, it is."""
    from fastres.kernels.conv import HOST_LAUNCH_S
    from fastres.tuning import Candidate, _entry

    one = ConvConfig(64, 64, 64)
    split = ConvConfig(64, 64, 64, split_k=4)
    floor_ms = HOST_LAUNCH_S * 1e3
    near = [Candidate("gather", one, ms=1.5 * floor_ms), Candidate("gather", split, ms=1.5 * floor_ms - 5e-4)]
    assert _entry(near, torch.device("cpu")).config == one
    far = [Candidate("gather", one, ms=4 * floor_ms), Candidate("gather", split, ms=2.5 * floor_ms)]
    entry = _entry(far, torch.device("cpu"))
    assert entry.config == split and entry.runner_up.config == one
    big = [Candidate("gather", one, ms=1.0), Candidate("gather", split, ms=0.9)]  # batch 32: the GPU decides
    assert _entry(big, torch.device("cpu")).config == split
    assert ktuning.launch_score(split, 0.9) == (0.9, 0.9)
    assert ktuning.launch_score(split, 1e-3) == (2 * floor_ms, 1e-3)


def test_tune_layers_needs_a_timer_off_the_gpu(tmp_path):
    with pytest.raises(RuntimeError, match="timer="):
        tune_layers(three_layers(), tmp_path, device="cpu", arch="sm_90")


def test_model_layers_are_the_launches_the_converted_model_makes(monkeypatch):
    """benchmarks.tune's layer list for a tiny ResNet has exactly the keys of the launches fastres makes
    (recorded through tune_session in the interpreter, configs looked up as on sm_90)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    import fastres
    from benchmarks.tune import model_layers

    monkeypatch.setattr(ktuning, "INTERPRET", False)
    monkeypatch.setattr(ktuning, "device_arch", lambda device: "sm_90")
    monkeypatch.setattr(ktuning, "_can_benchmark", lambda x: True)
    monkeypatch.setattr(ktuning, "benchmark", lambda launch, configs: (configs[0], 1.0))
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()
    fast = fastres.convert(model.half())
    with torch.inference_mode(), ktuning.tune_session() as session:
        fast(torch.randn(2, 3, 32, 32, dtype=FP16))
    layers = model_layers(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10), 32)
    assert sorted({lay.key(2, FP16) for lay in layers}) == sorted(session)


def test_resnet50_layers_count_every_fused_launch():
    """ResNet-50: 53 convs, of which the 4 projection shortcuts ride in their block's last conv: 49
    launches per forward over 24 distinct layers."""
    from benchmarks.tune import resnet_layers

    layers = resnet_layers("resnet50")
    assert sum(lay.count for lay in layers) == 49 and len(layers) == 24
    assert sum(lay.shortcut_c_in is not None for lay in layers) == 4
    assert len({lay.key(32, FP16) for lay in layers}) == 24


def test_tuner_dry_run_prints_the_plan():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.tune", "--dry-run", "--budget-s", "240"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "tuner plan: 24 layers x 3 batches x 2 dtypes" in out and "tuner dry run OK" in out
    assert all(name in out for name in tactics.TACTICS)
    assert ftuning.REP_MS > 0  # the GPU timer's window is set


def test_report_names_each_layers_tactic_from_the_tuned_table(tmp_path, monkeypatch):
    """fastres.report(model, x): every fusable conv launch names the tactic the lookup picks; a table entry
    (here cudnn, which the interpreter runs on the CPU) changes the name of the launches with its key
    only (layer1.0's two 3×3 convs share one: the key leaves the residual out)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    import fastres

    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    launches = ftuning.conv_launches(model, x)
    assert "layer2.0.downsample.0" not in launches  # rides in layer2.0.conv2 (dual GEMM)
    assert launches["layer2.0.conv2"].shortcut_c_in == 64 and launches["layer1.0.conv2"].residual
    before = str(fastres.report(model, x))
    assert "layer1.0 " in before and "tactic conv1 gather, conv2 gather" in before
    key = launches["layer1.0.conv1"].key(2, torch.float32)
    entry = ktuning.Entry("cudnn", None, 1.0, runner_up=ktuning.Choice("gather", GOOD_FAST, 2.0))
    ktuning.write_table(tmp_path / "cpu.json", "cpu", {key: entry})
    monkeypatch.setenv("FASTRES_CONFIG_DIR", str(tmp_path))
    ktuning.clear_cache()
    tactics_now = ftuning.layer_tactics(model, x)
    assert tactics_now["layer1.0.conv1"][:2] == ("cudnn", "cudnn: tuned table")
    assert tactics_now["layer1.0.conv1"][2] == key
    assert {p for p, t in tactics_now.items() if t[0] != "gather"} == {"layer1.0.conv1", "layer1.0.conv2"}
    after = str(fastres.report(model, x))
    assert "tactic conv1 cudnn, conv2 cudnn" in after and "layer2.0 " in after
    assert after.count("cudnn") == 2
    monkeypatch.setenv("FASTRES_TACTICS", "gather")  # a restriction that leaves cudnn out wins
    assert ftuning.layer_tactics(model, x)["layer1.0.conv1"][0] == "gather"


def test_kernel_report_names_the_tactic_the_lookup_picks(tmp_path, monkeypatch):
    """The kernel report's "lookup picks" column: the default without an entry, the tuned tactic where the
    sm_90 table names one and its rule fits the layer, gather where it does not (or on sm_80)."""
    from benchmarks.kernel_report import chosen_tactic
    from benchmarks.shapes import ConvShape

    one = ConvShape(c=256, h=14, w=14, k=1024, r=1, s=1, stride=1, padding=0)
    three = ConvShape(c=256, h=14, w=14, k=256, r=3, s=3, stride=1, padding=1)
    assert chosen_tactic(one, 32, FP16, None, 90) == "gather"
    key = ktuning.shape_key(256, 1024, 1, 1, (1, 1), (0, 0), (1, 1), 1, 32 * 14 * 14, FP16)
    key3 = ktuning.shape_key(256, 256, 3, 3, (1, 1), (1, 1), (1, 1), 1, 32 * 14 * 14, FP16)
    entry = ktuning.Entry("tma_gemm", None, 1.0)
    ktuning.write_table(tmp_path / "sm_90.json", "sm_90", {key: entry, key3: entry})
    monkeypatch.setenv("FASTRES_CONFIG_DIR", str(tmp_path))
    ktuning.clear_cache()
    assert chosen_tactic(one, 32, FP16, None, 90) == "tma_gemm (tuned)"
    assert chosen_tactic(three, 32, FP16, None, 90) == "gather"  # a 3x3 layer: tma_gemm's rule says no
    assert chosen_tactic(one, 32, FP16, None, 80) == "gather"  # another arch, another (absent) table
    assert chosen_tactic(one, 1, FP16, None, 90) == "gather"  # another M bucket: no entry
    monkeypatch.setenv("FASTRES_TACTICS", "gather")
    assert chosen_tactic(one, 32, FP16, None, 90) == "gather"


@pytest.mark.gpu
def test_tune_layers_on_gpu_times_with_cuda_graphs_and_records_cudnn(tmp_path):
    """What the CPU tests cannot reach: the threaded compile, do_bench_cudagraph on every tactic that
    applies, and cuDNN's time recorded (not null) on a GPU. Two gather configs, the others' own: few
    compiles."""
    layer = Layer("l", 64, 14, 14, 64, 3, 3, padding=1, residual=True)
    gather = ktuning.candidates(2 * 14 * 14, 64, 64, 3, 3, FP16)[:2]
    result = tune_layers(
        [layer], tmp_path, batches=(2,), dtypes=(FP16,), device="cuda",
        candidates=lambda t, *a: gather if t == "gather" else [None], log=print,
    )  # fmt: skip
    (key,) = result.entries
    entry = ktuning.read_table(result.path, strict=True)[key]
    assert entry.ms > 0 and entry.runner_up is not None and entry.runner_up.ms >= entry.ms
    assert all(c.ms > 0 for c in entry.by_tactic.values()) and "gather" in entry.by_tactic
    if "cudnn" in entry.by_tactic:
        assert entry.cudnn_ms == entry.by_tactic["cudnn"].ms > 0
    data = json.loads(result.path.read_text())
    assert data["tuned_on"]["gpu"] and data["tuned_on"]["triton"]


def test_unfinished_async_compiles_are_dropped_from_every_kernel_family(monkeypatch):
    """After the threaded compile phase, a compile that never finished (its error, or another's that
    stopped AsyncCompileMode's finalisation) must not stay in a kernel cache to fail every later launch of
    a good candidate; finished ones stay. Any fastres.kernels module, not only the conv and the pools."""
    import types

    class FutureKernel:  # Triton's name for the placeholder of an async compile
        def __init__(self, kernel):
            self.kernel = kernel

    class Jit:
        def __init__(self, cache):
            self.device_caches = {0: (cache, None)}

    cache = {"done": FutureKernel(object()), "unfinished": FutureKernel(None), "plain": object()}
    fake = types.ModuleType("fastres.kernels._fake_family")
    fake.kernel = Jit(cache)
    monkeypatch.setitem(sys.modules, "fastres.kernels._fake_family", fake)
    ftuning._drop_unfinished_compiles()
    assert set(cache) == {"done", "plain"}
