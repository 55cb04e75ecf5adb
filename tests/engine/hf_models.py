"""Tiny random ERNIE checkpoints written by transformers (the independent reference), and
the same checkpoints rewritten in the Paddle layout, for parity tests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 320
IMAGE, IMG_START, IMG_END, VID_START, VID_END, VIDEO = 300, 301, 302, 303, 304, 305

VL_VARIANTS = {
    # name: (hidden, heads, kv, head_dim, mrope, experts, k, moe_inter, shared, vision, tie, bias)
    "gqa2": dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope=[3, 3, 2],
        experts=4,
        k=2,
        moe_inter=[32, 16],
        shared=1,
        vision=(32, 2, 64),
        tie=True,
        bias=False,
        layers=["dense", "sparse", "sparse"],
    ),
    "odd_heads_mqa": dict(
        hidden_size=40,
        num_attention_heads=5,
        num_key_value_heads=1,
        mrope=[1, 1, 2],
        experts=6,
        k=3,
        moe_inter=[24, 40],
        shared=2,
        vision=(48, 3, 96),
        tie=False,
        bias=False,
        layers=["dense", "sparse", "dense", "sparse"],
    ),
    "gqa3_bias": dict(
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        mrope=[1, 1, 2],
        experts=5,
        k=2,
        moe_inter=[20, 28],
        shared=0,
        vision=(32, 2, 48),
        tie=True,
        bias=True,
        layers=["sparse", "dense", "sparse"],
    ),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that a wrong routing or rotary shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(
                (
                    "norm.weight",
                    "layernorm.weight",
                    "norm1.weight",
                    "norm2.weight",
                    "ln.weight",
                    "after_norm.weight",
                )
            ):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "e_score_correction_bias" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def make_vl(path: Path, variant: str, seed: int = 0) -> torch.nn.Module:
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    v = VL_VARIANTS[variant]
    vh, vheads, vinter = v["vision"]
    head_dim = v["hidden_size"] // v["num_attention_heads"]
    text = dict(
        vocab_size=VOCAB,
        hidden_size=v["hidden_size"],
        intermediate_size=72,
        num_hidden_layers=len(v["layers"]),
        num_attention_heads=v["num_attention_heads"],
        num_key_value_heads=v["num_key_value_heads"],
        use_bias=v["bias"],
        moe_num_experts=v["experts"],
        moe_k=v["k"],
        moe_intermediate_size=v["moe_inter"],
        moe_num_shared_experts=v["shared"],
        mlp_layer_types=v["layers"],
        tie_word_embeddings=v["tie"],
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": v["mrope"],
        },
    )
    assert sum(v["mrope"]) == head_dim // 2
    vision = dict(depth=2, hidden_size=vh, num_heads=vheads, intermediate_size=vinter)
    cfg = Ernie4_5_VLMoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        image_start_token_id=IMG_START,
        image_end_token_id=IMG_END,
        video_token_id=VIDEO,
        video_start_token_id=VID_START,
        video_end_token_id=VID_END,
        tie_word_embeddings=v["tie"],
    )
    torch.manual_seed(seed)
    model = Ernie4_5_VLMoeForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    return model


def make_text(path: Path, moe: bool, seed: int = 0) -> torch.nn.Module:
    from transformers import (
        Ernie4_5_MoeConfig,
        Ernie4_5_MoeForCausalLM,
        Ernie4_5Config,
        Ernie4_5ForCausalLM,
    )

    common = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=not moe,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    if moe:
        cfg = Ernie4_5_MoeConfig(
            **common,
            moe_num_experts=5,
            moe_k=2,
            moe_intermediate_size=24,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            moe_layer_interval=1,
        )
        model = Ernie4_5_MoeForCausalLM(cfg)
    else:
        model = Ernie4_5ForCausalLM(Ernie4_5Config(**common, use_bias=True))
    model.eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    return model


@dataclass
class Prompt:
    """Token ids with media, in the shape HF's model takes them."""

    ids: list[int]
    images: list[tuple[int, int, int]] = field(default_factory=list)
    videos: list[tuple[int, int, int]] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # kinds in prompt order
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)


def build_prompt(kinds: list[tuple[str, tuple[int, int, int]]], seed: int = 0) -> Prompt:
    """Text, then each item wrapped in its start/end markers with text between."""
    g = torch.Generator().manual_seed(seed)

    def words(n: int) -> list[int]:
        return torch.randint(3, 290, (n,), generator=g).tolist()

    p = Prompt(ids=words(5))
    pix: dict[str, list[torch.Tensor]] = {"image": [], "video": []}
    for kind, grid in kinds:
        t, h, w = grid
        if kind == "image":
            n = h * w // 4
            p.ids += [IMG_START] + [IMAGE] * n + [IMG_END]
            p.images.append(grid)
        else:
            n = t * h * w // 8
            p.ids += [VID_START] + [VIDEO] * n + [VID_END]
            p.videos.append(grid)
        p.order.append(kind)
        pix[kind].append(torch.randn(t * h * w, 588, generator=g))
        p.ids += words(3)
    p.pixels = {k: torch.cat(v) for k, v in pix.items() if v}
    return p


