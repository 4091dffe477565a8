"""Shared by the benchmark scripts: environment record, JSON output, timing, dtype names, budget.

Every run writes one JSON document (``write_run``) with this top level:
``{"schema": "fastres-bench/1", "suite": ..., "env": {...}, "args": {...}, "records": [...],
"skipped": [...], ...}``; ``report.py`` reads it. Raw times are kept in every record.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._bootstrap import REPO, ensure_fastres

SCHEMA = "fastres-bench/1"
DEFAULT_OUT = REPO / "benchmarks" / "results"

DTYPE_NAMES = ("fp16", "bf16", "tf32", "fp32")


def torch_dtype(name: str):
    """fp16/bf16 → half types; tf32 and fp32 are both float32 tensors (tf32 = tensor-core fp32 dots)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "tf32": torch.float32, "fp32": torch.float32}[name]


class tf32_mode:
    """Context: allow tf32 in cuDNN/cuBLAS for the "tf32" dtype, force IEEE fp32 for "fp32"."""

    def __init__(self, dtype_name: str):
        self.on = dtype_name == "tf32"

    def __enter__(self):
        import torch

        self._saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = self.on
        torch.backends.cudnn.allow_tf32 = self.on
        return self

    def __exit__(self, *exc):
        import torch

        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._saved
        return False


def fastres_precision(dtype_name: str) -> str:
    """The fastres fp32 dot mode matching a dtype name."""
    return "ieee" if dtype_name == "fp32" else "tf32"


def parse_list(text: str | None, allowed=None, conv=str) -> list | None:
    if text is None:
        return None
    items = [conv(t.strip()) for t in text.split(",") if t.strip()]
    if allowed is not None:
        bad = [i for i in items if i not in allowed]
        if bad:
            raise SystemExit(f"unknown value(s) {bad}; choose from {list(allowed)}")
    return items


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "fastres", "kernels"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def source_digest() -> str:
    """sha256 over fastres/ and kernels/ sources: identifies the code even where .git is absent."""
    h = hashlib.sha256()
    for folder in ("fastres", "kernels"):
        for p in sorted((REPO / folder).rglob("*.py")):
            h.update(str(p.relative_to(REPO)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def env_info() -> dict:
    """What ran where: GPU, driver, versions, fastres revision, date."""
    import torch
    import triton

    how = ensure_fastres()
    cuda = torch.cuda.is_available()
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "gpu_sm_count": torch.cuda.get_device_properties(0).multi_processor_count if cuda else None,
        "driver": _driver_version() if cuda else None,
        "device": "cuda" if cuda else "cpu",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "fastres_git_sha": os.environ.get("FASTRES_GIT_SHA") or _git_sha(),
        "fastres_source_digest": source_digest(),
        "fastres_import": how,
    }
    return info


def write_run(doc: dict, out: str | os.PathLike | None, suite: str) -> Path:
    """Write one run's JSON. ``out`` is a file path (*.json) or a folder (default benchmarks/results/)."""
    doc = {"schema": SCHEMA, "suite": suite, **doc}
    out = Path(out) if out else DEFAULT_OUT
    if out.suffix != ".json":
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = out / f"{suite}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return out


class Stop(BaseException):
    """Raised by SIGTERM (``timeout`` in gpu_check.sh): the run loop stops and the JSON is still written."""


def stop_on_sigterm() -> None:
    import signal

    def handler(signum, frame):
        raise Stop(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, handler)


class Budget:
    """A wall-clock budget: ``left()`` seconds remain; ``spent()`` says when to stop starting work."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def spent(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve


def time_fn(fn, *, device: str, warmup_ms: int = 25, rep_ms: int = 100, cpu_reps: int = 3) -> list[float]:
    """All per-call times in ms. CUDA: ``triton.testing.do_bench`` (L2 flushed between calls; host
    time included, which is the point for whole models); CPU: wall clock over ``cpu_reps`` calls
    after one warm-up call (the interpreter is slow)."""
    if device == "cuda":
        from triton.testing import do_bench

        times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        return [float(t) for t in times]
    fn()
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_kernel(fn, *, device: str, rep_ms: int = 100, cpu_reps: int = 3) -> tuple[list[float], str]:
    """(per-call ms, timer) for one layer's kernels without host time: ``do_bench_cudagraph`` captures
    many calls in one CUDA graph and times its replays (triton 3.x, 3.6 and 3.8 alike; run on a side
    stream, which older versions required). Where a provider cannot be captured the timer falls back
    to ``do_bench`` and says so. CPU: as ``time_fn``."""
    if device != "cuda":
        return time_fn(fn, device=device, cpu_reps=cpu_reps), "cpu-wall"
    import torch
    from triton.testing import do_bench_cudagraph

    try:
        with torch.cuda.stream(torch.cuda.Stream()):
            times = do_bench_cudagraph(fn, rep=rep_ms, return_mode="all")
        torch.cuda.synchronize()
        return [float(t) for t in times], "do_bench_cudagraph"
    except Exception:  # noqa: BLE001 - not capturable (a peer that syncs, say): host time included
        torch.cuda.synchronize()
        return time_fn(fn, device=device, rep_ms=rep_ms), "do_bench (not capturable)"


class peer_settings:
    """Context for timing peers fairly: shapes are fixed, so cuDNN may pick its algorithms by
    measuring (``cudnn.benchmark``), as a tuned deployment would."""

    def __enter__(self):
        import torch

        self._saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        return self

    def __exit__(self, *exc):
        import torch

        torch.backends.cudnn.benchmark = self._saved
        return False


def summarize(times: list[float]) -> dict:
    """median / p50 / p90 / min of a list of ms times, plus the raw list."""
    s = sorted(times)

    def q(p):
        return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]

    return {
        "median_ms": statistics.median(s),
        "p50_ms": statistics.median(s),
        "p90_ms": q(0.9),
        "min_ms": s[0],
        "n": len(s),
        "times_ms": [round(t, 5) for t in s],
    }


def measure_peaks(device: str, *, gemm_n: int = 8192, copy_mib: int = 1024) -> dict:
    """This run's device peak: a large bf16 GEMM (TFLOP/s) and a device-to-device copy (GB/s, read+write).
    On CPU returns None values: there is no device to measure."""
    if device != "cuda":
        return {"gemm_tflops_bf16": None, "copy_gbps": None, "note": "no GPU: nothing measured"}
    import torch

    a = torch.randn(gemm_n, gemm_n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(gemm_n, gemm_n, device="cuda", dtype=torch.bfloat16)
    ms = summarize(time_fn(lambda: a @ b, device="cuda", rep_ms=200))["median_ms"]
    tflops = 2 * gemm_n**3 / (ms * 1e-3) / 1e12
    n = copy_mib * 2**20 // 2
    src = torch.empty(n, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    ms_c = summarize(time_fn(lambda: dst.copy_(src), device="cuda", rep_ms=200))["median_ms"]
    gbps = 2 * src.numel() * 2 / (ms_c * 1e-3) / 1e9
    a = b = src = dst = None  # free before the benchmarks allocate
    torch.cuda.empty_cache()
    return {
        "gemm_tflops_bf16": tflops,
        "gemm_n": gemm_n,
        "gemm_ms": ms,
        "copy_gbps": gbps,
        "copy_mib": copy_mib,
        "copy_ms": ms_c,
    }


def log(msg: str) -> None:
    print(msg, flush=True)
