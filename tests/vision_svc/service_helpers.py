"""Helpers for the vision service tests: a real grpc.aio server on its own loop thread,
and small encoded media."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np
from PIL import Image

from tandem.v1 import common_pb2, vision_pb2, vision_pb2_grpc
from vision_svc.encoder import MediaEncoder
from vision_svc.server import VisionServer

TIMEOUT_S = 30.0


class ServerThread:
    """Runs `VisionServer` on 127.0.0.1 (a free port) in an event loop of its own thread,
    so tests can call it with plain blocking stubs."""

    def __init__(self, encoder: MediaEncoder) -> None:
        self.encoder = encoder
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: VisionServer | None = None
        self.port = 0

    def start(self) -> int:
        self.thread.start()

        async def start() -> int:
            self.server = VisionServer(self.encoder, "127.0.0.1", 0)
            return await self.server.start()

        self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(TIMEOUT_S)
        return self.port

    def stop(self) -> None:
        if self.server is not None:
            stop = self.server.stop(grace_s=1.0)
            asyncio.run_coroutine_threadsafe(stop, self.loop).result(TIMEOUT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT_S)
        self.loop.close()


@contextmanager
def running(encoder: MediaEncoder) -> Iterator[tuple[ServerThread, grpc.Channel]]:
    server = ServerThread(encoder)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        grpc.channel_ready_future(channel).result(TIMEOUT_S)
        yield server, channel
    finally:
        channel.close()
        server.stop()


def encode(
    channel: grpc.Channel, *items: vision_pb2.MediaData, embeddings: bool = True
) -> vision_pb2.EncodeResponse:
    stub = vision_pb2_grpc.VisionEncoderStub(channel)
    request = vision_pb2.EncodeRequest(items=list(items), return_embeddings=embeddings)
    return stub.Encode(request, timeout=TIMEOUT_S)


def image_item(data: bytes) -> vision_pb2.MediaData:
    return vision_pb2.MediaData(kind=common_pb2.MEDIA_KIND_IMAGE, data=data)


def video_item(data: bytes, overrides_json: str = "") -> vision_pb2.MediaData:
    return vision_pb2.MediaData(
        kind=common_pb2.MEDIA_KIND_VIDEO, data=data, overrides_json=overrides_json
    )


def noise_png(w: int, h: int, seed: int = 0) -> bytes:
    """A random-pixel PNG (every patch differs, so equal embeddings mean something)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_video(num_frames: int, fps: int, w: int = 64, h: int = 48) -> bytes:
    """An mp4 whose grey level encodes the frame index."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(num_frames):
            arr = np.full((h, w, 3), (i * 6) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
