"""Prefill MoE: torch's grouped GEMM path (kernels/triton_impl/moe_grouped.py) vs the Triton
grouped GEMM (kernels/triton_impl/moe.py) at ERNIE-4.5-VL-28B-A3B shapes, one MoE layer.

Checks both against ``fused_moe_ref`` (relative Frobenius error), then times each (CUDA
events, median) and prints TFLOP/s of the expert GEMMs. Picks ``GROUPED_MIN_ROWS``.

    PYTHONUNBUFFERED=1 python3 bench/moe_bench.py           # on a CUDA machine
    TRITON_INTERPRET=1 .venv/bin/python bench/moe_bench.py --tiny   # logic check on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.triton_impl.moe_grouped as grouped
from bench.gpu_bench import bench
from kernels.moe import fused_moe_ref, route
from kernels.triton_impl.moe import fused_moe_triton


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    e, d, inter, k = (8, 64, 32, 2) if args.tiny else (64, 2560, 1536, 6)
    dt = torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(11)
    w13 = (torch.randn(e, 2 * inter, d, generator=g) * 0.02).to(dt).to(dev)
    w2 = (torch.randn(e, d, inter, generator=g) * 0.02).to(dt).to(dev)
    rows, bad = [], []
    keep = grouped.GROUPED_MIN_ROWS
    for t in (16, 64) if args.tiny else (512, 1024, 2048, 4096, 8192):
        x = torch.randn(t, d, generator=g).to(dt).to(dev)
        wts, ids = route(torch.randn(t, e, generator=g).to(dev), k)
        add = torch.randn(t, d, generator=g).to(dt).to(dev)
        ref = fused_moe_ref(x, w13, w2, wts, ids) + add
        flops = 2 * t * k * d * 3 * inter
        res = {"T": t}
        for name, min_rows in (("triton", 0), ("grouped", 1)):
            grouped.GROUPED_MIN_ROWS = min_rows

            def fn(x=x, wts=wts, ids=ids, add=add):  # type: ignore[no-untyped-def]
                return fused_moe_triton(x, w13, w2, wts, ids, add=add)

            out = fn()
            rel = float((out.float() - ref.float()).norm() / ref.float().norm())
            # (the CPU interpreter mishandles bf16 in the Triton GEMM; real GPUs are checked)
            if not rel < 1e-2 and (dev.type == "cuda" or name == "grouped"):
                bad.append(f"T={t} {name}: rel {rel:.2e}")
            ms = bench(fn, dev, 3, 3 if args.tiny else 20)["median_ms"]
            res[name] = {"ms": ms, "rel": rel, "TFLOPs": flops / ms / 1e9}
        rows.append(res)
    grouped.GROUPED_MIN_ROWS = keep
    print("\n| T | rows | Triton ms (TFLOP/s) | grouped_mm ms (TFLOP/s) | rel err T / g |")
    print("|---|---|---|---|---|")
    for r in rows:
        a, b = r["triton"], r["grouped"]
        print(
            f"| {r['T']} | {r['T'] * k} | {a['ms']:.3f} ({a['TFLOPs']:.0f}) | {b['ms']:.3f} "
            f"({b['TFLOPs']:.0f}) | {a['rel']:.1e} / {b['rel']:.1e} |"
        )
    out_dir = Path(os.environ.get("OUT") or "/tmp")
    (out_dir / "moe_bench.json").write_text(json.dumps({"rows": rows, "bad": bad}, indent=1))
    if bad:
        print("FAIL:", bad)
        return 1
    print("moe_bench: all checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
