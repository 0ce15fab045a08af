"""`hybridzoo.export`: every family exports (reduced builds), the deployed networks run in ONNX Runtime with
the eager outputs, and a failed verification writes nothing. Parity figures are printed (`pytest -s`)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import hybridzoo
from hybridzoo.cli import main
from hybridzoo.export import (ExportVerificationError, deployed_network, export_model, load_exported, serialize,
                              verify)
from hybridzoo.registry import get_card

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TINY = str(Path(__file__).parent / "hz_tiny_models.py")


def _smallest_per_family() -> list[str]:
    """One registered variant per model file: the smallest non-demo one (reduced by its card's test_kwargs)."""
    families = defaultdict(list)
    for name in hybridzoo.list_models():
        if not name.startswith("hz_"):
            families[get_card(name).module].append(name)
    return [min(v, key=lambda n: (get_card(n).demo, get_card(n).reported.get("params_m") or 0, n))
            for _, v in sorted(families.items())]


FAMILIES = _smallest_per_family()


def _reduced(name: str, **extra):
    card = get_card(name)
    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **{**card.test_kwargs, **extra}).eval()
    with torch.no_grad():  # zero-initialised heads would make every logit 0 and the comparison vacuous
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    size = card.test_input_size or card.input_size
    return model, (None if card.task == "recommendation" else tuple(size[1:]))


def _report(name: str, fmt: str, report: dict) -> None:
    checks = ", ".join(f"{c['input']} {c['max_abs_diff']:.2g}" for c in report["verification"]["checks"])
    scale = max(c["max_abs_output"] for c in report["verification"]["checks"])
    print(f"\n[export parity] {name:<34} {fmt:<17} max abs diff {report['verification']['max_abs_diff']:.3g} "
          f"on outputs up to {scale:.3g} ({checks})")


def test_families_cover_the_registry():
    assert len(FAMILIES) == len({get_card(n).module for n in hybridzoo.list_models() if not n.startswith("hz_")})


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_exports(name, tmp_path):
    """TorchScript for every family (fast); ONNX for every family is run by hand, docs/export.md."""
    model, hw = _reduced(name)
    report = export_model(model, tmp_path / f"{name}.pt", "torchscript", name=name, resolution=hw)
    _report(name, "torchscript", report)
    assert (tmp_path / f"{name}.pt").is_file()
    meta = json.loads((tmp_path / f"{name}.json").read_text())
    assert meta["model"] == name and meta["format"] == "torchscript"
    labels = [c["input"] for c in meta["verification"]["checks"]]
    assert "random batch 1" in labels and "random batch 3" in labels, labels
    assert meta["verification"]["max_abs_diff"] <= 1e-4
    assert min(c["max_abs_output"] for c in meta["verification"]["checks"]) > 1e-3


def _ort(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_sctnet_is_the_deployed_single_branch(tmp_path):
    model, hw = _reduced("sctnet_s_seg50")
    assert model.auxiliary_head is not None
    deployed = deployed_network(model, "sctnet_s_seg50", resolution=hw).module
    assert deployed.auxiliary_head is None and deployed.siam is None and model.auxiliary_head is not None
    report = export_model(model, tmp_path / "sct.onnx", "onnx", name="sctnet_s_seg50", resolution=hw)
    _report("sctnet_s_seg50", "onnx", report)
    sess = _ort(tmp_path / "sct.onnx")
    import onnx

    names = [i.name for i in onnx.load(str(tmp_path / "sct.onnx")).graph.initializer]
    assert not any("auxiliary_head" in n or "siam" in n for n in names)
    x = torch.randn(2, 3, *hw)
    got = sess.run(None, {"input": x.numpy()})[0]
    ref = model.deploy()(x).detach().numpy()
    assert got.shape == (2, 5, *hw)
    assert np.abs(got - ref).max() <= 1e-4
    assert report["normalisation"]["mean"] == [123.675, 116.28, 103.53]
    assert report["opset"] >= 18


def test_onnx_supervit_sub_network(tmp_path):
    model, _ = _reduced("supervit_deit_small")
    report = export_model(model, tmp_path / "svit.onnx", "onnx", name="supervit_deit_small", resolution=160,
                          keep_rate=0.5)
    _report("supervit_deit_small 160px keep 0.5", "onnx", report)
    assert report["sub_network"] == {"resolution": 160, "keep_rate": 0.5}
    x = torch.randn(3, 3, 160, 160)
    got = _ort(tmp_path / "svit.onnx").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x, keep_rate=0.5, img_size=160).numpy()
        full = model(x, keep_rate=1.0, img_size=160).numpy()
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(got - full).max() > 1e-3  # the pruned sub-network was exported, not the full one
    with pytest.raises(ValueError, match="keep-rate"):
        deployed_network(model, "supervit_deit_small", resolution=160, keep_rate=0.6)
    with pytest.raises(ValueError, match="resolution"):
        deployed_network(model, "supervit_deit_small", resolution=150)


