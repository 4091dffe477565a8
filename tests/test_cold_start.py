"""benchmarks/cold_start.py on the CPU: the code path (fresh processes, empty then filled cache), the fused
launch count its child records, and the records it must not report as fastres figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The child runs the interpreter only where there is no CUDA; on a GPU the script is a measurement.
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (interpreter) code path")
TINY = ["--arch", "resnet18", "--batch", "1", "--size", "32", "--dtype", "fp32", "--providers", "fastres"]


@pytest.fixture
def cold_start(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import cold_start

    return cold_start


@CPU_ONLY
def test_cold_start_script_writes_checked_records(tmp_path):
    out = tmp_path / "cold.json"
    cmd = [sys.executable, "-m", "benchmarks.cold_start", *TINY, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["suite"] == "cold_start"
    assert [(r["provider"], r["phase"]) for r in doc["records"]] == [("fastres", "cold"), ("fastres", "warm")]
    for r in doc["records"]:
        assert r["valid"] and r["correct"] and r["fused"] and "error" not in r, r
        # The interpreter's whole-model bound, not the GPU's tf32 one.
        assert r["device"] == "cpu" and r["tol"] == 1e-4 and r["rel_err"] < 1e-4 and r["seconds"] > 0
        # ResNet-18: 20 convs, the 3 projection shortcuts ride in their block's dual GEMM: 17 conv
        # launches, plus the stem's max-pool and the global average pool.
        assert r["launch_floor"] == 17 and r["conv_launches"] == 17 and r["launches"] == 19, r


@CPU_ONLY
def test_cold_start_with_the_fused_path_off_is_not_a_fastres_figure(tmp_path, monkeypatch, cold_start):
    """The mutation that used to pass: every fused module runs eagerly in the child (its output is
    then exact), so only the launch count can tell; the records are invalid and the run fails."""
    anchor = "import fastres\n"
    assert cold_start.CHILD.count(anchor) == 1
    forced_off = "import fastres.modules\nfastres.modules.fused_path_ok = lambda *a, **k: False\n"
    monkeypatch.setattr(cold_start, "CHILD", cold_start.CHILD.replace(anchor, anchor + forced_off))
    out = tmp_path / "cold.json"
    assert cold_start.main([*TINY, "--out", str(out)]) == 1
    records = json.loads(out.read_text())["records"]
    assert [r["phase"] for r in records] == ["cold", "warm"]
    for r in records:
        assert r["rel_err"] < 1e-4, r  # eager against eager: only the launch check catches it
        assert r["conv_launches"] == 0 and r["launch_floor"] == 17, r
        assert not r["valid"] and not r["fused"] and not r["correct"], r
        assert "fused kernels did not run" in r["error"], r
        assert "seconds" not in r and r["unchecked_seconds"] > 0, r


def _child_record(rel_err, device, conv_launches=17):
    return dict(seconds=1.5, rel_err=rel_err, device=device, conv_launches=conv_launches, launches=19,
                launch_floor=17)


@pytest.mark.parametrize(
    "provider, dtype, device, rel_err, valid",
    [
        # fp32: the interpreter's 1e-4 on the CPU, tf32's 5e-3 on CUDA (DESIGN.md, whole model).
        ("fastres", "fp32", "cpu", 9e-5, True),
        ("fastres", "fp32", "cpu", 1e-3, False),
        ("fastres", "fp32", "cuda", 1e-3, True),
        ("fastres", "fp32", "cuda", 6e-3, False),
        ("fastres", "fp16", "cuda", 9e-3, True),
        ("fastres", "fp16", "cuda", 1.1e-2, False),
        ("fastres", "bf16", "cuda", 2.9e-2, True),
        ("fastres", "bf16", "cuda", 3.1e-2, False),
        ("compile", "fp16", "cuda", 1.1e-2, False),
    ],
)
def test_judge_holds_each_path_to_its_whole_model_bound(cold_start, provider, dtype, device, rel_err, valid):
    rec = cold_start.judge(_child_record(rel_err, device), provider, dtype)
    assert rec["valid"] is valid and rec["correct"] is valid, rec
    assert ("seconds" in rec) is valid and ("unchecked_seconds" in rec) is not valid
    if not valid:
        assert "output off" in rec["error"], rec


@pytest.mark.parametrize("conv_launches, valid", [(0, False), (16, False), (17, True), (20, True)])
def test_judge_needs_the_fused_launch_floor(cold_start, conv_launches, valid):
    rec = cold_start.judge(_child_record(1e-5, "cpu", conv_launches), "fastres", "fp32")
    assert rec["valid"] is valid and rec["fused"] is valid, rec
    assert ("fused kernels did not run" in rec.get("error", "")) is not valid
