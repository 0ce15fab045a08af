"""Markdown tables from the JSON the benchmark scripts write (for benchmarks/RESULTS.md).

    python benchmarks/summarize.py benchmarks/results_transformers.json benchmarks/results_timm.json
"""

from __future__ import annotations

import json
import sys

from _common import print_table


def _fmt(d: dict | None) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in (d or {}).items()) or "–"


def ratio_table(rows: list[dict]) -> None:
    """One line per architecture: ours / reference images/s (wall / CPU time), per scenario (eager and oneDNN)."""
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    groups = list(dict.fromkeys(r["group"] for r in rows))
    cols = [(s, impl) for s in scenarios for impl in ("ours", "ours+onednn")
            if any(r["scenario"] == s and r["impl"] == impl for r in rows)]
    print("| architecture | reference | " + " | ".join(f"{s} {i}" for s, i in cols) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in cols) + " |")
    for g in groups:
        ref = next((r["ref"] for r in rows if r["group"] == g and "ref" in r), "–")
        cells = []
        for s, impl in cols:
            r = next((r for r in rows if r["group"] == g and r["scenario"] == s and r["impl"] == impl), None)
            ok = r is not None and "ratio_vs_ref" in r
            cells.append(f"{r['ratio_vs_ref']:.2f} / {r['ratio_vs_ref_cpu']:.2f}" if ok else "–")
        print(f"| {g} | {ref} | " + " | ".join(cells) + " |")


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        env, peak = res["environment"], res.get("peak", {})
        versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "timm", "transformers") if k in env)
        print(f"### {path}\n")
        print(f"{env['date']} · {env['cpu']} · {env['threads']} threads · {versions} · load average "
              f"{env['loadavg_start']} → {env.get('loadavg_end')} · fp32 matmul peak in the same run: "
              f"{_fmt(peak.get('wall'))} GFLOP/s wall-clock; {_fmt(peak.get('cpu'))} per CPU-second\n")
        if env.get("skipped"):
            print("Skipped: " + "; ".join(env["skipped"]) + "\n")
        ratio_table(res["results"])
        print()
        print_table(res["results"])
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
