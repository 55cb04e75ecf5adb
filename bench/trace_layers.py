"""Per-layer kernel timeline of a decode step from a CUDA chrome trace (torch.profiler).

A captured decode step repeats the same kernels layer after layer. Anchored on one kernel
that runs once (or ``every`` times) a layer, usually the MoE down launch, this gives each
kernel of a layer its median start, end and duration in us from the end of the previous
layer's anchor. Under programmatic dependent launch a kernel's duration includes the time it
sat resident before its wait, so read the ends: they are when each phase finished.

    python3 bench/trace_layers.py TRACE.json [--anchor _moe_down_kernel] [--every 1]

``bench/decode_step_bench.py`` prints this table for each batch it profiles.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def kernel_replays(events: list[dict[str, Any]], gap_us: float = 100.0) -> list[list[dict]]:
    """The trace's kernels by start time, split into replays wherever the GPU idles for more
    than gap_us."""
    kernels = sorted(
        (e for e in events if e.get("cat") == "kernel" and "dur" in e), key=lambda e: e["ts"]
    )
    groups: list[list[dict]] = []
    end = float("-inf")
    for e in kernels:
        if e["ts"] - end > gap_us:
            groups.append([])
        groups[-1].append(e)
        end = max(end, e["ts"] + e["dur"])
    return groups


def layer_timeline(
    kernels: list[dict[str, Any]],
    anchor: str,
    every: int = 1,
    skip: int = 5,
    layers: int = 15,
) -> list[dict[str, Any]]:
    """Rows (kernel name, stream, which launch of that name on that stream in the layer, and
    the median start / end / duration in us from the previous anchor's end), ordered by
    start, over `layers` layers after the first `skip`. Keyed so, a side-stream kernel that
    starts before a main-stream one in some layers and after it in others is still one row.
    The anchor is every `every`-th kernel whose name contains `anchor` (the last of a layer's
    `every`). Empty when the trace has too few layers."""
    hits = [i for i, e in enumerate(kernels) if anchor in e["name"]][every - 1 :: every]
    starts = hits[skip : skip + layers]
    pairs = list(zip(starts, hits[skip + 1 : skip + 1 + len(starts)], strict=False))
    spans: dict[tuple[str, Any, int], list[tuple[float, float]]] = {}
    for a, b in pairs:
        t0 = kernels[a]["ts"] + kernels[a]["dur"]
        seen: dict[tuple[str, Any], int] = {}
        for e in kernels[a + 1 : b + 1]:
            name_stream = (e["name"], e.get("args", {}).get("stream"))
            nth = seen[name_stream] = seen.get(name_stream, -1) + 1
            spans.setdefault((*name_stream, nth), []).append(
                (e["ts"] - t0, e["ts"] + e["dur"] - t0)
            )
    rows = [
        {
            "name": name,
            "stream": stream,
            "nth": nth,
            "layers": len(v),
            "start_us": statistics.median(s for s, _ in v),
            "end_us": statistics.median(t for _, t in v),
            "dur_us": statistics.median(t - s for s, t in v),
        }
        for (name, stream, nth), v in spans.items()
    ]
    return sorted(rows, key=lambda r: (r["start_us"], r["end_us"]))


def format_timeline(rows: list[dict[str, Any]], width: int = 48) -> list[str]:
    head = f"  {'start':>7} {'end':>7} {'dur':>7}  stream  kernel"
    lines = [head + " (us from the previous anchor's end)"]
    for r in rows:
        lines.append(
            f"  {r['start_us']:7.1f} {r['end_us']:7.1f} {r['dur_us']:7.1f}  {r['stream']!s:>6}"
            f"  {r['name'][:width]}" + ("" if r["layers"] > 1 else "  (1 layer)")
        )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--anchor", default="_moe_down_kernel")
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--layers", type=int, default=15)
    args = ap.parse_args()
    replays = kernel_replays(json.loads(args.trace.read_text())["traceEvents"])
    if not replays:
        print("no kernels in the trace", file=sys.stderr)
        return 1
    last = replays[-1]
    span = max(e["ts"] + e["dur"] for e in last) - last[0]["ts"]
    print(f"{len(replays)} replays; the last: {len(last)} kernels over {span:.1f} us")
    rows = layer_timeline(last, args.anchor, args.every, args.skip, args.layers)
    if not rows:
        print(f"fewer than {args.skip + 2} layers anchored on {args.anchor!r}", file=sys.stderr)
        return 1
    print("\n".join(format_timeline(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
