from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import sentencepiece as spm

from chat.build_tokenizer import (
    ERNIE_SPECIAL_TOKENS,
    VOCAB_SIZE,
    build_tokenizer,
    main,
)

FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
REPO = Path(__file__).resolve().parents[2]


def test_build_is_deterministic_and_fast(tmp_path: Path, tokenizer_dir: Path) -> None:
    start = time.perf_counter()
    second = build_tokenizer(tmp_path / "again")
    assert time.perf_counter() - start < 10.0
    for name in FILES:
        assert (second / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


def test_special_tokens_sit_at_ernie_ids(tokenizer_dir: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    assert sp.get_piece_size() == VOCAB_SIZE
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [sp.id_to_piece(3 + i) for i in range(len(ERNIE_SPECIAL_TOKENS))] == list(
        ERNIE_SPECIAL_TOKENS
    )
    assert (
        sp.id_to_piece(3) == "<|begin_of_sentence|>"
        and sp.id_to_piece(9) == "<|IMAGE_PLACEHOLDER|>"
    )
    # byte fallback: any byte is representable
    assert sp.piece_to_id("<0xF0>") != sp.unk_id()


def test_config_files_describe_the_model(tokenizer_dir: Path) -> None:
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    assert decoder["0"]["content"] == "<unk>" and decoder["2"]["content"] == "</s>"
    assert decoder["11"] == {
        "content": "</think>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": False,
    }
    assert decoder["9"]["special"] is True
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>"
    assert "<|image@placeholder|>" in config["chat_template"]
    added = json.loads((tokenizer_dir / "added_tokens.json").read_text())
    assert added["<|IMAGE_START|>"] == 5 and "<s>" not in added
    specials = json.loads((tokenizer_dir / "special_tokens_map.json").read_text())
    assert specials["unk_token"] == "<unk>"


def test_model_covers_the_corpus_languages(tokenizer_dir: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    assert "今天" in pieces  # Chinese merges, not only characters
    assert any(p.startswith("\u2581") and len(p) > 3 for p in pieces)  # English words
    assert len(sp.encode("The cache processed 6,246 tokens.")) < 25


def test_cli_writes_a_directory(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "chat.build_tokenizer", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert all((out / name).is_file() for name in FILES)


def test_cli_usage_error(capsys) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
