"""Cold and warm start: time from ``fastres.convert`` (or ``torch.compile``) to the first correct output.

Each measurement runs in a fresh Python process. "cold" points TRITON_CACHE_DIR (and Inductor's
cache) at an empty folder; "warm" runs again with the folder the cold run filled. The process
builds the model and input first; the clock covers convert/compile + the first forward + a sync.
The output is checked against eager in the same dtype before the time counts.

    python3 -m benchmarks.cold_start --arch resnet50 --batch 32 --dtype fp16 --out benchmarks/results

On the CPU (no CUDA) it runs the interpreter on a tiny input: the code path, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks._bootstrap import REPO
from benchmarks.common import env_info, log, write_run

# Same bound as the model suite: eager in the same dtype is the reference (DESIGN.md numerics).
TOL = {"fp16": 1e-2, "bf16": 3e-2, "fp32": 5e-3}

CHILD = r"""
import json, os, sys, time
import torch
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, {repo!r})
from benchmarks._bootstrap import ensure_fastres
ensure_fastres()
import torchvision
import fastres
from fastres.testing import randomize_bn, rel_err
provider, arch, batch, size, dtype_name = {args!r}
dev = "cuda" if torch.cuda.is_available() else "cpu"
dtype = dict(fp16=torch.float16, bf16=torch.bfloat16, fp32=torch.float32)[dtype_name]
torch.manual_seed(0)
model = randomize_bn(getattr(torchvision.models, arch)()).eval().to(dev, dtype)
x = torch.randn(batch, 3, size, size, device=dev, dtype=dtype)
with torch.inference_mode():
    ref = model(x)
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
sync()
t0 = time.perf_counter()
if provider == "fastres":
    run = fastres.convert(model, example_input=x)  # warmup: kernels compiled in threads on a GPU
else:
    import torch._inductor.config as cfg
    cfg.freezing = True
    run = torch.compile(model)
with torch.inference_mode():
    out = run(x)
sync()
seconds = time.perf_counter() - t0
print("RESULT " + json.dumps(dict(seconds=seconds, rel_err=rel_err(out.float(), ref.float()))))
"""


def measure(provider: str, arch: str, batch: int, size: int, dtype: str, cache: str, timeout: float) -> dict:
    env = dict(
        os.environ,
        TRITON_CACHE_DIR=os.path.join(cache, "triton"),
        TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
        PYTHONUNBUFFERED="1",
    )
    env.pop("TRITON_INTERPRET", None)
    code = CHILD.format(repo=str(REPO), args=(provider, arch, batch, size, dtype))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-1500:], "process_s": wall}
    rec = json.loads(lines[-1][len("RESULT ") :])
    rec["process_s"] = wall
    rec["correct"] = rec["rel_err"] <= TOL[dtype]
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dtype", default="fp16", choices=sorted(TOL))
    ap.add_argument("--providers", default="fastres,compile", help="comma list: fastres, compile")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per process")
    ap.add_argument("--out", default=None, help="folder or .json path (default benchmarks/results/)")
    args = ap.parse_args(argv)
    records = []
    for provider in [p.strip() for p in args.providers.split(",") if p.strip()]:
        if provider not in ("fastres", "compile"):
            raise SystemExit(f"unknown provider {provider!r}")
        with tempfile.TemporaryDirectory(prefix="fastres-cold-") as cache:
            for phase in ("cold", "warm"):
                log(f"{provider} {phase} start: {args.arch} batch {args.batch} {args.dtype} ...")
                try:
                    rec = measure(provider, args.arch, args.batch, args.size, args.dtype, cache, args.timeout)
                except subprocess.TimeoutExpired:
                    rec = {"error": f"timed out after {args.timeout} s"}
                rec.update(
                    provider=provider,
                    phase=phase,
                    arch=args.arch,
                    batch=args.batch,
                    dtype=args.dtype,
                    size=args.size,
                )
                records.append(rec)
                shown = (
                    f"{rec['seconds']:.2f} s, rel err {rec['rel_err']:.1e}"
                    if "seconds" in rec
                    else rec["error"]
                )
                log(f"{provider} {phase} start: {shown}")
    doc = {"env": env_info(), "args": vars(args), "records": records}
    path = write_run(doc, args.out, "cold_start")
    print(f"wrote {path}")
    return 0 if all("seconds" in r and r["correct"] for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
