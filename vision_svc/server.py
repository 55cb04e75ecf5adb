"""The vision service process: `tandem.v1.VisionEncoder` over grpc.aio, with
`grpc.health.v1`, server reflection and one error interceptor.

`serve(...)` loads the vision tower and resampler only (not the language model), listens,
and blocks until SIGTERM or SIGINT, then drains: health turns NOT_SERVING, new calls are
refused, calls in flight get `grace_s` to finish, and the worker processes stop.
`add_cli_arguments` + `serve_from_args` are the `tandem vision` command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from tandem.v1 import vision_pb2, vision_pb2_grpc
from vision_svc.cache import EmbeddingCache
from vision_svc.encoder import MediaEncoder
from vision_svc.interceptor import ErrorInterceptor
from vision_svc.pool import PreprocessPool
from vision_svc.processing import MediaConfig, MediaProcessor
from vision_svc.service import VisionEncoderService

log = logging.getLogger("tandem.vision")

SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionEncoder"].full_name
DEFAULT_PORT = 8190
DEFAULT_CACHE_BYTES = 2 * 1024**3
"""2 GiB: ~1,600 448x448 images at the 28B model's width (256 tokens x 2560 x bf16)."""
MAX_MESSAGE_BYTES = 1024**3
"""gRPC message cap both ways: above the largest video accepted (512 MiB) and its embeddings."""


@dataclass(frozen=True)
class VisionServiceConfig:
    """Everything `tandem vision` is configured with."""

    model: str = "tiny-ernie-vl"
    """Checkpoint directory, hub id, or the embedded tiny-ernie-vl."""
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    """0 picks a free port (printed when serving)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    dtype: str = "auto"
    """float32, bfloat16, float16 or auto (bfloat16 on GPU, float32 on CPU)."""
    mm_processor_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """FastDeploy's --mm-processor-kwargs (e.g. {"video_max_frames": 30})."""
    cache_bytes: int = DEFAULT_CACHE_BYTES
    """Embedding cache capacity in bytes; 0 disables it."""
    model_source: str | None = None
    """Hub to download `model` from when it is an id."""
    num_workers: int = 2
    """Preprocessing worker processes (spawned on the first cache miss)."""
    max_pending: int = 64
    """Media items preprocessed at once before new ones get UNAVAILABLE."""
    grace_s: float = 5.0
    """Seconds calls in flight get to finish on SIGTERM."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {self.cache_bytes}")
        if self.num_workers < 1 or self.max_pending < 1:
            raise ValueError("num_workers and max_pending must be >= 1")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16: {self.dtype}")
        MediaConfig.from_mm_processor_kwargs(self.mm_processor_kwargs)  # refuse bad keys now


def create_encoder(config: VisionServiceConfig) -> MediaEncoder:
    """Resolve and load the vision side of `config.model`; workers start lazily."""
    import torch

    from engine.llm_engine import resolve_model_path
    from engine.models.vision_only import load_vision_model

    device, dtype = resolve_device_dtype(config.device, config.dtype)
    path = resolve_model_path(config.model, config.model_source)
    model, _ = load_vision_model(path, getattr(torch, dtype), device)
    processor = MediaProcessor(MediaConfig.from_mm_processor_kwargs(config.mm_processor_kwargs))
    pool = PreprocessPool(processor, config.num_workers, config.max_pending)
    return MediaEncoder(model, processor, EmbeddingCache(config.cache_bytes), pool, device)


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    return device, dtype


class VisionServer:
    """The grpc.aio server around one `MediaEncoder` (start, then stop once)."""

    def __init__(self, encoder: MediaEncoder, host: str = "127.0.0.1", port: int = 0) -> None:
        self.encoder = encoder
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.health = health_aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor()],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        vision_pb2_grpc.add_VisionEncoderServicer_to_server(
            VisionEncoderService(encoder), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = 0

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        self.port = self.server.add_insecure_port(self.address)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.address}")
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        """Health NOT_SERVING, refuse new calls, let calls in flight finish, stop workers."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        await asyncio.to_thread(self.encoder.shutdown)


async def _serve_until_signal(encoder: MediaEncoder, config: VisionServiceConfig) -> None:
    server = VisionServer(encoder, config.host, config.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await server.start()
        print(f"VisionEncoder serving {config.model} on {config.host}:{port}", flush=True)
        await stop.wait()
        log.info("stopping: %ss for calls in flight", config.grace_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop(config.grace_s)


def serve(
    model: str = "tiny-ernie-vl",
    port: int = DEFAULT_PORT,
    host: str = "0.0.0.0",
    device: str = "auto",
    dtype: str = "auto",
    mm_processor_kwargs: Mapping[str, Any] | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    *,
    model_source: str | None = None,
    num_workers: int = 2,
    max_pending: int = 64,
    grace_s: float = 5.0,
) -> int:
    """Load the vision tower and serve `tandem.v1.VisionEncoder` until SIGTERM/SIGINT.

    Blocking; must run in the main thread (it installs the signal handlers). Returns 0
    after a graceful stop. Bad arguments raise `ValueError` before anything loads.
    """
    config = VisionServiceConfig(
        model=model,
        host=host,
        port=port,
        device=device,
        dtype=dtype,
        mm_processor_kwargs=dict(mm_processor_kwargs or {}),
        cache_bytes=cache_bytes,
        model_source=model_source,
        num_workers=num_workers,
        max_pending=max_pending,
        grace_s=grace_s,
    )
    encoder = create_encoder(config)
    try:
        asyncio.run(_serve_until_signal(encoder, config))
    finally:
        encoder.shutdown()  # idempotent: already done after a graceful stop
    return 0


def parse_bytes(text: str) -> int:
    """ "1073741824", "512MiB", "2G", "2GB" -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a size like 2GiB or 1073741824: {text!r}")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(m.group(1)) * 1024**power


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The `tandem vision` flags (all of them; pair with `serve_from_args`)."""
    g = parser.add_argument_group("vision service")
    g.add_argument("--model", default="tiny-ernie-vl", help="checkpoint dir or hub id")
    g.add_argument("--model-source", choices=("aistudio", "huggingface", "modelscope"))
    g.add_argument("--host", default="0.0.0.0", help="address to listen on (%(default)s)")
    g.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="gRPC port, 0 = any (%(default)s)"
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="auto = bfloat16 on GPU, float32 on CPU; the embeddings' dtype too",
    )
    g.add_argument(
        "--mm-processor-kwargs",
        type=_json_object,
        default={},
        help="media preprocessing options as JSON, e.g. '{\"video_max_frames\": 30}'",
    )
    g.add_argument(
        "--embedding-cache-bytes",
        type=parse_bytes,
        default=DEFAULT_CACHE_BYTES,
        help="embedding cache capacity, e.g. 2GiB; 0 disables it (default: 2GiB)",
    )
    g.add_argument(
        "--preprocess-workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="media decoding processes (default: min(8, CPUs))",
    )
    g.add_argument(
        "--max-pending-media",
        type=int,
        default=64,
        help="items preprocessed at once before new ones get UNAVAILABLE (%(default)s)",
    )


def serve_from_args(args: argparse.Namespace) -> int:
    """`serve` with the flags `add_cli_arguments` defined."""
    return serve(
        model=args.model,
        port=args.port,
        host=args.host,
        device=args.device,
        dtype=args.dtype,
        mm_processor_kwargs=args.mm_processor_kwargs,
        cache_bytes=args.embedding_cache_bytes,
        model_source=args.model_source,
        num_workers=args.preprocess_workers,
        max_pending=args.max_pending_media,
    )
