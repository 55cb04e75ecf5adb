"""`tandem serve`: the OpenAI-compatible server, with FastDeploy's command line.

    tandem serve                                   # embedded tiny-ernie-vl on :8180
    tandem serve --model baidu/ERNIE-4.5-VL-28B-A3B-Paddle --max-model-len 32768 ...
    tandem serve --colocate                        # one process: gateway + engine
    tandem prefill --port 50061 | tandem decode --port 50062 | tandem vision --port 50063

Every flag of `python -m fastdeploy.entrypoints.openai.api_server` in the ERNIE-4.5-VL
deployment guide is accepted verbatim. `serve` starts vision, prefill and decode as child
processes behind the gateway (see `tandem.launch`); the FastDeploy inter-process ports
are accepted and unused (the services pick their own, see --prefill-port and friends).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp

from tandem import __version__

if TYPE_CHECKING:
    from chat.template import ChatTemplate
    from chat.tokenizer import Tokenizer
    from gateway.app import GatewayConfig
    from gateway.backend import Backend
    from gateway.grpc_server import GrpcServer

log = logging.getLogger("tandem.cli")

DEFAULT_MODEL = "tiny-ernie-vl"
ENV_KVCACHE_SCHEDULER = "ENABLE_V1_KVCACHE_SCHEDULER"
GRACEFUL_SHUTDOWN_S = 5

EPILOG = f"""\
ports:
  --port                      REST API (/v1/chat/completions, /v1/completions, /v1/models,
                              /health, /live); also /metrics when --metrics-port is unset or
                              equal to --port.
  --metrics-port              Prometheus /metrics on its own listener.
  --grpc-port                 Public gRPC tandem.v1.Generation/Generate (with reflection and
                              grpc.health.v1), same semantics as REST.
  --engine-worker-queue-port  FastDeploy's engine<->worker queue. Accepted and unused: the
                              engine services talk gRPC on their own ports (below).
  --cache-queue-port          FastDeploy's KV-cache manager queue. Accepted and unused, so it
                              may equal --metrics-port as in FastDeploy's guide.
  --prefill-port, --decode-port, --vision-port
                              gRPC ports of the child services `serve` starts (127.0.0.1;
                              0 = any free port). Decode's KV receiver picks a free port too.
                              Unused with --colocate.

environment:
  {ENV_KVCACHE_SCHEDULER}  Accepted for FastDeploy compatibility. Tandem's scheduler is
                              always the v1 one (continuous batching over a paged KV cache
                              with prefix caching and chunked prefill); the value changes
                              nothing.
  TANDEM_CACHE_DIR            Where the embedded model and downloads are kept.
