"""Engine decode steps with and without async scheduling, on one engine, in one run.

    PYTHONPATH=. python3 bench/async_scheduling_bench.py --device cuda \\
        --model ernie-4.5-vl-28b-a3b --load-format dummy --dtype bfloat16
    PYTHONPATH=. .venv/bin/python bench/async_scheduling_bench.py --batches 1,8   # CPU, tiny

1. check: the same greedy requests decoded with async scheduling off, then on (prefix
   caching off, so both prefill alike): the tokens must be equal;
2. per batch: B requests (random text prompts, greedy, ignore_eos) stepped until all
   decode, then rounds of `--steps` engine steps with async scheduling off and on in turn
   (`LLMEngine.step`, host work included, wall clock), beside the step's forward alone
   (the graph replay or eager forward + LM head, synchronised): the floor async
   scheduling can reach by hiding the host's work behind the GPU's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.host_overhead_bench import add_model_args, forward_only, random_prompts, sync
from engine.llm_engine import EngineArgs, LLMEngine
from engine.sampling_params import SamplingParams


def decode_all(engine: LLMEngine, tag: str, ps: list[list[int]], new: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    for i, p in enumerate(ps):
        engine.add_request(f"{tag}{i}", p, params)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [out[f"{tag}{i}"] for i in range(len(ps))]


class Waits:
    """Host seconds spent blocked on the device inside engine steps: for a step's tokens
    (`LLMEngine._resolve`) and for the graph inputs' last copy (`DecodeGraphs.copied`)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.tokens = self.inputs = 0.0
        resolve = engine._resolve

        def timed_resolve(launched: Any) -> Any:
            if launched.ready is not None:
                t0 = time.perf_counter()
                launched.ready.synchronize()
                self.tokens += time.perf_counter() - t0
            return resolve(launched)

        engine._resolve = timed_resolve  # type: ignore[method-assign]
        graphs = getattr(engine.runner, "graphs", None)
        if graphs is not None and graphs.copied is not None:
            graphs.copied = _TimedEvent(graphs.copied, self)

    def reset(self) -> None:
        self.tokens = self.inputs = 0.0


class _TimedEvent:
    def __init__(self, event: Any, waits: Waits) -> None:
        self.event, self.waits = event, waits

    def record(self) -> None:
        self.event.record()

    def synchronize(self) -> None:
        t0 = time.perf_counter()
        self.event.synchronize()
        self.waits.inputs += time.perf_counter() - t0


