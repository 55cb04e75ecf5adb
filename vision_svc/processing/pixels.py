"""Pixel math shared by images and videos: rescale, CLIP normalization, patch flattening.

The arithmetic mirrors HF's PIL backend step for step (uint8 -> float64 * 1/255 -> float32,
then (x - mean) / std in float32) so results match HF bit for bit, not just within tolerance.
"""

from __future__ import annotations

import numpy as np

from vision_svc.processing.resize import MERGE_SIZE, PATCH_SIZE

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255


def normalize(frames: np.ndarray) -> np.ndarray:
    """uint8 frames [T, H, W, 3] -> float32 CLIP-normalized frames [T, 3, H, W]."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    x = (frames.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
    mean = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32)
    std = np.asarray(OPENAI_CLIP_STD, dtype=np.float32)
    x = (x - mean) / std  # broadcast over the channel (last) axis
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def patchify(frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Flatten normalized frames [T, C, H, W] into ViT patches [T*gh*gw, C*14*14].

    Patch order (slowest first): frame t, merge-block row, merge-block column, row inside the
    2x2 block, column inside the block. Keeping the 4 patches of a 2x2 block adjacent lets the
    resampler merge them with a plain reshape. Each row is one patch flattened as (C, ph, pw).
    This is HF's image (temporal_patch_size 1) and video layout alike: for video each frame is
    its own row group; the temporal merge of 2 frames happens in the model, not here.
    """
    t, c, h, w = frames.shape
    p, m = PATCH_SIZE, MERGE_SIZE
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame {h}x{w} is not a multiple of {p * m}")
    gh, gw = h // p, w // p
    # [T, C, gh/m, m, p, gw/m, m, p]
    x = frames.reshape(t, c, gh // m, m, p, gw // m, m, p)
    # -> [T, gh/m, gw/m, m(row), m(col), C, p, p]
    x = x.transpose(0, 2, 5, 3, 6, 1, 4, 7)
    return np.ascontiguousarray(x.reshape(t * gh * gw, c * p * p)), (t, gh, gw)
