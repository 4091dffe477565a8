"""The command line: demo and verify on the CPU (interpreter), bench's clear refusal without a GPU."""

import pytest
import torch

from fastres.cli import main


def test_demo_prints_the_per_stage_table(capsys):
    assert main(["demo", "--arch", "resnet18", "--size", "32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for stage in ("maxpool", "layer1", "layer4", "fc"):
        assert stage in out
    assert "20/20 convolutions fused" in out and "OK" in out


def test_verify_checks_against_eager(capsys):
    assert main(["verify", "resnet18", "--size", "32", "--device", "cpu"]) == 0
    assert "resnet18" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown architecture"):
        main(["verify", "resnet7", "--device", "cpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_says_it_needs_a_gpu(capsys):
    assert main(["bench"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_times_on_a_gpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--arch", "resnet18", "--batch", "8", "--json", str(out)]) == 0
    assert out.exists() and "fastres + CUDA graphs" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_tune_script_says_it_needs_a_gpu():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.tune"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 2 and "CUDA GPU" in proc.stderr
