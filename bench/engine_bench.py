"""Offline engine benchmark: prefill and decode throughput of Tandem's engine beside
transformers on the same model shapes, prompts and batch, in one run.

    PYTHONPATH=. .venv/bin/python bench/engine_bench.py      # tiny-ernie-vl on CPU
    python3 bench/engine_bench.py --model ernie-4.5-vl-28b-a3b --load-format dummy \\
        --device cuda --dtype bfloat16 --batches 1,16,64,256 --prompt-len 512 --new 32

Tandem: the whole engine (`LLMEngine`: scheduler, paged KV cache, chunked prefill, the
runner's decode CUDA graphs, sampler), one engine for all batch sizes, greedy,
`ignore_eos`. B random prompts of the same length are queued at once; the prefill phase
lasts until every request has its first token (prompts above --max-batched-tokens are
chunked over several steps, which then also carry the decode rows of requests already
started); the decode phase is the rest. tok/s = prompt tokens / prefill phase and
generated tokens / decode phase, host clock around synchronised steps.

HF: transformers' text model of the same config (`Ernie4_5_VLMoeTextModel` + tied LM head,
random weights built on the device as bench/gpu_bench.py does) with a `DynamicCache`:
prefill = forwards of up to --max-batched-tokens tokens (whole prompts), whose caches are
then joined (untimed); decode = new - 1 forwards of B tokens, argmax on the last row.
Weights are random on both sides (throughput does not depend on their values).

Limits (bench/gpu_bench.py's, measured in the same run): decode = bytes a step must read
(always-read weights + expected share of experts hit + LM head + KV at the mean context) /
copy bandwidth; prefill = 2 x active params x tokens / bf16 matmul peak. Each run is done
twice and the second is reported (the first compiles kernels and captures graphs).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_bench import (
    RESULTS,
    build_hf_text_model,
    free,
    limits,
    param_budget,
    rooflines,
    sync,
)
from engine.config import ModelConfig
from engine.llm_engine import EngineArgs, LLMEngine
from engine.models.ernie45_vl import Ernie45VLForConditionalGeneration
from engine.sampling_params import SamplingParams

Rate = tuple[float, float]  # (prefill tok/s, decode tok/s)
_ids = itertools.count()


def prompts(batch: int, prompt_len: int, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """Random text prompts: no special ids, no media placeholders (they would need media)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, cfg.text.vocab_size, (batch, prompt_len), generator=g)
    marks = [cfg.image_token_id, cfg.video_token_id, cfg.image_start_token_id]
    marks += [cfg.image_end_token_id, cfg.video_start_token_id, cfg.video_end_token_id]
    media = torch.tensor([i for i in marks if i is not None], dtype=ids.dtype)
    ids[torch.isin(ids, media)] = 10
    return ids


# ----------------------------------------------------------------------------- Tandem
def make_engine(args: argparse.Namespace, max_batch: int) -> LLMEngine:
    blocks_per_seq = -(-(args.prompt_len + args.new) // 16)
    return LLMEngine(
        EngineArgs(
            model=args.model,
            load_format=args.load_format,
            device=args.device,
            dtype=args.dtype,
            max_num_seqs=max_batch,
            max_num_batched_tokens=min(max_batch * args.prompt_len, args.max_batched_tokens),
            num_kv_blocks=max_batch * blocks_per_seq + 2,
            enable_prefix_caching=False,
        )
    )


def run_tandem(engine: LLMEngine, batch: int, args: argparse.Namespace) -> Rate:
    dev = engine.device
    params = SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True)
    ids = prompts(batch, args.prompt_len, engine.model_config, batch)
    for row in ids.tolist():
        engine.add_request(f"r{next(_ids)}", row, params)
    started: set[str] = set()
    decoded = 0
    sync(dev)
    t0 = time.perf_counter()
    t1 = 0.0
    while engine.has_unfinished_requests():
        outs = engine.step()
        if len(started) < batch:
            started.update(o.request_id for o in outs)
            if len(started) == batch:
                sync(dev)
                t1 = time.perf_counter()
        else:
            decoded += sum(len(o.new_token_ids) for o in outs)
    sync(dev)
    t2 = time.perf_counter()
    return batch * args.prompt_len / (t1 - t0), decoded / (t2 - t1)


# ----------------------------------------------------------------------------- HF
def new_cache(tcfg: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=tcfg)
    except TypeError:  # older transformers
        return DynamicCache()


def join_caches(caches: list[Any], tcfg: Any) -> Any:
    """One batch's DynamicCache from per-chunk ones (layer by layer, freeing as it goes)."""
    if len(caches) == 1:
        return caches[0]
    out = new_cache(tcfg)
    for i in range(len(caches[0].layers)):
        keys = torch.cat([c.layers[i].keys for c in caches])
        values = torch.cat([c.layers[i].values for c in caches])
        for c in caches:
            c.layers[i].keys = c.layers[i].values = None
        out.update(keys, values, i)
    return out


