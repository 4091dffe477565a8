"""Config tables, the autotune cache and the lookup order (fastres.kernels.tuning) on the CPU.

What needs a GPU (do_bench timings, tune_model) is marked ``gpu``; everything else runs here,
with the timing replaced by a recorded fake where the lookup order is under test.
"""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from fastres.kernels import conv as kconv
from fastres.kernels import tuning
from fastres.kernels.conv import ConvConfig, pick_config
from fastres.kernels.tuning import conv_bias_act
from fastres.testing import assert_close

FP16 = torch.float16


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test sees its own cache and table folders and no memory of earlier lookups."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTRES_CONFIG_DIR", raising=False)
    monkeypatch.delenv("FASTRES_AUTOTUNE", raising=False)
    tuning.clear_cache()
    yield
    tuning.clear_cache()


@pytest.fixture
def as_gpu(monkeypatch):
    """Look up configs as the launcher would on an sm_90 GPU (CPU tensors, the kernel still interpreted)."""
    monkeypatch.setattr(tuning, "INTERPRET", False)
    monkeypatch.setattr(tuning, "device_arch", lambda device: "sm_90")


def key(
    c_in=64,
    c_out=64,
    r=3,
    s=3,
    stride=(1, 1),
    padding=(1, 1),
    dilation=(1, 1),
    groups=1,
    m=0,
    dtype=FP16,
    sc=None,
):
    return tuning.shape_key(c_in, c_out, r, s, stride, padding, dilation, groups, m, dtype, sc)


# --------------------------------------------------------------------------------------------
# Keys and candidates


def test_shape_key_is_batch_independent_within_an_m_bucket():
    # batch 32 at 56x56 and batch 8 at 112x112 have the same M; batch 24 at 56x56 rounds up to it.
    assert key(m=32 * 56 * 56) == key(m=8 * 112 * 112) == key(m=24 * 56 * 56)
    assert key(m=16 * 56 * 56) != key(m=32 * 56 * 56)
    assert key(m=32 * 56 * 56).endswith("-m131072-fp16")
    assert key(m=1) == key(m=16) and key(m=1).endswith("-m16-fp16")
    assert key(m=17) != key(m=16)
    assert key(m=16, sc=256).endswith("-m16-fp16-sc256")


def test_shape_key_separates_everything_the_config_depends_on():
    base = dict(m=4096)
    variants = [
        dict(c_in=32),
        dict(c_out=128),
        dict(r=1, s=1, padding=(0, 0)),
        dict(stride=(2, 2)),
        dict(padding=(2, 2)),
        dict(dilation=(2, 2)),
        dict(groups=32),
        dict(dtype=torch.float32),
        dict(dtype=torch.bfloat16),
        dict(m=8192),
        dict(sc=64),  # the same conv with a projection shortcut fused in (dual GEMM: a second K range)
    ]
    keys = {key(**base)} | {key(**{**base, **v}) for v in variants}
    assert len(keys) == len(variants) + 1
    with pytest.raises(TypeError, match="float64"):
        key(dtype=torch.float64)


@pytest.mark.parametrize(
    "m, c_out_g, c_in_g, r, dtype",
    [
        (32 * 56 * 56, 64, 64, 3, FP16),  # ResNet layer1 3x3
        (32 * 112 * 112, 64, 3, 7, FP16),  # stem: flat K (C_in = 3)
        (49, 2048, 512, 1, torch.float32),  # layer4 1x1 at batch 1: M below every tile
        (5, 19, 17, 3, FP16),  # primes
    ],
)
def test_candidates_start_with_the_heuristic_and_fit_the_problem(m, c_out_g, c_in_g, r, dtype):
    cands = tuning.candidates(m, c_out_g, c_in_g, r, r, dtype)
    assert cands[0] == pick_config(m, c_out_g, c_in_g, r, r, dtype, interpret=False)
    assert len(cands) == len(set(cands)) and 2 <= len(cands) <= len(tuning.CANDIDATE_TILES) + 1
    k_extent = r * r * c_in_g if c_in_g < kconv.FLAT_K_MAX_CIN else c_in_g
    for c in cands:
        for block, extent in ((c.block_m, m), (c.block_n, c_out_g), (c.block_k, k_extent)):
            assert block >= 16 and block & (block - 1) == 0
            assert block <= max(16, 1 << (extent - 1).bit_length()), c
    if dtype == torch.float32:  # same bytes per stage as the 16-bit tiles
        assert max(c.block_k for c in cands) <= 32


