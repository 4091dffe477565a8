"""Host work of a fused forward on the CUDA path, measured on the CPU with the kernel launches recorded.

At batch 1 a ResNet-50's kernels take well under a millisecond on a Hopper GPU, so host work sets the
latency (DESIGN.md, The hot path: ≤ 10 µs per fused layer, launch included). No GPU is needed to
measure that host work: the model runs on CPU tensors through the CUDA code path, and every Triton
launch goes through the real ``JITFunction.run`` (binder, specialisation, kernel-cache lookup, launch
metadata) up to the compiled kernel's launcher, which records instead of launching. How:

- the active Triton driver is a stand-in: current device 0, stream 0, target sm_90;
- each kernel's ``compile`` returns a ``RecordedKernel`` (nothing is compiled, nothing runs);
- the CPU path is switched off (``recorded_launches``), so CPU tensors take the kernels' path,
  and the launchers' CUDA-only device check is relaxed.
Outputs are uninitialised: only the host work is real. Not included: the C launcher and
``cuLaunchKernel`` (a few µs per launch on a GPU, unmeasurable here) and the CUDA device guard
(skipped when the input is on the current device).

Breakdown by ablation: each step is switched off in turn (cumulatively) and the forward timed again;
a step's cost is the difference. Steps (when present in the code): ``launch`` (Triton's launch path:
recorded ``run`` replaced by a no-op), ``dispatch`` (``torch.ops`` replaced by direct calls),
``fold`` (the fold-cache key check skipped); what is left is module logic and the launchers' Python.

    .venv/bin/python benchmarks/host_overhead.py                 # ResNet-50, batch 1, fp16
    .venv/bin/python benchmarks/host_overhead.py --out benchmarks/results/cpu --label after
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # the GPU code path (tests import this under the interpreter)

from benchmarks._bootstrap import ensure_fastres  # noqa: E402

ensure_fastres()

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fastres.kernels import _common, conv, epilogue, pool  # noqa: E402

# Every kernel a plan launches: the conv (its split-K GEMM pass too), the split-K epilogue pass, the pools.
KERNELS = {
    "_conv_bias_act_fwd_kernel": conv,
    "_bias_act_epilogue_kernel": epilogue,
    "_max_pool2d_fwd_kernel": pool,
    "_global_avg_pool_fwd_kernel": pool,
}
UNSPECIALISED = {
    "_conv_bias_act_fwd_kernel": conv.CONV_UNSPECIALISED,
    "_bias_act_epilogue_kernel": epilogue.EPILOGUE_UNSPECIALISED,
    "_max_pool2d_fwd_kernel": pool.MAX_POOL_UNSPECIALISED,
    "_global_avg_pool_fwd_kernel": pool.AVG_POOL_UNSPECIALISED,
}


class _StandInDriver:
    """The active Triton driver on a machine without a GPU: device 0, stream 0, an sm_90 target."""

    def __init__(self, arch: int = 90) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


class Recorder:
    """The launches made under ``recorded_launches``: (kernel name, grid, arguments) in ``log``, while
    ``log`` is a list. Timing sets it to None: kept arguments would keep every output alive."""

    def __init__(self) -> None:
        self.log: list | None = []
        self.compiles: list[str] = []  # kernel names, one per specialisation Triton "compiled"

    def compiled(self, name: str, options: dict) -> RecordedKernel:
        self.compiles.append(name)
        return RecordedKernel(name, self, options)


class RecordedKernel:
    """What ``compile`` returns under ``recorded_launches``: the attributes ``JITFunction.run`` (Triton
    3.6 to 3.8) reads from a ``CompiledKernel``; ``run`` records the launch instead of making it."""

    def __init__(self, name: str, recorder: Recorder, options: dict) -> None:
        self.name = name
        self.recorder = recorder
        self.options = options
        self.function = 0
        self.packed_metadata = ()

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, grid_0, grid_1, grid_2, stream, function, packed_metadata, metadata, enter, exit_, *args):
        log = self.recorder.log
        if log is not None:
            log.append((self.name, (grid_0, grid_1, grid_2), args))


@contextlib.contextmanager
def recorded_launches():
    """Within it, CPU tensors take the kernels' (CUDA) code path and every Triton launch runs Triton's
    launch path in full, then is recorded (yields the ``Recorder``) instead of made."""
    from fastres import modules, ops

    saved = []
    recorder = Recorder()

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    previous = driver._active
    driver.set_active(_StandInDriver())
    try:
        for name, mod in KERNELS.items():
            original = getattr(mod, name)  # a JITFunction, or the interpreter's function: its Python source
            kernel = JITFunction(getattr(original, "fn", original), do_not_specialize=UNSPECIALISED[name])
            kernel.device_caches[0]  # binder for the stand-in target, then a compile that only records
            kernel.compile = lambda src, target, options, _name=name: recorder.compiled(_name, options)
            patch(mod, name, kernel)
        patch(_common, "INTERPRET", True)  # check_tensor's CUDA-only rule: CPU tensors stand in for CUDA
        patch(ops, "_torch_path", lambda x: False)  # the ops' bodies (tracing, autocast) launch kernels too
        if hasattr(modules, "KERNEL_DEVICE_TYPES"):  # launch plans for CPU tensors (absent before issue 10)
            patch(modules, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
        yield recorder
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        driver._active = previous


# --------------------------------------------------------------------------------------------
# Ablations: each switches one step off (cumulatively, in this order).


def _no_launch(stack: contextlib.ExitStack) -> bool:
    """Every launch a no-op: a plan's bound launch (``BoundLaunch``), else Triton's ``JITFunction.run``."""
    bound = getattr(_common, "BoundLaunch", None)
    if bound is not None:
        stack.enter_context(_patched(bound, "__call__", lambda self, args: None))
    if bound is not None and hasattr(bound, "launch"):  # the prepared launches call a bound ``fast`` inline
        import gc

        stack.enter_context(_patched(bound, "launch", lambda self, args: None))
        held = [b for b in gc.get_objects() if type(b) is bound and b.fast is not None]
        saved = [(b, b.fast) for b in held]
        for b in held:
            b.fast = _launched

        def restore():
            for b, fast in saved:
                b.fast = fast

        stack.callback(restore)
    for name, mod in KERNELS.items():
        kernel = getattr(mod, name)
        stack.enter_context(_patched(kernel, "run", lambda *a, **k: None))
    return True


def _launched(args) -> bool:
    return True  # a bound launch's ``fast`` that launches nothing


def _no_dispatch(stack: contextlib.ExitStack) -> bool:
    """``torch.ops.fastres.*`` replaced by their Python bodies, called directly (after issue 10 the eager
    forward calls no op: this step should cost nothing)."""
    from fastres import ops

    for name in ("conv_bias_act", "conv_shortcut_bias_act", "max_pool2d", "global_avg_pool"):
        op = getattr(ops, name)
        stack.enter_context(_patched(ops, name, op._init_fn))
    return True


def _no_fold_check(stack: contextlib.ExitStack) -> bool:
    """The fold key left unchecked: a plan compares only its input signature (after issue 10), the fold
    cache returns its value without comparing stamps (before)."""
    from fastres import modules
    from fastres.fold import FoldCache

    plan = getattr(modules, "_Plan", None)
    state = getattr(modules, "_FoldState", None)
    if state is not None:  # the fold part of the plans' checks (and the training flags with it), alone
        stack.enter_context(_patched(state, "holds", lambda self: True))
        return True
    if plan is not None:

        def matches(self, x):
            return (
                x.dtype is self.dtype
                and x.shape == self.shape
                and x.stride() == self.stride
                and x.device == self.device
                and (x.data_ptr() % 16 == 0) is self.aligned
            )

        stack.enter_context(_patched(plan, "matches", matches))
        return True
    original = FoldCache.get

    def get(self, tensors, extra, make):
        return self._value if self._value is not None else original(self, tensors, extra, make)

    stack.enter_context(_patched(FoldCache, "get", get))
    return True


STEPS = (("launch", _no_launch), ("dispatch", _no_dispatch), ("fold", _no_fold_check))


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# --------------------------------------------------------------------------------------------


def build(model_name: str, dtype: torch.dtype):
    import torchvision

    import fastres

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)().eval()
    fused = fastres.convert(model).to(dtype)
    # The FC stays an nn.Linear (one cuBLAS call on a GPU, not fastres's host work); on the CPU it would
    # compute for real (milliseconds in fp16), so it is left out.
    fused.fc = torch.nn.Identity()
    return fused


def time_forward(model, x, *, reps: int, rounds: int) -> list[float]:
    """Per-forward µs of ``rounds`` timings of ``reps`` forwards each (after 3 warm-up forwards). Other
    processes share this host's cores: the breakdown uses each stage's best round, the JSON keeps all."""
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        out = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(reps):
                model(x)
            out.append((time.perf_counter() - start) / reps * 1e6)
    return out


def measure(model_name="resnet50", dtype=torch.float16, batch=1, image=32, reps=20, rounds=15) -> dict:
    model = build(model_name, dtype)
    x = torch.randn(batch, 3, image, image, dtype=dtype).to(memory_format=torch.channels_last)
    with recorded_launches() as recorder:
        with torch.inference_mode():
            model(x)
        launches = len(recorder.log)
        kernels = sorted({name for name, _, _ in recorder.log})
        recorder.log = None
        stages = {"full": time_forward(model, x, reps=reps, rounds=rounds)}
        with contextlib.ExitStack() as stack:
            for name, ablate in STEPS:
                if ablate(stack):
                    stages[f"without {name}"] = time_forward(model, x, reps=reps, rounds=rounds)
    medians = {k: min(v) for k, v in stages.items()}
    names = list(medians)
    breakdown = {}
    for before, after in zip(names, names[1:], strict=False):
        breakdown[after.removeprefix("without ")] = medians[before] - medians[after]
    breakdown["module logic and launcher Python (the rest)"] = medians[names[-1]]
    return {
        "model": model_name,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "image": image,
        "launches_per_forward": launches,
        "kernels": kernels,
        "us_per_forward": medians["full"],
        "us_per_forward_median": statistics.median(stages["full"]),
        "us_per_launch": medians["full"] / max(1, launches),
        "breakdown_us_per_forward": breakdown,
        "raw_us": stages,
        "reps": reps,
        "rounds": rounds,
    }


FP16_MODEL_BOUND = 1e-2  # DESIGN.md, Numerics: fp16, whole model, against an fp32 (tf32 off) eager reference


def measure_cuda(
    model_name="resnet50", dtype=torch.float16, batch=1, image=224, reps=50, rounds=7, device="cuda"
) -> dict:
    """On a GPU: the host's enqueue time per forward (forwards queued back to back, no synchronisation
    until the end: at batch 1 the GPU waits for the host, so this is the host's work per forward, launch
    calls included) and the latency of one forward, plain and replayed from a CUDA graph
    (``fastres.cuda_graphs``); issue 10's goal is plain within 1.3x of graphed. The output is checked
    against eager first (fp32, tf32 off) and the fused launches are counted, or nothing is reported.
    ``device="cpu"`` runs the same steps on CPU tensors without a graph (the CPU test of this code)."""
    import torchvision

    import fastres
    from fastres.testing import count_launches, randomize_bn, rel_err

    torch.manual_seed(0)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    eager = randomize_bn(getattr(torchvision.models, model_name)()).eval().to(device)
    fused = fastres.convert(eager).to(dtype)
    x = torch.randn(batch, 3, image, image, device=device).to(memory_format=torch.channels_last)
    xd = x.to(dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            ref = eager(x).float()
            fused(xd)
            with count_launches() as launches:
                out = fused(xd)
            sync()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    err = rel_err(out.float(), ref)
    result = {
        "model": model_name, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "image": image,
        "device": torch.cuda.get_device_name() if cuda else device, "fused_launches": len(launches),
        "rel_err": err,
        "bound": FP16_MODEL_BOUND, "ok": bool(err <= FP16_MODEL_BOUND and len(launches) > 0),
    }
    if not result["ok"]:
        return result
    graphed = fastres.cuda_graphs(fused) if cuda else fused
    enqueue, plain, replay = [], [], []
    with torch.inference_mode():
        graphed(xd)
        for _ in range(rounds):
            sync()
            start = time.perf_counter()
            for _ in range(reps):
                fused(xd)
            enqueue.append((time.perf_counter() - start) / reps * 1e6)
            sync()
            for fn, into in ((fused, plain), (graphed, replay)):
                times = []
                for _ in range(reps):
                    start = time.perf_counter()
                    fn(xd)
                    sync()
                    times.append((time.perf_counter() - start) * 1e6)
                into.append(statistics.median(times))
    result.update({
        "enqueue_us_per_forward": min(enqueue),
        "latency_us_plain": min(plain),
        "latency_us_graphed": min(replay),
        "plain_over_graphed": min(plain) / min(replay),
        "goal_plain_over_graphed": 1.3,
        "raw_us": {"enqueue": enqueue, "plain": plain, "graphed": replay},
        "reps": reps, "rounds": rounds,
    })
    return result


def environment() -> dict:
    import platform
    import subprocess

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "fastres", "kernels"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent.parent,
            ).stdout.strip()
        )
    except OSError:
        sha, dirty = None, None
    return {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fastres_sha": sha,
        "working_tree_dirty": dirty,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--label", default="current")
    parser.add_argument("--out", type=Path, default=None, help="folder for host_overhead_<label>.json")
    parser.add_argument(
        "--cuda", action="store_true",
        help="on a GPU: enqueue time per forward and batch-1 latency, plain and CUDA-graphed (224²)",
    )
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.cuda:
        if not torch.cuda.is_available():
            print("--cuda: no CUDA GPU here", file=sys.stderr)
            return 2
        result = measure_cuda(args.model, dtype, reps=args.reps, rounds=min(args.rounds, 7))
        result["label"], result["env"] = args.label, environment()
        if not result["ok"]:
            print(f"{args.model}: output off by {result['rel_err']:.2e} (bound {result['bound']}) or no "
                  f"fused launch ({result['fused_launches']}): nothing timed")
        else:
            print(f"{args.model} batch 1 {args.dtype} on {result['device']}: enqueue "
                  f"{result['enqueue_us_per_forward']:.0f} µs per forward; latency plain "
                  f"{result['latency_us_plain']:.0f} µs, graphed {result['latency_us_graphed']:.0f} µs "
                  f"({result['plain_over_graphed']:.2f}x; goal <= 1.3x)")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"host_overhead_cuda_{args.label}.json"
            path.write_text(json.dumps(result, indent=1) + "\n")
            print(f"wrote {path}")
        return 0 if result["ok"] else 1
    torch.set_num_threads(1)  # host work is one thread; nothing is computed
    result = measure(args.model, dtype, reps=args.reps, rounds=args.rounds)
    result["label"] = args.label
    result["env"] = environment()
    print(f"{args.model} batch 1 {args.dtype}: {result['us_per_forward']:.0f} µs per forward, "
          f"{result['launches_per_forward']} launches, {result['us_per_launch']:.1f} µs per launch")
    for step, us in result["breakdown_us_per_forward"].items():
        print(f"  {step:45} {us:8.0f} µs")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"host_overhead_{args.label}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
