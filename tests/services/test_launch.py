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


def test_async_scheduling_flag_reaches_the_engines() -> None:
    """On by default; --no-async-scheduling turns it off in this process's engine and in
    the flags the decode and prefill services are started with."""
    parser = build_parser()
    on = parser.parse_args(["serve"])
    assert launch.engine_args(on, "cpu", "float32").async_scheduling
    assert "--no-async-scheduling" not in launch._engine_flags(on, "cpu", "float32")
    off = parser.parse_args(["serve", "--no-async-scheduling"])
    assert not launch.engine_args(off, "cpu", "float32").async_scheduling
    flags = launch._engine_flags(off, "cpu", "float32")
    service = parser.parse_args(["decode", *flags])
    assert not launch.engine_args(service, "cpu", "float32").async_scheduling