# --------------------------------------------------------------------------------------------
# Table files


def test_table_round_trip_and_merge(tmp_path):
    path = tmp_path / "sm_90.json"
    a, b = ConvConfig(128, 64, 32, 4, 4), ConvConfig(64, 64, 64, 8, 3)
    tuning.write_table(path, "sm_90", {"k1": (a, 0.0123456789)}, tuned_on={"gpu": "test"})
    assert tuning.read_configs(path, strict=True) == {"k1": a}
    assert tuning.read_table(path, strict=True) == {"k1": tuning.Entry.gather(a, 0.012346)}
    data = json.loads(path.read_text())
    assert data["format"] == 2 and data["tuned_on"] == {"gpu": "test"}
    assert (
        data["configs"]["k1"]["ms"] == pytest.approx(0.012346) and data["configs"]["k1"]["tactic"] == "gather"
    )
    tuning.write_table(path, "sm_90", {"k2": (b, None)})  # merge keeps k1 and tuned_on
    assert tuning.read_configs(path, strict=True) == {"k1": a, "k2": b}
    assert json.loads(path.read_text())["tuned_on"] == {"gpu": "test"}
    tuning.write_table(path, "sm_90", {"k2": (a, None)}, merge=False)
    assert tuning.read_configs(path, strict=True) == {"k2": a}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sm_90.json"]  # no temp file left behind
    with pytest.raises(ValueError, match="sm_80.json"):
        tuning.write_table(path, "sm_80", {})


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "Expecting"),
        ('{"format": 3, "arch": "sm_90", "configs": {}}', "format 1 or 2"),
        ('{"format": 1, "arch": "sm_80", "configs": {}}', "sm_80"),
        ('{"format": 2, "arch": "sm_80", "configs": {}}', "sm_80"),
    ],
)
def test_malformed_table_raises_when_strict_and_is_ignored_otherwise(tmp_path, content, match):
    path = tmp_path / "sm_90.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        tuning.read_table(path, strict=True)
    with pytest.warns(UserWarning, match="ignoring config table"):
        assert tuning.read_table(path) == {}


def test_malformed_entry_is_skipped_with_a_warning(tmp_path):
    good = {"block_m": 64, "block_n": 64, "block_k": 32, "num_warps": 4, "num_stages": 3}
    bad = {**good, "block_n": 48}  # not a power of two: tl.arange would reject it at compile time
    path = tmp_path / "sm_90.json"
    path.write_text(json.dumps({"format": 1, "arch": "sm_90", "configs": {"good": good, "bad": bad}}))
    with pytest.raises(ValueError, match="block_n=48"):
        tuning.read_table(path, strict=True)
    with pytest.warns(UserWarning, match="'bad'"):
        assert tuning.read_configs(path) == {"good": ConvConfig(**good)}


def test_shipped_tables_are_valid_and_honest():
    folder = tuning.shipped_config_dir()
    assert folder.is_dir() and folder.parent.name == "fastres"
    tables = sorted(folder.glob("*.json"))
    assert tables, "fastres/configs/ ships at least one table file"
    for path in tables:
        data = json.loads(path.read_text())
        table = tuning.read_table(path, strict=True)
        # Entries only with a record of the GPU run that measured them; none has been made yet.
        if data["tuned_on"] is None:
            assert table == {}, f"{path.name}: entries without tuned_on"
        else:
            assert data["tuned_on"].get("gpu") and data["tuned_on"].get("triton")


def test_format_1_tables_still_read_as_gather_entries(tmp_path):
    """A format-1 table (one gather config per key) reads as gather entries without a runner-up or cuDNN
    time, and a merge rewrites it in format 2 with every entry kept."""
    cfg = {"block_m": 64, "block_n": 64, "block_k": 32, "num_warps": 4, "num_stages": 3}
    path = tmp_path / "sm_90.json"
    path.write_text(
        json.dumps(
            {"format": 1, "arch": "sm_90", "tuned_on": {"gpu": "old"}, "configs": {"k1": {**cfg, "ms": 0.5}}}
        )
    )
    (entry,) = tuning.read_table(path, strict=True).values()
    assert entry.tactic == "gather" and entry.config == ConvConfig(**cfg) and entry.ms == 0.5
    assert entry.runner_up is None and entry.cudnn_ms is None
    tuning.write_table(path, "sm_90", {"k2": (ConvConfig(16, 16, 16), None)})
    data = json.loads(path.read_text())
    assert data["format"] == 2 and data["tuned_on"] == {"gpu": "old"}
    assert data["configs"]["k1"]["tactic"] == "gather"
    assert data["configs"]["k1"]["config"] == dataclasses.asdict(ConvConfig(**cfg))
    assert tuning.read_configs(path, strict=True) == {"k1": ConvConfig(**cfg), "k2": ConvConfig(16, 16, 16)}


