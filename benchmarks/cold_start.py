"""Cold and warm start: time from ``fastres.convert`` (or ``torch.compile``) to the first correct output.

Each measurement runs in a fresh Python process. "cold" points TRITON_CACHE_DIR (and Inductor's
cache) at an empty folder; "warm" runs again with the folder the cold run filled. The process
builds the model and input first; the clock covers convert/compile + the first forward + a sync.
The output is checked against eager in the same dtype before the time counts, at DESIGN.md's
whole-model bound for the path that ran (``bench_models.model_tol``: the interpreter's 1e-4 for fp32
on the CPU, tf32/fp16/bf16 on CUDA). A fastres time also needs the fused conv kernel to have launched
in that timed forward, counted in the child (``fastres.testing.count_launches``) against
``bench_models.fused_launch_floor``. A record failing either check is marked ``valid: false`` with an
``error``, and its time is kept only as ``unchecked_seconds``: never reported as a fastres figure.

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
from benchmarks.bench_models import MODEL_TOL, model_tol
from benchmarks.common import env_info, log, write_run

# The conv kernel whose launches prove a fastres time came from the fused path.
CONV_KERNEL = "_conv_bias_act_fwd_kernel"

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
from fastres.testing import count_launches, randomize_bn, rel_err
from benchmarks.bench_models import fused_launch_floor
provider, arch, batch, size, dtype_name = {args!r}
dev = "cuda" if torch.cuda.is_available() else "cpu"
dtype = dict(fp16=torch.float16, bf16=torch.bfloat16, fp32=torch.float32)[dtype_name]
torch.manual_seed(0)
model = randomize_bn(getattr(torchvision.models, arch)()).eval().to(dev, dtype)
x = torch.randn(batch, 3, size, size, device=dev, dtype=dtype)
saved_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
# The reference is fp32 proper (cuDNN convs default to tf32): the bound is for the provider's error alone.
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
with torch.inference_mode():
    ref = model(x)
torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved_tf32
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
sync()
t0 = time.perf_counter()
if provider == "fastres":
    run = fastres.convert(model, example_input=x)  # warmup: kernels compiled in threads on a GPU
else:
    import torch._inductor.config as cfg
    cfg.freezing = True
    run = torch.compile(model)
# Counting wraps each launch in one Python call (microseconds against seconds of start-up).
with torch.inference_mode(), count_launches() as launches:
    out = run(x)
sync()
seconds = time.perf_counter() - t0
rec = dict(seconds=seconds, rel_err=rel_err(out.float(), ref.float()), device=dev)
if provider == "fastres":
    floor = fused_launch_floor(run)
    rec.update(conv_launches=launches.count_of({conv!r}), launches=len(launches), launch_floor=floor)
print("RESULT " + json.dumps(rec))
"""


def judge(rec: dict, provider: str, dtype: str) -> dict:
    """Mark a child's record valid or not, in place: its error within the whole-model bound of the path
    that ran (``model_tol``), and for fastres at least ``launch_floor`` fused conv launches. An invalid
    record keeps its time only as ``unchecked_seconds``, so nothing reads it as a figure."""
    rec["tol"] = tol = model_tol(dtype, rec["device"])
    rec["correct"] = bool(rec["rel_err"] <= tol)
    errors = [] if rec["correct"] else [f"output off: rel err {rec['rel_err']:.3e} > {tol:g}"]
    if provider == "fastres":
        rec["fused"] = bool(rec["conv_launches"] >= rec["launch_floor"])  # the floor is >= 1
        if not rec["fused"]:
            rec["correct"] = False
            errors.append(
                f"fused kernels did not run: {rec['conv_launches']} conv launches "
                f"< {rec['launch_floor']} (an eager forward is not a fastres figure)"
            )
    rec["valid"] = not errors
    if errors:
        rec["error"] = "; ".join(errors)
        rec["unchecked_seconds"] = rec.pop("seconds")
    return rec


def measure(provider: str, arch: str, batch: int, size: int, dtype: str, cache: str, timeout: float) -> dict:
    env = dict(
        os.environ,
        TRITON_CACHE_DIR=os.path.join(cache, "triton"),
        TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
        PYTHONUNBUFFERED="1",
    )
    env.pop("TRITON_INTERPRET", None)
    code = CHILD.format(repo=str(REPO), args=(provider, arch, batch, size, dtype), conv=CONV_KERNEL)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-1500:], "process_s": wall, "valid": False}
    rec = json.loads(lines[-1][len("RESULT ") :])
    rec["process_s"] = wall
    return judge(rec, provider, dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dtype", default="fp16", choices=sorted(MODEL_TOL))
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
                    rec = {"error": f"timed out after {args.timeout} s", "valid": False}
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
                    + (f", {rec['conv_launches']} conv launches" if "conv_launches" in rec else "")
                    if rec.get("valid")
                    else f"INVALID: {rec['error']}"
                )
                log(f"{provider} {phase} start: {shown}")
    doc = {"env": env_info(), "args": vars(args), "records": records}
    path = write_run(doc, args.out, "cold_start")
    print(f"wrote {path}")
    return 0 if all(r.get("valid") for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
