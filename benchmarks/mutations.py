"""Mutation check: break the code on purpose, one mutation at a time, and see that a test fails.

DESIGN.md, Numerics: "A test suite is only as good as the bugs it catches ... keep the mutation script".
Each mutation is one text substitution in one source file, applied in a temporary copy of the
repository (tracked and untracked, not ignored, files of the working tree: the working tree itself is
never modified). The test files then run against that copy (``pytest -x``; ``PYTHONPATH`` puts the
copy first, and ``fastres/kernels`` in the copy links to its ``kernels/``, as the install's package-dir
mapping does, so mutated kernels are the ones imported). A baseline run without mutation must pass.

    .venv/bin/python benchmarks/mutations.py                      # all mutations, tests/test_fold_guard.py
    .venv/bin/python benchmarks/mutations.py --only tail_no_downsample --tests tests/test_modules.py
    .venv/bin/python benchmarks/mutations.py --list

Prints a table: mutation → caught (the first failing test) / MISSED / STALE (its text is no longer in
the source: update the mutation).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name: (file, text, replacement, what it breaks)
MUTATIONS = {
    "plan_no_act_key": (
        "fastres/modules.py",
        "            and list(map(activations.key, self.acts)) == self.act_keys\n",
        "",
        "a launch plan that does not check its activation's settings (bounds, slope, GELU form)",
    ),
    "tail_no_downsample": (
        "fastres/modules.py",
        "tensors = conv_bn_tensors(conv, bn) + conv_bn_tensors(ds_conv, ds_bn)",
        "tensors = conv_bn_tensors(conv, bn)",
        "dual-GEMM tail cache key without the downsample conv and BN tensors",
    ),
    "tail_no_bn": (
        "fastres/modules.py",
        "tensors = conv_bn_tensors(conv, bn) + conv_bn_tensors(ds_conv, ds_bn)",
        "tensors = conv_bn_tensors(conv, None) + conv_bn_tensors(ds_conv, ds_bn)",
        "dual-GEMM tail cache key without the last BN's tensors",
    ),
    "tail_no_eps": (
        "fastres/modules.py",
        "(dtype, float(bn.eps), float(ds_bn.eps))",
        "(dtype,)",
        "dual-GEMM tail cache key without either BN eps",
    ),
    "tail_no_ds_eps": (
        "fastres/modules.py",
        "(dtype, float(bn.eps), float(ds_bn.eps))",
        "(dtype, float(bn.eps))",
        "dual-GEMM tail cache key without the downsample BN's eps",
    ),
    "block_key_no_bn": (
        "fastres/modules.py",
        "folded = self._fold_for(self._cache(conv_name), conv, bn, x.dtype)",
        "folded = self._cache(conv_name).get(conv_bn_tensors(conv, None), (x.dtype, float(bn.eps)),"
        " lambda: fold_conv_bn(conv, bn, x.dtype))",
        "a block's conv+BN cache key without the BN tensors",
    ),
    "fold_key_no_bn": (
        "fastres/modules.py",
        "cache.get(conv_bn_tensors(conv, bn), extra,",
        "cache.get(conv_bn_tensors(conv, None), extra,",
        "every conv+BN cache key (modules, stem, blocks, 3x3 shortcut) without the BN tensors",
    ),
    "fold_key_no_eps": (
        "fastres/modules.py",
        "extra = (dtype, None if bn is None else float(bn.eps))",
        "extra = (dtype, None)",
        "every conv+BN cache key without the BN eps",
    ),
    "key_no_conv_bias": (
        "fastres/fold.py",
        'out = [(conv, "weight"), (conv, "bias")]',
        'out = [(conv, "weight")]',
        "every cache key without the conv bias",
    ),
    "key_no_bn_counter": (
        "fastres/fold.py",
        '            out.append((bn, "num_batches_tracked"))',
        "            pass",
        "every cache key without the BN's num_batches_tracked (a training-mode forward goes unseen)",
    ),
    "train_keeps_conv_folds": (
        "fastres/modules.py",
        "refold(self)  # its BN may move its statistics unseen",
        "pass  #",
        "a FusedConvBNAct2d / FusedStem run in training mode keeps its plan and folds",
    ),
    "train_keeps_block_folds": (
        "fastres/modules.py",
        "refold(self)  # its BNs may move their statistics unseen",
        "pass  #",
        "a fused block run in training mode keeps its plan and folds",
    ),
    "refold_skips_blocks": (
        "fastres/modules.py",
        "            cache.clear()",
        "            pass",
        "refold() leaves the blocks' caches (conv, downsample, tail)",
    ),
    "refold_skips_convs": (
        "fastres/modules.py",
        "            fold.clear()",
        "            pass",
        "refold() leaves FusedConvBNAct2d / FusedStem caches",
    ),
    "fp16_accumulator": (
        "kernels/conv.py",
        "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=x_ptr.dtype.element_ty)",
        "the conv kernel accumulates in the input dtype (fp16 for fp16)",
    ),
    "fold_in_fp32": (
        "fastres/fold.py",
        'acc = torch.float64 if w.device.type in ("cpu", "cuda") else torch.float32',
        "acc = torch.float32",
        "the fold computed in fp32 instead of fp64",
    ),
    "bias_fp16": (
        "fastres/fold.py",
        "shift.float())",
        "shift.half().float())",
        "the folded bias rounded to fp16 (stored as fp32)",
    ),
    "bias_compute_dtype": (
        "fastres/fold.py",
        "shift.float())",
        "shift.to(dtype).float())",
        "the folded bias rounded to the compute dtype (fp16 for fp16 models)",
    ),
}


def copy_repo(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    # pyproject's package-dir maps kernels/ to fastres.kernels; the editable install points at the working
    # tree's kernels/, so the copy's package must carry its own.
    (dest / "fastres" / "kernels").symlink_to("../kernels")


def run_tests(copy: Path, tests: list[str]) -> tuple[int, str, float]:
    path = os.pathsep.join(filter(None, [str(copy), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ")[0]
    return "?"


def check_imports_from(copy: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(copy), TRITON_INTERPRET="1")
    code = "import fastres.fold, fastres.kernels.conv as c; print(fastres.fold.__file__); print(c.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True)
    paths = out.stdout.split()
    if len(paths) != 2 or not all(Path(p).resolve().is_relative_to(copy.resolve()) for p in paths):
        raise SystemExit(f"the copy's fastres is not the one imported: {out.stdout}{out.stderr}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", nargs="+", default=["tests/test_fold_guard.py"])
    parser.add_argument("--only", nargs="+", choices=sorted(MUTATIONS), help="mutations to run (default all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    if args.list:
        for name, (path, _, _, what) in MUTATIONS.items():
            print(f"{name:22} {path:20} {what}")
        return 0
    names = args.only or list(MUTATIONS)
    with tempfile.TemporaryDirectory(prefix="fastres-mutations-") as tmp:
        copy = Path(tmp) / "repo"
        copy.mkdir()
        copy_repo(copy)
        check_imports_from(copy)
        rc, out, secs = run_tests(copy, args.tests)
        if rc != 0:
            print(out[-4000:])
            raise SystemExit(f"baseline (no mutation) does not pass (rc {rc}): fix that first")
        print(f"baseline: passed ({secs:.0f} s): {' '.join(args.tests)}")
        rows = []
        for name in names:
            path, old, new, what = MUTATIONS[name]
            target = copy / path
            original = target.read_text()
            if original.count(old) != 1:
                rows.append((name, "STALE", f"text found {original.count(old)} times in {path}", 0.0))
                continue
            target.write_text(original.replace(old, new))
            try:
                rc, out, secs = run_tests(copy, args.tests)
            finally:
                target.write_text(original)
            if rc == 0:
                rows.append((name, "MISSED", what, secs))
            elif rc == 1:
                rows.append((name, "caught", first_failure(out), secs))
            else:
                rows.append((name, f"caught (pytest rc {rc})", first_failure(out), secs))
            print(f"  {name}: {rows[-1][1]} ({secs:.0f} s)", file=sys.stderr)
    print("\n| mutation | result | first failing test / what it breaks | s |\n|---|---|---|---|")
    for name, result, detail, secs in rows:
        print(f"| {name} | {result} | {detail} | {secs:.0f} |")
    return 1 if any(r[1] != "caught" and not r[1].startswith("caught") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
