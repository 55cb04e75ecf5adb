"""The decode step's host fast paths give what the general paths give.

Generated-token rows without a positions tensor (`StepSequence.positions=None`), the batched
block table, the KV manager's kept block-id lists, the sampler's plain-greedy shortcut, and an
engine whose decode rows take those paths against token-by-token expectations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.cuda_graphs import block_table
from engine.kv_cache import KVCacheManager, KVCacheRequest
from engine.llm_engine import EngineArgs, LLMEngine
from engine.model_runner import ModelRunner, StepSequence
from engine.models import load_model
from engine.sampler import RequestSamplingState, Sampler
from engine.sampling_params import SamplingParams
from engine.tiny import ensure_tiny_model

BLOCK = 4


def test_block_table_pads_rows() -> None:
    tables = [[3, 1], [5], [7, 8, 9]]
    want = np.array([[3, 1, 0], [5, 0, 0], [7, 8, 9]], dtype=np.int32)
    got = block_table(tables)
    assert got.dtype == np.int32 and np.array_equal(got, want)
    assert np.array_equal(block_table([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]]))
    assert np.array_equal(block_table([[4, 6, 2]]), np.array([[4, 6, 2]], dtype=np.int32))


def test_block_table_fills_a_staging_buffer_in_place() -> None:
    """The graph path packs the table into the front of a (pinned) flat buffer."""
    flat = np.full(20, 99, dtype=np.int32)  # stale values from an earlier, wider step
    for tables in ([[3, 1], [5], [7, 8, 9]], [[1, 2], [3, 4]], [[6, 5, 4, 3]]):
        n, width = len(tables), max(map(len, tables))
        out = flat[: n * width].reshape(n, width)
        got = block_table(tables, width, out)
        assert got is out and np.array_equal(
            flat[: n * width].reshape(n, width), block_table(tables)
        )


def test_kept_block_ids_follow_blocks() -> None:
    kv = KVCacheManager(BLOCK, 33)
    reqs = [KVCacheRequest(f"r{i}", list(range(10 + i, 17 + 3 * i))) for i in range(3)]
    for req in reqs:
        blocks, n = kv.get_computed_blocks(req)
        assert kv.allocate_slots(req, len(req.token_ids) - n, blocks) is not None
    for step in range(9):
        for req in reqs:
            req.token_ids.append(step)
            assert kv.allocate_slots(req, 1) is not None
            kv.cache_blocks(req, len(req.token_ids))
            state = kv._requests[req.request_id]
            assert kv.block_ids(req.request_id) == [b.block_id for b in state.blocks]
            assert state.num_slots == len(req.token_ids)
    ids = kv.block_ids("r0")
    ids.append(-1)  # a copy: the manager's list is untouched
    assert kv.block_ids("r0")[-1] != -1


def test_text_positions_match_explicit_positions() -> None:
    model, cfg = load_model(ensure_tiny_model(), torch.float32, torch.device("cpu"))
    runners = [
        ModelRunner(model, cfg, 33, BLOCK, torch.float32, torch.device("cpu"), cuda_graphs=g)
        for g in (False, True)
    ]
    prompts = [[11, 12, 13, 14, 15], [21, 22, 23]]
    tables = [list(range(1, 9)), list(range(9, 17))]
    for r in runners:
        r.run([StepSequence(p, None, 0, t) for p, t in zip(prompts, tables, strict=True)])
    delta = 7  # a VL prompt's generated positions are shifted by its layout's delta
    lens = [len(p) for p in prompts]

    def seqs(explicit: bool, tok: list[int]) -> list[StepSequence]:
        out = []
        for i, t in enumerate(tok):
            pos = lens[i] + delta
            p = torch.full((3, 1), pos) if explicit else None
            out.append(StepSequence([t], p, lens[i], tables[i], text_position=pos))
        return out

    for step in range(3):
        tok = [30 + step, 40 + step]
        want = runners[0].run(seqs(True, tok))
        for r in runners:  # eager and graph (CPU stand-in), ints instead of a tensor
            got = r.run(seqs(False, tok))
            for w, o in zip(want, got, strict=True):
                torch.testing.assert_close(o, w, atol=1e-5, rtol=0)
        lens = [n + 1 for n in lens]
    # both runners wrote the same KV for the explicit and the int rows: replay once more
    torch.testing.assert_close(runners[0].kv_caches[0][0], runners[1].kv_caches[0][0])


def _state(**kw) -> RequestSamplingState:
    return RequestSamplingState(params=SamplingParams(**kw), eos_token_ids=(2,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_greedy_shortcut_matches_full_path(dtype: torch.dtype) -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    plain = [_state(temperature=0) for _ in range(6)]
    got = Sampler()(logits, plain)
    assert got.logprobs is None
    assert torch.equal(got.sampled_token_ids, logits.float().argmax(dim=-1))
    # one row with logprobs sends the batch down the full path; greedy answers agree
    full = Sampler()(logits, [*plain[:5], _state(temperature=0, logprobs=2)])
    assert full.logprobs is not None
    assert torch.equal(full.sampled_token_ids, got.sampled_token_ids)
    # min_tokens still blocks EOS (the shortcut is not taken before min_tokens)
    logits[:, 2] = 100.0
    blocked = Sampler()(logits, [_state(temperature=0, min_tokens=1) for _ in range(6)])
    assert not bool((blocked.sampled_token_ids == 2).any())


@pytest.mark.parametrize("graphs", [False, True])
def test_engine_fast_decode_rows_match_general_rows(graphs: bool) -> None:
    """The same batch, decode rows built the fast way or the general way (prompt layout
    positions, all-false vision rows): the same tokens."""
    args = EngineArgs(max_num_seqs=8, max_model_len=256, num_kv_blocks=200)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 2000, (n,), generator=g).tolist() for n in (5, 17, 33, 9)]

    def run(fast: bool) -> dict[str, list[int]]:
        eng = LLMEngine(args)
        if graphs:
            r = eng.runner
            assert isinstance(r, ModelRunner)
            eng.runner = ModelRunner(
                r.model, r.cfg, r.num_blocks, r.block_size, r.dtype, r.device, cuda_graphs=True
            )
        if not fast:
            eng._position_dims = -1  # no prompt matches: every row takes the general path
        for i, p in enumerate(prompts):
            eng.add_request(f"r{i}", p, params)
        out: dict[str, list[int]] = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        return out

    assert run(True) == run(False)
