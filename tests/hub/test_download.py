"""The weights service offline: a loopback HTTP server stands in for the publisher, a pre-populated
huggingface_hub cache for the hub."""

from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import threading

import pytest
import torch

import hybridzoo
from hybridzoo.hub import download, published
from hybridzoo.hub.published import PublishedWeight, register_weight


class _Server:
    """Serves one file at /ckpt/<name>; `cut` cuts the next N responses half-way, Range honoured."""

    def __init__(self, payload: bytes):
        self.payload, self.requests, self.ranges, self.cut = payload, 0, [], 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.requests += 1
                if not self.path.startswith("/ckpt/"):
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                body = outer.payload[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.payload) - 1}/{len(outer.payload)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut:
                    outer.cut -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/ckpt/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


def _official_cvt_checkpoint() -> tuple[bytes, dict[str, torch.Tensor]]:
    """cvt_tiny_demo in Microsoft's layout (`stage0.` prefixes) saved like a training script does:
    the weights under 'model' next to an argparse.Namespace (weights_only=True refuses that file)."""
    torch.manual_seed(0)
    ours = hybridzoo.create_model("cvt_tiny_demo").state_dict()
    official = {k.replace("stages.", "stage", 1): v for k, v in ours.items()}
    buf = io.BytesIO()
    torch.save({"model": official, "args": argparse.Namespace(lr=5e-4, model="cvt_tiny_demo"), "epoch": 9}, buf)
    return buf.getvalue(), ours


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HYBRIDZOO_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    payload, ours = _official_cvt_checkpoint()
    server = _Server(payload)
    added = []

    def tag(suffix: str, **kw) -> PublishedWeight:
        fields = dict(source="url", layout="microsoft-cvt", dataset="digits (test)", metric={"top1": 1.0},
                      resolution=32, license="MIT", cite="test", url=server.url + f"cvt_tiny_demo-{suffix}.pth",
                      sha256=hashlib.sha256(payload).hexdigest(), num_classes=10)
        fields.update(kw)
        w = register_weight(PublishedWeight(tag=f"cvt_tiny_demo.{suffix}", **fields))
        added.append(w.tag)
        return w

    yield server, tag, ours, tmp_path / "cache" / "weights"
    server.close()
    for t in added:
        published._WEIGHTS.pop(t, None)


def _same(model, ours):
    return all(torch.equal(model.state_dict()[k], v) for k, v in ours.items())


def test_download_verifies_then_cache_serves_without_request(served, capsys):
    server, tag, ours, cache = served
    w = tag("loop")
    model = hybridzoo.create_model("cvt_tiny_demo", pretrained="cvt_tiny_demo.loop")
    assert server.requests == 1 and _same(model, ours)
    assert (cache / w.file_name).is_file() and not list(cache.glob(".*part"))
    assert "cvt_tiny_demo-loop.pth" in capsys.readouterr().err  # the progress bar names the file
    model2 = hybridzoo.create_model("cvt_tiny_demo", pretrained="loop")  # the suffix is enough
    assert server.requests == 1 and _same(model2, ours)
    assert model2.pretrained_tag == "cvt_tiny_demo.loop"
    assert download.cached_file(w) == cache / w.file_name


def test_pretrained_true_takes_the_first_tag(served):
    server, tag, ours, _ = served
    if published.tags_for("cvt_tiny_demo"):
        pytest.skip("cvt_tiny_demo has real published weights")
    tag("first")
    tag("second", sha256="0" * 64)
    assert _same(hybridzoo.create_model("cvt_tiny_demo", pretrained=True), ours)


def test_checksum_mismatch_deletes_the_partial_file(served):
    server, tag, _, cache = served
    tag("bad", sha256=hashlib.sha256(b"something else").hexdigest())
    with pytest.raises(download.WeightsUnavailableError, match="checksum mismatch.*deleted"):
        hybridzoo.create_model("cvt_tiny_demo", pretrained="bad")
    assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.endswith(".lock")]  # nor a .part


def test_hash_prefix_in_file_name_is_checked(served):
    server, tag, ours, _ = served
    good = hashlib.sha256(server.payload).hexdigest()[:8]
    tag("prefix", sha256=None, hash_prefix=good)
    assert _same(hybridzoo.create_model("cvt_tiny_demo", pretrained="prefix"), ours)
    tag("badprefix", sha256=None, hash_prefix="00000000" if good != "00000000" else "11111111")
    with pytest.raises(download.WeightsUnavailableError, match="checksum mismatch"):
        hybridzoo.create_model("cvt_tiny_demo", pretrained="badprefix")


def test_cut_connection_is_resumed(served):
    server, tag, ours, cache = served
    tag("cut")
    server.cut = 1
    model = hybridzoo.create_model("cvt_tiny_demo", pretrained="cut")
    assert _same(model, ours)
    assert server.requests == 2
    half = (len(server.payload)) // 2
    assert server.ranges == [None, f"bytes={half}-"]  # the retry asked only for the rest
    assert not list(cache.glob(".*part"))


