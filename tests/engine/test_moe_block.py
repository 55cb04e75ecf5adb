"""The MoE block's decode path that hands the shared experts to the routed experts' launches
passes the right weights: same output as the shared MLP run on its own. (The kernel itself is
checked in tests/kernels/test_kernel_moe_shared.py; on GPU the block takes this path at
T <= 4.)"""

from __future__ import annotations

import pytest
import torch

import engine.layers.moe as moe_layer
import kernels.moe as kmoe
from engine.layers.moe import MoEBlock


def _block(seed: int) -> MoEBlock:
    torch.manual_seed(seed)
    block = MoEBlock(32, 2, 1e-12, text=(5, 24), vision=(3, 16), shared_intermediate=48)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block.eval()


@pytest.mark.parametrize("t", [1, 3])
def test_shared_experts_handed_to_the_decode_launches(monkeypatch, t: int) -> None:
    block = _block(t)
    x = torch.randn(t, 32)
    with torch.no_grad():
        want = block(x)
        seen = []
        real = kmoe.fused_moe

        def spy(*a, **kw):  # type: ignore[no-untyped-def]
            seen.append(kw.get("shared"))
            return real(*a, **kw)

        monkeypatch.setattr(moe_layer, "shares_decode_launches", lambda x: True)
        monkeypatch.setattr(moe_layer, "fused_moe", spy)
        got = block(x)
    [shared] = seen
    assert shared is not None and shared[0] is block.shared_experts.gate_up_proj.weight
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
