"""Model configuration: one typed view over the HF and the Paddle spellings of config.json.

ERNIE checkpoints exist in several spellings of the same facts: transformers' nested
`text_config` / `vision_config` (model_type `ernie4_5_vl_moe`), the flat Paddle / remote-code
form (`moe_num_experts: [64, 64]`, `freq_allocation`, `im_patch_id`, `pixel_hidden_size`, ...),
and the text-only `ernie4_5` / `ernie4_5_moe` configs. Everything downstream reads only the
frozen dataclasses below, so no other module ever looks at a raw config key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """config.json is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class VisionConfig:
    """The ViT + resampler of ERNIE-4.5-VL."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    patch_size: int = 14
    in_channels: int = 3
    spatial_merge_size: int = 2
    temporal_merge_size: int = 2
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        _require(self.hidden_size % self.num_heads == 0, "vision hidden_size % num_heads != 0")
        _require((self.hidden_size // self.num_heads) % 4 == 0, "vision head_dim must be % 4")
        _require(self.temporal_merge_size == 2, "only temporal_merge_size 2 is supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class TextConfig:
    """The language model: dense ERNIE-4.5, ERNIE-4.5 MoE, or the VL model's MoE."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    use_bias: bool = False
    # "dense" or "sparse" for each layer.
    mlp_layer_types: tuple[str, ...] = ()
    num_experts: int = 0
    """Routed experts of the text group (the only group in text-only MoE models)."""
    num_vision_experts: int = 0
    """Routed experts of the vision group (VL only; 0 means no vision group)."""
    moe_k: int = 0
    moe_intermediate_size: int = 0
    vision_moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    moe_norm_min: float = 1e-12
    # (h, w, t) frequency pairs for 3-D rotary; None means plain 1-D rotary.
    mrope_section: tuple[int, int, int] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        _require(self.num_heads % self.num_kv_heads == 0, "num_attention_heads % kv heads != 0")
        _require(self.head_dim % 2 == 0, "head_dim must be even")
        _require(len(self.mlp_layer_types) == self.num_layers, "mlp_layer_types length")
        if "sparse" in self.mlp_layer_types:
            _require(self.num_experts > 0 and 0 < self.moe_k <= self.num_experts, "moe_k")
        if self.mrope_section is not None:
            h, w, t = self.mrope_section
            _require(h == w, "mrope_section: h and w sections must be equal")
            _require(h + w + t == self.head_dim // 2, "mrope_section must sum to head_dim / 2")


@dataclass(frozen=True)
class ModelConfig:
    """Everything about the model a serving process needs."""

    architecture: str  # "ernie4_5_vl", "ernie4_5_moe" or "ernie4_5"
    text: TextConfig
    vision: VisionConfig | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None
    video_start_token_id: int | None = None
    video_end_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        file = Path(path) / "config.json"
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{file} not found") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        try:
            return _parse(data)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"config.json lacks or mistypes a field: {e}") from e


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ConfigError(f"invalid model config: {what}")


def _architecture(data: dict[str, Any]) -> str:
    model_type = str(data.get("model_type", ""))
    archs = " ".join(data.get("architectures") or [])
    if "vision_config" in data or "vl" in model_type.lower() or "VL" in archs:
        return "ernie4_5_vl"
    if "moe" in model_type.lower() or "Moe" in archs:
        return "ernie4_5_moe"
    if model_type.startswith("ernie4_5") or "Ernie4_5" in archs:
        return "ernie4_5"
    raise ConfigError(
        f"not an ERNIE-4.5 config (model_type={model_type!r}, architectures={archs!r})"
    )


def _parse(data: dict[str, Any]) -> ModelConfig:
    arch = _architecture(data)
    if arch != "ernie4_5_vl":
        return ModelConfig(architecture=arch, text=_text_config(data, arch, data), raw=data)
    # HF nests the language model under text_config; Paddle keeps it flat at the top.
    text_dict = data.get("text_config") or data
    text = _text_config(text_dict, arch, data)
    vision = _vision_config(data["vision_config"], data)
    ids = _media_token_ids(data)
    return ModelConfig(architecture=arch, text=text, vision=vision, raw=data, **ids)


