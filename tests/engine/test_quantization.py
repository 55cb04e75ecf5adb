"""Weight-only quantization (wint8, wint4): packing, error bounds, scope, model accuracy, memory.

Bounds are derived, not tuned: round-to-nearest puts every weight within half its scale
`s` of its dequantized value, so a linear's output moves by at most
`sum_g s[j, g] / 2 * sum_{i in g} |x_i|` (plus fp32 rounding of the two GEMMs).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from engine.layers.linear import Linear, MergedLinear
from engine.layers.moe import Experts, Router
from engine.llm_engine import EngineArgs, LLMEngine
from engine.models import language_layers, load_model
from engine.quantization import (
    QuantConfig,
    QuantizedExperts,
    QuantizedLinear,
    dequantize,
    pack_int4,
    quantize,
    quantize_model,
    unpack_int4,
)
from engine.quantization.memory import memory_table, weight_bytes
from engine.sampling_params import SamplingParams
from engine.tiny import ensure_tiny_model
from kernels.moe import fused_moe
from tests.engine.hf_models import build_prompt, make_vl
from tests.engine.tandem_forward import media_inputs, tandem_logits

METHODS = ["wint8", "wint4"]
U32 = torch.finfo(torch.float32).eps / 2  # fp32 unit roundoff


def test_int4_pack_unpack_round_trips_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (3, 5, 64), generator=g, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 32)
    assert torch.equal(unpack_int4(packed), q)
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    # byte j: feature 2j in the low nibble, 2j + 1 in the high one, each stored as q + 8
    assert pack_int4(torch.tensor([-8, 7], dtype=torch.int8)).item() == 0xF0


def _step(scale: torch.Tensor, k: int) -> torch.Tensor:
    """Per-weight step `[..., N, K]` from scales `[..., N, G]`."""
    return scale.float().repeat_interleave(k // scale.shape[-1], dim=-1)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_every_weight_within_half_a_step(method: str, scale_dtype: torch.dtype) -> None:
    w = torch.randn(4, 48, 256, generator=torch.Generator().manual_seed(1))
    w[0, 3] = 0.0  # an all-zero row must not divide by zero
    qweight, scale = quantize(w, QuantConfig(method), scale_dtype)
    assert scale.shape == (4, 48, 1 if method == "wint8" else 2)
    assert scale.dtype == scale_dtype
    err = (dequantize(qweight, scale, torch.float32) - w).abs()
    # q * s is exact to within one fp32 rounding of a weight
    assert (err <= _step(scale, 256) / 2 + U32 * w.abs()).all()
    assert err.max() > 0 and (dequantize(qweight, scale, torch.float32)[0, 3] == 0).all()


def _linear_bound(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`[T, N]` bound on |x @ (w - w_q).T| plus the fp32 error of two length-K dot products."""
    k = w.shape[-1]
    quant = x.abs() @ (_step(scale, k) / 2).T
    gemm = 2 * k * U32 / (1 - k * U32) * (x.abs() @ w.abs().T)
    return quant + gemm


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["linear", "merged_bias", "short_row"])
def test_quantized_linear_within_derived_bound(method: str, kind: str) -> None:
    torch.manual_seed(2)
    if kind == "linear":
        layer: Linear | MergedLinear = Linear(512, 96, bias=False)
    elif kind == "merged_bias":
        layer = MergedLinear(256, [64, 32, 32], bias=True)
    else:
        layer = Linear(40, 24, bias=False)  # shorter than a group: one group per row
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
    q = QuantizedLinear.from_linear(layer, QuantConfig(method), None)
    assert q.out_sizes == (layer.out_sizes if kind == "merged_bias" else [layer.out_features])
    x = torch.randn(7, layer.in_features)
    with torch.no_grad():
        err = (q(x) - layer(x)).abs()
    bound = _linear_bound(x, layer.weight.detach(), q.scale)
    assert (err <= bound).all(), (err / bound).max()
    assert err.max() > 0.05 * bound.max()  # the bound is not vacuous


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tokens", [1, 16], ids=["pairs_lt_experts", "all_experts"])
def test_quantized_experts_are_the_float_path_on_dequantized_weights(
    method: str, tokens: int
) -> None:
    """The expert forward adds no error beyond the weights': it is `fused_moe` on the
    dequantized weights, whether it dequantizes per (token, slot) or all experts."""
    torch.manual_seed(3)
    e, d, inter, k = 8, 256, 128, 2
    experts = Experts(e, d, inter)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.05)
        experts.down_proj.normal_(0, 0.05)
    q = QuantizedExperts.from_experts(experts, QuantConfig(method), None)
    x = torch.randn(tokens, d)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)]).to(torch.int32)
    weights = torch.softmax(torch.randn(tokens, k), -1)
    add = torch.randn(tokens, d)
    w13 = dequantize(q.gate_up_qweight, q.gate_up_scale, torch.float32)
    w2 = dequantize(q.down_qweight, q.down_scale, torch.float32)
    # down_proj alone is linear: its own quantization error obeys the linear bound
    h = torch.randn(5, inter)
    err = (h @ w2[0].T - h @ experts.down_proj[0].detach().T).abs()
    assert (err <= _linear_bound(h, experts.down_proj[0].detach(), q.down_scale[0])).all()
    want = fused_moe(x, w13, w2, weights, ids, add=add)
    torch.testing.assert_close(q(x, weights, ids, add), want)


