"""Build float models from timm names, local checkpoints (with a sidecar card) or modules."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from ..errors import VitqError

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")
CARD_FORMAT = "vitq-model-card/1"


@dataclass
class LoadedModel:
    """A float model with what vitq needs to feed it and to rebuild it.

    Attributes:
        model: the float module, in eval mode.
        name: how the user named it (timm name or checkpoint path).
        arch: the timm architecture name.
        kwargs: keyword arguments of ``timm.create_model``.
        data_config: preprocessing (timm data config keys: input_size, interpolation, crop_pct,
            crop_mode, mean, std).
        classes: class names, when the checkpoint's card gives them.
        random_seed: the seed of random weights (``pretrained=False``), None for trained weights.
        task: ``classification``; ``segmentation`` for a model that outputs per-pixel logits
            (a module with ``task = "segmentation"``, or a card with a ``segmentation_head``);
            ``detection`` for a torchvision-style detector (``task = "detection"``, or a card with a
            ``detection_head``: :func:`vitq.models.detection.build_detector`).
        ignore_index: dense tasks: the label value that is not scored (void), from the card.
    """

    model: nn.Module
    name: str
    arch: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    data_config: Dict[str, Any] = field(default_factory=dict)
    classes: Optional[List[str]] = None
    random_seed: Optional[int] = None
    task: str = "classification"
    ignore_index: Optional[int] = None
    _digest: Optional[str] = field(default=None, repr=False)

    @property
    def digest(self) -> str:
        """:func:`weights_digest` of the float model (computed once)."""
        if self._digest is None:
            self._digest = weights_digest(self.model)
        return self._digest

    @property
    def identity(self) -> Dict[str, Any]:
        """What a plan records of the model, to refuse a plan made for another architecture or
        for other weights (the checksum; the seed of random weights, to rebuild them)."""
        out = {"name": self.name, "arch": self.arch, "kwargs": self.kwargs, "weights_sha256": self.digest}
        if self.random_seed is not None:
            out["random_weights_seed"] = self.random_seed
        return out


def weights_digest(model: nn.Module) -> str:
    """A checksum of a model's parameters and buffers (names, dtypes, shapes and values): the first
    16 hex digits of their SHA-256."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def load_model(
    model: Union[str, Path, nn.Module],
    *,
    arch: Optional[str] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    pretrained: bool = True,
    seed: int = 0,
) -> LoadedModel:
    """Load a float model.

    Args:
        model: a timm model name (weights from the hub, where there is a network), a checkpoint
            path (``.pth``/``.pt``/``.bin``, ``.safetensors``, ``.npz``; its architecture from a sidecar
            ``<stem>.json`` card or from ``arch``/``model_kwargs``), or an ``nn.Module``.
        arch: timm architecture for a checkpoint without a card.
        model_kwargs: extra ``timm.create_model`` arguments (override the card's).
        pretrained: for a timm name, whether to download the hub weights (False: random weights).
        seed: the seed of random weights (``pretrained=False``), so that they can be rebuilt.

    Example:
        >>> loaded = load_model("test_vit", pretrained=False)
        >>> loaded.arch
        'test_vit'
    """
    model_kwargs = dict(model_kwargs or {})
    if isinstance(model, nn.Module):
        cfg = data_config_of(model)
        return LoadedModel(model.eval(), type(model).__name__, arch or type(model).__name__, model_kwargs, cfg,
                           task=getattr(model, "task", "classification"))
    text = str(model)
    path = Path(text).expanduser()
    looks_like_path = path.suffix.lower() in CHECKPOINT_SUFFIXES or "/" in text or path.exists()
    if looks_like_path:
        return _load_checkpoint(path, arch, model_kwargs)
    if not pretrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loaded = _load_timm(text, model_kwargs, pretrained)
        loaded.random_seed = seed
        return loaded
    return _load_timm(text, model_kwargs, pretrained)


