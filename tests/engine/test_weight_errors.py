"""A checkpoint that does not fit its config fails with an error naming the tensor."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from engine.config import ConfigError, ModelConfig
from engine.models import WeightLoadError, load_model
from tests.engine.hf_models import make_text, make_vl


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vl")
    make_vl(path, "gqa2")
    return path


def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(vl_dir, tmp_path):
    name = "model.layers.2.self_attn.o_proj.weight"
    bad = _rewrite(vl_dir, tmp_path / "bad", lambda sd: sd.pop(name))
    with pytest.raises(WeightLoadError, match=r"layers\.2\.self_attn\.o_proj\.weight"):
        load_model(bad)


def test_missing_expert_is_named(vl_dir, tmp_path):
    bad = _rewrite(
        vl_dir, tmp_path / "bad", lambda sd: sd.pop("model.layers.1.mlp.experts.6.up_proj.weight")
    )
    with pytest.raises(WeightLoadError, match=r"vision_moe\.experts expert 2"):
        load_model(bad)


def test_misshaped_tensor_names_tensor_and_shapes(vl_dir, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"

    def edit(sd):
        sd[name] = sd[name][:, :-1].contiguous()

    bad = _rewrite(vl_dir, tmp_path / "bad", edit)
    with pytest.raises(WeightLoadError, match=r"mlp\.down_proj\.weight.*\(64, 71\).*\(64, 72\)"):
        load_model(bad)


def test_config_with_fewer_layers_rejects_extra_tensor(tmp_path):
    make_text(tmp_path / "m", moe=False)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match=r"layers\.2\."):
        load_model(tmp_path / "m")


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(ConfigError, match=r"not an ERNIE-4\.5 config"):
        ModelConfig.from_dir(tmp_path)
