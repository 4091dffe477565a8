"""A wheel of the project installs fastres with fastres.kernels (never a top-level ``kernels``)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_imports(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheel_dir.glob("fastres-*.whl")
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert inst.returncode == 0, inst.stderr[-2000:]
    assert (target / "fastres" / "kernels" / "conv.py").is_file()
    assert not (target / "kernels").exists(), "kernels/ must install as fastres.kernels only"
    probe = (
        "import importlib.util, fastres, fastres.kernels.conv as c;"
        "print(fastres.__file__); print(c.__file__);"
        "print(importlib.util.find_spec('kernels') is None)"
    )
    env = {"PYTHONPATH": str(target), "TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    fastres_file, conv_file, no_top_level = run.stdout.split()
    assert fastres_file.startswith(str(target)) and conv_file.startswith(str(target))
    assert no_top_level == "True"
