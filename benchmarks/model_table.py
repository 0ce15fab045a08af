"""A Markdown table of every registered model: our params/MACs (measured on the meta device) next to
the paper's reported figures and the official exact count.

    python benchmarks/model_table.py [pattern]          # print it
    python benchmarks/model_table.py --readme README.md # rewrite the table between the README's markers
"""

from __future__ import annotations

import sys

import hybridzoo
from hybridzoo.profile import measure_model
from hybridzoo.registry import get_card


def table(pattern: str | None = None) -> list[str]:
    lines = []
    print = lines.append  # noqa: A001  (collect the rows)
    print("| model | task | res | params (ours) | params (official / paper) | GMACs (ours) | GMACs (paper) | headline (paper) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for name in hybridzoo.list_models(pattern):
        card = get_card(name)
        m = measure_model(name)
        rep = card.reported
        if card.params is not None:
            ref_params = f"{card.params:,}" + (" (ours: none published)" if card.params_source == "ours" else "")
        elif rep.get("params_m") is not None:
            ref_params = f"{rep['params_m']}M" + (" (ours: none published)" if card.params_source == "ours" else "")
        else:
            ref_params = "—"
        metric = {k: v for k, v in rep.items() if k not in ("params_m", "gflops", "resolution") and v is not None}
        paper_macs = "—" if rep.get("gflops") is None else f"{rep['gflops']}"
        if card.macs_g is not None:
            paper_macs += f" (official model measured: {card.macs_g})" if card.params_source != "ours" else f" (ours: {card.macs_g})"
        size = m["input_size"]
        res = "×".join(str(s) for s in size[1:]) if len(size) == 3 else f"L={size[0]}"
        demo = " (demo)" if card.demo else ""
        print(f"| `{name}`{demo} | {card.task} | {res} | {m['params']:,} | {ref_params} | {m['macs'] / 1e9:.3f} | "
              f"{paper_macs} | " + ", ".join(f"{k} {v}" for k, v in metric.items()) + " |")
    return lines


START, END = "<!-- models:start -->", "<!-- models:end -->"


def main(argv: list[str]) -> None:
    if argv[:1] == ["--readme"]:
        path = argv[1]
        text = open(path, encoding="utf-8").read()
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        body = "\n".join(table())
        open(path, "w", encoding="utf-8").write(f"{head}{START}\n{body}\n{END}{tail}")
    else:
        print("\n".join(table(argv[0] if argv else None)))


if __name__ == "__main__":
    main(sys.argv[1:])