def test_onnx_distilled_deit_averages_heads(tmp_path):
    model, hw = _reduced("deit_small_distilled_patch16_224")
    export_model(model, tmp_path / "deit.onnx", "onnx", name="deit_small_distilled_patch16_224", resolution=hw)
    x = torch.randn(2, 3, *hw)
    got = _ort(tmp_path / "deit.onnx").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        t = model.forward_features(x)
        ref = ((model.head(t[:, 0]) + model.head_dist(t[:, 1])) / 2).numpy()
    assert np.abs(got - ref).max() <= 1e-4


def test_onnx_recommender_scores_every_item(tmp_path):
    model, _ = _reduced("adamct_beauty")
    report = export_model(model, tmp_path / "rec.onnx", "onnx", name="adamct_beauty",
                          vocabulary=[f"item{i}" for i in range(60)])
    _report("adamct_beauty", "onnx", report)
    assert report["inputs"][0]["name"] == "item_seq" and report["item_vocabulary"][1] == "item1"
    seq = torch.randint(1, 60, (5, 12))
    lengths = torch.tensor([1, 12, 4, 7, 2])
    seq = seq.masked_fill(torch.arange(12)[None] >= lengths[:, None], 0)
    got = _ort(tmp_path / "rec.onnx").run(None, {"item_seq": seq.numpy(), "item_seq_len": lengths.numpy()})[0]
    with torch.no_grad():
        ref = model.scores(model(seq, lengths)).numpy()
    assert got.shape == (5, 60)
    assert np.abs(got - ref).max() <= 1e-4


def test_onnx_act_at_dynamic_size(tmp_path):
    model, hw = _reduced("act_x2", num_stages=1)  # one stage still has both branches, CSTA's fold/unfold and fusion
    report = export_model(model, tmp_path / "act.onnx", "onnx", name="act_x2", resolution=hw)
    _report("act_x2 (dynamic H, W)", "onnx", report)
    assert any(c["input"].startswith("random 15x18") for c in report["verification"]["checks"])
    assert report["verification"]["atol"] == pytest.approx(1e-4 * 255)  # pixel values on 0..255
    sess = _ort(tmp_path / "act.onnx")
    for h, w in ((9, 21), (24, 12)):
        x = 255 * torch.rand(1, 3, h, w)
        got = sess.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert got.shape == (1, 3, 2 * h, 2 * w)
        assert np.abs(got - ref).max() <= 1e-4 * 255


def test_exported_program_mobile_former(tmp_path):
    model, hw = _reduced("mobile_former_294m")
    report = export_model(model, tmp_path / "mf.pt2", "exported-program", name="mobile_former_294m", resolution=hw)
    _report("mobile_former_294m", "exported-program", report)
    assert report["verification"]["max_abs_diff"] <= 1e-4


def test_verification_failure_writes_nothing(tmp_path, monkeypatch):
    model, hw = _reduced("cnn2d_landcover")
    spec = deployed_network(model, "cnn2d_landcover", resolution=hw)
    run = load_exported(serialize(spec, "torchscript"), "torchscript")
    assert verify(run, spec)[0]["max_abs_diff"] == 0.0
    with pytest.raises(ExportVerificationError, match="differs from eager PyTorch"):
        verify(lambda *x: [o + 1e-3 for o in run(*x)], spec)

    import hybridzoo.export as ex

    monkeypatch.setattr(ex, "load_exported", lambda data, fmt, threads=None: (lambda *x: [o + 1e-3 for o in run(*x)]))
    with pytest.raises(ExportVerificationError):
        export_model(model, tmp_path / "bad.pt", "torchscript", name="cnn2d_landcover", resolution=hw)
    assert not (tmp_path / "bad.pt").exists() and not (tmp_path / "bad.json").exists()


def test_a_batch_size_baked_into_the_graph_is_caught(tmp_path):
    model, hw = _reduced("cnn2d_landcover")

    class Baked(torch.nn.Module):
        in_chans = model.in_chans

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            y = self.model(x)
            return y.reshape(int(y.shape[0]), -1)  # int(): a constant to the tracer

    with pytest.raises(ExportVerificationError, match="random batch 1"):
        export_model(Baked(), tmp_path / "b.pt", "torchscript", name="cnn2d_landcover", resolution=hw)
    assert not (tmp_path / "b.pt").exists()


