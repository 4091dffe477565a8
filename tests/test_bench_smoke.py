"""``make bench-smoke`` in a test: every benchmark code path at tiny sizes, and its outputs well formed.

The smoke run executes in a subprocess (it needs TRITON_INTERPRET set before triton is imported,
which conftest has done for this process too, and it must not share compiled state with other tests).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_smoke")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.smoke", "--out", str(out)],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "bench-smoke OK" in proc.stdout
    return out


def test_smoke_writes_json_markdown_png(smoke_out):
    runs = json.loads((smoke_out / "combined.json").read_text())["runs"]
    assert [r["suite"] for r in runs] == ["kernels", "models", "roofline"]
    kernels = runs[0]
    fastres = [r for r in kernels["records"] if r["provider"] == "fastres"]
    assert {r["dtype"] for r in fastres} == {"fp32", "fp16"} and len(fastres) == 8  # 4 layers x 2 dtypes
    tma = [r for r in kernels["records"] if r["provider"] == "fastres_tma_gemm"]
    assert len(tma) == 4 and all(r["correct"] and r["fused"] and r["conv_launches"] == 1 for r in tma)
    assert {r["layer"] for r in tma} == {"16x8x8->32 1x1/s1+res", "16x8x8->32 1x1/s2 norelu"}  # s2: a view
    assert {s["layer"] for s in kernels["skipped"] if s["provider"] == "fastres_tma_gemm"} == {
        "16x8x8->16 3x3/s1+res",
        "3x16x16->16 7x7/s2",
    }  # the tactic's applicability rule, recorded with its reason
    for r in fastres:  # checked against the fp32 reference before it was timed
        assert r["correct"] and r["rel_err"] <= r["tol"] and len(r["times_ms"]) == r["n"] >= 1
    md = (smoke_out / "report.md").read_text()
    assert "| 3x16x16->16 7x7/s2 |" in md and "## Whole models" in md
    for name in ("kernels_speedup.png", "models_throughput.png", "roofline.png"):
        assert (smoke_out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_only_providers_are_skipped_with_a_reason(smoke_out):
    runs = json.loads((smoke_out / "combined.json").read_text())["runs"]
    if runs[1]["env"]["device"] != "cpu":
        pytest.skip("on a GPU every provider runs")
    skipped = {s["provider"]: s["reason"] for s in runs[1]["skipped"]}
    assert set(skipped) == {"cudnn_folded", "compile", "compile_ro", "fastres_graphs"}
    assert all(reason for reason in skipped.values())
    assert {r["provider"] for r in runs[1]["records"]} == {"eager", "eager_cl", "fastres"}


def test_validator_catches_a_broken_png(smoke_out, tmp_path):
    sys.path.insert(0, str(REPO))
    from benchmarks import smoke

    copy = tmp_path / "copy"
    shutil.copytree(smoke_out, copy)
    runs = json.loads((copy / "combined.json").read_text())["runs"]
    pngs = sorted(copy.glob("*.png"))
    rendered = {"markdown": copy / "report.md", "png": pngs}
    assert smoke.validate(runs[0], runs[1], runs[2], rendered, copy / "combined.json") == []
    pngs[0].write_bytes(b"not a png")
    problems = smoke.validate(runs[0], runs[1], runs[2], rendered, copy / "combined.json")
    assert any(pngs[0].name in p for p in problems)


# --------------------------------------------------------------------------------------------
# The instrument must not mislead: one deliberate break at a time, each caught (in-process, tiny).


def _models_run(providers):
    sys.path.insert(0, str(REPO))
    from benchmarks import bench_models
    from benchmarks.common import Budget

    records, _ = bench_models.run(
        ["resnet_tiny"], [1], ["fp32"], providers, device="cpu", image=16, budget=Budget(None), cpu_reps=1
    )
    return {r["provider"]: r for r in records}


def test_models_bench_refuses_an_eager_forward_as_fastres(monkeypatch):
    """Fused path forced off: the converted model runs eagerly, its output is exact, and it must not
    be stored as a fastres figure."""
    import fastres.modules

    monkeypatch.setattr(fastres.modules, "fused_path_ok", lambda *a, **k: False)
    rec = _models_run(["fastres"])["fastres"]
    assert rec["rel_err_vs_eager"] < 1e-6  # any output check alone would have passed it
    assert rec["conv_launches"] == 0 and rec["fused"] is False and rec["correct"] is False
    assert "median_ms" not in rec and "did not run" in rec["error"]


def test_models_bench_checks_fp32_at_the_interpreter_bound(monkeypatch):
    """A fold with eps × 30 is off by ~5e-4 on a tiny ResNet: inside the old 5e-3 bench tolerance,
    outside the interpreter's fp32 whole-model bound 1e-4 (DESIGN.md numerics)."""
    import fastres.fold

    def eps_times_30(bn):
        return bn.weight, bn.bias, bn.running_mean, bn.running_var + 29 * bn.eps

    monkeypatch.setattr(fastres.fold, "bn_tensors", eps_times_30)
    rec = _models_run(["fastres"])["fastres"]
    assert rec["fused"] and rec["tol"] == 1e-4
    assert 1e-4 < rec["rel_err_vs_eager"] < 5e-3
    assert rec["correct"] is False and "median_ms" not in rec and "output off" in rec["error"]


