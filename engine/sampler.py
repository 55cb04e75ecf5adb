"""Batched next-token sampler: B requests, each with its own `SamplingParams`, in one step.

Order of processing (vLLM v1's, except where noted):

1. raw logprobs = log_softmax(model logits), taken first, when any row asks for logprobs.
   Like vLLM's default `logprobs_mode="raw_logprobs"`, reported logprobs describe the model's
   own distribution, not the penalised / truncated one we sample from.
2. penalties: repetition (HF/vLLM: tokens in prompt + output; positive logits divided by the
   penalty, negative ones multiplied), then frequency and presence (OpenAI: output only).
3. min_tokens: EOS (unless ignore_eos) and stop_token_ids get -inf until min_tokens outputs.
   (vLLM runs this before the penalties; the two commute since the penalties keep -inf.)
4. greedy rows (temperature < GREEDY_EPS) take the argmax here, so they are deterministic and
   ignore top-k/top-p/min-p (which cannot change an argmax anyway).
5. temperature, then top-k, then top-p (on the top-k-renormalised distribution), then min-p.
   vLLM applies min-p before top-k/top-p; we follow SGLang's top-k -> top-p -> min-p order.
6. sample by an exponential race: argmax(probs / q) with q ~ Exp(1) i.i.d., which picks token i
   with probability probs[i] and needs no CPU sync (no multinomial).
7. reasoning budget (FastDeploy's `limit_thinking_content_length_v1`, used for ERNIE-4.5-VL):
   a row still in reasoning whose `reasoning_max_tokens` is spent gets `</think>` instead of
   its sampled token; an EOS sampled inside the reasoning is also replaced by `</think>`.
   (FastDeploy's ERNIE-X1 variant injects "\\n</think>\\n\\n"; ERNIE-4.5-VL uses `</think>` alone.)

Seeded requests are reproducible whatever shares the batch: the q row of a seeded request is
drawn from that request's own generator, always V numbers per step, and the generator is
re-seeded at each output position from (seed, position). The draw for position t therefore
depends only on (seed, t): prefill and decode instances, preemption and batch composition
cannot change it. Unseeded rows share one generator (the Sampler's, or torch's default).

What still runs per row on the host: building the small parameter tensors, flattening the
output ids of rows with penalties (prompt ids are cached on the device per request), and one
`exponential_` launch per seeded row. Nothing calls `.item()` or otherwise syncs with the
device. Top-k/top-p sort the whole vocabulary (as vLLM's PyTorch path does); a fused kernel
(FlashInfer-style rejection sampling) would avoid that.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.sampling_params import SamplingParams
from kernels.argmax import argmax

_MASK64 = 2**64 - 1
_NEG_INF = float("-inf")


def step_seed(seed: int, position: int) -> int:
    """Seed for the draw at output `position` of a request seeded with `seed` (splitmix64).

    A bijective mix, so nearby (seed, position) pairs give unrelated generator streams.
    """
    x = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass
class RequestSamplingState:
    """What the sampler needs to know about one request, kept for the request's lifetime.

    The engine appends each emitted token with `append_token` (which also tracks the reasoning
    phase); `output_token_ids` is then the request's output so far. On a decode instance that
    receives a request from prefill, replay the already generated tokens through `append_token`.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: tuple[int, ...] = ()
    """The model's EOS ids: blocked by min_tokens, turned into `</think>` inside reasoning."""
    think_end_token_id: int | None = None
    """The `</think>` id; None disables the reasoning budget for this request."""
    in_reasoning: bool = False
    """True while the output is inside the reasoning block (the prompt opened `<think>`)."""
    num_reasoning_tokens: int = 0
    """Reasoning tokens emitted so far (`</think>` itself is not counted)."""
    generator: torch.Generator | None = None
    """Cache for seeded requests: created on the logits' device, re-seeded every step."""
    _prompt_ids: torch.Tensor | None = field(default=None, init=False, repr=False)
    """Cache of `prompt_token_ids` on the device, for penalties (the prompt never changes)."""

    def append_token(self, token_id: int) -> None:
        """Record an emitted token and advance the reasoning phase."""
        self.output_token_ids.append(token_id)
        if self.in_reasoning:
            if token_id == self.think_end_token_id:
                self.in_reasoning = False
            else:
                self.num_reasoning_tokens += 1

    @property
    def has_reasoning_budget(self) -> bool:
        """True when this step may rewrite the token to `</think>`."""
        return (
            self.in_reasoning
            and self.think_end_token_id is not None
            and self.params.reasoning_max_tokens is not None
        )

    @property
    def reasoning_budget_spent(self) -> bool:
        """True when the next token must be `</think>`."""
        budget = self.params.reasoning_max_tokens
        return self.has_reasoning_budget and self.num_reasoning_tokens >= (budget or 0)

    def ending_token_ids(self) -> tuple[int, ...]:
        """EOS (unless ignore_eos) and stop_token_ids: the ids that would end the request."""
        eos = () if self.params.ignore_eos else self.eos_token_ids
        return eos + tuple(self.params.stop_token_ids)

    def min_tokens_blocked_ids(self) -> tuple[int, ...]:
        """Ids that cannot be sampled this step because min_tokens is not reached yet."""
        if len(self.output_token_ids) >= self.params.min_tokens:
            return ()
        return self.ending_token_ids()

    def prompt_ids_tensor(self, device: torch.device) -> torch.Tensor:
        """The prompt ids as an int64 tensor on `device`, built once per device."""
        if self._prompt_ids is None or self._prompt_ids.device != device:
            ids = torch.tensor(list(self.prompt_token_ids), dtype=torch.int64)
            self._prompt_ids = ids.to(device)
        return self._prompt_ids

    def step_generator(self, device: torch.device) -> torch.Generator:
        """This request's generator, seeded for the current output position."""
        assert self.params.seed is not None, "only seeded requests own a generator"
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
        position = len(self.output_token_ids)
        self.generator.manual_seed(step_seed(self.params.seed & _MASK64, position))
        return self.generator


