"""Process layout of `tandem serve` and the engine service commands.

Disaggregated (the default): `tandem serve` starts vision, prefill and decode as child
processes (`tandem vision|prefill|decode`, each a gRPC service on 127.0.0.1), waits until
each answers SERVING on `grpc.health.v1`, then runs the REST gateway over a `GrpcBackend`
in this process. Ctrl-C / SIGTERM stops the gateway, then every child (SIGTERM, then
SIGKILL after a grace period); children also get SIGTERM if this process dies
(PR_SET_PDEATHSIG), so none outlives it.

On one GPU the model is loaded by prefill and decode alike; when two copies of its
weights do not fit, `serve` says so and runs colocated.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from engine.llm_engine import EngineArgs
from engine.orphans import die_with_parent

log = logging.getLogger("tandem.launch")

STARTUP_TIMEOUT_S = 600.0
STOP_GRACE_S = 15.0


def engine_args(args: argparse.Namespace, device: str, dtype: str) -> EngineArgs:
    return EngineArgs(
        model=args.model,
        model_source=args.model_source,
        device=device,
        dtype=dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=getattr(args, "max_num_batched_tokens", 2048),
        block_size=getattr(args, "block_size", 16),
        num_kv_blocks=getattr(args, "num_kv_blocks", None),
        quantization=args.quantization,
        tensor_parallel_size=args.tensor_parallel_size,
        async_scheduling=getattr(args, "async_scheduling", True),
    )


def run_engine_service(role: str, args: argparse.Namespace, device: str, dtype: str) -> int:
    """`tandem prefill` / `tandem decode`: one service in this process until SIGTERM."""
    address = f"{args.host}:{args.port}"
    eargs = engine_args(args, device, dtype)
    if role == "prefill":
        from prefill_svc.server import PrefillServiceConfig
        from prefill_svc.server import serve as serve_prefill

        return serve_prefill(PrefillServiceConfig(eargs, address))
    from decode_svc.server import DecodeServiceConfig
    from decode_svc.server import serve as serve_decode

    return serve_decode(DecodeServiceConfig(eargs, address, args.kv_bind, args.kv_advertise_host))


def disaggregation_blocker(model_path: Path, device: str, tp: int = 1) -> str | None:
    """Why prefill and decode cannot both load the model here (None = they can). Each
    takes `tp` GPUs: its own when there are 2*tp, else the same ones (each GPU then
    holds a 1/tp slice of the weights twice)."""
    if not device.startswith("cuda"):
        return None
    import torch

    if torch.cuda.device_count() >= 2 * tp:
        return None
    weights = sum(f.stat().st_size for f in model_path.glob("*.safetensors"))
    total = torch.cuda.get_device_properties(0).total_memory
    if 2 * weights / tp <= 0.8 * total:
        return None
    return (
        f"prefill and decode each load the model ({weights / 2**30:.1f} GiB of weights over "
        f"{tp} GPU(s)), which does not fit twice on {tp} GPU(s) of {total / 2**30:.0f} GiB; "
        "serving colocated (one engine, prefill and decode in one process)"
    )


def free_ports(n: int) -> list[int]:
    """n distinct free ports: all n sockets are bound at once, so no port comes back twice
    (one at a time, the kernel may hand the same free port out again)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


ROLE_SERVICES = {
    "prefill": "tandem.v1.Prefill",
    "decode": "tandem.v1.Decode",
    "vision": "tandem.v1.VisionEncoder",
}
"""The gRPC service each child serves: startup waits for that service's health, so another
server on the port is never taken for it."""


