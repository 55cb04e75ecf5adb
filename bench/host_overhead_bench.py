"""Host-side cost of one engine decode step at a large batch, split by phase.

    PYTHONPATH=. .venv/bin/python bench/host_overhead_bench.py            # tiny model, CPU
    PYTHONPATH=. .venv/bin/python bench/host_overhead_bench.py --graphs   # + graph packing path
    python3 bench/host_overhead_bench.py --device cuda --model ernie-4.5-vl-28b-a3b \\
        --load-format dummy --dtype bfloat16

B requests (distinct random text prompts, greedy, ignore_eos) are queued and stepped until
every one is decoding; then `--steps` decode steps are timed plain (ms/step, and the model
forward alone: `runner.model` forward + LM head, or the graph replay, synchronised on CUDA),
then the same number again with a timer around each phase:

  schedule   Scheduler.schedule (block allocation included)
  build      StepSequence building (LLMEngine._step_sequences / _step_sequence)
  packing    ModelRunner.run minus the forward (input tensors, slot mapping, block tables,
             graph buffer fills, logits split)
  forward    the model forward + LM head (eager) or the graph replay; synchronised on CUDA
  cache      KVCacheManager.cache_blocks (prefix-cache registration)
  sampling   Sampler call
  append     LLMEngine._append (stop checks, outputs)
  other      the rest of LLMEngine.step (logits gather, .tolist(), loops)

host = step - forward: in the plain run, the step minus a separately timed forward; in
the instrumented run, the step minus the forward timed inside it (steadier on a loaded
CPU, where the forward's own noise can exceed the host time). The phase timers cost a
little themselves (per-request wrappers). `--profile N` prints cProfile's top N functions
over a third pass of steps (engine code and builtins only).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.llm_engine import EngineArgs, LLMEngine
from engine.model_runner import ModelRunner
from engine.multimodal import media_token_ids
from engine.sampling_params import SamplingParams


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def make_engine(args: argparse.Namespace) -> LLMEngine:
    blocks_per_seq = -(-(args.prompt_len + args.new) // 16)
    engine = LLMEngine(
        EngineArgs(
            model=args.model,
            load_format=args.load_format,
            device=args.device,
            dtype=args.dtype,
            max_num_seqs=args.batch,
            max_model_len=args.max_model_len,
            max_num_batched_tokens=args.max_batched_tokens,
            num_kv_blocks=args.batch * blocks_per_seq + 2,
            enable_prefix_caching=not args.no_prefix_caching,
        )
    )
    if args.graphs and engine.device.type != "cuda":
        r = engine.runner
        assert isinstance(r, ModelRunner)
        engine.runner = ModelRunner(
            r.model,
            r.cfg,
            r.num_blocks,
            r.block_size,
            r.dtype,
            r.device,
            cuda_graphs=True,
            max_model_len=args.max_model_len,
        )
    return engine


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--model, --load-format, --device, --dtype (the engine benches' common flags)."""
    ap.add_argument("--model", default="tiny-ernie-vl")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")


def random_prompts(engine: LLMEngine, n: int, length: int, seed: int) -> list[list[int]]:
    """n random text prompts of `length` ids (no media placeholder ids)."""
    g = torch.Generator().manual_seed(seed)
    marks = torch.tensor(sorted(media_token_ids(engine.model_config)) or [-1])
    hi = min(2000, engine.model_config.text.vocab_size)
    out = []
    for _ in range(n):
        ids = torch.randint(100, hi, (length,), generator=g)
        ids[torch.isin(ids, marks)] = 100
        out.append(ids.tolist())
    return out


def add_requests(engine: LLMEngine, args: argparse.Namespace) -> None:
    params = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
    for i, ids in enumerate(random_prompts(engine, args.batch, args.prompt_len, seed=0)):
        engine.add_request(f"r{i}", ids, params)


