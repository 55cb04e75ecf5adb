"""The tensor-parallel control frames (msgpack header + raw tensor bytes, no pickle) carry a
step's sequences exactly, and a malformed frame is refused."""

from __future__ import annotations

import pytest
import torch

from engine import tp_wire as wire
from engine.model_runner import MediaSlice, StepSequence


def test_step_round_trips_every_field_and_dtype() -> None:
    seqs = [
        StepSequence(
            token_ids=[5, 6, 7],
            positions=torch.arange(9).view(3, 3),
            num_computed=4,
            block_ids=[2, 9],
            media=[MediaSlice(1, torch.randn(2, 8).to(torch.bfloat16))],
            vision_rows=torch.tensor([False, True, True]),
            logits="all",
        ),
        StepSequence(token_ids=[11], positions=None, num_computed=30, block_ids=[1, 3],
                     logits="last", text_position=30),
    ]  # fmt: skip
    imports = [(3, [2, 9], torch.randn(2, 4, 2, 8), torch.zeros(0, 4, 2, 8))]
    frame = wire.encode_step(seqs, True, [2, 9, 2], imports)
    msg, tail = wire.decode(frame)
    assert isinstance(msg, wire.Step) and msg.hook and msg.export_blocks == [2, 9, 2]
    got, got_imports = wire.step_parts(msg, tail)
    for a, b in zip(got, seqs, strict=True):
        assert (a.token_ids, a.num_computed, a.block_ids, a.logits, a.text_position) == (
            b.token_ids, b.num_computed, b.block_ids, b.logits, b.text_position
        )  # fmt: skip
        for x, y in ((a.positions, b.positions), (a.vision_rows, b.vision_rows)):
            assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y))
        assert [m.start for m in a.media] == [m.start for m in b.media]
        for m, n in zip(a.media, b.media, strict=True):
            assert m.embeds.dtype == torch.bfloat16 and torch.equal(m.embeds, n.embeds)
    [(layer, ids, k, v)] = got_imports
    assert layer == 3 and ids == [2, 9]
    assert torch.equal(k, imports[0][2]) and v.shape == (0, 4, 2, 8)


def test_malformed_frames_are_refused() -> None:
    with pytest.raises(wire.WireError):
        wire.decode(b"\x01")
    with pytest.raises(wire.WireError):
        wire.decode(b"\x03\x00\x00\x00abc")
    frame = wire.encode_step([StepSequence([1], torch.tensor([0]), 0, [0])], False, [], [])
    msg, tail = wire.decode(frame[:-4])  # tensor bytes cut short
    with pytest.raises(wire.WireError, match="bad tensor reference"):
        wire.step_parts(msg, tail)


def test_single_rank_engine_needs_no_msgspec() -> None:
    """Only tensor-parallel engines import the wire codec (the GPU image lacks msgspec)."""
    import subprocess
    import sys

    code = "import sys; sys.modules['msgspec'] = None; import engine.llm_engine, engine.tp_executor"
    subprocess.run([sys.executable, "-c", code], check=True)