class Children:
    """The service processes `serve` started; `stop` ends all of them."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> None:
        cmd = [sys.executable, "-m", "tandem.cli", *argv]
        log.info("starting %s: %s", name, " ".join(cmd))
        self.procs[name] = subprocess.Popen(cmd, preexec_fn=die_with_parent)

    def dead(self) -> list[str]:
        return [f"{n} (exit {p.returncode})" for n, p in self.procs.items() if p.poll() is not None]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for name, proc in self.procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", name, STOP_GRACE_S)
                proc.kill()
                proc.wait()

    async def wait_healthy(self, targets: dict[str, str], timeout_s: float) -> None:
        from tandem.services import wait_for_health

        deadline = time.monotonic() + timeout_s
        for name, target in targets.items():
            while True:
                if dead := self.dead():
                    raise RuntimeError(f"a service exited during startup: {', '.join(dead)}")
                try:
                    await wait_for_health(target, 2.0, ROLE_SERVICES.get(name, ""))
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} at {target} did not become healthy") from None


def _common_flags(args: argparse.Namespace, device: str, dtype: str) -> list[str]:
    flags = ["--model", args.model, "--device", device, "--dtype", dtype]
    if args.model_source:
        flags += ["--model-source", args.model_source]
    return flags


def _engine_flags(args: argparse.Namespace, device: str, dtype: str) -> list[str]:
    flags = [*_common_flags(args, device, dtype), "--max-num-seqs", str(args.max_num_seqs)]
    if args.max_model_len:
        flags += ["--max-model-len", str(args.max_model_len)]
    if args.quantization:
        flags += ["--quantization", args.quantization]
    if args.tensor_parallel_size > 1:
        flags += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    if not getattr(args, "async_scheduling", True):
        flags.append("--no-async-scheduling")
    return flags


def serve_disaggregated(
    args: argparse.Namespace,
    device: str,
    dtype: str,
    model_path: Path,
    serve_gateway: Callable[[Any], Awaitable[None]],
) -> int:
    """Start vision (optional), prefill and decode; serve the gateway until stopped."""
    from tandem.grpc_backend import GrpcBackend, GrpcBackendConfig

    auto = iter(free_ports(3))
    ports = {role: getattr(args, f"{role}_port") or next(auto) for role in ROLE_SERVICES}
    use_vision = not args.no_vision_service and _vision_available()
    tp = args.tensor_parallel_size  # decode gets its own GPUs when there are enough
    decode_device = f"cuda:{tp}" if device == "cuda" and _num_gpus() >= 2 * tp else device
    children = Children()
    try:
        common = ["--host", "127.0.0.1"]
        for role, role_device in (("prefill", device), ("decode", decode_device)):
            port = ["--port", str(ports[role])]
            children.start(role, [role, *common, *port, *_engine_flags(args, role_device, dtype)])
        if use_vision:
            vision = ["vision", *common, "--port", str(ports["vision"])]
            vision += [*_common_flags(args, device, dtype), "--preprocess-workers", "1"]
            if args.mm_processor_kwargs:
                import json

                vision += ["--mm-processor-kwargs", json.dumps(args.mm_processor_kwargs)]
            children.start("vision", vision)
        targets = {n: f"127.0.0.1:{ports[n]}" for n in children.procs}

        async def main() -> None:
            await children.wait_healthy(targets, STARTUP_TIMEOUT_S)
            from chat.multimodal import MediaTokens
            from chat.tokenizer import Tokenizer
            from engine.config import ModelConfig

            cfg = ModelConfig.from_dir(model_path)
            limit = cfg.text.max_position_embeddings
            config = GrpcBackendConfig(
                prefill=(targets["prefill"],),
                decode=(targets["decode"],),
                vision=targets.get("vision"),
                model_name=args.model,
                max_model_len=min(args.max_model_len or limit, limit),
                mm_processor_kwargs=args.mm_processor_kwargs,
            )
            tokens = MediaTokens.from_tokenizer(Tokenizer.from_dir(model_path))
            backend = GrpcBackend(config, tokens)
            watcher = asyncio.create_task(_watch(children, backend))
            try:
                await serve_gateway(backend)
            finally:
                watcher.cancel()
                await backend.close()

        asyncio.run(main())
    finally:
        children.stop()
    return 0


async def _watch(children: Children, backend: Any) -> None:
    """Refresh the backend's stats for /metrics; log a child that died."""
    reported: set[str] = set()
    while True:
        await backend.refresh_stats()
        for dead in children.dead():
            if dead not in reported:
                log.error("service %s exited; requests will fail until restarted", dead)
                reported.add(dead)
        await asyncio.sleep(2.0)


def _vision_available() -> bool:
    try:
        import vision_svc.server  # noqa: F401
    except ImportError:
        return False
    return True


def _num_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def kill_tree_on_exit() -> None:
    """Let SIGTERM during startup unwind (finally blocks stop the children)."""

    def raise_interrupt(sig: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
