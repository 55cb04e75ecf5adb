"""Tandem's kernels for ERNIE-4.5-VL serving.

Each public function takes ``impl=None | "torch" | "triton"`` and runs its Triton kernel on
CUDA tensors, its torch reference on CPU tensors (see ``kernels._dispatch``). The references
are exported too (``*_ref``): they define the semantics and are what the engine runs on CPU.
Importing this package never imports triton.
"""

from __future__ import annotations

from kernels._dispatch import Impl, triton_available
from kernels.kv_cache import write_kv, write_kv_ref
from kernels.moe import fused_moe, fused_moe_ref, moe_align_block_size, route
from kernels.paged_attention import gather_kv, paged_attention, paged_attention_ref
from kernels.rms_norm import rms_norm, rms_norm_ref
from kernels.rotary import (
    build_cos_sin_cache,
    mrope_pair_axes,
    rope_cos_sin,
    rope_inv_freq,
    rotary_embedding,
    rotary_embedding_ref,
)

__all__ = [
    "Impl",
    "build_cos_sin_cache",
    "fused_moe",
    "fused_moe_ref",
    "gather_kv",
    "moe_align_block_size",
    "mrope_pair_axes",
    "paged_attention",
    "paged_attention_ref",
    "rms_norm",
    "rms_norm_ref",
    "rope_cos_sin",
    "rope_inv_freq",
    "rotary_embedding",
    "rotary_embedding_ref",
    "route",
    "triton_available",
    "write_kv",
    "write_kv_ref",
]
