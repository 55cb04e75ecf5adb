"""Small-M linear for decode: ``F.linear`` as a Triton weight-stream GEMV for 1-4 rows.

``linear(x, w, b)`` is what ``engine.layers.linear`` calls. On CUDA with at most
``GEMV_MAX_M`` rows (and ``GEMV_ENABLED``) it runs ``kernels.triton_impl.gemv``; otherwise, and
always on CPU, ``F.linear``. The switch is read when a step is traced, so a CUDA graph keeps the
path it was captured with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import Impl, use_triton

# On an H100 the GEMV beats cuBLAS at M=1 on every 28B decode shape (5-22%) but loses at
# M=4 (fp32 FMAs, x re-read per row tile), so only single-row steps take it (bench/RESULTS.md).
GEMV_ENABLED = True
GEMV_MAX_M = 1
QKV_ROPE_FUSED = True
"""``qkv_rope_linear`` runs the projection, rotary and cache write in one launch where the GEMV
runs (read at trace time, like the switches above; benchmarks flip it between captures)."""
QKV_NORM_FUSED = True
"""``norm_qkv_rope_linear`` computes the layer's input norm inside the qkv launch (each
program reduces the row's sum of squares itself, as the fused norm + router launch does)
instead of a norm launch before it; read at trace time."""
NORM_LINEAR_FUSED = True
"""``norm_linear`` computes the norm inside the GEMV launch (as ``QKV_NORM_FUSED`` does for
the qkv launch): the shared experts' gate_up on the side stream; read at trace time."""
GATED_FUSED = True
"""``gated_linear`` computes ``silu(gate) * up`` inside the GEMV (one launch fewer in each
gated MLP: the dense layer's and the shared experts'; bit-identical)."""


def _norm_fusable(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    impl: Impl,
) -> bool:
    """Whether a GEMV launch over h can compute ``rms_norm(h (+ residual))`` itself: the GEMV
    runs, the norm's operands are laid out for it, and the GEMV's tiles have the norm launch's
    warp count (the row's sum of squares is then reduced in the same order: else the norm
    runs as its own launch, so the roundings never change)."""
    if not (
        use_gemv(h, weight, impl)
        and norm_weight.shape == (h.shape[1],)
        and norm_weight.is_contiguous()
        and (residual is None or (residual.shape == h.shape and residual.stride(1) == 1))
    ):
        return False
    from kernels.triton_impl.gemv import gemv_tiles
    from kernels.triton_impl.rms_norm import NUM_WARPS

    return gemv_tiles(h.shape[0], weight.shape[0], weight.shape[1]).num_warps == NUM_WARPS


def use_gemv(x: torch.Tensor, weight: torch.Tensor, impl: Impl = None) -> bool:
    if impl is None and not GEMV_ENABLED:
        return False
    if x.dim() != 2 or not 1 <= x.shape[0] <= GEMV_MAX_M or x.dtype != weight.dtype:
        return False
    if x.stride(1) != 1 or weight.stride(1) != 1:
        return False
    return use_triton(x, impl)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, impl: Impl = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; x ``[M, K]``, weight ``[N, K]``, bias ``[N]``."""
    if not use_gemv(x, weight, impl):
        return F.linear(x, weight, bias)
    from kernels.triton_impl.gemv import gemv_triton

    return gemv_triton(x, weight, bias)


def norm_linear(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    impl: Impl = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x, residual_out = kernels.rms_norm(h, norm_weight, eps, residual)`` then
    ``linear(x, weight)``: returns (the projection, residual_out = h + residual, or h without
    a residual). One launch where the GEMV runs (``NORM_LINEAR_FUSED``), with the norm's
    roundings: bit-identical to the two launches."""
    from kernels.rms_norm import rms_norm

    if (NORM_LINEAR_FUSED or impl is not None) and _norm_fusable(
        h, residual, norm_weight, weight, impl
    ):
        from kernels.triton_impl.gemv import gemv_triton

        res_out = h if residual is None else torch.empty_like(h)  # [M, K]
        return gemv_triton(h, weight, norm=(residual, norm_weight, eps, res_out)), res_out
    x, res_out = rms_norm(h, norm_weight, eps, residual, impl=impl)
    return linear(x, weight, impl=impl), res_out


