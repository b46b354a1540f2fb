"""ViT, DeiT and distilled DeiT (timm ``VisionTransformer``): its adapter."""
from __future__ import annotations

import math
from typing import Callable, List, Sequence, Tuple

import torch
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ...errors import VitqError
from ...nn import PrefixRows, QuantAttention
from ..adapters import _COMMON, ADAPTERS, ModelAdapter, NormLinearPair, _is_norm


@ADAPTERS.register("vit")
class ViTAdapter(ModelAdapter):
    family = "ViT, DeiT and distilled DeiT (timm VisionTransformer)"
    model_types = (VisionTransformer,)
    module_map = {**_COMMON, Attention: QuantAttention}

    def check(self, model: nn.Module) -> None:
        for i, block in enumerate(model.blocks):
            attn = getattr(block, "attn", None)
            if type(attn) is not Attention:
                raise VitqError(
                    f"blocks.{i}.attn is {type(attn).__name__}, not timm's Attention: this ViT variant "
                    "is not supported yet (supported: " + ", ".join(ADAPTERS.names()) + ")"
                )

    def token_grids(self, model: nn.Module) -> List[Tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
        """Each block's attention output (after the projection), on the patch grid."""
        self.check(model)
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        grid = tuple(model.patch_embed.grid_size)

        def to_grid(out: torch.Tensor) -> torch.Tensor:
            patches = out[:, prefix:]
            n = patches.shape[1]
            h, w = grid if grid[0] * grid[1] == n else (math.isqrt(n), n // math.isqrt(n))
            return patches.reshape(out.shape[0], h, w, out.shape[-1])

        return [(block.attn, to_grid) for block in model.blocks]

    def blocks(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        return [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]

    def forward_from(self, model: nn.Module, block: str, x: torch.Tensor) -> torch.Tensor:
        start = [name for name, _ in self.blocks(model)].index(block)
        for blk in model.blocks[start:]:
            x = blk(x)
        return model.forward_head(model.norm(x))

    def forward_after(self, model: nn.Module, block: str, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        start = [name for name, _ in self.blocks(model)].index(block) + 1
        for blk in model.blocks[start:]:
            x = blk(x)
        return model.forward_head(model.norm(x), pre_logits=pre_logits)

    def prefix_rows(self, model: nn.Module) -> Tuple[int, List[Tuple[str, PrefixRows]]]:
        """The class token (and distillation, register tokens): ``num_prefix_tokens``; every quantized
        linear layer and attention inside the blocks sees them as its first rows."""
        tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        if not tokens:
            return 0, []
        modules = [(f"{name}.{sub}", m) for name, block in self.blocks(model)
                   for sub, m in block.named_modules() if isinstance(m, PrefixRows)]
        return tokens, modules

    def norm_linear_pairs(self, model: nn.Module) -> List[NormLinearPair]:
        """Pre-norm blocks (timm ``Block``): norm1 → attn.qkv and norm2 → mlp.fc1. Blocks of other
        types (post-norm, parallel) and attention with a gate (which also reads norm1's output)
        have no such pair."""
        pairs = []
        for name, block in self.blocks(model):
            if type(block) is not Block:
                continue
            attn = block.attn
            if _is_norm(block.norm1) and getattr(attn, "gate", None) is None and isinstance(attn.qkv, nn.Linear):
                pairs.append(NormLinearPair("qkv", f"{name}.norm1", f"{name}.attn.qkv"))
            if _is_norm(block.norm2) and type(block.mlp) is Mlp:
                pairs.append(NormLinearPair("fc1", f"{name}.norm2", f"{name}.mlp.fc1"))
        return pairs

    def feature_channels(self, model: nn.Module, indices: Sequence[int]) -> List[int]:
        return [model.embed_dim] * len(indices)
