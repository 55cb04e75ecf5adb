"""Vision service benchmark: media preprocessing on CPU, and the vision tower on a GPU.

Preprocessing (default): JPEG images and mp4 videos through `MediaProcessor` with the
service's default options, inline (no pool) and in spawned process pools of 1 and N
workers, as the service runs it. Prints images/s and videos/s with the speedup over 1.

Encoder (`--gpu`): ERNIE-4.5-VL-28B's vision tower + resampler (transformers'
`Ernie4_5_VLMoeVisionConfig()` defaults: depth 32, hidden 1280, 16 heads, MLP 5120; the
resampler to the text width 2560) with random weights in bf16 on a 448x448 image (a 32x32
patch grid, 256 tokens). Tandem's `engine.models.vision_only` (loaded through the real
checkpoint path from a safetensors file written from HF's modules) beside transformers'
`Ernie4_5_VLMoeVisionTransformerPretrainedModel` + `...VariableResolutionResamplerModel`
with the same weights: outputs compared, then images/s, with the FLOPs per image and the
bf16 matmul peak measured in the same run as the limit.

    .venv/bin/python bench/vision_bench.py                              # CPU preprocessing
    .venv/bin/python bench/vision_bench.py --gpu --tiny --device cpu    # logic check on CPU
    PYTHONUNBUFFERED=1 python3 bench/vision_bench.py --gpu              # on a CUDA machine

Results go to `$OUT/vision_bench.json` when `$OUT` is set.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vision_svc.processing import MediaProcessor

RESULTS: dict[str, Any] = {}


def log(*a: Any, end: str = "\n") -> None:
    print(*a, end=end, flush=True)


# ----------------------------------------------------------------------------- preprocessing
def make_jpeg(w: int, h: int, seed: int) -> bytes:
    """A photo-like JPEG: smooth gradients plus noise (compresses like a real picture)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], axis=-1)
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_mp4(w: int, h: int, seconds: float, fps: int, seed: int) -> bytes:
    import av

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = np.roll(base, i * 4, axis=1)  # a panning scene
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _time_items(run: Any, processor: MediaProcessor, kind: str, items: list[bytes]) -> float:
    """Items per second of `run(fn, kind_list, items)`."""
    t0 = time.perf_counter()
    out = list(run(processor.process, [kind] * len(items), items))
    dt = time.perf_counter() - t0
    assert len(out) == len(items)
    return len(items) / dt


def preprocess_bench(args: argparse.Namespace) -> None:
    w, h = args.image_size
    log(f"== preprocessing: {args.images} JPEG {w}x{h}, {args.videos} mp4 ", end="")
    vw, vh = args.video_size
    log(f"{vw}x{vh} {args.video_seconds:g} s at {args.video_fps} fps (default options)")
    images = [make_jpeg(w, h, i) for i in range(args.images)]
    videos = [make_mp4(vw, vh, args.video_seconds, args.video_fps, i) for i in range(args.videos)]
    processor = MediaProcessor()
    sample_img, sample_vid = processor.process_image(images[0]), processor.process_video(videos[0])
    log(
        f"image grid {sample_img.grid_thw} ({sample_img.num_tokens} tokens); video grid "
        f"{sample_vid.grid_thw} ({sample_vid.num_tokens} tokens)"
    )
    rows: list[tuple[str, float, float]] = [
        (
            "inline (1 thread, no pool)",
            _time_items(map, processor, "image", images),
            _time_items(map, processor, "video", videos),
        )
    ]
    for n in args.workers:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(n, mp_context=ctx) as pool:
            list(pool.map(processor.process, ["image"] * n, images[:1] * n))  # start workers
            rows.append(
                (
                    f"pool, {n} worker(s)",
                    _time_items(pool.map, processor, "image", images),
                    _time_items(pool.map, processor, "video", videos),
                )
            )
    one = next((r for r in rows if r[0] == "pool, 1 worker(s)"), rows[0])
    log(f"\n| {'mode':28} | images/s | videos/s | vs 1 worker (img, vid) |")
    log(f"|{'-' * 30}|----------|----------|------------------------|")
    for name, ips, vps in rows:
        speedup = f"{ips / one[1]:.2f}x, {vps / one[2]:.2f}x"
        log(f"| {name:28} | {ips:8.1f} | {vps:8.2f} | {speedup:22} |")
    RESULTS["preprocess"] = {
        "cpus": os.cpu_count(),
        "image": {"size": [w, h], "grid": sample_img.grid_thw, "tokens": sample_img.num_tokens},
        "video": {
            "size": [vw, vh],
            "seconds": args.video_seconds,
            "fps": args.video_fps,
            "grid": sample_vid.grid_thw,
            "tokens": sample_vid.num_tokens,
        },
        "rows": [{"mode": n, "images_per_s": i, "videos_per_s": v} for n, i, v in rows],
    }