def _first(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def _pair(value: Any) -> tuple[Any, Any]:
    """Paddle writes per-group MoE settings as [text, vision] lists; HF as scalars or lists."""
    if isinstance(value, (list, tuple)):
        return (value[0], value[1] if len(value) > 1 else value[0])
    return (value, value)


def _text_config(d: dict[str, Any], arch: str, top: dict[str, Any]) -> TextConfig:
    hidden = int(d["hidden_size"])
    heads = int(d["num_attention_heads"])
    head_dim = int(_first(d, "head_dim", default=hidden // heads))
    layers = int(d["num_hidden_layers"])
    rope = d.get("rope_parameters") or {}
    theta = float(_first(rope, "rope_theta", default=_first(d, "rope_theta", default=500000.0)))
    num_experts, num_vision_experts = _pair(_first(d, "moe_num_experts", "num_experts", default=0))
    inter_text, inter_vision = _pair(_first(d, "moe_intermediate_size", default=0))
    moe_k = int(_first(d, "moe_k", "num_experts_per_tok", default=0))
    if arch == "ernie4_5":
        num_experts = num_vision_experts = 0
    elif arch == "ernie4_5_moe":
        num_vision_experts = 0
    mrope = _mrope_section(d, rope, head_dim) if arch == "ernie4_5_vl" else None
    eos = _first(d, "eos_token_id", default=_first(top, "eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return TextConfig(
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(_first(d, "num_key_value_heads", default=heads)),
        head_dim=head_dim,
        rms_norm_eps=float(_first(d, "rms_norm_eps", default=1e-5)),
        rope_theta=theta,
        max_position_embeddings=int(_first(d, "max_position_embeddings", default=131072)),
        tie_word_embeddings=bool(
            _first(d, "tie_word_embeddings", default=top.get("tie_word_embeddings", True))
        ),
        use_bias=bool(_first(d, "use_bias", default=False)),
        mlp_layer_types=_mlp_layer_types(d, arch, layers, int(num_experts or 0)),
        num_experts=int(num_experts or 0),
        num_vision_experts=int(num_vision_experts or 0),
        moe_k=moe_k if num_experts else 0,
        moe_intermediate_size=int(inter_text or 0),
        vision_moe_intermediate_size=int(inter_vision or 0),
        num_shared_experts=int(_first(d, "moe_num_shared_experts", default=0) or 0),
        moe_norm_min=float(_first(d, "moe_norm_min", default=1e-12)),
        mrope_section=mrope,
        bos_token_id=_first(d, "bos_token_id", default=top.get("bos_token_id")),
        eos_token_ids=eos_ids,
        pad_token_id=_first(d, "pad_token_id", default=top.get("pad_token_id")),
    )


def _mrope_section(d: dict[str, Any], rope: dict[str, Any], head_dim: int) -> tuple[int, int, int]:
    section = rope.get("mrope_section")
    if section is not None:
        return (int(section[0]), int(section[1]), int(section[2]))
    # Paddle: `freq_allocation` frequency pairs go to time, the rest split evenly over h and w.
    t = int(_first(d, "freq_allocation", default=20))
    hw = head_dim // 2 - t
    return (hw // 2, hw - hw // 2, t)


def _mlp_layer_types(d: dict[str, Any], arch: str, layers: int, experts: int) -> tuple[str, ...]:
    if d.get("mlp_layer_types"):
        return tuple(str(t) for t in d["mlp_layer_types"])
    if arch == "ernie4_5" or experts == 0:
        return ("dense",) * layers
    start = _pair(_first(d, "moe_layer_start_index", default=1))[0]
    end = _pair(_first(d, "moe_layer_end_index", default=-1))[0]
    end = layers - 1 if end in (-1, None) else int(end)
    interval = int(_first(d, "moe_layer_interval", default=1))
    return tuple(
        "sparse" if (i + 1) % interval == 0 and start <= i <= end else "dense"
        for i in range(layers)
    )


def _vision_config(v: dict[str, Any], top: dict[str, Any]) -> VisionConfig:
    hidden = int(_first(v, "hidden_size", "embed_dim"))
    mlp_ratio = _first(v, "mlp_ratio")
    inter = _first(v, "intermediate_size", default=int(hidden * (mlp_ratio or 4)))
    rope = v.get("rope_parameters") or {}
    return VisionConfig(
        depth=int(v["depth"]),
        hidden_size=hidden,
        num_heads=int(_first(v, "num_heads", "num_attention_heads")),
        intermediate_size=int(inter),
        hidden_act=str(_first(v, "hidden_act", default="quick_gelu")),
        patch_size=int(_first(v, "patch_size", "spatial_patch_size", default=14)),
        in_channels=int(_first(v, "in_channels", "in_chans", default=3)),
        spatial_merge_size=int(
            _first(v, "spatial_merge_size", default=_first(top, "spatial_conv_size", default=2))
        ),
        temporal_merge_size=int(
            _first(v, "temporal_merge_size", default=_first(top, "temporal_conv_size", default=2))
        ),
        layer_norm_eps=float(_first(v, "rms_norm_eps", "layer_norm_eps", default=1e-6)),
        rope_theta=float(_first(rope, "rope_theta", default=10000.0)),
    )


def _media_token_ids(d: dict[str, Any]) -> dict[str, int | None]:
    image = _first(d, "image_token_id", "im_patch_id")
    return {
        "image_token_id": image,
        # Paddle checkpoints put video patches behind the image placeholder id too.
        "video_token_id": _first(d, "video_token_id", default=image),
        "image_start_token_id": _first(d, "image_start_token_id"),
        "image_end_token_id": _first(d, "image_end_token_id"),
        "video_start_token_id": _first(d, "video_start_token_id"),
        "video_end_token_id": _first(d, "video_end_token_id"),
    }
