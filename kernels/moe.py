"""Mixture-of-experts: ERNIE's router, the expert FFN sum, and the token sort for grouped GEMM.

Expert weights follow transformers' ``Ernie4_5_VLMoeMoeExperts``: ``w13 [E, 2I, D]`` stacks the
gate rows (``[:I]``) over the up rows (``[I:]``); ``w2 [E, D, I]`` is the down projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import Impl, use_triton
from kernels.rms_norm import rms_norm


def route(
    gate_logits: torch.Tensor,
    k: int,
    bias: torch.Tensor | None = None,
    norm_min: float = 1e-12,
    impl: Impl = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ERNIE-4.5 top-k routing; returns ``(topk_weights [T, k] fp32, topk_ids [T, k] int32)``.

    As ``Ernie4_5_VLMoeMoeTopKRouter``: probabilities are the fp32 softmax of the logits; the
    per-modality ``e_score_correction_bias`` is added only to *choose* the experts; the chosen
    experts' unbiased probabilities are renormalised by their sum, clamped below at
    ``norm_min`` (config ``moe_norm_min``). The Triton kernel does all of it in one launch.
    """
    if use_triton(gate_logits, impl):
        from kernels.triton_impl.moe_routing import route_triton

        return route_triton(gate_logits.float(), k, bias, norm_min)
    # T tokens, E experts
    probs = F.softmax(gate_logits.float(), dim=-1)  # [T, E]
    scores = probs if bias is None else probs + bias.float().reshape(-1)
    _, topk_ids = torch.topk(scores, k, dim=-1)  # [T, k]
    weights = torch.gather(probs, -1, topk_ids)
    weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=norm_min)
    return weights, topk_ids.to(torch.int32)


BATCH_ROUTER = False
"""Past the decode sizes, up to ``kernels.triton_impl.moe_routing.BATCH_ROUTE_MAX_TOKENS``
bf16 tokens: the router's fp32 logits and the routing in one Triton launch of bf16
tensor-core dots over exact three-piece splits of the fp32 weights
(``batch_gate_route_triton``), instead of the cast, cuBLAS's fp32 GEMM, its split-K
reduction and the routing launch. Off until measured on a card (decode_step_bench variant
``batch-router``); read at trace time."""


