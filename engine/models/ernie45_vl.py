"""ERNIE-4.5-VL: the vision tower and resampler feeding the multimodal MoE language model.

`encode_media` turns preprocessed patches into language-model embeddings (one row per
placeholder token); the engine scatters them over the placeholder positions and calls
`forward` with `inputs_embeds` and a `vision_mask` that sends those tokens (and the
image/video start/end markers) to the vision experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.config import ModelConfig
from engine.layers.attention import AttentionMetadata, KVCache
from engine.models.ernie45 import Ernie45ForCausalLM
from engine.models.ernie45_vision import Grid, Resampler, VisionTower


class Ernie45VLForConditionalGeneration(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.vision is not None, "ERNIE-4.5-VL needs a vision config"
        self.config = cfg
        self.language_model = Ernie45ForCausalLM(cfg.text)
        self.vision_tower = VisionTower(cfg.vision)
        self.resampler = Resampler(cfg.vision, cfg.text)

    def encode_media(self, pixels: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        """Patches `[N, 3*14*14]` of one or more items -> embeddings `[M, D]`, items in order."""
        dtype = self.vision_tower.patch_embed.proj.weight.dtype
        feats = self.vision_tower(pixels.to(dtype), grids)
        return self.resampler(feats, grids)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        return self.language_model(
            input_ids, positions, kv_caches, meta, inputs_embeds, vision_mask, after_layer
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)
