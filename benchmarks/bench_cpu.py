"""The CPU path against PyTorch on the CPU: ResNet-50 fp32, whole model, eval, no GPU, no interpreter.

Providers, one model's weights (random, BN statistics and affine randomised) shared by all:
  eager       the torchvision model, NCHW input
  eager_cl    the same model and input in channels_last
  compile     torch.compile with Inductor's freezing (its CPU oneDNN weight prepacking and fusions);
              the first call (the compile) is recorded as compile_s, one compile per input shape
  fastres     fastres.convert(model) on the CPU path (fastres/cpu.py)

Per case (batch, image size): each provider is warmed up once, then ``reps`` rounds each call every
provider once, the order rotated every round so no provider always follows another; medians and
the spread (min, max) per provider, ratios to eager from the medians of the same run. Every case
checks fastres against an fp64 eager reference (norm-relative error, DESIGN's fp32 whole-model bound
1e-4): a case over it records ``ok: false``. The JSON (``suite: "cpu"``) is rewritten after every case.

    make bench-cpu                    # the default grid, JSON in benchmarks/results/cpu/
    .venv/bin/python -m benchmarks.bench_cpu --batches 1 --sizes 224 --providers eager,fastres
    .venv/bin/python -m benchmarks.bench_cpu --markdown benchmarks/results/cpu/cpu-*.json   # the table

TRITON_INTERPRET must not be set: the interpreter would run instead of the CPU path.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._bootstrap import REPO, ensure_fastres  # noqa: E402
from benchmarks.common import env_info, log, parse_list, write_run  # noqa: E402

PROVIDERS = ("eager", "eager_cl", "compile", "fastres")
DEFAULT_OUT = REPO / "benchmarks" / "results" / "cpu"
FP32_MODEL_BOUND = 1e-4  # DESIGN.md, Numerics: fp32 whole model against fp64 eager


def _stats(times: list[float]) -> dict:
    s = sorted(times)
    return {
        "median_ms": statistics.median(s),
        "min_ms": s[0],
        "max_ms": s[-1],
        "times_ms": [round(t, 3) for t in s],
    }


def build(providers, seed: int):
    """The providers' callables on one randomised ResNet-50 (and the fp32 model for the reference)."""
    import torch
    import torchvision

    import fastres
    from fastres.testing import randomize_bn

    torch.manual_seed(seed)
    model = randomize_bn(torchvision.models.resnet50(), seed=seed).eval()
    made = {}
    if "eager" in providers:
        made["eager"] = (model, False)
    if "eager_cl" in providers:
        made["eager_cl"] = (copy.deepcopy(model).to(memory_format=torch.channels_last), True)
    if "compile" in providers:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # what a CPU inference deployment of Inductor uses
        made["compile"] = (torch.compile(copy.deepcopy(model), dynamic=False), False)
    if "fastres" in providers:
        made["fastres"] = (fastres.convert(copy.deepcopy(model)), False)
    return model, made


def run_case(model, made, batch: int, size: int, reps: int, seed: int) -> dict:
    import torch

    from fastres.testing import rel_err

    g = torch.Generator().manual_seed(seed + batch * 1000 + size)
    x = torch.randn(batch, 3, size, size, generator=g)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    names = list(made)
    calls = {n: (lambda m=m, xi=(x_cl if cl else x): m(xi)) for n, (m, cl) in made.items()}
    rec = {"batch": batch, "size": size, "reps": reps, "providers": {}}
    outs = {}
    with torch.no_grad():
        for n in names:  # warm-up: compiles, folds and packs happen here
            t0 = time.perf_counter()
            outs[n] = calls[n]()
            rec["providers"][n] = {"first_call_s": round(time.perf_counter() - t0, 3)}
        times = {n: [] for n in names}
        for r in range(reps):
            for n in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                calls[n]()
                times[n].append((time.perf_counter() - t0) * 1e3)
        ref = model.double()(x.double())
        model.float()
    for n in names:
        p = rec["providers"][n]
        p.update(_stats(times[n]))
        p["rel_err_fp64"] = rel_err(outs[n], ref)
    if "compile" in rec["providers"]:
        rec["providers"]["compile"]["compile_s"] = rec["providers"]["compile"]["first_call_s"]
    if "fastres" in rec["providers"]:
        rec["ok"] = rec["providers"]["fastres"]["rel_err_fp64"] <= FP32_MODEL_BOUND
    base = rec["providers"].get("eager", {}).get("median_ms")
    for p in rec["providers"].values():
        p["speedup_vs_eager"] = base / p["median_ms"] if base else None
    return rec


def markdown(doc: dict) -> str:
    """The table the README shows, from a run's JSON."""
    env = doc["env"]
    provs = [p for p in PROVIDERS if any(p in r["providers"] for r in doc["records"])]
    head = ["batch", "image"] + [f"{p} ms (× eager)" for p in provs] + ["compile s", "fastres err"]
    lines = [
        f"ResNet-50 fp32, CPU: {env.get('cpu_model')}, {doc['threads']} threads, torch {env['torch']}, "
        f"fastres {env.get('fastres_git_sha')}, {env['date'][:10]}. Medians of interleaved calls "
        "(spread min–max in the JSON); × eager from the same run.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in doc["records"]:
        cells = [str(r["batch"]), f"{r['size']}²"]
        for p in provs:
            v = r["providers"].get(p)
            cells.append("—" if v is None else f"{v['median_ms']:.1f} ({v['speedup_vs_eager']:.2f}×)")
        c = r["providers"].get("compile")
        cells.append("—" if c is None else f"{c['compile_s']:.0f}")
        f = r["providers"].get("fastres")
        cells.append("—" if f is None else f"{f['rel_err_fp64']:.1e}" + ("" if r.get("ok") else " FAIL"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--sizes", default="64,224")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--reps", type=int, default=15, help="timed rounds per case")
    ap.add_argument(
        "--large-reps", type=int, default=5, help="rounds for cases of 32 or more 224² images (slow here)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="folder or .json path")
    ap.add_argument("--markdown", metavar="JSON", help="print the table of a saved run and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 is set: unset it to benchmark the CPU path, not the interpreter")
    ensure_fastres()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    providers = parse_list(args.providers, PROVIDERS)
    env = env_info()
    env["cpu_model"] = _cpu_model()
    env["mkldnn"] = torch.backends.mkldnn.is_available()
    doc = {
        "env": env,
        "args": vars(args),
        "model": "resnet50",
        "dtype": "fp32",
        "threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "records": [],
    }
    out = Path(args.out)
    if out.suffix != ".json":
        out = out / f"cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    log(f"bench_cpu: ResNet-50 fp32, {doc['threads']} threads, providers {providers}, -> {out}")
    model, made = build(providers, args.seed)
    for size in parse_list(args.sizes, conv=int):
        for batch in parse_list(args.batches, conv=int):
            reps = args.large_reps if batch * size * size >= 32 * 224 * 224 else args.reps
            t0 = time.perf_counter()
            rec = run_case(model, made, batch, size, reps, args.seed)
            rec["loadavg_end"] = os.getloadavg()
            doc["records"].append(rec)
            doc["loadavg_end"] = os.getloadavg()
            write_run(doc, out, "cpu")
            cells = "  ".join(
                f"{n} {p['median_ms']:.1f} ms ({p['speedup_vs_eager'] or 0:.2f}x)"
                for n, p in rec["providers"].items()
            )
            log(f"batch {batch:3d} {size}²: {cells}  ok={rec.get('ok')}  [{time.perf_counter() - t0:.0f} s]")
    log(f"wrote {out}")
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
