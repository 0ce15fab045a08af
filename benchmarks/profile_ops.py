"""Where the time goes: torch.profiler operator tables of our models and their timm / HF counterparts.

    python benchmarks/profile_ops.py deit_small_patch16_224 hf:vit cvt_13 hf:cvt [--batch 8] [--train]
    /work/timmvenv/bin/python benchmarks/profile_ops.py timm:convit_small convit_small

A name is one of ours, `timm:<name>` (needs timm) or `hf:vit` / `hf:deit` / `hf:cvt` (needs transformers,
random init). `--onednn` profiles ours through `optimize_for_cpu_inference`. Prints the top operators
by self CPU time for each model, after one warm-up step.

`--scaling` (idle machine only: the profiler's times are wall times) profiles `--steps` steps at 1 thread and at
`--threads`, grouped by operator and input shape, and prints each group's time per step at both and the ratio — where
the second thread is lost at batch 1:

    python benchmarks/profile_ops.py botnet_bot50 coatnet_0 --onednn --batch 1 --scaling --rows 40
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from _common import add_malloc_option, apply_malloc, logits_of  # noqa: I001  (also puts this checkout's src/ on sys.path)

import hybridzoo  # noqa: F401
from hybridzoo.factory import create_model
from hybridzoo.layers.onednn import optimize_for_cpu_inference


def build(name: str, img: int):
    if name.startswith("timm:"):
        import timm
        return timm.create_model(name[5:], pretrained=False, img_size=img) if "convit" in name or "deit" in name \
            or "vit_" in name else timm.create_model(name[5:], pretrained=False)
    if name.startswith("hf:"):
        from bench_transformers import hf_cvt13, hf_deit
        return {"vit": lambda: hf_deit(vit=True), "deit": hf_deit, "cvt": hf_cvt13}[name[3:]]()
    return create_model(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)))
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--onednn", action="store_true")
    ap.add_argument("--rows", type=int, default=18)
    ap.add_argument("--scaling", action="store_true",
                    help="per operator and shape: time per step at 1 thread and at --threads, and the ratio")
    ap.add_argument("--steps", type=int, default=10, help="profiled steps per thread count (--scaling)")
    add_malloc_option(ap)
    args = ap.parse_args()
    apply_malloc(args)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.img, args.img)
    for name in args.models:
        model = build(name, args.img)
        if args.onednn and not name.startswith(("timm:", "hf:")):
            model = optimize_for_cpu_inference(model)

        def step():
            if args.train:
                model.train()
                loss = logits_of(model(x)).float().logsumexp(-1).mean()
                loss.backward()
            else:
                model.eval()
                with torch.inference_mode():
                    model(x)
        if args.scaling:
            print_scaling(name, step, args)
            continue
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"\n### {name} ({'train' if args.train else 'inference'}, batch {args.batch}, {args.threads} threads)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def print_scaling(name: str, step, args) -> None:
    per: dict[int, dict[tuple[str, str], tuple[float, float]]] = {}
    for threads in (1, args.threads):
        torch.set_num_threads(threads)
        step(), step()   # warm-up: weights packed, the token split's choice made, for this thread count
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.steps):
                step()
        per[threads] = {(e.key, str(e.input_shapes)): (e.self_cpu_time_total / args.steps / 1e3, e.count / args.steps)
                        for e in prof.key_averages(group_by_input_shape=True)}
    torch.set_num_threads(args.threads)
    one, many = per[1], per[args.threads]
    print(f"\n### {name}: self time per step (ms) at 1 and {args.threads} threads, batch {args.batch}, "
          f"{args.steps} steps each; sums {sum(v[0] for v in one.values()):.1f} / {sum(v[0] for v in many.values()):.1f}")
    print(f"| operator | input shapes | calls | 1 thread | {args.threads} threads | ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for key in sorted(one, key=lambda k: -one[k][0])[:args.rows]:
        t1, calls = one[key]
        tn = many.get(key, (float("nan"), 0))[0]
        print(f"| {key[0]} | {key[1][:80]} | {calls:.0f} | {t1:.3f} | {tn:.3f} | {t1 / tn:.2f} |")


if __name__ == "__main__":
    main()
