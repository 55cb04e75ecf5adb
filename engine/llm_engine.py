"""The engine loop: requests in, one scheduled model step at a time, token diffs out.

`add_request` validates and queues; `step` schedules, runs the model once over the whole
flat batch, samples the rows that finished their prompt (or decode), applies stop
conditions and returns what changed. `abort` frees a request at any point. Single
threaded: a server drives it from one thread.

Async scheduling (`EngineArgs.async_scheduling`, on by default): `step` schedules and
launches the next step before it reads this one's tokens. A request whose token is still
on the device is pending (`Request.num_pending`): the scheduler counts it, and the step
reads it on the device (new prompts and prompt chunks wait for a call that reads the
tokens first, unless `ASYNC_WITH_ARRIVALS`). The host then appends, checks stops and
returns while the GPU computes. Rows of requests that ended meanwhile (EOS, abort, a stop
string) compute one token nobody reads: their blocks go back to the pool at once, which is
safe because every later use of a block is queued behind that step on the stream.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from chat.template import ChatTemplate
from chat.tokenizer import AddedToken, Tokenizer
from engine.config import ModelConfig
from engine.configs import NAMED_CONFIGS, named_config
from engine.kv_cache import KVCacheManager
from engine.model_runner import ModelRunner, StepSequence
from engine.models import ErnieModel, build_random_model, load_model
from engine.multimodal import MediaInput, PreparedPrompt, prepare_prompt
from engine.parallel import check_tp_size, use_tp
from engine.request import Request, RequestOutput, RequestStatus
from engine.sampler import LogprobsTensors, RequestSamplingState, Sampler, host_to_device
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from engine.tp_executor import TPModelRunner, TPWorkers, tp_devices

ASYNC_WITH_ARRIVALS = False
"""Async scheduling also plans new prompts and prompt chunks into the step launched ahead
(True), or launches ahead only steps where every request decodes and nothing waits (False:
an arrival makes the next call read the tokens first). Off: not shown faster on the H200
yet (bench/RESULTS.md, session 9); the tests run both."""

TOKENS_COPY_BESIDE = True
"""A step's sampled tokens go to the host on a copy stream of their own, so the copy is not
in the main stream between the sampling and the next step's input copies (each hop between
a kernel and a copy there waited ~4.5 us on an H200). False: on the main stream."""

AfterLayer = Callable[[ScheduledStep, int], None]
"""Called with the step's plan once layer i's KV is in the cache (KV streaming)."""


class RequestError(ValueError):
    """A request the engine cannot take (too long, bad media, duplicate id)."""


@dataclass(frozen=True)
class EngineArgs:
    model: str = "tiny-ernie-vl"
    model_source: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None
    """KV blocks in the pool; None = enough for max_num_seqs full-length sequences (CPU) or
    90% of free GPU memory after the weights."""
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    load_format: str = "auto"
    """"auto": weights from the checkpoint; "dummy": random weights (seeded by `seed`) for
    a named config (engine/configs.py) or a directory holding config.json. Without a
    tokenizer beside the config the engine takes token ids only."""
    quantization: str | None = None
    """Weight-only quantization of the decoder layers at load: "wint8", "wint4" or None."""
    tensor_parallel_size: int = 1
    """Ranks the model is split over (engine/parallel.py): consecutive GPUs from `device`,
    or CPU processes on the CPU. Rank 0 runs in this process, the others are workers
    (`shutdown()` stops them). With load_format "dummy" each rank draws its own slice's
    random weights, so the model is not the one-rank model's values split."""
    async_scheduling: bool = True
    """Schedule and launch the next step before the host reads this one's tokens (the
    step takes them from the device), so the host's per-step work runs while the GPU
    computes. Not while a request whose token is in flight needs its history to sample
    (seeded, penalties, min_tokens not reached, a reasoning budget), and not with more than
    one rank: those steps run one at a time. Greedy and seeded tokens are the same;
    unseeded random rows draw from the shared generator, which a row computed for a
    request that ended meanwhile also draws from, so their draws differ (the distribution
    does not)."""

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', not {self.load_format!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be at least 1, not {self.tensor_parallel_size}"
            )


def resolve_model_path(name: str, source: str | None = None) -> Path:
    from engine.hub import resolve_model
    from engine.tiny import TINY_MODEL_NAME, ensure_tiny_model

    if name == TINY_MODEL_NAME:
        return ensure_tiny_model()
    return resolve_model(name, source=source)


