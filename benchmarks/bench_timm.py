"""Our models against timm's implementations of the same architectures, in one process.

Run it with an interpreter that has timm (this checkout's `src/` is put on the path, nothing to install):

    /work/timmvenv/bin/python benchmarks/bench_timm.py --out benchmarks/results_timm.json
    /work/timmvenv/bin/python benchmarks/bench_timm.py --pairs deit convit_tiny --threads 1 --rounds 3

With the default five pairs that is about 20 timed model-steps per pair; on a machine shared with other
jobs it takes several times longer (the run recorded in RESULTS.md took 22 minutes at load average 4–6).

Pairs (timm name → ours), random init on both sides, stochastic depth off on both sides:
  deit          deit_small_patch16_224 → deit_small_patch16_224
  vit_small     vit_small_patch16_224  → vit_small_patch16_224 (same architecture as DeiT-S; inference only;
                not in the default set)
  convit_tiny   convit_tiny            → convit_tiny
  convit_small  convit_small           → convit_small
  coatnet_0     coatnet_0_224          → coatnet_0
  botnet        botnet26t_256 @224     → botnet_t3 @224 — NOT the same architecture (timm's is a 26-layer
                ResNet-D-ish net with 2 attention blocks, ours BoTNet-S1-59), so compare GMAC/s, not images/s.
A pair whose model is not registered here (or not in this timm) is skipped with a note.
Ours also runs through `optimize_for_cpu_inference` (oneDNN) for inference. See `_common.py` for the
interleaving and the figures; `bench_transformers.py` for the scenarios.
"""

from __future__ import annotations


import torch

from _common import (TRAIN_NOTE, Contestant, base_parser, count_macs_safe, make_inference_step,  # noqa: I001
                     make_train_step, parse_and_setup,
                     run_scenarios)

import hybridzoo
from hybridzoo.factory import create_model
from hybridzoo.layers.onednn import onednn_available, optimize_for_cpu_inference
from hybridzoo.profile import count_params

# key: (timm name, timm kwargs, ours, our kwargs, group label, same_architecture, scenarios)
PAIRS = {
    "deit": ("deit_small_patch16_224", {}, "deit_small_patch16_224", {}, "DeiT-S", True, None),
    "vit_small": ("vit_small_patch16_224", {}, "vit_small_patch16_224", {}, "ViT-S/16", True, {"inference"}),
    "convit_tiny": ("convit_tiny", {}, "convit_tiny", {}, "ConViT-Ti", True, None),
    "convit_small": ("convit_small", {}, "convit_small", {}, "ConViT-S", True, None),
    "coatnet_0": ("coatnet_0_224", {}, "coatnet_0", {}, "CoAtNet-0", True, None),
    "botnet": ("botnet26t_256", {"img_size": 224}, "botnet_t3", {}, "BoTNet (different archs)", False, None),
}
# vit_small is the same architecture as DeiT-S (only the weights differ): opt-in, to keep the default run short
DEFAULT = ["deit", "convit_tiny", "convit_small", "coatnet_0", "botnet"]


def build_pairs(keys: list[str]):
    import timm
    pairs, skipped = [], []
    ours_available = set(hybridzoo.list_models())
    for key in keys:
        timm_name, timm_kw, ours, ours_kw, group, same, scen = PAIRS[key]
        if ours not in ours_available:
            skipped.append(f"{key}: ours `{ours}` is not registered in this checkout")
            continue
        if not timm.is_model(timm_name):
            skipped.append(f"{key}: timm {timm.__version__} has no `{timm_name}`")
            continue
        theirs = timm.create_model(timm_name, pretrained=False, drop_path_rate=0.0, **timm_kw)
        mine = create_model(ours, drop_path_rate=0.0, **ours_kw)
        note = "" if same else "different architecture: compare GFLOP/s"
        pairs.append((group, scen, [(f"timm {timm_name}", "timm", theirs, note), (ours, "ours", mine, note)]))
    return pairs, skipped


def main() -> None:
    ap = base_parser(__doc__.split("\n")[0], rounds=3)
    ap.add_argument("--pairs", "--models", nargs="+", default=DEFAULT, choices=list(PAIRS))
    ap.add_argument("--channels-last", action="store_true",
                    help="convert every model and input to channels-last (both sides)")
    args = parse_and_setup(ap)

    pairs, skipped = build_pairs(args.pairs)
    for s in skipped:
        print("skipped:", s)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    for _, _, entries in pairs:
        for _, _, m, _ in entries:
            m.to(memory_format=fmt)
    x_inf = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=fmt)
    x_train = torch.randn(args.train_batch, 3, 224, 224).contiguous(memory_format=fmt)
    x_one = torch.randn(1, 3, 224, 224).contiguous(memory_format=fmt)
    macs = {name: count_macs_safe(m, x_one) for _, _, e in pairs for name, _, m, _ in e}
    params = {name: count_params(m) for _, _, e in pairs for name, _, m, _ in e}

    def infer_contestants(x):
        cs = []
        for group, _, entries in pairs:
            for name, impl, model, note in entries:
                cs.append(Contestant(name, group, impl, make_inference_step(model, x), macs[name], params[name], note))
                if impl == "ours" and onednn_available():
                    fast = optimize_for_cpu_inference(model)
                    cs.append(Contestant(name + " +oneDNN", group, "ours+onednn", make_inference_step(fast, x),
                                         macs[name], params[name], "optimize_for_cpu_inference"))
        return cs

    def train_contestants():
        # ours through the trainer's fp32 CPU path (optimize_for_cpu_training + fused AdamW), timm as built
        return [Contestant(name, group, impl, make_train_step(model, x_train, fast=impl == "ours"), macs[name],
                           params[name], note + ("; " if note else "") + TRAIN_NOTE if impl == "ours" else note)
                for group, scen, entries in pairs if scen is None or "training" in scen
                for name, impl, model, note in entries]

    scenarios = []
    if "infer" in args.scenarios:
        scenarios.append(("inference", args.batch, 2.0, lambda: infer_contestants(x_inf), args.rounds, 1))
    if "train" in args.scenarios:
        scenarios.append(("training", args.train_batch, 6.0, train_contestants, args.train_rounds, 1))
    if "latency" in args.scenarios:
        scenarios.append(("latency-bs1", 1, 2.0, lambda: infer_contestants(x_one), args.rounds, 3))
    run_scenarios(scenarios, args.threads, out=args.out, peak=not args.no_peak,
                  env_extra={"script": "bench_timm.py", "args": vars(args), "skipped": skipped,
                             "memory_format": "channels_last" if args.channels_last else "contiguous"})


if __name__ == "__main__":
    main()
