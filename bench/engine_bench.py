"""Offline engine benchmark: prefill and decode throughput of Tandem's engine beside
transformers on the same model, prompts and batch, in one run.

    .venv/bin/python bench/engine_bench.py                       # tiny-ernie-vl on CPU
    .venv/bin/python bench/engine_bench.py --batches 1,16 --prompt-len 128 --new 32

Every request gets the same random prompt length; HF runs the batch unpadded through
`forward` with a DynamicCache (prefill = one forward of B x L tokens, decode = one forward
of B tokens per step), the same work Tandem's engine schedules.
"""

from __future__ import annotations

import argparse
import time

import torch

from engine.llm_engine import EngineArgs, LLMEngine
from engine.sampling_params import SamplingParams


def tandem(path: str, batch: int, prompt_len: int, new: int, device: str) -> tuple[float, float]:
    engine = LLMEngine(
        EngineArgs(
            model=path,
            device=device,
            max_num_seqs=batch,
            max_num_batched_tokens=batch * prompt_len,
            num_kv_blocks=batch * (-(-(prompt_len + new) // 16)) + 2,
            enable_prefix_caching=False,
        )
    )
    g = torch.Generator().manual_seed(0)
    vocab = min(engine.model_config.text.vocab_size, 2000)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(
            str(i), torch.randint(10, vocab, (prompt_len,), generator=g).tolist(), params
        )
    t0 = time.perf_counter()
    engine.step()  # the whole batch's prefill fits one step's budget
    t1 = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    t2 = time.perf_counter()
    return batch * prompt_len / (t1 - t0), batch * steps / (t2 - t1)


@torch.inference_mode()
def hf(path: str, batch: int, prompt_len: int, new: int, device: str) -> tuple[float, float]:
    from transformers import DynamicCache, Ernie4_5_VLMoeForConditionalGeneration

    model = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    vocab = min(model.config.text_config.vocab_size, 2000)
    ids = torch.randint(10, vocab, (batch, prompt_len), generator=g).to(device)
    cache = DynamicCache(config=model.config.text_config)
    t0 = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    t1 = time.perf_counter()
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new - 1):
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t2 = time.perf_counter()
    return batch * prompt_len / (t1 - t0), batch * (new - 1) / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny-ernie-vl")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=16)
    args = ap.parse_args()
    from engine.llm_engine import resolve_model_path

    path = str(resolve_model_path(args.model))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        tp, td = tandem(path, b, args.prompt_len, args.new, args.device)
        hp, hd = hf(path, b, args.prompt_len, args.new, args.device)
        rows.append((b, tp, hp, td, hd))
    print(f"\nmodel {args.model} on {args.device}, prompt {args.prompt_len}, new {args.new}")
    print("| batch | prefill tok/s Tandem | HF | ratio | decode tok/s Tandem | HF | ratio |")
    print("|---|---|---|---|---|---|---|")
    for b, tp, hp, td, hd in rows:
        print(
            f"| {b} | {tp:,.0f} | {hp:,.0f} | {tp / hp:.2f} | {td:,.0f} | {hd:,.0f} "
            f"| {td / hd:.2f} |"
        )


if __name__ == "__main__":
    main()
