"""Every classification family trains through the engine on the built-in digits (32×32) and on an
image folder: one small variant per model file, two steps, so a user's first `hybridzoo train --model X`
cannot fail on an input-size or head mismatch."""

import numpy as np
import pytest
from PIL import Image

import hybridzoo
from hybridzoo.cli import build_parser
from hybridzoo.engine.trainer import train
from hybridzoo.registry import get_card
from hybridzoo.tasks.base import get_task


def _smallest_per_family() -> list[str]:
    best: dict[str, tuple[float, str]] = {}
    for name in hybridzoo.list_models(task="classification"):
        card = get_card(name)
        size = card.reported.get("params_m") or 1e9
        if card.module not in best or size < best[card.module][0]:
            best[card.module] = (size, name)
    return sorted(n for _, n in best.values())


FAMILIES = _smallest_per_family()


def _run(tmp_path, *argv):
    task = get_task("classification")
    args = build_parser(task).parse_args(["train", "--no-progress", "--epochs", "1", "--batch-size", "4",
                                          "--limit-train-batches", "2", "--limit-val-batches", "1",
                                          "--output", str(tmp_path / "run"), *map(str, argv)])
    return train(args, task)


def test_families_cover_the_classification_papers():
    modules = {get_card(n).module.rsplit(".", 1)[-1] for n in FAMILIES}
    assert {"vit", "cvt", "convit", "ceit", "vitc", "vvt", "supervit", "botnet", "coatnet", "mobile_former"} <= modules


@pytest.mark.parametrize("name", FAMILIES)
def test_trains_on_builtin_digits(name, tmp_path):
    result = _run(tmp_path, "--model", name)
    assert np.isfinite(result.summary["val_loss"])
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_trains_on_an_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    result = _run(tmp_path, "--model", FAMILIES[0], "--data", tmp_path / "data", "--img-size", 32)
    assert result.summary["data"]["num_classes"] == 2