def hf_logits(model: torch.nn.Module, p: Prompt) -> torch.Tensor:
    ids = torch.tensor([p.ids])
    kw: dict = {}
    if p.images or p.videos:
        mm = torch.zeros_like(ids)
        mm[ids == IMAGE] = 1
        mm[ids == VIDEO] = 2
        moe = mm.clone()
        moe[(ids == IMG_START) | (ids == IMG_END)] = 1
        moe[(ids == VID_START) | (ids == VID_END)] = 2
        kw.update(mm_token_type_ids=mm, moe_mm_token_type_ids=moe)
    if p.images:
        kw.update(pixel_values=p.pixels["image"], image_grid_thw=torch.tensor(p.images))
    if p.videos:
        kw.update(pixel_values_videos=p.pixels["video"], video_grid_thw=torch.tensor(p.videos))
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits[0].float()


# ---------------------------------------------------------------- Paddle layout writer


def write_paddle_layout(hf_dir: Path, out: Path) -> None:
    """Rewrite a checkpoint saved by transformers (which writes the legacy `-PT` names) the
    way ERNIE's Paddle checkpoints store it: `ernie.` prefix, 2-D weights `[in, out]`, fused
    `qkv_proj` and `up_gate_proj`."""
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = load_file(str(hf_dir / "model.safetensors"))
    vl = "text_config" in cfg
    out_sd: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor, transpose: bool = True) -> None:
        if transpose and t.dim() == 2 and name.endswith(".weight") and "embed_tokens" not in name:
            t = t.t()
        out_sd[name] = t.contiguous()

    for name, t in sd.items():
        n = "ernie." + name[len("model.") :] if name.startswith("model.") else name
        if ".self_attn.q_proj." in n:
            parts = [sd[name.replace("q_proj", x)] for x in ("q_proj", "k_proj", "v_proj")]
            put(n.replace("q_proj", "qkv_proj"), torch.cat(parts))
        elif ".self_attn.k_proj." in n or ".self_attn.v_proj." in n or ".up_proj." in n:
            continue  # fused with q / gate
        elif ".gate_proj." in n:
            put(
                n.replace("gate_proj", "up_gate_proj"),
                torch.cat([t, sd[name.replace("gate_proj", "up_proj")]]),
            )
        elif vl and ".mlp.gate.weight" in n:
            put(n, t, transpose=False)  # the VL routers are already [D, E] in the -PT layout
        else:
            put(n, t)
    out.mkdir(parents=True, exist_ok=True)
    save_file(out_sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(paddle_config(cfg), indent=2))


def write_hf_native_layout(model: torch.nn.Module, hf_dir: Path, out: Path) -> None:
    """The module names transformers uses in memory (stacked experts, `text_moe`, ...)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(hf_dir / "config.json", out / "config.json")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(out / "model.safetensors"))


def paddle_config(cfg: dict) -> dict:
    """The flat Paddle spelling of a transformers config."""
    if "text_config" not in cfg:
        out = {k: v for k, v in cfg.items() if k != "rope_parameters"}
        out["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
        out["architectures"] = [
            a.replace("Ernie4_5For", "Ernie4_5_For") for a in cfg["architectures"]
        ]
        return out
    t, v = cfg["text_config"], cfg["vision_config"]
    experts = t["moe_num_experts"]
    return {
        "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"],
        "model_type": "ernie4_5_moe_vl",
        "hidden_size": t["hidden_size"],
        "intermediate_size": t["intermediate_size"],
        "num_hidden_layers": t["num_hidden_layers"],
        "num_attention_heads": t["num_attention_heads"],
        "num_key_value_heads": t["num_key_value_heads"],
        "vocab_size": t["vocab_size"],
        "rms_norm_eps": t["rms_norm_eps"],
        "rope_theta": t["rope_parameters"]["rope_theta"],
        "freq_allocation": t["rope_parameters"]["mrope_section"][2],
        "use_bias": t["use_bias"],
        "tie_word_embeddings": cfg["tie_word_embeddings"],
        "moe_num_experts": [experts, experts],
        "moe_k": t["moe_k"],
        "moe_intermediate_size": t["moe_intermediate_size"],
        "moe_num_shared_experts": t["moe_num_shared_experts"],
        **_paddle_layer_types(t["mlp_layer_types"]),
        "im_patch_id": cfg["image_token_id"],
        "video_token_id": cfg["video_token_id"],
        "image_start_token_id": cfg["image_start_token_id"],
        "image_end_token_id": cfg["image_end_token_id"],
        "video_start_token_id": cfg["video_start_token_id"],
        "video_end_token_id": cfg["video_end_token_id"],
        "spatial_conv_size": v["spatial_merge_size"],
        "temporal_conv_size": v["temporal_merge_size"],
        "pixel_hidden_size": v["hidden_size"],
        "vision_config": {
            "depth": v["depth"],
            "embed_dim": v["hidden_size"],
            "hidden_size": v["hidden_size"],
            "num_heads": v["num_heads"],
            "mlp_ratio": v["intermediate_size"] / v["hidden_size"],
            "hidden_act": v["hidden_act"],
            "patch_size": v["patch_size"],
            "in_chans": v["in_channels"],
            "spatial_merge_size": v["spatial_merge_size"],
        },
    }


def _paddle_layer_types(types: list[str]) -> dict:
    """Paddle says which layers are MoE by a start index; fall back to the explicit list."""
    if types[0] == "dense" and all(t == "sparse" for t in types[1:]):
        return {"moe_layer_start_index": 1, "moe_layer_end_index": len(types) - 1}
    return {"mlp_layer_types": types}
