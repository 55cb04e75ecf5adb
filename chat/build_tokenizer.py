"""Build the embedded model's tokenizer: a small, real SentencePiece BPE in ERNIE's layout.

    python -m chat.build_tokenizer OUT_DIR

Trains on the text shipped in chat/corpus/ (English and Chinese prose, code, numbers)
and writes the files an ERNIE-4.5-VL checkpoint ships: tokenizer.model,
tokenizer_config.json, special_tokens_map.json and added_tokens.json. The special
tokens sit at fixed low ids in ERNIE's order, so code that looks them up by name works
the same on this tokenizer and on the real 103424-token one.

Deterministic: one thread, unshuffled in-memory input, fixed seed, and nothing
path-dependent in the model proto, so two builds give identical bytes.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import sentencepiece as spm

from chat.template import ERNIE_VL_CHAT_TEMPLATE

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
VOCAB_SIZE = 3000
SEED = 20250630

# sentencepiece's own control pieces, ids 0..2 as in ERNIE.
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# ERNIE's user-defined specials in ERNIE's order (ids 3..), then a few of its extra
# reserved tokens (masks) so lookups of them behave as on the real vocabulary.
ERNIE_SPECIAL_TOKENS = (
    "<|begin_of_sentence|>",
    "<|end_of_sentence|>",
    "<|IMAGE_START|>",
    "<|IMAGE_END|>",
    "<|VIDEO_START|>",
    "<|VIDEO_END|>",
    "<|IMAGE_PLACEHOLDER|>",
    "<think>",
    "</think>",
    "<|image@placeholder|>",
    "<|video@placeholder|>",
)
EXTRA_SPECIAL_TOKENS = tuple(f"<mask:{i}>" for i in range(8))
USER_DEFINED = ERNIE_SPECIAL_TOKENS + EXTRA_SPECIAL_TOKENS
# Markers the model writes as text and the reasoning parser must see after a
# skip_special_tokens decode: added, but not special.
NON_SPECIAL = frozenset({"<think>", "</think>"})


def _corpus_lines() -> list[str]:
    files = sorted(CORPUS_DIR.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no corpus text in {CORPUS_DIR}")
    lines: list[str] = []
    for path in files:
        lines.extend(line for line in path.read_text(encoding="utf-8").splitlines() if line)
    return lines


def train_model() -> bytes:
    """Train the SentencePiece BPE model and return its serialized proto."""
    spm.set_random_generator_seed(SEED)
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()),
        model_writer=writer,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=0.9995,
        split_digits=True,  # ERNIE splits numbers into single digits
        normalization_rule_name="identity",  # decode(encode(x)) == x, code keeps its spaces
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=16384,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=list(USER_DEFINED),
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    return writer.getvalue()


def _added_tokens() -> dict[int, str]:
    return {i: tok for i, tok in enumerate((UNK, BOS, EOS, *USER_DEFINED))}


def _tokenizer_config(added: dict[int, str]) -> dict[str, Any]:
    decoder = {
        str(i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": tok not in NON_SPECIAL,
        }
        for i, tok in added.items()
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for t in USER_DEFINED if t not in NON_SPECIAL],
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": UNK,
        "unk_token": UNK,
        "cls_token": "<|begin_of_sentence|>",
        "sep_token": "<|end_of_sentence|>",
        "mask_token": "<mask:1>",
        "chat_template": ERNIE_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "legacy": True,
        "add_prefix_space": False,
        "model_max_length": 131072,
        "tokenizer_class": "LlamaTokenizer",
    }


def _special_tokens_map() -> dict[str, Any]:
    return {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": UNK,
        "unk_token": UNK,
        "cls_token": "<|begin_of_sentence|>",
        "sep_token": "<|end_of_sentence|>",
        "mask_token": "<mask:1>",
        "additional_special_tokens": [t for t in USER_DEFINED if t not in NON_SPECIAL],
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tokenizer(out_dir: Path) -> Path:
    """Write tokenizer.model and its HF-style config files into out_dir; return out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = train_model()
    proto = spm.SentencePieceProcessor(model_proto=model)
    added = _added_tokens()
    for i, tok in added.items():  # the fixed-id contract the rest of Tandem relies on
        if proto.id_to_piece(i) != tok:
            raise RuntimeError(f"trained model has {proto.id_to_piece(i)!r} at id {i}, not {tok!r}")
    (out_dir / "tokenizer.model").write_bytes(model)
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(added))
    _write_json(out_dir / "special_tokens_map.json", _special_tokens_map())
    _write_json(out_dir / "added_tokens.json", {tok: i for i, tok in added.items() if i > 2})
    return out_dir


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m chat.build_tokenizer OUT_DIR", file=sys.stderr)
        return 2
    out = build_tokenizer(Path(args[0]))
    print(f"wrote tokenizer to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