@dataclass
class LogprobsTensors:
    """Logprobs of one step, vLLM's layout. B requests, K = the batch's largest `logprobs`.

    Row i's own answer is column 0 plus the first `params.logprobs` top columns.
    """

    token_ids: torch.Tensor  # [B, 1 + K] int64: column 0 the sampled token, then top-K ids
    logprobs: torch.Tensor  # [B, 1 + K] float32: raw log_softmax at those ids, top-K descending
    ranks: torch.Tensor  # [B] int64: rank of the sampled token in the raw distribution (1 = best)


@dataclass
class SamplerOutput:
    """Result of one sampling step."""

    sampled_token_ids: torch.Tensor  # [B] int64
    logprobs: LogprobsTensors | None  # None when no row asked for logprobs


@dataclass
class _BatchParams:
    """Per-row sampling parameters as device tensors, plus host flags to skip unused work."""

    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows (their argmax is taken earlier)
    top_k: torch.Tensor  # [B] int64 in [1, V]; V = off
    top_p: torch.Tensor  # [B] float32; 1.0 = off
    min_p: torch.Tensor  # [B] float32; 0.0 = off
    greedy: torch.Tensor  # [B] bool
    any_random: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    max_num_logprobs: int | None

    @classmethod
    def build(
        cls, states: Sequence[RequestSamplingState], vocab_size: int, device: torch.device
    ) -> _BatchParams:
        params = [s.params for s in states]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=_tensor([1.0 if p.is_greedy else p.temperature for p in params], device),
            top_k=_index(top_k, device),
            top_p=_tensor([p.top_p for p in params], device),
            min_p=_tensor([p.min_p for p in params], device),
            greedy=host_to_device([p.is_greedy for p in params], torch.bool, device),
            any_random=not all(p.is_greedy for p in params),
            any_top_k=any(k < vocab_size for k in top_k),
            any_top_p=any(p.top_p < 1.0 for p in params),
            any_min_p=any(p.min_p > 0.0 for p in params),
            max_num_logprobs=min(max(wanted), vocab_size) if wanted else None,
        )


