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
    assert {r["dtype"] for r in fastres} == {"fp32", "fp16"} and len(fastres) == 6
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