class TokenIdsOnly:
    """The tokenizer of an engine that has none (a `dummy` model from a config alone): text
    is refused, token ids pass, and generated tokens decode to no text."""

    eos_token_id = bos_token_id = pad_token_id = None

    @property
    def special_tokens(self) -> dict[str, str]:
        return {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise RequestError(
            "this engine has no tokenizer (load_format='dummy' from a config alone): "
            "send prompt token ids, not text"
        )

    def token_to_id(self, token: str) -> int | None:
        return None

    def added_token(self, token_id: int) -> AddedToken | None:
        return None

    def token_bytes(self, token_id: int) -> bytes:
        return b""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return ""


def _tokenizer(path: Path | None, required: bool) -> Tokenizer | TokenIdsOnly:
    """The directory's tokenizer; a `dummy` model may have none."""
    if path is not None and (required or (path / "tokenizer.model").is_file()):
        return Tokenizer.from_dir(path)
    return TokenIdsOnly()


def _config(args: EngineArgs) -> tuple[Path | None, ModelConfig]:
    """(model directory or None, config) as `args.load_format` says; reads no weights."""
    if args.load_format == "auto":
        path = resolve_model_path(args.model, args.model_source)
        return path, ModelConfig.from_dir(path)
    named = named_config(args.model)
    if named is not None:
        return None, ModelConfig.from_dict(named)
    if (Path(args.model) / "config.json").is_file():
        return Path(args.model), ModelConfig.from_dir(Path(args.model))
    raise ValueError(
        f"load_format='dummy' takes a named config ({', '.join(NAMED_CONFIGS)}) or a "
        f"directory holding config.json, not {args.model!r}"
    )


def _load(
    args: EngineArgs, dtype: torch.dtype, device: torch.device
) -> tuple[Path | None, ErnieModel, ModelConfig]:
    """(model directory or None, model, config) as `args.load_format` says. Inside
    `engine.parallel.use_tp` the model is that rank's slice."""
    dir_, cfg = _config(args)
    if args.load_format == "auto":
        assert dir_ is not None
        return (dir_, *load_model(dir_, dtype, device, args.quantization))
    model = build_random_model(cfg, dtype, device, args.seed, quantization=args.quantization)
    return dir_, model, cfg


def _max_model_len(args: EngineArgs, cfg: ModelConfig) -> int:
    limit = cfg.text.max_position_embeddings
    return min(args.max_model_len or limit, limit)


def _runner(
    args: EngineArgs, model: ErnieModel, cfg: ModelConfig, num_blocks: int, device: torch.device
) -> ModelRunner:
    return ModelRunner(model, cfg, num_blocks, args.block_size, getattr(torch, args.dtype), device)


def load_for_rank(
    args: EngineArgs, num_blocks: int, device: torch.device
) -> tuple[ModelRunner, ModelConfig]:
    """A tensor-parallel worker's runner (called inside `use_tp`)."""
    _, model, cfg = _load(args, getattr(torch, args.dtype), device)
    return _runner(args, model, cfg, num_blocks, device), cfg


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.runner: ModelRunner | TPModelRunner
        if args.tensor_parallel_size == 1:
            self.path, self.model, self.model_config = _load(args, self.dtype, self.device)
            self.max_model_len = _max_model_len(args, self.model_config)
            num_blocks = args.num_kv_blocks or self._default_num_blocks()
            self.runner = _runner(args, self.model, self.model_config, num_blocks, self.device)
        else:
            num_blocks = self._start_tensor_parallel(args)
        self.tokenizer = _tokenizer(self.path, required=args.load_format == "auto")
        self.chat_template = ChatTemplate.from_dir(self.path) if self.path else ChatTemplate()
        self.kv = KVCacheManager(args.block_size, num_blocks, args.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                args.max_num_seqs, args.max_num_batched_tokens, args.enable_chunked_prefill
            ),
            self.kv,
        )
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(args.seed))
        self.requests: dict[str, Request] = {}
        self.last_preempted: list[Request] = []
        """Requests the last step sent back to the queue (recompute)."""
        self._arrivals = itertools.count()
        self._position_dims = 2 if self.model_config.text.mrope_section is not None else 1
        """Dims of the positions the runner builds for `StepSequence.positions=None`."""
        self.think_end_id = self.tokenizer.token_to_id("</think>")
        self.think_start_id = self.tokenizer.token_to_id("<think>")
        self.async_scheduling = args.async_scheduling and args.tensor_parallel_size == 1
        self._inflight: _Launched | None = None
        """The step launched ahead (async scheduling), its tokens still on the device."""
        self._undelivered: list[RequestOutput] = []
        """Outputs read while a failed launch ahead raised: the next call returns them."""
        self._copy_stream: torch.cuda.Stream | None = None  # the tokens' copies to the host
        self._tokens_read: torch.cuda.Event | None = None  # the last of them is done

    def _start_tensor_parallel(self, args: EngineArgs) -> int:
        """Check the split, start ranks 1..N-1, load rank 0 here; the number of blocks."""
        _, cfg = _config(args)
        t = cfg.text
        check_tp_size(t.num_heads, t.num_kv_heads, args.tensor_parallel_size)
        devices = tp_devices(args.device, args.tensor_parallel_size)
        self.max_model_len = _max_model_len(args, cfg)
        num_blocks = args.num_kv_blocks or self._default_num_blocks()
        workers = TPWorkers(args, num_blocks, devices)
        try:
            tp = workers.connect(devices[0])
            with use_tp(tp):
                self.path, self.model, self.model_config = _load(args, self.dtype, self.device)
            workers.wait_ready()
            runner = _runner(args, self.model, self.model_config, num_blocks, self.device)
        except BaseException:
            workers.stop()
            raise
        self.runner = TPModelRunner(runner, self.model_config, tp, workers)
        self._finalizer = weakref.finalize(self, workers.stop)
        return num_blocks

    def shutdown(self) -> None:
        """Stop tensor-parallel workers (none with one rank). Idempotent."""
        if isinstance(self.runner, TPModelRunner):
            self.runner.shutdown()

    def _default_num_blocks(self) -> int:
        per_seq = -(-min(self.max_model_len, 4096) // self.args.block_size)
        return max(per_seq * min(self.args.max_num_seqs, 8), per_seq) + 1

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = self.model_config.text.eos_token_ids
        if not ids and self.tokenizer.eos_token_id is not None:
            ids = (self.tokenizer.eos_token_id,)
        return ids

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        media: list[MediaInput] | None = None,
        cache_salt: str | None = None,
    ) -> None:
        self.enqueue(self.make_request(request_id, prompt_token_ids, params, media, cache_salt))

    def enqueue(self, req: Request) -> None:
        """Queue a request built by `make_request`."""
        if req.request_id in self.requests:
            raise RequestError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def make_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        media: list[MediaInput] | None = None,
        cache_salt: str | None = None,
        *,
        prompt: PreparedPrompt | None = None,
    ) -> Request:
        """Validate and build a request without queueing it. `prompt`: already prepared
        (a decode instance lays out positions without encoding media)."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        media = media or []
        self._validate(prompt_token_ids, params)
        if prompt is None:
            prompt = prepare_prompt(self.model, self.model_config, prompt_token_ids, media)
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_token_ids)
        max_tokens = min(max_tokens, self.max_model_len - len(prompt_token_ids))
        sampling = RequestSamplingState(
            params=params,
            prompt_token_ids=prompt_token_ids,
            eos_token_ids=self.eos_token_ids,
            think_end_token_id=self.think_end_id,
            in_reasoning=self._opens_reasoning(prompt_token_ids),
        )
        return Request(
            request_id,
            prompt,
            media,
            params,
            sampling,
            max_tokens,
            arrival=next(self._arrivals),
            cache_salt=cache_salt,
        )

    def join_running(
        self, req: Request, first_token: int, logprobs: list[dict[int, float]] | None = None
    ) -> RequestOutput:
        """Take a request whose prompt KV is already in this cache (computed elsewhere)
        and its first token: it joins the running batch. For decode instances."""
        req.num_computed_tokens = req.num_prompt_tokens
        req.status = RequestStatus.RUNNING
        self.requests[req.request_id] = req
        self.scheduler.add_running(req)
        out = self._append(req, first_token, None, 0)
        out.new_logprobs = logprobs
        return out

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.model_config.text.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; this model serves at most "
                f"{self.max_model_len} (max_model_len), leaving room for one output token"
            )
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len {self.max_model_len}"
            )

    def _opens_reasoning(self, ids: list[int]) -> bool:
        """The prompt leaves the model inside `<think>` (ERNIE's thinking mode)."""
        for tok in reversed(ids):
            if tok == self.think_end_id:
                return False
            if tok == self.think_start_id:
                return True
        return False

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and not req.status.is_finished:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ------------------------------------------------------------------ stepping

    def step(
        self,
        after_layer: AfterLayer | None = None,
        before_run: Callable[[ScheduledStep], list[int]] | None = None,
    ) -> list[RequestOutput]:
        """One scheduled step. `before_run(plan)` returns the KV blocks `after_layer` will
        read at every layer (a tensor-parallel runner gathers their heads from every rank
        first).

        With async scheduling a step may already be on the device (launched by the last
        call): then this call launches the one after it, if it can, and returns the first
        one's outputs. A request aborted or stopped meanwhile gets no more outputs."""
        launched, self._inflight = self._inflight, None
        if launched is not None and all(r.status.is_finished for r in launched.requests):
            launched = None  # every row of it ended meanwhile: nothing to report
        if launched is None:
            plan = self.scheduler.schedule()
            self.last_preempted = plan.preempted
            if plan.is_empty:
                outputs, self._undelivered = self._undelivered, []
                return outputs
            export = before_run(plan) if before_run is not None else None
            hook = None if after_layer is None else (lambda i: after_layer(plan, i))
            launched = self._run_plan(plan, self._step_sequences(plan), hook, export)
        else:
            self.last_preempted = []
        if self.async_scheduling and after_layer is None and before_run is None:
            try:
                self._inflight = self._launch_next(launched)
            except BaseException:
                # the step planned ahead failed to launch: read this one's tokens, so no
                # request counts a token it never got; the next call hands them out
                self._undelivered.extend(self._resolve(launched))
                raise
        outputs = self._resolve(launched)
        if self._undelivered:
            outputs, self._undelivered = self._undelivered + outputs, []
        ahead = self._inflight
        if ahead is not None and all(r.status.is_finished for r in ahead.requests):
            self._inflight = None  # every row of it has ended: let its requests go
        return outputs

    def _step_sequences(self, plan: ScheduledStep) -> list[StepSequence]:
        step_sequence = self._step_sequence
        return [step_sequence(r, n) for r, n in zip(plan.requests, plan.num_tokens, strict=True)]

    def _run_plan(
        self,
        plan: ScheduledStep,
        seqs: list[StepSequence],
        hook: Callable[[int], None] | None = None,
        export: list[int] | None = None,
        token_ids: torch.Tensor | None = None,
    ) -> _Launched:
        """Launch the plan's forward and sampling; its tokens stay on the device."""
        if token_ids is None:  # (a tensor-parallel runner takes no device ids)
            logits = self.runner.run(seqs, hook, export)
        else:
            logits = self.runner.run(seqs, hook, export, token_ids=token_ids)
        for req, n in zip(plan.requests, plan.num_tokens, strict=True):
            req.num_computed_tokens += n
        return self._sample(plan.requests, logits)

    def _sample(self, requests: list[Request], logits: list[torch.Tensor]) -> _Launched:
        """Sample the rows that asked for logits; the tokens start their way to the host."""
        done = [r for r, lg in zip(requests, logits, strict=True) if lg.shape[0] > 0]
        if not done:
            return _Launched(requests, done)
        rows = _stack_rows(logits) if len(done) == len(logits) else None
        if rows is None:
            rows = torch.cat([lg for lg in logits if lg.shape[0] > 0])
        # with async scheduling the next step reads these tokens on the device: from the
        # decode graphs' buffer, without a copy, where the sampler can write them there
        buffer = getattr(self.runner, "token_buffer", None)
        out = buffer(len(done)) if self.async_scheduling and buffer is not None else None
        if out is not None:
            self._after_tokens_read(out)  # the buffer still holds the last step's tokens
        sampled = self.sampler(rows, [r.sampling for r in done], out)
        tokens = sampled.sampled_token_ids
        host, ready = tokens, None
        if out is not None and not tokens.is_cuda:
            host = tokens.clone()  # the next step's sampling overwrites the buffer at once
        if tokens.is_cuda:  # a pinned copy and an event: reading it waits for this step only
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            ready = torch.cuda.Event()
            if TOKENS_COPY_BESIDE:
                side = self._copy_stream
                if side is None:
                    side = self._copy_stream = torch.cuda.Stream(tokens.device)
                side.wait_stream(torch.cuda.current_stream(tokens.device))
                with torch.cuda.stream(side):
                    host.copy_(tokens, non_blocking=True)
                    ready.record(side)
                tokens.record_stream(side)  # not reused by the main stream before the copy
                self._tokens_read = ready
            else:
                host.copy_(tokens, non_blocking=True)
                ready.record()
        return _Launched(requests, done, tokens, host, ready, sampled.logprobs)

    def _resolve(self, launched: _Launched) -> list[RequestOutput]:
        """Wait for a launched step's tokens; register full blocks; append; outputs."""
        cache_blocks = self.kv.cache_blocks
        running = RequestStatus.RUNNING
        for req in launched.requests:
            if req.status == running:  # not ended, nor preempted by a step planned ahead
                cache_blocks(req, req.num_computed_tokens)
        if not launched.done:
            return []
        if launched.ready is not None:
            launched.ready.synchronize()
        tokens = launched.host.tolist()
        append, lp = self._append, launched.logprobs
        return [
            append(req, tok, lp, i)
            for i, (req, tok) in enumerate(zip(launched.done, tokens, strict=True))
            if not req.status.is_finished
        ]

    def _launch_next(self, launched: _Launched) -> _Launched | None:
        """Schedule and launch the step after `launched` before its tokens reach the host.
        A request that sampled a token there and goes on decodes it read on the device (it
        is pending: `Request.num_pending`); the scheduler plans the rest as usual (new
        arrivals, prompt chunks, joins, preemption). None when a pending request's sampling
        reads its output so far (see `EngineArgs.async_scheduling`) or nothing is left to
        run: the next call then schedules after reading the tokens."""
        # `launched`'s token is not appended yet: a request goes on if it may take two more
        going = [
            r
            for r in launched.done
            if not r.status.is_finished and len(r.output_token_ids) + 2 <= r.max_tokens
        ]
        if not all(self._async_ok(r) for r in going):
            return None
        if not ASYNC_WITH_ARRIVALS and (
            self.scheduler.waiting or len(launched.done) != len(launched.requests)
        ):
            return None
        for r in going:
            r.num_pending = 1
        plan = self.scheduler.schedule()
        self.last_preempted = [*self.last_preempted, *plan.preempted]  # this call's, both plans
        if plan.is_empty:
            return None
        seqs = self._step_sequences(plan)
        # rows whose input is a pending token, and that token's row in `launched`
        row_of = {r.request_id: i for i, r in enumerate(launched.done)}
        dst, src, flat = [], [], 0
        for r, n in zip(plan.requests, plan.num_tokens, strict=True):
            flat += n
            if r.num_pending and r.num_computed_tokens + n > r.num_tokens:
                dst.append(flat - 1)
                src.append(row_of[r.request_id])
        ids = None
        if dst:
            ids = launched.tokens
            assert ids is not None
            if dst != list(range(flat)) or src != list(range(len(launched.done))):
                flat_ids = [t for s in seqs for t in s.token_ids]
                host = host_to_device(flat_ids, torch.long, ids.device)
                index = host_to_device([dst, src], torch.long, ids.device)
                host[index[0]] = ids[index[1]]
                ids = host
                self._after_tokens_read(ids)  # the graphs copy these into the token buffer
        return self._run_plan(plan, seqs, token_ids=ids)

    def _after_tokens_read(self, t: torch.Tensor) -> None:
        """Order the current stream's next work after the last tokens' copy to the host (on
        the copy stream): it writes the decode graphs' token buffer, which holds them."""
        if t.is_cuda and self._tokens_read is not None:
            torch.cuda.current_stream(t.device).wait_event(self._tokens_read)

    def _async_ok(self, req: Request) -> bool:
        """Whether the request's next token can be sampled before its last one is known:
        nothing the sampler reads for it depends on the output so far."""
        p = req.params
        return (
            (p.is_greedy or p.seed is None)
            and not p.has_penalties
            and len(req.output_token_ids) >= p.min_tokens
            and p.reasoning_max_tokens is None
            and self._int_positions(req.prompt)
        )

    def _int_positions(self, prompt: PreparedPrompt) -> bool:
        """Whether generated rows of this prompt take positions from one int (text rows)."""
        return prompt.positions.dim() == self._position_dims

    def _step_sequence(self, req: Request, n: int) -> StepSequence:
        start = req.num_computed_tokens
        end = start + n
        prompt = req.prompt
        p = len(prompt.token_ids)
        if start >= p and self._int_positions(prompt):
            # generated tokens only: text rows, no media, positions from one int
            out = req.output_token_ids
            ids = out[start - p : end - p]
            if end - p > len(out):  # the last is a pending token: a placeholder here
                ids = ids + [0] * (end - p - len(out))
            return StepSequence(
                token_ids=ids,
                positions=None,
                num_computed=start,
                block_ids=self.kv.block_ids(req.request_id),
                logits="last" if end - p == len(out) + req.num_pending else "none",
                text_position=start + (prompt.delta if self._position_dims == 2 else 0),
            )
        return StepSequence(
            token_ids=req.token_ids[start:end],
            positions=req.prompt.positions_for(start, end),
            num_computed=start,
            block_ids=self.kv.block_ids(req.request_id),
            media=req.prompt.media,
            vision_rows=None
            if req.prompt.vision_rows is None
            else _rows(req.prompt.vision_rows, start, end),
            logits="last" if end == req.num_tokens else "none",
        )

    def _append(self, req: Request, token: int, logprobs, row: int) -> RequestOutput:
        out = req.output_token_ids
        out.append(token)
        req.num_pending = 0
        sampling, params = req.sampling, req.params
        sampling.append_token(token)
        status = None
        # token in sampling.ending_token_ids(), without building the tuple
        ends = token in params.stop_token_ids or (
            not params.ignore_eos and token in sampling.eos_token_ids
        )
        if ends and len(out) >= max(1, params.min_tokens):
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token
        elif len(out) >= req.max_tokens:
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self.scheduler.finish(req, status)
            self.requests.pop(req.request_id, None)
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=[token],
            finished=status is not None,
            finish_reason=status.finish_reason if status else None,
            stop_reason=req.stop_reason,
            num_prompt_tokens=len(req.prompt.token_ids),
            num_cached_tokens=req.num_cached_tokens,
            num_output_tokens=len(out),
            new_logprobs=None
            if logprobs is None
            else _logprob_dict(logprobs, row, params.logprobs),
        )

    def stop_request(self, request_id: str) -> None:
        """Finish a request as stopped (a stop string matched on the text side)."""
        req = self.requests.pop(request_id, None)
        if req is not None and not req.status.is_finished:
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)

    @property
    def num_used_blocks(self) -> int:
        return self.kv.num_used_blocks

    @property
    def config(self) -> ModelConfig:
        return self.model_config