class Phases:
    """Accumulated seconds per phase, with wrappers that add to them."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.t: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, name: str, fn: Callable[..., Any], synced: bool = False) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            if not self.on:
                return fn(*a, **k)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if synced and not (
                self.dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
            ):
                sync(self.dev)
            self.t[name] += time.perf_counter() - t0
            return out

        return timed


def instrument(engine: LLMEngine, ph: Phases) -> None:
    eng: Any = engine
    eng.step = ph.wrap("step", eng.step, synced=True)
    eng.scheduler.schedule = ph.wrap("schedule", eng.scheduler.schedule)
    for name in ("_step_sequences", "_step_sequence"):
        if hasattr(eng, name):
            setattr(eng, name, ph.wrap("build", getattr(eng, name)))
    eng.runner.run = ph.wrap("runner", eng.runner.run, synced=True)
    model = eng.runner.model
    model.forward = ph.wrap("forward", model.forward, synced=True)
    model.compute_logits = ph.wrap("forward", model.compute_logits, synced=True)
    graphs = getattr(eng.runner, "graphs", None)
    if graphs is not None and engine.device.type == "cuda":
        # time the replays of the graphs already captured (no recapture: a second capture
        # into the shared pool trips the caching allocator) and of any captured later
        for graph, _ in graphs.graphs.values():
            graph.replay = ph.wrap("forward", graph.replay, synced=True)
        make = graphs.make_graph

        def make_timed() -> Any:
            g = make()
            g.replay = ph.wrap("forward", g.replay, synced=True)
            return g

        graphs.make_graph = make_timed
    eng.kv.cache_blocks = ph.wrap("cache", eng.kv.cache_blocks)
    sampler = eng.sampler
    eng.sampler = ph.wrap("sampling", sampler)
    eng._append = ph.wrap("append", eng._append)


def forward_only(engine: LLMEngine, steps: int) -> float:
    """ms of the model forward alone (+ LM head), or the graph replay, at this batch."""
    r: Any = engine.runner
    dev = engine.device
    g = getattr(r, "graphs", None)
    n = len(engine.scheduler.running)
    if g is not None and g.bucket(n) is not None:
        graph, _ = g._graph(g.bucket(n))  # its inputs: the last step's (same KV rewritten)

        def run() -> None:
            with torch.inference_mode():
                graph.replay()

    else:
        ids = torch.zeros(n, dtype=torch.long, device=dev)
        pos = torch.zeros(3, n, dtype=torch.long, device=dev)
        from engine.layers.attention import AttentionMetadata

        meta = AttentionMetadata(
            slot_mapping=torch.full((n,), -1, dtype=torch.long, device=dev),
            block_tables=torch.zeros(n, 1, dtype=torch.int32, device=dev),
            seq_lens=torch.ones(n, dtype=torch.int32, device=dev),
            query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=dev),
        )

        def run() -> None:
            with torch.inference_mode():
                r.model.compute_logits(r.model(ids, pos, r.kv_caches, meta))

    run()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    sync(dev)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=128, help="max_tokens per request")
    ap.add_argument("--warmup", type=int, default=5, help="decode steps before timing")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--graphs", action="store_true", help="CPU: the graph path (eager stand-in)")
    ap.add_argument("--profile", type=int, default=0, help="print cProfile's top N")
    args = ap.parse_args()
    passes = 3 if args.profile else 2
    assert args.new > args.warmup + passes * args.steps + 2, "--new too small for the steps"

    torch.manual_seed(0)
    engine = make_engine(args)
    dev = engine.device
    add_requests(engine, args)
    started: set[str] = set()
    while len(started) < args.batch:  # prefill (and the first decode rows) untimed
        started.update(o.request_id for o in engine.step())
    for _ in range(args.warmup):
        engine.step()
    assert len(engine.scheduler.running) == args.batch and not engine.scheduler.waiting

    graphs = getattr(engine.runner, "graphs", None)
    path = "graph" if graphs is not None else "eager"
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    sync(dev)
    step_ms = (time.perf_counter() - t0) / args.steps * 1e3
    fwd_ms = forward_only(engine, args.steps)

    ph = Phases(dev)
    instrument(engine, ph)
    engine.step()  # untimed: the wrappers' first call
    ph.on = True
    for _ in range(args.steps):
        engine.step()
    sync(dev)
    ph.on = False
    t = {k: v / args.steps * 1e3 for k, v in ph.t.items()}

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(
        f"# {args.model} {args.dtype} on {name} ({torch.get_num_threads()} threads), "
        f"batch {args.batch}, prompt {args.prompt_len}, {path} decode path, "
        f"{args.steps} steps"
    )
    print(f"step (plain)        {step_ms:8.2f} ms")
    print(f"forward alone       {fwd_ms:8.2f} ms   ({path}: model + LM head)")
    print(f"host = step - fwd   {step_ms - fwd_ms:8.2f} ms")
    print(f"decode tok/s        {args.batch / step_ms * 1e3:8.0f}")
    print("phases (instrumented run, ms/step):")
    fwd = t.get("forward", 0.0)
    runner = t.get("runner", 0.0)
    rows = [
        ("schedule", t.get("schedule", 0.0)),
        ("build", t.get("build", 0.0)),
        ("packing", runner - fwd),
        ("forward", fwd),
        ("cache", t.get("cache", 0.0)),
        ("sampling", t.get("sampling", 0.0)),
        ("append", t.get("append", 0.0)),
    ]
    rows.append(("other", t.get("step", 0.0) - sum(v for _, v in rows)))
    for k, v in rows:
        print(f"  {k:<10} {v:8.2f}")
    print(f"  host       {t.get('step', 0.0) - fwd:8.2f}  (step - forward, instrumented)")
    if args.profile:  # a third pass of steps, engine code only
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            engine.step()
        prof.disable()
        stats = pstats.Stats(prof).sort_stats("tottime")
        stats.print_stats(r"engine/(?!layers|models)|builtins|method", args.profile)


if __name__ == "__main__":
    main()