"""


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve a model over the OpenAI API",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(serve)
    _add_network_args(serve)
    _add_media_args(serve)
    _add_disagg_args(serve)
    for role, port in (("prefill", 50061), ("decode", 50062)):
        p = sub.add_parser(role, help=f"run the {role} engine service (gRPC tandem.v1.*)")
        _add_model_args(p)
        _add_engine_service_args(p, port)
    vision = sub.add_parser("vision", help="run the vision encoder service (gRPC)")
    _add_vision_args(vision)
    return parser


def _add_disagg_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("process layout")
    g.add_argument(
        "--colocate",
        action="store_true",
        help="one process (gateway + engine in-process) instead of separate vision, "
        "prefill and decode services",
    )
    g.add_argument("--prefill-port", type=_port, default=0, help="prefill gRPC (0 = any free)")
    g.add_argument("--decode-port", type=_port, default=0, help="decode gRPC (0 = any free)")
    g.add_argument("--vision-port", type=_port, default=0, help="vision gRPC (0 = any free)")
    g.add_argument(
        "--no-vision-service",
        action="store_true",
        help="disaggregated without a vision service: prefill runs the vision tower",
    )


def _add_engine_service_args(p: argparse.ArgumentParser, port: int) -> None:
    g = p.add_argument_group("service")
    g.add_argument("--host", default="0.0.0.0", help="address to listen on (%(default)s)")
    g.add_argument("--port", type=_port, default=port, help="gRPC port (%(default)s)")
    g.add_argument("--block-size", type=_positive_int, default=16, help="tokens per KV block")
    g.add_argument("--num-kv-blocks", type=_positive_int, help="KV blocks (default: sized)")
    g.add_argument(
        "--max-num-batched-tokens", type=_positive_int, default=2048, help="tokens per step"
    )
    g.add_argument(
        "--kv-bind",
        default="tcp://127.0.0.1:0",
        help="decode: where the KV receiver listens, tcp://HOST:PORT or ipc:///path",
    )
    g.add_argument("--kv-advertise-host", help="decode: host prefill dials for the KV")


def _add_vision_args(p: argparse.ArgumentParser) -> None:
    try:
        from vision_svc.server import add_cli_arguments
    except ImportError:
        return
    add_cli_arguments(p)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model directory or hub id (default: the embedded %(default)s)",
    )
    g.add_argument(
        "--model-source",
        choices=("aistudio", "huggingface", "modelscope"),
        help="hub to download --model from when it is an id (default: aistudio)",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights/activations dtype; auto = bfloat16 on GPU, float32 on CPU",
    )
    g.add_argument(
        "--max-model-len",
        type=_positive_int,
        help="longest prompt + output in tokens (default: the model's)",
    )
    g.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=64,
        help="most requests batched in one step (default: %(default)s)",
    )
    g.add_argument(
        "--tensor-parallel-size",
        type=_positive_int,
        default=1,
        help="ranks the model is split over: consecutive GPUs from --device (prefill and "
        "decode each take that many), or CPU processes on the CPU; heads and intermediate "
        "sizes must divide (default: %(default)s)",
    )
    g.add_argument(
        "--quantization",
        choices=("wint8", "wint4"),
        help="weight-only quantization of the language model at load: wint8 (per-channel "
        "int8) or wint4 (int4 in groups of 128); the vision tower stays unquantized",
    )
    g.add_argument(
        "--no-async-scheduling",
        dest="async_scheduling",
        action="store_false",
        help="step decode one step at a time: the host reads each step's tokens before it "
        "launches the next (default: the next decode step is launched first, so the host's "
        "per-step work runs while the GPU computes; same tokens)",
    )
    g.add_argument(
        "--reasoning-parser",
        choices=("ernie-45-vl",),
        default="ernie-45-vl",
        help="splits <think>...</think> into reasoning_content (default: %(default)s)",
    )


def _add_network_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network (see 'ports' below)")
    g.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    g.add_argument("--port", type=_port, default=8180, help="REST API port (default: %(default)s)")
    g.add_argument("--metrics-port", type=_port, help="Prometheus /metrics port")
    g.add_argument(
        "--grpc-port", type=_port, default=8183, help="public gRPC port (default: %(default)s)"
    )
    g.add_argument("--engine-worker-queue-port", type=_port, help="accepted, unused")
    g.add_argument("--cache-queue-port", type=_port, help="accepted, unused")
    g.add_argument(
        "--api-key",
        default=os.environ.get("TANDEM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $TANDEM_API_KEY)",
    )


def _add_media_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multimodal input")
    g.add_argument(
        "--mm-processor-kwargs",
        type=_json_object,
        default={},
        help="media preprocessing options as JSON, e.g. '{\"video_max_frames\": 30}'",
    )
    g.add_argument(
        "--limit-mm-per-prompt",
        type=_json_object,
        default={},
        help='most images/videos per request as JSON, e.g. \'{"image": 10, "video": 3}\'',
    )
    g.add_argument(
        "--allowed-local-media-path",
        type=Path,
        help="folder whose files requests may name (file:// or a path); default: none",
    )
    g.add_argument(
        "--media-allow-hosts",
        default="",
        help="hosts/IPs/CIDRs exempt from the private-address guard, comma separated",
    )


def check_tensor_parallel(args: argparse.Namespace, model_path: Path, device: str) -> None:
    """Refuse a split the model's shapes or this machine cannot take, before anything
    starts (ValueError naming the reason)."""
    if args.tensor_parallel_size == 1:
        return
    from engine.config import ModelConfig
    from engine.parallel import check_tp_size
    from engine.tp_executor import tp_devices

    t = ModelConfig.from_dir(model_path).text
    check_tp_size(t.num_heads, t.num_kv_heads, args.tensor_parallel_size)
    tp_devices(device, args.tensor_parallel_size)


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    """The REST front's config from the flags (ValueError names a bad flag)."""
    from gateway.app import GatewayConfig
    from gateway.media import MediaFetchConfig, parse_allow_hosts
    from vision_svc.processing import MediaConfig

    MediaConfig.from_mm_processor_kwargs(args.mm_processor_kwargs)  # refuse bad keys now
    media = MediaFetchConfig(
        allowed_local_media_path=args.allowed_local_media_path,
        allow_hosts=parse_allow_hosts(args.media_allow_hosts),
    )
    return GatewayConfig(
        api_key=args.api_key or None,
        served_model_names=(args.model,),
        limit_mm_per_prompt=args.limit_mm_per_prompt,
        media=media,
        serve_metrics=args.metrics_port in (None, args.port),
    )