def _tma_entry():
    from fastres.kernels.tma_gemm import TmaGemmConfig

    tma = TmaGemmConfig(128, 64, 64, 8, 3, programs_per_sm=2)
    gather = ConvConfig(64, 64, 64, 4, 4)
    return tuning.Entry(
        tactic="tma_gemm",
        config=tma,
        ms=0.02,
        runner_up=tuning.Choice("gather", gather, 0.025),
        cudnn_ms=None,
        by_tactic={
            "tma_gemm": tuning.Choice("tma_gemm", tma, 0.02),
            "gather": tuning.Choice("gather", gather, 0.025),
        },
    )


def test_format_2_records_the_choice_runner_up_and_cudnn(tmp_path):
    entry = _tma_entry()
    path = tuning.write_table(tmp_path / "sm_90.json", "sm_90", {"k": entry})
    raw = json.loads(path.read_text())["configs"]["k"]
    assert raw["tactic"] == "tma_gemm" and raw["config"]["programs_per_sm"] == 2 and raw["ms"] == 0.02
    assert raw["runner_up"] == {
        "tactic": "gather",
        "config": raw["by_tactic"]["gather"]["config"],
        "ms": 0.025,
    }
    assert raw["cudnn_ms"] is None  # not measured: null, never a made-up time
    assert tuning.read_table(path, strict=True) == {"k": entry}
    assert entry.config_for("gather") == ConvConfig(64, 64, 64, 4, 4) and entry.config_for("cudnn") is None
    assert tuning.read_configs(path, "tma_gemm", strict=True) == {"k": entry.config}


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(tactic="winograd"), "unknown tactic"),
        (dict(config={"block_m": 48, "block_n": 64, "block_k": 64}), "block_m=48"),
        (dict(ms=-1), "not a time"),
        (dict(runner_up={"tactic": "gather", "config": {"block_m": 64}, "ms": 1.0}), "block_n"),
    ],
)
def test_malformed_format_2_entry_is_refused(tmp_path, change, match):
    path = tuning.write_table(tmp_path / "sm_90.json", "sm_90", {"k": _tma_entry()})
    data = json.loads(path.read_text())
    data["configs"]["k"].update(change)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        tuning.read_table(path, strict=True)
    with pytest.warns(UserWarning, match="'k'"):
        assert tuning.read_table(path) == {}


# --------------------------------------------------------------------------------------------
# Lookup order


def _select(x_shape=(2, 64, 8, 8), w_shape=(64, 64, 3, 3), launch=None, dtype=FP16):
    x, w = torch.empty(x_shape, dtype=dtype), torch.empty(w_shape, dtype=dtype)
    m = x_shape[0] * x_shape[2] * x_shape[3]
    cfg = tuning.select_config(
        x, w, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, m=m, launch=launch
    )
    return cfg, key(c_in=x_shape[1], c_out=w_shape[0], m=m, dtype=dtype)


TABLE_CFG = ConvConfig(32, 16, 16, 2, 2)
CACHE_CFG = ConvConfig(16, 32, 16, 4, 5)
OVERRIDE_CFG = ConvConfig(64, 32, 32, 8, 2)


def test_interpreter_always_uses_its_fixed_config(tmp_path, monkeypatch):
    _, k = _select()
    tuning.write_table(tmp_path / "cfg" / "cpu.json", "cpu", {k: (TABLE_CFG, None)})
    monkeypatch.setenv("FASTRES_CONFIG_DIR", str(tmp_path / "cfg"))
    cfg, _ = _select()
    assert cfg == pick_config(128, 64, 64, 3, 3, FP16, interpret=True) != TABLE_CFG