# ----------------------------------------------------------------------------- encoder
def encoder_flops(grid: tuple[int, int, int], depth: int, d: int, inter: int, text: int) -> dict:
    """Multiply-adds x 2 of one item through the tower and the resampler."""
    t, h, w = grid
    n = h * w  # patches per frame; attention stays within a frame
    patch = 2 * t * n * 588 * d
    layer = t * (2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * d * inter + 2 * 2 * n * n * d)
    s = 4 * d  # 2x2 merged width
    m1 = t * n // 4
    m2 = m1 if t == 1 else m1 // 2  # images pair a frame with itself
    resampler = 2 * 2 * m1 * s * s + 2 * m2 * 2 * s * s + 2 * m2 * s * s + 2 * m2 * s * text
    tower = patch + depth * layer
    return {"tower": tower, "resampler": resampler, "total": tower + resampler}


def matmul_peak_tflops(dev: Any, dtype: Any, tiny: bool) -> float:
    import torch

    from bench.gpu_bench import bench

    m = 256 if tiny else 8192
    a, b = (torch.randn(m, m, dtype=dtype, device=dev) for _ in range(2))
    out = torch.empty(m, m, dtype=dtype, device=dev)
    t = bench(lambda: torch.matmul(a, b, out=out), dev, 5, 5 if tiny else 30)
    return 2 * m**3 / (t["median_ms"] * 1e-3) / 1e12


def hf_modules(cfg: Any, dev: Any, dtype: Any) -> tuple[Any, Any]:
    import torch
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeVariableResolutionResamplerModel as Resampler,
    )
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeVisionTransformerPretrainedModel as Tower,
    )

    with torch.device(dev):
        tower = Tower._from_config(cfg.vision_config, dtype=dtype, attn_implementation="sdpa")
        resampler = Resampler(cfg).to(dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for name, p in [*tower.named_parameters(), *resampler.named_parameters()]:
            is_norm = "norm" in name or name.startswith("ln") or ".ln." in name
            if is_norm and name.endswith("weight"):
                p.fill_(1.0)
            else:  # N(0, 0.02) biases too, so a dropped bias would show in the check
                p.normal_(0.0, 0.02, generator=gen)
    return tower.eval(), resampler.eval()


def save_checkpoint(cfg: Any, tower: Any, resampler: Any, out: Path) -> None:
    """HF's modules as a transformers-layout checkpoint: config.json + vision tensors only."""
    from safetensors.torch import save_file

    cfg.to_json_file(str(out / "config.json"))
    tensors = {f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()}
    tensors |= {f"model.resampler_model.{k}": v for k, v in resampler.state_dict().items()}
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / "x.safetensors")
    )


