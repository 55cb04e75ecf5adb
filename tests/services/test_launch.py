"""`tandem serve`'s process layout decisions (no processes started)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tandem import launch
from tandem.cli import build_parser


def test_cpu_always_disaggregates(tmp_path: Path) -> None:
    assert launch.disaggregation_blocker(tmp_path, "cpu") is None


def test_one_small_gpu_colocates_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)

    class Props:
        total_memory = 1500

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    reason = launch.disaggregation_blocker(tmp_path, "cuda")
    assert reason is not None and "does not fit twice" in reason and "colocated" in reason
    Props.total_memory = 10_000
    assert launch.disaggregation_blocker(tmp_path, "cuda") is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    Props.total_memory = 1500
    assert launch.disaggregation_blocker(tmp_path, "cuda") is None  # one copy per GPU


def test_service_commands_parse() -> None:
    parser = build_parser()
    args = parser.parse_args(["decode", "--port", "7000", "--kv-bind", "ipc:///tmp/kv"])
    assert (args.command, args.port, args.kv_bind) == ("decode", 7000, "ipc:///tmp/kv")
    args = parser.parse_args(["prefill", "--max-num-batched-tokens", "64"])
    assert (args.command, args.port, args.max_num_batched_tokens) == ("prefill", 50061, 64)
    args = parser.parse_args(["serve", "--colocate"])
    assert args.colocate and args.prefill_port == 0
