"""ERNIE-4.5 mixture of experts.

ERNIE routes with a softmax over the expert logits (in fp32), picks the top-k experts by
`softmax + e_score_correction_bias` (the bias only steers selection, it never scales the
output), and renormalises the chosen probabilities to sum to one. The VL model keeps two
isolated expert groups — text tokens only ever reach text experts and image/video tokens
only vision experts — plus shared experts that every token passes through.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.linear import Linear, MergedLinear, check_shape
from engine.layers.mlp import GatedMLP
from engine.layers.norm import RMSNorm
from engine.layers.streams import beside
from engine.parallel import Shard, current_tp, even_shard
from kernels._dispatch import use_triton
from kernels.gemv import gated_linear, norm_linear
from kernels.moe import fused_moe, gate_route, norm_gate_route, shares_decode_launches

SHARED_SIDE_STREAM = True
"""At decode on GPU, run the shared experts on a side stream beside the router and the routed
experts' up launch (`MoEBlock._shared_beside`); False: inside the routed launches. Read at
trace time; benchmarks flip it between CUDA-graph captures."""

SHARED_DOWN_DEFERRED = True
"""With the shared experts on the side stream (one rank): their down projection waits for the
routed up launch to be queued and then runs beside the routed down launch, adding its output
into the residual stream (`MoEBlock._shared_beside`), instead of running beside the up launch
and being added by the down launch. The up launch, which already saturates the copy rate with
the shared gate_up beside it, then streams 16 MB fewer, and the down launch (latency-bound at
~2.5 TB/s) gets company. The layer returns a residual that is pending on the side stream: the
next layer joins it (`engine.layers.streams.join`). Read at trace time, like the switch above."""


SHARED_SIDE_MAX_TOKENS = 64
"""Above the decode GEMV sizes and up to this many tokens, the shared experts also run on the
side stream, beside the router, the routed experts' sort and their grouped GEMMs; the
combine launch joins them and adds their output (`MoEBlock._partial`). 0: inline, before
the router. H200 step replay: b64 -0.03 to -0.22 ms, b256 +0.44 / +0.48 (so 64; joining
before the up GEMM instead changed nothing). Read at trace time."""


class Router(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, top_k: int, norm_min: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(num_experts, dtype=torch.float32), requires_grad=False
        )
        self.top_k = top_k
        self.norm_min = norm_min

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[T, D]` -> (weights `[T, k]` fp32, expert ids `[T, k]` int32)."""
        # fp32 logits as ERNIE routes, softmax, biased top-k, renormalise: at decode one
        # Triton launch on GPU (kernels.moe.gate_route), else cuBLAS + one routing launch
        return gate_route(x, self.weight, self.top_k, self.e_score_correction_bias, self.norm_min)

    def add_norm_forward(
        self, h: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route `x, residual_out = norm.add_forward(h, residual)`; returns (weights, ids, x,
        residual_out). At decode on GPU the norm rides in the router's one launch."""
        return norm_gate_route(
            h,
            residual,
            norm.weight,
            norm.eps,
            self.weight,
            self.top_k,
            self.e_score_correction_bias,
            self.norm_min,
        )


class Experts(nn.Module):
    """E gated-SiLU experts stored stacked: gate_up `[E, 2I, D]`, down `[E, D, I]`.

    Tensor parallel: every expert's intermediate dimension is split (`shard`: this rank's
    columns of I), so the output is a partial sum the MoE block all-reduces."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.shard: Shard = even_shard(intermediate_size, current_tp(), "expert intermediate size")
        inter = self.shard.size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, inter))

    def load_expert(self, name: str, tensor: torch.Tensor, expert: int, part: str) -> None:
        """Fill one expert from per-expert checkpoint tensors (`gate`, `up` or `down`)."""
        inter, full = self.down_proj.shape[-1], self.shard.full
        targets = {
            "gate": (self.gate_up_proj[expert, :inter], 0),
            "up": (self.gate_up_proj[expert, inter:], 0),
            "down": (self.down_proj[expert], 1),
        }
        target, dim = targets[part]
        expected = list(target.shape)
        expected[dim] = full
        check_shape(name, expected, tensor.shape)
        with torch.no_grad():
            target.copy_(self.shard.take(tensor, dim))

    def load_stacked(self, name: str, tensor: torch.Tensor, leaf: str) -> None:
        """Fill every expert from a stacked checkpoint tensor (`gate_up_proj` `[E, 2I, D]`
        or `down_proj` `[E, D, I]`)."""
        e, d, full = self.gate_up_proj.shape[0], self.gate_up_proj.shape[2], self.shard.full
        if leaf == "gate_up_proj":
            check_shape(name, (e, 2 * full, d), tensor.shape)
            gate, up = tensor.split(full, dim=1)
            tensor = torch.cat([self.shard.take(gate, 1), self.shard.take(up, 1)], dim=1)
            target = self.gate_up_proj
        else:
            check_shape(name, (e, d, full), tensor.shape)
            tensor, target = self.shard.take(tensor, 2), self.down_proj
        with torch.no_grad():
            target.copy_(tensor)

    def forward(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        add: torch.Tensor | None = None,
        shared: tuple[torch.Tensor, torch.Tensor] | None = None,
        add_stream: torch.cuda.Stream | None = None,
        up_done: torch.cuda.Event | None = None,
    ) -> torch.Tensor:
        return fused_moe(
            x, self.gate_up_proj, self.down_proj, weights, ids, add=add, shared=shared,
            add_stream=add_stream, up_done=up_done,
        )  # fmt: skip


class ExpertGroup(nn.Module):
    """Router + routed experts of one modality."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        top_k: int,
        norm_min: float,
    ) -> None:
        super().__init__()
        self.gate = Router(num_experts, hidden_size, top_k, norm_min)
        self.experts = Experts(num_experts, hidden_size, intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        add: torch.Tensor | None = None,
        shared: tuple[torch.Tensor, torch.Tensor] | None = None,
        add_stream: torch.cuda.Stream | None = None,
    ) -> torch.Tensor:
        """Routed experts' sum for x `[T, D]`, plus `add` `[T, D]` if given (fused on GPU;
        `add_stream`: the stream still computing it), or plus the gated MLP `shared` =
        (gate_up, down) inside the decode launches."""
        weights, ids = self.gate(x)
        w = weights.to(torch.float32)
        if shared is not None:
            return self.experts(x, w, ids, shared=shared)
        # only plain `Experts` take a stream (see MoEBlock._shared_beside_batch)
        stream_kw = {} if add_stream is None else {"add_stream": add_stream}
        return self.experts(x, w, ids, add, **stream_kw)

    def add_norm_forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        norm: RMSNorm,
        shared: tuple[torch.Tensor, torch.Tensor] | None = None,
        add: tuple[torch.Tensor, torch.cuda.Stream] | None = None,
        up_done: torch.cuda.Event | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward(x, shared=shared)` of `x, residual_out = norm.add_forward(h, residual)`,
        the norm fused into the router; returns (routed + shared sum, residual_out). `add` =
        (tensor, the stream computing it): added instead of `shared`, joined just before
        the experts' down launch reads it. `up_done`: see `kernels.moe.fused_moe`."""
        weights, ids, x, residual = self.gate.add_norm_forward(h, residual, norm)
        w = weights.to(torch.float32)
        if add is not None:
            out = self.experts(x, w, ids, add=add[0], add_stream=add[1], up_done=up_done)
            return out, residual
        return self.experts(x, w, ids, shared=shared, up_done=up_done), residual


class MoEBlock(nn.Module):
    """Text experts, optional vision experts, optional shared experts."""

    def __init__(
        self,
        hidden_size: int,
        top_k: int,
        norm_min: float,
        text: tuple[int, int],
        vision: tuple[int, int] | None,
        shared_intermediate: int,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.tp = current_tp()
        self.text_moe = ExpertGroup(text[0], hidden_size, text[1], top_k, norm_min)
        self.vision_moe = (
            ExpertGroup(vision[0], hidden_size, vision[1], top_k, norm_min) if vision else None
        )
        self.shared_experts = (
            GatedMLP(hidden_size, shared_intermediate, bias) if shared_intermediate else None
        )

    def forward(self, x: torch.Tensor, vision_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x `[T, D]`; vision_mask `[T]` bool marks image/video tokens (VL only).

        With no mask (decode: generated tokens are always text) nothing reads the device, so
        the step can be captured in a CUDA graph; a mask costs a host sync to split rows."""
        return self.tp.all_reduce(self._partial(x, vision_mask))  # ranks hold parts of I

    def add_norm_forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        norm: RMSNorm,
        vision_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block after its pre-norm: `x, residual_out = norm.add_forward(h, residual)`,
        returns (`self(x, vision_mask)`, residual_out). On the decode path the norm runs
        inside the router's launch (`kernels.moe.norm_gate_route`): one launch fewer."""
        if self._shared_rides_decode(h) and self._text_only(vision_mask):
            if SHARED_SIDE_STREAM and h.is_cuda:
                out, residual = self._shared_beside(h, residual, norm)
            else:
                out, residual = self.text_moe.add_norm_forward(
                    h, residual, norm, shared=self._shared_weights()
                )
            return self.tp.all_reduce(out), residual
        if residual is None:
            x, residual = norm(h), h
        else:
            x, residual = norm.add_forward(h, residual)
        return self(x, vision_mask), residual

    def _shared_beside(
        self, h: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode on GPU: the shared experts (with their own copy of the norm) run on a side
        stream while this stream routes and runs the routed experts' up launch; the down
        launch joins them and adds the shared output. The router's latency-bound launch then
        overlaps the shared experts' weight stream (CUDA graphs capture the fork and join).

        `SHARED_DOWN_DEFERRED` (one rank): the shared down projection waits for the up launch
        and runs beside the down launch, adding into the residual stream it returns, which
        is still being computed on the side stream (the next layer joins it)."""
        mlp = self.shared_experts
        assert mlp is not None
        defer = SHARED_DOWN_DEFERRED and self.tp.size == 1 and type(mlp.down_proj) is Linear
        with beside(h.device) as side:
            if not defer:
                x, res = (norm(h), h) if residual is None else norm.add_forward(h, residual)
                shared_out = mlp(x)
            else:  # the norm inside the gate_up launch where the GEMV runs
                w = mlp.gate_up_proj.weight
                gate_up, res = norm_linear(h, residual, norm.weight, norm.eps, w)
        if not defer:
            return self.text_moe.add_norm_forward(h, residual, norm, add=(shared_out, side))
        up_done = torch.cuda.Event()
        out, _ = self.text_moe.add_norm_forward(h, residual, norm, up_done=up_done)
        with beside(h.device, after=up_done):
            # the side stream's own copy of residual_out, so no main-stream tensor outlives
            # this call on the side stream; rounded once with the shared MLP's sum
            res = gated_linear(gate_up, mlp.down_proj.weight, mlp.down_proj.bias, add=res)
        return out, res

    def _partial(self, x: torch.Tensor, vision_mask: torch.Tensor | None) -> torch.Tensor:
        text_only = self._text_only(vision_mask)
        if text_only and self._shared_rides_decode(x):
            # decode on GPU: the shared experts' gated MLP runs inside the routed experts'
            # two launches (3 launches a layer fewer)
            return self.text_moe(x, shared=self._shared_weights())
        if text_only and self._shared_beside_batch(x):
            with beside(x.device) as side:
                shared = self.shared_experts(x)
            return self.text_moe(x, add=shared, add_stream=side)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        if text_only:
            return self.text_moe(x, add=shared)  # the shared sum rides in the combine kernel
        out = torch.empty_like(x)
        text_mask = ~vision_mask
        if bool(text_mask.any()):
            out[text_mask] = self.text_moe(x[text_mask])
        out[vision_mask] = self.vision_moe(x[vision_mask])
        return out if shared is None else out + shared

    def _shared_beside_batch(self, x: torch.Tensor) -> bool:
        """Decode batches past the GEMV sizes on GPU: the shared experts on the side stream
        (`SHARED_SIDE_MAX_TOKENS`)."""
        return (
            self.shared_experts is not None
            and use_triton(x, None)  # CUDA with Triton
            and SHARED_SIDE_STREAM
            and 0 < x.shape[0] <= SHARED_SIDE_MAX_TOKENS
            and type(self.text_moe.experts) is Experts
        )

    def _text_only(self, vision_mask: torch.Tensor | None) -> bool:
        return self.vision_moe is None or vision_mask is None or not bool(vision_mask.any())

    def _shared_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        mlp = self.shared_experts
        assert mlp is not None
        return mlp.gate_up_proj.weight, mlp.down_proj.weight

    def _shared_rides_decode(self, x: torch.Tensor) -> bool:
        mlp = self.shared_experts
        return (
            mlp is not None
            and type(mlp.gate_up_proj) is MergedLinear  # not quantized
            and type(mlp.down_proj) is Linear
            and mlp.gate_up_proj.bias is None
            and mlp.down_proj.bias is None
            and type(self.text_moe.experts) is Experts
            and shares_decode_launches(x)
        )
