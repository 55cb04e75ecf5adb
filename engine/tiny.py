"""`tiny-ernie-vl`: the embedded default model.

A real ERNIE-4.5-VL architecture (vision tower, resampler, text and vision experts, 3-D
rotary) at toy size, with deterministic random weights and a real SentencePiece tokenizer
trained from text the repo ships. It is created on first use into the cache directory,
written by transformers in the published `-PT` layout so it loads through the same path as
a real checkpoint, and answers on a 2-core CPU in a fraction of a second. Its answers are
fluent nonsense: it exists to run the whole serving stack without downloading anything.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_NAME = "tiny-ernie-vl"
VERSION = 1
SEED = 20251125


def cache_root() -> Path:
    return Path(os.environ.get("TANDEM_CACHE_DIR", Path.home() / ".cache" / "tandem"))


def ensure_tiny_model(root: Path | None = None) -> Path:
    """The tiny model's directory, creating it once (safe across concurrent processes)."""
    root = root or cache_root()
    target = root / f"{TINY_MODEL_NAME}-v{VERSION}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{TINY_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tiny-"))
            try:
                _build(tmp)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_config(tok_ids: dict[str, int], vocab_size: int) -> dict:
    image = tok_ids["<|IMAGE_PLACEHOLDER|>"]
    return {
        "text_config": {
            "vocab_size": vocab_size,
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
            "bos_token_id": tok_ids["<s>"],
            "eos_token_id": [tok_ids["</s>"], tok_ids["<|end_of_sentence|>"]],
            "pad_token_id": tok_ids["<unk>"],
        },
        "vision_config": {"depth": 2, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128},
        "image_token_id": image,
        "video_token_id": image,  # ERNIE's own checkpoints put video patches behind it too
        "image_start_token_id": tok_ids["<|IMAGE_START|>"],
        "image_end_token_id": tok_ids["<|IMAGE_END|>"],
        "video_start_token_id": tok_ids["<|VIDEO_START|>"],
        "video_end_token_id": tok_ids["<|VIDEO_END|>"],
        "tie_word_embeddings": True,
    }


def _build(out: Path) -> None:
    import torch
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    from chat.build_tokenizer import build_tokenizer
    from chat.tokenizer import Tokenizer

    build_tokenizer(out)
    tok = Tokenizer.from_dir(out)
    names = [
        "<unk>",
        "<s>",
        "</s>",
        "<|end_of_sentence|>",
        "<|IMAGE_PLACEHOLDER|>",
        "<|IMAGE_START|>",
        "<|IMAGE_END|>",
        "<|VIDEO_START|>",
        "<|VIDEO_END|>",
    ]
    ids = {n: tok.token_to_id(n) for n in names}
    missing = [n for n, i in ids.items() if i is None]
    if missing:
        raise RuntimeError(f"the built tokenizer lacks {missing}")
    cfg = Ernie4_5_VLMoeConfig(**tiny_config(ids, tok.vocab_size))  # type: ignore[arg-type]
    torch.manual_seed(SEED)
    model = Ernie4_5_VLMoeForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln.weight")):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    (out / "tandem_model.json").write_text(
        json.dumps({"name": TINY_MODEL_NAME, "version": VERSION})
    )
