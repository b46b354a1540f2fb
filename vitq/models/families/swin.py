"""Swin Transformer v1 (timm ``SwinTransformer``): its adapter."""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
from timm.layers import Mlp
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention
from torch import nn

from ...errors import VitqError
from ...nn import QuantWindowAttention
from ..adapters import _COMMON, ADAPTERS, ModelAdapter, NormLinearPair, _is_norm


@ADAPTERS.register("swin")
class SwinAdapter(ModelAdapter):
    family = "Swin Transformer v1 (timm SwinTransformer)"
    model_types = (SwinTransformer,)
    module_map = {**_COMMON, WindowAttention: QuantWindowAttention}

    def check(self, model: nn.Module) -> None:
        found = sum(isinstance(m, WindowAttention) for m in model.modules())
        if found == 0:
            raise VitqError("this SwinTransformer has no WindowAttention modules: it is not a Swin v1 model")

    def token_grids(self, model: nn.Module) -> List[Tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
        """Each Swin block's output, already a ``[B, H, W, C]`` grid (windowed attention outputs are
        scattered over shifted windows; the block output holds them in place)."""
        self.check(model)
        return [(m, lambda out: out) for m in model.modules() if isinstance(m, SwinTransformerBlock)]

    def blocks(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, SwinTransformerBlock)]

    def forward_from(self, model: nn.Module, block: str, x: torch.Tensor) -> torch.Tensor:
        return self._run(model, block, x, skip=0)

    def forward_after(self, model: nn.Module, block: str, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self._run(model, block, x, skip=1, pre_logits=pre_logits)

    @staticmethod
    def _run(model: nn.Module, block: str, x: torch.Tensor, skip: int, pre_logits: bool = False) -> torch.Tensor:
        """Logits from the named block on, that block run (``skip`` 0) or not (1: ``x`` is its output).
        A stage downsamples before its blocks, so the rest of the block's stage is its later blocks."""
        target = model.get_submodule(block)
        started = False
        for stage in model.layers:
            if not started:
                blocks = list(stage.blocks)
                if not any(b is target for b in blocks):
                    continue
                started = True
                for blk in blocks[next(i for i, b in enumerate(blocks) if b is target) + skip:]:
                    x = blk(x)
            else:
                x = stage(x)
        return model.forward_head(model.norm(x), pre_logits=pre_logits)

    def norm_linear_pairs(self, model: nn.Module) -> List[NormLinearPair]:
        """Each block's norm1 → attn.qkv (windows are partitioned in between: a per-channel map
        commutes with that) and norm2 → mlp.fc1, and each patch merging's norm → reduction."""
        pairs = []
        for name, module in model.named_modules():
            if type(module) is SwinTransformerBlock:
                h, w = module.input_resolution
                wh, ww = module.window_size
                padded = bool(h % wh or w % ww)
                if _is_norm(module.norm1) and isinstance(module.attn.qkv, nn.Linear):
                    pairs.append(NormLinearPair("qkv", f"{name}.norm1", f"{name}.attn.qkv", shift_exact=not padded))
                if _is_norm(module.norm2) and type(module.mlp) is Mlp:
                    pairs.append(NormLinearPair("fc1", f"{name}.norm2", f"{name}.mlp.fc1"))
            elif type(module) is PatchMerging and _is_norm(module.norm):
                pairs.append(NormLinearPair("reduction", f"{name}.norm", f"{name}.reduction"))
        return pairs

    def feature_channels(self, model: nn.Module, indices: Sequence[int]) -> List[int]:
        dims = [info["num_chs"] for info in model.feature_info]
        return [dims[i] for i in indices]