def encoder_bench(args: argparse.Namespace) -> None:
    import torch
    from transformers import Ernie4_5_VLMoeConfig

    from bench.gpu_bench import bench, sync
    from engine.models.vision_only import load_vision_model

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.tiny:
        from engine.tiny import ensure_tiny_model

        raw = json.loads((ensure_tiny_model() / "config.json").read_text())
        cfg: Any = Ernie4_5_VLMoeConfig(**raw)
    else:
        cfg = Ernie4_5_VLMoeConfig()  # the 28B-A3B shapes
    v: Any = cfg.vision_config
    log(
        f"== encoder on {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'})"
        f", {args.dtype}: depth {v.depth}, hidden {v.hidden_size}, {v.num_heads} heads, "
        f"MLP {v.intermediate_size}, resampler -> {cfg.text_config.hidden_size}"
    )
    tower, resampler = hf_modules(cfg, dev, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(cfg, tower, resampler, Path(tmp))
        ours, _ = load_vision_model(tmp, dtype, dev)
    params = sum(p.numel() for p in ours.parameters())

    side = args.image_px
    processed = MediaProcessor().process_image(make_jpeg(side, side, 0))
    grid = processed.grid_thw
    flops = encoder_flops(
        grid, v.depth, v.hidden_size, v.intermediate_size, cfg.text_config.hidden_size
    )
    peak = matmul_peak_tflops(dev, dtype, args.tiny)
    log(
        f"{params / 1e6:.1f} M params; {side}x{side} -> grid {grid}, {processed.num_tokens} "
        f"tokens; {flops['total'] / 1e12:.3f} TFLOP/image (tower {flops['tower'] / 1e12:.3f}, "
        f"resampler {flops['resampler'] / 1e12:.3f}); {args.dtype} matmul peak {peak:.1f} TFLOP/s"
    )
    one = torch.from_numpy(processed.pixel_values).to(dev)
    small = MediaProcessor().process_image(make_jpeg(side * 3 // 4, side * 3 // 4, 1))
    two = torch.from_numpy(small.pixel_values).to(dev)
    rows, checks = [], {}
    cases: list[tuple[Any, list, Any]] = [(b, [grid] * b, one.repeat(b, 1)) for b in args.batch]
    # mixed sizes: alternating full and 3/4-side images, so the frames form 8 runs
    mix = [(grid, one) if i % 2 == 0 else (small.grid_thw, two) for i in range(8)]
    cases.append(("8 mixed", [g for g, _ in mix], torch.cat([p for _, p in mix])))
    import engine.models.ernie45_vision as ev

    for batch, grids, pixels in cases:
        grid_t = torch.tensor(grids, device=dev)

        def run_ours(pixels: torch.Tensor = pixels, grids: list = grids) -> torch.Tensor:
            return ours.encode_media(pixels, grids)

        def run_hf(pixels: torch.Tensor = pixels, grid_t: torch.Tensor = grid_t) -> torch.Tensor:
            feats = tower(pixels.to(dtype), grid_t).last_hidden_state
            return resampler(feats, grid_t)

        paths = ("varlen", "runs") if isinstance(batch, str) else ("varlen",)
        for path in paths:
            ev.ATTENTION_PATH = path
            key = f"{batch} [{path}]" if len(paths) > 1 else batch
            with torch.inference_mode():
                got, want = run_ours(), run_hf()
                err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                checks[key] = err
                t_ours = bench(run_ours, dev, 3, args.iters)["median_ms"]
                t_hf = bench(run_hf, dev, 3, args.iters)["median_ms"] if path == "varlen" else 0
            sync(dev)
            rows.append((key, t_ours, t_hf))
        ev.ATTENTION_PATH = "varlen"
        if args.profile and batch == max(args.batch) and dev.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    run_ours()
                torch.cuda.synchronize()
            log(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14))
    limit_ms = flops["total"] / (peak * 1e12) * 1e3
    log("\n| batch | Tandem img/s | HF img/s | limit img/s | Tandem/limit | Tandem/HF | rel err |")
    log("|---|---|---|---|---|---|---|")
    for batch, t_ours, t_hf in rows:
        n_img = int(str(batch).split()[0])
        ips, lps = n_img / t_ours * 1e3, 1e3 / limit_ms
        hps = n_img / t_hf * 1e3 if t_hf else float("nan")
        log(
            f"| {batch} | {ips:.1f} ({t_ours:.2f} ms) | {hps:.1f} ({t_hf:.2f} ms) | {lps:.1f} "
            f"| {ips / lps:.2f} | {ips / hps:.2f}x | {checks[batch]:.1e} |"
        )
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    bad = {b: e for b, e in checks.items() if not e < tol}
    RESULTS["encoder"] = {
        "device": str(dev),
        "dtype": args.dtype,
        "tiny": args.tiny,
        "params": params,
        "grid": grid,
        "tokens": processed.num_tokens,
        "flops_per_image": flops,
        "matmul_peak_TFLOPs": peak,
        "attn_hf": tower.config._attn_implementation,
        "rows": [
            {"batch": b, "tandem_ms": o, "hf_ms": h, "rel_err": checks[b]} for b, o, h in rows
        ],
        "torch": torch.__version__,
    }
    if bad:
        raise SystemExit(f"FAIL: Tandem vs HF relative error above {tol}: {bad}")
    log(f"check: Tandem == HF within {tol} (relative Frobenius error) at every batch")


# ----------------------------------------------------------------------------- main
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="encoder benchmark (else preprocessing)")
    p.add_argument("--tiny", action="store_true", help="encoder: tiny-ernie-vl shapes")
    p.add_argument("--device", default="cuda", help="encoder device (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--image-px", type=int, default=448, help="encoder image side (448)")
    p.add_argument("--batch", type=_ints, default=[1, 8], help="encoder images per forward")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="encoder: kernel table at max batch")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--image-size", type=_size, default=(1280, 720))
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--video-size", type=_size, default=(640, 360))
    p.add_argument("--video-seconds", type=float, default=10.0)
    p.add_argument("--video-fps", type=int, default=24)
    p.add_argument("--workers", type=_ints, default=sorted({1, os.cpu_count() or 1}))
    args = p.parse_args()
    if args.gpu:
        encoder_bench(args)
    else:
        preprocess_bench(args)
    out = Path(os.environ.get("OUT", tempfile.gettempdir())) / "vision_bench.json"
    out.write_text(json.dumps(RESULTS, indent=2, default=str))
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
