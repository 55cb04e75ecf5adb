"""Rotary position embedding as ERNIE-4.5 applies it: interleaved pairs, 1-D or 3-D positions.

ERNIE rotates pairs ``(x[2j], x[2j+1])`` by angle ``pos * inv_freq[j]`` (GPT-J style, not the
half-split NeoX style), with ``inv_freq[j] = rope_theta ** (-2j / D)``; see transformers'
``ernie4_5`` ``apply_rotary_pos_emb`` (it repeat-interleaves the first half of cos/sin).

The VL text model (``ernie4_5_vl_moe``) takes 3-D positions ``[3, T]`` ordered (t, h, w).
With ``mrope_section = [s_h, s_w, s_t]`` (default [22, 22, 20], s_h == s_w, summing to D/2),
pair j takes its position from
  * h when j < s_h + s_w and j is even,
  * w when j < s_h + s_w and j is odd,
  * t for the last s_t pairs,
and always its own frequency ``inv_freq[j]``. transformers reaches the same layout by permuting
inv_freq ("pre-rotating" hw) and re-interleaving; we index the frequency directly.
A text token has t == h == w, so it gets plain 1-D rotary.
"""

from __future__ import annotations

import torch

from kernels._dispatch import Impl, use_triton


def rope_inv_freq(head_dim: int, rope_theta: float) -> torch.Tensor:
    """``[D/2]`` fp32 inverse frequencies, computed exactly as transformers does."""
    return 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def mrope_pair_axes(head_dim: int, mrope_section: list[int] | tuple[int, ...]) -> torch.Tensor:
    """``[D/2]`` int64: which row of the ``[3, T]`` positions (0=t, 1=h, 2=w) each pair uses."""
    s_h, s_w, s_t = mrope_section
    assert s_h == s_w, f"ERNIE interleaves h and w pairs, so they need equal sections: {s_h}, {s_w}"
    assert s_h + s_w + s_t == head_dim // 2, (mrope_section, head_dim)
    j = torch.arange(head_dim // 2)
    return torch.where(j < s_h + s_w, 1 + j % 2, torch.zeros_like(j))


def build_cos_sin_cache(
    max_position: int, head_dim: int, rope_theta: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[P, D]`` fp32 table: row p holds ``cos(p * inv_freq)`` then ``sin(p * inv_freq)``."""
    inv_freq = rope_inv_freq(head_dim, rope_theta)  # [D/2]
    freqs = torch.arange(max_position, dtype=torch.float)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)  # [P, D]


def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    rope_theta: float,
    mrope_section: list[int] | tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(cos, sin)``, each ``[T, D/2]`` fp32, for positions ``[T]`` or ``[3, T]``."""
    inv_freq = rope_inv_freq(head_dim, rope_theta).to(positions.device)  # [D/2]
    pos = _positions_per_pair(positions, head_dim, mrope_section)  # [T, D/2]
    freqs = pos.float() * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def rope_table(
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    axis: torch.Tensor | None = None,
    impl: Impl = None,
) -> torch.Tensor:
    """``[T, D]`` fp32 ``cos | sin`` of each token's angles: pair j of token i turns by
    ``positions[axis[j], i] * inv_freq[j]`` (``[3, T]`` positions and ``axis [D/2]``) or
    ``positions[i] * inv_freq[j]`` (``[T]``). One launch on CUDA instead of six (cast,
    gather, product, cos, sin, concatenation); libdevice's cos and sin, which torch's CUDA
    kernels call too."""
    if use_triton(positions, impl):
        from kernels.triton_impl.rotary import rope_table_triton

        return rope_table_triton(positions, inv_freq, axis)
    return rope_table_ref(positions, inv_freq, axis)


def rope_table_ref(
    positions: torch.Tensor, inv_freq: torch.Tensor, axis: torch.Tensor | None = None
) -> torch.Tensor:
    if positions.dim() == 1:
        angles = positions[:, None].float() * inv_freq
    else:
        assert axis is not None, "3-D positions need each pair's axis"
        angles = positions.float()[axis].transpose(0, 1) * inv_freq
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _positions_per_pair(
    positions: torch.Tensor, head_dim: int, mrope_section: list[int] | tuple[int, ...] | None
) -> torch.Tensor:
    """``[T, D/2]``: the position each frequency pair of each token rotates by."""
    if positions.dim() == 1:
        return positions[:, None].expand(-1, head_dim // 2)
    assert positions.dim() == 2 and positions.shape[0] == 3, positions.shape
    assert mrope_section is not None, "3-D positions need mrope_section"
    axes = mrope_pair_axes(head_dim, mrope_section).to(positions.device)  # [D/2]
    return positions[axes].T  # [T, D/2]


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [T, H, D] in place by cos, sin [T, D/2]; fp32 math."""
    # Copies (to(copy=True)): for fp32 x, .float() would alias the halves we overwrite.
    x0 = x[..., 0::2].to(torch.float32, copy=True)  # [T, H, D/2]
    x1 = x[..., 1::2].to(torch.float32, copy=True)
    c, s = cos[:, None, :], sin[:, None, :]
    x[..., 0::2] = (x0 * c - x1 * s).to(x.dtype)
    x[..., 1::2] = (x1 * c + x0 * s).to(x.dtype)


def rotary_embedding_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    mrope_section: list[int] | tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`rotary_embedding` (in place)."""
    # T tokens, D head dim, P cached positions
    d = q.shape[-1]
    pos = _positions_per_pair(positions, d, mrope_section).long()  # [T, D/2]
    pair = torch.arange(d // 2, device=q.device)[None, :]
    cos = cos_sin_cache[pos, pair]  # [T, D/2]
    sin = cos_sin_cache[pos, pair + d // 2]
    _rotate_ref(q, cos, sin)
    _rotate_ref(k, cos, sin)
    return q, k


def rotary_embedding(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    mrope_section: list[int] | tuple[int, ...] | None = None,
    impl: Impl = None,
    kv_write: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` in place and return them.

    positions: ``[T]`` (text) or ``[3, T]`` (t, h, w; needs ``mrope_section``), integer.
    cos_sin_cache: ``[P, D]`` fp32 from :func:`build_cos_sin_cache`, P > max position.
    kv_write: ``(v, k_cache, v_cache, slot_mapping)``: also do :func:`kernels.write_kv` of the
    rotated k and v (one launch on GPU instead of two).
    """
    t, _, d = q.shape
    assert k.shape[0] == t and k.shape[2] == d and d % 2 == 0, (q.shape, k.shape)
    assert k.dtype == q.dtype, (q.dtype, k.dtype)
    assert positions.shape in ((t,), (3, t)), (positions.shape, t)
    assert not positions.is_floating_point(), positions.dtype
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == d, cos_sin_cache.shape
    assert cos_sin_cache.dtype == torch.float32, cos_sin_cache.dtype
    assert positions.dim() == 1 or mrope_section is not None, "3-D positions need mrope_section"
    if kv_write is not None:
        from kernels.kv_cache import _check, write_kv

        v, k_cache, v_cache, slots = kv_write
        _check(k, v, k_cache, v_cache, slots)
    if not use_triton(q, impl):
        rotary_embedding_ref(q, k, positions, cos_sin_cache, mrope_section)
        if kv_write is not None:
            write_kv(k, v, k_cache, v_cache, slots, impl="torch")
        return q, k
    from kernels.triton_impl.rotary import rotary_embedding_triton

    hw_pairs = 0
    if mrope_section is not None and positions.dim() == 2:
        hw_pairs = int((mrope_pair_axes(d, mrope_section) > 0).sum())  # leading h/w pairs
    rotary_embedding_triton(q, k, positions, cos_sin_cache, hw_pairs, kv_write)
    return q, k