def test_bad_method_and_group_size() -> None:
    with pytest.raises(ValueError, match="int3"):
        quantize_model(nn.Sequential(Linear(8, 8)), "int3")
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_model(nn.Sequential(Linear(200, 8)), "wint4")  # gcd(200, 128) = 8 < 16


def test_wint4_groups_of_a_tensor_parallel_slice() -> None:
    # the 424B model's 3584 expert features over 8 ranks: 448 = 3.5 x 128 -> groups of 64
    cfg = QuantConfig("wint4")
    assert (cfg.group_for(448), cfg.group_for(3584), cfg.group_for(96)) == (64, 128, 96)
    layer = Linear(448, 8)
    q = quantize_model(nn.Sequential(layer), "wint4")[0]
    assert q.scale.shape == (8, 7)


# -- whole models --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    path = tmp_path_factory.mktemp("qvl") / "m"
    make_vl(path, "gqa2", seed=4)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ensure_tiny_model() / f, path / f)
    shutil.copy(ensure_tiny_model() / "added_tokens.json", path / "added_tokens.json")
    prompts = [build_prompt([], seed=0), build_prompt([("image", (1, 4, 6))], seed=1)]
    return path, prompts


def test_scope_language_layers_only(vl) -> None:
    path, _ = vl
    model, _ = load_model(path, quantization="wint4")
    layers = language_layers(model)
    assert not any(isinstance(m, (Linear, MergedLinear, Experts)) for m in layers.modules())
    assert any(isinstance(m, QuantizedExperts) for m in layers.modules())
    lm = model.language_model
    assert isinstance(lm.lm_head, Linear) and lm.lm_head.weight is lm.model.embed_tokens.weight
    outside = [m for n, m in model.named_modules() if not n.startswith("language_model.model.l")]
    assert not any(isinstance(m, (QuantizedLinear, QuantizedExperts)) for m in outside)
    assert all(r.weight.dtype == torch.float32 for r in model.modules() if isinstance(r, Router))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def _weight_error(model: nn.Module, float_model: nn.Module) -> float:
    """RMS relative error of all quantized weights: ||W - W_q|| / ||W||."""
    num = den = 0.0
    floats = dict(float_model.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            pairs = [(m.qweight, m.scale, floats[name].weight)]
        elif isinstance(m, QuantizedExperts):
            f = floats[name]
            pairs = [
                (m.gate_up_qweight, m.gate_up_scale, f.gate_up_proj),
                (m.down_qweight, m.down_scale, f.down_proj),
            ]
        else:
            continue
        for qw, s, w in pairs:
            num += (dequantize(qw, s, torch.float32) - w).pow(2).sum().item()
            den += w.pow(2).sum().item()
    return (num / den) ** 0.5


@pytest.mark.parametrize("method", METHODS)
def test_logits_close_to_float(vl, method: str) -> None:
    """Logits move in proportion to the weights' relative error eps (about 0.8% for wint8,
    11% for wint4 at these sizes). Through 3 residual layers the errors add rather than
    compound, so the logits' relative error must stay under 2 * eps * num_layers: loose
    enough for random weights, tight enough to catch a wrong scale or a swapped nibble
    (either makes the error O(1))."""
    path, prompts = vl
    float_model, cfg = load_model(path)
    model, _ = load_model(path, quantization=method)
    eps = _weight_error(model, float_model)
    assert eps < (0.02 if method == "wint8" else 0.2)
    for p in prompts:
        with torch.no_grad():
            want = tandem_logits(float_model, cfg, p)
            got = tandem_logits(model, cfg, p)
        assert _relative_error(got, want) < 2 * eps * len(cfg.text.mlp_layer_types)


def _greedy(path, prompts, **kw) -> list[list[int]]:
    engine = LLMEngine(EngineArgs(model=str(path), block_size=4, **kw))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p.ids, params, media_inputs(p))
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [out[str(i)] for i in range(len(prompts))]


