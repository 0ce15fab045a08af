"""`create_model`, `model_card` and weight loading.

Pretrained weights are `True` (the model's first published tag), a published tag
(`"deit_small_patch16_224.fb_in1k"`, or its suffix `"fb_in1k"`; see `hybridzoo.hub.published`),
fetched into the cache on first use, or a path: a `.safetensors` file, or a checkpoint read with
`torch.load(weights_only=True)` — and, for the files official training scripts write (an
`argparse.Namespace` or a protocol-4 config object beside the tensors), with the restricted reader
`hybridzoo.hub.safe_pickle`. Nothing loaded can execute code. A state dict in an official layout
(Microsoft CvT, facebookresearch DeiT, HuggingFace transformers, ...) is mapped by the model file's
`convert_official(state_dict, model)` before loading.
"""

from __future__ import annotations

import importlib
import inspect
import os
import warnings
from typing import Any

import torch
from torch import nn

from hybridzoo.registry import ModelCard, get_card, model_entrypoint

__all__ = ["create_model", "model_card", "load_weights", "read_state_dict", "FeatureExtractor"]


def model_card(name: str) -> ModelCard:
    """The paper's facts about a registered model (title, arXiv id, task, reported figures)."""
    return get_card(name)


def create_model(name: str, pretrained: bool | str | os.PathLike | None = None, num_classes: int | None = None,
                 in_chans: int | None = None, features_only: bool = False, **overrides: Any) -> nn.Module:
    """Build a registered model, timm style.

    Args:
        name: a registered name (`hybridzoo.list_models()`).
        pretrained: True (the first published tag), a published tag or its suffix, or a path to
            weights in our layout or an official one (converted on load).
        num_classes / in_chans: override the head width / input channels.
        features_only: return a module whose forward gives the multi-scale feature maps.
        **overrides: any constructor keyword of the model (drop_path_rate, img_size, ...).
    """
    fn = model_entrypoint(name)
    kwargs = dict(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    try:
        model = fn(**kwargs)
    except TypeError as e:
        params = inspect.signature(fn).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise
        raise TypeError(f"{name}: could not build with {sorted(kwargs)}: {e}") from e
    model.model_name = name
    if pretrained is not None and pretrained is not False:
        load_weights(model, pretrained)
    if features_only:
        model = FeatureExtractor(model)
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read weights from a safetensors file or a `torch.save`d checkpoint, safely.

    Checkpoints are opened with `weights_only=True`; a dict wrapping the weights under `model`,
    `state_dict`, `model_state` or `ema` (the layouts official repositories save) is unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path!r}")
    if path.endswith(".safetensors") or _is_safetensors(path):
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from e
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": the fallback below handles it
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # official training scripts' files (argparse.Namespace, RecBole's protocol-4 Config, ...):
        # the restricted reader rebuilds the tensors and turns every other object into inert data
        from hybridzoo.hub import safe_pickle

        try:
            obj = safe_pickle.load(path)
        except Exception as e2:
            raise ValueError(f"{path!r} is not a readable checkpoint (neither torch.load(weights_only=True) nor "
                             f"the restricted reader could parse it: {e2})") from e2
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state", "state_dict_ema", "model_ema"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors")
    # DataParallel/DDP and torch.compile prefixes
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _is_safetensors(path: str) -> bool:
    # a safetensors file starts with its JSON header's length (u64 little-endian) and then '{', whatever
    # its name says (a hand-placed download keeps the name the cache expects)
    with open(path, "rb") as f:
        head = f.read(9)
    return (len(head) == 9 and head[8:9] == b"{"
            and int.from_bytes(head[:8], "little") < os.path.getsize(path))