def data_config_of(model: nn.Module) -> Dict[str, Any]:
    """timm's data config for ``model``, with the input size the model was built for.

    timm resolves the size from the pretrained config, which is wrong for a model created with
    another ``img_size``; the patch embedding knows the real one.
    """
    cfg = dict(timm.data.resolve_data_config({}, model=model))
    embed = getattr(model, "patch_embed", None)
    if embed is None:  # a dense model around a backbone: the backbone's patch embedding
        from .adapters import find_backbones

        found = find_backbones(model)
        embed = getattr(model.get_submodule(found[0][0]), "patch_embed", None) if len(found) == 1 else None
    img_size = getattr(embed, "img_size", None)
    if img_size is not None:
        cfg["input_size"] = (3, *tuple(img_size))
    return cfg


def _create(arch: str, kwargs: Dict[str, Any], pretrained: bool = False) -> nn.Module:
    if not timm.is_model(arch):
        import difflib

        family = timm.list_models(f"{arch.split('_')[0]}*") if arch else []  # same family first
        pool = family or timm.list_models()
        close = sorted(pool, key=lambda n: -difflib.SequenceMatcher(None, arch, n).ratio())[:6] if family else \
            difflib.get_close_matches(arch, pool, n=6, cutoff=0.6)
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise VitqError(
            f"unknown model {arch!r}: not a timm model name nor an existing checkpoint file.{hint} "
            "List names with `python -c 'import timm; print(timm.list_models())'`."
        )
    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as err:  # timm's checks of the arguments
        raise VitqError(f"timm cannot build {arch!r} with the arguments {kwargs} ({type(err).__name__}: "
                        f"{err or 'an internal check failed'}): fix the model card's kwargs or --model-kwargs "
                        "(e.g. embed_dim must be divisible by num_heads)") from None


def _weights_source(name: str) -> Tuple[Optional[str], bool]:
    """The host timm would download ``name``'s pretrained weights from, and whether they are cached.

    (None, True) when timm knows no remote source (it will say so itself)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # pragma: no cover - timm's own lookup failing
        cfg = None
    if cfg is None:
        return None, True
    hub_id, url = getattr(cfg, "hf_hub_id", None), getattr(cfg, "url", None)
    if hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        names = [getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin",
                 "open_clip_pytorch_model.bin", "open_clip_model.safetensors"]
        if any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in names if f):
            return None, True
        return urlparse(constants.ENDPOINT).hostname, False
    if url:
        from timm.models._hub import check_cached_file

        if check_cached_file(url):
            return None, True
        return urlparse(url).hostname, False
    return None, True


def _check_reachable(name: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after the hub client's minute of retries, when the weights of ``name`` are
    neither cached nor reachable."""
    host, cached = _weights_source(name)
    if cached or host is None:
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    reason = "HF_HUB_OFFLINE is set" if offline else None
    if reason is None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError as err:
            reason = f"{host} cannot be reached: {err}"
    if reason is not None:
        raise VitqError(
            f"the pretrained weights of {name!r} are not in the local cache and {reason}. "
            "Without a network, pass a local checkpoint (.pth/.safetensors/.npz) with a sidecar "
            "<stem>.json or --arch, or use --random-weights for a model with random weights."
        )


def _load_timm(name: str, kwargs: Dict[str, Any], pretrained: bool) -> LoadedModel:
    if pretrained and timm.is_model(name):
        _check_reachable(name)
    try:
        model = _create(name, kwargs, pretrained)
    except VitqError:
        raise
    except Exception as err:  # hub unreachable, missing weights, ...
        raise VitqError(
            f"could not fetch pretrained weights for {name!r} ({type(err).__name__}: {err}). "
            "Without a network, pass a local checkpoint (.pth/.safetensors/.npz) with a sidecar "
            "<stem>.json or --arch, or use --random-weights for a model with random weights."
        ) from None
    cfg = data_config_of(model)
    return LoadedModel(model.eval(), name, name, kwargs, cfg)