def test_models_bench_reports_a_wrong_peer_and_does_not_time_it(monkeypatch):
    from benchmarks import bench_models

    real = bench_models.build

    def build(provider, base, x, master=None, **kw):
        fn, inp = real(provider, base, x, master, **kw)
        return ((lambda t: fn(t) * 1.01), inp) if provider == "eager_cl" else (fn, inp)

    monkeypatch.setattr(bench_models, "build", build)
    recs = _models_run(["eager_cl", "eager"])
    assert recs["eager_cl"]["correct"] is False and "median_ms" not in recs["eager_cl"]
    assert "output off" in recs["eager_cl"]["error"]
    assert recs["eager"]["correct"] and recs["eager"]["median_ms"] > 0


def test_kernels_bench_refuses_a_fastres_figure_without_its_kernel(monkeypatch):
    """The launcher swapped for an eager conv with the right numbers: no launch counted, no figure."""
    import torch.nn.functional as F

    import fastres.kernels.tuning as tuning

    sys.path.insert(0, str(REPO))
    from benchmarks import bench_kernels, smoke
    from benchmarks.common import Budget

    def eager(x, w, b, *, residual=None, stride=1, padding=0, dilation=1, groups=1, relu=True, **_):
        y = F.conv2d(x.float(), w.float(), b, stride, padding, dilation, groups)
        y = y if residual is None else y + residual.float()
        return (y.relu() if relu else y).to(x.dtype)

    monkeypatch.setattr(tuning, "conv_bias_act", eager)
    records, _ = bench_kernels.run(
        smoke.tiny_layers()[:1], [2], ["fp32"], ["fastres"], budget=Budget(None), device="cpu", peaks={}
    )
    (rec,) = records
    assert rec["rel_err"] <= 1e-5 and rec["conv_launches"] == 0
    assert rec["fused"] is False and rec["correct"] is False and "median_ms" not in rec


def test_gpu_check_dry_run_plans_within_ten_minutes(tmp_path):
    """The plan: every step under `timeout -k` (a process stuck in CUDA still ends), the GPU tests
    selected as `gpu or cuda_ok` with durations, and the worst case (every step at its hard
    timeout plus the kill grace) under the 600 s the GPU machine allows."""
    import re

    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
        cwd=REPO,
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "imports OK" in out and "dry run done" in out
    worst = int(re.search(r"plan: worst case (\d+) s", out).group(1))
    assert 0 < worst <= 600
    launches = [ln for ln in out.splitlines() if ln.startswith("+ timeout")]
    assert len(launches) == 6 and all(ln.startswith("+ timeout -k ") for ln in launches)
    assert "-m gpu or cuda_ok" in launches[0] and "--durations=15" in launches[0]
    # The tuner runs before the model benchmarks, which read its table through FASTRES_CONFIG_DIR; the dry
    # run imports it and prints its plan.
    assert "-m benchmarks.tune" in launches[1] and "--budget-s" in launches[1] and "--out" in launches[1]
    assert "-m benchmarks.bench_models" in launches[2]
    tuned = re.search(r"--out (\S+)", launches[1]).group(1)
    assert out.index(f"FASTRES_CONFIG_DIR={tuned}") < out.index(launches[2])
    assert "tuner plan: 24 layers" in out and "tuner dry run OK" in out
    # Host work and batch-1 latency (issue 10) after the models, its JSON straight into OUTDIR (8 files).
    assert "host_overhead.py --cuda" in launches[3] and f"--out {tmp_path}" in launches[3]
    assert (tmp_path / "gpu_check.log").exists() and len(list(tmp_path.iterdir())) <= 8