def load_weights(model: nn.Module, weights: bool | str | os.PathLike | dict[str, torch.Tensor],
                 strict: bool = True) -> nn.Module:
    """Load weights (a state dict, a path, a published tag or True) into `model`, converting official
    layouts; a mismatch names every bad key."""
    target = model.model if isinstance(model, FeatureExtractor) else model
    if isinstance(weights, dict):
        state = dict(weights)
    else:
        from hybridzoo.hub.published import resolve_pretrained

        path, published = resolve_pretrained(getattr(target, "model_name", None), weights)
        state = read_state_dict(path)
        if published is not None:
            target.pretrained_tag = published.tag
    own = target.state_dict()
    shapes_differ = any(k in state and tuple(state[k].shape) != tuple(v.shape) for k, v in own.items())
    if set(state) != set(own) or shapes_differ:
        # an official layout, or ours saved at another resolution (position tables to resample)
        module = importlib.import_module(type(target).__module__)
        convert = getattr(module, "convert_official", None)
        if convert is not None:
            state = convert(state, target)
        # a model file may reshape the model to what the checkpoint holds (SCTNet: a deployed network
        # has no auxiliary head) and says so; it returns None when nothing changed
        adapt = getattr(module, "adapt_to_checkpoint", None)
        if adapt is not None and set(state) != set(own):
            message = adapt(state, target)
            if message:
                print(f"{getattr(target, 'model_name', type(target).__name__)}: {message}")
                own = target.state_dict()
    state = _resample_position_tables(state, own)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if strict and (missing or unexpected or mismatched):
        name = getattr(target, "model_name", type(target).__name__)
        lines = [f"checkpoint does not fit {name}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        if mismatched:
            lines.append("  shape mismatches: " + ", ".join(
                f"{k} checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:20]))
        raise ValueError("\n".join(lines))
    target.load_state_dict(state, strict=strict)
    return model


def _resample_position_tables(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Relative-position tables saved at another resolution, resampled to the model's (fine-tuning at
    another --img-size): Swin/CoAtNet-style bias tables ((2h-1)·(2w-1), heads), square, bicubically
    over the offset grid; BoTNet-style per-axis embeddings `rel_height` / `rel_width` (2s-1, d)
    linearly along the offsets. Absolute position embeddings are each model's `convert_official`'s."""
    import math

    import torch.nn.functional as F

    out = dict(state)
    for k, v in state.items():
        if k not in own or tuple(v.shape) == tuple(own[k].shape) or v.ndim != 2 or v.shape[1] != own[k].shape[1]:
            continue
        n_old, n_new = v.shape[0], own[k].shape[0]
        if k.endswith("relative_position_bias_table"):
            s_old, s_new = math.isqrt(n_old), math.isqrt(n_new)
            if s_old * s_old != n_old or s_new * s_new != n_new:
                continue
            grid = v.float().T.reshape(1, v.shape[1], s_old, s_old)
            grid = F.interpolate(grid, size=(s_new, s_new), mode="bicubic", align_corners=False)
            out[k] = grid.reshape(v.shape[1], n_new).T.to(v.dtype).contiguous()
        elif k.endswith(("rel_height", "rel_width")):
            line = F.interpolate(v.float().T[None], size=n_new, mode="linear", align_corners=False)
            out[k] = line[0].T.to(v.dtype).contiguous()
    return out


class FeatureExtractor(nn.Module):
    """`features_only=True`: returns the model's multi-scale maps (a list of B×C×H×W tensors).

    The wrapped model implements `forward_intermediates(x) -> list[Tensor]` and `feature_info`
    (a list of dicts with `num_chs` and `reduction`). Its classifier is removed so that every
    remaining parameter takes part in the forward pass.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{getattr(model, 'model_name', type(model).__name__)} has no multi-scale "
                             "features (features_only is not supported for it)")
        if hasattr(model, "prune_for_features"):
            model.prune_for_features()
        elif hasattr(model, "reset_classifier"):
            model.reset_classifier(0)
        self.model = model
        self.feature_info = list(model.feature_info)
        self.model_name = getattr(model, "model_name", type(model).__name__)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x)
