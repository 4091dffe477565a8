"""Benchmark JSON → markdown tables and PNG plots (matplotlib), never typed by hand.

    python -m benchmarks.report benchmarks/results/*.json --out-dir benchmarks/results/report
    python -m benchmarks.report a.json b.json --combine all.json --out-dir out/ --summary

Reads single-run documents (``suite``: kernels, models, roofline, kernel_report, smoke) and combined
ones (``{"runs": [...]}``, as ``--combine`` writes). Writes ``report.md`` and ``kernels_speedup.png``,
``models_throughput.png``, ``roofline.png`` for the suites present.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KERNEL_PEERS = ("eager", "cudnn_fused", "compile")
MODEL_PEERS = ("eager", "eager_cl", "cudnn_folded", "compile", "compile_ro")


def load_runs(paths) -> list[dict]:
    runs = []
    for p in paths:
        doc = json.loads(Path(p).read_text())
        runs.extend(doc["runs"] if "runs" in doc else [doc])
    return runs


def by_suite(runs) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in runs:
        out[r.get("suite", "?")].append(r)
    return out


def _fmt(v, spec=".3g", none="-"):
    return none if v is None else format(v, spec)


def _geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def env_md(runs) -> str:
    lines = [
        "| suite | GPU | driver | torch | triton | fastres sha | source digest | date |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        e = r.get("env", {})
        where = e.get("gpu") or ("CPU (interpreter)" if e.get("triton_interpret") else "CPU")
        lines.append(
            f"| {r.get('suite')} | {where}"
            f" | {e.get('driver') or '-'} | {e.get('torch')} | {e.get('triton')} | "
            f"{(e.get('fastres_git_sha') or '-')[:12]} | {e.get('fastres_source_digest', '-')} | "
            f"{e.get('date')} |"
        )
    return "\n".join(lines)


def _usable(r) -> bool:
    """A timed record whose output was checked (and, for fastres, whose fused launches were counted)."""
    return "median_ms" in r and r.get("correct", True) is not False and r.get("fused", True) is not False


def kernel_table(run) -> tuple[str, dict]:
    """Per (dtype, batch): one row per layer with each provider's median and fastres's speedups."""
    recs = [r for r in run["records"] if _usable(r)]
    peaks = run.get("peaks", {})
    providers = [p for p in ("fastres",) + KERNEL_PEERS if any(r["provider"] == p for r in recs)]
    cell = {(r["dtype"], r["batch"], r["layer"], r["provider"]): r for r in recs}
    speedups = defaultdict(list)
    out = []
    if peaks.get("gemm_tflops_bf16"):
        out.append(
            f"Measured in this run: bf16 GEMM {peaks['gemm_tflops_bf16']:.0f} TFLOP/s, "
            f"copy {peaks['copy_gbps']:.0f} GB/s.\n"
        )
    for dtype, batch in sorted({(r["dtype"], r["batch"]) for r in recs}):
        out += [
            f"#### {dtype}, batch {batch} (median ms; speedup = peer time / fastres time)",
            "",
            "| layer | count | "
            + " | ".join(f"{p} ms" for p in providers)
            + " | "
            + " | ".join(f"vs {p}" for p in providers if p != "fastres")
            + " | fastres TFLOP/s | % peak | % of copy BW | floor/time | rel err |",
            "|---|---|" + "---|" * (2 * len(providers) - 1) + "---|---|---|---|---|",
        ]
        layers = []
        for r in recs:
            if r["dtype"] == dtype and r["batch"] == batch and r["layer"] not in layers:
                layers.append(r["layer"])
        for layer in layers:
            f = cell.get((dtype, batch, layer, "fastres"))
            row = [layer, str((f or next(r for r in recs if r["layer"] == layer))["count"])]
            row += [_fmt(cell.get((dtype, batch, layer, p), {}).get("median_ms"), ".4f") for p in providers]
            for p in providers:
                if p == "fastres":
                    continue
                peer = cell.get((dtype, batch, layer, p))
                s = peer["median_ms"] / f["median_ms"] if (f and peer) else None
                if s:
                    speedups[(dtype, batch, p)].append(s)
                row.append(_fmt(s, ".2f") + ("x" if s else ""))
            row += [
                _fmt(f and f.get("tflops"), ".1f"),
                _fmt(f and f.get("peak_share") and 100 * f["peak_share"], ".0f"),
                _fmt(f and f.get("bw_share") and 100 * f["bw_share"], ".0f"),
                _fmt(f and f.get("of_floor"), ".2f"),
                _fmt(f and f.get("rel_err"), ".1e"),
            ]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    geo = {k: _geomean(v) for k, v in speedups.items()}
    if geo:
        out += [
            "Geometric-mean speedup of fastres over each peer (per layer, unweighted):",
            "",
            "| dtype | batch | peer | speedup | layers |",
            "|---|---|---|---|---|",
        ]
        out += [
            f"| {d} | {b} | {p} | {_fmt(g, '.2f')}x | {len(speedups[(d, b, p)])} |"
            for (d, b, p), g in sorted(geo.items())
        ]
    errs = [r for r in run["records"] if "error" in r]
    if errs:
        out += ["", "Errors:", ""] + [
            f"- {r['provider']} {r['dtype']} b{r['batch']} {r['layer']}: {r['error']}" for r in errs
        ]
    return "\n".join(out), geo


def model_table(run) -> tuple[str, list]:
    recs = [r for r in run["records"] if _usable(r)]
    cell = {(r["model"], r["dtype"], r["batch"], r["provider"]): r for r in recs}
    providers = [
        p for p in ("fastres", "fastres_graphs") + MODEL_PEERS if any(r["provider"] == p for r in recs)
    ]
    out = [
        "| model | dtype | batch | "
        + " | ".join(f"{p} img/s" for p in providers)
        + " | fastres / best peer | fastres p50/p90 ms | fastres peak MiB | cold start s (fastres, compile) "
        "| fastres rel err |",
        "|---|---|---|" + "---|" * len(providers) + "---|---|---|---|---|",
    ]
    summary = []
    for m, d, b in sorted(
        {(r["model"], r["dtype"], r["batch"]) for r in recs}, key=lambda t: (t[0], t[1], t[2])
    ):
        row = [m, d, str(b)]
        ips = {p: cell.get((m, d, b, p), {}).get("images_per_s") for p in providers}
        row += [_fmt(ips[p], ".0f") for p in providers]
        ours = max([v for p, v in ips.items() if p.startswith("fastres") and v] or [0]) or None
        best_peer = max([v for p, v in ips.items() if not p.startswith("fastres") and v] or [0]) or None
        ratio = ours / best_peer if ours and best_peer else None
        row.append(_fmt(ratio, ".2f") + ("x" if ratio else ""))
        f = cell.get((m, d, b, "fastres"), {})
        c = cell.get((m, d, b, "compile"), {})
        row += [
            f"{_fmt(f.get('p50_ms'), '.3f')}/{_fmt(f.get('p90_ms'), '.3f')}",
            _fmt(f.get("peak_mem_mb"), ".0f"),
            f"{_fmt(f.get('cold_start_s'), '.1f')}, {_fmt(c.get('cold_start_s'), '.1f')}",
            _fmt(f.get("rel_err_vs_eager"), ".1e"),
        ]
        out.append("| " + " | ".join(row) + " |")
        summary.append((m, d, b, ours, best_peer, ratio))
    errs = [r for r in run["records"] if "error" in r]
    if errs:
        out += ["", "Errors:", ""] + [
            f"- {r['provider']} {r['model']} {r['dtype']} b{r['batch']}: {r['error']}" for r in errs
        ]
    return "\n".join(out), summary


def skipped_md(run) -> str:
    counts = defaultdict(int)
    for s in run.get("skipped", []):
        counts[(s.get("provider"), s.get("reason"))] += 1
    if not counts:
        return ""
    return "Skipped:\n\n" + "\n".join(f"- {p}: {r} ({n}x)" for (p, r), n in sorted(counts.items(), key=str))


def plot_kernels(run, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in run["records"] if _usable(r)]
    fast = {(r["dtype"], r["batch"], r["layer"]): r["median_ms"] for r in recs if r["provider"] == "fastres"}
    combos = sorted({(d, b) for d, b, _ in fast})[:4]
    peers = [p for p in KERNEL_PEERS if any(r["provider"] == p for r in recs)]
    if not combos or not peers:
        return None
    fig, axes = plt.subplots(len(combos), 1, figsize=(12, 3.6 * len(combos)), squeeze=False)
    for ax, (d, b) in zip(axes[:, 0], combos, strict=False):
        layers = [k[2] for k in fast if k[:2] == (d, b)]
        width = 0.8 / len(peers)
        for j, p in enumerate(peers):
            peer = {
                r["layer"]: r["median_ms"]
                for r in recs
                if r["provider"] == p and (r["dtype"], r["batch"]) == (d, b)
            }
            ys = [peer[layer] / fast[(d, b, layer)] if layer in peer else 0 for layer in layers]
            ax.bar([i + j * width for i in range(len(layers))], ys, width, label=f"vs {p}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], layers, rotation=75, fontsize=6)
        ax.set_ylabel("speedup (peer / fastres)")
        ax.set_title(
            f"fastres per-layer speedup, {d}, batch {b} ({run['env'].get('gpu') or 'CPU interpreter'})"
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_models(run, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in run["records"] if "images_per_s" in r]
    models = sorted({r["model"] for r in recs})
    if not models:
        return None
    dtypes = sorted({r["dtype"] for r in recs})
    fig, axes = plt.subplots(
        len(dtypes), len(models), figsize=(4.2 * len(models), 3.4 * len(dtypes)), squeeze=False
    )
    for i, d in enumerate(dtypes):
        for j, m in enumerate(models):
            ax = axes[i, j]
            for p in sorted({r["provider"] for r in recs}):
                pts = sorted(
                    (r["batch"], r["images_per_s"])
                    for r in recs
                    if r["model"] == m and r["dtype"] == d and r["provider"] == p
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True), marker="o", label=p, lw=2.2 if p.startswith("fastres") else 1
                    )
            ax.set_xscale("log", base=2)
            ax.set_title(f"{m} {d}", fontsize=9)
            ax.set_xlabel("batch")
            ax.set_ylabel("images/s")
            ax.legend(fontsize=6)
    fig.suptitle(f"Throughput vs batch ({run['env'].get('gpu') or 'CPU interpreter'})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_roofline(run, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = run.get("models") or []
    if not models:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"{m['arch']}\nb{m['batch']}" for m in models]
    xs = range(len(models))
    a1.bar([x - 0.2 for x in xs], [m["eager"]["bytes_per_image"] / 1e6 for m in models], 0.4, label="eager")
    a1.bar(
        [x + 0.2 for x in xs], [m["fastres"]["bytes_per_image"] / 1e6 for m in models], 0.4, label="fastres"
    )
    a1.set_xticks(list(xs), labels, fontsize=6)
    a1.set_ylabel("HBM MB per image (model)")
    a1.legend()
    a2.bar([x - 0.2 for x in xs], [m["eager"]["launches"] for m in models], 0.4, label="eager")
    a2.bar([x + 0.2 for x in xs], [m["fastres"]["launches"] for m in models], 0.4, label="fastres")
    a2.set_xticks(list(xs), labels, fontsize=6)
    a2.set_ylabel("kernel launches per forward (model)")
    a2.legend()
    fig.suptitle(f"Launch-and-bytes model, {run['params']['dtype']} (no measurement)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def cold_start_md(run) -> str:
    rows = [
        "| provider | phase | model | batch | dtype | seconds | rel err | correct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in run["records"]:
        secs = f"{r['seconds']:.2f}" if "seconds" in r else "error"
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
        rows.append(
            f"| {r['provider']} | {r['phase']} | {r['arch']} | {r['batch']} | {r['dtype']} | {secs} | {err} "
            f"| {r.get('correct', False)} |"
        )
    return "\n".join(rows)


def summary_lines(runs) -> list[str]:
    """A short table for the end of a log: geomean kernel speedups and per-model fastres vs best peer."""
    s = by_suite(runs)
    lines = []
    for run in s.get("kernels", []):
        _, geo = kernel_table(run)
        for (d, b, p), g in sorted(geo.items()):
            lines.append(f"kernels  {d:<5} b{b:<4} fastres vs {p:<12} {_fmt(g, '.2f')}x (geomean)")
        bad = [r for r in run["records"] if r["provider"] == "fastres" and not r.get("correct", True)]
        lines.append(f"kernels  fastres outputs outside tolerance: {len(bad)}")
    for run in s.get("models", []):
        _, rows = model_table(run)
        for m, d, b, ours, best, ratio in rows:
            lines.append(
                f"models   {m:<9} {d:<5} b{b:<4} fastres {_fmt(ours, '.4g'):>7} img/s, best peer "
                f"{_fmt(best, '.4g'):>7} img/s, {_fmt(ratio, '.3g')}x"
            )
    for run in s.get("cold_start", []):
        for r in run["records"]:
            took = f"{r['seconds']:.2f} s" if "seconds" in r else "error"
            lines.append(
                f"start    {r['provider']:<8} {r['phase']:<4} {r['arch']} b{r['batch']} {r['dtype']}: {took}"
            )
    for run in s.get("kernel_report", []):
        flags = sorted({(r["arch"], f) for r in run["records"] for f in r["flags"]})
        lines.append(
            f"kernel report: {len(run['records'])} layer/arch compiles, flags: "
            + (", ".join(f"sm_{a} {f}" for a, f in flags) or "none")
        )
    return lines


def render(runs, out_dir: Path) -> dict:
    """Write report.md and the PNGs; return {"markdown": path, "png": [paths]}."""
    from benchmarks import kernel_report, roofline

    out_dir.mkdir(parents=True, exist_ok=True)
    s = by_suite(runs)
    timed = s.get("kernels", []) + s.get("models", [])
    cpu_note = any(r.get("env", {}).get("device") == "cpu" for r in timed)
    md = [
        "# fastres benchmark report",
        "",
        "Generated by benchmarks/report.py from the JSON listed below; every number is from those files.",
        "",
        env_md(runs),
        "",
    ]
    if cpu_note:
        md += [
            "> Kernel/model times here come from the CPU (Triton's interpreter): they exercise the code "
            "paths and say nothing about GPU performance.",
            "",
        ]
    pngs = []
    for run in s.get("kernels", []):
        text, _ = kernel_table(run)
        md += ["## Per-layer kernels", "", text, "", skipped_md(run), ""]
        p = plot_kernels(run, out_dir / "kernels_speedup.png")
        if p:
            pngs.append(p)
            md += [f"![per-layer speedup]({p.name})", ""]
    for run in s.get("models", []):
        text, _ = model_table(run)
        md += ["## Whole models", "", text, "", skipped_md(run), ""]
        p = plot_models(run, out_dir / "models_throughput.png")
        if p:
            pngs.append(p)
            md += [f"![throughput vs batch]({p.name})", ""]
    for run in s.get("roofline", []):
        md += ["## Launch-and-bytes model and roofline floor", "", roofline.to_markdown(run), ""]
        p = plot_roofline(run, out_dir / "roofline.png")
        if p:
            pngs.append(p)
            md += [f"![launches and bytes]({p.name})", ""]
    for run in s.get("cold_start", []):
        md += [
            "## Cold and warm start (convert or compile → first correct output)",
            "",
            cold_start_md(run),
            "",
        ]
    for run in s.get("kernel_report", []):
        md += ["## Compiled kernel report", "", kernel_report.to_markdown(run), ""]
    md += ["## Summary", "", "```", *summary_lines(runs), "```", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return {"markdown": path, "png": pngs}


def combine(runs, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"schema": "fastres-bench/1", "suite": "combined", "runs": runs}, indent=1, default=str)
        + "\n"
    )
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="benchmark JSON files (single runs or combined)")
    ap.add_argument("--out-dir", default="benchmarks/results/report")
    ap.add_argument("--combine", default=None, help="also write all runs into this one JSON")
    ap.add_argument("--summary", action="store_true", help="print the short summary table last")
    ap.add_argument("--no-render", action="store_true", help="only --combine (no markdown, no plots)")
    args = ap.parse_args(argv)
    runs = load_runs(args.inputs)
    if args.combine:
        print(f"wrote {combine(runs, Path(args.combine))}")
    if args.no_render:
        return 0
    res = render(runs, Path(args.out_dir))
    print(f"wrote {res['markdown']} and {len(res['png'])} PNG(s): {', '.join(p.name for p in res['png'])}")
    if args.summary:
        print("\n".join(["", "== summary ==", *summary_lines(runs)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
