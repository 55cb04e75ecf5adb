"""The decode attention half at one token, 28B shapes: the one-launch kernel
(``kernels.attention_block``) against the chain of separate kernels, and the kernel's phases.

Each variant (module settings, as in decode_step_bench) captures one CUDA graph of ``--layers``
consecutive blocks, each with its own weights and KV cache (so the L2 holds none of the next
block's weights), and replays it in rounds, variants rotated each round. Beside every time:
the bytes a block must read (qkv + o_proj weights + KV) at the copy bandwidth measured here.
Then one launch of the kernel records the global timer at its phase boundaries in every
program: the timeline shows where the time goes.

    PYTHONPATH=. python3 bench/attention_block_bench.py [--variants chain,fused,...]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.layers.rotary import TextRotary
from kernels.attention_block import attention_block

_AB = "kernels.triton_impl.attention_block:"
_ON = {"kernels.attention_block:FUSED": True}
VARIANTS: dict[str, dict[str, Any]] = {
    "chain": {"kernels.attention_block:FUSED": False},
    "fused": _ON,
    "qkv2": {**_ON, _AB + "BLOCK_N_QKV": 2},
    "qkv8": {**_ON, _AB + "BLOCK_N_QKV": 8},
    "o2": {**_ON, _AB + "BLOCK_N_O": 2},
    "o8": {**_ON, _AB + "BLOCK_N_O": 8},
    "1sm-8w": {**_ON, _AB + "PROGRAMS_PER_SM": 1, _AB + "NUM_WARPS": 8},
    "4sm-2w": {**_ON, _AB + "PROGRAMS_PER_SM": 4, _AB + "NUM_WARPS": 2},
    "splits8": {**_ON, _AB + "NUM_SPLITS": 8},
    "late": {**_ON, _AB + "EARLY_LAUNCH": False},
}
PHASES = [
    "wait",
    "norm",
    "qkv",
    "barrier 1",
    "attention",
    "barrier 2 + merge + barrier 3",
    "o_proj",
]


def _target(key: str) -> tuple[Any, str]:
    module, attr = key.split(":")
    return importlib.import_module(module), attr


def use(name: str, defaults: dict[str, Any]) -> None:
    for key, value in defaults.items():
        mod, attr = _target(key)
        setattr(mod, attr, value)
    for key, value in VARIANTS[name].items():
        mod, attr = _target(key)
        setattr(mod, attr, value)


def copy_bandwidth(dev: torch.device) -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * 10 * x.numel() / (start.elapsed_time(end) / 1e3)  # bytes/s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--variants", default="chain,fused")
    args = ap.parse_args()
    dev = torch.device("cuda")
    dt = torch.bfloat16
    hidden, hq, hkv, d, bs = 2560, 20, 4, 128, 16
    n_qkv = (hq + 2 * hkv) * d
    g = torch.Generator(device="cpu").manual_seed(7)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(dev)

    seq = args.ctx + 1
    blocks = -(-seq // bs)
    layers = [
        dict(
            norm=(1 + 0.1 * torch.randn(hidden, generator=g)).to(dt).to(dev),
            qkv=(rnd(n_qkv, hidden, scale=hidden**-0.5), None),
            o=(rnd(hidden, hq * d, scale=(hq * d) ** -0.5), None),
            kv=(rnd(blocks + 1, bs, hkv, d), rnd(blocks + 1, bs, hkv, d)),
        )
        for _ in range(args.layers)
    ]
    bt = torch.arange(1, blocks + 1, dtype=torch.int32, device=dev)[None]
    slot = int(bt[0, (seq - 1) // bs]) * bs + (seq - 1) % bs  # the new token's cache row
    meta = (
        torch.tensor([slot], device=dev),
        bt,
        torch.tensor([seq], dtype=torch.int32, device=dev),
        torch.tensor([0, 1], dtype=torch.int32, device=dev),
    )
    rope = TextRotary(d, 500000.0).to(dev).step_table(torch.tensor([seq - 1], device=dev))
    h0, res0 = rnd(1, hidden), rnd(1, hidden)

    def step() -> torch.Tensor:
        h, res = h0, res0
        for layer in layers:
            h, res = attention_block(
                h, res, layer["norm"], 1e-5, layer["qkv"], layer["o"], hq, hkv, rope,
                layer["kv"], meta, d**-0.5,
            )  # fmt: skip
        return h

    bw = copy_bandwidth(dev)
    block_bytes = 2 * (n_qkv * hidden + hidden * hq * d + 2 * seq * hkv * d)
    limit_us = block_bytes / bw * 1e6
    names = args.variants.split(",")
    defaults = {k: getattr(*_target(k)) for n in VARIANTS for k in VARIANTS[n]}
    graphs, outs = {}, {}
    for name in names:
        use(name, defaults)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graphs[name] = graph
        print(f"  captured {name}", flush=True)
        graph.replay()
        torch.cuda.synchronize()
        outs[name] = out.clone()
    use(names[0], defaults)
    for name in names[1:]:
        diff = (outs[name].float() - outs[names[0]].float()).abs().max().item()
        print(f"  {name}: |out - {names[0]}| after {args.layers} blocks: {diff:.3e}")
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            graph = graphs[name]
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) * 1e3 / args.iters / args.layers)
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; a block reads {block_bytes / 1e6:.1f} MB")
    print("| variant | us a block (median of rounds) | vs first | limit us | / limit |")
    print("|---|---|---|---|---|")
    base = statistics.median(times[names[0]])
    for name in names:
        m = statistics.median(times[name])
        print(f"| {name} | {m:.2f} | {m - base:+.2f} | {limit_us:.2f} | {m / limit_us:.2f} |")

    # the phase timeline of one launch (eager, after the layer before it has drained)
    from kernels.triton_impl import attention_block as ab

    for name in names:
        if name == "chain":
            continue
        use(name, defaults)
        layer = layers[0]
        stamps = torch.full((ab.num_programs(dev), 8), -1, dtype=torch.int64, device=dev)
        for _ in range(3):
            torch.cuda.synchronize()
            kv = layer["kv"]
            ab.attention_block_triton(
                h0, res0, layer["norm"], 1e-5, layer["qkv"][0], None, layer["o"][0], None, hq,
                hkv, *rope, *kv, *meta, d**-0.5, ab.sync_buffer(dev), times=stamps,
            )  # fmt: skip
            torch.cuda.synchronize()
        stamps = stamps[stamps[:, 0] >= 0]  # the programs the grid had
        t = (stamps[:, :7] - stamps[:, 0].min()).double() / 1e3  # us
        row = " | ".join(
            f"{p}: {t[:, k].median().item():.2f}/{t[:, k].max().item():.2f}"
            for k, p in enumerate(PHASES)
        )
        print(f"  {name} ({len(stamps)} programs) timeline (us, median/max, end of): {row}")
        attended = stamps[stamps[:, 7] >= 0]  # the attention programs: keys done, published
        if len(attended):
            a = (attended[:, [3, 7, 4]] - stamps[:, 0].min()).double() / 1e3
            print(
                f"    {len(attended)} attention programs: barrier 1 {a[:, 0].max().item():.2f}, "
                f"keys done {a[:, 1].median().item():.2f}/{a[:, 1].max().item():.2f}, "
                f"published {a[:, 2].median().item():.2f}/{a[:, 2].max().item():.2f}"
            )
    use(names[0], defaults)


if __name__ == "__main__":
    main()
