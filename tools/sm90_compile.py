"""Compile Tandem's Triton kernels for the H100 / H200 (sm_90a) on a machine without a GPU.

The CPU interpreter runs a kernel's arithmetic but never compiles it: a dot shape the
hardware refuses, a PDL intrinsic, a layout conversion that fails in the backend, or
registers spilling at the real tile sizes show only on a card. This tool calls each
kernel's launcher with CPU tensors at the 28B-A3B shapes (and, case ``model``, runs the
engine's decode and prefill steps on a two-layer 28B model), records the launches instead of
running them (``JITFunction.run`` is swapped for a recorder: nothing executes, outputs stay
uninitialised), then compiles every recorded launch for sm_90a with triton's own backend
and its bundled ptxas, as the card's Triton would (Triton 3.6 on the device, the version
pinned here).

    python3 tools/sm90_compile.py                      # every case, PDL on
    python3 tools/sm90_compile.py batch_router moe_batch --no-pdl

Prints one line per compiled launch: registers, spills, shared memory, and counts of the
PTX instructions that say the kernel does what it should (``mma``/``wgmma`` for tensor-core
dots, ``griddepcontrol`` for PDL). Exit status 1 if a launch fails to compile. Must run
without ``TRITON_INTERPRET=1`` (the kernels must be JIT functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

# 28B-A3B text shapes (transformers' Ernie4_5_VLMoeConfig defaults)
HIDDEN, EXPERTS, TOP_K, INTER = 2560, 64, 6, 1536
HEADS, KV_HEADS, HEAD_DIM = 20, 4, 128


@dataclass
class Launch:
    fn: Any  # triton.runtime.jit.JITFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grid: Any
    case: str = ""


@dataclass
class Compiled:
    launch: Launch
    regs: int = -1
    spills: int = -1
    shared: int = -1
    counts: dict[str, int] = field(default_factory=dict)
    error: str = ""


PTX_MARKS = ("mma.sync", "wgmma.mma_async", "griddepcontrol", "atom.", "cp.async")


@contextlib.contextmanager
def recording(into: list[Launch], case: str) -> Iterator[None]:
    """Launches inside are recorded, not run. A launch's integer tensors are zeroed once it
    is recorded: what a kernel would have written there (expert ids, sorted rows) is then
    a valid index for the torch code that reads it next, where garbage would crash."""
    from triton.runtime.jit import JITFunction

    real = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):  # type: ignore[no-untyped-def]
        into.append(Launch(self, args, dict(kwargs), grid, case))
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and not a.is_floating_point():
                a.zero_()

    JITFunction.run = record  # type: ignore[method-assign]
    try:
        yield
    finally:
        JITFunction.run = real  # type: ignore[method-assign]


def _bf16(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, dtype=torch.bfloat16)


def _case_batch_router() -> None:
    from kernels.triton_impl import moe_routing as mr

    w, bias = torch.empty(EXPERTS, HIDDEN), torch.empty(EXPERTS)
    for t in (16, 64, 256, 512):
        mr.batch_gate_route_triton(_bf16(t, HIDDEN), w, TOP_K, bias, 1e-12)


def _case_router_decode() -> None:
    from kernels.triton_impl import moe_routing as mr

    w, bias, nw = torch.empty(EXPERTS, HIDDEN), torch.empty(EXPERTS), _bf16(HIDDEN)
    for t in (1, 4):
        mr.gate_route_triton(_bf16(t, HIDDEN), w, TOP_K, bias, 1e-12)
        mr.norm_gate_route_triton(_bf16(t, HIDDEN), _bf16(t, HIDDEN), nw, 1e-5, w, TOP_K, bias,
                                  1e-12)  # fmt: skip
    mr.route_triton(torch.empty(64, EXPERTS), TOP_K, bias, 1e-12)


def _case_moe_batch() -> None:
    from kernels.triton_impl import moe as moe_impl

    w13, w2 = _bf16(EXPERTS, 2 * INTER, HIDDEN), _bf16(EXPERTS, HIDDEN, INTER)
    for t in (64, 256):
        ids = torch.randint(0, EXPERTS, (t, TOP_K), dtype=torch.int32)
        weights = torch.empty(t, TOP_K)
        moe_impl.fused_moe_triton(_bf16(t, HIDDEN), w13, w2, weights, ids, add=_bf16(t, HIDDEN))


def _case_moe_decode() -> None:
    from kernels.triton_impl.gemv import fused_moe_decode

    w13, w2 = _bf16(EXPERTS, 2 * INTER, HIDDEN), _bf16(EXPERTS, HIDDEN, INTER)
    shared = (_bf16(4 * INTER, HIDDEN), _bf16(HIDDEN, 2 * INTER))
    for t in (1, 4):
        ids = torch.randint(0, EXPERTS, (t, TOP_K), dtype=torch.int32)
        fused_moe_decode(_bf16(t, HIDDEN), w13, w2, torch.empty(t, TOP_K), ids, shared=shared)


def _case_norm() -> None:
    from kernels.triton_impl.rms_norm import rms_norm_triton

    for t in (1, 64, 256):
        rms_norm_triton(_bf16(t, HIDDEN), _bf16(HIDDEN), 1e-5, _bf16(t, HIDDEN))


def _case_attention_decode() -> None:
    from kernels.triton_impl.attention_decode import paged_attention_decode

    block, ctx = 64, 768
    for b in (1, 64, 256):
        per = -(-ctx // block)
        cache = _bf16(b * per + 1, block, KV_HEADS, HEAD_DIM)
        tables = torch.arange(b * per, dtype=torch.int32).view(b, per)
        lens = torch.full((b,), ctx, dtype=torch.int32)
        starts = torch.arange(b + 1, dtype=torch.int32)
        paged_attention_decode(_bf16(b, HEADS, HEAD_DIM), cache, cache, tables, lens, starts,
                               HEAD_DIM**-0.5)  # fmt: skip


def _case_model() -> None:
    """Every launch the engine makes for decode steps at b1 / b4 / b64 / b256 (768-token
    context) and a 2 x 512 prefill, through the model code, on a 28B text model cut to two
    layers (a dense one and a MoE one) whose weights are allocated and never written. The
    Triton path is taken on CPU tensors (``use_triton`` says yes); the shared experts run
    inline (the side stream needs CUDA; its kernels are the ones in the launches here)."""
    import dataclasses

    import engine.layers.moe as moe_layer
    import kernels._dispatch as dispatch
    from bench.gpu_bench import BLOCK, hf_config_dict, seqs_decode, seqs_prefill
    from engine.config import ModelConfig
    from engine.model_runner import ModelRunner
    from engine.models import _init_buffers, build_model

    d = hf_config_dict(False)
    d["text_config"].update(num_hidden_layers=2, mlp_layer_types=["dense", "sparse"])
    cfg = dataclasses.replace(ModelConfig.from_dict(d), vision=None)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = build_model(cfg)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device="cpu")
    _init_buffers(model, cfg)
    real = dispatch.use_triton
    users = [m for m in list(sys.modules.values()) if getattr(m, "use_triton", None) is real]
    side = moe_layer.SHARED_SIDE_MAX_TOKENS
    for mod in users:
        mod.use_triton = lambda x, impl: impl != "torch"  # type: ignore[attr-defined]
    moe_layer.SHARED_SIDE_MAX_TOKENS = 0
    try:
        ctx = 768
        per = -(-ctx // BLOCK)
        runner = ModelRunner(model, cfg, per * 256 + 1, BLOCK, torch.bfloat16,
                             torch.device("cpu"), cuda_graphs=False)  # fmt: skip
        vocab, is3d = cfg.text.vocab_size, cfg.text.mrope_section is not None
        with torch.no_grad():
            for b in (1, 4, 64, 256):
                runner.run(seqs_decode(b, ctx, vocab, per, is3d))
            runner.run(seqs_prefill(2, 512, vocab, per, is3d))
    finally:
        for mod in users:
            mod.use_triton = real  # type: ignore[attr-defined]
        moe_layer.SHARED_SIDE_MAX_TOKENS = side


CASES: dict[str, Callable[[], None]] = {
    "batch_router": _case_batch_router,
    "router_decode": _case_router_decode,
    "moe_batch": _case_moe_batch,
    "moe_decode": _case_moe_decode,
    "norm": _case_norm,
    "attention_decode": _case_attention_decode,
    "model": _case_model,
}


def record_cases(names: list[str], pdl: bool, sms: int = 132) -> list[Launch]:
    """Run the cases' launchers with launches recorded, tiles and grids chosen as for a card
    of ``sms`` SMs (an H100 / H200: 132); ``pdl``: as on a Hopper card (``use_pdl`` true, and
    the switches that are off until measured on: ``BATCH_PDL``), else as without PDL."""
    import kernels._dispatch as dispatch
    import kernels.triton_impl.attention_decode
    import kernels.triton_impl.gemv
    import kernels.triton_impl.moe as moe_impl
    import kernels.triton_impl.moe_routing
    import kernels.triton_impl.rms_norm  # noqa: F401

    real = dispatch.use_pdl
    users = [m for m in list(sys.modules.values()) if getattr(m, "use_pdl", None) is real]
    batch_pdl, cpu_sms = moe_impl.BATCH_PDL, dispatch.CPU_SMS
    launches: list[Launch] = []
    for mod in users:  # kernels._dispatch and every module that imported use_pdl by name
        mod.use_pdl = lambda x: pdl  # type: ignore[attr-defined]
    moe_impl.BATCH_PDL, dispatch.CPU_SMS = pdl, sms
    try:
        for name in names:
            with recording(launches, name):
                CASES[name]()
    finally:
        for mod in users:
            mod.use_pdl = real  # type: ignore[attr-defined]
        moe_impl.BATCH_PDL, dispatch.CPU_SMS = batch_pdl, cpu_sms
    return launches


def compile_launch(launch: Launch) -> Compiled:
    """Compile one recorded launch for sm_90a; ptxas reports registers and spills."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    out = Compiled(launch)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    fn, kwargs = launch.fn, dict(launch.kwargs)
    kwargs.pop("launch_pdl", None)  # a launch attribute, not a compile option
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
        kernel = compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                         options=options.__dict__)  # fmt: skip
    except Exception as exc:
        out.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        return out
    ptx = kernel.asm["ptx"]
    out.shared = int(kernel.metadata.shared)
    out.counts = {m: ptx.count(m) for m in PTX_MARKS}
    out.regs, out.spills = _ptxas_usage(ptx)
    return out


