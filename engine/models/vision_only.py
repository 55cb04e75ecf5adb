"""ERNIE-4.5-VL's vision side alone: the vision tower and resampler, loaded from a whole
checkpoint without reading a single language-model tensor.

The vision service needs only these (about 0.7B parameters of the 28B model). The modules
are the same classes the full model uses, under the same names (`vision_tower.*`,
`resampler.*`), so the one loader (`engine.models.loader`) maps every checkpoint layout
onto them; its `only` filter skips the language model's tensors before they are read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.config import ModelConfig
from engine.layers.rotary import VisionRotary
from engine.models.ernie45_vision import Grid, Resampler, VisionTower
from engine.models.loader import load_weights

VISION_PREFIXES = ("vision_tower.", "resampler.")
"""Where the vision side lives in our module tree (and in the full VL model's)."""


class Ernie45VisionEncoder(nn.Module):
    """Patches -> language-model embeddings, as `Ernie45VLForConditionalGeneration.encode_media`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vision is None:
            raise ValueError("this checkpoint has no vision config: it is not ERNIE-4.5-VL")
        self.config = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.resampler = Resampler(cfg.vision, cfg.text)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.patch_embed.proj.weight.device

    @property
    def hidden_size(self) -> int:
        """Width of the embeddings: the language model's hidden size."""
        return self.config.text.hidden_size

    def encode_media(self, pixels: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        """Patches `[N, 3*14*14]` of one or more items -> embeddings `[M, D]`, items in order."""
        feats = self.vision_tower(pixels.to(self.dtype), grids)
        return self.resampler(feats, grids)


def load_vision_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Ernie45VisionEncoder, ModelConfig]:
    """Config + vision weights from a checkpoint directory -> an eval-mode encoder on `device`."""
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    with torch.device("meta"):
        model = Ernie45VisionEncoder(cfg)
    model = model.to_empty(device="cpu")
    for module in model.modules():
        if isinstance(module, VisionRotary):
            module.reset_tables()  # to_empty leaves buffers uninitialised
    load_weights(model, cfg, path, only=VISION_PREFIXES)
    model.to(device=device)
    for p in model.parameters():  # parameters only: the rotary table stays fp32
        p.data = p.data.to(dtype)
    return model.eval(), cfg
