"""What segmentation spends beside the model, in evaluation and in training: our one pass over the logits against
ATen's passes apart, on the logits of the model itself.

Evaluation (default): `SegmentationTask.eval_step`'s stats from `tasks.segmentation.pixel_stats` (cross-entropy,
class map and intersect/union counts together, the native kernel on the CPU) against the three passes it replaced
(`F.cross_entropy`, `class_map`, `intersect_and_union`), on the logits of the model `hybridzoo eval` runs
(`fastest_cpu_inference`). The model runs once per image and its logits are kept, so a round times the stats alone,
both ways on the same logits, alternating; the step with the model is timed once per way at the end for scale. Both
ways must give the same counts and losses (to 1e-6), or the probe stops.

Training (`--train`): one step of the trainer's fp32 CPU path (`optimize_for_cpu_training`, fused AdamW; the model's
main and auxiliary heads) with the loss of `tasks.segmentation.segmentation_loss` taken in one pass with its
gradient (`_PixelCrossEntropy`, which also resizes a head's smaller logits to the labels on the way) against
`F.interpolate` and `F.cross_entropy` under autograd, alternating, on two copies of the same weights; their first
losses must agree (to 1e-5), or the probe stops.

    python benchmarks/seg_loss_probe.py                            # SCTNet-S, 19 classes, 1024 × 2048, 3 images
    python benchmarks/seg_loss_probe.py --model sctnet_s_seg50 --size 512 1024 --images 4 --rounds 7
    python benchmarks/seg_loss_probe.py --train --size 512 1024 --images 2 --rounds 5   # a batch of 2 crops

Synthetic images and labels (random, labelled so; void pixels as Cityscapes has them). Prints the medians and the
per-round ratio apart / one pass with its range.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import _common  # noqa: F401,I001  (puts this checkout's src/ on sys.path)

import hybridzoo.tasks.segmentation as seg
from hybridzoo.factory import create_model
from hybridzoo.layers.onednn import fastest_cpu_inference
from hybridzoo.layers.train_fast import optimize_for_cpu_training
from peak import cpu_name


def apart(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
          ignore_index: int = seg.IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """`pixel_stats` as evaluation took it before: cross-entropy, class map and counts, each a pass of its own."""
    rows, losses = [], []
    for lg, label in zip(logits, labels):
        ce = F.cross_entropy(lg[None].float(), label[None], ignore_index=ignore_index, reduction="sum")
        losses.append([float(ce), float((label != ignore_index).sum())])
        inter, _, area_pred, area_label = seg.intersect_and_union(seg.class_map(lg[None])[0], label, num_classes,
                                                                  ignore_index)
        rows.append(torch.stack([inter, area_pred, area_label]))
    return torch.stack(rows), torch.tensor(losses, dtype=torch.float64)


def _time(fn, reps: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def measure(model_name: str, classes: int, size: tuple[int, int], images: int, rounds: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = fastest_cpu_inference(create_model(model_name, num_classes=classes).eval())
    g = torch.Generator().manual_seed(seed)
    h, w = size
    batches = []
    for _ in range(images):
        x = torch.randn(1, 3, h, w, generator=g)
        labels = torch.randint(0, classes, (1, h, w), generator=g)
        labels[:, : h // 10] = seg.IGNORE_INDEX     # void, as Cityscapes' ego vehicle and borders
        with torch.inference_mode():
            logits = model(x)
            logits = model(x)                       # past the first-call race: the path eval keeps
        batches.append((x, labels, logits))
    layout = "channels-last" if batches[0][2].is_contiguous(memory_format=torch.channels_last) and classes > 1 \
        else "NCHW"
    for _, labels, logits in batches:
        (c1, l1), (c2, l2) = seg.pixel_stats(logits, labels, classes), apart(logits, labels, classes)
        if not torch.equal(c1, c2) or not torch.allclose(l1, l2, rtol=1e-6, atol=1e-6):
            raise RuntimeError(f"{model_name}: one pass and apart disagree (counts equal: {torch.equal(c1, c2)}, "
                               f"losses {l1.tolist()} against {l2.tolist()})")
    one, sep = [], []
    for _ in range(rounds):
        with torch.inference_mode():
            one.append(_time(lambda: [seg.pixel_stats(lg, lb, classes) for _, lb, lg in batches]) / images)
            sep.append(_time(lambda: [apart(lg, lb, classes) for _, lb, lg in batches]) / images)
    ratios = [s / o for s, o in zip(sep, one)]
    # the whole step, model included, once per way (for scale): eval_step as `hybridzoo eval` runs it, and with
    # --no-fast-cpu's stats (ATen's passes; the model the same)
    task, metric = seg.SegmentationTask(), seg._SegEvalMetric(classes)
    step = {}
    for way, fast in (("one pass", True), ("apart", False)):
        args = SimpleNamespace(inference="whole", fast_cpu=fast)
        step[way] = statistics.median(
            _time(lambda: task.eval_step(model, (x, lb, torch.tensor([[h, w, h, w]])), metric, args))
            for x, lb, _ in batches)
    return {"model": model_name, "classes": classes, "size": [h, w], "images": images, "rounds": rounds,
            "logits_layout": layout, "threads": torch.get_num_threads(),
            "one_pass_ms": statistics.median(one) * 1e3, "apart_ms": statistics.median(sep) * 1e3,
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "step_one_pass_ms": step["one pass"] * 1e3, "step_apart_ms": step["apart"] * 1e3}


def measure_train(model_name: str, classes: int, size: tuple[int, int], batch: int, rounds: int,
                  seed: int = 0) -> dict:
    """One training step each way per round, alternating; the ratio apart / one pass per round."""
    torch.manual_seed(seed)
    base = create_model(model_name, num_classes=classes)
    g = torch.Generator().manual_seed(seed)
    h, w = size
    x = torch.randn(batch, 3, h, w, generator=g)
    labels = torch.randint(0, classes, (batch, h, w), generator=g)
    labels[:, : h // 10] = seg.IGNORE_INDEX

    def make_step(kernels: bool):
        model = optimize_for_cpu_training(copy.deepcopy(base)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            loss, _ = seg.segmentation_loss(model(x), labels, model, native=kernels)   # (False: --no-fast-cpu's)
            loss.backward()
            opt.step()
            return float(loss.detach())
        return step

    one_step, apart_step = make_step(True), make_step(False)
    first = []
    for step in (one_step, apart_step):
        torch.manual_seed(seed + 1)   # the same dropout and drop-path draws on both sides
        first.append(step())
    if abs(first[0] - first[1]) > 1e-5 * abs(first[1]):
        raise RuntimeError(f"{model_name}: the first losses differ, one pass {first[0]} against apart {first[1]}")
    one, sep = [], []
    for _ in range(rounds):
        one.append(_time(one_step))
        sep.append(_time(apart_step))
    ratios = [s / o for s, o in zip(sep, one)]
    return {"model": model_name, "classes": classes, "size": [h, w], "batch": batch, "rounds": rounds,
            "threads": torch.get_num_threads(), "train_one_pass_ms": statistics.median(one) * 1e3,
            "train_apart_ms": statistics.median(sep) * 1e3, "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sctnet_s_seg50")
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    ap.add_argument("--images", type=int, default=3, help="images (with --train: the batch)")
    ap.add_argument("--train", action="store_true", help="a training step instead of evaluation")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the row here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.train:
        row = measure_train(args.model, args.classes, tuple(args.size), args.images, args.rounds)
        row["cpu"] = cpu_name()
        print(f"{args.model} training, {args.classes} classes, batch {args.images} × {args.size[0]} × "
              f"{args.size[1]}, {args.threads} threads, {args.rounds} rounds, on {row['cpu']}")
        _table("step", [("forward, loss, backward, AdamW", f"{row['train_one_pass_ms']:.0f} ms",
                         f"{row['train_apart_ms']:.0f} ms", _spread(row))])
        _write(args.json, row)
        return row
    row = measure(args.model, args.classes, tuple(args.size), args.images, args.rounds)
    row["cpu"] = cpu_name()
    print(f"{args.model}, {args.classes} classes at {args.size[0]} × {args.size[1]} ({row['logits_layout']} logits), "
          f"{args.threads} threads, {args.rounds} rounds of {args.images} images, on {row['cpu']}")
    _table("per image", [
        ("loss, class map, counts", f"{row['one_pass_ms']:.1f} ms", f"{row['apart_ms']:.1f} ms", _spread(row)),
        ("eval_step with the model", f"{row['step_one_pass_ms']:.0f} ms", f"{row['step_apart_ms']:.0f} ms",
         f"{row['step_apart_ms'] / row['step_one_pass_ms']:.2f}× (once each)")])
    _write(args.json, row)
    return row


def _spread(row: dict) -> str:
    return f"{row['ratio_median']:.2f}× ({row['ratio_min']:.2f}–{row['ratio_max']:.2f})"


def _table(first: str, rows: list[tuple[str, str, str, str]]) -> None:
    print(f"| {first} | one pass | apart | apart / one pass: median (min–max) |")
    print("| --- | ---: | ---: | --- |")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def _write(path: str | None, row: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"rows": [row]}, f, indent=1)


if __name__ == "__main__":
    main()