def test_lookup_order_table_then_cache_then_heuristic(tmp_path, monkeypatch, as_gpu):
    heuristic = pick_config(128, 64, 64, 3, 3, FP16, interpret=False)
    cfg, k = _select()
    assert cfg == heuristic
    tuning.write_table(tmp_path / "cache" / "sm_90.json", "sm_90", {k: (CACHE_CFG, 0.1)})
    tuning.clear_cache()  # a new process
    assert _select()[0] == CACHE_CFG
    tuning.write_table(tmp_path / "cfg" / "sm_90.json", "sm_90", {k: (TABLE_CFG, 0.1)})
    monkeypatch.setenv("FASTRES_CONFIG_DIR", str(tmp_path / "cfg"))
    tuning.clear_cache()
    assert _select()[0] == TABLE_CFG
    # Another dtype, or another M bucket, is another key: back to the heuristic.
    assert _select(dtype=torch.float32)[0] == pick_config(128, 64, 64, 3, 3, torch.float32, interpret=False)
    assert _select(x_shape=(4, 64, 8, 8))[0] == pick_config(256, 64, 64, 3, 3, FP16, interpret=False)


def test_config_dir_overrides_the_shipped_table(tmp_path, monkeypatch, as_gpu):
    _, k = _select()
    shipped = tmp_path / "shipped"
    tuning.write_table(shipped / "sm_90.json", "sm_90", {k: (TABLE_CFG, None)})
    monkeypatch.setattr(tuning, "shipped_config_dir", lambda: shipped)
    tuning.clear_cache()
    assert _select()[0] == TABLE_CFG
    tuning.write_table(tmp_path / "mine" / "sm_90.json", "sm_90", {k: (OVERRIDE_CFG, None)})
    monkeypatch.setenv("FASTRES_CONFIG_DIR", str(tmp_path / "mine"))
    tuning.clear_cache()
    assert _select()[0] == OVERRIDE_CFG


