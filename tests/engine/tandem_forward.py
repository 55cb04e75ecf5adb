"""Run a Tandem model over one prompt in one prefill step and return every row's logits."""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.model_runner import ModelRunner, StepSequence
from engine.multimodal import MediaInput, prepare_prompt
from tests.engine.hf_models import Prompt


def media_inputs(p: Prompt) -> list[MediaInput]:
    items, offsets = [], {"image": 0, "video": 0}
    grids = {"image": iter(p.images), "video": iter(p.videos)}
    for kind in p.order:
        t, h, w = grid = next(grids[kind])
        n = t * h * w
        pixels = p.pixels[kind][offsets[kind] : offsets[kind] + n]
        offsets[kind] += n
        items.append(MediaInput(kind, pixels, grid))
    return items


def tandem_logits(model: torch.nn.Module, cfg: ModelConfig, p: Prompt, block_size: int = 4):
    prepared = prepare_prompt(model, cfg, p.ids, media_inputs(p))
    n = len(p.ids)
    blocks = -(-n // block_size)
    runner = ModelRunner(model, cfg, blocks + 1, block_size, torch.float32, torch.device("cpu"))
    seq = StepSequence(
        token_ids=p.ids,
        positions=prepared.positions,
        num_computed=0,
        block_ids=list(range(1, blocks + 1)),
        media=prepared.media,
        vision_rows=prepared.vision_rows,
        logits="all",
    )
    return runner.run([seq])[0]