def _ptxas_usage(ptx: str) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        res = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=False,
        )
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return (int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else -1)


def _constexpr_summary(launch: Launch) -> str:
    keep = ("BLOCK", "E_PER", "SPLITS", "PDL", "K", "GATED", "NUM")
    items = [
        f"{k}={v}"
        for k, v in launch.kwargs.items()
        if any(k.startswith(p) for p in keep) and not isinstance(v, torch.Tensor)
    ]
    return " ".join(items)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", help=f"of: {', '.join(CASES)} (default: all)")
    ap.add_argument("--no-pdl", action="store_true", help="compile as launched without PDL")
    ap.add_argument("--sms", type=int, default=132, help="the card's SMs (tiles and grids)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        ap.error("run without TRITON_INTERPRET=1: interpreted kernels are not compiled")
    names = args.cases or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    launches = record_cases(names, pdl=not args.no_pdl, sms=args.sms)
    failed = 0
    seen: set[tuple[str, str, str]] = set()  # per case: triton caches repeats
    for launch in launches:
        key = (launch.case, launch.fn.__name__, _constexpr_summary(launch) + repr(launch.grid))
        if key in seen:
            continue
        seen.add(key)
        res = compile_launch(launch)
        head = f"{launch.case:17s} {launch.fn.__name__:28s} grid={launch.grid}"
        if res.error:
            failed += 1
            print(f"FAIL {head}: {res.error}")
            continue
        marks = " ".join(f"{m.rstrip('.')}={n}" for m, n in res.counts.items() if n)
        print(f"ok   {head} regs={res.regs} spills={res.spills} smem={res.shared} {marks}")
        print(f"       {_constexpr_summary(launch)}")
    print(f"{len(seen)} launches compiled for sm_90a, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