class FakeBench:
    """Stands in for ``tuning.benchmark``: answers the last candidate, records each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, launch, configs):
        self.calls.append(list(configs))
        return configs[-1], 0.5


def test_autotune_times_once_caches_and_later_processes_read_the_cache(tmp_path, monkeypatch, as_gpu):
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "_can_benchmark", lambda x: True)
    fake = FakeBench()
    monkeypatch.setattr(tuning, "benchmark", fake)
    expected = tuning.candidates(128, 64, 64, 3, 3, FP16)
    cfg, k = _select(launch=lambda c: None)
    assert fake.calls == [expected] and cfg == expected[-1]
    assert tuning.read_configs(tmp_path / "cache" / "sm_90.json", strict=True) == {k: expected[-1]}
    assert (
        json.loads((tmp_path / "cache" / "sm_90.json").read_text())["tuned_on"]["torch"] == torch.__version__
    )
    assert _select(launch=lambda c: None)[0] == cfg and len(fake.calls) == 1  # remembered in-process
    tuning.clear_cache()  # a new process: read from the cache file, not timed again
    assert _select(launch=lambda c: None)[0] == cfg and len(fake.calls) == 1


def test_autotune_waits_while_it_cannot_time(monkeypatch, as_gpu):
    """Fake tensors (torch.compile tracing) or graph capture: heuristic now, tune on a later launch."""
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    fake = FakeBench()
    monkeypatch.setattr(tuning, "benchmark", fake)
    heuristic = pick_config(128, 64, 64, 3, 3, FP16, interpret=False)
    assert _select(launch=lambda c: None)[0] == heuristic  # CPU tensors: _can_benchmark is False
    assert fake.calls == []
    monkeypatch.setattr(tuning, "_can_benchmark", lambda x: True)
    assert _select(launch=lambda c: None)[0] != heuristic and len(fake.calls) == 1


def test_benchmark_picks_the_fastest_and_skips_configs_that_fail(monkeypatch):
    import triton.testing

    times = {ConvConfig(16, 16, 16): 3.0, ConvConfig(32, 16, 16): 1.0, ConvConfig(64, 16, 16): 2.0}
    broken = ConvConfig(128, 16, 16)

    def launch(cfg):
        if cfg == broken:
            raise RuntimeError("out of resources: shared memory")
        launched.append(cfg)

    def fake_do_bench(fn, warmup, rep, return_mode):
        assert (warmup, rep, return_mode) == (tuning.BENCH_WARMUP_MS, tuning.BENCH_REP_MS, "median")
        fn()
        return times[launched[-1]]

    launched = []
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    with pytest.warns(UserWarning, match="skipping"):
        best = tuning.benchmark(launch, [*times, broken])
    assert best == (ConvConfig(32, 16, 16), 1.0) and launched == list(times)
    with pytest.warns(UserWarning):
        assert tuning.benchmark(launch, [broken]) is None


def test_tune_session_retunes_every_shape_and_records_it(tmp_path, monkeypatch, as_gpu):
    _, k = _select()
    tuning.write_table(tmp_path / "cache" / "sm_90.json", "sm_90", {k: (CACHE_CFG, 0.1)})
    tuning.clear_cache()
    monkeypatch.setattr(tuning, "_can_benchmark", lambda x: True)
    fake = FakeBench()
    monkeypatch.setattr(tuning, "benchmark", fake)
    with tuning.tune_session() as session:
        cfg, _ = _select(launch=lambda c: None)
        _select(launch=lambda c: None)  # the same shape again: tuned once
        with pytest.raises(RuntimeError, match="already"), tuning.tune_session():
            pass
    assert cfg != CACHE_CFG and session == {k: (cfg, 0.5)} and len(fake.calls) == 1
    assert _select()[0] == CACHE_CFG  # outside the session the lookup order is back


def tiny_resnet_keys(batch, size, dtype=FP16):
    """The table keys of ResNet(BasicBlock, [1, 1, 1, 1]) at ``size``x``size``: 12 convs, 8 keys. The stem;
    layer1's two convs (one shape); in layers 2-4 conv1 (stride 2) and conv2, whose key carries the
    projection shortcut (-sc<C_in>): the shortcut conv runs inside conv2's kernel as a second K range
    (dual GEMM), so it has no launch, and no key, of its own."""

    def k(c_in, c_out, r, stride, pad, hw, sc=None):
        m = batch * hw * hw
        return tuning.shape_key(c_in, c_out, r, r, (stride,) * 2, (pad,) * 2, (1, 1), 1, m, dtype, sc)

    hw = size // 4  # after the stem's stride 2 and the max-pool's
    keys = {k(3, 64, 7, 2, 3, size // 2), k(64, 64, 3, 1, 1, hw)}
    for c in (64, 128, 256):
        hw //= 2
        keys |= {k(c, 2 * c, 3, 2, 1, hw), k(2 * c, 2 * c, 3, 1, 1, hw, sc=c)}
    return sorted(keys)


def test_tune_session_records_one_key_per_launched_shape(monkeypatch, as_gpu):
    """What tune_model writes, on the CPU: the launches of a converted tiny ResNet (interpreted, configs
    looked up as on an sm_90 GPU, the timing faked) give the 8 keys of ``tiny_resnet_keys``."""
    from torchvision.models.resnet import BasicBlock, ResNet

    import fastres

    monkeypatch.setattr(tuning, "_can_benchmark", lambda x: True)
    fake = FakeBench()
    monkeypatch.setattr(tuning, "benchmark", fake)
    fast = fastres.convert(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval().half())
    with torch.inference_mode(), tuning.tune_session() as session:
        fast(torch.randn(2, 3, 32, 32, dtype=FP16))
    assert sorted(session) == tiny_resnet_keys(2, 32) and len(session) == len(fake.calls) == 8


def test_tune_model_needs_a_gpu():
    from fastres.tuning import tune_model

    with pytest.raises(RuntimeError, match="CUDA tensor"):
        tune_model(torch.nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8), "unused")


# --------------------------------------------------------------------------------------------
# The launcher asks the tuning layer


def test_launcher_runs_the_table_config(tmp_path, monkeypatch, as_gpu):
    """conv_bias_act with config=None launches with the table's blocks, and computes the same values."""
    x = torch.randn(2, 24, 9, 7).to(memory_format=torch.channels_last)
    w = torch.randn(40, 24, 3, 3) * 0.2
    b = torch.randn(40)
    m = 2 * 9 * 7
    k = tuning.shape_key(24, 40, 3, 3, (1, 1), (1, 1), (1, 1), 1, m, torch.float32)
    table_cfg = ConvConfig(block_m=32, block_n=16, block_k=16, num_warps=2, num_stages=2)
    tuning.write_table(tmp_path / "cfg" / "sm_90.json", "sm_90", {k: (table_cfg, None)})
    monkeypatch.setenv("FASTRES_CONFIG_DIR", str(tmp_path / "cfg"))

    seen = []
    real = kconv.launchable

    def spy(kernel):
        launcher = real(kernel)

        class Spy:
            def __getitem__(self, grid):
                def run(*args, **meta):
                    seen.append((grid, {n: meta[n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")}))
                    return launcher[grid](*args, **meta)

                return run

        return Spy()

    monkeypatch.setattr(kconv, "launchable", spy)
    y = conv_bias_act(x, w, b, padding=1, precision="ieee")
    assert seen == [((4 * 3, 1), dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=2))]
    ref = torch.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1))
    assert_close(y, ref, rel=1e-5, atol=1e-4, rtol=1e-4)


def test_gather_config_of_a_shape_whose_tuned_tactic_is_another(tmp_path, monkeypatch, as_gpu):
    """A format-2 entry won by tma_gemm still hands the gather kernel its tuned gather config."""
    _, k = _select()
    entry = _tma_entry()
    tuning.write_table(tmp_path / "cfg" / "sm_90.json", "sm_90", {k: entry})
    monkeypatch.setenv("FASTRES_CONFIG_DIR", str(tmp_path / "cfg"))
    tuning.clear_cache()
    assert _select()[0] == ConvConfig(64, 64, 64, 4, 4)


def test_kernel_layer_knows_no_tables_and_the_layer_above_hands_it_the_config(tmp_path, monkeypatch, as_gpu):
    """kernels.conv.prepare_conv with config=None runs its heuristic whatever the tables say;
    kernels.tuning.prepare_conv (what the modules call) gives it the table's config."""
    x = torch.randn(2, 24, 9, 7).to(memory_format=torch.channels_last)
    w, b = torch.randn(40, 24, 3, 3) * 0.2, torch.randn(40)
    k = tuning.shape_key(24, 40, 3, 3, (1, 1), (1, 1), (1, 1), 1, 2 * 9 * 7, torch.float32)
    tuning.write_table(tmp_path / "cfg" / "sm_90.json", "sm_90", {k: (TABLE_CFG, None)})
    monkeypatch.setenv("FASTRES_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setattr(kconv, "INTERPRET", False)  # the GPU's heuristic, not the interpreter's
    below, _ = kconv.prepare_conv(x, w, b, padding=1)
    above, _ = tuning.prepare_conv(x, w, b, padding=1)
    heuristic = pick_config(126, 40, 24, 3, 3, torch.float32, interpret=False)

    def blocks(launch):
        names = launch.bound.names  # the constexprs, last in the template
        consts = dict(zip(names, launch.template[-len(names) :], strict=True))
        return consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"]

    assert blocks(below) == (heuristic.block_m, heuristic.block_n, heuristic.block_k)
    assert blocks(above) == (TABLE_CFG.block_m, TABLE_CFG.block_n, TABLE_CFG.block_k) != blocks(below)
    assert above.bound.options == {"num_warps": TABLE_CFG.num_warps, "num_stages": TABLE_CFG.num_stages}


def test_tuned_tactic_is_choose_with_the_table_entry(tmp_path, monkeypatch):
    """What the reports name per layer: the tuned entry's tactic where its rule applies, else the default."""
    from fastres.fold import pack_weight

    x = torch.empty(2, 64, 8, 8, dtype=FP16, device="meta").contiguous(memory_format=torch.channels_last)
    w = pack_weight(torch.empty(256, 64, 1, 1, dtype=FP16, device="meta"))
    name, why, entry = tuning.tuned_tactic(x, w, arch="sm_90")
    assert name == "gather" and why.startswith("gather: default") and entry is None  # no table entry
    k = tuning.launch_key(x, w)
    assert k == tuning.shape_key(64, 256, 1, 1, (1, 1), (0, 0), (1, 1), 1, 128, FP16)
    tuning.write_table(tmp_path / "cfg" / "sm_90.json", "sm_90", {k: _tma_entry()})
    monkeypatch.setenv("FASTRES_CONFIG_DIR", str(tmp_path / "cfg"))
    tuning.clear_cache()
    name, why, entry = tuning.tuned_tactic(x, w, arch="sm_90")
    assert (name, why) == ("tma_gemm", "tma_gemm: tuned table") and entry.runner_up.tactic == "gather"
    assert tuning.tuned_tactic(x, w, arch="sm_90", env="gather")[0] == "gather"  # FASTRES_TACTICS wins
    assert tuning.tuned_tactic(x, w, arch="sm_80")[0] == "gather"  # another arch: another table


# --------------------------------------------------------------------------------------------
# On a GPU


@pytest.mark.gpu
def test_autotune_on_gpu_writes_the_cache_and_stays_correct(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    x = torch.randn(4, 64, 14, 14, device="cuda", dtype=FP16).to(memory_format=torch.channels_last)
    w = (torch.randn(128, 64, 3, 3, device="cuda") * 0.05).half()
    b = torch.randn(128, device="cuda")
    y = conv_bias_act(x, w, b, padding=1)
    arch = tuning.device_arch(x.device)
    table = tuning.read_configs(tmp_path / "cache" / f"{arch}.json", strict=True)
    k = tuning.shape_key(64, 128, 3, 3, (1, 1), (1, 1), (1, 1), 1, 4 * 14 * 14, FP16)
    assert list(table) == [k] and table[k] in tuning.candidates(4 * 14 * 14, 128, 64, 3, 3, FP16)
    ref = torch.relu(F.conv2d(x.float(), w.float(), b, padding=1))
    assert_close(y, ref, rel=5e-3, atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
def test_tune_model_writes_a_table_that_the_lookup_uses(tmp_path, monkeypatch):
    """Two candidates per shape, neither the heuristic (16 compiles, not the 48 of the full lists:
    the choice among many is ``test_benchmark_picks_the_fastest...``'s); so a lookup that fell back
    to the heuristic instead of reading the table cannot pass the last check."""
    from torchvision.models.resnet import BasicBlock, ResNet

    from fastres.tuning import tune_model

    full = tuning.candidates
    offered = []

    def two_candidates(*shape):
        configs = full(*shape)[1:3]  # [0] is the heuristic; candidates() has no repeats
        offered.append(configs)
        return configs

    monkeypatch.setattr(tuning, "candidates", two_candidates)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval().cuda().half()
    x = torch.randn(2, 3, 32, 32, device="cuda", dtype=FP16)
    path = tune_model(model, x, tmp_path / "cfg", verbose=False)
    arch = tuning.device_arch(x.device)
    assert path == tmp_path / "cfg" / f"{arch}.json"
    data = json.loads(path.read_text())
    table = tuning.read_configs(path, strict=True)
    assert sorted(table) == tiny_resnet_keys(2, 32) and len(table) == 8 and data["tuned_on"]["gpu"]
    assert all(v["ms"] > 0 for v in data["configs"].values())
    assert len(offered) == 8 and all(len(c) == 2 for c in offered)  # one timing per shape
    monkeypatch.setenv("FASTRES_CONFIG_DIR", str(tmp_path / "cfg"))
    tuning.clear_cache()
    stem_key = tuning.shape_key(3, 64, 7, 7, (2, 2), (3, 3), (1, 1), 1, 2 * 16 * 16, FP16)
    stem_offered = full(2 * 16 * 16, 64, 3, 7, 7, FP16)
    assert table[stem_key] in stem_offered[1:3] and table[stem_key] != stem_offered[0]
    w = torch.empty(64, 3, 7, 7, device="cuda", dtype=FP16)
    cfg = tuning.select_config(x, w, stride=(2, 2), padding=(3, 3), dilation=(1, 1), groups=1, m=2 * 16 * 16)
    assert cfg == table[stem_key]


def test_candidates_include_split_k_where_the_k_loop_allows():
    """The tuner times split-K of the default tile (TUNED_SPLITS) so a GPU, not the cost model, decides
    layers such as ResNet-50's layer3/layer4 at batch 32; never where a slice would get < 4 K iterations."""


    long_k = tuning.candidates(32 * 49, 512, 512, 3, 3, torch.float16)  # layer4 3×3: 72 K iterations
    assert {c.split_k for c in long_k} >= {1, *tuning.TUNED_SPLITS}
    assert len(long_k) == len(set(long_k))
    short_k = tuning.candidates(32 * 3136, 64, 64, 1, 1, torch.float16)  # 1×1, C_in 64: one K iteration
    assert {c.split_k for c in short_k} == {1}
    for cfg in long_k:
        if cfg.split_k > 1:
            assert kconv._k_iters(512, 3, 3, cfg.block_k) >= cfg.split_k * kconv.MIN_K_ITERS_PER_SPLIT
