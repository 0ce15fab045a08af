"""Our DeiT-S and CvT-13 against HuggingFace transformers' implementations, in one process.

Same threads, same batch, same random input; random init on both sides (nothing is downloaded).
Contestants per architecture:
- HF `ViTForImageClassification` at DeiT-S (hidden 384, 6 heads, 12 layers, MLP 1536, LN eps 1e-6,
  qkv bias) with transformers' default attention implementation (recorded in the output; "sdpa" in
  transformers 5) — exactly our `deit_small_patch16_224` (197 tokens). HF's
  `DeiTForImageClassification` always embeds a distillation token too (198 tokens, 0.5% more work),
  so it only comes in with `--hf-deit`, as an extra row. CvT-13: HF
  `CvtForImageClassification(CvtConfig(num_labels=1000))`, which uses exact GELU in the MLP where the
  official CvT (and ours) uses QuickGELU x·σ(1.702x); ours is therefore also run as `cvt_13 act=GELU`
  (HF's computation) so that the activation's cost can be told apart from the implementation's;
- ours, eager fp32 (`deit_small_patch16_224`, `cvt_13`);
- ours through `optimize_for_cpu_inference` (pre-packed oneDNN linears, activation fused), inference only.
Stochastic depth and dropout are off on both sides (HF's CvtConfig default has drop_path 0.1 in the last
stage, ours too; both are set to 0 so the training step does the same work).

Scenarios: inference (batch 32), training step = forward + cross-entropy + backward + AdamW (batch 16,
`--train-rounds` 7; ours through the trainer's fp32 CPU path: `optimize_for_cpu_training` and fused
AdamW), batch-1 latency. Runs are interleaved and medians taken (see `_common.py`); GFLOP/s is
2·MACs·images/s (MACs by `hybridzoo.profile.count_macs` on a meta copy, training counted as 3× the
forward), and the share is of the best fp32 matmul rate (MKL, oneDNN or 1×1 conv) measured at the start
of the same run. Each figure is given on the wall clock and per second of process CPU time.

    python benchmarks/bench_transformers.py --out benchmarks/results_transformers.json
    python benchmarks/bench_transformers.py --threads 1 --rounds 3 --models deit   # quicker
"""

from __future__ import annotations


import torch
from torch import nn

from _common import (Contestant, base_parser, count_macs_safe, make_inference_step,  # noqa: I001
                     parse_and_setup, train_contestants_of,
                     run_scenarios)

import hybridzoo  # noqa: F401  (registers the models)
from hybridzoo.factory import create_model
from hybridzoo.layers.onednn import onednn_available, optimize_for_cpu_inference
from hybridzoo.profile import count_params


def hf_deit(vit: bool = False):
    from transformers import DeiTConfig, DeiTForImageClassification, ViTConfig, ViTForImageClassification
    cfg_cls, model_cls = (ViTConfig, ViTForImageClassification) if vit else (DeiTConfig, DeiTForImageClassification)
    cfg = cfg_cls(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                  layer_norm_eps=1e-6, qkv_bias=True, image_size=224, patch_size=16, num_labels=1000,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return model_cls(cfg)


def hf_cvt13():
    from transformers import CvtConfig, CvtForImageClassification
    return CvtForImageClassification(CvtConfig(num_labels=1000, drop_path_rate=[0.0, 0.0, 0.0]))


def attn_impl(model) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "eager (no attention switch)")


def build_pairs(models: list[str], hf_deit_too: bool, cvt_gelu: bool = True):
    """[(group, [(name, impl, model, note)])] — the eager models; the oneDNN copies are made per scenario."""
    pairs = []
    if "deit" in models:
        v = hf_deit(vit=True)
        entries = [("hf ViTForImageClassification", "hf-transformers", v, f"attn={attn_impl(v)}")]
        if hf_deit_too:
            d = hf_deit()
            entries.append(("hf DeiTForImageClassification", "hf-transformers", d,
                            f"attn={attn_impl(d)}; always carries the distillation token (198 tokens)"))
        entries.append(("deit_small_patch16_224", "ours", create_model("deit_small_patch16_224"), ""))
        pairs.append(("DeiT-S", entries))
    if "cvt" in models:
        hf = hf_cvt13()
        pairs.append(("CvT-13", [
            ("hf CvtForImageClassification", "hf-transformers", hf, f"attn={attn_impl(hf)}, GELU"),
            ("cvt_13", "ours", create_model("cvt_13", drop_path_rate=0.0), "QuickGELU (official)"),
        ] + ([("cvt_13 act=GELU", "ours", create_model("cvt_13", drop_path_rate=0.0, act_layer=nn.GELU),
               "HF's activation: the same computation as HF's port")] if cvt_gelu else [])))
    return pairs


def main() -> None:
    ap = base_parser(__doc__.split("\n")[0], rounds=4)
    ap.add_argument("--models", nargs="+", default=["deit", "cvt"], choices=["deit", "cvt"])
    ap.add_argument("--hf-deit", action="store_true",
                    help="also run HF DeiTForImageClassification (198 tokens: it always has a distillation token)")
    ap.add_argument("--no-cvt-gelu", action="store_true",
                    help="leave out our CvT-13 built with HF's exact GELU instead of the official QuickGELU")
    ap.add_argument("--train-compile", action="store_true",
                    help="also train ours under torch.compile (`hybridzoo train --compile`; compile time printed "
                         "and recorded)")
    args = parse_and_setup(ap)

    pairs = build_pairs(args.models, args.hf_deit, not args.no_cvt_gelu)
    x_inf = torch.randn(args.batch, 3, 224, 224)
    x_train = torch.randn(args.train_batch, 3, 224, 224)
    x_one = torch.randn(1, 3, 224, 224)
    macs = {name: count_macs_safe(m, x_one) for _, entries in pairs for name, _, m, _ in entries}
    params = {name: count_params(m) for _, entries in pairs for name, _, m, _ in entries}

    def infer_contestants(x):
        cs = []
        for group, entries in pairs:
            for name, impl, model, note in entries:
                cs.append(Contestant(name, group, impl, make_inference_step(model, x), macs[name], params[name], note))
                if impl == "ours" and onednn_available() and "act=GELU" not in name:
                    fast = optimize_for_cpu_inference(model)
                    cs.append(Contestant(name + " +oneDNN", group, "ours+onednn", make_inference_step(fast, x),
                                         macs[name], params[name], "optimize_for_cpu_inference"))
        return cs

    compile_times: dict[str, float] = {}
    scenarios = []
    if "infer" in args.scenarios:
        scenarios.append(("inference", args.batch, 2.0, lambda: infer_contestants(x_inf), args.rounds, 1))
    if "train" in args.scenarios:
        def train_contestants():
            # ours through the trainer's fp32 CPU path (optimize_for_cpu_training + fused AdamW), HF as built
            return [c for group, entries in pairs for name, impl, model, note in entries
                    for c in train_contestants_of(name, group, impl, model, note, x_train, macs[name], params[name],
                                                  compile_times if args.train_compile and "act=GELU" not in name
                                                  else None)]
        scenarios.append(("training", args.train_batch, 6.0, train_contestants, args.train_rounds, 1))
    if "latency" in args.scenarios:
        scenarios.append(("latency-bs1", 1, 2.0, lambda: infer_contestants(x_one), args.rounds, 5))
    run_scenarios(scenarios, args.threads, out=args.out, peak=not args.no_peak,
                  env_extra={"script": "bench_transformers.py", "args": vars(args), "compile_s": compile_times})


if __name__ == "__main__":
    main()
