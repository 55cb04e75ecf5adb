"""Named model configs: real shapes without a checkpoint, for the `dummy` load format.

`EngineArgs(model=NAME, load_format="dummy")` builds the model of one of these configs with
random weights (`engine.models.build_random_model`) and no tokenizer, so benchmarks can run
at real shapes on a machine that holds no weights (and has no transformers installed).
The dicts are config.json contents in transformers' nested `ernie4_5_vl_moe` spelling.
"""

from __future__ import annotations

import copy
from typing import Any

ERNIE_45_VL_28B_A3B: dict[str, Any] = {
    # transformers' `Ernie4_5_VLMoeConfig().to_dict()` (5.23), bookkeeping keys left out.
    "model_type": "ernie4_5_vl_moe",
    "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"],
    "text_config": {
        "model_type": "ernie4_5_vl_moe_text",
        "vocab_size": 103424,
        "hidden_size": 2560,
        "intermediate_size": 12288,
        "num_hidden_layers": 28,
        "num_attention_heads": 20,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "use_bias": False,
        "moe_intermediate_size": [1536, 512],
        "moe_k": 6,
        "moe_num_experts": 64,
        "moe_num_shared_experts": 2,
        "moe_norm_min": 1e-12,
        "mlp_layer_types": ["dense"] + ["sparse"] * 27,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    },
    "vision_config": {
        "model_type": "ernie4_5_vl_moe_vision",
        "depth": 32,
        "hidden_size": 1280,
        "hidden_act": "quick_gelu",
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_merge_size": 2,
        "intermediate_size": 5120,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"},
    },
    "image_start_token_id": 101304,
    "image_end_token_id": 101305,
    "image_token_id": 100295,
    "video_start_token_id": 101306,
    "video_end_token_id": 101307,
    "video_token_id": 103367,
    "tie_word_embeddings": True,
}

TINY_ERNIE_VL: dict[str, Any] = {
    # engine/tiny.py's config with the ids its tokenizer gives (tests check they agree).
    "model_type": "ernie4_5_vl_moe",
    "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"],
    "text_config": {
        "vocab_size": 3000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "use_bias": False,
        "moe_num_experts": 4,
        "moe_k": 2,
        "moe_intermediate_size": [64, 32],
        "moe_num_shared_experts": 1,
        "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
        "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 500000.0,
            "mrope_section": [3, 3, 2],
        },
        "bos_token_id": 1,
        "eos_token_id": [2, 4],
        "pad_token_id": 0,
    },
    "vision_config": {"depth": 2, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128},
    "image_token_id": 9,
    "video_token_id": 9,
    "image_start_token_id": 5,
    "image_end_token_id": 6,
    "video_start_token_id": 7,
    "video_end_token_id": 8,
    "tie_word_embeddings": True,
}

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "ernie-4.5-vl-28b-a3b": ERNIE_45_VL_28B_A3B,
    "tiny-ernie-vl": TINY_ERNIE_VL,
}


def named_config(name: str) -> dict[str, Any] | None:
    """A copy of the config called `name` (case-insensitive), or None if none is."""
    found = NAMED_CONFIGS.get(name.lower())
    return None if found is None else copy.deepcopy(found)
