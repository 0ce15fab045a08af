"""A short hand-written training check of the land-cover task (no engine needed), one CPU thread.

    PYTHONPATH=src python benchmarks/land_cover_quick.py --scene-size 80 --epochs 2 --json out.json

Trains each model on the built-in SYNTHETIC scene under both splits (random pixel split — the
paper's protocol, optimistic — and the spatially disjoint block split) with the task's own data,
loss and metrics (AdamW lr 1e-3, weight decay 0.1, batch 64, constant lr), then reports val
OA / AA / kappa, the majority-class and spectral-centroid baselines, parameters, and whole-scene
prediction throughput (pixels per second, one patch per pixel) on a crop of the scene.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader

from hybridzoo.profile import count_params
from hybridzoo.tasks.base import get_task
from hybridzoo.tasks.land_cover import _ArraySource, predict_scene


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="wetmapformer_small,cnn2d_landcover")
    p.add_argument("--splits", default="random,block")
    p.add_argument("--scene-size", type=int, default=80)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--predict-side", type=int, default=48, help="side of the crop used for throughput")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    cli = p.parse_args()
    torch.set_num_threads(cli.threads)
    task = get_task("land-cover")
    rows = []
    for split in cli.splits.split(","):
        parser = argparse.ArgumentParser()
        task.add_arguments(parser)
        args = parser.parse_args(["--scene-size", str(cli.scene_size), "--split", split])
        args.data, args.pretrained = None, None
        data = task.build_data(args)
        base = task.baselines(data, args)
        for name in cli.models.split(","):
            args.model = name
            torch.manual_seed(0)
            model = task.build_model(args, data.info)
            opt = torch.optim.AdamW(model.parameters(), lr=task.default_lr, weight_decay=task.default_weight_decay)
            g = torch.Generator().manual_seed(0)
            loader = DataLoader(data.train, batch_size=cli.batch_size, shuffle=True, generator=g)
            t0 = time.perf_counter()
            for _ in range(cli.epochs):
                model.train()
                for batch in loader:
                    loss, _ = task.training_step(model, batch, args)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            train_s = time.perf_counter() - t0
            model.eval()
            m = task.evaluate(model, DataLoader(data.val, batch_size=512), args)
            s = cli.predict_side
            crop = _ArraySource(data.train.scene.image[:s, :s])
            _, stats = predict_scene(model, crop, data.info["mean"], data.info["std"], data.info["patch_size"],
                                     batch_size=1024)
            row = {"model": name, "split": split, "params": count_params(model), "epochs": cli.epochs,
                   "train_patches": len(data.train), "val_patches": len(data.val), "train_seconds": train_s,
                   "val_oa": m["oa"], "val_aa": m["aa"], "val_kappa": m["kappa"],
                   "val_oa_majority": base["val_oa_majority"], "val_oa_centroid": base["val_oa_centroid"],
                   "val_kappa_centroid": base["val_kappa_centroid"],
                   "predict_pixels_per_second": stats["pixels_per_second"], "threads": cli.threads,
                   "f1": {k[3:]: v for k, v in m.items() if k.startswith("f1_")}}
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "f1"}),
                  flush=True)
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
