"""Shared fixtures for chat/ tests: one embedded tokenizer built per session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chat.build_tokenizer import build_tokenizer
from chat.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("ernie_tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture
def tokenizer_variant(tokenizer_dir: Path, tmp_path: Path):
    """Factory: a copy of the tokenizer dir with more added tokens and config keys.

    Added ids may exceed the SentencePiece vocabulary, as on real ERNIE checkpoints.
    """

    def make(extra: dict[int, dict], name: str = "variant", **config_keys: object) -> Path:
        dst = tmp_path / name
        shutil.copytree(tokenizer_dir, dst)
        config = json.loads((dst / "tokenizer_config.json").read_text())
        for token_id, entry in extra.items():
            config["added_tokens_decoder"][str(token_id)] = {
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
                **entry,
            }
        config.update(config_keys)
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
        return dst

    return make
