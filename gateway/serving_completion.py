"""`POST /v1/completions`: raw prompts (text or token ids, one or many) → text choices."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from chat.text_stream import TextOptions
from gateway.backend import GenerateRequest
from gateway.errors import InvalidRequestError
from gateway.generation import ChoiceDecoder, Run, TextDelta, choice_requests
from gateway.generation import open_choices as open_backend_choices
from gateway.logprobs import completion_logprobs
from gateway.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from gateway.serving import (
    SSE_DONE,
    ServingContext,
    check_prompt_length,
    new_request_id,
    sampling_options,
    sse,
    sse_error,
    usage_of,
)


class CompletionService:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def prompt_ids(self, req: CompletionRequest) -> list[list[int]]:
        """Each prompt as token ids (choice i*n + j answers prompt i)."""
        prompt = req.prompt
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = list(prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        ids = [
            self.ctx.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else p
            for p in prompts
        ]
        for token_ids in ids:
            check_prompt_length(len(token_ids), req.max_tokens, self.ctx.backend.max_model_len)
        return ids

    async def start(self, req: CompletionRequest) -> Run:
        model = self.ctx.response_model(req.model)
        if req.echo:
            raise InvalidRequestError("echo is not supported", param="echo")
        prompts = self.prompt_ids(req)
        sampling = sampling_options(req, req.max_tokens, req.logprobs)
        request_id = new_request_id("cmpl")
        requests = []
        for i, ids in enumerate(prompts):
            base = GenerateRequest(f"{request_id}-p{i}", ids, sampling)
            requests.extend(choice_requests(base, req.n))
        started = await open_backend_choices(self.ctx.backend, requests)
        options = TextOptions(
            stop=req.stop_strings(),
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
        )
        decoders = [ChoiceDecoder(i, self.ctx.tokenizer, options) for i in range(len(requests))]
        num_prompt_tokens = sum(len(p) for p in prompts)
        return Run(request_id, model, num_prompt_tokens, started, decoders)

    async def collect(self, run: Run, req: CompletionRequest) -> CompletionResponse:
        await run.run_to_end()
        choices = []
        for d in run.decoders:
            choice = CompletionChoice(
                index=d.index,
                text=d.content,
                finish_reason=d.finish_reason,
                stop_reason=d.stop_reason,
            )
            if req.logprobs is not None:
                choice.logprobs = completion_logprobs(
                    self.ctx.tokenizer, d.token_ids, d.logprobs, req.logprobs
                )
            if req.return_token_ids:
                choice.prompt_token_ids = run.started[d.index].request.prompt_token_ids
                choice.completion_token_ids = d.token_ids
            choices.append(choice)
        usage = usage_of(run.num_prompt_tokens, run.decoders)
        return CompletionResponse(id=run.request_id, model=run.model, choices=choices, usage=usage)

    async def stream(self, run: Run, req: CompletionRequest) -> AsyncGenerator[str, None]:
        try:
            async with aclosing(run.deltas()) as deltas:
                async for td in deltas:
                    choice = self._chunk_choice(td, req)
                    if choice is not None:
                        yield self._event(run, [choice])
            if req.include_usage:
                usage = usage_of(run.num_prompt_tokens, run.decoders)
                yield self._event(run, [], usage)
        except Exception as exc:  # the status line is gone: report in-band
            yield sse_error(exc)
        yield SSE_DONE

    def _chunk_choice(self, td: TextDelta, req: CompletionRequest) -> CompletionChoice | None:
        owes_tokens = td.token_ids and (req.return_token_ids or req.logprobs is not None)
        if not (td.content or td.finish_reason or owes_tokens):
            return None
        choice = CompletionChoice(
            index=td.index,
            text=td.content,
            finish_reason=td.finish_reason,
            stop_reason=td.stop_reason,
        )
        if req.logprobs is not None and td.logprobs:
            choice.logprobs = completion_logprobs(
                self.ctx.tokenizer, td.token_ids, td.logprobs, req.logprobs
            )
        if req.return_token_ids:
            choice.completion_token_ids = td.token_ids
        return choice

    @staticmethod
    def _event(run: Run, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        response = CompletionResponse(
            id=run.request_id, model=run.model, choices=choices, usage=usage
        )
        return sse(response.model_dump())