def _device_and_dtype(device: str, dtype: str) -> tuple[str, str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    return device, dtype


def _print_endpoints(args: argparse.Namespace) -> None:
    metrics_port = args.metrics_port if args.metrics_port is not None else args.port
    base = f"http://{args.host}:{args.port}"
    print(f"Launching metrics service at http://{args.host}:{metrics_port}/metrics", flush=True)
    print(f"Launching chat completion service at {base}/v1/chat/completions", flush=True)
    print(f"Launching completion service at {base}/v1/completions", flush=True)
    print(
        f"Launching gRPC service tandem.v1.Generation at {args.host}:{args.grpc_port}", flush=True
    )


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `_serve_all` (one handler for all servers,
    and no re-raising of SIGTERM after the graceful shutdown)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_all(servers: list[_Server | GrpcServer]) -> None:
    def on_signal(sig: int, frame: FrameType | None) -> None:
        for server in servers:
            server.force_exit = server.should_exit  # a second Ctrl-C stops at once
            server.should_exit = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        await asyncio.gather(*(server.serve() for server in servers))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(args: argparse.Namespace) -> int:
    """Load the model (or start the services), then serve until SIGINT/SIGTERM."""
    config = gateway_config(args)
    if os.environ.get(ENV_KVCACHE_SCHEDULER) is not None:
        log.info(
            "%s=%s accepted (the v1 scheduler is always on)",
            ENV_KVCACHE_SCHEDULER,
            os.environ[ENV_KVCACHE_SCHEDULER],
        )
    from chat.template import ChatTemplate
    from chat.tokenizer import Tokenizer
    from engine.llm_engine import resolve_model_path
    from tandem import launch
    from tandem.local_backend import LocalBackend

    device, dtype = _device_and_dtype(args.device, args.dtype)
    path = resolve_model_path(args.model, args.model_source)
    check_tensor_parallel(args, path, device)
    if not args.colocate:
        reason = launch.disaggregation_blocker(path, device, args.tensor_parallel_size)
        if reason is None:
            tokenizer, template = Tokenizer.from_dir(path), ChatTemplate.from_dir(path)
            launch.kill_tree_on_exit()
            return launch.serve_disaggregated(
                args,
                device,
                dtype,
                path,
                lambda backend: _serve_gateway(backend, tokenizer, template, args, config),
            )
        print(f"tandem serve: {reason}", file=sys.stderr, flush=True)
    backend = LocalBackend.create(launch.engine_args(args, device, dtype), args.mm_processor_kwargs)
    try:
        engine = backend.engine
        if not isinstance(engine.tokenizer, Tokenizer):  # serve always loads a checkpoint's
            raise ValueError("the model directory has no tokenizer; the server needs one")
        asyncio.run(_serve_gateway(backend, engine.tokenizer, engine.chat_template, args, config))
    finally:
        backend.shutdown()
    return 0


async def _serve_gateway(
    backend: Backend,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    args: argparse.Namespace,
    config: GatewayConfig,
) -> None:
    from gateway.app import create_app
    from gateway.grpc_server import GrpcServer
    from gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    app = create_app(backend, tokenizer, template, config, metrics)
    servers: list[_Server | GrpcServer] = [_Server(_uvicorn_config(app, args.host, args.port))]
    servers.append(GrpcServer.for_app(app, host=args.host, port=args.grpc_port))
    if not config.serve_metrics:
        metrics_app = Starlette(routes=[Route("/metrics", metrics.endpoint)])
        servers.append(_Server(_uvicorn_config(metrics_app, args.host, args.metrics_port)))
    _print_endpoints(args)
    await _serve_all(servers)


def run_service(args: argparse.Namespace) -> int:
    """`tandem prefill|decode|vision`: one gRPC service in this process."""
    if args.command == "vision":
        from vision_svc.server import serve_from_args

        return serve_from_args(args)
    from tandem import launch

    device, dtype = _device_and_dtype(args.device, args.dtype)
    return launch.run_engine_service(args.command, args, device, dtype)


def _uvicorn_config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return serve(args) if args.command == "serve" else run_service(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError) as exc:  # bad flags, unknown model, a service failed
        print(f"tandem {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
