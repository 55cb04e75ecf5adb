"""Greedy generation equals transformers' `generate` token for token, through the real
engine (paged KV, continuous batching), whatever the batching, caching and chunking."""

from __future__ import annotations

import shutil

import pytest
import torch

from engine.llm_engine import EngineArgs, LLMEngine
from engine.sampling_params import SamplingParams
from engine.tiny import ensure_tiny_model
from tests.engine.hf_models import (
    IMAGE,
    VIDEO,
    build_prompt,
    make_text,
    make_vl,
    write_paddle_layout,
)
from tests.engine.tandem_forward import media_inputs

NEW = 6
PROMPTS = [
    [],
    [("image", (1, 4, 6))],
    [("video", (4, 4, 4))],
    [("image", (1, 4, 4)), ("image", (1, 6, 8))],
]


def hf_generate(model, p) -> list[int]:
    ids = torch.tensor([p.ids])
    kw: dict = {}
    if p.images or p.videos:
        mm = torch.zeros_like(ids)
        mm[ids == IMAGE] = 1
        mm[ids == VIDEO] = 2
        moe = mm.clone()
        for tok, kind in ((301, 1), (302, 1), (303, 2), (304, 2)):
            moe[ids == tok] = kind
        kw.update(mm_token_type_ids=mm, moe_mm_token_type_ids=moe)
    if p.images:
        kw.update(pixel_values=p.pixels["image"], image_grid_thw=torch.tensor(p.images))
    if p.videos:
        kw.update(pixel_values_videos=p.pixels["video"], video_grid_thw=torch.tensor(p.videos))
    out = model.generate(
        ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0, **kw
    )
    return out[0, len(p.ids) :].tolist()


TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def copy_tokenizer(path) -> None:
    for f in TOKENIZER_FILES:
        shutil.copy(ensure_tiny_model() / f, path / f)


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    path = tmp_path_factory.mktemp("vl") / "m"
    hf = make_vl(path, "gqa2", seed=4)
    copy_tokenizer(path)
    prompts = [build_prompt(k, seed=i) for i, k in enumerate(PROMPTS)]
    expected = [hf_generate(hf, p) for p in prompts]
    return path, prompts, expected


def run_engine(path, prompts, stagger: bool, **kw) -> tuple[list[list[int]], LLMEngine]:
    engine = LLMEngine(EngineArgs(model=str(path), block_size=4, **kw))
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    pending = list(enumerate(prompts))
    outputs: dict[str, list[int]] = {}
    while pending or engine.has_unfinished_requests():
        if pending:  # staggered arrival: one new request per step
            for i, p in pending[:1] if stagger else pending:
                engine.add_request(str(i), p.ids, params, media_inputs(p))
            pending = pending[1:] if stagger else []
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [outputs[str(i)] for i in range(len(prompts))], engine


@pytest.mark.parametrize(
    "kw",
    [
        dict(async_scheduling=False),
        dict(async_scheduling=False, enable_prefix_caching=False, enable_chunked_prefill=False),
        dict(async_scheduling=False, max_num_batched_tokens=7),  # prompts in chunks
        dict(async_scheduling=False, num_kv_blocks=12, max_num_batched_tokens=16),  # preempts
        dict(async_scheduling=True),
        dict(async_scheduling=True, num_kv_blocks=12, max_num_batched_tokens=16),
        dict(async_scheduling=True, max_num_batched_tokens=7, arrivals_ahead=True),
        dict(
            async_scheduling=True, num_kv_blocks=12, max_num_batched_tokens=16, arrivals_ahead=True
        ),
    ],
    ids=[
        "default",
        "no_cache_no_chunk",
        "chunked",
        "preempt",
        "async",
        "async_preempt",
        "async_arrivals_chunked",
        "async_arrivals_preempt",
    ],
)
@pytest.mark.parametrize("stagger", [False, True], ids=["together", "staggered"])
def test_greedy_matches_hf_generate(vl, kw, stagger, monkeypatch):
    import engine.llm_engine as llm_engine

    path, prompts, expected = vl
    kw = dict(kw)
    monkeypatch.setattr(llm_engine, "ASYNC_WITH_ARRIVALS", kw.pop("arrivals_ahead", False))
    got, engine = run_engine(path, prompts, stagger, **kw)
    assert got == expected
    assert engine.num_used_blocks == 0


def test_prefix_cache_hits_and_media_isolation(vl):
    path, prompts, _ = vl
    engine = LLMEngine(EngineArgs(model=str(path), block_size=4))
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    p = prompts[1]  # one image

    def run(rid, media):
        engine.add_request(rid, p.ids, params, media)
        cached = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                cached = out.num_cached_tokens
        return cached

    assert run("a", media_inputs(p)) == 0
    assert run("b", media_inputs(p)) == (len(p.ids) - 1) // 4 * 4
    other = media_inputs(p)
    other[0].pixel_values = torch.randn_like(other[0].pixel_values)
    other[0].content_hash = "another-image"
    # Same ids, a different image: only the blocks before the image may be shared.
    image_start = p.ids.index(IMAGE)
    assert run("c", other) == image_start // 4 * 4
    assert engine.num_used_blocks == 0


