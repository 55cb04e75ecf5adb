"""The ERNIE-4.5 language model: dense, MoE, and the VL model's multimodal MoE.

A decoder layer is pre-norm attention then pre-norm feed-forward. Layer types come from
the config: "dense" layers run one gated-SiLU MLP; "sparse" layers run the MoE block
(text experts, vision experts for the VL model, shared experts). Tokens of one step are
flat: T tokens from any number of sequences, positioned by `positions` and placed in the
paged KV cache by `AttentionMetadata`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.config import TextConfig
from engine.layers.attention import AttentionMetadata, KVCache, PagedAttention
from engine.layers.linear import Linear, MergedLinear
from engine.layers.mlp import GatedMLP
from engine.layers.moe import MoEBlock
from engine.layers.norm import RMSNorm
from engine.layers.rotary import TextRotary
from engine.layers.streams import join
from engine.parallel import current_tp, even_shard, kv_head_shard, padded_shard
from kernels.attention_block import attention_block, use_attention_block
from kernels.gemv import linear as small_m_linear
from kernels.gemv import norm_qkv_rope_linear, qkv_rope_linear
from kernels.rotary import rotary_embedding

LOGITS_FP32 = False
"""One rank's logits as float32 (a copy) instead of the LM head's dtype; read at trace time
(benchmarks compare the two)."""


class Attention(nn.Module):
    """Tensor parallel: this rank's query heads and the KV heads they read; `o_proj` is
    row-parallel and its partial sums are all-reduced here."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.tp = tp = current_tp()
        d = cfg.head_dim
        q_shard = even_shard(cfg.num_heads * d, tp, "attention heads", unit=d)
        num_kv, kv_shard = kv_head_shard(cfg.num_kv_heads, d, tp)
        self.num_heads, self.num_kv_heads, self.head_dim = q_shard.size // d, num_kv, d
        self.qkv_proj = MergedLinear(
            cfg.hidden_size, [], cfg.use_bias, shards=[q_shard, kv_shard, kv_shard]
        )
        self.o_proj = Linear(
            q_shard.full, cfg.hidden_size, cfg.use_bias, in_shard=q_shard, bias_here=tp.rank == 0
        )
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """rope = `TextRotary.step_table(positions)`."""
        # T tokens, H query heads, K kv heads, D head dim
        table, rows = rope
        kv_write = (*kv_cache, meta.slot_mapping)
        if type(self.qkv_proj) is MergedLinear:
            # project, rotate q and k, write k and v into the paged cache: one launch where
            # the decode GEMV runs, else the projection then one rotary launch
            qkv = qkv_rope_linear(
                x, self.qkv_proj.weight, self.qkv_proj.bias, self.num_heads, self.num_kv_heads,
                rope, kv_write,
            )  # fmt: skip
            return self._attend(qkv, kv_cache, meta)
        q, k, v = self._heads(self.qkv_proj(x))  # quantized projection
        rotary_embedding(q, k, rows, table, kv_write=(v, *kv_write))
        return self._attend((q, k, v), kv_cache, meta)

    def _attend(
        self,
        qkv: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # the rotated qkv `[T, (H + 2K) D]` (or its heads), k and v already in the cache ->
        # the attention's output projection
        q, k, v = self._heads(qkv) if isinstance(qkv, torch.Tensor) else qkv
        out = self.attn(q, k, v, kv_cache, meta, kv_written=True)  # [T, H, D]
        return self.tp.all_reduce(self.o_proj(out.flatten(1)))

    def norm_forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        norm: RMSNorm,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (attention output, residual stream): the layer's input norm (with
        the residual add) and `forward`. At one decode token on a GPU, one launch
        (`kernels.attention_block`); residual None at the first layer."""
        qkv, o = self.qkv_proj, self.o_proj
        if (
            self.tp.size == 1
            and type(qkv) is MergedLinear
            and type(o) is Linear
            and use_attention_block(h, qkv.weight)
        ):
            return attention_block(
                h, residual, norm.weight, norm.eps, (qkv.weight, qkv.bias), (o.weight, o.bias),
                self.num_heads, self.num_kv_heads, rope, kv_cache,
                (meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.query_start_loc),
                self.attn.scale,
            )  # fmt: skip
        if type(qkv) is MergedLinear:  # the norm inside the qkv launch where it runs
            fused, residual = norm_qkv_rope_linear(
                h, residual, norm.weight, norm.eps, qkv.weight, qkv.bias, self.num_heads,
                self.num_kv_heads, rope, (*kv_cache, meta.slot_mapping),
            )  # fmt: skip
            return self._attend(fused, kv_cache, meta), residual
        if residual is None:
            x, residual = norm(h), h
        else:
            x, residual = norm.add_forward(h, residual)
        return self(x, rope, kv_cache, meta), residual

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv `[T, (H + 2K) D]` -> views q `[T, H, D]`, k and v `[T, K, D]`."""
        q, k, v = qkv.split(self.qkv_proj.out_sizes, dim=-1)
        d = self.head_dim
        return (
            q.view(-1, self.num_heads, d),
            k.view(-1, self.num_kv_heads, d),
            v.view(-1, self.num_kv_heads, d),
        )


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_type: str) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp: GatedMLP | MoEBlock
        if layer_type == "sparse":
            vision = (
                (cfg.num_vision_experts, cfg.vision_moe_intermediate_size)
                if cfg.num_vision_experts
                else None
            )
            self.mlp = MoEBlock(
                cfg.hidden_size,
                cfg.moe_k,
                cfg.moe_norm_min,
                text=(cfg.num_experts, cfg.moe_intermediate_size),
                vision=vision,
                shared_intermediate=cfg.moe_intermediate_size * cfg.num_shared_experts,
                bias=cfg.use_bias,
            )
        else:
            self.mlp = GatedMLP(
                cfg.hidden_size, cfg.intermediate_size, cfg.use_bias, all_reduce=True
            )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache,
        meta: AttentionMetadata,
        vision_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (this layer's MLP output, the residual stream before it).

        The stream is `residual + h`; the add is left to the next norm, which fuses it
        (the same bf16 roundings as adding first: see kernels.rms_norm). At decode on a GPU
        the residual a MoE layer returns may still be in the making on the side stream (the
        shared experts' deferred down projection adds into it): joined here, before use."""
        if h.is_cuda:
            join(h.device)
        h, residual = self.self_attn.norm_forward(
            h, residual, self.input_layernorm, rope, kv_cache, meta
        )
        if isinstance(self.mlp, MoEBlock):  # at decode the norm rides in the router launch
            return self.mlp.add_norm_forward(
                h, residual, self.post_attention_layernorm, vision_mask
            )
        x, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(x), residual


class Ernie45Model(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, t) for t in cfg.mlp_layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = TextRotary(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """input_ids `[T]`, positions `[T]` or `[3, T]` -> hidden `[T, D]`.

        `after_layer(i)` runs once layer i has written its KV (prefill streams it out).
        """
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        rope = self.rotary.step_table(positions)
        residual: torch.Tensor | None = None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            h, residual = layer(h, residual, rope, kv_cache, meta, vision_mask)
            if after_layer is not None:
                if h.is_cuda:
                    # the side stream may still read this layer's freed tensors, whose
                    # blocks main-stream allocations in the callback could take
                    join(h.device)
                after_layer(i)
        if h.is_cuda:
            join(h.device)  # side-stream work (the shared experts) ends with the step
        if residual is None:  # no layers
            return self.norm(h)
        return self.norm.add_forward(h, residual)[0]


class Ernie45ForCausalLM(nn.Module):
    """ERNIE-4.5 text model (also the language half of ERNIE-4.5-VL).

    Tensor parallel: the LM head is split over the vocabulary (padded to a multiple of
    the ranks) and the logits all-gathered; a tied head reads its rows of the (replicated)
    embedding."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tp = current_tp()
        self.model = Ernie45Model(cfg)
        self.vocab_shard = padded_shard(cfg.vocab_size, tp) if tp.size > 1 else None
        self.lm_head = Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, out_shard=self.vocab_shard
        )
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head (again after `to_empty`, which unties)."""
        if self.config.tie_word_embeddings:
            if self.vocab_shard is None:
                self.lm_head.weight = self.model.embed_tokens.weight
            else:  # the head reads its slice of the embedding in compute_logits
                self.lm_head.weight = None  # type: ignore[assignment]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        return self.model(
            input_ids, positions, kv_caches, meta, inputs_embeds, vision_mask, after_layer
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden `[N, D]` -> logits `[N, V]`, in the LM head's dtype on one rank (the sampler
        upcasts what it changes; a float32 copy of a 28B step's logits cost 78 us at batch
        256 and 4 us at batch 1 on an H200) and in float32 where ranks gather them."""
        shard = self.vocab_shard
        if shard is None:
            logits = self.lm_head(hidden)
            return logits.float() if LOGITS_FP32 else logits
        if self.lm_head.weight is None:  # tied: this rank's rows of the embedding
            w = self.model.embed_tokens.weight
            local = w.narrow(0, shard.start, min(shard.size, shard.full - shard.start))
            part = small_m_linear(hidden, local)  # F.linear but for few rows on a GPU
            if part.shape[-1] < shard.size:  # the padded tail of the last rank
                part = torch.nn.functional.pad(part, (0, shard.size - part.shape[-1]))
        else:
            part = self.lm_head(hidden)
        return self.tp.all_gather(part.float(), dim=-1)[:, : shard.full]
