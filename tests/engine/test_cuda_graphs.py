"""Decode through `DecodeGraphs` (bucketed static buffers, padding rows) equals eager decode.

On CPU the graph is the `EagerStepGraph` stand-in, so this checks the buffers, padding and
dispatch; the `gpu` test captures real CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch

from engine.model_runner import ModelRunner, StepSequence
from engine.models import load_model
from engine.tiny import ensure_tiny_model

BLOCK = 4
BLOCKS_PER_SEQ = 8


def _runner(model, cfg, device, graphs: bool) -> ModelRunner:
    return ModelRunner(
        model,
        cfg,
        num_blocks=1 + 4 * BLOCKS_PER_SEQ,
        block_size=BLOCK,
        dtype=next(model.parameters()).dtype,
        device=device,
        cuda_graphs=graphs,
        graph_buckets=(1, 2, 4),
    )


def _seq(ids: list[int], start: int, b: int, logits: str = "last") -> StepSequence:
    n = len(ids)
    pos = torch.arange(start, start + n).expand(3, -1).clone()  # text rows: t = h = w
    blocks = list(range(1 + b * BLOCKS_PER_SEQ, 1 + (b + 1) * BLOCKS_PER_SEQ))
    return StepSequence(ids, pos, start, blocks, logits=logits)


def _decode_both(device: torch.device, dtype: torch.dtype, atol: float) -> ModelRunner:
    model, cfg = load_model(ensure_tiny_model(), dtype, device)
    eager, graph = _runner(model, cfg, device, False), _runner(model, cfg, device, True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.text.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 3)]
    for r in (eager, graph):  # prefill: eager on both (not a decode step)
        r.run([_seq(p, 0, b) for b, p in enumerate(prompts)])
    assert not graph.graphs.graphs, "prefill must not capture"
    lens = [len(p) for p in prompts]
    for step in range(4):
        batch = [0, 1, 2] if step % 2 == 0 else [1]  # 3 -> bucket 4 (one padding row), 1
        tok = [int(torch.randint(0, cfg.text.vocab_size, (1,), generator=g)) for _ in batch]
        seqs = [_seq([t], lens[b], b) for t, b in zip(tok, batch, strict=True)]
        seqs[-1].logits = "none" if step == 2 else "last"
        want, got = eager.run(seqs), graph.run(seqs)
        for w, o in zip(want, got, strict=True):
            assert w.shape == o.shape
            torch.testing.assert_close(o.float(), w.float(), atol=atol, rtol=0)
        for b in batch:
            lens[b] += 1
    assert sorted(graph.graphs.graphs) == [1, 4]
    return graph


def test_graph_decode_matches_eager_cpu() -> None:
    _decode_both(torch.device("cpu"), torch.float32, atol=1e-4)


def test_after_layer_and_long_batches_run_eagerly() -> None:
    model, cfg = load_model(ensure_tiny_model(), torch.float32, torch.device("cpu"))
    r = _runner(model, cfg, torch.device("cpu"), True)
    seen: list[int] = []
    r.run([_seq([1, 2, 3], 0, 0)])
    r.run([_seq([4], 3, 0)], after_layer=seen.append)  # KV streaming: eager
    assert seen == list(range(cfg.text.num_layers)) and not r.graphs.graphs
    r.run([_seq([5], 4, b) for b in range(4)])
    assert list(r.graphs.graphs) == [4]
    assert not r._graphable([_seq([5], 4, b) for b in range(4)] + [_seq([6], 4, 0)])  # > 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_decode_matches_eager_cuda() -> None:
    _decode_both(torch.device("cuda"), torch.float32, atol=2e-3)


def test_device_ids_from_the_token_buffer_or_copied_in() -> None:
    """A step may take its ids from the device: read by the graph from the sampler's buffer
    (`token_buffer`, no copy), or copied into it first; both give the host ids' logits."""
    model, cfg = load_model(ensure_tiny_model(), torch.float32, torch.device("cpu"))
    runs = [_runner(model, cfg, torch.device("cpu"), True) for _ in range(3)]
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    for r in runs:
        r.run([_seq(p, 0, b) for b, p in enumerate(prompts)])
    lens = [len(p) for p in prompts]
    for step, tok in enumerate(([7, 8], [10, 11], [12, 13])):
        seqs = [_seq([0], lens[b], b) for b in range(2)]  # the host rows' ids are not these
        want = runs[0].run([_seq([t], lens[b], b) for b, t in enumerate(tok)])
        buf = runs[1].token_buffer(2)
        buf.copy_(torch.tensor(tok))  # as the sampler writes it
        fed = runs[1].run(seqs, token_ids=buf)
        copied = runs[2].run(seqs, token_ids=torch.tensor(tok))  # another tensor: copied in
        for w, a, b in zip(want, fed, copied, strict=True):
            torch.testing.assert_close(a, w, atol=1e-5, rtol=0)
            torch.testing.assert_close(b, w, atol=1e-5, rtol=0)
        assert torch.equal(runs[2].token_buffer(2), torch.tensor(tok)), step
        lens = [n + 1 for n in lens]
    assert runs[1].token_buffer(5) is None  # past the largest bucket (4)