@pytest.mark.parametrize(
    "tp, kw",
    [
        (2, dict(max_num_batched_tokens=7)),
        # 4 ranks over 2 KV heads: each rank keeps the KV head its query head reads
        (4, dict(num_kv_blocks=12, max_num_batched_tokens=16)),
    ],
    ids=["tp2-chunked", "tp4-replicated-kv-small-pool"],
)
def test_tensor_parallel_greedy_matches_hf_generate(vl, tp, kw):
    path, prompts, expected = vl
    n = len(prompts) if tp == 2 else 2  # 4 ranks on a 2-core CI machine: keep it short
    got, engine = run_engine(path, prompts[:n], stagger=True, tensor_parallel_size=tp, **kw)
    expected = expected[:n]
    try:
        assert not engine.async_scheduling  # one step at a time across ranks
        assert got == expected
        assert engine.num_used_blocks == 0
    finally:
        engine.shutdown()
    assert not any(engine.runner.workers.alive())


def test_tensor_parallel_paddle_layout_with_biases(tmp_path):
    """Fused q/k/v and up/gate, per-expert tensors, `[in, out]` weights and row-parallel
    biases (added once, on rank 0), split over 2 ranks."""
    hf = make_vl(tmp_path / "hf", "gqa3_bias", seed=7)
    write_paddle_layout(tmp_path / "hf", tmp_path / "paddle")
    copy_tokenizer(tmp_path / "paddle")
    prompts = [build_prompt(k, seed=i) for i, k in enumerate(PROMPTS[:2])]
    expected = [hf_generate(hf, p) for p in prompts]
    got, engine = run_engine(tmp_path / "paddle", prompts, stagger=False, tensor_parallel_size=2)
    engine.shutdown()
    assert got == expected


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_text_models_greedy_match(tmp_path, moe, tp):
    # dense: biases, tied head; MoE: untied head split over the vocabulary, stacked experts
    hf = make_text(tmp_path / "m", moe=moe, seed=2)
    copy_tokenizer(tmp_path / "m")
    prompts = [build_prompt([], seed=s) for s in range(3)]
    expected = [hf_generate(hf, p) for p in prompts]
    got, engine = run_engine(tmp_path / "m", prompts, stagger=True, tensor_parallel_size=tp)
    engine.shutdown()
    assert got == expected
    assert engine.num_used_blocks == 0


def test_seeded_sampling_independent_of_batch(vl):
    path, prompts, _ = vl
    engine = LLMEngine(EngineArgs(model=str(path), block_size=4))
    seeded = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    noisy = SamplingParams(max_tokens=5, temperature=1.3, ignore_eos=True)

    def run(others: int) -> list[int]:
        for j in range(others):
            p = prompts[j % len(prompts)]
            engine.add_request(f"other{others}-{j}", p.ids, noisy, media_inputs(p))
        rid = f"seeded-{others}"
        engine.add_request(rid, prompts[1].ids, seeded, media_inputs(prompts[1]))
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == rid:
                    tokens += out.new_token_ids
        return tokens

    alone = run(0)
    assert len(alone) == 8
    assert run(3) == alone
    assert run(5) == alone
    assert engine.num_used_blocks == 0


def test_abort_frees_blocks_mid_prefill_and_decode(vl):
    path, prompts, _ = vl
    engine = LLMEngine(EngineArgs(model=str(path), block_size=4, max_num_batched_tokens=5))
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p.ids, params, media_inputs(p))
    engine.step()  # request 0 is mid-prefill (chunks of 5 tokens)
    assert engine.num_used_blocks > 0
    engine.abort("0")
    for _ in range(12):
        engine.step()
    engine.abort("1")
    engine.abort("2")
    engine.abort("3")
    engine.abort("missing")  # unknown ids are a no-op
    assert not engine.has_unfinished_requests()
    assert engine.num_used_blocks == 0


def test_rejects_bad_requests_clearly(vl):
    from engine.llm_engine import RequestError
    from engine.multimodal import PromptError

    path, prompts, _ = vl
    engine = LLMEngine(EngineArgs(model=str(path), block_size=4, max_model_len=64))
    params = SamplingParams(max_tokens=4)
    with pytest.raises(RequestError, match="max_model_len"):
        engine.add_request("long", [5] * 64, params)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("empty", [], params)
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request("vocab", [10**6], params)
    with pytest.raises(PromptError, match="placeholder"):
        engine.add_request("nomedia", prompts[1].ids, params, [])
    engine.add_request("dup", [5, 6], params)
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("dup", [5, 6], params)
    engine.abort("dup")
    assert engine.num_used_blocks == 0