def gpu_idle(engine: LLMEngine, steps: int, out: Path) -> tuple[float, float]:
    """Profile `steps` engine steps: (span ms, GPU idle ms) a step, from the kernels' union."""
    from torch.profiler import ProfilerActivity, profile

    sync(engine.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # no CPU ops: light on the host
        for _ in range(steps):
            engine.step()
        sync(engine.device)
    prof.export_chrome_trace(str(out))
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    if not spans:
        return 0.0, 0.0
    busy, (lo, hi) = 0.0, spans[0]
    first = lo
    end = hi
    for a, b in spans[1:]:
        if a > hi:
            busy += hi - lo
            lo, hi = a, b
        else:
            hi = max(hi, b)
        end = max(end, b)
    busy += hi - lo
    span = end - first
    return span / steps / 1e3, (span - busy) / steps / 1e3


def arrivals(engine: LLMEngine, b: int, rounds: int, calls: int = 40, every: int = 4) -> None:
    """B requests decoding (256-token prompts) while a new request arrives every `every`
    calls: generated tokens a second over `calls` calls, per mode, modes rotated a round."""
    from engine import llm_engine

    dev = engine.device
    modes = {
        "sync": (False, True),
        "async, arrivals not ahead": (True, False),
        "async": (True, True),
    }
    windows = 3 * (rounds + 1)  # a warm-up window a mode first: mixed shapes compile there
    base = SamplingParams(temperature=0, max_tokens=windows * (calls + 1) + 8, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for i, p in enumerate(random_prompts(engine, b, 256, seed=7)):
        engine.add_request(f"base{i}", p, base)
    engine.async_scheduling = False
    while engine.scheduler.waiting or any(not r.output_token_ids for r in engine.scheduler.running):
        engine.step()
    news = random_prompts(engine, windows * calls // every + 3, 256, seed=8)
    rate: dict[str, list[float]] = {name: [] for name in modes}
    k = 0
    for r in range(-1, rounds):  # round -1: warm-up, not counted
        names = list(modes)[r % 3 :] + list(modes)[: r % 3]
        for name in names:
            engine.async_scheduling, llm_engine.ASYNC_WITH_ARRIVALS = modes[name]
            engine.step()
            sync(dev)
            tokens, t0 = 0, time.perf_counter()
            for i in range(calls):
                if i % every == 0:
                    engine.add_request(f"new{k}", news[k], short)
                    k += 1
                tokens += sum(len(o.new_token_ids) for o in engine.step())
            sync(dev)
            if r >= 0:
                rate[name].append(tokens / (time.perf_counter() - t0))
    engine.async_scheduling, llm_engine.ASYNC_WITH_ARRIVALS = False, True
    engine.step()
    for rid in list(engine.requests):
        engine.abort(rid)
    assert engine.num_used_blocks == 0
    s = statistics.median(rate["sync"])
    print(
        f"arrivals: b{b} decoding (256-token prompts), a new 256-token prompt every {every} calls"
    )
    print("| mode | tok/s (min-max) | vs sync |")
    print("|---|---|---|")
    for name, v in rate.items():
        m = statistics.median(v)
        print(f"| {name} | {m:.0f} ({min(v):.0f}-{max(v):.0f}) | {m / s - 1:+.1%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--prompt-lens", default="512,768,768", help="one per batch")
    ap.add_argument("--steps", type=int, default=20, help="steps a timed run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--trace-dir", help="profile 6 steps a mode at each batch, traces here")
    ap.add_argument(
        "--arrivals",
        type=int,
        default=64,
        help="then B requests decoding while a new one (256-token prompt, 16 tokens) "
        "arrives every 4th call: tok/s sync, async without arrivals ahead, async (0: skip)",
    )
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    lens = [int(n) for n in args.prompt_lens.split(",")]
    lens = (lens + lens[-1:] * len(batches))[: len(batches)]
    # decode steps a request takes here at most: those while the others prefill (16384
    # prompt tokens a step), warm-up, the timed rounds, the traces
    prefill_steps = max(-(-b * n // 16384) for b, n in zip(batches, lens, strict=True))
    new = prefill_steps + args.warmup + 2 * args.rounds * args.steps + 4
    new += 16 if args.trace_dir else 0
    max_len = max(*lens, 64) + max(new, 32) + 8
    if args.arrivals:  # 256-token prompts decoding through 3 modes x (rounds + 1) x 41 calls
        max_len = max(max_len, 256 + 3 * (args.rounds + 1) * 41 + 16)
    blocks = max(b * -(-(n + new) // 16) for b, n in zip(batches, lens, strict=True)) + 64
    engine = LLMEngine(
        EngineArgs(
            model=args.model,
            load_format=args.load_format,
            device=args.device,
            dtype=args.dtype,
            max_num_seqs=max(batches),
            max_model_len=max_len,
            max_num_batched_tokens=16384,
            num_kv_blocks=blocks,
            enable_prefix_caching=False,
        )
    )
    dev = engine.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"# {args.model} {args.dtype} on {name}, prefix caching off")

    waits = Waits(engine)
    ps = random_prompts(engine, 8, 64, seed=1)
    engine.async_scheduling = False
    want = decode_all(engine, "s", ps, 32)
    engine.async_scheduling = True
    got = decode_all(engine, "a", ps, 32)
    same = sum(g == w for g, w in zip(got, want, strict=True))
    print(f"check: async == sync tokens for {same}/{len(ps)} requests (8 x 32 greedy)")

    print(
        "| batch (prompt) | sync step ms | async step ms | async vs sync | forward alone ms "
        "| async / forward | sync tok/s | async tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for b, n in zip(batches, lens, strict=True):
        params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        for i, p in enumerate(random_prompts(engine, b, n, seed=b)):
            engine.add_request(f"b{b}-{i}", p, params)
        engine.async_scheduling = False
        started: set[str] = set()
        while len(started) < b:
            started.update(o.request_id for o in engine.step())
        for _ in range(args.warmup):
            engine.step()
        assert len(engine.scheduler.running) == b and not engine.scheduler.waiting
        fwd = forward_only(engine, args.steps)  # now, while every row is a full decode row
        times: dict[bool, list[float]] = {False: [], True: []}
        blocked: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for r in range(args.rounds):
            for mode in (r % 2 == 1, r % 2 == 0):  # order alternates by round
                engine.async_scheduling = mode
                engine.step()  # the switch: a step launched ahead resolves here
                sync(dev)
                waits.reset()
                t0 = time.perf_counter()
                for _ in range(args.steps - 1):
                    engine.step()
                sync(dev)
                per = (args.steps - 1) / 1e3
                times[mode].append((time.perf_counter() - t0) / per)
                blocked[mode].append((waits.tokens / per, waits.inputs / per))
        assert len(engine.scheduler.running) == b, "a request ended inside the timed rounds"
        idle = {}
        if args.trace_dir:
            for mode in (False, True):
                engine.async_scheduling = mode
                engine.step()
                trace = Path(args.trace_dir) / f"b{b}-{'async' if mode else 'sync'}.json"
                idle[mode] = gpu_idle(engine, 6, trace)
        engine.async_scheduling = False
        engine.step()
        for rid in list(engine.requests):
            engine.abort(rid)
        assert engine.num_used_blocks == 0
        for mode in (False, True):
            tok = statistics.median(x for x, _ in blocked[mode])
            inp = statistics.median(y for _, y in blocked[mode])
            step = statistics.median(times[mode])
            line = (
                f"  b{b} {'async' if mode else 'sync '}: step {step:.3f} ms, host blocked on "
                f"tokens {tok:.3f} + graph inputs {inp:.3f} ms, busy {step - tok - inp:.3f} ms"
            )
            if mode in idle:
                line += f"; profiled: span {idle[mode][0]:.3f} ms, GPU idle {idle[mode][1]:.3f} ms"
            print(line)
        s, a = statistics.median(times[False]), statistics.median(times[True])
        print(
            f"| b{b} ({n}) | {s:.3f} ({min(times[False]):.3f}-{max(times[False]):.3f}) "
            f"| {a:.3f} ({min(times[True]):.3f}-{max(times[True]):.3f}) | {a / s - 1:+.1%} "
            f"| {fwd:.3f} | {a / fwd:.3f} | {b / s * 1e3:.0f} | {b / a * 1e3:.0f} |"
        )
        sys.stdout.flush()
    if args.arrivals:
        arrivals(engine, args.arrivals, args.rounds)


if __name__ == "__main__":
    main()
