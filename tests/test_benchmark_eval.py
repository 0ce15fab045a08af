"""benchmarks/bench_eval.py's pieces: the photo folder it evaluates on and the metrics line it compares. The
commands themselves are timed by the benchmark, not here."""

from __future__ import annotations


import pytest
from PIL import Image

from _helpers import benchmark_module  # tests/conftest.py puts tests/ on sys.path

bench_eval = benchmark_module("bench_eval")


def test_the_photo_folder_is_an_image_folder_of_500_by_375_jpegs(tmp_path):
    from hybridzoo.data.folder import ImageFolder

    root = bench_eval.photo_folder(tmp_path / "photos", classes=3, n_train=2, n_val=4)
    train, val = ImageFolder.splits(root)
    assert (len(train), len(val)) == (6, 12) and train.classes == val.classes == ["class00", "class01", "class02"]
    sizes = {Image.open(p).size for p, _ in val.samples}
    assert sizes == {(500, 375)} and all(p.endswith(".jpg") for p, _ in val.samples)
    # a tint per class: the classes differ on average
    means = [sum(val[i][0].mean() for i in range(c * 4, c * 4 + 4)) / 4 for c in range(3)]
    assert len({round(float(m), 2) for m in means}) == 3


def test_the_metrics_line_is_the_last_val_line_and_its_absence_an_error():
    out = "cvt_13 (classification) weights w on cpu\nval_loss 1.0  val_top1 0.5\nwrote x\n"
    assert bench_eval.metrics_of(out) == "val_loss 1.0  val_top1 0.5"
    with pytest.raises(RuntimeError, match="no metrics line"):
        bench_eval.metrics_of("nothing here\n")