def test_wint8_greedy_tokens_equal_float(vl) -> None:
    """Through the engine (paged KV, batched decode): wint8 keeps every greedy token of the
    float model on these prompts (text and image), six steps each."""
    path, prompts = vl
    assert _greedy(path, prompts, quantization="wint8") == _greedy(path, prompts)


def test_bf16_wint4_greedy_runs_in_bf16(vl) -> None:
    """bf16 serving: integers stay integers, scales become bf16, the step runs in bf16."""
    path, prompts = vl
    model, _ = load_model(path, torch.bfloat16, quantization="wint4")
    q = language_layers(model)[0].self_attn.qkv_proj
    assert q.qweight.dtype == torch.uint8 and q.scale.dtype == torch.bfloat16
    tokens = _greedy(path, prompts, quantization="wint4", dtype="bfloat16")
    assert [len(t) for t in tokens] == [6, 6]


# -- memory -------------------------------------------------------------------------------


def _quantized_bytes(n: int, k: int, method: str, scale_bytes: int = 2) -> int:
    """One `[N, K]` weight: the integers plus one bf16 scale per row (wint8) or group."""
    if method == "wint8":
        return n * k + n * scale_bytes
    return n * k // 2 + n * (k // min(128, k)) * scale_bytes


def test_memory_matches_the_formula_on_28b_shapes() -> None:
    transformers = pytest.importorskip("transformers")
    from engine.config import ModelConfig

    cfg = ModelConfig.from_dict(transformers.Ernie4_5_VLMoeConfig().to_dict())
    table = memory_table(cfg)
    t = cfg.text
    q, kv, d = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.hidden_size
    shapes: list[tuple[int, int, int]] = []  # (count, N, K) of each quantized weight
    for kind in t.mlp_layer_types:
        shapes += [(1, q + 2 * kv, d), (1, d, q)]
        if kind == "dense":
            shapes += [(1, 2 * t.intermediate_size, d), (1, d, t.intermediate_size)]
            continue
        shared = t.moe_intermediate_size * t.num_shared_experts
        shapes += [(1, 2 * shared, d), (1, d, shared)]
        for e, inter in (
            (t.num_experts, t.moe_intermediate_size),
            (t.num_vision_experts, t.vision_moe_intermediate_size),
        ):
            shapes += [(e, 2 * inter, d), (e, d, inter)]
    float_bytes = sum(c * n * k * 2 for c, n, k in shapes)
    for method in METHODS:
        want = sum(c * _quantized_bytes(n, k, method) for c, n, k in shapes)
        assert table[f"{method} (bf16 scales)"] == table["bf16"] - float_bytes + want
    assert table["wint4 (bf16 scales)"] < 0.35 * table["bf16"]  # embedding + ViT stay bf16


def test_tiny_model_shrinks(vl) -> None:
    path, _ = vl
    sizes = {m: weight_bytes(load_model(path, quantization=m)[0]) for m in METHODS}
    full = weight_bytes(load_model(path)[0])
    assert full > sizes["wint8"] > sizes["wint4"]
