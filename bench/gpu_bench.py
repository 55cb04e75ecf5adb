"""Tandem's GPU benchmark: rooflines, kernel checks, ERNIE-4.5-VL-28B-A3B text model timings.

One run does everything (see bench/RESULTS.md for the numbers and the card they came from):

1. rooflines: device-to-device copy bandwidth (read + write counted) and bf16 matmul peak;
2. every Triton kernel against its torch reference on fresh random bf16 inputs at 28B shapes;
3. the real 28B-A3B text model (vision tower skipped) built on the GPU in bf16 with random
   weights (routers fp32), timed with CUDA events through ``ModelRunner.run``: decode batch 1
   at 512 context, decode batch 64 / 256 at 768 context, prefill 16 x 512 in one step.
   Decode goes through the runner's CUDA graphs (engine/cuda_graphs.py); the ``[eager]`` rows
   time the same step with them switched off and report |logits(graph) - logits(eager)|;
4. transformers' ``Ernie4_5_VLMoeTextModel`` (+ tied LM head) on the same shapes where it fits;
5. a table: measure | Tandem | HF | limit | Tandem/limit | Tandem/HF.

    PYTHONUNBUFFERED=1 python3 bench/gpu_bench.py            # on a CUDA machine
    ... --moe-sweep --attention-sweep   # tile sweeps behind kernels' tile tables
    ... --no-hf --skip-kernel-checks --decode-tiles-ab   # decode MoE warps / T bound, b1-b4
    TRITON_INTERPRET=1 python3 bench/gpu_bench.py --tiny     # logic check on CPU, tiny config

Full results go to ``$OUT/gpu_bench.json`` when ``$OUT`` is set (else /tmp).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ModelConfig
from engine.configs import ERNIE_45_VL_28B_A3B
from engine.layers.moe import Router
from engine.model_runner import ModelRunner, StepSequence
from engine.models import build_random_model
from engine.models.ernie45 import Ernie45ForCausalLM

RESULTS: dict[str, Any] = {"kernel_checks": {}, "tandem": {}, "hf": {}, "roof": {}, "notes": []}
FAILURES: list[str] = []
BLOCK = 16


def log(*a: Any) -> None:
    print(*a, flush=True)


# ----------------------------------------------------------------------------- timing
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(
    fn: Callable[[], Any],
    dev: torch.device,
    warmup: int,
    iters: int,
    after: Callable[[], Any] | None = None,
) -> dict[str, float]:
    """Median / min / max milliseconds of fn over iters runs (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
        if after:
            after()
    sync(dev)
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if after:
            after()
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def free(dev: torch.device) -> None:
    """Give the caching allocator's memory back once a stage's locals are gone."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        log(f"  (after free: {torch.cuda.memory_allocated() / 1e9:.1f} GB allocated)")


# ----------------------------------------------------------------------------- rooflines
def rooflines(dev: torch.device, tiny: bool) -> None:
    log("== rooflines")
    n = (1 << 20) if tiny else (1 << 31)  # bf16 elements: 4 GiB per buffer on the GPU
    src = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), dev, 3, 3 if tiny else 15)
    moved = 2 * src.numel() * src.element_size()
    bw = moved / (t["median_ms"] * 1e-3)
    assert torch.equal(dst, src), "copy check failed"
    m = 256 if tiny else 8192
    sets = [
        (
            torch.randn(m, m, dtype=torch.bfloat16, device=dev),
            torch.randn(m, m, dtype=torch.bfloat16, device=dev),
        )
        for _ in range(3)
    ]
    out = torch.empty(m, m, dtype=torch.bfloat16, device=dev)
    i = [0]

    def mm() -> None:
        a, b = sets[i[0] % 3]
        i[0] += 1
        torch.matmul(a, b, out=out)

    tm = bench(mm, dev, 5, 3 if tiny else 30)
    flops = 2 * m**3 / (tm["median_ms"] * 1e-3)
    RESULTS["roof"] = {
        "copy_bytes_moved": moved,
        "copy_ms": t,
        "copy_GBps": bw / 1e9,
        "matmul_n": m,
        "matmul_ms": tm,
        "matmul_TFLOPs": flops / 1e12,
    }
    log(
        f"copy {moved / 2**30:.1f} GiB moved (read+write): {t['median_ms']:.3f} ms"
        f" -> {bw / 1e9:.0f} GB/s"
    )
    log(f"bf16 matmul {m}^3: {tm['median_ms']:.3f} ms -> {flops / 1e12:.0f} TFLOP/s")


# ----------------------------------------------------------------------------- kernel checks
def rel_norm(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref||, in float64."""
    got_f, ref_f = got.detach().double(), ref.detach().double()
    return float((got_f - ref_f).norm() / ref_f.norm().clamp_min(1e-30))


def _err(name: str, got: torch.Tensor, ref: torch.Tensor, rel_tol: float) -> None:
    got_f, ref_f = got.detach().double(), ref.detach().double()
    finite = bool(torch.isfinite(got_f).all())
    abs_err = float((got_f - ref_f).abs().max()) if got.numel() else 0.0
    scale = float(ref_f.abs().max()) if ref.numel() else 1.0
    rel_max = abs_err / max(scale, 1e-30)
    rel = rel_norm(got, ref)
    # rel_norm bounds the typical error; rel_max allows a few output roundings of slack.
    ok = finite and rel <= rel_tol and rel_max <= 4 * rel_tol
    RESULTS["kernel_checks"][name] = {
        "max_abs_err": abs_err,
        "max_abs_ref": scale,
        "rel_max": rel_max,
        "rel_norm": rel,
        "tol": rel_tol,
        "ok": ok,
    }
    flag = "ok  " if ok else "FAIL"
    log(
        f"  {flag} {name:38s} max|err| {abs_err:.3e}  (max|ref| {scale:.3e}, "
        f"rel_norm {rel:.2e}, tol {rel_tol:g})"
    )
    if not ok:
        FAILURES.append(f"kernel {name}: max|err| {abs_err:.3e}, rel_norm {rel:.2e}")


def kernel_checks(dev: torch.device, tiny: bool, only: set[str] | None = None) -> None:
    """Every kernel against its reference (``only``: those checks by name)."""
    import kernels
    from kernels.moe import route

    impl = "triton"
    # bf16 on the GPU; the CPU interpreter (--tiny) cannot run bf16 dots, so fp16 there.
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float16
    hq, hkv, d, hidden = (4, 2, 128, 512) if tiny else (20, 4, 128, 2560)
    n_exp, top_k, inter = (8, 2, 128) if tiny else (64, 6, 1536)
    g = torch.Generator(device="cpu").manual_seed(1234)
    log(
        f"== kernel checks (Triton vs torch reference, {dt}, H={hq} KV={hkv} D={d} "
        f"hidden={hidden} E={n_exp} top{top_k} I={inter})"
    )

    def rnd(*shape: int, scale: float = 1.0, dtype: torch.dtype = dt) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(dev)

    def check_rms_norm() -> None:
        # rms_norm, with and without the fused residual
        for t in (1, 7) if tiny else (1, 333, 4096):
            x, w, r = rnd(t, hidden), rnd(hidden), rnd(t, hidden)
            for res in (None, r):
                got, got_h = kernels.rms_norm(x, w, 1e-5, res, impl=impl)
                ref, ref_h = kernels.rms_norm_ref(x, w, 1e-5, res)
                tag = "+res" if res is not None else ""
                _err(f"rms_norm{tag} T={t}", got, ref, 1e-2)
                _err(f"rms_norm{tag} residual_out T={t}", got_h, ref_h, 1e-2)

    def check_rotary() -> None:
        # rotary, 3-D (mrope) and 1-D positions
        t = 9 if tiny else 1000
        cache = kernels.build_cos_sin_cache(4096, d, 500000.0, device=dev)
        section = (22, 22, 20)
        for pos in (
            torch.randint(0, 4096, (t,), generator=g).to(dev),
            torch.randint(0, 4096, (3, t), generator=g).to(dev),
        ):
            q, k = rnd(t, hq, d), rnd(t, hkv, d)
            qg, kg = kernels.rotary_embedding(q.clone(), k.clone(), pos, cache, section, impl=impl)
            qr, kr = kernels.rotary_embedding_ref(q.clone(), k.clone(), pos, cache, section)
            _err(f"rotary {'mrope' if pos.dim() == 2 else '1-D'} q T={t}", qg, qr, 1e-2)
            _err(f"rotary {'mrope' if pos.dim() == 2 else '1-D'} k T={t}", kg, kr, 1e-2)

    def check_write_kv() -> None:
        # write_kv: random slots, some skipped (-1); whole caches compared (exact)
        nb = 64 if tiny else 2048
        t = 20 if tiny else 3000
        kc, vc = rnd(nb, BLOCK, hkv, d), rnd(nb, BLOCK, hkv, d)
        slots = torch.randperm(nb * BLOCK, generator=g)[:t]
        slots[::7] = -1
        slots = slots.to(dev)
        k, v = rnd(t, hkv, d), rnd(t, hkv, d)
        kg_, vg_ = kc.clone(), vc.clone()
        kernels.write_kv(k, v, kg_, vg_, slots, impl=impl)
        kr_, vr_ = kc.clone(), vc.clone()
        kernels.write_kv_ref(k, v, kr_, vr_, slots)
        _err(f"write_kv k_cache T={t}", kg_, kr_, 0.0)
        _err(f"write_kv v_cache T={t}", vg_, vr_, 0.0)
        # rotary fused with the cache write (the attention layer's path) vs rotary + write_kv
        cache = kernels.build_cos_sin_cache(4096, d, 500000.0, device=dev)
        pos = torch.randint(0, 4096, (3, t), generator=g).to(dev)
        q = rnd(t, hq, d)
        kg_, vg_ = kc.clone(), vc.clone()
        qg, _ = kernels.rotary_embedding(
            q.clone(), k.clone(), pos, cache, (22, 22, 20), impl=impl, kv_write=(v, kg_, vg_, slots)
        )
        kr_, vr_ = kc.clone(), vc.clone()
        qr, kr = kernels.rotary_embedding(q.clone(), k.clone(), pos, cache, (22, 22, 20), impl=impl)
        kernels.write_kv_ref(kr, v, kr_, vr_, slots)
        _err(f"rotary+write_kv q T={t}", qg, qr, 0.0)
        _err(f"rotary+write_kv k_cache T={t}", kg_, kr_, 0.0)
        _err(f"rotary+write_kv v_cache T={t}", vg_, vr_, 0.0)
        # qkv projection + rotary + cache write in one launch (decode, one row) vs linear,
        # then the Triton rotary with the cache write; 3-D step table as the model builds it
        from engine.layers.rotary import TextRotary
        from kernels.gemv import linear, qkv_rope_linear

        rot = TextRotary(d, 500000.0, (22, 22, 20)).to(dev)
        x = rnd(1, hidden)
        w = rnd((hq + 2 * hkv) * d, hidden, scale=hidden**-0.5)
        pos1 = torch.randint(0, 4096, (3, 1), generator=g).to(dev)
        table, rows = rot.step_table(pos1)
        slot1 = slots[1:2]  # a real slot
        kg_, vg_ = kc.clone(), vc.clone()
        got = qkv_rope_linear(x, w, None, hq, hkv, (table, rows), (kg_, vg_, slot1), impl=impl)
        kr_, vr_ = kc.clone(), vc.clone()
        ref = linear(x, w, impl="torch")
        q1, k1, v1 = ref.split([hq * d, hkv * d, hkv * d], dim=-1)
        kernels.rotary_embedding(
            q1.view(1, hq, d), k1.view(1, hkv, d), rows, table, impl=impl,
            kv_write=(v1.view(1, hkv, d), kr_, vr_, slot1),
        )  # fmt: skip
        _err("qkv+rotary+write_kv qkv T=1", got, ref, 1e-2)
        _err("qkv+rotary+write_kv k_cache T=1", kg_, kr_, 1e-2)
        _err("qkv+rotary+write_kv v_cache T=1", vg_, vr_, 1e-2)

    def check_paged_attention() -> None:
        # paged attention: decode (one query each) and mixed prefill chunks
        nb = 256 if tiny else 4096
        kc, vc = rnd(nb, BLOCK, hkv, d), rnd(nb, BLOCK, hkv, d)
        perm = torch.randperm(nb, generator=g)
        scale = d**-0.5
        cases = {
            "decode": ([37, 5, 100] if tiny else [1, 17, 512, 768, 1000, 2049, 300, 64] * 4, None),
            # enough (sequence, kv head) pairs for one split each: the rows stored directly
            "decode one-split": ([9, 1, 33, 20] * 20 if tiny else [768, 1, 700, 17] * 20, None),
            "prefill": (
                [40, 9, 70] if tiny else [512, 1, 700, 1500, 33],
                [40, 1, 13] if tiny else [512, 1, 128, 300, 33],
            ),
        }
        for kind, (lens, q_lens) in cases.items():
            q_lens = q_lens or [1] * len(lens)
            width = max(-(-n // BLOCK) for n in lens)
            tables, used = [], 0
            for n in lens:
                m = -(-n // BLOCK)
                row = perm[used : used + m].tolist()
                used += m
                tables.append(row + [0] * (width - m))
            assert used <= nb, "not enough blocks for the attention check"
            starts = [0]
            for ql in q_lens:
                starts.append(starts[-1] + ql)
            q = rnd(starts[-1], hq, d)
            bt = torch.tensor(tables, dtype=torch.int32, device=dev)
            sl = torch.tensor(lens, dtype=torch.int32, device=dev)
            qs = torch.tensor(starts, dtype=torch.int32, device=dev)
            got = kernels.paged_attention(q, kc, vc, bt, sl, qs, scale, impl=impl)
            ref = kernels.paged_attention_ref(q, kc, vc, bt, sl, qs, scale)
            _err(f"paged_attention {kind} B={len(lens)} T={starts[-1]}", got, ref, 2e-2)

    def check_fused_moe() -> None:
        # fused MoE (grouped GEMMs) and routing
        w13 = rnd(n_exp, 2 * inter, hidden, scale=0.02)
        w2 = rnd(n_exp, hidden, inter, scale=0.02)
        for t in (1, 5) if tiny else (1, 64, 256, 4096):
            x = rnd(t, hidden)
            logits = torch.randn(t, n_exp, generator=g).to(dev)
            wts, ids = route(logits, top_k)
            got = kernels.fused_moe(x, w13, w2, wts, ids, impl=impl)
            ref = kernels.fused_moe_ref(x, w13, w2, wts, ids)
            _err(f"fused_moe T={t}", got, ref, 2e-2)
        # decode sizes: the shared experts' MLP (2 x I wide, as ERNIE's 2 shared experts)
        # inside the two decode launches vs the routed sum + the MLP on its own
        ws13, ws2 = rnd(4 * inter, hidden, scale=0.02), rnd(hidden, 2 * inter, scale=0.02)
        for t in (1, 2, 4):
            x = rnd(t, hidden)
            wts, ids = route(torch.randn(t, n_exp, generator=g).to(dev), top_k)
            gate, up = F.linear(x.float(), ws13.float()).split(2 * inter, dim=-1)
            shared = F.linear(F.silu(gate) * up, ws2.float())
            ref = kernels.fused_moe_ref(x, w13, w2, wts, ids).float() + shared
            got = kernels.fused_moe(x, w13, w2, wts, ids, impl=impl, shared=(ws13, ws2))
            _err(f"fused_moe+shared T={t}", got, ref, 2e-2)
        # route is torch on every device; check it against the model's Router module.
        router = Router(n_exp, hidden, top_k, 1e-12).to(dev)
        with torch.no_grad():
            router.weight.normal_(0, 0.02)
        x = rnd(64, hidden)
        rw, rid = router(x)
        w2_, id2 = route(F.linear(x.float(), router.weight), top_k)
        _err("route (torch) vs Router weights", w2_, rw, 1e-5)
        same = bool(torch.equal(rid, id2))
        RESULTS["kernel_checks"]["route ids equal"] = same
        if not same:
            FAILURES.append("route ids differ from Router ids")
        # decode sizes: router GEMV + routing in one launch (kernels.moe.gate_route), twice
        # per size so the arrival counters' reset is exercised too
        bias = torch.rand(n_exp, generator=g).to(dev) * 0.1
        for t in (1, 2, 4):
            for rep in range(2):
                x = rnd(t, hidden)
                want_w, want_ids = route(F.linear(x.float(), router.weight), top_k, bias)
                got_w, got_ids = kernels.moe.gate_route(x, router.weight, top_k, bias, impl=impl)
                _err(f"gate_route T={t} #{rep}", got_w, want_w, 1e-4)
                if not torch.equal(got_ids, want_ids):
                    FAILURES.append(f"gate_route T={t}: expert ids differ from cuBLAS + route")
        # the post-attention norm inside that launch (kernels.moe.norm_gate_route): at the
        # norm kernel's warp count x and the residual sum are bit-identical to it; at the
        # default count (NORM_ROUTE_WARPS) the sum of squares reduces in another order
        import kernels.triton_impl.moe_routing as routing

        # past the decode sizes: the batch router launch (kernels.moe.BATCH_ROUTER), twice
        # per size (counters); ids may differ from cuBLAS's only where two of the top k + 1
        # biased scores are within 1e-5 of each other (both are fp32 sums in some order)
        for t in (5, 40) if tiny else (16, 64, 256):
            for rep in range(2):
                x = rnd(t, hidden).to(torch.bfloat16)  # its one dtype (tiny runs fp16)
                want_w, want_ids = route(F.linear(x.float(), router.weight), top_k, bias)
                got_w, got_ids = routing.batch_gate_route_triton(
                    x, router.weight, top_k, bias, 1e-12
                )
                tag = f"batch_gate_route T={t} #{rep}"
                differ = (got_ids != want_ids).any(dim=1)
                score = F.linear(x.double(), router.weight.double()).softmax(-1) + bias.double()
                top = score.topk(top_k + 1, dim=-1).values
                near_tie = (top[:, :-1] - top[:, 1:]).min(dim=1).values < 1e-5
                RESULTS["kernel_checks"][f"{tag} ids differ"] = int(differ.sum())
                if bool((differ & ~near_tie).any()):
                    FAILURES.append(f"{tag}: expert ids differ from cuBLAS + route")
                same = ~differ
                _err(tag, got_w[same], want_w[same], 1e-4)

        norm_w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dev, dt)
        default_warps = routing.NORM_ROUTE_WARPS
        for warps in (None, default_warps):
            routing.NORM_ROUTE_WARPS = warps
            try:
                for t in (1, 2, 4):
                    h, res = rnd(t, hidden), rnd(t, hidden)
                    want_x, want_res = kernels.rms_norm(h, norm_w, 1e-5, res, impl=impl)
                    want_w, want_ids = kernels.moe.gate_route(want_x, router.weight, top_k, bias)
                    got_w, got_ids, got_x, got_res = kernels.moe.norm_gate_route(
                        h, res, norm_w, 1e-5, router.weight, top_k, bias, impl=impl
                    )
                    tag = f"norm_gate_route T={t} warps={warps or 'norm'}"
                    _err(tag, got_w, want_w, 1e-4)
                    _err(f"{tag} x", got_x, want_x, 1e-2)
                    _err(f"{tag} residual_out", got_res, want_res, 0.0)
                    same = torch.equal(got_x, want_x)
                    RESULTS["kernel_checks"][f"{tag} x bit-identical"] = same
                    if warps is None and not (same and torch.equal(got_ids, want_ids)):
                        FAILURES.append(f"{tag}: x or ids differ from the unfused launches")
            finally:
                routing.NORM_ROUTE_WARPS = default_warps

    def check_attention_block() -> None:
        # the one-launch attention half vs the chain of separate kernels (and the torch chain)
        from engine.layers.rotary import TextRotary
        from kernels.attention_block import attention_block, attention_block_ref
        from kernels.triton_impl.attention_block import sync_buffer

        bs, n_qkv = 16, (hq + 2 * hkv) * d
        wqkv, wo = rnd(n_qkv, hidden, scale=hidden**-0.5), rnd(hidden, hq * d, scale=0.05)
        norm_w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dev, dt)
        for seq in (1, 77) if tiny else (1, 512, 3000):
            blocks = -(-seq // bs)
            ids = torch.randperm(blocks + 8, generator=g)[:blocks] + 1
            bt = torch.zeros(1, blocks + 4, dtype=torch.int32)
            bt[0, :blocks] = ids.to(torch.int32)
            slot = int(bt[0, (seq - 1) // bs]) * bs + (seq - 1) % bs
            meta = (
                torch.tensor([slot], device=dev),
                bt.to(dev),
                torch.tensor([seq], dtype=torch.int32, device=dev),
                torch.tensor([0, 1], dtype=torch.int32, device=dev),
            )
            rope = TextRotary(d, 500000.0).to(dev).step_table(torch.tensor([seq - 1], device=dev))
            cache = (rnd(blocks + 9, bs, hkv, d), rnd(blocks + 9, bs, hkv, d))
            h, res = rnd(1, hidden), rnd(1, hidden)
            outs = {}
            for name, fn, kw in (
                ("fused", attention_block, {"impl": impl}),
                ("chain", attention_block_ref, {"impl": impl}),
                ("torch", attention_block_ref, {}),
            ):
                kv = tuple(c.clone() for c in cache)
                o, r = fn(
                    h, res, norm_w, 1e-5, (wqkv, None), (wo, None), hq, hkv, rope, kv, meta,
                    d**-0.5, **kw,
                )  # fmt: skip
                outs[name] = (o, r, *kv)
            for other in ("chain", "torch"):
                tag = f"attention_block ctx={seq} vs {other}"
                _err(tag, outs["fused"][0], outs[other][0], 2e-2)
                _err(f"{tag} k_cache", outs["fused"][2], outs[other][2], 1e-2)
                _err(f"{tag} v_cache", outs["fused"][3], outs[other][3], 1e-2)
                if not torch.equal(outs["fused"][1], outs[other][1]):
                    FAILURES.append(f"{tag}: residual differs")
            if sync_buffer(dev).any():
                FAILURES.append(f"attention_block ctx={seq}: counters not back at zero")

    def check_argmax() -> None:
        # greedy sampling's row argmax: exact, ties to the first column, like torch
        from kernels.argmax import argmax

        vocab = 1000 if tiny else 103424
        for b in (1, 4) if tiny else (1, 64, 256):
            x = rnd(b, vocab)
            x[:, vocab // 3] = x[:, vocab - 1] = x.max() + 1  # a tie across splits
            got, ref = argmax(x, impl=impl), x.argmax(dim=-1)
            RESULTS["kernel_checks"][f"argmax B={b}"] = bool(torch.equal(got, ref))
            if not torch.equal(got, ref):
                FAILURES.append(f"argmax B={b}: differs from torch.argmax")
            log(f"  argmax B={b}: {'ok' if torch.equal(got, ref) else 'MISMATCH'}")

    def check_rope_table() -> None:
        # a decode step's cos | sin table in one launch against torch's six (libdevice both)
        from kernels.rotary import mrope_pair_axes, rope_inv_freq, rope_table, rope_table_ref

        inv = rope_inv_freq(d, 500000.0).to(dev)
        axis = mrope_pair_axes(d, [22, 22, 20]).to(dev)  # d = 128 in both configs
        for t in (1, 7) if tiny else (1, 256, 4096):
            for three in (False, True):
                pos = torch.randint(0, 131072, (3, t) if three else (t,), generator=g).to(dev)
                got = rope_table(pos, inv, axis if three else None, impl=impl)
                ref = rope_table_ref(pos, inv, axis if three else None)
                tag = f"rope_table {'3-D' if three else '1-D'} T={t}"
                RESULTS["kernel_checks"][f"{tag} bit-identical"] = bool(torch.equal(got, ref))
                _err(tag, got, ref, 1e-6)
                log(f"  {tag}: bit-identical {torch.equal(got, ref)}")

    def check_norm_linear() -> None:
        # the norm inside a one-row GEMV launch (the shared experts' gate_up) against the norm
        # launch then the GEMV: bit-identical
        from kernels.gemv import linear, norm_linear

        n = 384 if tiny else 6144
        h, r, nw, w = rnd(1, hidden), rnd(1, hidden), rnd(hidden), rnd(n, hidden, scale=0.02)
        got, got_res = norm_linear(h, r, nw, 1e-5, w, impl=impl)
        x, want_res = kernels.rms_norm(h, nw, 1e-5, r, impl=impl)
        want = linear(x, w, impl=impl)
        same = bool(torch.equal(got, want) and torch.equal(got_res, want_res))
        RESULTS["kernel_checks"][f"norm_linear {n}x{hidden} bit-identical"] = same
        if not same:
            FAILURES.append(f"norm_linear {n}x{hidden}: differs from rms_norm then linear")
        log(f"  norm_linear {n}x{hidden}: bit-identical {same}")

    for name, fn in [
        ("argmax", check_argmax),
        ("norm_linear", check_norm_linear),
        ("rope_table", check_rope_table),
        ("attention_block", check_attention_block),
        ("rms_norm", check_rms_norm),
        ("rotary", check_rotary),
        ("write_kv", check_write_kv),
        ("paged_attention", check_paged_attention),
        ("fused_moe", check_fused_moe),
    ]:
        if only is not None and name not in only:
            continue
        try:
            fn()
        except Exception as e:  # one broken kernel must not hide the others
            traceback.print_exc()
            FAILURES.append(f"kernel {name} crashed: {type(e).__name__}: {e}")
            RESULTS["kernel_checks"][name + " crashed"] = repr(e)


# ----------------------------------------------------------------------------- MoE tiles
SWEEP_TILES = [  # (block_m, block_n, block_k, num_warps, num_stages); the first is the old fixed
    (64, 64, 32, 4, 3),
    (16, 64, 128, 4, 4),
    (16, 32, 256, 4, 3),
    (16, 64, 256, 4, 3),
    (16, 128, 128, 4, 3),
    (16, 64, 64, 4, 5),
    (32, 64, 128, 4, 3),
    (32, 128, 64, 4, 3),
    (64, 128, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 8, 4),
    (64, 256, 64, 8, 3),
]


def moe_sweep(dev: torch.device, tiny: bool) -> None:
    """fused_moe at 28B shapes per (tokens, tiles), each call replayed from a CUDA graph so
    only GPU time counts; the table in kernels/triton_impl/moe.py is picked from this."""
    from kernels.moe import fused_moe_ref, route
    from kernels.triton_impl.moe import MOE_TILES, MoeTiles, fused_moe_triton, pick_tiles

    e, d, inter, k = (8, 256, 128, 2) if tiny else (64, 2560, 1536, 6)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float16
    g = torch.Generator(device="cpu").manual_seed(7)
    w13 = (torch.randn(e, 2 * inter, d, generator=g) * 0.02).to(dt).to(dev)
    w2 = (torch.randn(e, d, inter, generator=g) * 0.02).to(dt).to(dev)
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    log(f"== MoE tile sweep (E={e} D={d} I={inter} top{k}; current table {MOE_TILES})")
    out: dict[str, Any] = {}
    for t in (1, 5) if tiny else (1, 64, 256, 2048, 8192):
        x = torch.randn(t, d, generator=g).to(dt).to(dev)
        wts, ids = route(torch.randn(t, e, generator=g).to(dev), k)
        ref = fused_moe_ref(x, w13, w2, wts, ids) if t <= 256 else None
        touched = int(torch.unique(ids).numel())
        row = {}
        for cfg in SWEEP_TILES[:3] if tiny else SWEEP_TILES:
            tiles = MoeTiles(*cfg)
            try:
                fn = lambda tiles=tiles, x=x, wts=wts, ids=ids: fused_moe_triton(  # noqa: E731
                    x, w13, w2, wts, ids, tiles=tiles
                )
                got = fn()
                if ref is not None:
                    rel = float((got.float() - ref.float()).norm() / ref.float().norm())
                    if not rel < 2e-2:
                        FAILURES.append(f"moe sweep T={t} {cfg}: rel_norm {rel:.2e}")
                if dev.type == "cuda":
                    graph = torch.cuda.CUDAGraph()
                    fn()
                    torch.cuda.synchronize()
                    with torch.cuda.graph(graph):
                        fn()
                    ms = bench(graph.replay, dev, 3, 20)["median_ms"]
                else:
                    ms = bench(fn, dev, 1, 2)["median_ms"]
                row[str(cfg)] = ms
            except Exception as ex:  # e.g. out of shared memory for a big tile
                row[str(cfg)] = f"{type(ex).__name__}"
        best = min((v, c) for c, v in row.items() if isinstance(v, float))
        cur = pick_tiles(t)
        cur_key = str((cur.block_m, cur.block_n, cur.block_k, cur.num_warps, cur.num_stages))
        gbps = touched * expert_bytes / (best[0] * 1e-3) / 1e9
        log(
            f"  T={t:5d}: best {best[1]} {best[0]:.3f} ms ({gbps:.0f} GB/s over {touched} "
            f"experts); old {row[str(SWEEP_TILES[0])]}; table pick {cur_key} {row.get(cur_key)}"
        )
        log(
            "     "
            + ", ".join(
                f"{c}: {v:.3f}" if isinstance(v, float) else f"{c}: {v}" for c, v in row.items()
            )
        )
        out[str(t)] = row
    RESULTS["moe_sweep"] = out


def _graph_ms(fn: Callable[[], Any], dev: torch.device, iters: int = 20) -> float:
    """Median ms of fn replayed from a CUDA graph (plain calls on CPU)."""
    fn()
    if dev.type != "cuda":
        return bench(fn, dev, 0, 1)["median_ms"]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay, dev, 3, iters)["median_ms"]


# (block_n, block_k, num_warps, num_stages); the first sweep (2026-11-25, RESULTS.md) also ran
# (4, 512, 4, 1), (8, 256, 4, 3), (8, 512, 8, 3), (16, 256, 4, 3), (16, 512, 8, 3),
# (32, 256, 8, 3) and M=4 (where cuBLAS won every shape)
GEMV_SWEEP = [(2, 1024, 4, 3), (4, 512, 4, 3), (4, 1024, 4, 3), (8, 512, 4, 3), (4, 1024, 2, 3)]
GEMV_SWEEP_M = (1,)


def gemv_sweep(dev: torch.device, tiny: bool) -> None:
    """Small-M linear at the 28B decode shapes: cuBLAS (F.linear) vs the Triton GEMV per tile.
    Each timing runs the op over enough weight copies (~256 MB) that L2 holds none of them,
    graph-replayed; "default" is kernels.triton_impl.gemv.pick_gemv_tiles."""
    from kernels.triton_impl import gemv as gv

    shapes = (
        [(640, 512), (512, 512), (1000, 512)]
        if tiny
        else [
            (3584, 2560),
            (2560, 2560),
            (6144, 2560),
            (2560, 3072),
            (24576, 2560),
            (2560, 12288),
            (103424, 2560),
        ]
    )
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float16
    g = torch.Generator(device="cpu").manual_seed(11)
    log("== small-M GEMV sweep: ms per op (weights rotated past L2), GB/s of weight read")
    out: dict[str, Any] = {}
    for n, k in shapes:
        nbytes = n * k * 2
        copies = 1 if tiny else max(1, -(-256_000_000 // nbytes))
        ws = [(torch.randn(n, k, device=dev) * 0.02).to(dt) for _ in range(copies)]
        for m in GEMV_SWEEP_M:
            x = torch.randn(m, k, generator=g).to(dt).to(dev)
            ref = F.linear(x.float(), ws[0].float())
            row: dict[str, Any] = {}
            row["cublas"] = _graph_ms(lambda x=x, ws=ws: [F.linear(x, w) for w in ws], dev) / copies
            d = gv.pick_gemv_tiles(n, k)
            cfgs = [(d.block_n, d.block_k, d.num_warps, d.num_stages)]
            cfgs += [c for c in (GEMV_SWEEP[:2] if tiny else GEMV_SWEEP) if c != cfgs[0]]
            for cfg in cfgs:
                tiles = gv.GemvTiles(*cfg)
                try:
                    got = gv.gemv_triton(x, ws[0], None, tiles)
                    rel = float((got.float() - ref).norm() / ref.norm())
                    if not rel < 1e-2:
                        FAILURES.append(f"gemv {m}x{n}x{k} {cfg}: rel_norm {rel:.2e}")

                    def run_all(t: Any = tiles, x: torch.Tensor = x, ws: list = ws) -> list:
                        return [gv.gemv_triton(x, w, None, t) for w in ws]

                    ms = _graph_ms(run_all, dev)
                    row[str(cfg)] = ms / copies
                except Exception as ex:
                    row[str(cfg)] = f"{type(ex).__name__}"
            best = min((v, c) for c, v in row.items() if isinstance(v, float) and c != "cublas")
            log(
                f"  M={m} N={n:6d} K={k:5d}: cuBLAS {row['cublas'] * 1e3:7.1f} us "
                f"({nbytes / row['cublas'] / 1e6:5.0f} GB/s); best {best[1]} "
                f"{best[0] * 1e3:7.1f} us ({nbytes / best[0] / 1e6:5.0f} GB/s)"
            )
            log(
                "     "
                + ", ".join(
                    f"{c}: {v * 1e3:.1f}" if isinstance(v, float) else f"{c}: {v}"
                    for c, v in row.items()
                )
            )
            out[f"{m}x{n}x{k}"] = row
        del ws
    RESULTS["gemv_sweep"] = out


MOE_DECODE_SWEEP = [  # MoeDecodeTiles(up_bn, up_bk, down_bn, down_bk, warps, stages)
    (8, 512, 8, 512, 4, 3),
    (4, 512, 4, 512, 4, 1),
    (4, 512, 4, 1024, 4, 3),
    (4, 512, 2, 512, 4, 3),
    (2, 512, 2, 512, 2, 3),
    (4, 512, 4, 512, 2, 3),
    (4, 256, 4, 256, 2, 3),
]


def moe_decode_sweep(dev: torch.device, tiny: bool) -> None:
    """fused_moe at T=1/2/4, 28B shapes: the grouped-GEMM path vs the decode GEMVs per tile;
    the first config is kernels.triton_impl.gemv.MOE_DECODE_TILES."""
    from kernels.moe import fused_moe_ref, route
    from kernels.triton_impl import gemv as gv
    from kernels.triton_impl.moe import fused_moe_triton

    e, d, inter, k = (8, 256, 128, 2) if tiny else (64, 2560, 1536, 6)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float16
    g = torch.Generator(device="cpu").manual_seed(5)
    w13 = (torch.randn(e, 2 * inter, d, device=dev) * 0.02).to(dt)
    w2 = (torch.randn(e, d, inter, device=dev) * 0.02).to(dt)
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    log(f"== decode MoE sweep (E={e} D={d} I={inter} top{k}), ms per layer")
    out: dict[str, Any] = {}
    sums: dict[str, float] = {}
    for t in (1, 2, 4):
        x = torch.randn(t, d, generator=g).to(dt).to(dev)
        wts, ids = route(torch.randn(t, e, generator=g).to(dev), k)
        add = torch.randn(t, d, generator=g).to(dt).to(dev)
        ref = fused_moe_ref(x, w13, w2, wts, ids).float() + add.float()
        touched = int(torch.unique(ids).numel())
        row: dict[str, Any] = {
            "grouped": _graph_ms(
                lambda a=(x, w13, w2, wts, ids), ad=add: fused_moe_triton(*a, add=ad), dev
            )
        }
        dflt = gv.MOE_DECODE_TILES
        cfgs = [tuple(getattr(dflt, f) for f in dflt.__dataclass_fields__)]
        cfgs += [c for c in (MOE_DECODE_SWEEP[:2] if tiny else MOE_DECODE_SWEEP) if c != cfgs[0]]
        for cfg in cfgs:
            # a sweep entry's warps are both launches' (the default has its own down warps)
            kw = {} if len(cfg) > 6 else {"down_num_warps": None}
            tiles = gv.MoeDecodeTiles(*cfg, **kw)
            try:
                got = gv.fused_moe_decode(x, w13, w2, wts, ids, add=add, tiles=tiles)
                rel = float((got.float() - ref).norm() / ref.norm())
                if not rel < 1e-2:
                    FAILURES.append(f"moe decode T={t} {cfg}: rel_norm {rel:.2e}")
                row[str(cfg)] = _graph_ms(
                    lambda tl_=tiles, a=(x, w13, w2, wts, ids), ad=add: gv.fused_moe_decode(
                        *a, add=ad, tiles=tl_
                    ),
                    dev,
                )
                sums[str(cfg)] = sums.get(str(cfg), 0.0) + row[str(cfg)] * (4 if t == 1 else 1)
            except Exception as ex:
                row[str(cfg)] = f"{type(ex).__name__}"
        best = min((v, c) for c, v in row.items() if isinstance(v, float) and c != "grouped")
        gb = touched * expert_bytes / 1e6
        log(
            f"  T={t}: grouped {row['grouped']:.4f} ms ({gb / row['grouped']:.0f} GB/s); best "
            f"{best[1]} {best[0]:.4f} ms ({gb / best[0]:.0f} GB/s over {touched} experts)"
        )
        log(
            "     "
            + ", ".join(
                f"{c}: {v:.4f}" if isinstance(v, float) else f"{c}: {v}" for c, v in row.items()
            )
        )
        out[str(t)] = row
    pick = min((v, c) for c, v in sums.items())[1]  # T=1 weighted x4
    RESULTS["moe_decode_sweep"] = out
    RESULTS["moe_decode_tiles_picked"] = pick
    log(f"  picked {pick}")


def decode_ab(runner: ModelRunner, cases: list, dev: torch.device, tiny: bool) -> dict[str, Any]:
    """Decode steps, graph-replayed, with each new path on/off (graphs recaptured per variant);
    logits compared with the old path's."""
    import kernels.gemv as kg
    import kernels.triton_impl.moe as km

    res: dict[str, Any] = {}
    new_gemv, new_moe = kg.GEMV_ENABLED, km.DECODE_MAX_TOKENS  # the shipped defaults
    variants = [
        ("old", False, 0),
        ("moe", False, new_moe),
        ("gemv", True, 0),
        ("new", new_gemv, new_moe),
        ("old again", False, 0),
        ("new again", new_gemv, new_moe),
    ]
    kept = []  # captured graphs stay alive: freeing them and recapturing into the same pool
    # trips the caching allocator (INTERNAL ASSERT), so each variant captures into a fresh pool
    keep = (kg.GEMV_ENABLED, km.DECODE_MAX_TOKENS)
    log("== decode A/B (graph replay; |dlogits| vs the old path)")
    for name, seqs, tokens, _ in cases:
        if not name.startswith("decode"):
            continue
        base = None
        for vname, gemv_on, moe_max in variants:
            kg.GEMV_ENABLED, km.DECODE_MAX_TOKENS = gemv_on, moe_max
            if runner.graphs is not None and dev.type == "cuda":
                from engine.cuda_graphs import CudaStepGraph

                kept.append(runner.graphs.graphs)
                pool = torch.cuda.graph_pool_handle()
                runner.graphs.make_graph = lambda pool=pool: CudaStepGraph(pool)
                runner.graphs.graphs = {}  # recapture with this path
            logits = torch.cat(runner.run(seqs)).float().clone()
            base = logits if base is None else base
            diff = float((logits - base).abs().max())
            t = bench(lambda s=seqs: runner.run(s), dev, 2 if tiny else 3, 3 if tiny else 50)
            t.update(tok_s=tokens / (t["median_ms"] * 1e-3), max_abs_diff_vs_old=diff)
            res[f"{name} [{vname}]"] = t
            log(
                f"  {name:22s} {vname:10s} {t['median_ms']:8.3f} ms (min {t['min_ms']:.3f})"
                f"  |dlogits| {diff:.3e} (logit scale {float(base.abs().max()):.2f})"
            )
    kg.GEMV_ENABLED, km.DECODE_MAX_TOKENS = keep
    return res


# (label, MoeDecodeTiles.num_warps, DECODE_MAX_TOKENS); the first is the old default (4 warps,
# decode GEMVs at T=1 only), the A/B baseline every other variant's logits are compared with.
DECODE_TILES_VARIANTS = [
    ("4w T<=1 (old)", 4, 1),
    ("2w T<=1", 2, 1),
    ("2w T<=4", 2, 4),
    ("4w T<=4", 4, 4),
]


def decode_tiles_check(dev: torch.device, tiny: bool) -> None:
    """Decode MoE GEMVs at 2 and 4 warps vs the fp32 torch reference at T=1/2/4 (28B shapes),
    through ``fused_moe_decode`` and through ``kernels.fused_moe`` with the decode path taken
    up to T=4; then ms per layer (graph replay): grouped GEMM vs decode GEMVs at 4 / 2 warps."""
    import kernels
    import kernels.triton_impl.moe as km
    from kernels.moe import fused_moe_ref, route
    from kernels.triton_impl import gemv as gv

    e, d, inter, k = (8, 256, 128, 2) if tiny else (64, 2560, 1536, 6)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float16
    g = torch.Generator(device="cpu").manual_seed(77)
    w13 = (torch.randn(e, 2 * inter, d, generator=g) * 0.02).to(dt).to(dev)
    w2 = (torch.randn(e, d, inter, generator=g) * 0.02).to(dt).to(dev)
    base = gv.MOE_DECODE_TILES
    keep_max = km.DECODE_MAX_TOKENS
    log(f"== decode MoE GEMVs: checks and ms per layer (E={e} D={d} I={inter} top{k}, {dt})")
    out: dict[str, Any] = {}
    try:
        for t in (1, 2, 4):
            x = torch.randn(t, d, generator=g).to(dt).to(dev)
            wts, ids = route(torch.randn(t, e, generator=g).to(dev), k)
            add = torch.randn(t, d, generator=g).to(dt).to(dev)
            ref = fused_moe_ref(x.float(), w13.float(), w2.float(), wts, ids) + add.float()
            row: dict[str, Any] = {}
            for warps in (4, 2):
                tiles = dataclasses.replace(base, num_warps=warps)
                got = gv.fused_moe_decode(x, w13, w2, wts, ids, add=add, tiles=tiles)
                _err(f"moe decode T={t} {warps} warps", got, ref, 1e-2)
                call = functools.partial(
                    gv.fused_moe_decode, x, w13, w2, wts, ids, add=add, tiles=tiles
                )
                row[f"decode {warps}w"] = _graph_ms(call, dev, 50)
            # the dispatcher with the decode path up to T=4 (what the model calls)
            km.DECODE_MAX_TOKENS = 4
            gv.MOE_DECODE_TILES = dataclasses.replace(base, num_warps=2)
            got = kernels.fused_moe(x, w13, w2, wts, ids, add=add)
            _err(f"fused_moe T={t} (T<=4 decode, 2w)", got, ref, 1e-2)
            km.DECODE_MAX_TOKENS = 0
            call = functools.partial(kernels.fused_moe, x, w13, w2, wts, ids, add=add)
            row["grouped"] = _graph_ms(call, dev, 50)
            km.DECODE_MAX_TOKENS, gv.MOE_DECODE_TILES = keep_max, base
            log(f"  T={t}: " + ", ".join(f"{c} {v:.4f} ms" for c, v in row.items()))
            out[str(t)] = row
    finally:
        km.DECODE_MAX_TOKENS, gv.MOE_DECODE_TILES = keep_max, base
    RESULTS["decode_tiles_layer"] = out


def decode_tiles_ab(
    runner: ModelRunner, cases: list, dev: torch.device, tiny: bool, rounds: int = 6
) -> dict[str, Any]:
    """Full decode steps (b1/b2/b4) per decode-MoE variant (DECODE_TILES_VARIANTS): each
    variant's graphs are captured once into their own pool and kept; then `rounds` rounds
    time every variant in turn (order rotated per round), as runner.run (the step the
    scheduler sees: host packing + graph replay) and as the bare graph replay. Reports the
    median over rounds of each round's median, the spread over rounds, and |logits - old|."""
    import kernels.triton_impl.moe as km
    from kernels.triton_impl import gemv as gv

    g = runner.graphs
    assert g is not None, "needs the runner's decode graphs"
    keep = (gv.MOE_DECODE_TILES, km.DECODE_MAX_TOKENS, g.graphs, g.make_graph)
    base_tiles = gv.MOE_DECODE_TILES
    names = [v[0] for v in DECODE_TILES_VARIANTS]

    def use(v: tuple[str, int, int]) -> None:  # the globals matter at capture (and on CPU)
        gv.MOE_DECODE_TILES = dataclasses.replace(base_tiles, num_warps=v[1])
        km.DECODE_MAX_TOKENS = v[2]

    cases = [c for c in cases if c[0].startswith("decode")]
    store: dict[str, dict] = {}
    logits: dict[tuple[str, str], torch.Tensor] = {}
    eager: dict[tuple[str, str], torch.Tensor] = {}
    res: dict[str, Any] = {}
    log(
        f"== decode MoE tiles A/B in the full step ({rounds} rounds; variants: "
        + "; ".join(
            f"{n} = {w} warps, decode GEMVs for T <= {m}" for n, w, m in DECODE_TILES_VARIANTS
        )
        + ")"
    )
    try:
        for v in DECODE_TILES_VARIANTS:  # capture every variant's graphs once
            use(v)
            if dev.type == "cuda":
                from engine.cuda_graphs import CudaStepGraph

                g.make_graph = functools.partial(CudaStepGraph, torch.cuda.graph_pool_handle())
            g.graphs = {}
            for name, seqs, _, _ in cases:
                logits[(v[0], name)] = torch.cat(runner.run(seqs)).float().clone()
                runner.graphs = None  # the same step eagerly, with this variant's kernels
                try:
                    eager[(v[0], name)] = torch.cat(runner.run(seqs)).float().clone()
                finally:
                    runner.graphs = g
            store[v[0]] = g.graphs
        iters = 3 if tiny else 40
        times: dict[tuple[str, str], dict[str, list[float]]] = {}
        for name, seqs, _, _ in cases:
            b = g.bucket(len(seqs))
            assert b is not None, len(seqs)
            for r in range(rounds):
                order = (
                    DECODE_TILES_VARIANTS[r % len(names) :]
                    + DECODE_TILES_VARIANTS[: r % len(names)]
                )
                parts = []
                for v in order:
                    use(v)
                    g.graphs = store[v[0]]
                    runner.run(seqs)  # the static inputs of this case, then time
                    step = bench(functools.partial(runner.run, seqs), dev, 3, iters)["median_ms"]
                    graph = g.graphs[b][0]
                    with torch.inference_mode():  # CPU stand-in replays run the model
                        rep = bench(graph.replay, dev, 3, iters)["median_ms"]
                    tt = times.setdefault((v[0], name), {"step": [], "replay": []})
                    tt["step"].append(step)
                    tt["replay"].append(rep)
                    parts.append(f"{v[0]} {step:.3f}/{rep:.3f}")
                log(f"  {name} round {r + 1}: " + ", ".join(parts) + "  (step/replay ms)")
        for name, _, tokens, _ in cases:
            ref = logits[(names[0], name)]
            ref_eager = eager[(names[0], name)]
            old = times[(names[0], name)]
            for n in names:
                tt = times[(n, name)]
                lg = logits[(n, name)]
                diff = float((lg - ref).abs().max())
                finite = bool(torch.isfinite(lg).all())
                row = {
                    "step_ms": statistics.median(tt["step"]),
                    "step_min_round": min(tt["step"]),
                    "step_max_round": max(tt["step"]),
                    "replay_ms": statistics.median(tt["replay"]),
                    "replay_min_round": min(tt["replay"]),
                    "replay_max_round": max(tt["replay"]),
                    "rounds_step": tt["step"],
                    "rounds_replay": tt["replay"],
                    # per round (variant - old), both timed back to back: the paired change
                    "step_vs_old_ms": statistics.median(
                        [x - y for x, y in zip(tt["step"], old["step"], strict=True)]
                    ),
                    "replay_vs_old_ms": statistics.median(
                        [x - y for x, y in zip(tt["replay"], old["replay"], strict=True)]
                    ),
                    "max_abs_dlogits_vs_old": diff,
                    "max_abs_dlogits_graph_vs_eager": float((lg - eager[(n, name)]).abs().max()),
                    "max_abs_dlogits_eager_vs_old_eager": float(
                        (eager[(n, name)] - ref_eager).abs().max()
                    ),
                    "logit_scale": float(ref.abs().max()),
                    "finite": finite,
                    "tokens": tokens,
                    "median_ms": statistics.median(tt["step"]),
                    "min_ms": min(tt["step"]),
                    "max_ms": max(tt["step"]),
                    "tok_s": tokens / (statistics.median(tt["step"]) * 1e-3),
                }
                res[f"{name} [{n}]"] = row
                if not finite:
                    FAILURES.append(f"{name} [{n}]: non-finite logits")
                if diff > 1.0:
                    RESULTS["notes"].append(f"{name} [{n}]: |dlogits| vs old {diff:.3f} > 1.0")
        lines = [
            "== decode MoE tiles A/B summary: ms, median over rounds (min-max of round medians)",
            "| case | variant | step (runner.run) | vs old (paired) | graph replay "
            "| vs old (paired) | max abs dlogits vs old | eager vs old eager | graph vs eager |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, _, _, _ in cases:
            for n in names:
                r_ = res[f"{name} [{n}]"]
                lines.append(
                    f"| {name} | {n} | {r_['step_ms']:.3f} ({r_['step_min_round']:.3f}-"
                    f"{r_['step_max_round']:.3f}) | {r_['step_vs_old_ms']:+.3f} | "
                    f"{r_['replay_ms']:.3f} ({r_['replay_min_round']:.3f}-"
                    f"{r_['replay_max_round']:.3f}) | {r_['replay_vs_old_ms']:+.3f} | "
                    f"{r_['max_abs_dlogits_vs_old']:.3f} (scale {r_['logit_scale']:.2f}) | "
                    f"{r_['max_abs_dlogits_eager_vs_old_eager']:.3f} | "
                    f"{r_['max_abs_dlogits_graph_vs_eager']:.3f} |"
                )
        RESULTS["decode_tiles_summary"] = lines
        log("\n" + "\n".join(lines))
    finally:
        gv.MOE_DECODE_TILES, km.DECODE_MAX_TOKENS = keep[0], keep[1]
        _KEPT.append(store)  # the variants' graphs stay alive (see decode_ab)
        g.graphs, g.make_graph = keep[2], keep[3]  # the runner's own graphs again
    return res


_KEPT: list[Any] = []  # captured graphs outlive their A/B: freeing them trips the allocator


def attention_sweep(dev: torch.device, tiny: bool) -> None:
    """Decode attention per (batch, context) and (BLOCK_N, warps), block tables as wide as the
    runner's CUDA graphs make them (8192 blocks), graph-replayed like the decode step."""
    from kernels.triton_impl.attention_decode import paged_attention_decode

    hq, hkv, d = (4, 2, 128) if tiny else (20, 4, 128)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float16
    width = 16 if tiny else 8192
    cases = [(1, 40), (4, 48)] if tiny else [(1, 512), (64, 768), (256, 768)]
    log(f"== decode attention sweep (Hq={hq} Hkv={hkv} D={d}, table width {width})")
    out: dict[str, Any] = {}
    for b, ctx in cases:
        per = -(-ctx // BLOCK)
        kc = torch.randn(b * per + 1, BLOCK, hkv, d, device=dev).to(dt)
        vc = torch.randn_like(kc)
        tables = torch.zeros(b, width, dtype=torch.int32, device=dev)
        tables[:, :per] = torch.arange(b * per, dtype=torch.int32, device=dev).view(b, per)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        qsl = torch.arange(b + 1, dtype=torch.int32, device=dev)
        q = torch.randn(b, hq, d, device=dev).to(dt)
        ref = paged_attention_decode(q, kc, vc, tables, lens, qsl, d**-0.5)
        row = {}
        for bn, warps in [(32, 4), (16, 4), (64, 4), (64, 8), (128, 8)]:
            try:
                args = (q, kc, vc, tables, lens, qsl, d**-0.5)

                def fn(bn: int = bn, warps: int = warps, args: tuple = args) -> torch.Tensor:
                    return paged_attention_decode(*args, block_n=bn, num_warps=warps)

                diff = float((fn().float() - ref.float()).abs().max())
                if dev.type == "cuda":
                    graph = torch.cuda.CUDAGraph()
                    torch.cuda.synchronize()
                    with torch.cuda.graph(graph):
                        fn()
                    ms = bench(graph.replay, dev, 3, 30)["median_ms"]
                else:
                    ms = bench(fn, dev, 1, 2)["median_ms"]
                kv_gb = 2 * b * ctx * hkv * d * kc.element_size() / 1e9
                row[f"{bn}x{warps}w"] = ms
                log(
                    f"  b{b} ctx{ctx} BLOCK_N={bn} warps={warps}: {ms * 1e3:.1f} us "
                    f"({kv_gb / (ms * 1e-3):.0f} GB/s KV), |diff vs 32x4| {diff:.1e}"
                )
            except Exception as ex:
                row[f"{bn}x{warps}w"] = f"{type(ex).__name__}"
                log(f"  b{b} BLOCK_N={bn} warps={warps}: {type(ex).__name__}: {ex}")
        out[f"b{b} ctx{ctx}"] = row
    RESULTS["attention_sweep"] = out


# ----------------------------------------------------------------------------- configs
def hf_config_dict(tiny: bool) -> dict[str, Any]:
    try:
        from transformers import Ernie4_5_VLMoeConfig

        d = Ernie4_5_VLMoeConfig().to_dict()
    except ImportError as e:
        RESULTS["notes"].append(f"transformers config unavailable ({e}); engine/configs.py used")
        d = json.loads(json.dumps(ERNIE_45_VL_28B_A3B))
    if tiny:
        d["text_config"].update(
            vocab_size=1000,
            hidden_size=512,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            moe_intermediate_size=[128, 64],
            moe_num_experts=8,
            moe_k=2,
            mlp_layer_types=["dense", "sparse", "sparse"],
        )
    return d


def param_budget(model: Ernie45ForCausalLM) -> dict[str, float]:
    """Bytes and params by role, to state what a token must read and compute."""
    c = model.config
    nb = lambda p: p.numel() * p.element_size()  # noqa: E731
    out = {
        "total_params": 0,
        "total_bytes": 0,
        "embed_bytes": 0,
        "embed_params": 0,
        "always_bytes": 0,
        "always_params": 0,
        "text_expert_bytes": 0,
        "text_expert_params": 0,
    }
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        out["total_params"] += p.numel()
        out["total_bytes"] += nb(p)
        if "embed_tokens" in name or "lm_head" in name:
            out["embed_bytes"] += nb(p)
            out["embed_params"] += p.numel()
        elif "vision_moe" in name:
            continue
        elif "text_moe.experts" in name:
            out["text_expert_bytes"] += nb(p)
            out["text_expert_params"] += p.numel()
        else:  # attention, norms, dense MLP, shared experts, routers
            out["always_bytes"] += nb(p)
            out["always_params"] += p.numel()
    frac = c.moe_k / c.num_experts
    out["active_params_per_token"] = out["always_params"] + frac * out["text_expert_params"]
    out["kv_bytes_per_token"] = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2
    out["num_experts"], out["moe_k"] = c.num_experts, c.moe_k
    return out


def limits(budget: dict[str, float], roof: dict[str, Any]) -> dict[str, Callable[..., float]]:
    bw = roof["copy_GBps"] * 1e9
    peak = roof["matmul_TFLOPs"] * 1e12
    e, k = budget["num_experts"], budget["moe_k"]

    def decode(batch: int, ctx: int) -> float:
        touched = e * (1 - (1 - k / e) ** batch) / e  # expected share of experts hit
        weight = budget["always_bytes"] + touched * budget["text_expert_bytes"]
        weight += budget["embed_bytes"]  # the (tied) LM head matrix is read in full
        kv = batch * ctx * budget["kv_bytes_per_token"]
        flops = 2 * batch * (budget["active_params_per_token"] + budget["embed_params"])
        return max((weight + kv) / bw, flops / peak) * 1e3

    def prefill(tokens: int) -> float:
        return 2 * budget["active_params_per_token"] * tokens / peak * 1e3

    return {"decode": decode, "prefill": prefill}


# ----------------------------------------------------------------------------- Tandem
def build_tandem(cfg: ModelConfig, dev: torch.device, dtype: torch.dtype) -> Ernie45ForCausalLM:
    """The language model of `cfg` (no vision tower) with the engine's dummy weights."""
    model = build_random_model(dataclasses.replace(cfg, vision=None), dtype, dev, seed=0)
    assert isinstance(model, Ernie45ForCausalLM)
    return model


def seqs_decode(
    batch: int, ctx: int, vocab: int, blocks_per: int, is3d: bool
) -> list[StepSequence]:
    out = []
    for b in range(batch):
        pos = torch.full((3, 1) if is3d else (1,), ctx - 1, dtype=torch.long)
        out.append(
            StepSequence(
                token_ids=[int(torch.randint(0, vocab, (1,)))],
                positions=pos,
                num_computed=ctx - 1,
                block_ids=list(range(b * blocks_per, b * blocks_per + -(-ctx // BLOCK))),
            )
        )
    return out


def seqs_prefill(
    n: int, length: int, vocab: int, blocks_per: int, is3d: bool
) -> list[StepSequence]:
    out = []
    for b in range(n):
        pos = torch.arange(length)
        pos = pos.expand(3, -1).clone() if is3d else pos
        out.append(
            StepSequence(
                token_ids=torch.randint(0, vocab, (length,)).tolist(),
                positions=pos,
                num_computed=0,
                block_ids=list(range(b * blocks_per, b * blocks_per + -(-length // BLOCK))),
            )
        )
    return out


def run_tandem(
    cfg: ModelConfig,
    dev: torch.device,
    dtype: torch.dtype,
    shapes: dict[str, Any],
    tiny: bool,
    profile: bool = False,
    prefill_ab: bool = False,
    decode_only: bool = False,
    decode_tiles: bool = False,
) -> dict[str, Any]:
    log("== Tandem: building the text model on the device (random weights)")
    t0 = time.perf_counter()
    model = build_tandem(cfg, dev, dtype)
    sync(dev)
    budget = param_budget(model)
    RESULTS["budget"] = budget
    log(
        f"built in {time.perf_counter() - t0:.1f} s: {budget['total_params'] / 1e9:.2f} B params, "
        f"{budget['total_bytes'] / 1e9:.1f} GB; active/token "
        f"{budget['active_params_per_token'] / 1e9:.2f} B "
        f"(+ {budget['embed_params'] / 1e9:.2f} B embedding/LM head)"
    )
    max_ctx = max(shapes["decode_ctx_big"], shapes["decode_ctx_1"], shapes["prefill_len"])
    blocks_per = -(-max_ctx // BLOCK)
    max_seqs = max(max(shapes["decode_batches"]), shapes["prefill_n"], 1)
    num_blocks = blocks_per * max_seqs
    # CUDA graphs for decode (on CPU the eager stand-in, so --tiny walks the same path)
    runner = ModelRunner(model, cfg, num_blocks, BLOCK, dtype, dev, cuda_graphs=True)
    with torch.no_grad():
        for kc, vc in runner.kv_caches:  # random context, never zeros
            kc.normal_()
            vc.normal_()
    if dev.type == "cuda":
        log(
            f"KV pool {num_blocks} blocks x {BLOCK}: "
            f"{sum(k.numel() * 2 * k.element_size() for k, _ in runner.kv_caches) / 1e9:.1f} GB; "
            f"allocated {torch.cuda.memory_allocated() / 1e9:.1f} GB"
        )
    vocab, is3d = cfg.text.vocab_size, cfg.text.mrope_section is not None
    res: dict[str, Any] = {}
    lim = limits(budget, RESULTS["roof"])
    cases: list[tuple[str, list[StepSequence], int, float]] = []
    ctx1 = shapes["decode_ctx_1"]
    cases.append(
        (
            f"decode b1 ctx{ctx1}",
            seqs_decode(1, ctx1, vocab, blocks_per, is3d),
            1,
            lim["decode"](1, ctx1),
        )
    )
    for b in shapes["decode_batches"]:
        c = shapes["decode_ctx_big"]
        cases.append(
            (
                f"decode b{b} ctx{c}",
                seqs_decode(b, c, vocab, blocks_per, is3d),
                b,
                lim["decode"](b, c),
            )
        )
    n, length = shapes["prefill_n"], shapes["prefill_len"]
    cases.append(
        (
            f"prefill {n}x{length}",
            seqs_prefill(n, length, vocab, blocks_per, is3d),
            n * length,
            lim["prefill"](n * length),
        )
    )
    if decode_only:  # --decode-ab: decode b1 and b4 only (M <= 4 is the GEMV range)
        cases = cases[:1] + [  # noqa: RUF005
            (
                f"decode b4 ctx{ctx1}",
                seqs_decode(4, ctx1, vocab, blocks_per, is3d),
                4,
                lim["decode"](4, ctx1),
            )
        ]
    if decode_tiles:  # --decode-tiles-ab: decode b1, b2, b4 at the b1 context
        cases = [
            (
                f"decode b{b} ctx{ctx1}",
                seqs_decode(b, ctx1, vocab, blocks_per, is3d),
                b,
                lim["decode"](b, ctx1),
            )
            for b in (1, 2, 4)
        ]
    for name, seqs, tokens, limit_ms in cases:
        try:
            out = runner.run(seqs)
            sync(dev)
            finite = all(bool(torch.isfinite(o).all()) for o in out)
            if not finite:
                FAILURES.append(f"Tandem {name}: non-finite logits")
            iters = 3 if tiny else (30 if "b1 " in name else 10)
            t = bench(lambda s=seqs: runner.run(s), dev, 2 if tiny else 3, iters)
            t.update(
                tokens=tokens,
                limit_ms=limit_ms,
                finite_logits=finite,
                tok_s=tokens / (t["median_ms"] * 1e-3),
            )
            res[name] = t
            log(
                f"  {name:22s} {t['median_ms']:9.2f} ms"
                f"  (min {t['min_ms']:.2f}, max {t['max_ms']:.2f})"
                f"  {t['tok_s']:10.0f} tok/s   limit {limit_ms:.2f} ms  logits finite {finite}"
            )
            if name.startswith("decode") and runner.graphs is not None:
                res[name + " [eager]"] = eager_vs_graph(runner, seqs, dev, tokens, limit_ms, name)
        except Exception as e:  # keep going: later cases and HF still have value
            traceback.print_exc()
            FAILURES.append(f"Tandem {name}: {type(e).__name__}: {e}")
            res[name] = {
                "error": f"{type(e).__name__}: {e}",
                "limit_ms": limit_ms,
                "tokens": tokens,
            }
    if decode_only:
        res.update(decode_ab(runner, cases, dev, tiny))
    if decode_tiles:
        try:
            res.update(decode_tiles_ab(runner, cases, dev, tiny))
        except Exception as e:
            traceback.print_exc()
            FAILURES.append(f"decode tiles A/B: {type(e).__name__}: {e}")
    if prefill_ab:  # the same prefill step with the Triton MoE GEMMs instead of grouped_mm
        import kernels.triton_impl.moe_grouped as grouped

        name, seqs, tokens, limit_ms = cases[-1]
        keep, grouped.GROUPED_MIN_ROWS = grouped.GROUPED_MIN_ROWS, 0
        t = bench(lambda s=seqs: runner.run(s), dev, 2, 3 if tiny else 10)
        grouped.GROUPED_MIN_ROWS = keep
        t.update(tokens=tokens, limit_ms=limit_ms, tok_s=tokens / (t["median_ms"] * 1e-3))
        res[name + " [triton moe]"] = t
        log(f"  {name + ' [triton moe]':22s} {t['median_ms']:9.2f} ms  {t['tok_s']:10.0f} tok/s")
    if dev.type == "cuda" and profile:
        profile_step(runner, cases[0][1], cases[0][0])  # decode b1, eager
        profile_step(runner, cases[-1][1], cases[-1][0])  # prefill
    if dev.type == "cuda":
        res["peak_allocated_GB"] = torch.cuda.max_memory_allocated() / 1e9
    return res


GRAPH_EAGER_REL_TOL = 0.5
"""Largest ||logits(graph) - logits(eager)|| / ||logits(eager)|| a decode step may show. Not
a precision bound: with random weights a rounding difference that flips one top-k expert
choice grows layer by layer, and at b1 the graph's attention splits differ from the eager
step's (the bucket's block-table width fixes them). bench/graph_eager_check.py measured both
paths against the same weights in fp32 (H200, 2026-12-03): rel 0.066 / 0.125 / 0.18 at 2 / 8
/ 16 layers for graph and eager alike, top-1 equal to fp32's; at 28 layers graph vs eager
reads ~0.15. Unrelated logits (a wrong cache, wrong positions) read ~1.4 (sqrt 2)."""


def eager_vs_graph(
    runner: ModelRunner,
    seqs: list[StepSequence],
    dev: torch.device,
    tokens: int,
    limit_ms: float,
    name: str,
) -> dict[str, Any]:
    """The same step with the runner's CUDA graphs switched off: the eager baseline, and
    the largest |logits(graph) - logits(eager)| (padding rows change GEMM shapes only)."""
    graphs, runner.graphs = runner.graphs, None
    try:
        eager = torch.cat(runner.run(seqs))
        runner.graphs = graphs
        graphed = torch.cat(runner.run(seqs)).clone()
        diff = float((eager - graphed).abs().max())
        rel = rel_norm(graphed, eager)
        top1 = float((eager.argmax(-1) == graphed.argmax(-1)).float().mean())
        runner.graphs = None
        iters = 3 if tokens < 8 and dev.type == "cpu" else 10
        t = bench(lambda: runner.run(seqs), dev, 2, iters)
        t.update(tokens=tokens, limit_ms=limit_ms, tok_s=tokens / (t["median_ms"] * 1e-3))
        t["max_abs_diff_graph_vs_eager"] = diff
        t["rel_norm_graph_vs_eager"] = rel
        t["top1_agree_graph_vs_eager"] = top1
        log(
            f"  {name + ' [eager]':22s} {t['median_ms']:9.2f} ms"
            f"  (min {t['min_ms']:.2f}, max {t['max_ms']:.2f})"
            f"  {t['tok_s']:10.0f} tok/s   |logits graph - eager| max {diff:.2e},"
            f" rel_norm {rel:.2e}, top-1 agree {top1:.3f}"
        )
        # the graph and eager steps may take other kernels (split counts fixed per graph
        # bucket, padding rows): see GRAPH_EAGER_REL_TOL
        if not rel < GRAPH_EAGER_REL_TOL:
            FAILURES.append(
                f"{name}: graph logits differ from eager: rel_norm {rel:.3e} (max {diff:.3e})"
            )
        return t
    except Exception as e:
        traceback.print_exc()
        FAILURES.append(f"eager {name}: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}", "limit_ms": limit_ms, "tokens": tokens}
    finally:
        runner.graphs = graphs


def profile_step(runner: ModelRunner, seqs: list[StepSequence], name: str) -> None:
    """torch.profiler over 5 eager steps: where the decode step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    steps = 5
    graphs, runner.graphs = runner.graphs, None  # count the eager step's launches
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                runner.run(seqs)
            torch.cuda.synchronize()
        ka = prof.key_averages()
        launches = sum(
            e.count
            for e in ka
            if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")
        )
        gpu_us = 0.0
        for e in ka:
            if str(getattr(e, "device_type", "")).endswith("CUDA"):
                gpu_us += getattr(e, "self_device_time_total", 0.0) or 0.0
        RESULTS.setdefault("profile", {})[name] = {
            "kernel_launches_per_step": launches / steps,
            "gpu_kernel_ms_per_step": gpu_us / steps / 1e3,
        }
        log(
            f"== profile of {name}: {launches / steps:.0f} kernel launches/step, "
            f"{gpu_us / steps / 1e3:.2f} ms of GPU kernel time/step"
        )
        for key in ("self_cpu_time_total", "self_device_time_total"):
            try:
                log(ka.table(sort_by=key, row_limit=14, max_name_column_width=50))
            except Exception as e:  # older/newer names of the sort key
                log(f"(profile table by {key} failed: {e})")
    except Exception as e:
        traceback.print_exc()
        RESULTS["notes"].append(f"profile failed: {type(e).__name__}: {e}")
    finally:
        runner.graphs = graphs


# ----------------------------------------------------------------------------- HF baseline
def build_hf_text_model(
    cfg_dict: dict[str, Any], dev: torch.device, dtype: torch.dtype
) -> tuple[Any, Any]:
    """transformers' VL text model of `cfg_dict` with random N(0, 0.02) weights built on
    `dev` in `dtype` (no fp32 copy), norms 1, score bias 0 — as Tandem's dummy weights."""
    from transformers import Ernie4_5_VLMoeConfig
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeTextModel,
    )

    tcfg = Ernie4_5_VLMoeConfig(**cfg_dict).text_config
    with torch.device(dev):
        hf = Ernie4_5_VLMoeTextModel._from_config(tcfg, dtype=dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif "e_score_correction_bias" in name:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return hf.eval(), tcfg


def run_hf(
    cfg_dict: dict[str, Any],
    dev: torch.device,
    dtype: torch.dtype,
    shapes: dict[str, Any],
    tiny: bool,
) -> dict[str, Any]:
    import transformers
    from transformers import DynamicCache

    log(f"== HF transformers {transformers.__version__}: Ernie4_5_VLMoeTextModel + tied LM head")
    t0 = time.perf_counter()
    hf, tcfg = build_hf_text_model(cfg_dict, dev, dtype)
    sync(dev)
    head = hf.embed_tokens.weight
    info = {
        "attn_implementation": getattr(hf.config, "_attn_implementation", None),
        "experts_implementation": getattr(
            hf.config,
            "_experts_implementation_internal",
            getattr(hf.config, "_experts_implementation", None),
        ),
        "router_dtype": str(
            next(m.weight.dtype for n, m in hf.named_modules() if n.endswith("gate"))
        ),
        "build_s": time.perf_counter() - t0,
        "transformers": transformers.__version__,
    }
    log(
        f"built in {info['build_s']:.1f} s; attention {info['attn_implementation']}, "
        f"experts {info['experts_implementation']}, router {info['router_dtype']}"
    )
    res: dict[str, Any] = {"info": info}
    vocab = tcfg.vocab_size

    def new_cache() -> Any:
        try:
            return DynamicCache(config=tcfg)
        except TypeError:
            return DynamicCache()

    with torch.inference_mode():
        ctx1 = shapes["decode_ctx_1"]
        name = f"decode b1 ctx{ctx1}"
        try:
            cache = new_cache()
            hf(
                input_ids=torch.randint(0, vocab, (1, ctx1 - 1), device=dev),
                past_key_values=cache,
                use_cache=True,
            )
            tok = torch.randint(0, vocab, (1, 1), device=dev)

            def step() -> torch.Tensor:
                h = hf(input_ids=tok, past_key_values=cache, use_cache=True).last_hidden_state
                return F.linear(h[:, -1], head).float()

            logits = step()  # the context grows one token a step (512 -> ~535): no crop,
            # which transformers 5.x refuses for positive lengths
            finite = bool(torch.isfinite(logits).all())
            t = bench(step, dev, 2 if tiny else 3, 3 if tiny else 20)
            t.update(tokens=1, tok_s=1 / (t["median_ms"] * 1e-3), finite_logits=finite)
            res[name] = t
            log(f"  {name:22s} {t['median_ms']:9.2f} ms  {t['tok_s']:10.0f} tok/s  finite {finite}")
        except Exception as e:
            traceback.print_exc()
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        b, c = shapes["decode_batches"][0], shapes["decode_ctx_big"]
        name = f"decode b{b} ctx{c}"
        try:
            cache_b = new_cache()
            hf(
                input_ids=torch.randint(0, vocab, (b, c - 1), device=dev),
                past_key_values=cache_b,
                use_cache=True,
            )
            tok_b = torch.randint(0, vocab, (b, 1), device=dev)

            def step_b() -> torch.Tensor:
                h = hf(input_ids=tok_b, past_key_values=cache_b, use_cache=True)
                return F.linear(h.last_hidden_state[:, -1], head).float()

            finite = bool(torch.isfinite(step_b()).all())
            t = bench(step_b, dev, 2 if tiny else 3, 3 if tiny else 10)
            t.update(tokens=b, tok_s=b / (t["median_ms"] * 1e-3), finite_logits=finite)
            res[name] = t
            log(f"  {name:22s} {t['median_ms']:9.2f} ms  {t['tok_s']:10.0f} tok/s  finite {finite}")
            cache_b = None
        except Exception as e:
            traceback.print_exc()
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        n, length = shapes["prefill_n"], shapes["prefill_len"]
        name = f"prefill {n}x{length}"
        try:
            ids = torch.randint(0, vocab, (n, length), device=dev)

            def prefill() -> torch.Tensor:
                h = hf(input_ids=ids, past_key_values=new_cache(), use_cache=True).last_hidden_state
                return F.linear(h[:, -1], head).float()

            finite = bool(torch.isfinite(prefill()).all())
            t = bench(prefill, dev, 1 if tiny else 2, 3 if tiny else 5)
            t.update(
                tokens=n * length, tok_s=n * length / (t["median_ms"] * 1e-3), finite_logits=finite
            )
            res[name] = t
            log(f"  {name:22s} {t['median_ms']:9.2f} ms  {t['tok_s']:10.0f} tok/s  finite {finite}")
        except Exception as e:
            traceback.print_exc()
            res[name] = {"error": f"{type(e).__name__}: {e}"}
    if dev.type == "cuda":
        res["peak_allocated_GB"] = torch.cuda.max_memory_allocated() / 1e9
    return res


# ----------------------------------------------------------------------------- table
def table() -> str:
    ours, hf = RESULTS["tandem"], RESULTS["hf"]
    roof = RESULTS["roof"]
    rows = [
        "| measure | Tandem | HF | limit | Tandem/limit | Tandem/HF |",
        "|---|---|---|---|---|---|",
    ]
    rows.append(f"| copy bandwidth (read+write) | | | {roof['copy_GBps']:.0f} GB/s | | |")
    rows.append(
        f"| bf16 matmul {roof['matmul_n']}^3 | | | {roof['matmul_TFLOPs']:.0f} TFLOP/s | | |"
    )

    def cell(r: dict[str, Any] | None) -> str:
        if not r:
            return "not run"
        if "error" in r:
            return "error"
        return f"{r['median_ms']:.2f} ms ({r['tok_s']:.0f} tok/s)"

    for name, r in ours.items():
        if not isinstance(r, dict):
            continue
        h = hf.get(name) if isinstance(hf, dict) else None
        lim = r.get("limit_ms")
        lim_s = f"{lim:.2f} ms ({r['tokens'] / (lim * 1e-3):.0f} tok/s)" if lim else ""
        ok = "median_ms" in r
        ratio = f"{r['median_ms'] / lim:.2f}x" if ok and lim else ""
        vs = f"{r['median_ms'] / h['median_ms']:.2f}x" if ok and h and "median_ms" in h else ""
        rows.append(f"| {name} | {cell(r)} | {cell(h)} | {lim_s} | {ratio} | {vs} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny config, any device (logic check)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over decode b1")
    ap.add_argument("--moe-sweep", action="store_true", help="time fused_moe tile configs")
    ap.add_argument("--attention-sweep", action="store_true", help="time decode attention tiles")
    ap.add_argument("--skip-kernel-checks", action="store_true")
    ap.add_argument("--prefill-ab", action="store_true", help="prefill again with Triton MoE")
    ap.add_argument(
        "--decode-sweep", action="store_true", help="small-M GEMV and decode-MoE tile sweeps"
    )
    ap.add_argument(
        "--decode-ab",
        action="store_true",
        help="decode b1/b4 only, graph-replayed with each new decode path on/off",
    )
    ap.add_argument(
        "--decode-tiles-ab",
        action="store_true",
        help="decode MoE GEMVs at 4/2 warps and T<=1/4: checks, per layer, full step b1/b2/b4",
    )
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    RESULTS["env"] = {
        "torch": torch.__version__,
        "device": str(dev),
        "tiny": args.tiny,
        "python": sys.version.split()[0],
    }
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        RESULTS["env"].update(gpu=p.name, sms=p.multi_processor_count, mem_GB=p.total_memory / 1e9)
        try:
            import triton

            RESULTS["env"]["triton"] = triton.__version__
        except ImportError:
            pass
    log("env:", json.dumps(RESULTS["env"]))
    shapes = (
        {
            "decode_ctx_1": 40,
            "decode_batches": [4, 8],
            "decode_ctx_big": 48,
            "prefill_n": 2,
            "prefill_len": 32,
        }
        if args.tiny
        else {
            "decode_ctx_1": 512,
            "decode_batches": [64, 256],
            "decode_ctx_big": 768,
            "prefill_n": 16,
            "prefill_len": 512,
        }
    )
    RESULTS["shapes"] = shapes
    out_dir = Path(os.environ.get("OUT") or "/tmp")
    t_start = time.perf_counter()
    rooflines(dev, args.tiny)
    free(dev)
    try:
        if not args.skip_kernel_checks:
            kernel_checks(dev, args.tiny)
        if args.moe_sweep:
            moe_sweep(dev, args.tiny)
            free(dev)
        if args.attention_sweep:
            attention_sweep(dev, args.tiny)
            free(dev)
        if args.decode_sweep:
            gemv_sweep(dev, args.tiny)
            free(dev)
            moe_decode_sweep(dev, args.tiny)
            free(dev)
        if args.decode_tiles_ab:
            decode_tiles_check(dev, args.tiny)
            free(dev)
    except Exception as e:
        traceback.print_exc()
        FAILURES.append(f"kernel checks crashed: {type(e).__name__}: {e}")
    cfg_dict = hf_config_dict(args.tiny)
    cfg = ModelConfig.from_dict(cfg_dict)
    RESULTS["tandem"] = run_tandem(
        cfg,
        dev,
        dtype,
        shapes,
        args.tiny,
        args.profile,
        args.prefill_ab,
        args.decode_ab,
        args.decode_tiles_ab,
    )
    free(dev)
    log(f"[{time.perf_counter() - t_start:.0f} s elapsed]")
    if args.no_hf:
        RESULTS["notes"].append("HF baseline skipped (--no-hf)")
    else:
        try:
            RESULTS["hf"] = run_hf(cfg_dict, dev, dtype, shapes, args.tiny)
            free(dev)
        except Exception as e:
            traceback.print_exc()
            RESULTS["notes"].append(f"HF baseline failed: {type(e).__name__}: {e}")
            log(f"HF baseline failed: {type(e).__name__}: {e}")
    log(f"[{time.perf_counter() - t_start:.0f} s elapsed]")
    RESULTS["failures"] = FAILURES
    (out_dir / "gpu_bench.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    log("\n== summary (times are per step, median; ratios are time ratios, <1 = faster)")
    log(table())
    if RESULTS.get("decode_tiles_summary"):
        log("\n".join(RESULTS["decode_tiles_summary"]))
    for note in RESULTS["notes"]:
        log("note:", note)
    if FAILURES:
        log("FAILURES:\n  " + "\n  ".join(FAILURES))
        return 1
    log("all kernel checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
