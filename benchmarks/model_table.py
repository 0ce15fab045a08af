"""Print a Markdown table of every registered model: our params/MACs (measured on the meta device)
next to the paper's reported figures and the official exact count.

    python benchmarks/model_table.py [pattern] > table.md
"""

from __future__ import annotations

import sys

import hybridzoo
from hybridzoo.profile import measure_model
from hybridzoo.registry import get_card


def main(pattern: str | None = None) -> None:
    print("| model | task | res | params (ours) | params (official / paper) | GMACs (ours) | GMACs (paper) | headline (paper) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for name in hybridzoo.list_models(pattern):
        card = get_card(name)
        m = measure_model(name)
        rep = card.reported
        ref_params = f"{card.params:,}" if card.params is not None else f"{rep.get('params_m', float('nan'))}M"
        metric = {k: v for k, v in rep.items() if k not in ("params_m", "gflops", "resolution")}
        ref_macs = rep.get("gflops")
        if card.macs_g is not None:
            ref_macs = f"{ref_macs} (official measured {card.macs_g})"
        res = "×".join(str(s) for s in m["input_size"][1:]) or str(m["input_size"])
        demo = " (demo)" if card.demo else ""
        print(f"| `{name}`{demo} | {card.task} | {res} | {m['params']:,} | {ref_params} | {m['macs'] / 1e9:.3f} | {ref_macs} | "
              + ", ".join(f"{k} {v}" for k, v in metric.items()) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
