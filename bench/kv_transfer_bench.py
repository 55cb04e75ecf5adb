"""KV transfer benchmark: GB/s of the ZMQ path (tcp, ipc) beside a plain torch memcpy of the
same bytes and the in-process fake (gather + scatter, no wire), in one run.

    .venv/bin/python bench/kv_transfer_bench.py                      # 28 layers x 256 blocks
    .venv/bin/python bench/kv_transfer_bench.py --blocks 512 --dtype float32 --device cuda

One transfer = `begin`, `send_layer` for every layer, `finish`, then wait for the
receiver's DONE: a prompt of `blocks` blocks of which decode lacks all but the first. The
payload counted is K+V of the lacking blocks over all layers. Each path runs `--iters`
times after one warm-up; the table shows the median.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from engine.kv_transfer import FakeTransport, KVTransport, new_transfer_token
from engine.kv_transfer.frames import DTYPES
from engine.kv_transfer.zmq_transport import ZmqTransport


def make_caches(args: argparse.Namespace, fill: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (args.blocks + 1, args.block_size, args.heads, args.head_dim)
    dtype, dev = DTYPES[args.dtype], torch.device(args.device)

    def one() -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=dev)
        return t.normal_() if fill else t.zero_()

    return [(one(), one()) for _ in range(args.layers)]


def time_transport(transport: KVTransport, bind: str, args: argparse.Namespace) -> list[float]:
    src, dst = make_caches(args, True), make_caches(args, False)
    rx, tx = transport.receiver(dst, bind), transport.sender(src)
    ids = list(range(args.blocks + 1))
    seconds = []
    try:
        for it in range(args.iters + 1):
            rid = f"r{it}"
            res = rx.expect(rid, new_transfer_token(), ids[1:], 1, deadline_s=60.0)
            start = time.perf_counter()
            tx.begin(rid, res, ids[::-1][: len(ids) - 1])  # a scrambled block mapping
            for layer in range(args.layers):
                tx.send_layer(rid, layer)
            tx.finish(rid, 0, {})
            events = []
            while not events:
                time.sleep(0.0005)  # a spinning poll would starve the receiver of the GIL
                events = rx.poll()
            if args.device == "cuda":
                torch.cuda.synchronize()
            assert events[0].ok, events
            seconds.append(time.perf_counter() - start)
        assert torch.equal(dst[-1][0][-1], src[-1][0][1])
    finally:
        tx.close()
        rx.close()
    return seconds[1:]


def time_memcpy(nbytes: int, device: str, args: argparse.Namespace) -> list[float]:
    a = torch.ones(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    seconds = []
    for _ in range(args.iters + 1):
        start = time.perf_counter()
        b.copy_(a)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--blocks", type=int, default=256, help="blocks decode lacks per transfer")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--heads", type=int, default=4, help="KV heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    elem = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    nbytes = 2 * args.layers * args.blocks * args.block_size * args.heads * args.head_dim * elem
    print(
        f"{args.layers} layers x {args.blocks} blocks of {args.block_size}x{args.heads}x"
        f"{args.head_dim} {args.dtype} on {args.device}: {nbytes / 2**20:.0f} MiB per transfer"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = {"torch memcpy (host)": time_memcpy(nbytes, "cpu", args)}
        if args.device != "cpu":
            rows[f"torch memcpy ({args.device})"] = time_memcpy(nbytes, args.device, args)
        rows |= {
            "fake (in-process)": time_transport(FakeTransport(), "kv", args),
            "zmq tcp": time_transport(ZmqTransport(), "tcp://127.0.0.1:0", args),
            "zmq ipc": time_transport(ZmqTransport(), f"ipc://{tmp}/kv.sock", args),
        }
    base = statistics.median(rows["torch memcpy (host)"])
    print(f"{'path':<20} {'median s':>10} {'GB/s':>8} {'vs host memcpy':>15}")
    for name, secs in rows.items():
        med = statistics.median(secs)
        print(f"{name:<20} {med:>10.4f} {nbytes / med / 1e9:>8.2f} {base / med:>14.2f}x")


if __name__ == "__main__":
    main()
