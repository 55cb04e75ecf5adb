"""Decode weight streams as FMA loops vs tensor-core dots, one launch alone, 28B shapes.

Triton software-pipelines loads that feed a ``tl.dot`` (cp.async into shared memory,
``num_stages``) but not loads that feed FMAs, so a decode GEMV written as a dot of the
token's row (row 0 of a 16-row operand) against [K, N] weight chunks keeps more bytes in
flight a program. This bench times, each launch alone in a CUDA graph of 10 launches over
different weights (cold L2), the routed MoE up launch (`_moe_up_kernel` vs
`_moe_up_dot_kernel`, kernels/triton_impl/gemv.py) at 1 and 4 tokens, the routed down launch
(the FMA kernel vs a dot kernel split over experts, defined here: not in the engine) and the
attention half's GEMV shapes (`gemv_triton` vs a dot GEMV defined here). Each dot output is
checked against the FMA one; each time is printed beside the copy rate measured in the same
run. The full decode step decides what the engine uses (bench/decode_step_bench.py).

    PYTHONPATH=. python3 bench/decode_dot_bench.py       # on a CUDA machine
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.gpu_bench as gb
import kernels.triton_impl.gemv as G
from kernels.triton_impl.gemv import gemv_triton

E, D, I, K = 64, 2560, 1536, 6  # 28B text experts: count, hidden, intermediate, top-k


@triton.jit
def _down_dot_kernel(
    h_ptr, w_ptr, ids_ptr, wt_ptr, part_ptr, cnt_ptr, out_ptr, D, I, stride_we, stride_wn,
    TOPK: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    # program (t, column block, slot j): round(w2[e_j] @ h[t, j]) * wt[t, j] into part; the
    # last of a column block's TOPK programs to arrive sums the slots in order into out
    pid = tl.program_id(0)
    t = pid // (NB * TOPK)
    cb = pid % (NB * TOPK) // TOPK
    r = t * TOPK + pid % TOPK
    e = tl.load(ids_ptr + r).to(tl.int64)
    offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, 16)
    cols = w_ptr + e * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, I, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        hk = tl.load(
            h_ptr + r * I + offs_m[:, None] * 0 + offs_k[None, :], mask=offs_m[:, None] == 0,
            other=0.0,
        )  # fmt: skip
        acc = tl.dot(hk, tl.load(cols + offs_k[:, None]), acc)
    y = tl.sum(tl.where(offs_m[:, None] == 0, acc, 0.0), axis=0)
    y = y.to(out_ptr.dtype.element_ty).to(tl.float32) * tl.load(wt_ptr + r)
    tl.store(part_ptr + r * D + offs_n, y)
    tl.debug_barrier()
    if tl.atomic_add(cnt_ptr + t * NB + cb, 1) == TOPK - 1:
        tl.atomic_xchg(cnt_ptr + t * NB + cb, 0)
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(TOPK):
            total += tl.load(part_ptr + (t * TOPK + j) * D + offs_n, volatile=True)
        tl.store(out_ptr + t * D + offs_n, total.to(out_ptr.dtype.element_ty))


@triton.jit
def _gemv_dot_kernel(
    x_ptr, w_ptr, y_ptr, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, 16)
    cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(
            x_ptr + offs_m[:, None] * 0 + offs_k[None, :], mask=offs_m[:, None] == 0, other=0.0
        )
        acc = tl.dot(xk, tl.load(cols + offs_k[:, None]), acc)
    y = tl.sum(tl.where(offs_m[:, None] == 0, acc, 0.0), axis=0)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty))


def up_launch(x, w13, ids, dot: tuple[int, int, int, int] | None) -> torch.Tensor:
    """The routed up launch alone (no shared rows, no PDL): FMA tiles, or dot tiles."""
    t = x.shape[0]
    h = torch.empty(t * K, I, dtype=x.dtype, device=x.device)
    args = (x, w13, ids, h, w13, h, I, 0, D, 0, x.stride(0), w13.stride(0), w13.stride(1), 0)
    if dot is None:
        tiles = G.MOE_DECODE_TILES
        nb = I // tiles.up_block_n
        G._moe_up_kernel[(t * K * nb,)](
            *args, TOPK=K, NB_I=nb, NB_S=1, HAS_SHARED=False, BLOCK_N=tiles.up_block_n,
            BLOCK_K=tiles.up_block_k, PDL=False, LAUNCH_AFTER_WAIT=False,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
    else:
        bn, bk, stages, warps = dot
        G._moe_up_dot_kernel[(t * K * (I // bn),)](
            *args, TOPK=K, NB_I=I // bn, NB_S=1, HAS_SHARED=False, BLOCK_N=bn, BLOCK_K=bk,
            STAGES=stages, PDL=False, LAUNCH_AFTER_WAIT=False, num_warps=warps,
        )  # fmt: skip
    return h


_COUNTERS: dict[int, torch.Tensor] = {}


def down_launch(h, w2, ids, wts, dot: tuple[int, int, int, int] | None) -> torch.Tensor:
    t = ids.shape[0]
    out = torch.empty(t, D, dtype=h.dtype, device=h.device)
    if dot is None:
        tiles = G.MOE_DECODE_TILES
        G._moe_down_kernel[(t, triton.cdiv(D, tiles.down_block_n))](
            h, w2, ids, wts, out, h, w2, out, D, I, 0, w2.stride(0), w2.stride(1), 0,
            TOPK=K, HAS_ADD=False, HAS_SHARED=False, BLOCK_N=tiles.down_block_n,
            BLOCK_K=tiles.down_block_k, PDL=False, PRELOAD=0,
            num_warps=tiles.down_num_warps or tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
        return out
    bn, bk, stages, warps = dot
    nb = D // bn
    cnt = _COUNTERS.get(nb)
    if cnt is None:
        cnt = _COUNTERS[nb] = torch.zeros(4 * nb, dtype=torch.int32, device=h.device)
    part = torch.empty(t * K, D, dtype=torch.float32, device=h.device)
    _down_dot_kernel[(t * nb * K,)](
        h, w2, ids, wts, part, cnt, out, D, I, w2.stride(0), w2.stride(1), TOPK=K, NB=nb,
        BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, num_warps=warps,
    )  # fmt: skip
    return out


def gemv_dot(x, w, dot: tuple[int, int, int, int]) -> torch.Tensor:
    n, k = w.shape
    bn, bk, stages, warps = dot
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_dot_kernel[(n // bn,)](
        x, w, y, k, w.stride(0), BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, num_warps=warps
    )
    return y


UP_DOTS = ((16, 128, 3, 1), (16, 128, 4, 1), (16, 256, 2, 1), (16, 128, 3, 2), (32, 128, 3, 4))
DOWN_DOTS = ((16, 128, 3, 1), (32, 128, 3, 2), (16, 128, 4, 2))
GEMV_DOTS = ((16, 128, 4, 4), (32, 128, 4, 4), (16, 256, 3, 4))
"""(columns, K chunk, stages, warps) of the dot launches tried."""


def _name(dot: tuple[int, int, int, int]) -> str:
    return f"dot {dot[0]}x{dot[1]} s{dot[2]} {dot[3]}w"


def graph_ms(fns: list[Callable[[], object]]) -> float:
    """Median ms a launch of a CUDA graph replaying every fn once (each on other weights)."""
    return gb._graph_ms(lambda: [f() for f in fns], torch.device("cuda")) / len(fns)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    dev = torch.device("cuda")
    gb.rooflines(dev, tiny=False)
    copy = gb.RESULTS["roof"]["copy_GBps"]
    torch.manual_seed(0)
    bf = torch.bfloat16
    w13 = (torch.randn(E, 2 * I, D, device=dev) * 0.02).to(bf)
    w2 = (torch.randn(E, D, I, device=dev) * 0.02).to(bf)
    rows = [f"| launch | variant | us | TB/s | of copy {copy / 1e3:.2f} TB/s | rel vs FMA |"]
    rows.append("|---|---|---|---|---|---|")

    def row(name: str, variant: str, ms: float, nbytes: int, rel: float | None) -> None:
        tbs = nbytes / (ms * 1e-3) / 1e12
        rels = "" if rel is None else f"{rel:.1e}"
        rows.append(
            f"| {name} | {variant} | {ms * 1e3:.2f} | {tbs:.2f} | {tbs * 1e3 / copy:.2f} | {rels} |"
        )
        print(rows[-1], flush=True)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        r = float((a.float() - b.float()).norm() / b.float().norm())
        assert r < 1e-2, f"dot output differs from the FMA one: rel {r:.2e}"
        return r

    for t in (1, 4):
        x = torch.randn(t, D, device=dev).to(bf)
        # 10 launches on other experts each (disjoint where they fit): a cold L2 every time
        id_sets = [
            (torch.arange(K * t, device=dev, dtype=torch.int32) + K * t * j).remainder(E)
            .reshape(t, K) for j in range(10)
        ]  # fmt: skip
        wts = torch.full((t, K), 1 / K, device=dev)
        up_bytes = len({int(e) for e in id_sets[0].flatten()}) * 2 * I * D * 2
        ref = up_launch(x, w13, id_sets[0], None)
        for dot in (None, *UP_DOTS):
            r = None if dot is None else rel(up_launch(x, w13, id_sets[0], dot), ref)
            ms = graph_ms([partial(up_launch, x, w13, s, dot) for s in id_sets])
            row(f"up T={t}", "FMA 4x512 2w" if dot is None else _name(dot), ms, up_bytes, r)
        h = (torch.randn(t * K, I, device=dev) * 0.5).to(bf)
        ref = down_launch(h, w2, id_sets[0], wts, None)
        for dot in (None, *DOWN_DOTS):
            r = None if dot is None else rel(down_launch(h, w2, id_sets[0], wts, dot), ref)
            ms = graph_ms([partial(down_launch, h, w2, s, wts, dot) for s in id_sets])
            name = "FMA 2 cols 1w" if dot is None else _name(dot) + ", split over slots"
            row(f"down T={t}", name, ms, up_bytes // 2, r)
    del w13, w2
    for n, k in ((3584, 2560), (2560, 2560), (6144, 2560)):
        ws = [(torch.randn(n, k, device=dev) * 0.02).to(bf) for _ in range(8)]
        x = torch.randn(1, k, device=dev).to(bf)
        ref = gemv_triton(x, ws[0], None)
        ms = graph_ms([partial(gemv_triton, x, w, None) for w in ws])
        row(f"GEMV {n}x{k}", "FMA (engine tiles)", ms, n * k * 2, None)
        for dot in GEMV_DOTS:
            r = rel(gemv_dot(x, ws[0], dot), ref)
            ms = graph_ms([partial(gemv_dot, x, w, dot) for w in ws])
            row(f"GEMV {n}x{k}", _name(dot), ms, n * k * 2, r)
        del ws
    print("\n".join(rows))
    out = Path(os.environ.get("OUT", "/tmp")) / "decode_dot_bench.md"
    out.write_text("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