def gate_route(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    k: int,
    bias: torch.Tensor | None = None,
    norm_min: float = 1e-12,
    impl: Impl = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's logits (``x.float() @ gate_weight.float().T``, fp32 as ERNIE routes)
    then ``route``. At decode sizes the Triton kernel does both in one launch."""
    if _gate_route_in_one_launch(x, gate_weight, impl):
        from kernels.triton_impl.moe_routing import gate_route_triton

        return gate_route_triton(x, gate_weight.contiguous(), k, bias, norm_min)
    if BATCH_ROUTER and use_triton(x, impl):
        from kernels.triton_impl import moe_routing

        if moe_routing.batch_router_applies(x, gate_weight):
            return moe_routing.batch_gate_route_triton(
                x, gate_weight.contiguous(), k, bias, norm_min
            )
    logits = F.linear(x.float(), gate_weight.float())  # [T, E]
    return route(logits, k, bias, norm_min, impl=impl)


FUSED_NORM_ROUTE = True
"""`norm_gate_route` runs the RMSNorm inside the router's decode launch; False: the norm
launch then `gate_route` (same results). Benchmarks flip it between CUDA-graph captures."""


def norm_gate_route(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    gate_weight: torch.Tensor,
    k: int,
    bias: torch.Tensor | None = None,
    norm_min: float = 1e-12,
    impl: Impl = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x, residual_out = rms_norm(h, norm_weight, eps, residual)`` then
    ``gate_route(x, ...)``; returns ``(topk_weights, topk_ids, x, residual_out)``.

    Where ``gate_route`` takes one launch (decode sizes, GPU) the norm rides in it, with
    the same roundings as the norm kernel: one launch a MoE layer fewer.
    """
    # T tokens, D hidden
    assert h.dim() == 2 and norm_weight.shape == (h.shape[1],), (h.shape, norm_weight.shape)
    if residual is not None:
        assert residual.shape == h.shape and residual.dtype == h.dtype, (residual.shape, h.shape)
    if FUSED_NORM_ROUTE and _gate_route_in_one_launch(h, gate_weight, impl):
        from kernels.triton_impl.moe_routing import norm_gate_route_triton

        return norm_gate_route_triton(
            h, residual, norm_weight.contiguous(), eps, gate_weight.contiguous(), k, bias, norm_min
        )
    x, residual_out = rms_norm(h, norm_weight, eps, residual, impl=impl)  # [T, D] each
    return (*gate_route(x, gate_weight, k, bias, norm_min, impl=impl), x, residual_out)


def _gate_route_in_one_launch(x: torch.Tensor, gate_weight: torch.Tensor, impl: Impl) -> bool:
    """Decode sizes on the Triton path with an fp32 router: `gate_route_triton` applies."""
    if not (use_triton(x, impl) and x.shape[0] > 0 and gate_weight.dtype == torch.float32):
        return False
    from kernels.triton_impl.moe_routing import GATE_ROUTE_MAX_TOKENS

    return x.shape[0] <= GATE_ROUTE_MAX_TOKENS and x.stride(-1) == 1


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Torch reference of :func:`fused_moe`: loop over the experts present, fp32 accumulation.

    The expert matmuls run in x's dtype (as the HF model does); the weighted sum over each
    token's k experts is accumulated in fp32 and rounded once.
    """
    # T tokens, D hidden, I expert intermediate, k experts per token
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
    for e in torch.unique(topk_ids).tolist():
        token, slot = torch.where(topk_ids == e)  # [n_e] each
        gate, up = F.linear(x[token], w13[e]).chunk(2, dim=-1)  # [n_e, I] each
        y = F.linear(F.silu(gate) * up, w2[e])  # [n_e, D]
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(x.dtype)


def moe_align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert and pad each expert's run to a multiple of block_m.

    Returns, with ``n = T * k`` and ``P = n + E * (block_m - 1)`` rounded up to block_m (a
    bound fixed by shapes, so nothing syncs with the device and CUDA graphs can capture it):

    * ``sorted_ids [P]`` int32: flat indices ``t * k + j`` grouped by expert; padding = n.
    * ``expert_ids [P // block_m]`` int32: the expert of each block of block_m rows; -1 for
      blocks past the end.
    * ``num_tokens_post_padded [1]`` int32: rows actually used (a multiple of block_m).
    """
    # n flat (token, slot) pairs, E experts
    flat = topk_ids.reshape(-1).long()  # [n]
    n, device = flat.numel(), flat.device
    max_padded = -(-(n + num_experts * (block_m - 1)) // block_m) * block_m
    # scatter_add rather than bincount: bincount syncs to size its output on CUDA.
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)  # [E]
    order = torch.argsort(flat, stable=True)  # [n] flat indices, grouped by expert
    expert_of = flat[order]
    rank = torch.arange(n, device=device) - (counts.cumsum(0) - counts)[expert_of]
    sorted_ids = torch.full((max_padded,), n, dtype=torch.int32, device=device)
    sorted_ids[pad_end[expert_of] - padded[expert_of] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, max_padded, block_m, device=device)
    expert_ids = torch.searchsorted(pad_end, block_start, right=True)  # E past the end
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, pad_end[-1:].to(torch.int32)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    impl: Impl = None,
    add: torch.Tensor | None = None,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
    add_stream: torch.cuda.Stream | None = None,
    up_done: torch.cuda.Event | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(w13[e][:I] @ x[t]) * w13[e][I:] @ x[t])``
    with ``e = topk_ids[t, j]``.

    ``shared`` = (gate_up ``[2Is, D]``, down ``[D, Is]``): a gated MLP (ERNIE's shared
    experts) added like ``add``; at decode sizes on GPU it runs inside the MoE launches
    (`shares_decode_launches`), elsewhere it is computed first and becomes ``add``.

    x [T, D]; w13 [E, 2I, D]; w2 [E, D, I]; topk_weights [T, k] fp32; topk_ids [T, k] int32.
    Returns [T, D] in x's dtype; with ``add`` [T, D] (the shared experts' output) returns
    ``out + add``, rounded as the separate bf16 add would be (fused on GPU). ``add_stream``
    (GPU): ``add`` is still being computed on that stream; it is joined before ``add`` is read.
    ``up_done`` (GPU): recorded on the current stream once the experts' up projection is
    queued (at decode, between the two launches; elsewhere after the whole block).
    """
    t, d = x.shape
    e, two_i, d13 = w13.shape
    assert d13 == d and two_i % 2 == 0, (w13.shape, x.shape)
    assert w2.shape == (e, d, two_i // 2), (w2.shape, w13.shape)
    assert topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == t, topk_ids.shape
    assert topk_ids.dtype == torch.int32, topk_ids.dtype
    assert topk_weights.dtype == torch.float32, topk_weights.dtype
    assert w13.dtype == w2.dtype == x.dtype, (x.dtype, w13.dtype, w2.dtype)
    if add is not None:
        assert add.shape == x.shape and add.dtype == x.dtype, (add.shape, add.dtype)
    assert shared is None or add is None, "pass the shared experts or an add, not both"
    on_triton = use_triton(x, impl)
    if shared is not None and not (on_triton and shares_decode_launches(x)):
        add, shared = _gated_mlp(x, *shared, impl), None
    if add_stream is not None and not (on_triton and add is not None and add.is_contiguous()):
        # the reference's add and a strided add's copy read it here: join now, not later
        torch.cuda.current_stream(x.device).wait_stream(add_stream)
        add_stream = None
    if not on_triton:
        out = fused_moe_ref(x, w13, w2, topk_weights, topk_ids)
        if up_done is not None:
            up_done.record(torch.cuda.current_stream(x.device))
        return out if add is None else out + add
    from kernels.triton_impl.moe import fused_moe_triton

    return fused_moe_triton(
        x,
        w13,
        w2,
        topk_weights,
        topk_ids,
        add=add.contiguous() if add is not None else None,
        shared=shared,
        add_stream=add_stream,
        up_done=up_done,
    )


def shares_decode_launches(x: torch.Tensor) -> bool:
    """True when `fused_moe` on `x` takes the decode GEMV path, where shared experts ride in
    the same two launches (CUDA, Triton, at most `DECODE_MAX_TOKENS` tokens)."""
    if not use_triton(x, None):
        return False
    from kernels.triton_impl import moe as moe_impl

    return 0 < x.shape[0] <= moe_impl.DECODE_MAX_TOKENS


def _gated_mlp(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, impl: Impl
) -> torch.Tensor:
    from kernels.activation import silu_and_mul

    return F.linear(silu_and_mul(F.linear(x, gate_up), impl=impl), down)
