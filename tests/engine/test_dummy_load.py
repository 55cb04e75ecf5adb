"""`load_format="dummy"`: random weights from a named config or a config-only directory."""

from __future__ import annotations

import json
import shutil

import pytest

from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.configs import NAMED_CONFIGS, named_config
from engine.llm_engine import EngineArgs, LLMEngine, RequestError
from engine.tiny import ensure_tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def test_named_configs_parse():
    for name in NAMED_CONFIGS:
        cfg = ModelConfig.from_dict(named_config(name))
        assert cfg.is_multimodal
    big = ModelConfig.from_dict(named_config("ernie-4.5-vl-28b-a3b")).text
    assert (big.num_layers, big.hidden_size, big.num_experts, big.moe_k) == (28, 2560, 64, 6)
    assert big.mrope_section == (22, 22, 20)


def test_tiny_named_config_matches_the_built_tiny_model():
    built = ModelConfig.from_dir(ensure_tiny_model())
    assert ModelConfig.from_dict(named_config("tiny-ernie-vl")) == built


def test_transformers_defaults_match_the_28b_config():
    transformers = pytest.importorskip("transformers")
    ref = ModelConfig.from_dict(transformers.Ernie4_5_VLMoeConfig().to_dict())
    assert ModelConfig.from_dict(named_config("ernie-4.5-vl-28b-a3b")) == ref


def test_named_dummy_engine_takes_token_ids_and_refuses_text():
    llm = LLM(model="tiny-ernie-vl", load_format="dummy", seed=5)
    assert llm.engine.path is None
    out = llm.generate({"prompt_token_ids": [1, 50, 60, 70]}, GREEDY)
    assert len(out[0].outputs[0].token_ids) == 4
    assert out[0].outputs[0].text == ""
    with pytest.raises(RequestError, match="token ids"):
        llm.generate("Hello", GREEDY)
    again = LLM(model="tiny-ernie-vl", load_format="dummy", seed=5)
    out2 = again.generate({"prompt_token_ids": [1, 50, 60, 70]}, GREEDY)
    assert out2[0].outputs[0].token_ids == out[0].outputs[0].token_ids  # seeded weights


def test_dummy_from_a_config_only_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(named_config("tiny-ernie-vl")))
    engine = LLMEngine(EngineArgs(model=str(tmp_path), load_format="dummy"))
    engine.add_request("a", [1, 2, 3], GREEDY)
    tokens = []
    while engine.has_unfinished_requests():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    assert len(tokens) == 4


def test_dummy_directory_with_a_tokenizer_keeps_text(tmp_path):
    shutil.copytree(ensure_tiny_model(), tmp_path / "m")
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.unlink()  # no weights needed
    llm = LLM(model=str(tmp_path / "m"), load_format="dummy")
    assert llm.generate("Hello", GREEDY)[0].outputs[0].text


def test_bad_dummy_sources_are_refused():
    with pytest.raises(ValueError, match="named config"):
        LLMEngine(EngineArgs(model="no-such-model", load_format="dummy"))
    with pytest.raises(ValueError, match="load_format"):
        EngineArgs(load_format="pt")
