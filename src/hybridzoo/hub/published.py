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
           "resolve_pretrained", "imagenet_classes", "pretrained_run", "describe_metric"]


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
        if self.source == "manual":  # a share link names no file: the tag does
            return f"{self.tag}.pth"
        name = os.path.basename(self.url.split("?", 1)[0]) or "weights.pth"
        # one cache folder for every tag: prefix the tag where a generic file name could collide
        return name if name not in ("model.pth", "weights.pth") else f"{self.tag}-{name}"

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



# ---------------------------------------------------------------------------------------- the table
# Families with no published trained weights (checked): CeiT (coeusguo/ceit: README only), ViTc / ViTp
# (pycls publishes RegNet / ResNet / EfficientNet baselines, no ViT), BoTNet (no official release),
# CoAtNet (no official release; timm's paper-like `coatnet_N_224` configs are `.untrained`, its
# `coatnet_N_rw_224` weights are a different architecture), SegNetr (no code), WetMapFormer (a Keras
# notebook, no weights), AdaMCT and SASRec (RecBole logs only, no checkpoints), the demo models.
_IN1K_EVAL = {"crop_pct": 0.875, "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}

# DeiT — facebookresearch/deit README_deit.md "Model Zoo" (URLs with the hash prefix torch.hub checks;
# acc@1 from the README's evaluation commands). Apache-2.0. Checkpoints: {'model': state_dict}.
_DEIT_CITE = "https://github.com/facebookresearch/deit/blob/main/README_deit.md"
for _name, _file, _top1, _res in (
        ("deit_tiny_patch16_224", "deit_tiny_patch16_224-a1311bcf.pth", 72.2, 224),
        ("deit_small_patch16_224", "deit_small_patch16_224-cd65a155.pth", 79.9, 224),
        ("deit_base_patch16_224", "deit_base_patch16_224-b5f2ef4d.pth", 81.8, 224),
        ("deit_tiny_distilled_patch16_224", "deit_tiny_distilled_patch16_224-b40b3cf7.pth", 74.5, 224),
        ("deit_small_distilled_patch16_224", "deit_small_distilled_patch16_224-649709d9.pth", 81.2, 224),
        ("deit_base_distilled_patch16_224", "deit_base_distilled_patch16_224-df68dfff.pth", 83.4, 224),
        ("deit_base_patch16_384", "deit_base_patch16_384-8de9b5d1.pth", 82.9, 384),
        ("deit_base_distilled_patch16_384", "deit_base_distilled_patch16_384-d0272ac0.pth", 85.2, 384)):
    register_weight(PublishedWeight(
        tag=f"{_name}.fb_in1k", source="url", url=f"https://dl.fbaipublicfiles.com/deit/{_file}",
        hash_prefix=_file.rsplit("-", 1)[1].split(".")[0], layout="facebookresearch-deit",
        dataset="ImageNet-1k", metric={"top1": _top1}, resolution=_res, num_classes=1000, license="Apache-2.0",
        cite=_DEIT_CITE, eval=dict(_IN1K_EVAL, crop_pct=0.875 if _res == 224 else 1.0),
        notes="distilled with a RegNetY-16GF teacher" if "distilled" in _name else ""))

# CvT — Microsoft's own HF hub ports (microsoft/cvt-*, transformers layout, apache-2.0 on the hub; the
# official repo is MIT); top-1 from microsoft/CvT README "Main results". The official model zoo is a
# OneDrive folder (manual). Hub file lists checked on huggingface.co/microsoft/cvt-*/tree/main.
_CVT_CITE = "https://github.com/microsoft/CvT#main-results; https://huggingface.co/microsoft/{repo}"
for _name, _repo, _suffix, _data, _top1, _res in (
        ("cvt_13", "cvt-13", "ms_in1k", "ImageNet-1k", 81.6, 224),
        ("cvt_21", "cvt-21", "ms_in1k", "ImageNet-1k", 82.5, 224),
        ("cvt_13_384", "cvt-13-384", "ms_in1k", "ImageNet-1k", 83.0, 384),
        ("cvt_21_384", "cvt-21-384", "ms_in1k", "ImageNet-1k", 83.3, 384),
        ("cvt_13_384", "cvt-13-384-22k", "ms_in22k_ft_in1k", "ImageNet-22k, fine-tuned on ImageNet-1k", 83.3, 384),
        ("cvt_21_384", "cvt-21-384-22k", "ms_in22k_ft_in1k", "ImageNet-22k, fine-tuned on ImageNet-1k", 84.9, 384),
        ("cvt_w24_384", "cvt-w24-384-22k", "ms_in22k_ft_in1k", "ImageNet-22k, fine-tuned on ImageNet-1k", 87.6, 384)):
    register_weight(PublishedWeight(
        tag=f"{_name}.{_suffix}", source="hf", hf_repo=f"microsoft/{_repo}", hf_file="pytorch_model.bin",
        layout="hf-transformers CvtForImageClassification", dataset=_data, metric={"top1": _top1}, resolution=_res,
        num_classes=1000, license="Apache-2.0 (hub card); MIT (official code)", cite=_CVT_CITE.format(repo=_repo),
        eval=dict(_IN1K_EVAL, interpolation="bilinear", crop_pct=0.875 if _res == 224 else 1.0),
        notes="CvT-W24's 87.6 is the README's figure (the paper says 87.7)" if "w24" in _name else ""))
register_weight(PublishedWeight(
    tag="cvt_13.ms_in1k_onedrive", source="manual", url="https://1drv.ms/u/s!AhIXJn_J-blW9RzF3rMW7SsLHa8h?e=blQ0Al",
    layout="microsoft-cvt (CvT-13-224x224-IN-1k.pth)", dataset="ImageNet-1k", metric={"top1": 81.6}, resolution=224,
    num_classes=1000, license="MIT", cite="https://github.com/microsoft/CvT#main-results",
    notes="the official model zoo folder (every CvT checkpoint); save the file you pick under this tag's file name"))

# ConViT — timm's hub copies of the authors' weights ("Trained on ImageNet-1k by paper authors"); the
# official files are https://dl.fbaipublicfiles.com/convit/convit_{tiny,small,base}.pth (no hash).
# Top-1: ConViT README (tiny, 73.116) and the paper (small 81.3, base 82.4). Official code CC-BY-NC-4.0.
for _name, _top1 in (("convit_tiny", 73.1), ("convit_small", 81.3), ("convit_base", 82.4)):
    register_weight(PublishedWeight(
        tag=f"{_name}.fb_in1k", source="hf", hf_repo=f"timm/{_name}.fb_in1k", hf_file="model.safetensors",
        layout="timm (= facebookresearch/convit)", dataset="ImageNet-1k", metric={"top1": _top1}, resolution=224,
        num_classes=1000, license="CC-BY-NC-4.0 (official repo); the timm hub card says apache-2.0",
        cite=f"https://huggingface.co/timm/{_name}.fb_in1k; https://github.com/facebookresearch/convit",
        eval=_IN1K_EVAL))

# ViT — timm's hub (AugReg, Steiner et al.); no top-1 is stated on the model card.
register_weight(PublishedWeight(
    tag="vit_base_patch16_224.augreg2_in21k_ft_in1k", source="hf", hf_repo="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    hf_file="model.safetensors", layout="timm", dataset="ImageNet-21k, fine-tuned on ImageNet-1k", metric={},
    resolution=224, num_classes=1000, license="Apache-2.0",
    cite="https://huggingface.co/timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    eval={"crop_pct": 0.9, "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}))