def gated_linear(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    impl: Impl = None,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(silu_and_mul(gate_up), weight, bias)``; gate_up ``[M, 2K]`` = [gate | up],
    weight ``[N, K]``. Where the GEMV runs (and ``GATED_FUSED`` or an explicit ``impl``), one
    launch with the same values: the product is rounded as ``silu_and_mul`` rounds it.

    ``add`` ``[M, N]``: returns ``add + F.linear(...)`` rounded once, as ``torch.addmm`` does
    (the GEMV adds it to its fp32 sums; elsewhere ``torch.addmm``, whose fp32 sum order is
    the BLAS's own, so the two agree to bf16 rounding, not bit for bit)."""
    from kernels.activation import silu_and_mul

    if add is not None:
        assert add.shape == (gate_up.shape[0], weight.shape[0]), (add.shape, weight.shape)
        assert add.dtype == gate_up.dtype, (add.dtype, gate_up.dtype)
    if (
        (GATED_FUSED or impl is not None)
        and use_gemv(gate_up, weight, impl)
        and (add is None or add.stride(1) == 1)
    ):
        from kernels.triton_impl.gemv import gemv_triton

        return gemv_triton(gate_up, weight, bias, gated=True, add=add)
    act = silu_and_mul(gate_up, impl=impl)
    if add is None:
        return linear(act, weight, bias, impl)
    if bias is not None:
        add = add + bias
    return torch.addmm(add, act, weight.t())


def qkv_rope_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    num_kv_heads: int,
    rope: tuple[torch.Tensor, torch.Tensor],
    kv_write: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    impl: Impl = None,
    norm: tuple[torch.Tensor | None, torch.Tensor, float, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The attention's qkv projection, rotary embedding and KV-cache write in one launch.

    x ``[M, K]``; weight ``[(Hq + 2 Hkv) D, K]`` stacked q, k, v; rope = (table ``[T, D]`` fp32
    cos | sin, rows ``[M]`` int64) as ``TextRotary.step_table`` builds them; kv_write =
    (k_cache, v_cache, slot_mapping ``[M]``). Returns qkv ``[M, (Hq + 2 Hkv) D]`` with q and k
    rotated; the rotated k and v are in the cache. Same values as ``linear`` followed by
    ``kernels.rotary_embedding(q, k, rows, table, kv_write=...)``, which is also the path
    taken where the GEMV is not (CPU, more than ``GEMV_MAX_M`` rows).

    ``norm``: only from ``norm_qkv_rope_linear``, which checks that the fused launch runs."""
    # M rows, D head dim
    table, rows = rope
    k_cache, v_cache, slots = kv_write
    d = table.shape[1]
    assert weight.shape[0] == (num_heads + 2 * num_kv_heads) * d, (weight.shape, d)
    assert rows.shape == (x.shape[0],) and rows.dtype == torch.int64, (rows.shape, rows.dtype)
    assert table.dtype == torch.float32 and table.is_contiguous(), table.dtype
    fused = QKV_ROPE_FUSED or impl is not None
    if (
        fused
        and use_gemv(x, weight, impl)
        and d % 4 == 0
        and (bias is None or bias.is_contiguous())
    ):
        from kernels.triton_impl.gemv import qkv_rope_triton

        assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_kv_heads, d), k_cache.shape
        assert v_cache.shape == k_cache.shape and k_cache.dtype == v_cache.dtype == x.dtype
        assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
        assert slots.shape == rows.shape and slots.dtype == torch.int64, slots.dtype
        return qkv_rope_triton(
            x, weight, bias, num_heads, num_kv_heads, table, rows, k_cache, v_cache, slots,
            norm=norm,
        )  # fmt: skip
    assert norm is None, "the norm rides only in the fused launch"
    from kernels.rotary import rotary_embedding

    qkv = linear(x, weight, bias, impl)
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q = q.view(-1, num_heads, d)  # views: rotated in place inside qkv
    k = k.view(-1, num_kv_heads, d)
    v = v.view(-1, num_kv_heads, d)
    rotary_embedding(q, k, rows, table, impl=impl, kv_write=(v, k_cache, v_cache, slots))
    return qkv


def norm_qkv_rope_linear(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    num_kv_heads: int,
    rope: tuple[torch.Tensor, torch.Tensor],
    kv_write: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    impl: Impl = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.rms_norm(h, norm_weight, eps, residual)`` then ``qkv_rope_linear`` on its
    output: returns (qkv, residual_out = h + residual, or h without a residual). One launch
    where the fused qkv launch runs (``QKV_NORM_FUSED``), with the norm's roundings."""
    from kernels.rms_norm import rms_norm

    fused = (QKV_NORM_FUSED or impl is not None) and (QKV_ROPE_FUSED or impl is not None)
    if (
        fused
        and rope[0].shape[1] % 4 == 0
        and (bias is None or bias.is_contiguous())
        and _norm_fusable(h, residual, norm_weight, weight, impl)
    ):
        res_out = h if residual is None else torch.empty_like(h)  # [M, K]
        qkv = qkv_rope_linear(
            h, weight, bias, num_heads, num_kv_heads, rope, kv_write, impl,
            norm=(residual, norm_weight, eps, res_out),
        )  # fmt: skip
        return qkv, res_out
    x, res_out = rms_norm(h, norm_weight, eps, residual, impl=impl)
    return qkv_rope_linear(x, weight, bias, num_heads, num_kv_heads, rope, kv_write, impl), res_out
