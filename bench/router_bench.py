"""Router: cast + cuBLAS fp32 GEMM + routing launch against the one-launch kernels over
their tile choices, 28B-A3B shapes (E=64, D=2560, top-6), CUDA-graph replay of 27 layers'
worth of routers (each layer its own weights, as in the model). At decode sizes (T=1, 4)
`gate_route_triton`; past them (T=16, 64, 256) `batch_gate_route_triton` (bf16 tensor-core
dots over three-piece fp32 weights). Each line: ids equal to the cuBLAS path's and weights
within 1e-5 ("ok"), or how many tokens' ids differ.

    PYTHONPATH=. python3 bench/router_bench.py                 # GPU, both
    PYTHONPATH=. python3 bench/router_bench.py --batch-only    # the batch kernel only
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kernels.triton_impl.moe_routing import (
    BatchRouteTiles,
    batch_gate_route_triton,
    batch_route_splits,
    gate_route_triton,
    route_triton,
)

E, D, K, LAYERS = 64, 2560, 6, 27


def graph_ms(fn, reps: int = 50) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _agree(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, ...]) -> str:
    if torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0], atol=1e-5):
        return "ok"
    return f"MISMATCH ({int((got[1] != want[1]).any(dim=1).sum())} tokens' ids differ)"


def batch_section(ws: list[torch.Tensor], bias: torch.Tensor, dev: torch.device) -> None:
    for t in (16, 64, 256):
        x = (torch.randn(t, D, device=dev)).to(torch.bfloat16)

        def old(x: torch.Tensor = x) -> None:
            for w in ws:
                route_triton(F.linear(x.float(), w), K, bias, 1e-12)

        base = graph_ms(old)
        print(f"T={t}: cast + cuBLAS + route: {base:.4f} ms ({base / LAYERS * 1e3:.2f} us/router)")
        want = route_triton(F.linear(x.float(), ws[0]), K, bias, 1e-12)
        for bt in (16, 32, 64):
            for bd in (64, 128, 256):
                for nw in (4, 8):
                    tiles = BatchRouteTiles(bt, 16, bd, nw)
                    got = batch_gate_route_triton(x, ws[0], K, bias, 1e-12, tiles)
                    splits, _ = batch_route_splits(t, E, D, tiles, dev)

                    def new(x: torch.Tensor = x, tiles: BatchRouteTiles = tiles) -> None:
                        for w in ws:
                            batch_gate_route_triton(x, w, K, bias, 1e-12, tiles)

                    ms = graph_ms(new)
                    print(
                        f"T={t}: batch route BLOCK_T={bt:2d} BLOCK_D={bd:3d} warps={nw} "
                        f"splits={splits}: {ms:.4f} ms ({ms / LAYERS * 1e3:.2f} us/router, "
                        f"{ms / base:.2f}x) {_agree(got, want)}"
                    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-only", action="store_true", help="only T=16/64/256")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    ws = [torch.randn(E, D, device=dev) * 0.02 for _ in range(LAYERS)]
    bias = torch.rand(E, device=dev) * 0.1
    print(f"{torch.cuda.get_device_name()}: {LAYERS} routers, E={E} D={D} top{K}, graph replay")
    print(f"read floor: {LAYERS * E * D * 4 / 3.0e12 * 1e3:.3f} ms at 3 TB/s")
    batch_section(ws, bias, dev)
    if args.batch_only:
        return
    for t in (1, 4):
        x = (torch.randn(t, D, device=dev)).to(torch.bfloat16)

        def old(x: torch.Tensor = x) -> None:
            for w in ws:
                route_triton(F.linear(x.float(), w), K, bias, 1e-12)

        base = graph_ms(old)
        print(f"T={t}: cast + cuBLAS + route: {base:.4f} ms ({base / LAYERS * 1e3:.2f} us/router)")
        for per in (1, 2, 4, 8, 16):
            for bd in (256, 512, 1024):
                for nw in (2, 4, 8):
                    want = route_triton(F.linear(x.float(), ws[0]), K, bias, 1e-12)
                    got = gate_route_triton(x, ws[0], K, bias, 1e-12, per, bd, nw)
                    ok = torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0], atol=1e-5)

                    def new(
                        x: torch.Tensor = x, per: int = per, bd: int = bd, nw: int = nw
                    ) -> None:
                        for w in ws:
                            gate_route_triton(x, w, K, bias, 1e-12, per, bd, nw)

                    ms = graph_ms(new)
                    print(
                        f"T={t}: gate_route E_PER={per:2d} BLOCK_D={bd:4d} warps={nw}: "
                        f"{ms:.4f} ms ({ms / LAYERS * 1e3:.2f} us/router, {ms / base:.2f}x) "
                        f"{'ok' if ok else 'MISMATCH'}"
                    )


if __name__ == "__main__":
    main()