# Mobile-Former — AAboys/MobileFormer README: Google Drive only (manual); timm-0.3 training checkpoints.
_MF_CITE = "https://github.com/AAboys/MobileFormer#readme"
for _name, _drive, _top1 in (
        ("mobile_former_508m", "1bqLIcpbCaxK-Eb4wcxk0iJpFJ1nXfGuF", 79.3),
        ("mobile_former_294m", "1JBSM7NJ60fN9TgT5sMnbhmbZwrzcBd0r", 77.9),
        ("mobile_former_214m", "13MOjdIMMBJgqyq_ld-grRhBBHOFU5Ggd", 76.7),
        ("mobile_former_151m", "1w4QO-zhJ8QI1zGu7iOZ7lXxYJ5G1VXdF", 75.2),
        ("mobile_former_96m", "1kMbRceswujtliCHKr-nxMFsrkvBrEfrW", 72.8),
        ("mobile_former_52m", "1ekq_FPl57gjIlYX16Ll0nBuEyB0pjgGt", 68.7),
        ("mobile_former_26m", "15uWYzx2VWWUjacZQHB56vOHzKxQDlp5O", 64.0)):
    register_weight(PublishedWeight(
        tag=f"{_name}.in1k", source="manual", url=f"https://drive.google.com/file/d/{_drive}/view?usp=sharing",
        layout="AAboys/MobileFormer (timm-0.3 checkpoint: state_dict next to the run's args)", dataset="ImageNet-1k",
        metric={"top1": _top1}, resolution=224, num_classes=1000, license="not stated in the repository",
        cite=_MF_CITE, eval=_IN1K_EVAL))