def test_an_exporter_failure_is_one_clear_error(monkeypatch, capsys):
    def fail(*a, **k):
        raise RuntimeError("Unsupported: data-dependent control flow\nlong traceback ...")

    monkeypatch.setattr(torch.jit, "trace", fail)
    assert main(["export", "--model", "cnn2d_landcover", "--format", "torchscript"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hybridzoo: error: cnn2d_landcover: torchscript export failed (RuntimeError: Unsupported: "
                   "data-dependent control flow); another --format, --no-dynamic-size or a fixed --batch may "
                   "avoid the failing construct"]


def test_fixed_batch_is_fixed(tmp_path):
    model, hw = _reduced("wetmapformer_small")
    report = export_model(model, tmp_path / "w.pt", "torchscript", name="wetmapformer_small", resolution=hw, batch=4)
    assert report["inputs"][0]["shape"][0] == 4
    assert [c["input"] for c in report["verification"]["checks"]] == ["random batch 4"]


@pytest.fixture
def tiny_run(tmp_path):
    """A run folder as `hybridzoo train` writes it, for the distilled tiny ViT (3 classes)."""
    from hybridzoo.cli import load_plugin
    from hybridzoo.engine.checkpoint import save_weights

    load_plugin(TINY)
    torch.manual_seed(0)
    model = hybridzoo.create_model("hz_tiny_vit_distilled", num_classes=3)
    run = tmp_path / "run"
    info = {"num_classes": 3, "class_names": ["cat", "dog", "owl"], "in_chans": 3, "img_size": 32,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    save_weights(model.state_dict(), run / "model.safetensors",
                 metadata={"model": "hz_tiny_vit_distilled", "task": "classification", "data_info": json.dumps(info)})
    (run / "summary.json").write_text(json.dumps({"model": "hz_tiny_vit_distilled", "task": "classification"}))
    return run, model.eval()


def test_cli_export_run(tiny_run, tmp_path, capsys):
    run, model = tiny_run
    out = tmp_path / "out" / "tiny.onnx"
    assert main(["--plugin", TINY, "export", "--run", str(run), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random batch 3" in printed and "photo" in printed and "max abs diff" in printed
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["class_names"] == ["cat", "dog", "owl"]
    assert meta["normalisation"]["mean"] == [0.5, 0.5, 0.5] and meta["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert meta["hybridzoo_version"] == hybridzoo.__version__
    x = torch.randn(4, 3, 32, 32)
    got = _ort(out).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4


def test_bench_onnx_reports_three_runtimes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--plugin", TINY, "bench", "hz_tiny_vit", "--onnx", "--batch-size", "2", "--iters", "2",
                 "--warmup", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("eager_ms", "onednn_ms", "onnxruntime_ms"):
            assert r[k] > 0 and r[f"{k[:-3]}_spread_ms"][0] <= r[k] <= r[f"{k[:-3]}_spread_ms"][1]
        assert r["onnxruntime_vs_eager"] == pytest.approx(r["eager_ms"] / r["onnxruntime_ms"])
    assert "| eager ms | oneDNN ms | ONNX Runtime ms |" in capsys.readouterr().out
    assert main(["--plugin", TINY, "bench", "hz_tiny_vit", "--onnx", "--amp", "bf16"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--model", "cnn2d_landcover", "--batch", "zero"], "--batch expects"),
    (["--model", "cnn2d_landcover", "--keep-rate", "0.5"], "--keep-rate applies to SuperViT"),
    (["--model", "sasrec", "--resolution", "224"], "--resolution does not apply"),
    (["--model", "cnn2d_landcover", "--resolution", "8y8"], "--resolution expects"),
    (["--run", "/nonexistent/run"], "is not a run folder"),
    ([], "export needs --run DIR"),
    (["--model", "cnn2d_landcover", "--opset", "17"], "--opset applies to --format onnx only"),
    (["--model", "cnn2d_landcover", "--format", "onnx", "--opset", "1"], "could not convert the graph to ONNX opset 1"),
])
def test_cli_export_errors(argv, message, tmp_path, capsys):
    fmt = [] if "--format" in argv else ["--format", "torchscript"]
    assert main(["export", *fmt, "--output", str(tmp_path / "x.out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybridzoo: error:") and message in err, err