def read_card(path: Path) -> Optional[Dict[str, Any]]:
    """The sidecar ``<stem>.json`` of a checkpoint, or None if there is none."""
    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        return None
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise VitqError(f"cannot read the model card {card_path}: {err}") from None
    if not isinstance(card, dict) or "timm_model" not in card:
        raise VitqError(f"{card_path} is not a vitq model card: it needs at least a 'timm_model' key")
    return card


def _load_checkpoint(path: Path, arch: Optional[str], kwargs: Dict[str, Any]) -> LoadedModel:
    if not path.exists():
        raise VitqError(f"checkpoint {path} does not exist (and {path.name!r} is not a timm model name)")
    if not path.is_file():
        raise VitqError(f"{path} is a folder, not a checkpoint file")
    card = read_card(path)
    if arch is None and card is None:
        raise VitqError(
            f"no architecture for {path}: put a sidecar {path.with_suffix('.json').name} beside it "
            "(format in shared/assets/MANIFEST.md) or pass --arch NAME [--model-kwargs JSON]"
        )
    arch = arch or card["timm_model"]
    all_kwargs = {**(card.get("kwargs", {}) if card else {}), **kwargs}
    model = _create(arch, all_kwargs)
    heads = [k for k in ("segmentation_head", "detection_head") if card and card.get(k) is not None]
    if len(heads) > 1:
        raise VitqError(f"{path.with_suffix('.json')} has both a segmentation_head and a detection_head: keep the "
                        "one the checkpoint was trained with")
    if heads:
        head = card[heads[0]]
        if not isinstance(head, dict):
            raise VitqError(f"{path.with_suffix('.json')}: {heads[0]} must be an object")
        try:
            if heads[0] == "segmentation_head":
                from .segmentation import build_segmenter

                model = build_segmenter(model, head)
            else:
                from .detection import build_detector

                model = build_detector(model, head)
        except VitqError as err:
            raise VitqError(f"{path.with_suffix('.json')}: {err}") from None
    state = read_state_dict(path)
    _load_into(model, state, path)
    cfg = data_config_of(model)
    if card and card.get("data_config"):
        cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in card["data_config"].items()})
    classes = card.get("classes") if card else None
    task = getattr(model, "task", "classification")
    ignore = card.get("ignore_index") if card else None
    return LoadedModel(model.eval(), str(path), arch, all_kwargs, cfg, classes, task=task, ignore_index=ignore)


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint, read without executing code."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as data:
                state = {k: torch.from_numpy(data[k]) for k in data.files}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if type(err).__name__ == "UnpicklingError" and "Unsupported global" in str(err):
            # torch's own text talks of re-running with weights_only=False: nothing was re-run
            raise VitqError(
                f"{path} holds pickled Python objects (e.g. a whole nn.Module), not only tensors; vitq does not "
                "unpickle them, since unpickling can run any code. Save the weights instead: "
                "torch.save(model.state_dict(), PATH) (or a .safetensors file) with a sidecar .json card"
            ) from None
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
        if "Weights only load failed" in text:  # torch's advice to re-run unsafely is not ours to give
            found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
            text = f"not a valid checkpoint ({found.group(1).strip() if found else 'unreadable pickle'})"
        first = text.strip().splitlines()[0][:200] if text.strip() else ""
        raise VitqError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {first}. "
            "Is it a state_dict saved with torch.save, a .safetensors or a .npz file, and complete?"
        ) from None
    if isinstance(state, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VitqError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return state


def _load_into(model: nn.Module, state: Dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:4])})")
        if wrong:
            shapes = ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3])
            parts.append(f"{len(wrong)} shape mismatch(es) ({shapes})")
        raise VitqError(
            f"checkpoint {path} does not match the architecture: {'; '.join(parts)}. "
            "Check the sidecar card or --arch/--model-kwargs."
        )
    model.load_state_dict(state, strict=True)
