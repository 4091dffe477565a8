"""Regenerate the shipped config tables (``fastres/configs/<arch>.json``) from a GPU run.

For each model, batch and dtype, ``fastres.tune_model`` times the candidate tiles of every conv the
converted model launches and keeps the fastest per layer shape (the table key includes an M bucket,
so batches 1, 32 and 256 tune separately). Entries merge into the existing table.

    python3 -m benchmarks.tune --models resnet18,resnet50,resnet101 --batches 1,32,256 --dtypes fp16,bf16

About 0.5 s per candidate compile-and-time, 9 candidates per shape: ResNet-50 at one batch and dtype
is a few minutes. Commit the table with the GPU run's log; it records the GPU and versions itself.
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks._bootstrap import REPO, ensure_fastres
from benchmarks.common import parse_list, torch_dtype


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50")
    ap.add_argument("--batches", default="32")
    ap.add_argument("--dtypes", default="fp16")
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--out", default=str(REPO / "fastres" / "configs"), help="folder or <arch>.json")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/tune.py times kernels on a CUDA GPU and none is visible", file=sys.stderr)
        return 2
    ensure_fastres()
    import torchvision

    from fastres.testing import randomize_bn
    from fastres.tuning import tune_model

    path = None
    for arch in parse_list(args.models):
        for dtype_name in parse_list(args.dtypes):
            for batch in parse_list(args.batches, conv=int):
                t0 = time.perf_counter()
                model = (
                    randomize_bn(getattr(torchvision.models, arch)())
                    .eval()
                    .cuda()
                    .to(torch_dtype(dtype_name))
                )
                x = torch.randn(
                    batch, 3, args.image, args.image, device="cuda", dtype=torch_dtype(dtype_name)
                )
                path = tune_model(model, x, args.out, verbose=True)
                print(
                    f"tuned {arch} b{batch} {dtype_name} in {time.perf_counter() - t0:.0f} s -> {path}",
                    flush=True,
                )
    return 0 if path is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
