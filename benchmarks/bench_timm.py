"""Our models against timm's implementations of the same architectures, in one process.

Run it with an interpreter that has timm (this checkout's `src/` is put on the path, nothing to install):

    /work/timmvenv/bin/python benchmarks/bench_timm.py --out benchmarks/results_timm.json
    /work/timmvenv/bin/python benchmarks/bench_timm.py --pairs deit convit_tiny --threads 1 --rounds 3
    /work/timmvenv/bin/python benchmarks/bench_timm.py --pairs deit convit_tiny convit_small --scenarios infer latency \
        --rounds 7 --whole-batch     # + the fast path without batch splitting, for the A/B

With the default five pairs that is about 20 timed model-steps per pair; on a machine shared with other
jobs it takes several times longer (the run recorded in RESULTS.md took 22 minutes at load average 4–6).

Pairs (timm name → ours), random init on both sides, stochastic depth off on both sides:
  deit          deit_small_patch16_224 → deit_small_patch16_224
  vit_small     vit_small_patch16_224  → vit_small_patch16_224 (same architecture as DeiT-S; inference only;
                not in the default set)
  convit_tiny   convit_tiny            → convit_tiny
  convit_small  convit_small           → convit_small
  coatnet_0     coatnet_0_224          → coatnet_0
  bot50         timm `ByobNet` configured as BoT50 → botnet_bot50: ResNet-50 with the three c5 blocks
                as bottleneck attention (7×7 stem + max-pool, ReLU, no SE, stride-2 attention block that
                pools after attention). timm ships no BoTNet of this configuration (botnet26t / botnet50ts
                have tiered stems, SiLU or attention in c4), so its ByobNet is given our exact layout:
                same 20,852,008 parameters, 4.025 vs 4.021 GMACs (timm's shortcut BN has no activation).
  botnet        botnet26t_256 @224     → botnet_t3 @224 — NOT the same architecture (timm's is a 26-layer
                ResNet-D-ish net with 2 attention blocks, ours BoTNet-S1-59), so compare GMAC/s, not images/s;
                not in the default set.
  mobile_former the official AAboys/MobileFormer `mobile_former_294m` → mobile_former_294m; needs
                `--mobile-former-official DIR` (a checkout of that repository, run from outside this one;
                the pair is skipped without it).
A pair whose model is not registered here (or not in this timm) is skipped with a note.
Ours also runs through `optimize_for_cpu_inference` (oneDNN) for inference, and with `--inductor` through
`torch.compile` with inductor's freezing (its compile time is printed and recorded). See `_common.py` for the
interleaving and the figures; `bench_transformers.py` for the scenarios.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from _common import (Contestant, base_parser, count_macs_safe, make_inference_step,  # noqa: I001
                     parse_and_setup, train_contestants_of,
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
    "bot50": ("byobnet:bot50", {}, "botnet_bot50", {}, "BoT50", True, None),
    "botnet": ("botnet26t_256", {"img_size": 224}, "botnet_t3", {}, "BoTNet (different archs)", False, None),
    "mobile_former": ("official:mobile_former_294m", {}, "mobile_former_294m", {}, "Mobile-Former-294M", True,
                      None),
}
# vit_small is the same architecture as DeiT-S (only the weights differ): opt-in, to keep the default run short
DEFAULT = ["deit", "convit_tiny", "convit_small", "coatnet_0", "bot50", "mobile_former"]


def timm_bot50():
    """timm's ByobNet given BoT50's layout (see the module docstring)."""
    from timm.models.byobnet import ByobNet, ByoBlockCfg, ByoModelCfg
    cfg = ByoModelCfg(blocks=(ByoBlockCfg("bottle", d=3, c=256, s=1, br=0.25),
                              ByoBlockCfg("bottle", d=4, c=512, s=2, br=0.25),
                              ByoBlockCfg("bottle", d=6, c=1024, s=2, br=0.25),
                              ByoBlockCfg("self_attn", d=3, c=2048, s=2, br=0.25)),
                      stem_chs=64, stem_type="7x7", stem_pool="maxpool", act_layer="relu", fixed_input_size=True,
                      self_attn_layer="bottleneck", self_attn_kwargs={})
    return ByobNet(cfg, img_size=224, drop_path_rate=0.0)


def official_mobile_former(repo: str, variant: str):
    """The official Mobile-Former from a checkout of AAboys/MobileFormer, imported as a package.

    Its files are timm-0.3 plugins (relative imports of timm's old `.helpers`, `.registry`, `.layers`);
    a throw-away package in a temporary folder holds copies of them next to three small stand-ins
    (registration is a no-op, `build_model_with_cfg` calls the class, DropPath is today's timm's)."""
    import contextlib
    import importlib
    import io
    import shutil
    import tempfile
    from pathlib import Path
    src = Path(repo)
    pkg = Path(tempfile.mkdtemp(prefix="mf_official_")) / "mf_official"
    pkg.mkdir()
    for f in ("mobile_former.py", "dna_blocks.py"):
        shutil.copy(src / f, pkg / f)
    (pkg / "__init__.py").write_text("")
    (pkg / "registry.py").write_text("def register_model(fn):\n    return fn\n")
    (pkg / "layers.py").write_text("from timm.layers import DropPath  # noqa: F401\n")
    (pkg / "helpers.py").write_text("default_cfg_for_features = None\n\n\n"
                                    "def build_model_with_cfg(cls, variant, pretrained, default_cfg=None, **kw):\n"
                                    "    return cls(**kw)\n")
    sys.path.insert(0, str(pkg.parent))
    mod = importlib.import_module("mf_official.mobile_former")
    with contextlib.redirect_stdout(io.StringIO()):  # its constructor prints the whole model
        # its common kwargs' cnn_drop_path_rate 0.1 is overwritten in MobileFormer.__init__ by drop_path_rate (0 by
        # default): no drop path, no dropout, as ours in the benchmark's training step
        return getattr(mod, variant)()


def compiled_inference_step(model, x):
    """torch.compile (inductor, freezing on: weights become constants, conv+BN folded, oneDNN weight packing)
    of an eval copy; returns the step and the seconds the first (compiling) call took."""
    import copy

    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    compiled = torch.compile(copy.deepcopy(model).eval())
    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled(x)
    seconds = time.perf_counter() - t0
    print(f"  compiled {type(model).__name__} for batch {x.shape[0]} in {seconds:.0f} s", flush=True)

    def step():
        with torch.inference_mode():
            return compiled(x)
    return step, seconds


def build_pairs(keys: list[str], mobile_former_official: str | None = None):
    import timm
    pairs, skipped = [], []
    ours_available = set(hybridzoo.list_models())
    for key in keys:
        timm_name, timm_kw, ours, ours_kw, group, same, scen = PAIRS[key]
        if ours not in ours_available:
            skipped.append(f"{key}: ours `{ours}` is not registered in this checkout")
            continue
        if timm_name == "byobnet:bot50":
            theirs, timm_name = timm_bot50(), "ByobNet as BoT50"
        elif timm_name.startswith("official:"):
            if not mobile_former_official or not Path(mobile_former_official, "mobile_former.py").is_file():
                skipped.append(f"{key}: no official checkout (--mobile-former-official DIR, got "
                               f"{mobile_former_official!r})")
                continue
            theirs = official_mobile_former(mobile_former_official, timm_name.split(":", 1)[1])
            group_impl = "official"
            pairs.append((group, scen, [(f"official {timm_name[9:]}", group_impl, theirs, ""),
                                        (ours, "ours", create_model(ours, drop_path_rate=0.0, **ours_kw), "")]))
            continue
        elif not timm.is_model(timm_name):
            skipped.append(f"{key}: timm {timm.__version__} has no `{timm_name}`")
            continue
        else:
            theirs = timm.create_model(timm_name, pretrained=False, drop_path_rate=0.0, **timm_kw)
        mine = create_model(ours, drop_path_rate=0.0, **ours_kw)
        note = "" if same else "different architecture: compare GFLOP/s"
        pairs.append((group, scen, [(f"timm {timm_name}", "timm", theirs, note), (ours, "ours", mine, note)]))
    return pairs, skipped


def _splits_tokens(model) -> bool:
    from hybridzoo.layers.onednn_tokens import TokenParallelBlockList, TokenParallelBlocks
    return any(isinstance(m, (TokenParallelBlocks, TokenParallelBlockList)) for m in model.modules())


def main() -> None:
    ap = base_parser(__doc__.split("\n")[0], rounds=3)
    ap.add_argument("--pairs", "--models", nargs="+", default=DEFAULT, choices=list(PAIRS))
    ap.add_argument("--channels-last", action="store_true",
                    help="convert every model and input to channels-last (both sides)")
    ap.add_argument("--mobile-former-official", default=os.environ.get("MOBILE_FORMER_OFFICIAL"), metavar="DIR",
                    help="a checkout of github.com/AAboys/MobileFormer (outside this repository) for the "
                         "mobile_former pair; without it the pair is skipped")
    ap.add_argument("--whole-batch", action="store_true",
                    help="also run ours through optimize_for_cpu_inference(split_batch=False) (the batch as one "
                         "stream on all threads) beside the default split path (inference at batch > 1), and at "
                         "batch 1 through split_tokens=False for the models whose blocks split their token rows")
    ap.add_argument("--inductor", action="store_true",
                    help="also run ours through torch.compile with inductor freezing (inference; compile time "
                         "printed and recorded)")
    ap.add_argument("--train-compile", action="store_true",
                    help="also train ours under torch.compile (`hybridzoo train --compile`; compile time printed "
                         "and recorded)")
    ap.add_argument("--train-whole-batch", action="store_true",
                    help="also train ours on the whole batch at once (`hybridzoo train --no-batch-split`) beside "
                         "the default batch split")
    args = parse_and_setup(ap)

    pairs, skipped = build_pairs(args.pairs, args.mobile_former_official)
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
                fast = None
                if impl == "ours" and onednn_available():
                    fast = optimize_for_cpu_inference(model)
                    cs.append(Contestant(name + " +oneDNN", group, "ours+onednn", make_inference_step(fast, x),
                                         macs[name], params[name], "optimize_for_cpu_inference"))
                    if args.whole_batch and x.shape[0] > 1:
                        whole = optimize_for_cpu_inference(model, split_batch=False)
                        cs.append(Contestant(name + " +oneDNN whole batch", group, "ours+onednn-whole",
                                             make_inference_step(whole, x), macs[name], params[name],
                                             "optimize_for_cpu_inference(split_batch=False)"))
                    if args.whole_batch and x.shape[0] == 1 and fast is not None and _splits_tokens(fast):
                        whole = optimize_for_cpu_inference(model, split_tokens=False)
                        cs.append(Contestant(name + " +oneDNN whole tokens", group, "ours+onednn-whole-tokens",
                                             make_inference_step(whole, x), macs[name], params[name],
                                             "optimize_for_cpu_inference(split_tokens=False)"))
                if impl == "ours" and args.inductor:
                    step, seconds = compiled_inference_step(model, x)
                    compile_times[f"{name} batch {x.shape[0]}"] = seconds
                    cs.append(Contestant(name + " +inductor", group, "ours+inductor", step, macs[name], params[name],
                                         f"torch.compile, freezing; compiled in {seconds:.0f} s"))
        return cs

    def train_contestants():
        # ours through the trainer's fp32 CPU path (optimize_for_cpu_training + fused AdamW), timm as built
        return [c for group, scen, entries in pairs if scen is None or "training" in scen
                for name, impl, model, note in entries
                for c in train_contestants_of(name, group, impl, model, note, x_train, macs[name], params[name],
                                              compile_times if args.train_compile else None,
                                              whole_batch=args.train_whole_batch)]

    scenarios = []
    if "infer" in args.scenarios:
        scenarios.append(("inference", args.batch, 2.0, lambda: infer_contestants(x_inf), args.rounds, 1))
    if "train" in args.scenarios:
        scenarios.append(("training", args.train_batch, 6.0, train_contestants, args.train_rounds, 1))
    if "latency" in args.scenarios:
        scenarios.append(("latency-bs1", 1, 2.0, lambda: infer_contestants(x_one), args.rounds, 3))
    compile_times: dict[str, float] = {}
    run_scenarios(scenarios, args.threads, out=args.out, peak=not args.no_peak,
                  env_extra={"script": "bench_timm.py", "args": vars(args), "skipped": skipped,
                             "inductor_compile_s": compile_times,
                             "memory_format": "channels_last" if args.channels_last else "contiguous"})


if __name__ == "__main__":
    main()