# VVT — OpenNLPLab/Vicinity-Vision-Transformer README "Weight": OneDrive only (manual), 224 px weights.
for _name, _link, _top1 in (("vvt_tiny", "gtRFwwHih3Yu9G3FGg?e=yHKvuc", 79.2), ("vvt_small", "gtREWfCdlLJVy1IgpA?e=l4h3Wi", 82.6),
                            ("vvt_medium", "gtRG4lD_uEVyj7cPYw?e=ihjjtO", 83.8), ("vvt_large", "gtRHmfu0BybCZ8k1FQ?e=fLskgG", 84.1)):
    register_weight(PublishedWeight(
        tag=f"{_name}.in1k", source="manual", url=f"https://1drv.ms/u/s!Ak3sXyXVg781{_link}",
        layout="OpenNLPLab VVT (PVT/timm style)", dataset="ImageNet-1k", metric={"top1": _top1}, resolution=224,
        num_classes=1000, license="not stated in the repository",
        cite="https://github.com/OpenNLPLab/Vicinity-Vision-Transformer#weight", eval=_IN1K_EVAL))

# SuperViT (DeiT-S) — lmbxmu/SuperViT README: Google Drive only (manual); 80.62 at 14x14 tokens, keep 1.0.
register_weight(PublishedWeight(
    tag="supervit_deit_small.in1k", source="manual",
    url="https://drive.google.com/file/d/1y2-zU5UvHqGCmWEB41VLbnf7B27BatBL/view?usp=sharing",
    layout="lmbxmu/SuperViT super_deit_s (DeiT main.py checkpoint)", dataset="ImageNet-1k",
    metric={"top1": 80.62, "top1_8x8_keep0.5": 73.75}, resolution=224, num_classes=1000,
    license="not stated in the repository", cite="https://github.com/lmbxmu/SuperViT#pre-trained-models",
    eval=_IN1K_EVAL))

# SegFormer — NVIDIA's HF hub ports (transformers SegformerForSemanticSegmentation, ADE20K 150 classes;
# the safetensors variant is only an unmerged PR, so the .bin); mIoU: the paper's single-scale ADE20K
# figures (SegFormer Table 1). Licence: NVIDIA Source Code License, non-commercial (NVlabs/SegFormer).
for _b, _repo, _miou, _res in ((0, "segformer-b0-finetuned-ade-512-512", 37.4, 512), (1, "segformer-b1-finetuned-ade-512-512", 42.2, 512),
                               (2, "segformer-b2-finetuned-ade-512-512", 46.5, 512), (3, "segformer-b3-finetuned-ade-512-512", 49.4, 512),
                               (4, "segformer-b4-finetuned-ade-512-512", 50.3, 512), (5, "segformer-b5-finetuned-ade-640-640", 51.0, 640)):
    register_weight(PublishedWeight(
        tag=f"segformer_b{_b}.ade20k", source="hf", hf_repo=f"nvidia/{_repo}", hf_file="pytorch_model.bin",
        layout="hf-transformers SegformerForSemanticSegmentation", dataset="ADE20K (encoder pre-trained on ImageNet-1k)",
        metric={"miou": _miou}, resolution=_res, num_classes=150,
        license="NVIDIA Source Code License (non-commercial)",
        cite=f"https://huggingface.co/nvidia/{_repo}; https://github.com/NVlabs/SegFormer#license"))

