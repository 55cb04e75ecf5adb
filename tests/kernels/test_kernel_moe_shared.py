"""`kernels.moe.fused_moe(shared=...)` through the Triton decode kernel (interpreter) equals
the routed sum plus the MoE block's shared MLP run on its own."""

from __future__ import annotations

import pytest
import torch

import kernels.moe as kmoe
from kernels._dispatch import interpreting, triton_available


@pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)
def test_fused_moe_with_shared_on_the_decode_kernel_equals_separate_mlp(
    monkeypatch, small_moe_block
) -> None:
    """`kernels.moe.fused_moe(shared=...)` through the Triton decode kernel (interpreter)."""
    monkeypatch.setattr(kmoe, "shares_decode_launches", lambda x: True)
    block = small_moe_block(7)
    x = torch.randn(2, 32)
    experts = block.text_moe.experts
    mlp = block.shared_experts
    with torch.no_grad():
        weights, ids = block.text_moe.gate(x)
        want = kmoe.fused_moe(x, experts.gate_up_proj, experts.down_proj, weights, ids) + mlp(x)
        got = kmoe.fused_moe(
            x,
            experts.gate_up_proj,
            experts.down_proj,
            weights,
            ids,
            impl="triton",
            shared=(mlp.gate_up_proj.weight, mlp.down_proj.weight),
        )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
