"""Which trained weights exist for the registered variants, and where.

Every entry was read from the publisher's README or hub model card (the `cite` field); no URL here
is guessed. `source` is "hf" (a HuggingFace hub repository and file), "url" (a direct HTTPS link,
fetched with a resume-able download and a checksum) or "manual" (a Google Drive / OneDrive /
Baidu page that a program cannot fetch: the error says where to put the file).

Tags are `<model>.<suffix>`, as timm names them (`deit_small_patch16_224.fb_in1k`); the suffix
alone is accepted wherever the model is known (`create_model("cvt_13", pretrained="ms_in1k")`).
`pretrained=True` takes the model's first tag.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PublishedWeight", "published_weights", "get_weight", "tags_for", "default_tag", "register_weight",
           "resolve_pretrained"]


@dataclass(frozen=True)
class PublishedWeight:
    """One published checkpoint of one registered variant.

    layout: what the converter receives ("timm", "hf-transformers", "microsoft-cvt", ...).
    dataset: what the weights were trained on. metric: the publisher's figures (`top1`, `miou`,
    `psnr`) at `resolution`. sha256 / hash_prefix: the digest published with the file (a hash
    prefix is what torch-hub style file names carry). num_classes: the head width of the file.
    eval: preprocessing the publisher evaluates with (`crop_pct`, `interpolation`, `mean`, `std`).
    """

    tag: str
    source: str                       # "hf" | "url" | "manual"
    layout: str
    dataset: str
    metric: dict[str, float]
    resolution: int | None
    license: str
    cite: str                         # where these facts were read
    hf_repo: str | None = None
    hf_file: str | None = None
    hf_revision: str | None = None
    url: str | None = None
    sha256: str | None = None
    hash_prefix: str | None = None
    num_classes: int | None = None
    eval: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self):
        if "." not in self.tag:
            raise ValueError(f"tag {self.tag!r} should read <model>.<suffix>")
        if self.source not in ("hf", "url", "manual"):
            raise ValueError(f"{self.tag}: source {self.source!r} is not hf, url or manual")
        if self.source == "hf" and not (self.hf_repo and self.hf_file):
            raise ValueError(f"{self.tag}: a hub weight needs hf_repo and hf_file")
        if self.source in ("url", "manual") and not self.url:
            raise ValueError(f"{self.tag}: a {self.source} weight needs its url")

    @property
    def model(self) -> str:
        return self.tag.split(".", 1)[0]

    @property
    def manual(self) -> bool:
        return self.source == "manual"

    @property
    def file_name(self) -> str:
        if self.source == "hf":
            return os.path.basename(self.hf_file)
        name = os.path.basename(self.url.split("?", 1)[0]) or "weights.pth"
        # one cache folder for every tag: prefix the tag where a generic file name could collide
        return name if self.source == "url" and name not in ("model.pth", "weights.pth") else f"{self.tag}-{name}"

    @property
    def location(self) -> str:
        return f"hf://{self.hf_repo}/{self.hf_file}" if self.source == "hf" else self.url

    def as_dict(self) -> dict[str, Any]:
        return {"tag": self.tag, "model": self.model, "source": self.source, "location": self.location,
                "layout": self.layout, "dataset": self.dataset, "metric": dict(self.metric),
                "resolution": self.resolution, "license": self.license, "sha256": self.sha256,
                "hash_prefix": self.hash_prefix, "num_classes": self.num_classes, "cite": self.cite,
                "notes": self.notes}


_WEIGHTS: dict[str, PublishedWeight] = {}


def register_weight(w: PublishedWeight, replace: bool = False) -> PublishedWeight:
    """Add a published weight (plugins and tests register their own)."""
    if w.tag in _WEIGHTS and not replace:
        raise ValueError(f"weight tag {w.tag!r} registered twice")
    _WEIGHTS[w.tag] = w
    return w


def _check_models() -> None:
    from hybridzoo.registry import list_models

    known = set(list_models())
    for tag in _WEIGHTS:
        if tag.split(".", 1)[0] not in known:
            raise RuntimeError(f"published weight {tag!r} names an unregistered model")


def published_weights(pattern: str | None = None) -> list[PublishedWeight]:
    """Every published weight whose tag matches `pattern` (fnmatch; a bare word matches anywhere)."""
    if pattern and not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    return [w for t, w in sorted(_WEIGHTS.items()) if not pattern or fnmatch.fnmatch(t, pattern)]


def tags_for(model: str) -> list[str]:
    """The tags of `model`, in table order (the first is the default)."""
    return [t for t, w in _WEIGHTS.items() if w.model == model]


def default_tag(model: str) -> str:
    tags = tags_for(model)
    if not tags:
        raise ValueError(f"no published weights for {model!r} (pretrained=True needs one); `hybridzoo weights` "
                         f"lists every published weight, or pass a path to your own file")
    return tags[0]


def get_weight(tag: str, model: str | None = None) -> PublishedWeight:
    """A weight by full tag, or by suffix for `model`."""
    if tag in _WEIGHTS:
        w = _WEIGHTS[tag]
        if model is not None and w.model != model:
            raise ValueError(f"weights {tag!r} belong to {w.model}, not {model}")
        return w
    if model is not None and f"{model}.{tag}" in _WEIGHTS:
        return _WEIGHTS[f"{model}.{tag}"]
    known = tags_for(model) if model else sorted(_WEIGHTS)
    hint = f"published for {model}: {', '.join(known)}" if model and known else (
        f"{model} has no published weights" if model else "`hybridzoo weights` lists them")
    raise ValueError(f"unknown weights tag {tag!r} ({hint})")


def _looks_like_path(s: str) -> bool:
    return (os.sep in s or (os.altsep and os.altsep in s) or s.startswith((".", "~"))
            or s.endswith((".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar", ".pkl", ".npz")))


def resolve_pretrained(model: str | None, pretrained: Any, progress: bool = True) -> tuple[str, PublishedWeight | None]:
    """(local file, the published weight or None) for `pretrained` = True, a tag, a suffix or a path.

    A path that exists wins over a tag of the same spelling; a string that looks like a path but
    does not exist is a FileNotFoundError, not a tag lookup.
    """
    from hybridzoo.hub.download import fetch_weight

    if pretrained is True:
        if model is None:
            raise ValueError("pretrained=True needs the model's name")
        w = get_weight(default_tag(model))
        return os.fspath(fetch_weight(w, progress)), w
    if isinstance(pretrained, os.PathLike):
        return os.fspath(pretrained), None
    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(f"pretrained should be True, a weights tag or a file path, not {pretrained!r}")
    if os.path.exists(pretrained) or _looks_like_path(pretrained):
        path = os.path.expanduser(pretrained)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file not found: {pretrained!r}")
        return path, None
    if pretrained.lower() in ("true", "default"):  # the command line's spelling of pretrained=True
        return resolve_pretrained(model, True, progress)
    w = get_weight(pretrained, model)
    return os.fspath(fetch_weight(w, progress)), w