# SCTNet — xzz777/SCTNet README "Results and models", Cityscapes: Google Drive only (manual); MIT.
for _name, _drive, _miou in (("sctnet_s_seg50", "16fAVzvb_qLcFO3dVGdHsSkEMvVCslXcD", 72.94),
                             ("sctnet_s_seg75", "1W_VMV8P77Z4GIB_O7WQQivWLH4t-rbBm", 76.33),
                             ("sctnet_b_seg50", "1gHo655PDo-hUxCNlZNqrLIFOgc_14Wbl", 76.46),
                             ("sctnet_b_seg75", "1JXvSlaNbEbsG87wIwD1lhDQDeku9Wfed", 79.83),
                             ("sctnet_b_seg100", "1yRKatICzgnslqcHvL_AiwRXyIvuDDM6x", 80.51)):
    register_weight(PublishedWeight(
        tag=f"{_name}.cityscapes", source="manual", url=f"https://drive.google.com/file/d/{_drive}/view?usp=sharing",
        layout="mmsegmentation 0.x checkpoint ({'meta', 'state_dict'}: backbone.*, decode_head.*, auxiliary_head.*)",
        dataset="Cityscapes (19 classes)", metric={"miou": _miou}, resolution=None, num_classes=19, license="MIT",
        cite="https://github.com/xzz777/SCTNet#cityscapes"))

# ACT — jinsuyoo/act test.py `--release` downloads these GitHub release assets (state dict of the
# `ACT` network); trained on ImageNet (README "Prepare dataset"). MIT. The publisher's PSNR table was
# not retrieved, so no metric is listed.
for _s in (2, 3, 4):
    register_weight(PublishedWeight(
        tag=f"act_x{_s}.imagenet", source="url", url=f"https://github.com/jinsuyoo/ACT/releases/download/v0.0.0/act_sr_x{_s}.pt",
        layout="jinsuyoo/act ACT state dict", dataset=f"ImageNet (bicubic ×{_s})", metric={}, resolution=48,
        license="MIT", cite="https://github.com/jinsuyoo/act (test.py --release; README)"))


def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet-1k class names, in the order every ImageNet head uses (package data)."""
    from importlib import resources

    text = resources.files("hybridzoo.hub").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    names = [line for line in text.splitlines() if line and not line.startswith("#")]
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, not 1000")
    return names


def pretrained_run(model: str, pretrained: Any) -> dict[str, Any]:
    """What `predict` / `eval` need for published weights, shaped like `engine.checkpoint.read_run`:
    {model, task, weights, data_info (num_classes, class_names, img_size, crop_pct, mean, std), published}."""
    from hybridzoo.registry import get_card

    card = get_card(model)
    path, w = resolve_pretrained(model, pretrained)
    info: dict[str, Any] = {}
    if w is not None:
        if w.num_classes:
            info["num_classes"] = w.num_classes
        if w.resolution:
            info["img_size"] = w.resolution
        if w.num_classes == 1000 and "ImageNet" in w.dataset and card.task == "classification":
            info["class_names"] = imagenet_classes()
        for key in ("crop_pct", "mean", "std"):
            if key in w.eval:
                info[key] = list(w.eval[key]) if isinstance(w.eval[key], tuple) else w.eval[key]
    return {"model": model, "task": card.task, "weights": path, "data_info": info, "published": w}


def describe_metric(w: PublishedWeight) -> str:
    """'top1 81.6 (ImageNet-1k, 224 px)' — the publisher's figures for one weight, '' if none."""
    if not w.metric:
        return ""
    figures = ", ".join(f"{k} {v:g}" for k, v in w.metric.items())
    res = f", {w.resolution} px" if w.resolution else ""
    return f"{figures} ({w.dataset}{res})"