class Sampler:
    """Samples one token per request from a batch of logits. Stateless apart from `generator`."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        """`generator` serves unseeded rows; None = torch's default generator for the device."""
        self.generator = generator

    def __call__(
        self,
        logits: torch.Tensor,
        states: Sequence[RequestSamplingState],
        out: torch.Tensor | None = None,
    ) -> SamplerOutput:
        return self.sample(logits, states, out)

    def sample(
        self,
        logits: torch.Tensor,
        states: Sequence[RequestSamplingState],
        out: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """Pick the next token of each row. `logits` is [B, V] (any float dtype), left untouched.

        `out` (`[B]` int64 on the logits' device): where a batch of plain greedy rows writes
        its tokens (the decode graphs' `fed` buffer, which the next captured step reads);
        other batches return a new tensor."""
        # B requests, V vocab
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(
                f"logits must be [B, V] with B = {len(states)} states, got {tuple(logits.shape)}"
            )
        if all(_plain_greedy(s) for s in states):
            # what the full path below returns for such rows (the argmax of the float32
            # logits: the 16-bit ones upcast exactly, so their argmax is the same)
            return SamplerOutput(argmax(logits, out=out), None)
        vocab_size = logits.shape[1]
        batch = _BatchParams.build(states, vocab_size, logits.device)
        logits = logits.to(torch.float32, copy=True)  # [B, V], ours to modify in place
        raw_logprobs = None
        if batch.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]

        apply_penalties(logits, states)
        apply_min_tokens(logits, states)
        tokens = argmax(logits)  # [B] greedy choice, the answer for greedy rows
        if batch.any_random:
            sampled = self._sample_random(logits, states, batch)  # [B]
            tokens = torch.where(batch.greedy, tokens, sampled)
        tokens = force_reasoning_end(tokens, states)

        logprobs = None
        if raw_logprobs is not None and batch.max_num_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, tokens, batch.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=tokens, logprobs=logprobs)

    def _sample_random(
        self, logits: torch.Tensor, states: Sequence[RequestSamplingState], batch: _BatchParams
    ) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then the exponential race. Returns [B] int64."""
        # B requests, V vocab
        logits = logits / batch.temperature[:, None]  # [B, V]
        if batch.any_top_k or batch.any_top_p:
            logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        if batch.any_min_p:
            logits = apply_min_p(logits, batch.min_p)
        probs = logits.softmax(dim=-1)  # [B, V]
        q = self._exponentials(states, probs)  # [B, V]
        return argmax(probs.div_(q))

    def _exponentials(
        self, states: Sequence[RequestSamplingState], probs: torch.Tensor
    ) -> torch.Tensor:
        """Exp(1) noise [B, V]: seeded rows from their own generator, the rest from a shared one."""
        # B requests, V vocab
        q = torch.ones_like(probs)  # greedy rows draw nothing
        unseeded = [
            i for i, s in enumerate(states) if not s.params.is_greedy and s.params.seed is None
        ]
        if unseeded:
            noise = torch.empty(
                (len(unseeded), probs.shape[1]), dtype=probs.dtype, device=probs.device
            )
            q[_index(unseeded, probs.device)] = noise.exponential_(generator=self.generator)
        for i, state in enumerate(states):
            if not state.params.is_greedy and state.params.seed is not None:
                q[i].exponential_(generator=state.step_generator(probs.device))
        # exponential_ may return exactly 0 on some backends; 0 would make p / q inf or nan.
        return q.clamp_min_(torch.finfo(q.dtype).tiny)


def _plain_greedy(state: RequestSamplingState) -> bool:
    """Greedy, no logprobs, no penalties, no min_tokens block, no reasoning budget: every
    step of `sample` but the argmax leaves this row alone."""
    p = state.params
    return (
        p.is_greedy
        and p.logprobs is None
        and not p.has_penalties
        and len(state.output_token_ids) >= p.min_tokens
        and p.reasoning_max_tokens is None
    )


def apply_penalties(logits: torch.Tensor, states: Sequence[RequestSamplingState]) -> None:
    """Repetition (prompt + output), frequency and presence (output) penalties, in place."""
    rows = [i for i, s in enumerate(states) if s.params.has_penalties]
    if not rows:
        return
    # P penalised rows, V vocab
    device, vocab_size = logits.device, logits.shape[1]
    picked = [states[i] for i in rows]
    index = _index(rows, device)
    sub = logits[index]  # [P, V]
    outputs = torch.tensor(
        list(itertools.chain.from_iterable(s.output_token_ids for s in picked)),
        dtype=torch.int64,
    ).to(device)  # the output ids grow every step: one flat host-to-device copy
    output_counts = _token_counts(outputs, [len(s.output_token_ids) for s in picked], vocab_size)
    prompts = torch.cat([s.prompt_ids_tensor(device) for s in picked])
    prompt_counts = _token_counts(prompts, [len(s.prompt_token_ids) for s in picked], vocab_size)
    seen = (output_counts > 0) | (prompt_counts > 0)  # [P, V]
    repetition = _tensor([s.params.repetition_penalty for s in picked], device)[:, None]
    penalised = torch.where(sub > 0, sub / repetition, sub * repetition)
    sub = torch.where(seen, penalised, sub)
    frequency = _tensor([s.params.frequency_penalty for s in picked], device)[:, None]
    presence = _tensor([s.params.presence_penalty for s in picked], device)[:, None]
    sub = sub - frequency * output_counts - presence * (output_counts > 0)
    logits[index] = sub


def apply_min_tokens(logits: torch.Tensor, states: Sequence[RequestSamplingState]) -> None:
    """Give -inf to ending ids of rows that have not reached min_tokens yet, in place."""
    vocab_size = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for i, state in enumerate(states):
        # An id outside the model's vocabulary can never be sampled, so it needs no mask.
        blocked = [t for t in state.min_tokens_blocked_ids() if t < vocab_size]
        rows.extend([i] * len(blocked))
        cols.extend(blocked)
    if rows:
        logits[_index(rows, logits.device), _index(cols, logits.device)] = _NEG_INF


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask all but the top_k tokens, then all outside the top_p nucleus of what remains.

    Ties with the k-th logit are kept. The nucleus is the shortest prefix of the sorted
    distribution whose mass reaches top_p, so the most likely token always survives.
    """
    # B requests, V vocab
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [B, V]
    kth = sorted_logits.gather(1, (top_k - 1)[:, None])  # [B, 1]
    keep = sorted_logits >= kth  # [B, V], in sorted order
    sorted_probs = sorted_logits.masked_fill(~keep, _NEG_INF).softmax(dim=-1)  # [B, V]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V]
    # Rows with top_p = 1 skip the test: float cumsum error could otherwise cut the tail.
    keep &= (mass_before < top_p[:, None]) | (top_p >= 1.0)[:, None]
    keep_by_id = torch.empty_like(keep).scatter_(1, sorted_ids, keep)  # [B, V]
    return logits.masked_fill(~keep_by_id, _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's top probability."""
    # B requests, V vocab
    probs = logits.softmax(dim=-1)  # [B, V]
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]  # [B, 1]
    return logits.masked_fill(probs < threshold, _NEG_INF)


