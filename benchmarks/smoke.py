"""Every benchmark code path at tiny sizes, on the CPU through Triton's interpreter (``make bench-smoke``).

Runs the per-layer suite on three tiny layers (3x3 + residual, a 7x7/s2 stem with C_in = 3, a 1x1/s2
downsample without ReLU) in fp32 and fp16, the model suite on a one-block-per-stage ResNet
(``resnet_tiny``) at 32x32, batch 1, the launch-and-bytes model on ResNet-18, then report.py.
Providers that need a GPU (cuDNN fused ops, Inductor, CUDA graphs) are skipped with a recorded
reason. Checks that each JSON, the markdown and every PNG exist and are well formed, that fastres
matched its reference at its bound and launched its fused kernels (counted); exits non-zero if not.

    python -m benchmarks.smoke --out benchmarks/results/smoke
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before anything imports triton (torchvision does)
    os.environ.setdefault("TRITON_INTERPRET", "1")

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402

from benchmarks._bootstrap import ensure_fastres  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_layers():
    from benchmarks.shapes import ConvShape, LayerInfo

    shapes = [
        ConvShape(16, 8, 8, 16, 3, 3, 1, 1, has_residual=True),
        ConvShape(3, 16, 16, 16, 7, 7, 2, 3),
        ConvShape(16, 8, 8, 32, 1, 1, 2, 0, relu=False),
        ConvShape(16, 8, 8, 32, 1, 1, 1, 0, has_residual=True),  # where the tma_gemm tactic applies
    ]
    return [LayerInfo(s, 1, {"tiny": 1}, {"tiny": "smoke"}) for s in shapes]


def check(cond: bool, what: str, problems: list[str]) -> None:
    if not cond:
        problems.append(what)


def validate(kern: dict, models: dict, roof: dict, rendered: dict, combined: Path) -> list[str]:
    """Everything the suite promises, as a list of problems (empty = fine)."""
    from benchmarks.common import SCHEMA

    problems: list[str] = []
    docs = json.loads(combined.read_text())["runs"]
    check([d["suite"] for d in docs] == ["kernels", "models", "roofline"], "combined JSON suites", problems)
    for d in docs:
        check(d.get("schema") == SCHEMA, f"{d.get('suite')}: schema", problems)
        for key in ("gpu", "driver", "torch", "triton", "fastres_git_sha", "date"):
            check(key in d["env"], f"{d['suite']}: env lacks {key}", problems)
    fk = [r for r in kern["records"] if r["provider"] == "fastres"]
    check(
        len(fk) == 8  # 4 tiny layers x fp32, fp16
        and all(r.get("correct") and r.get("median_ms", 0) > 0 and r.get("times_ms") for r in fk),
        "kernels: 8 fastres records, correct and timed",
        problems,
    )
    tk = [r for r in kern["records"] if r["provider"] == "fastres_tma_gemm"]
    check(
        len(tk) == 4  # the 1x1 layers (stride 1, stride 2: a strided view); the others skipped with a reason
        and all(r.get("correct") and r.get("fused") and r.get("median_ms", 0) > 0 for r in tk),
        "kernels: 4 fastres_tma_gemm records, fused, correct and timed",
        problems,
    )
    check(
        all(r.get("fused") and r.get("conv_launches") == 1 for r in fk),
        "kernels: each fastres record launched the fused kernel once",
        problems,
    )
    timed = [r for r in kern["records"] + models["records"] if "median_ms" in r]
    check(all(r.get("correct") for r in timed), "every timed record was checked correct", problems)
    check(
        any(r["provider"] == "eager" and "median_ms" in r for r in kern["records"]),
        "kernels: eager timed",
        problems,
    )
    if kern["env"]["device"] == "cpu":
        reasons = {s["provider"] for s in kern["skipped"] if "CUDA" in s["reason"]}
        check(
            reasons == {"cudnn_fused", "compile"},
            f"kernels: GPU-only providers skipped ({reasons})",
            problems,
        )
        reasons = {s["provider"] for s in models["skipped"] if "CUDA" in s["reason"]}
        check(
            reasons == {"cudnn_folded", "compile", "compile_ro", "fastres_graphs"},
            f"models: GPU-only providers skipped ({reasons})",
            problems,
        )
    fm = [r for r in models["records"] if r["provider"] == "fastres"]
    check(
        len(fm) == 1
        and fm[0].get("correct")
        and fm[0].get("images_per_s", 0) > 0
        and fm[0].get("cold_start_s", 0) > 0,
        "models: fastres record correct, timed, cold start",
        problems,
    )
    check(
        len(fm) == 1
        and fm[0].get("fused")
        and fm[0].get("conv_launches", 0) >= fm[0].get("launch_floor", 1e9),
        "models: the fastres forward launched the fused kernels (counted)",
        problems,
    )
    check(
        len(fm) == 1 and fm[0].get("tol") == (1e-4 if models["env"]["device"] == "cpu" else 5e-3),
        "models: fastres fp32 checked at its path's bound (interpreter 1e-4)",
        problems,
    )
    check(
        roof["models"][0]["fastres"]["launches"] < roof["models"][0]["eager"]["launches"],
        "roofline: fastres launches fewer kernels than eager",
        problems,
    )
    md = rendered["markdown"].read_text()
    for heading in ("## Per-layer kernels", "## Whole models", "## Launch-and-bytes model", "## Summary"):
        check(heading in md, f"markdown lacks {heading!r}", problems)
    check(
        "| 16x8x8->16 3x3/s1+res |" in md and "| resnet_tiny | fp32 | 1 |" in md,
        "markdown table rows",
        problems,
    )
    names = sorted(p.name for p in rendered["png"])
    check(
        names == ["kernels_speedup.png", "models_throughput.png", "roofline.png"], f"PNGs {names}", problems
    )
    for p in rendered["png"]:
        data = p.read_bytes()
        check(data[:8] == PNG_MAGIC and len(data) > 5000, f"{p.name} is not a real PNG", problems)
        import matplotlib.image

        try:
            img = matplotlib.image.imread(p)
        except Exception as e:  # a truncated or foreign file
            problems.append(f"{p.name} does not decode: {type(e).__name__}")
            continue
        check(
            img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and float(img.std()) > 0,
            f"{p.name}: blank or tiny image",
            problems,
        )
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/smoke", help="folder for JSON, markdown and PNGs")
    args = ap.parse_args(argv)
    ensure_fastres()
    from benchmarks import bench_kernels, bench_models, report, roofline
    from benchmarks.common import env_info, write_run

    t0 = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kern = bench_kernels.main(
        ["--batches", "2", "--dtypes", "fp32,fp16", "--cpu-reps", "2", "--out", str(out / "kernels.json")],
        shapes=tiny_layers(),
    )
    models = bench_models.main(
        [
            "--models",
            "resnet_tiny",
            "--batches",
            "1",
            "--dtypes",
            "fp32",
            "--image",
            "32",
            "--cpu-reps",
            "1",
            "--out",
            str(out / "models.json"),
        ]
    )
    roof = {
        "env": env_info(),
        "args": {"models": "resnet18"},
        **roofline.build(models=("resnet18",), layer_models=("resnet18",), batches=(1,), layer_batches=(2,)),
    }
    roof_path = write_run(roof, out / "roofline.json", "roofline")
    runs = report.load_runs([kern["path"], models["path"], roof_path])
    combined = report.combine(runs, out / "combined.json")
    rendered = report.render(runs, out)
    problems = validate(kern, models, roof, rendered, combined)
    print("\n".join(report.summary_lines(runs)))
    elapsed = time.monotonic() - t0
    if problems:
        print(f"bench-smoke FAILED after {elapsed:.0f}s:\n  " + "\n  ".join(problems))
        return 1
    print(
        f"bench-smoke OK in {elapsed:.0f}s: {out}/ (combined.json, report.md, "
        f"{', '.join(p.name for p in rendered['png'])})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
