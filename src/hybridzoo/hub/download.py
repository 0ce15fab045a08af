"""Fetching published weights into a local cache.

Hub-hosted files go through `huggingface_hub.hf_hub_download` (its own cache, resume and offline
switch). Direct URLs are fetched here with urllib: a progress bar, a `.part` file next to the
target, a retry that resumes with an HTTP Range request, sha256 (or the publisher's hash prefix)
verified before an atomic rename into `$HYBRIDZOO_CACHE/weights/` (default `~/.cache/hybridzoo`).
A weight whose only home is a Google Drive / OneDrive page cannot be fetched by a program; it is
`manual`, and the error says where to put the file once downloaded by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hybridzoo.hub.published import PublishedWeight

__all__ = ["WeightsUnavailableError", "cache_dir", "offline", "cached_file", "fetch_weight", "download_url",
           "sha256_file"]

_CHUNK = 1 << 16
_RETRIES = 3


class WeightsUnavailableError(FileNotFoundError):
    """Weights that cannot be fetched now (offline, manual-only, unreachable, failed checksum)."""


def cache_dir() -> Path:
    """`$HYBRIDZOO_CACHE`, else `~/.cache/hybridzoo`; direct downloads live in its `weights/` folder."""
    root = os.environ.get("HYBRIDZOO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hybridzoo")
    return Path(root)


def offline() -> bool:
    # read at call time (huggingface_hub reads HF_HUB_OFFLINE once, at import)
    truthy = {"1", "true", "yes", "on"}
    return (os.environ.get("HYBRIDZOO_OFFLINE", "").lower() in truthy
            or os.environ.get("HF_HUB_OFFLINE", "").lower() in truthy)


def _target(w: PublishedWeight) -> Path:
    return cache_dir() / "weights" / w.file_name


def cached_file(w: PublishedWeight) -> Path | None:
    """The local file of `w` if it is already cached (no network access), else None."""
    if w.source == "hf":
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        found = try_to_load_from_cache(w.hf_repo, w.hf_file, revision=w.hf_revision)
        return Path(found) if isinstance(found, str) and os.path.isfile(found) else None
    path = _target(w)
    return path if path.is_file() else None


def _unavailable(w: PublishedWeight, why: str) -> WeightsUnavailableError:
    if w.source == "hf":
        where = f"https://huggingface.co/{w.hf_repo}/resolve/{w.hf_revision or 'main'}/{w.hf_file}"
        put = (f"huggingface_hub's cache ($HF_HOME/hub; on a connected machine `hf download {w.hf_repo} "
               f"{w.hf_file}` fills it, then copy that folder)")
        return WeightsUnavailableError(f"{w.tag}: {why}. The file is {w.hf_file!r} at {where}; put it in {put}")
    return WeightsUnavailableError(f"{w.tag}: {why}. Download {w.url} and save it as {_target(w)} "
                                   f"(file name {w.file_name!r}); it is then used without a network")


def fetch_weight(w: PublishedWeight, progress: bool = True) -> Path:
    """The local path of `w`'s file, downloading it on first use."""
    found = cached_file(w)
    if found is not None:
        return found
    if w.manual:
        raise _unavailable(w, f"these weights are only published on a page a program cannot download from "
                              f"({w.url}), so they are fetched by hand")
    if w.source == "hf":
        return _fetch_hub(w, progress)
    if offline():
        raise _unavailable(w, "offline mode (HYBRIDZOO_OFFLINE / HF_HUB_OFFLINE is set) and not in the cache")
    target = _target(w)
    with _exclusive(target):  # torchrun: one process downloads, the others then find the file
        if target.is_file():
            return target
        return download_url(w.url, target, sha256=w.sha256, hash_prefix=w.hash_prefix, progress=progress,
                            error=lambda why: _unavailable(w, why))


@contextlib.contextmanager
def _exclusive(target: Path):
    """An advisory lock on `<target>.lock` (POSIX flock; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fetch_hub(w: PublishedWeight, progress: bool) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # a base install without the dev extra
        raise _unavailable(w, "huggingface_hub is not installed (pip install huggingface_hub)") from e
    try:
        return Path(hf_hub_download(w.hf_repo, w.hf_file, revision=w.hf_revision, local_files_only=offline(),
                                    library_name="hybridzoo"))
    except Exception as e:  # LocalEntryNotFoundError, HTTP and connection errors: all mean "not here"
        why = ("offline mode (HYBRIDZOO_OFFLINE / HF_HUB_OFFLINE is set) and not in huggingface_hub's cache"
               if offline() else f"the hub download failed ({type(e).__name__}: {e})")
        raise _unavailable(w, why) from e


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_url(url: str, target: str | os.PathLike, sha256: str | None = None, hash_prefix: str | None = None,
                 progress: bool = True, retries: int = _RETRIES, error=None) -> Path:
    """Download `url` to `target` through `target`'s `.part` file, resuming after a cut connection.

    The digest is checked before the rename; a mismatch deletes the partial file. `error(why)` builds
    the exception raised when the file cannot be fetched (default: a plain WeightsUnavailableError).
    """
    from tqdm.auto import tqdm

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.part")
    make_error = error or (lambda why: WeightsUnavailableError(f"{url}: {why} (expected file {target})"))
    last: Exception | None = None
    for attempt in range(retries):
        have = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"User-Agent": "hybridzoo"})
        if have:
            req.add_header("Range", f"bytes={have}-")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status = resp.status
                if have and status != 206:  # the server ignored the range: start over
                    have = 0
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, "ab" if have else "wb") as f, \
                        tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=target.name, disable=not progress, leave=False) as bar:
                    while True:
                        chunk = resp.read(_CHUNK)
                        if not chunk:
                            break
                        f.write(chunk)
                        bar.update(len(chunk))
            if total is not None and part.stat().st_size < total:
                raise http.client.IncompleteRead(b"", total - part.stat().st_size)
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # range beyond the end: the part file is stale, start over
                part.unlink(missing_ok=True)
                last = e
                continue
            part.unlink(missing_ok=True)
            raise make_error(f"the server answered HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            last = e  # keep the part file: the next attempt resumes from it
            time.sleep(min(2.0, 0.25 * (attempt + 1)))
    else:
        reason = getattr(last, "reason", last)
        raise make_error(f"no network or the download kept failing after {retries} attempts ({reason}); "
                         f"the partial file {part} is resumed next time")
    digest = sha256_file(part)
    if (sha256 and digest != sha256.lower()) or (hash_prefix and not digest.startswith(hash_prefix.lower())):
        part.unlink(missing_ok=True)
        expected = sha256 or f"{hash_prefix}…"
        raise make_error(f"checksum mismatch: sha256 {digest} but the publisher's is {expected}; "
                         f"the partial file was deleted")
    os.replace(part, target)
    return target
