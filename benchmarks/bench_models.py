"""Whole-model benchmark: torchvision ResNets end to end, fastres against the ways PyTorch runs them.

Providers:
  eager           the model as is, NCHW
  eager_cl        the model and input in channels_last
  cudnn_folded    BN folded into the convs, cuDNN fused conv(+add)+ReLU ops (benchmarks/peers.py)
  compile         torch.compile, Inductor, freezing on (``--max-autotune`` for mode="max-autotune")
  compile_ro      torch.compile mode="reduce-overhead" (CUDA graphs), batch 1 only
  fastres         fastres.convert(model), same NCHW input as eager (drop-in use)
  fastres_graphs  the converted model replayed from a CUDA graph (benchmarks/peers.CudaGraphRunner)

For each (model, dtype, batch) the eager output is the reference; every provider's output is
compared with it before timing and the error recorded (fastres must be within DESIGN.md's model
bound). Reports images/s, latency p50/p90 (all raw times kept), peak memory and cold start (build,
convert or compile until the first output is on the host side of a synchronize).
fp32 runs with tf32 dots everywhere (the cuDNN and fastres defaults).

    python -m benchmarks.bench_models --models resnet50 --batches 1,32,256 --dtypes fp16 --budget 200
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._bootstrap import ensure_fastres  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Budget,
    Stop,
    env_info,
    log,
    measure_peaks,
    parse_list,
    stop_on_sigterm,
    summarize,
    tf32_mode,
    time_fn,
    torch_dtype,
    write_run,
)

MODELS = ("resnet18", "resnet50", "resnet101", "resnet152")
# In priority order: when the budget runs short, the later ones are skipped first.
PROVIDERS = ("eager", "fastres", "cudnn_folded", "compile", "fastres_graphs", "eager_cl", "compile_ro")
# Inductor compiles a whole ResNet in tens of seconds: do not start one with less time than this left.
COMPILE_RESERVE_S = 45
# DESIGN.md "Numerics", whole model, against eager in the same dtype.
MODEL_TOL = {"fp16": 1e-2, "bf16": 3e-2, "fp32": 5e-3}


def skip_reason(provider: str, dtype: str, batch: int, device: str) -> str | None:
    if provider == "compile_ro" and batch != 1:
        return "reduce-overhead is measured at batch 1 only"
    if device != "cuda":
        if provider in ("cudnn_folded", "compile", "compile_ro", "fastres_graphs"):
            return "needs CUDA (cuDNN fused ops / Inductor GPU codegen / CUDA graphs)"
        if dtype == "bf16" and provider.startswith("fastres"):
            return "Triton's interpreter has no bf16 dot"
    return None


def build(provider: str, base, x, master=None, *, max_autotune: bool = False):
    """(callable taking the input, the input it should get) for ``provider``; may compile lazily."""
    import torch

    if provider == "eager":
        return base, x
    if provider == "eager_cl":
        return copy.deepcopy(base).to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last
        )
    if provider == "cudnn_folded":
        from benchmarks.peers import CudnnFoldedResNet

        return CudnnFoldedResNet(copy.deepcopy(master), x.dtype).to(x.device).to(x.dtype), x
    if provider in ("compile", "compile_ro"):
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        mode = "reduce-overhead" if provider == "compile_ro" else ("max-autotune" if max_autotune else None)
        torch._dynamo.reset()  # ResNet.forward is shared by every model: keep under the recompile limit
        return torch.compile(copy.deepcopy(base), mode=mode, dynamic=False), x
    if provider in ("fastres", "fastres_graphs"):
        import fastres

        fast = fastres.convert(base)
        if provider == "fastres":
            return fast, x
        from benchmarks.peers import CudaGraphRunner

        return CudaGraphRunner(fast, x), x
    raise ValueError(provider)


def make_model(arch: str, dtype_name: str, device: str, image: int, batch: int, seed: int = 0):
    import torch
    import torchvision

    from fastres.testing import randomize_bn

    torch.manual_seed(seed)
    model = randomize_bn(getattr(torchvision.models, arch)(), seed).eval().to(device)
    dtype = torch_dtype(dtype_name)
    x = torch.randn(batch, 3, image, image, device=device).to(dtype)
    master = copy.deepcopy(model)  # fp32 copy: the cuDNN fold reads it, as fastres's fold reads fp32-or-wider
    return master, model.to(dtype), x


def run(
    models,
    batches,
    dtypes,
    providers,
    *,
    device: str,
    image: int,
    budget: Budget,
    max_autotune: bool = False,
    rep_ms: int = 200,
    warmup_ms: int = 25,
    cpu_reps: int = 2,
) -> tuple[list, list]:
    import torch

    from fastres.testing import rel_err

    cuda = device == "cuda"
    records, skipped = [], []
    groups = [(a, d, b) for a in models for d in dtypes for b in batches]
    try:
        for i, (arch, dtype_name, batch) in enumerate(groups, 1):
            tag = f"[{i}/{len(groups)}] {arch} {dtype_name} b{batch}"
            if budget.spent():
                skipped.append(
                    {
                        "model": arch,
                        "dtype": dtype_name,
                        "batch": batch,
                        "provider": "*",
                        "reason": "time budget spent",
                    }
                )
                log(f"{tag}: skipped (time budget spent)")
                continue
            dot = "tf32" if dtype_name == "fp32" else dtype_name
            with torch.no_grad(), tf32_mode(dot):
                try:
                    master, base, x = make_model(arch, dtype_name, device, image, batch)
                    ref = base(x).float()
                except Exception as e:
                    skipped.append(
                        {
                            "model": arch,
                            "dtype": dtype_name,
                            "batch": batch,
                            "provider": "*",
                            "reason": f"eager reference failed: {type(e).__name__}: {str(e)[:200]}",
                        }
                    )
                    log(f"{tag}: eager reference failed ({type(e).__name__})")
                    continue
                line = []
                for provider in providers:
                    why = skip_reason(provider, dtype_name, batch, device) or (
                        "time budget spent" if budget.spent() else None
                    )
                    if why:
                        skipped.append(
                            {
                                "model": arch,
                                "dtype": dtype_name,
                                "batch": batch,
                                "provider": provider,
                                "reason": why,
                            }
                        )
                        continue
                    rec = {
                        "model": arch,
                        "dtype": dtype_name,
                        "dot": dot,
                        "batch": batch,
                        "image": image,
                        "provider": provider,
                        "input_layout": "NHWC" if provider == "eager_cl" else "NCHW",
                    }
                    try:
                        if cuda:
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                            rec["baseline_mem_mb"] = torch.cuda.memory_allocated() / 2**20
                        t0 = time.perf_counter()
                        fn, inp = build(provider, base, x, master, max_autotune=max_autotune)
                        out = fn(inp)
                        if cuda:
                            torch.cuda.synchronize()
                        rec["cold_start_s"] = time.perf_counter() - t0
                        err = rel_err(out.float(), ref)
                        rec["rel_err_vs_eager"] = err
                        rec["tol"] = MODEL_TOL[dtype_name]
                        rec["correct"] = bool(err <= MODEL_TOL[dtype_name])
                        if provider.startswith("fastres") and not rec["correct"]:
                            rec["error"] = f"fastres output off: rel err {err:.3e} > {MODEL_TOL[dtype_name]}"
                            records.append(rec)
                            line.append(f"{provider} WRONG({err:.1e})")
                            continue
                        times = time_fn(
                            lambda fn=fn, inp=inp: fn(inp),
                            device=device,
                            warmup_ms=warmup_ms,
                            rep_ms=rep_ms,
                            cpu_reps=cpu_reps,
                        )
                        if cuda:
                            rec["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
                    except Exception as e:  # one provider failing must not end the run
                        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        records.append(rec)
                        line.append(f"{provider} ERROR({type(e).__name__})")
                        continue
                    finally:
                        fn = inp = out = None  # noqa: F841 - free the provider's model before the next one
                        if cuda:
                            torch.cuda.empty_cache()
                    rec.update(summarize(times))
                    rec["images_per_s"] = batch / (rec["median_ms"] * 1e-3)
                    records.append(rec)
                    line.append(f"{provider} {rec['images_per_s']:.0f} img/s")
                log(f"{tag}: " + ", ".join(line) + f"  [{budget.elapsed():.0f}s]")
                master = base = x = ref = None
                if cuda:
                    torch.cuda.empty_cache()
    except Stop as e:  # SIGTERM from gpu_check.sh's hard timeout: keep what was measured
        skipped.append({"provider": "*", "reason": str(e)})
        log(f"{e}: writing what was measured")
    return records, skipped


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument(
        "--budget", type=float, default=None, help="seconds; groups not started are recorded as skipped"
    )
    ap.add_argument("--max-autotune", action="store_true", help="compile provider with mode='max-autotune'")
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--cpu-reps", type=int, default=2, help="timed calls per case on the CPU")
    ap.add_argument("--out", default=None, help="folder or .json path (default benchmarks/results/)")
    args = ap.parse_args(argv)
    ensure_fastres()
    stop_on_sigterm()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: set TRITON_INTERPRET=1 before starting to run fastres in the interpreter")
    budget = Budget(args.budget)
    env = env_info()
    log(
        f"bench_models on {env['gpu'] or 'CPU (interpreter)'}: models {args.models}, batches {args.batches}, "
        f"dtypes {args.dtypes}, providers {args.providers}, image {args.image}, budget {args.budget}s"
    )
    peaks = measure_peaks(device)
    records, skipped = run(
        parse_list(args.models, MODELS),
        parse_list(args.batches, conv=int),
        parse_list(args.dtypes, tuple(MODEL_TOL)),
        parse_list(args.providers, PROVIDERS),
        device=device,
        image=args.image,
        budget=budget,
        max_autotune=args.max_autotune,
        rep_ms=args.rep_ms,
        cpu_reps=args.cpu_reps,
    )
    doc = {
        "env": env,
        "args": vars(args),
        "peaks": peaks,
        "elapsed_s": round(budget.elapsed(), 1),
        "records": records,
        "skipped": skipped,
    }
    path = write_run(doc, args.out, "models")
    log(f"wrote {path} ({len(records)} records, {len(skipped)} skipped, {budget.elapsed():.0f}s)")
    doc["path"] = str(path)
    return doc


if __name__ == "__main__":
    main()
