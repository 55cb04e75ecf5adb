"""Offline Python API shaped like vLLM's: `LLM(...).generate(prompts, params)` and `.chat`.

A prompt is a string, `{"prompt_token_ids": [...]}`, or `{"prompt": str,
"multi_modal_data": {"image": [PIL images or bytes], "video": [bytes or paths]}}` where
the text holds one `<|image@placeholder|>` / `<|video@placeholder|>` marker per item (the
chat template writes them). All prompts are queued at once and run with continuous
batching until every one is finished.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from chat.detokenizer import IncrementalDetokenizer
from chat.multimodal import MediaTokens, expand_media
from chat.stop import StopStringMatcher
from chat.template import media_refs
from engine.llm_engine import EngineArgs, LLMEngine
from engine.multimodal import MediaInput
from engine.sampling_params import SamplingParams
from vision_svc.processing import MediaConfig, MediaProcessor, ProcessedMedia

Prompt = str | dict[str, Any]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class GenerationResult:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0


@dataclass
class _Track:
    """Text-side state of one running completion."""

    result: GenerationResult
    completion: CompletionOutput
    detok: IncrementalDetokenizer
    stops: StopStringMatcher


class LLM:
    def __init__(
        self,
        model: str = "tiny-ernie-vl",
        device: str = "cpu",
        dtype: str = "float32",
        mm_processor_kwargs: dict[str, Any] | None = None,
        **engine_kwargs: Any,
    ) -> None:
        self.engine = LLMEngine(
            EngineArgs(model=model, device=device, dtype=dtype, **engine_kwargs)
        )
        self.tokenizer = self.engine.tokenizer
        self.media = MediaProcessor(MediaConfig.from_mm_processor_kwargs(mm_processor_kwargs or {}))
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop tensor-parallel workers (`tensor_parallel_size` > 1); also done at exit."""
        self.engine.shutdown()

    def generate(
        self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | None = None
    ) -> list[GenerationResult]:
        params = sampling_params or SamplingParams()
        batch = prompts if isinstance(prompts, list) else [prompts]
        tracks: dict[str, _Track] = {}
        results = []
        for prompt in batch:
            text, ids, media = self._tokenize(prompt)
            result = GenerationResult(text, ids)
            results.append(result)
            for j in range(params.n):
                p = params if params.seed is None else replace(params, seed=params.seed + j)
                rid = str(next(self._ids))
                self.engine.add_request(rid, ids, p, media)
                completion = CompletionOutput(j, "", [])
                result.outputs.append(completion)
                tracks[rid] = _Track(
                    result,
                    completion,
                    IncrementalDetokenizer(
                        self.tokenizer, skip_special_tokens=p.skip_special_tokens
                    ),
                    StopStringMatcher(
                        p.stop, include_stop_str_in_output=p.include_stop_str_in_output
                    ),
                )
        self._run(tracks)
        return results

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[GenerationResult]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        kwargs = {"enable_thinking": True, **(chat_template_kwargs or {})}
        prompts: list[Prompt] = []
        for conv in conversations:
            text = self.engine.chat_template.render(conv, **kwargs)  # type: ignore[arg-type]
            data: dict[str, list[Any]] = {"image": [], "video": []}
            for ref in media_refs(conv):  # type: ignore[arg-type]
                data[ref.kind].append(ref.url)
            prompts.append({"prompt": text, "multi_modal_data": data})
        return self.generate(prompts, sampling_params)

    # ------------------------------------------------------------------ internals

    def _run(self, tracks: dict[str, _Track]) -> None:
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                track = tracks[out.request_id]
                c = track.completion
                c.token_ids.extend(out.new_token_ids)
                if out.new_logprobs is not None:
                    c.logprobs = (c.logprobs or []) + out.new_logprobs
                track.result.num_cached_tokens = out.num_cached_tokens
                update = track.stops.feed(track.detok.add_tokens(out.new_token_ids))
                if update.stopped:
                    self.engine.stop_request(out.request_id)
                    c.finish_reason = "stop"
                elif out.finished:
                    track.stops.feed(track.detok.finish())
                    track.stops.finish()
                    c.finish_reason = out.finish_reason
                if update.stopped or out.finished:
                    c.text = track.stops.output_text

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int], list[MediaInput]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt), []
        if "prompt_token_ids" in prompt:
            return None, list(prompt["prompt_token_ids"]), []
        text = str(prompt["prompt"])
        data = prompt.get("multi_modal_data") or {}
        processed = {
            k: [self._process(k, item) for item in data.get(k, [])] for k in ("image", "video")
        }
        expanded = expand_media(
            self.tokenizer.encode(text),
            MediaTokens.from_tokenizer(self.tokenizer),
            image_grids=[p.grid_thw for p in processed["image"]],
            video_grids=[p.grid_thw for p in processed["video"]],
        )
        media = [self._media_input(processed[s.kind][s.index]) for s in expanded.spans]
        return text, expanded.token_ids, media

    def _process(self, kind: str, item: Any) -> ProcessedMedia:
        return self.media.process(kind, _to_bytes(item))

    @staticmethod
    def _media_input(p: ProcessedMedia) -> MediaInput:
        pixels = torch.from_numpy(p.pixel_values)
        return MediaInput(p.kind, pixels, tuple(p.grid_thw), p.content_hash)  # type: ignore[arg-type]


def _to_bytes(item: Any) -> bytes:
    """PIL image, raw bytes, a local path or a `data:` URL -> encoded bytes."""
    if isinstance(item, bytes):
        return item
    if hasattr(item, "save"):  # a PIL image: keep it lossless
        buf = io.BytesIO()
        item.save(buf, format="PNG")
        return buf.getvalue()
    text = str(item)
    if text.startswith(("http://", "https://")):
        raise ValueError(
            "the offline LLM reads PIL images, bytes, local paths and data: URLs; fetch "
            f"{text[:60]!r} first (the server's gateway fetches URLs safely)"
        )
    if text.startswith("data:"):
        import base64

        return base64.b64decode(text.split(",", 1)[1])
    return Path(text.removeprefix("file://")).read_bytes()
