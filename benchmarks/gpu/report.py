"""Merge the device runs' JSON into benchmarks/results/ and draw the figures.

    python3 benchmarks/gpu/report.py DIR [DIR ...]   # folders the device calls returned

Writes flaggems_gpu_results.json (every engine run, parity, e2e, profile, with
device and versions; the report's own commit, command line and time, and the
commits of the runs it merged), flaggems_gpu_throughput.png and prints the
table that docs/flaggems.md quotes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for provenance.py
from provenance import provenance  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
ORDER = ["stock", "stock_eager", "gems_compiled", "gems_compiled_no_rotary_embedding", "gems_full_decode",
         "gems_piecewise", "gems_eager"]
ARCH_NAME = {"7b": "Qwen2.5-VL-7B", "32b": "Qwen2.5-VL-32B", "q2_7b": "Qwen2.5-7B (std RoPE)"}


def main(dirs: list[str]) -> int:
    runs: dict[str, dict] = {}
    parity = e2e = None
    profile: dict = {}
    commits = set()
    for d in dirs:
        for f in sorted(Path(d).glob("*.json")):
            for key, val in json.loads(f.read_text()).items():
                commits.add(val.get("commit", "unknown"))  # "unknown": a run from before runs recorded it
                if key == "parity_ops":
                    parity = val
                elif key.startswith("parity_e2e"):
                    e2e = val
                elif key.startswith("profile_"):
                    profile[val["mode"]] = val["profile"]
                elif "throughput" in val:
                    tag = val["mode"] + (f"_no_{val['exclude'].replace(',', '_')}" if val.get("exclude") else "")
                    runs[f"{val['arch']}/{tag}"] = val
    table = []
    for key, r in runs.items():
        arch, tag = key.split("/")
        stock = runs.get(f"{arch}/stock")
        row = {"arch": arch, "model": ARCH_NAME.get(arch, arch), "mode": tag,
               "output_tok_s": r["throughput"]["output_tok_s"], "single_stream_tok_s": r["single_stream"]["tok_s"]}
        if stock:
            row["throughput_vs_stock"] = row["output_tok_s"] / stock["throughput"]["output_tok_s"]
            row["single_vs_stock"] = row["single_stream_tok_s"] / stock["single_stream"]["tok_s"]
        table.append(row)
    table.sort(key=lambda r: (list(ARCH_NAME).index(r["arch"]) if r["arch"] in ARCH_NAME else 9,
                              ORDER.index(r["mode"]) if r["mode"] in ORDER else 99))
    any_run = next(iter(runs.values()))
    here = provenance()
    here["report_command"] = here.pop("command")
    out = {**here, "device": any_run["device"],  # the runs' GPU, not this machine
           "run_commits": sorted(commits), "versions": any_run.get("versions"),
           "workload": {k: any_run["throughput"][k] for k in ("requests", "input_len", "output_len")},
           "table": table, "parity_ops": parity, "parity_e2e": e2e, "profile": profile, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "flaggems_gpu_results.json").write_text(json.dumps(out, indent=1))

    print(f"device: {out['device']}  versions: {out['versions']}")
    print("| model | mode | output tok/s | vs stock | single-stream tok/s | vs stock |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['model']} | {r['mode']} | {r['output_tok_s']:.0f} | {r.get('throughput_vs_stock', 0):.1%} | "
              f"{r['single_stream_tok_s']:.1f} | {r.get('single_vs_stock', 0):.1%} |")
    if parity:
        print("\n| op | cases passed | max abs diff vs stock | rel err vs fp64 (FlagGems) | rel err vs fp64 (stock) |")
        print("|---|---|---|---|---|")
        for op, s in parity["summary"].items():
            print(f"| {op} | {s['passed']}/{s['cases']} | {s['max_abs_diff']:.3g} | {s['max_rel_err_gems_vs_fp64']:.3g} | "
                  f"{s['max_rel_err_stock_vs_fp64']:.3g} |")
    if e2e:
        print(f"\ne2e: {json.dumps(e2e)}")
    for mode, p in profile.items():
        print(f"profile {mode}: " + ", ".join(f"{k} {v:.1%}" for k, v in sorted(p["share"].items())))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = [a for a in ARCH_NAME if any(r["arch"] == a for r in table)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, metric, title in ((axes[0], "throughput_vs_stock", "throughput (256 x 512 in / 128 out)"),
                              (axes[1], "single_vs_stock", "single stream (512 in / 128 out)")):
        modes = [m for m in ORDER if any(r["mode"] == m for r in table)]
        width = 0.8 / len(modes)
        for i, m in enumerate(modes):
            vals = [next((r.get(metric, 0) * 100 for r in table if r["arch"] == a and r["mode"] == m), 0) for a in archs]
            bars = ax.bar([x + i * width for x in range(len(archs))], vals, width, label=m)
            for b, v in zip(bars, vals):
                if v:
                    ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.0f}", ha="center", fontsize=7)
        ax.axhline(95 if metric == "throughput_vs_stock" else 90, color="red", ls="--", lw=1, label="target")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(archs))], [ARCH_NAME[a] for a in archs], fontsize=8)
        ax.set_ylabel("% of stock vLLM")
        ax.set_ylim(0, 115)
        ax.set_title(title)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"FlagGems vs stock vLLM, offline engine, dummy weights, {out['device']}")
    fig.tight_layout()
    fig.savefig(RESULTS / "flaggems_gpu_throughput.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
