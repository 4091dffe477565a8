"""The one-shot tuner: every conv launch of a ResNet, every applicable tactic × its configs, on one GPU,
inside a time budget; writes the config table (``fastres/configs/<arch>.json`` format 2, or ``--out``).

    python3 -m benchmarks.tune --budget-s 240                       # ResNet-50, b1/32/256, fp16+bf16
    python3 -m benchmarks.tune --budget-s 240 --out /tmp/cfg        # then FASTRES_CONFIG_DIR=/tmp/cfg
    python3 -m benchmarks.tune --dry-run                            # the plan, on any machine

The layers are the launches the converted model makes (``model_layers``: the stem, each block's convs,
the last conv of a block with a 1×1 projection carrying it as a second K range, ``-sc<C_in>`` in the key),
tuned in order of FLOP share (the largest first), each at every batch and dtype. Per layer, the
candidates of every tactic registered in ``kernels/tactics.py`` that applies are compiled in parallel
(threads, as ``fastres.warmup``), each is checked against the fp64 reference (dropped, with the reason
printed, if it fails to compile or launch or is wrong), then timed with ``do_bench_cudagraph``; the
table is rewritten (atomically) after every layer, dtype and batch, so a killed run keeps what it
measured. A layer is started only while the budget left covers 1.25 × the longest of the last 3 layers.
Commit a table only with the GPU run's log; it records the GPU and versions itself (``tuned_on``).
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks._bootstrap import REPO, ensure_fastres
from benchmarks.common import parse_list, torch_dtype

DTYPES = ("fp16", "bf16", "fp32")


def model_layers(model, image: int = 224) -> list:
    """The distinct conv launches (``fastres.tuning.Layer``) of a torchvision ResNet converted by fastres,
    with their launch counts: ``fastres.tuning.conv_launches`` on a meta-device forward (no weights, no
    memory). Blocks as ``fastres.modules`` fuses them: every conv with ReLU, the last one with the
    residual, or, when the block's downsample is a 1×1 conv + BN, with that conv accumulated in the same
    launch (dual GEMM)."""
    import dataclasses

    import torch

    from fastres.tuning import conv_launches

    model = model.to("meta").eval()
    launches = conv_launches(model, torch.empty(1, 3, image, image, device="meta"))
    order = {path: i for i, (path, m) in enumerate(model.named_modules())}
    found: dict[tuple, object] = {}
    for path in sorted(launches, key=lambda p: order[p]):
        layer = launches[path]
        ident = tuple(v for k, v in vars(layer).items() if k not in ("name", "count"))
        if ident in found:
            found[ident] = dataclasses.replace(found[ident], count=found[ident].count + 1)
        else:
            found[ident] = layer
    return list(found.values())


def resnet_layers(arch: str, image: int = 224) -> list:
    import torchvision

    return model_layers(getattr(torchvision.models, arch)(), image)


def plan(layers, batches, dtypes, budget_s) -> str:
    """The tuner's plan without a GPU: the layers in the order they run, their FLOP share and the
    configs each registered tactic would offer at the largest batch (before its applicability rule)."""
    from fastres.kernels import tactics, tuning

    total = sum(x.flops() * x.count for x in layers) or 1
    lines = [
        f"tuner plan: {len(layers)} layers x {len(batches)} batches x {len(dtypes)} dtypes, "
        f"tactics {', '.join(tactics.TACTICS)}, budget {budget_s if budget_s is not None else 'none'} s"
    ]
    n_cands = 0
    for layer in sorted(layers, key=lambda x: -x.flops() * x.count):
        counts = {}
        for name in tactics.TACTICS:
            counts[name] = len(
                tuning.tactic_candidates(
                    name, m=max(batches) * layer.p * layer.q, c_in=layer.c_in, c_out=layer.c_out, r=layer.r,
                    s=layer.s, groups=layer.groups, dtype=dtypes[0],
                )
            )  # fmt: skip
        n_cands += sum(counts.values()) * len(batches) * len(dtypes)
        share = 100 * layer.flops() * layer.count / total
        offered = " ".join(f"{k}:{v}" for k, v in counts.items())
        lines.append(
            f"  {share:5.1f} %  x{layer.count:<2} {layer.name:<22} {layer.key(1, dtypes[0]):<62} {offered}"
        )
    lines.append(
        f"at most {n_cands} (candidate, batch, dtype) checks and timings, before applicability rules"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50", help="comma list of torchvision ResNets (layers merged)")
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument(
        "--budget-s", type=float, default=None, help="wall-clock budget; layers not started are listed"
    )
    ap.add_argument("--tactics", default=None, help="comma list restricting the registry's tactics")
    ap.add_argument("--threads", type=int, default=None, help="compile threads (default: CPU count, <= 16)")
    ap.add_argument("--out", default=str(REPO / "fastres" / "configs"), help="folder or <arch>.json")
    ap.add_argument(
        "--dry-run", action="store_true", help="print the plan and check the imports; time nothing"
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    how = ensure_fastres()
    import torch

    import fastres.tuning  # noqa: F401  (the import check of --dry-run)
    from fastres.kernels import tactics

    dtypes = [torch_dtype(d) for d in parse_list(args.dtypes, DTYPES)]
    batches = parse_list(args.batches, conv=int)
    names = tuple(parse_list(args.tactics, tactics.TACTICS)) if args.tactics else None
    layers = []
    for arch in parse_list(args.models):
        for layer in resnet_layers(arch, args.image):
            same = next(
                (i for i, x in enumerate(layers) if x.key(1, dtypes[0]) == layer.key(1, dtypes[0])), None
            )
            if same is None:
                layers.append(layer)
    print(plan(layers, batches, dtypes, args.budget_s), flush=True)
    if args.dry_run:
        print(f"tuner dry run OK (fastres {how}); nothing timed", flush=True)
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/tune.py times kernels on a CUDA GPU and none is visible", file=sys.stderr)
        return 2
    from fastres.tuning import tune_layers

    budget = None if args.budget_s is None else max(0.0, args.budget_s - (time.perf_counter() - t0))
    result = tune_layers(
        layers,
        args.out,
        batches=tuple(batches),
        dtypes=tuple(dtypes),
        budget_s=budget,
        tactics=names,
        threads=args.threads,
        log=lambda msg: print(msg, flush=True),
    )
    print(
        f"tuned {len(result.entries)} shape keys in {result.seconds:.0f} s, {len(result.dropped)} candidates "
        f"dropped, {len(result.not_started)} layers not started -> {result.path}",
        flush=True,
    )
    return 0 if result.entries else 1


if __name__ == "__main__":
    raise SystemExit(main())
