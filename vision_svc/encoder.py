"""`MediaEncoder`: one media item in, its grid, token count, content hash and embeddings out.

The path of one item:

1. content hash of the raw bytes and options (cheap: sha256, no decoding), in a thread so a
   large video does not stall the event loop;
2. embedding cache lookup by that hash; a hit returns at once, the tower never runs;
3. on a miss: decode and preprocess in the process pool, then the vision tower and
   resampler on the one forward thread (torch work is serialised there, so the event loop
   never blocks and two forwards never fight over the device); identical items arriving
   while one is being encoded wait for it instead of encoding again;
4. the embeddings are serialised once (raw bytes in the model's dtype, which is the
   language model's) and cached.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from vision_svc.cache import CachedMedia, EmbeddingCache
from vision_svc.pool import PreprocessPool
from vision_svc.processing import InvalidMediaOptionsError, MediaProcessor, ProcessedMedia

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class VisionModel(Protocol):
    """What the encoder needs of a model: `Ernie45VisionEncoder` or the full VL model."""

    def encode_media(
        self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class MediaRequest:
    """One item to encode, as the gateway fetched it."""

    kind: str
    """"image" or "video"."""
    data: bytes
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """Per-video options (fps, min_frames, max_frames, target_frames, frames_sample)."""


@dataclass(frozen=True)
class EncodeResult:
    media: CachedMedia
    content_hash: str
    cache_hit: bool


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor of any dtype (bfloat16 included: numpy lacks it)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `tensor_bytes` (copies, so the tensor is writable)."""
    torch_dtype = {v: k for k, v in DTYPE_NAMES.items()}[dtype]
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return flat.view(torch_dtype).reshape(shape)


class MediaEncoder:
    """Hash → cache → preprocess (process pool) → vision tower (one thread) → cache."""

    def __init__(
        self,
        model: VisionModel,
        processor: MediaProcessor,
        cache: EmbeddingCache,
        pool: PreprocessPool,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.processor = processor
        self.cache = cache
        self.pool = pool
        self.device = torch.device(device)
        self.num_forward_calls = 0
        """Times the vision tower ran (a cache hit does not count)."""
        self._forward_thread = ThreadPoolExecutor(1, thread_name_prefix="tandem-vision-tower")
        self._forward_lock = threading.Lock()
        self._inflight: dict[str, asyncio.Future[CachedMedia]] = {}
        """Misses being encoded, by content hash: identical concurrent items share one."""

    async def encode(self, item: MediaRequest) -> EncodeResult:
        """Encode one item; `cache_hit` is True when the tower did not run for this call
        (found in the cache, or joined an identical item already being encoded)."""
        digest = await asyncio.to_thread(self.content_hash, item)
        cached = self.cache.get(digest)
        if cached is not None:
            return EncodeResult(cached, digest, cache_hit=True)
        task = self._inflight.get(digest)
        joined = task is not None
        if task is None:
            task = asyncio.ensure_future(self._encode_miss(item, digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda t: self._done(digest, t))
        # shield: a caller that goes away (client cancelled) does not cancel the work the
        # others wait on, and a finished result still lands in the cache.
        media = await asyncio.shield(task)
        return EncodeResult(media, digest, cache_hit=joined)

    async def _encode_miss(self, item: MediaRequest, digest: str) -> CachedMedia:
        processed = await self.pool.process(item.kind, item.data, item.overrides)
        loop = asyncio.get_running_loop()
        media = await loop.run_in_executor(self._forward_thread, self.forward, processed)
        self.cache.put(digest, media)
        return media

    def _done(self, digest: str, task: asyncio.Future[CachedMedia]) -> None:
        self._inflight.pop(digest, None)
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when all callers left

    def content_hash(self, item: MediaRequest) -> str:
        """The cache key of `item`; refuses bad kinds and options before any decoding."""
        if item.kind == "image":
            if item.overrides:
                raise InvalidMediaOptionsError("images take no per-request overrides")
            return self.processor.image_hash(item.data)
        if item.kind == "video":
            return self.processor.video_hash(item.data, item.overrides)
        raise InvalidMediaOptionsError(f"kind must be 'image' or 'video', got {item.kind!r}")

    def forward(self, media: ProcessedMedia) -> CachedMedia:
        """Vision tower + resampler on one preprocessed item (runs on the forward thread)."""
        with self._forward_lock, torch.inference_mode():
            self.num_forward_calls += 1
            pixels = torch.from_numpy(media.pixel_values).to(self.device)
            embeds = self.model.encode_media(pixels, [media.grid_thw])
        if embeds.shape[0] != media.num_tokens:
            raise RuntimeError(
                f"the vision tower gave {embeds.shape[0]} embeddings for {media.kind} grid "
                f"{media.grid_thw}, the processor counts {media.num_tokens} tokens"
            )
        return CachedMedia(
            kind=media.kind,
            grid_thw=media.grid_thw,
            num_tokens=media.num_tokens,
            dtype=DTYPE_NAMES[embeds.dtype],
            shape=(int(embeds.shape[0]), int(embeds.shape[1])),
            embeddings=tensor_bytes(embeds),
            frame_timestamps=media.frame_timestamps,
        )

    def shutdown(self) -> None:
        """Stop the preprocessing workers and the forward thread."""
        self.pool.shutdown(wait=True)
        self._forward_thread.shutdown(wait=True, cancel_futures=True)