def force_reasoning_end(
    tokens: torch.Tensor, states: Sequence[RequestSamplingState]
) -> torch.Tensor:
    """Replace the sampled token by `</think>` where the reasoning budget is spent, or where
    EOS was sampled inside a budgeted reasoning block (FastDeploy's v1 semantics)."""
    rows = [i for i, s in enumerate(states) if s.has_reasoning_budget]
    if not rows:
        return tokens
    # R budgeted rows, E the most EOS ids of any of them
    device = tokens.device
    picked = [states[i] for i in rows]
    eos = [() if s.params.ignore_eos else s.eos_token_ids for s in picked]
    width = max(1, max(len(e) for e in eos))
    eos_ids = torch.tensor(
        [list(e) + [-1] * (width - len(e)) for e in eos], dtype=torch.int64, device=device
    )  # [R, E]; -1 never matches a token
    index = _index(rows, device)
    sampled = tokens[index]  # [R]
    spent = torch.tensor([s.reasoning_budget_spent for s in picked], device=device)  # [R]
    force = spent | (sampled[:, None] == eos_ids).any(dim=-1)  # [R]
    think_end = _index([s.think_end_token_id or 0 for s in picked], device)  # [R]
    tokens = tokens.clone()
    tokens[index] = torch.where(force, think_end, sampled)
    return tokens


def gather_logprobs(raw_logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> LogprobsTensors:
    """The sampled token's raw logprob and rank, and the top-k raw logprobs of every row."""
    # B requests, V vocab, K top logprobs
    sampled = raw_logprobs.gather(1, tokens[:, None])  # [B, 1]
    ranks = (raw_logprobs > sampled).sum(dim=-1) + 1  # [B]
    top_logprobs, top_ids = raw_logprobs.topk(k, dim=-1)  # [B, K], descending
    return LogprobsTensors(
        token_ids=torch.cat([tokens[:, None], top_ids], dim=1),
        logprobs=torch.cat([sampled, top_logprobs], dim=1),
        ranks=ranks,
    )


def _token_counts(flat_ids: torch.Tensor, lengths: Sequence[int], vocab_size: int) -> torch.Tensor:
    """How often each vocabulary id occurs in each of N id lists: [N, V] float32.

    `flat_ids` holds the N lists one after another (lengths given), on the target device.
    """
    # N lists, T ids in all, V vocab
    device, num_lists = flat_ids.device, len(lengths)
    lengths_t = torch.tensor(lengths, dtype=torch.int64, device=device)
    # output_size spares a device sync that repeat_interleave would need to size its result.
    rows = torch.repeat_interleave(
        torch.arange(num_lists, device=device), lengths_t, output_size=flat_ids.numel()
    )  # [T]
    # Ids outside the vocabulary land in an extra column that is dropped.
    cols = flat_ids.clamp(max=vocab_size)  # [T]
    counts = torch.zeros((num_lists, vocab_size + 1), dtype=torch.float32, device=device)
    counts.view(-1).index_add_(
        0, rows * (vocab_size + 1) + cols, torch.ones_like(cols, dtype=torch.float32)
    )  # [N, V + 1]
    return counts[:, :vocab_size]


def host_to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device`. On CUDA through pinned memory without a stream sync
    (a pageable copy waits for the queued work), so sampling a step does not wait for the
    step (the engine's async scheduling launches the next step before reading tokens)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _tensor(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return host_to_device(values, torch.float32, device)


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return host_to_device(values, torch.int64, device)