@torch.inference_mode()
def run_hf(
    hf: Any, tcfg: Any, cfg: ModelConfig, batch: int, args: argparse.Namespace, dev: torch.device
) -> Rate:
    head = hf.embed_tokens.weight  # tied LM head
    ids = prompts(batch, args.prompt_len, cfg, batch).to(dev)
    per = max(1, args.max_batched_tokens // args.prompt_len)  # whole prompts per forward
    caches, nxt = [], []
    sync(dev)
    t0 = time.perf_counter()
    for s in range(0, batch, per):
        caches.append(new_cache(tcfg))
        h = hf(input_ids=ids[s : s + per], past_key_values=caches[-1], use_cache=True)
        nxt.append(F.linear(h.last_hidden_state[:, -1], head).argmax(-1, keepdim=True))
    sync(dev)
    t1 = time.perf_counter()
    cache, tok = join_caches(caches, tcfg), torch.cat(nxt)
    del caches
    sync(dev)
    t2 = time.perf_counter()
    for _ in range(args.new - 1):
        h = hf(input_ids=tok, past_key_values=cache, use_cache=True).last_hidden_state
        tok = F.linear(h[:, -1], head).argmax(-1, keepdim=True)
    sync(dev)
    t3 = time.perf_counter()
    return batch * args.prompt_len / (t1 - t0), batch * (args.new - 1) / (t3 - t2)


# ----------------------------------------------------------------------------- driver
def measure(name: str, fn: Any, *a: Any, warmup: bool) -> Rate | str:
    """fn's second run (the first warms up); an error's name instead if it fails."""
    t = time.perf_counter()
    try:
        if warmup:
            fn(*a)
        rate = fn(*a)
    except Exception as e:  # keep going: the other cells still have value
        traceback.print_exc()
        return "OOM" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
    print(
        f"  {name}: prefill {rate[0]:,.0f} tok/s, decode {rate[1]:,.0f} tok/s "
        f"({time.perf_counter() - t:.1f} s)",
        flush=True,
    )
    return rate


def bench_tandem(
    args: argparse.Namespace, batches: list[int]
) -> tuple[dict[int, Rate | str], Any, dict[str, Any]]:
    """Tandem's rates per batch, the limits of its model, and the model's config.json."""
    t = time.perf_counter()
    engine = make_engine(args, max(batches))
    lm = engine.model
    if isinstance(lm, Ernie45VLForConditionalGeneration):
        lm = lm.language_model
    lim, raw = limits(param_budget(lm), RESULTS["roof"]), engine.model_config.raw
    print(f"Tandem engine built in {time.perf_counter() - t:.1f} s", flush=True)
    ours: dict[int, Rate | str] = {}
    for b in batches:
        ours[b] = measure(f"Tandem b{b}", run_tandem, engine, b, args, warmup=not args.no_warmup)
        for rid in list(engine.requests):  # what a failed run left behind
            engine.abort(rid)
    if engine.device.type == "cuda":
        print(f"  peak allocated {torch.cuda.max_memory_allocated() / 1e9:.1f} GB", flush=True)
    return ours, lim, raw


def bench_hf(
    args: argparse.Namespace, batches: list[int], raw: dict[str, Any]
) -> dict[int, Rate | str]:
    dev = torch.device(args.device)
    t = time.perf_counter()
    hf, tcfg = build_hf_text_model(raw, dev, getattr(torch, args.dtype))
    cfg = ModelConfig.from_dict(raw)
    print(f"HF text model built in {time.perf_counter() - t:.1f} s", flush=True)
    theirs: dict[int, Rate | str] = {}
    for b in batches:
        if b <= args.hf_max_batch:
            warm = not args.no_warmup
            theirs[b] = measure(f"HF b{b}", run_hf, hf, tcfg, cfg, b, args, dev, warmup=warm)
            free(dev)
    return theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny-ernie-vl", help="named config, directory or hub id")
    ap.add_argument("--load-format", default="dummy", choices=("auto", "dummy"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--max-batched-tokens", type=int, default=16384, help="prefill chunk, both")
    ap.add_argument("--hf-max-batch", type=int, default=1 << 30, help="skip HF above this")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-warmup", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    batches = [int(x) for x in args.batches.split(",")]
    rooflines(dev, tiny=dev.type == "cpu")
    free(dev)
    ours, lim, raw = bench_tandem(args, batches)
    free(dev)
    theirs = {} if args.no_hf else bench_hf(args, batches, raw)
    print(
        f"\nmodel {args.model} ({args.load_format}) on {args.device} {args.dtype}, prompt "
        f"{args.prompt_len}, new {args.new}, chunk {args.max_batched_tokens} tokens; "
        "Tandem/HF: throughput ratio (>1 = Tandem faster); of limit: Tandem / limit"
    )
    print(table(batches, ours, theirs, lim, args.prompt_len, args.prompt_len + args.new // 2))


def table(
    batches: list[int],
    ours: dict[int, Rate | str],
    theirs: dict[int, Rate | str],
    lim: Any,
    prompt_len: int,
    ctx: int,
) -> str:
    rows = [
        "| batch | prefill tok/s Tandem | HF | Tandem/HF | limit | of limit "
        "| decode tok/s Tandem | HF | Tandem/HF | limit | of limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in batches:
        lp = b * prompt_len / (lim["prefill"](b * prompt_len) * 1e-3)
        ld = b / (lim["decode"](b, ctx) * 1e-3)
        o, h = ours[b], theirs.get(b)
        cells = []
        for i, limit in ((0, lp), (1, ld)):
            mine = f"{o[i]:,.0f}" if isinstance(o, tuple) else o
            base = f"{h[i]:,.0f}" if isinstance(h, tuple) else (h or "")
            vs = f"{o[i] / h[i]:.2f}" if isinstance(o, tuple) and isinstance(h, tuple) else ""
            of = f"{o[i] / limit:.2f}" if isinstance(o, tuple) else ""
            cells.append(f"{mine} | {base} | {vs} | {limit:,.0f} | {of}")
        rows.append(f"| {b} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
