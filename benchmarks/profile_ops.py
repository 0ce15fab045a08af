"""Where the time goes: torch.profiler operator tables of our models and their timm / HF counterparts.

    python benchmarks/profile_ops.py deit_small_patch16_224 hf:vit cvt_13 hf:cvt [--batch 8] [--train]
    /work/timmvenv/bin/python benchmarks/profile_ops.py timm:convit_small convit_small

A name is one of ours, `timm:<name>` (needs timm) or `hf:vit` / `hf:deit` / `hf:cvt` (needs transformers,
random init). `--onednn` profiles ours through `optimize_for_cpu_inference`. Prints the top operators
by self CPU time for each model, after one warm-up step.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from _common import logits_of  # noqa: I001  (also puts this checkout's src/ on sys.path)

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
    args = ap.parse_args()
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
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"\n### {name} ({'train' if args.train else 'inference'}, batch {args.batch}, {args.threads} threads)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
