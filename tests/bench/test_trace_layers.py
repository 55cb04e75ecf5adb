"""bench/trace_layers.py on a synthetic chrome trace: replays split at idle gaps, each layer's
kernels timed from the previous anchor's end, medians over layers."""

from __future__ import annotations

import json
import sys

import pytest

from bench import trace_layers as tl


def _kernel(name: str, ts: float, dur: float, stream: int = 7) -> dict:
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def _replay(t: float, layers: int, jitter: list[float], gemm_pair: bool = False) -> list[dict]:
    """A decode step: per layer qkv, attention, a side-stream kernel overlapping it that starts
    before the attention in odd layers and after it in even ones, the MoE (one down launch,
    or two grouped GEMMs), with layer i's attention `jitter[i]` us longer."""
    ev = []
    for i in range(layers):
        ev.append(_kernel("_qkv_rope_kernel", t + 0.5, 8.0))
        ev.append(_kernel("_gemv_kernel", t + (5.0 if i % 2 else 10.0), 20.0, stream=9))
        ev.append(_kernel("_decode_split_kernel", t + 6.0, 6.0 + jitter[i]))
        end = t + 12.0 + jitter[i]
        if gemm_pair:
            ev.append(_kernel("_moe_gemm_kernel", end, 30.0))
            end += 30.0
        ev.append(_kernel("_moe_gemm_kernel" if gemm_pair else "_moe_down_kernel", end, 40.0))
        t = end + 40.0
    return ev


def test_replays_split_at_idle_gaps() -> None:
    events = _replay(0.0, 3, [0.0] * 3) + _replay(10_000.0, 3, [0.0] * 3)
    events.append({"cat": "cpu_op", "name": "aten::mm", "ts": 5.0, "dur": 1.0})  # not a kernel
    groups = tl.kernel_replays(events[::-1])  # any order in the file
    assert [len(g) for g in groups] == [12, 12]
    assert groups[1][0]["ts"] == 10_000.5


@pytest.mark.parametrize("gemm_pair", [False, True])
def test_layer_timeline_medians_from_the_anchor(gemm_pair: bool) -> None:
    jitter = [0.0, 9.0, 1.0, 1.0, 2.0, 1.0, 50.0, 1.0, 1.0, 3.0]  # median 1.0 over layers 1-9
    [kernels] = tl.kernel_replays(_replay(0.0, 10, jitter, gemm_pair))
    anchor, every = ("_moe_gemm_kernel", 2) if gemm_pair else ("_moe_down_kernel", 1)
    rows = tl.layer_timeline(kernels, anchor, every=every, skip=0, layers=20)
    by_name = {(r["name"], r["nth"]): r for r in rows}
    assert len(rows) == len(by_name) == (5 if gemm_pair else 4)  # one row a kernel
    qkv = by_name[("_qkv_rope_kernel", 0)]
    assert (qkv["start_us"], qkv["end_us"], qkv["layers"]) == (0.5, 8.5, 9)
    split = by_name[("_decode_split_kernel", 0)]
    assert split["end_us"] == 12.0 + 1.0 and split["dur_us"] == 7.0  # medians, not means
    side = by_name[("_gemv_kernel", 0)]  # one row although its place in the order alternates
    assert side["stream"] == 9 and side["layers"] == 9 and side["end_us"] == 25.0
    if gemm_pair:
        assert by_name[("_moe_gemm_kernel", 0)]["end_us"] == 13.0 + 30.0
    last = rows[-1]
    assert last["name"] == anchor and last["end_us"] == 13.0 + (70.0 if gemm_pair else 40.0)
    assert [r["start_us"] for r in rows] == sorted(r["start_us"] for r in rows)
    assert tl.layer_timeline(kernels, anchor, every=every, skip=9) == []  # one layer: no pair
    assert tl.layer_timeline(kernels, "_no_such_kernel") == []


def test_cli_prints_the_last_replay(tmp_path, monkeypatch, capsys) -> None:
    trace = tmp_path / "t.json"
    events = _replay(0.0, 8, [0.0] * 8) + _replay(5_000.0, 8, [2.0] * 8)
    trace.write_text(json.dumps({"traceEvents": events}))
    monkeypatch.setattr(sys, "argv", ["trace_layers", str(trace), "--skip", "1"])
    assert tl.main() == 0
    out = capsys.readouterr().out
    assert out.startswith("2 replays; the last: 32 kernels")
    assert "_decode_split_kernel" in out and "    14.0" in out  # its end: 12 + 2
    monkeypatch.setattr(sys, "argv", ["trace_layers", str(trace), "--anchor", "nope"])
    assert tl.main() == 1
