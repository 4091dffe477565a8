"""benchmarks/cold_start.py on the CPU: the code path (fresh processes, empty then filled cache)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cold_start_script_writes_checked_records(tmp_path):
    out = tmp_path / "cold.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.cold_start",
        "--arch",
        "resnet18",
        "--batch",
        "1",
        "--size",
        "32",
    ]
    cmd += ["--dtype", "fp32", "--providers", "fastres", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["suite"] == "cold_start"
    assert [(r["provider"], r["phase"]) for r in doc["records"]] == [("fastres", "cold"), ("fastres", "warm")]
    for r in doc["records"]:
        assert r["correct"] and r["rel_err"] < 1e-4 and r["seconds"] > 0