def test_connection_cut_every_time_fails_cleanly_and_resumes_next_call(served):
    server, tag, ours, cache = served
    w = tag("flaky")
    server.cut = 3
    with pytest.raises(download.WeightsUnavailableError, match="kept failing after 3 attempts"):
        hybridzoo.create_model("cvt_tiny_demo", pretrained="flaky")
    assert not (cache / w.file_name).exists()  # no cache entry, only the resumable part file
    assert _same(hybridzoo.create_model("cvt_tiny_demo", pretrained="flaky"), ours)
    assert server.ranges[-1] is not None


@pytest.mark.parametrize("var", ["HYBRIDZOO_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_names_url_file_and_cache_path(served, monkeypatch, var):
    server, tag, _, cache = served
    w = tag("off")
    monkeypatch.setenv(var, "1")
    with pytest.raises(FileNotFoundError) as e:
        hybridzoo.create_model("cvt_tiny_demo", pretrained="off")
    msg = str(e.value)
    assert w.url in msg and w.file_name in msg and str(cache / w.file_name) in msg and "offline" in msg
    assert server.requests == 0


def test_unreachable_server_is_the_same_clear_error(served, monkeypatch):
    server, tag, _, cache = served
    w = tag("gone")
    server.close()
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    with pytest.raises(download.WeightsUnavailableError, match="no network") as e:
        hybridzoo.create_model("cvt_tiny_demo", pretrained="gone")
    assert str(cache / w.file_name) in str(e.value)


def test_manual_weights_say_where_to_put_the_file(served):
    server, tag, ours, cache = served
    w = tag("drive", source="manual", url="https://drive.google.com/file/d/XYZ/view")
    with pytest.raises(FileNotFoundError) as e:
        hybridzoo.create_model("cvt_tiny_demo", pretrained="drive")
    assert w.url in str(e.value) and str(cache / w.file_name) in str(e.value)
    assert server.requests == 0
    cache.mkdir(parents=True, exist_ok=True)
    (cache / w.file_name).write_bytes(server.payload)  # what the user does by hand
    assert _same(hybridzoo.create_model("cvt_tiny_demo", pretrained="drive"), ours)


def test_http_error_is_reported(served):
    server, tag, _, _ = served
    tag("missing", url=server.url.replace("/ckpt/", "/nothing/") + "x.pth")
    with pytest.raises(download.WeightsUnavailableError, match="HTTP 404"):
        hybridzoo.create_model("cvt_tiny_demo", pretrained="missing")


def test_unknown_tag_and_missing_path():
    with pytest.raises(ValueError, match="unknown weights tag 'nope'"):
        hybridzoo.create_model("cvt_tiny_demo", pretrained="nope")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        hybridzoo.create_model("cvt_tiny_demo", pretrained="no/such/file.pth")


def test_hub_weight_from_a_prepopulated_cache_offline(tmp_path, monkeypatch):
    """huggingface_hub's cache layout (models--org--name/{refs,snapshots,blobs}) with HF_HUB_OFFLINE=1."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ours = hybridzoo.create_model("cvt_tiny_demo").state_dict()
    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HYBRIDZOO_CACHE", str(tmp_path / "zoo"))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    repo = hub / "models--hz-test--cvt-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ours.items()}, str(snap / "model.safetensors"))
    w = register_weight(PublishedWeight(tag="cvt_tiny_demo.hub_test", source="hf", layout="ours",
                                        dataset="test", metric={}, resolution=32, license="MIT", cite="test",
                                        hf_repo="hz-test/cvt-tiny", hf_file="model.safetensors"))
    try:
        assert download.cached_file(w) is not None
        model = hybridzoo.create_model("cvt_tiny_demo", pretrained="hub_test")
        assert _same(model, ours)
        w2 = register_weight(PublishedWeight(tag="cvt_tiny_demo.hub_absent", source="hf", layout="ours",
                                             dataset="test", metric={}, resolution=32, license="MIT", cite="test",
                                             hf_repo="hz-test/absent", hf_file="model.safetensors"))
        with pytest.raises(FileNotFoundError, match="offline.*hz-test/absent.*model.safetensors"):
            hybridzoo.create_model("cvt_tiny_demo", pretrained=w2.tag)
    finally:
        published._WEIGHTS.pop("cvt_tiny_demo.hub_test", None)
        published._WEIGHTS.pop("cvt_tiny_demo.hub_absent", None)


def test_concurrent_fetches_download_once(served):
    """torchrun ranks building the same pretrained model: one downloads, the others wait and reuse it."""
    server, tag, ours, cache = served
    w = tag("together")
    paths, errors = [], []

    def fetch():
        try:
            paths.append(download.fetch_weight(w, progress=False))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1 and server.requests == 1