@dataclass
class _Launched:
    """A step on the device: its requests, and the tokens of those that sampled one."""

    requests: list[Request]
    done: list[Request]  # the requests that sampled a token, in row order
    tokens: torch.Tensor | None = None  # [len(done)] int64 on the device
    host: torch.Tensor | None = None  # the same, on its way to the host (pinned on CUDA)
    ready: torch.cuda.Event | None = None  # recorded after the copy to `host` (CUDA)
    logprobs: LogprobsTensors | None = None


def _stack_rows(logits: list[torch.Tensor]) -> torch.Tensor | None:
    """The rows as one `[n, V]` tensor without a copy when they are consecutive one-row
    views of one buffer (the graph path, the eager split), else None."""
    first = logits[0]
    if first.dim() != 2 or first.shape[0] != 1 or first.stride(1) != 1:
        return None
    ptr, base, stride = first.untyped_storage().data_ptr(), first.storage_offset(), first.stride(0)
    for i, lg in enumerate(logits):
        if (
            lg.shape[0] != 1
            or lg.storage_offset() != base + i * stride
            or lg.untyped_storage().data_ptr() != ptr
        ):
            return None
    return first.as_strided((len(logits), first.shape[1]), (stride, 1), base)


def _rows(mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Vision-expert rows for sequence rows [start, end): generated tokens are text."""
    out = torch.zeros(end - start, dtype=torch.bool)
    p = mask.shape[0]
    if start < p:
        out[: min(end, p) - start] = mask[start : min(end, p)]
    return out


def _logprob_dict(logprobs, row: int, k: int | None) -> list[dict[int, float]] | None:
    """{token id: logprob} of the sampled token (first) and the request's top k."""
    if logprobs is None or k is None:
        return None
    ids = logprobs.token_ids[row, : 1 + k].tolist()
    vals = logprobs.logprobs[row, : 1 + k].tolist()
    return [dict(zip(ids, vals, strict=True))]
